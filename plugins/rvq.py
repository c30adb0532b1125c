"""ResidualVQ: x (b, n, d) -> quantized (b, n, d), indices (b, n, Q), losses (Q,); GroupedResidualVQ.

Residual vector quantization (SoundStream, arXiv 2107.03312): ``r_0 = project_in(x)``, layer ``q``
quantizes ``r_q`` and ``r_{q+1} = r_q - sg(q_q)``; the output is ``project_out(Σ_q q_q)``. Every layer is
a :class:`~vqcore.plugins.vq.VectorQuantize` in codebook space (the layers never project), so all of its
keyword arguments (decay, k-means, dead-code expiry, cosine, rotation trick, stochastic sampling, ...)
are forwarded. RQ-VAE's shared codebook (arXiv 2203.01941), quantize dropout with Encodec's structured
``multiple_of`` variant, and grouped residual VQ (HiFi-Codec, arXiv 2305.02765) are built in.
``implicit_neural_codebook=True`` (QINCo, arXiv 2401.14732) gives layer ``q > 0`` the codebook
``mlps[q - 1](codes, condition)``, conditioned on the sum of the codes before it, searched and trained
without ever holding a (tokens, codes, dim) tensor (:mod:`vqcore.blocks.implicit_codebook`);
``mlp_kwargs`` (``dim_hidden``, ``depth``) configure the MLPs.

Beam search (``beam_size`` in training, ``eval_beam_size`` in eval and ``encode``, or forward's
``beam_size``): the best code path instead of the greedy one (:mod:`vqcore.blocks.beam`), scored by minus
the weighted sum (``beam_score_quantizer_weights``) of the layers' commitment MSEs. A training forward
searches first, then takes the usual training step along the chosen path (losses, estimator, one codebook
step per layer with that path's residuals). ``diveq=True`` (DiVeQ, arXiv 2509.26469) trains learnable
codebooks through a directional reparameterisation of the summed codes; ``quant_grad_frac`` lets a
fraction of each layer's output gradient flow down the residual chain; ``forward(x, indices=...)`` gives
NaturalSpeech 2's cross-entropy of target codes (:meth:`ResidualVQ.cross_entropy_tokens`).

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- ``shared_codebook=True`` holds ONE codebook object, passed to every layer: the EMA step runs once per
  training step on the residuals and indices of all (kept) layers together (the reference decays Q
  times) and dead codes expire once; as in the reference, the state_dict lists it under every layer
  (``layers.{q}._codebook.*``, the same tensors; vqcore.save stores them once);
- ``accept_image_fmap`` / ``accept_3d_fmap`` work (broken in the reference): indices ``(b, h, w, Q)``;
- decode accepts indices with fewer than Q trailing entries (coarse codes): missing layers count as
  dropped, whether or not quantize dropout is on; -1 decodes to a zero contribution, and a token whose
  layers are all -1 (masked) decodes to zero, also after ``project_out``;
- the losses are ``(Q,)`` (``(G, Q)`` grouped), fresh zeros in eval, also with an eval beam search (the
  reference returns the best path's commitment losses there);
- beam scores are the commitment MSEs whatever ``commitment_weight`` (the reference scales them by it, so
  with ``commitment_weight=0`` its beams are unranked); a training beam with ``stochastic_sample_codes`` is
  refused (the reference takes the top-k of Gumbel-noised distances); k-means initialises each layer on
  the residuals of every kept path;
- DiVeQ's reparameterisation runs in training only (the reference also perturbs eval outputs, which then
  differ from the decode of their indices); options that contradict ``diveq`` (``ema_update=True``,
  ``commitment_weight`` other than 0, an estimator, ``use_cosine_sim``, ``quant_grad_frac`` other than 1)
  are refused, where the reference overrides them silently;
- with ``quant_grad_frac`` the residual passed on is exactly ``r - code`` in value (the reference's
  ``frac * q + (1 - frac) * sg(q)`` may round it);
- ``forward(x, indices=...)`` works (the reference 1.32.0 raises): each layer's residual is that of the
  greedy chain of the layers' own codes (as in the reference's earlier, working versions), whatever the beam
  size, without quantize dropout; it touches no training state (no k-means, EMA or expiry); target codes
  at masked positions are ignored; a list of per-layer ``(b, n)`` tensors is stacked on the last axis;
- implicit neural codebook: the search compares squared distances summed exactly (the reference's
  ``F.pairwise_distance`` adds 1e-6 to every difference, which can flip near ties); it works with
  ``use_cosine_sim=True`` (refused by the reference: its layers' codebooks are learnable): every layer's
  codes are then trained by gradient and the MLPs' outputs are l2-normalised; layer 0's codes are
  searched by cosine as stored, so an optimiser may move them off the unit sphere; ``ema_update=True``,
  a ``codebook`` object or name, and ``straight_through=True`` are refused with it, as is ``mlp_kwargs``
  without it (the reference ignores it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from vqcore.blocks.beam import BeamPath, beam_search, nearest_candidates
from vqcore.blocks.distance import is_tie
from vqcore.blocks.distributed import should_sync
from vqcore.blocks.estimators import directional_reparam
from vqcore.blocks.implicit_codebook import (
    ImplicitCodebookMLP,
    decode_implicit,
    lookup_transformed,
    nearest_transformed,
    transformed_codes,
)
from vqcore.blocks.layout import TokenLayout, zero_padding
from vqcore.blocks.losses import code_cross_entropy
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.residual import (
    GroupedStacks,
    GroupStep,
    QuantizeDropout,
    decode_layers,
    pad_layers,
    sum_layers,
    zero_dropped,
)
from vqcore.blocks.validation import check_positive_int, check_tensor
from vqcore.book_layout import BookLayout
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.plugins.vq import CODEBOOK_OPTIONS, BookStep, VectorQuantize, codebook_from_options
from vqcore.protocols import DROPPED_INDEX


class ResidualVQOutput(NamedTuple):
    """ResidualVQ: indices (b, *positions, Q), losses (Q,); GroupedResidualVQ: indices (G, b, *positions, Q),
    losses (G, Q). Dropped (quantize dropout) and masked positions have index -1 and zero loss."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor


class ResidualVQOutputWithCodes(NamedTuple):
    """``return_all_codes=True``: ``all_codes`` (Q, b, *positions, codebook_dim) in codebook space (before
    project_out); GroupedResidualVQ gives a tuple of those, one per group."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor
    all_codes: Tensor | tuple[Tensor, ...]


class ResidualVQCrossEntropy(NamedTuple):
    """``forward(x, indices=...)``: the quantized output and ``ce_loss`` (0-dim), the sum over the layers of
    the cross-entropy of the given codes (grouped: summed over the groups too)."""

    quantized: Tensor
    ce_loss: Tensor


def _layer_sizes(codebook_size: object, num_quantizers: object) -> tuple[int, ...]:
    if codebook_size is None:
        raise TypeError("codebook_size is required (an int, or one int per layer)")
    if isinstance(codebook_size, (list, tuple)):
        sizes = tuple(codebook_size)
        if not sizes:
            raise ValueError("codebook_size must not be an empty sequence")
        for s in sizes:
            check_positive_int(s, "codebook_size entries")
        if num_quantizers is not None and num_quantizers != len(sizes):
            raise ValueError(
                f"codebook_size has {len(sizes)} per-layer sizes {sizes} "
                f"but num_quantizers is {num_quantizers}"
            )
        return sizes
    size = check_positive_int(codebook_size, "codebook_size")
    if num_quantizers is None:
        raise TypeError("num_quantizers is required when codebook_size is a single int")
    return (size,) * check_positive_int(num_quantizers, "num_quantizers")


# -- beam search, DiVeQ and the residual gradient: option checks ------------------------------------------

# VectorQuantize keyword arguments that DiVeQ sets on every layer, with the values it needs
DIVEQ_LAYER_OPTIONS: dict[str, Any] = {
    "learnable_codebook": True,
    "ema_update": False,
    "commitment_weight": 0.0,
}
# layer options that give the layers a gradient estimator (DiVeQ replaces them by its reparameterisation)
ESTIMATOR_OPTIONS = ("rotation_trick", "straight_through", "estimator")


def beam_options(
    beam_size: int | None,
    eval_beam_size: int | None,
    weights: Sequence[float] | None,
    num_quantizers: int,
    vq_kwargs: dict,
) -> tuple[int | None, int | None, tuple[float, ...]]:
    """Checked ``(beam_size, eval_beam_size, beam_score_quantizer_weights)``: beam sizes None or ints >= 1,
    ``eval_beam_size`` defaulting to ``beam_size``, one finite weight per layer (default all 1)."""
    for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigurationError(f"{name} must be None or an int >= 1, got {value!r}")
    if eval_beam_size is not None and beam_size is None:
        raise ConfigurationError(
            f"eval_beam_size={eval_beam_size} needs beam_size (the training beam): pass beam_size too "
            "(beam_size=1 keeps training greedy)"
        )
    if beam_size is not None and beam_size > 1 and vq_kwargs.get("stochastic_sample_codes"):
        raise ConfigurationError(
            f"beam_size={beam_size} searches deterministically; stochastic_sample_codes=True samples the "
            "codes: use one of them (eval_beam_size alone is fine with sampling)"
        )
    if weights is None:
        resolved = (1.0,) * num_quantizers
    else:
        try:
            resolved = tuple(float(w) for w in weights)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"beam_score_quantizer_weights must be a sequence of numbers, got {weights!r}"
            ) from None
        if len(resolved) != num_quantizers:
            raise ConfigurationError(
                f"beam_score_quantizer_weights needs one weight per layer (num_quantizers={num_quantizers}), "
                f"got {len(resolved)}"
            )
        if not all(math.isfinite(w) for w in resolved):
            raise ConfigurationError(f"beam_score_quantizer_weights must be finite, got {resolved}")
    evaluation = beam_size if eval_beam_size is None else eval_beam_size
    return beam_size, evaluation, resolved


def residual_gradient_fraction(quant_grad_frac: object, diveq: bool) -> float:
    """``quant_grad_frac`` checked: a number in [0, 1]; DiVeQ uses 1 (0, the default, is read as 1)."""
    if isinstance(quant_grad_frac, bool) or not isinstance(quant_grad_frac, (int, float)):
        raise ConfigurationError(f"quant_grad_frac must be a number in [0, 1], got {quant_grad_frac!r}")
    if not 0.0 <= quant_grad_frac <= 1.0:
        raise ConfigurationError(f"quant_grad_frac must be in [0, 1], got {quant_grad_frac}")
    if diveq and quant_grad_frac not in (0.0, 1.0):
        raise ConfigurationError(
            f"diveq=True passes the whole gradient along the residual chain (quant_grad_frac=1); "
            f"got quant_grad_frac={quant_grad_frac}: leave it unset"
        )
    return 1.0 if diveq else float(quant_grad_frac)


def diveq_layer_kwargs(vq_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The layers' keyword arguments under ``diveq=True``: learnable codebooks without EMA and without a
    commitment term (:data:`DIVEQ_LAYER_OPTIONS`); an option given with another value is refused."""
    for name, value in DIVEQ_LAYER_OPTIONS.items():
        if name in vq_kwargs and vq_kwargs[name] != value:
            raise ConfigurationError(
                f"diveq=True trains the codebooks through its reparameterisation ({name}={value!r}); "
                f"got {name}={vq_kwargs[name]!r}: leave {name} unset"
            )
    given = [name for name in ESTIMATOR_OPTIONS if vq_kwargs.get(name)]
    if given:
        raise ConfigurationError(
            f"diveq=True replaces the layers' gradient estimator by its reparameterisation; got "
            f"{', '.join(f'{name}={vq_kwargs[name]!r}' for name in given)}: leave it unset"
        )
    if vq_kwargs.get("use_cosine_sim"):
        raise ConfigurationError(
            "diveq=True needs learnable codebooks, which use_cosine_sim=True does not support "
            "(gradient steps leave the unit sphere): use diveq with Euclidean codebooks"
        )
    if vq_kwargs.get("codebook") is not None:
        raise ConfigurationError(
            f"diveq=True builds learnable codebooks; codebook={vq_kwargs['codebook']!r} is another one: "
            "pass one of them"
        )
    return {**vq_kwargs, **DIVEQ_LAYER_OPTIONS}


class ResidualVQ(QuantizerModule):
    """x (b, n, d) -> quantized (b, n, d), indices (b, n, Q) int64, losses (Q,) — see the module docstring.

    Layouts as :class:`VectorQuantize`: ``(b, n, dim)`` / ``(b, dim)``, ``(b, dim, n)`` with
    ``channel_last=False``, ``(b, dim, h, w)`` with ``accept_image_fmap``, ``(b, dim, t, h, w)`` with
    ``accept_3d_fmap``; the indices keep the positions and gain a trailing Q axis.

    The layers are VectorQuantize modules used through their public API only (``to_books``,
    ``quantize_books``, ``output_codes``, ``estimate``, ``straight_through_output``, ``step_codebook_``,
    ``codebook_module``); a shared codebook is one codebook object passed to every layer as its ``codebook``.
    """

    layers: Sequence[VectorQuantize]  # an nn.ModuleList (whose items torch types as plain Modules)

    def __init__(
        self,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size: int | tuple[int, ...] | list[int] | None = None,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        channel_last: bool = True,
        heads: int = 1,
        diveq: bool = False,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights: Sequence[float] | None = None,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict[str, Any] | None = None,
        **vq_kwargs: Any,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        sizes = _layer_sizes(codebook_size, num_quantizers)
        if heads != 1:
            raise ConfigurationError(f"ResidualVQ layers have one head: heads must be 1, got {heads!r}")
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        cosine = bool(vq_kwargs.get("use_cosine_sim", False))
        if implicit_neural_codebook:  # QINCo: the codes are trained by gradient, through the MLPs
            _implicit_codebook_options(vq_kwargs, beam_size, eval_beam_size, diveq)
        elif mlp_kwargs:
            raise ConfigurationError(
                "mlp_kwargs configure the MLPs of the implicit neural codebook: pass "
                "implicit_neural_codebook=True with them, or leave mlp_kwargs unset"
            )
        vq_kwargs.pop("separate_codebook_per_head", None)
        self.beam_size, self.eval_beam_size, self.beam_score_quantizer_weights = beam_options(
            beam_size, eval_beam_size, beam_score_quantizer_weights, len(sizes), vq_kwargs
        )
        self.diveq = bool(diveq)
        self.quant_grad_frac = residual_gradient_fraction(quant_grad_frac, self.diveq)
        if self.diveq:
            vq_kwargs = diveq_layer_kwargs(vq_kwargs)
        codebook_dim = dim if codebook_dim is None else codebook_dim
        check_positive_int(codebook_dim, "codebook_dim")
        if shared_codebook and len(set(sizes)) > 1:
            raise ValueError(f"shared_codebook needs one codebook size for every layer, got {sizes}")
        self.dropout = QuantizeDropout(
            len(sizes), quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of
        )
        self.dim, self.codebook_dim, self.num_quantizers = dim, codebook_dim, len(sizes)
        self.codebook_sizes = sizes
        self.shared_codebook = shared_codebook
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.sync_codebook = vq_kwargs.get("sync_codebook")
        self.layout = TokenLayout.from_flags(
            dim, accept_image_fmap=accept_image_fmap, accept_3d_fmap=accept_3d_fmap, channel_last=channel_last
        )
        self.has_projections = codebook_dim != dim
        self.project_in, self.project_out = projection_pair(dim, codebook_dim, enabled=self.has_projections)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        if not shared_codebook and not isinstance(vq_kwargs.get("codebook"), (str, type(None))):
            raise ValueError(
                "a codebook object is one codebook: pass shared_codebook=True to share it between layers, "
                "or its registered name so that every layer builds its own"
            )
        if shared_codebook:  # one codebook object, given to every layer (each registers it: no copies)
            options = {k: vq_kwargs.pop(k) for k in CODEBOOK_OPTIONS if k in vq_kwargs}
            vq_kwargs["codebook"] = codebook_from_options(
                vq_kwargs.pop("codebook", None),
                vq_kwargs.pop("codebook_kwargs", None),
                size=sizes[0],
                dim=codebook_dim,
                books=1,
                parameter=vq_kwargs.get("orthogonal_reg_weight", 0.0) > 0,
                directional_reparam=bool(vq_kwargs.get("directional_reparam", False)),
                **options,
            )
        self.layers = cast(
            "Sequence[VectorQuantize]",
            nn.ModuleList(VectorQuantize(codebook_dim, size, **vq_kwargs) for size in sizes),
        )
        # layer q > 0 of an implicit neural codebook searches mlps[q - 1](its codes, sum of the codes before)
        self.mlps: Sequence[ImplicitCodebookMLP] | None = None
        if implicit_neural_codebook:
            mlp_kwargs = _checked_mlp_kwargs(mlp_kwargs)
            mlps = [ImplicitCodebookMLP(codebook_dim, **mlp_kwargs, l2norm_output=cosine) for _ in sizes[1:]]
            self.mlps = cast("Sequence[ImplicitCodebookMLP]", nn.ModuleList(mlps))
        self.register_load_state_dict_pre_hook(_shared_codebook_keys)

    # -- properties --------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """The largest layer's size (every index is below it); per layer: ``codebook_sizes``."""
        return max(self.codebook_sizes)

    @property
    def num_codebooks(self) -> int:
        return self.num_quantizers

    def book_layout(self) -> BookLayout:
        """The books of the indices ``(..., layers)``: one per layer (vqcore.book_layout)."""
        return BookLayout.residual_stack(self.codebook_sizes)

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(Q, K, codebook_dim), or a tuple of (K_q, codebook_dim) when the sizes differ."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if len(set(self.codebook_sizes)) == 1 else books

    # -- token paths shared by encode, decode, forward and GroupedResidualVQ ----------------------------
    def encode_tokens(self, tokens: Tensor, with_total: bool = False, beam_size: int | None = None) -> Any:
        """Features (b, n, dim) -> indices (b, n, Q): ``project_in``, then the greedy nearest code of each
        residual, or the best path of a beam search of ``beam_size`` (default ``eval_beam_size``) beams.

        ``with_total``: also the sum of the chosen codes (codebook space), added in layer order exactly as
        :meth:`decode_tokens` adds them (so ``project_out(total)`` is bit for bit the decode of indices
        without -1), which saves eval the second lookup of every code.
        """
        z = project_into(self.project_in, tokens)
        b, n = z.shape[0], z.shape[1]
        beam = self.eval_beam_size if beam_size is None else beam_size
        if beam is not None and beam > 1:
            found = self.beam_path(z.reshape(b * n, z.shape[-1]), beam, self.num_quantizers)
            stacked = found.indices.reshape(b, n, found.indices.shape[-1])
            return (stacked, found.total.reshape(b, n, found.total.shape[-1])) if with_total else stacked
        residual, indices = z, []
        codes: list[Tensor] = []
        condition = z  # implicit neural codebook: the sum of the codes so far (set after layer 0)
        for q, layer in enumerate(self.layers):
            book = layer.codebook_module
            if q and self.mlps is not None:  # the transformed codes of this token's condition
                condition = codes[0] if q == 1 else condition + codes[-1]
                idx, code = self._implicit_code(q, layer.to_books(residual), condition)
                indices.append(idx.reshape(b, n))
                residual = residual - code
                codes.append(code)
                continue
            idx = book.nearest(layer.to_books(residual))
            indices.append(idx.reshape(b, n))
            code = book.lookup(idx)
            code = code.reshape(b, n, code.shape[-1])
            residual = residual - code
            codes.append(code)
        stacked = torch.stack(indices, -1)
        return (stacked, sum_layers(codes)) if with_total else stacked

    def layer_codes(self, indices: Tensor) -> list[Tensor]:
        """(b, n, Q) indices, -1 allowed -> Q codebook-space tensors (b, n, cd); -1 gives zeros."""
        b, n = indices.shape[0], indices.shape[1]
        if self.mlps is not None:  # implicit neural codebook: layer by layer, the running sum as condition
            flat = decode_implicit(
                [layer.codebook for layer in self.layers],
                self.mlps,
                indices.reshape(b * n, indices.shape[-1]),
            )
            return [code.reshape(b, n, code.shape[-1]) for code in flat]
        codes = []
        for q, layer in enumerate(self.layers):
            idx = indices[..., q]
            code = layer.codebook_module.lookup(idx.clamp(min=0).reshape(1, -1))
            code = code.reshape(b, n, code.shape[-1])
            codes.append(zero_dropped(code, idx))
        return codes

    def beam_path(self, z: Tensor, beam_size: int, kept: int, valid: Tensor | None = None) -> BeamPath:
        """The beam search's best path of tokens z (N, codebook_dim) through the first ``kept`` layers
        (:func:`vqcore.blocks.beam.beam_search`; the cost of a code is its commitment MSE). In training
        mode each layer's codebook is prepared (k-means) on the residuals of every kept path of the
        ``valid`` (N,) tokens first. No gradient."""
        if self.mlps is not None:
            raise ValueError(
                "beam search over implicit neural codebooks (implicit_neural_codebook=True) is not supported "
                "yet: use beam_size=1 (greedy search)"
            )
        n = z.shape[0]

        def search(q: int, residual: Tensor, condition: Tensor, k: int) -> tuple[Tensor, Tensor]:
            layer = self.layers[q]
            book = layer.codebook_module
            zq = layer.to_books(residual)  # (1, M, cd), l2-normalised for cosine codebooks
            if self.training:
                ok = None if valid is None else valid.repeat_interleave(residual.shape[0] // n).unsqueeze(0)
                book.prepare_(zq, ok, sync=should_sync(layer.sync_codebook))
            return nearest_candidates(zq[0], book.codes.detach()[0], k, cosine=layer.use_cosine_sim)

        def codes_of(q: int, indices: Tensor, condition: Tensor) -> Tensor:
            return self.layers[q].codebook_module.lookup(indices.unsqueeze(0))[0]

        return beam_search(
            z, self.codebook_sizes[:kept], search, codes_of, beam_size, self.beam_score_quantizer_weights
        )

    def decode_tokens(self, indices: Tensor) -> Tensor:
        """(b, n, Q) indices -> (b, n, dim); the one decode path of eval forward and ``decode``."""
        return decode_layers(self.layer_codes(indices), indices, self.project_out)

    def index_tokens(self, indices: Tensor, name: str = "indices") -> tuple[Tensor, tuple]:
        """Indices (b, *positions, q) with q <= Q -> checked tokens (b, n, Q) (missing layers: -1)."""
        check_tensor(indices, name)
        tokens, spatial = self.layout.indices_to_tokens(indices, 1, name)
        return pad_layers(tokens, self.codebook_sizes, name), spatial

    # -- inference paths (export-safe) --------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices (b, *positions, Q) int64; no training state is touched."""
        tokens, spatial = self.layout.to_tokens(x)
        return self.layout.indices_from_tokens(self.encode_tokens(tokens), spatial)

    def decode(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q), q <= Q, -1 allowed -> quantized in the input layout (after
        project_out)."""
        tokens, spatial = self.index_tokens(indices)
        return self.layout.from_tokens(self.decode_tokens(tokens), spatial)

    get_output_from_indices = decode

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q) -> per-layer codes (Q, b, *positions, codebook_dim), before project_out;
        -1 and missing layers give zero vectors (channel-last for every layout)."""
        tokens, spatial = self.index_tokens(indices)
        codes = torch.stack(self.layer_codes(tokens))
        return codes.reshape(codes.shape[0], codes.shape[1], *spatial, codes.shape[-1])

    # -- forward -----------------------------------------------------------------------------------
    def kept_layers(self, seed: int | None = None, device: torch.device | str = "cpu") -> int:
        """How many leading layers this forward runs (quantize dropout in training mode), agreed by every
        rank."""
        return self.dropout.kept_layers(self.training, seed, sync=self.sync_codebook, device=device)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        indices: Tensor | Sequence[Tensor] | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        beam_size: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        accum_ema_update: bool = False,
    ):
        """``indices``: the cross-entropy path (:meth:`cross_entropy_tokens`), which returns
        ``(quantized, ce_loss)``. ``beam_size``: this call's beam (default ``beam_size`` in training,
        ``eval_beam_size`` in eval; 1 is greedy). ``accum_ema_update``: only accumulate this batch's EMA
        statistics (every codebook); the next call without it takes one step from all of them, as for one
        large batch (gradient accumulation)."""
        tokens, spatial = self.layout.to_tokens(x)
        b = tokens.shape[0]
        valid = None if mask is None else self.layout.mask_to_tokens(mask, b, spatial)
        if indices is not None:
            targets = self.target_tokens(indices, b, spatial, valid)
            out, ce = self.cross_entropy_tokens(tokens, targets, valid)
            return ResidualVQCrossEntropy(self.layout.from_tokens(out.to(x.dtype), spatial), ce)
        beam = self.call_beam_size(beam_size)
        kept = self.kept_layers(rand_quantize_dropout_fixed_seed, x.device)
        out, indices, losses, codes = self.quantize_tokens(
            tokens,
            valid,
            kept,
            return_all_codes,
            sample_codebook_temp,
            freeze_codebook,
            accum_ema_update,
            beam_size=beam,
        )
        quantized = self.layout.from_tokens(out.to(x.dtype), spatial)
        indices = self.layout.indices_from_tokens(indices, spatial)
        if codes is None:  # return_all_codes=False
            return ResidualVQOutput(quantized, indices, losses)
        codes = codes.reshape(codes.shape[0], b, *spatial, codes.shape[-1])
        return ResidualVQOutputWithCodes(quantized, indices, losses, codes)

    def call_beam_size(self, beam_size: int | None = None) -> int:
        """The beam of a forward in the module's mode: ``beam_size`` (checked), else ``beam_size`` in
        training and ``eval_beam_size`` in eval; 1 (greedy) when none is set."""
        if beam_size is not None:
            if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
                raise ValueError(f"beam_size must be None or an int >= 1, got {beam_size!r}")
            if self.training and beam_size > 1 and self.layers[0].stochastic_sample_codes:
                raise ValueError(
                    f"beam_size={beam_size} searches deterministically, but the layers sample their codes "
                    "in training (stochastic_sample_codes=True): call with beam_size=1, or in eval mode"
                )
            if beam_size > 1 and self.mlps is not None:
                raise ValueError(
                    f"beam_size={beam_size} with implicit_neural_codebook=True: beam search over implicit "
                    "neural codebooks is not supported yet; call with beam_size=1 (greedy search)"
                )
        else:
            beam_size = self.beam_size if self.training else self.eval_beam_size
        return 1 if beam_size is None else beam_size

    def quantize_tokens(
        self,
        tokens: Tensor,
        valid: Tensor | None,
        kept: int,
        want_codes: bool = False,
        temperature: float | None = None,
        freeze: bool | None = None,
        accumulate: bool = False,
        beam_size: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """tokens (b, n, dim) with ``kept`` layers running -> (out (b, n, dim), indices (b, n, Q),
        losses (Q,), codes (Q, b, n, cd) or None); training-mode steps in training mode, plain encoding
        otherwise. ``beam_size``: the beam (default: the module's for its mode, :meth:`call_beam_size`)."""
        beam = self.call_beam_size() if beam_size is None else beam_size
        raw = tokens
        tokens = zero_padding(tokens, valid)
        if not self.training:
            if valid is None:  # no -1 anywhere: the decode of the indices is project_out(sum of the codes)
                indices, total = self.encode_tokens(tokens, with_total=True, beam_size=beam)
                out = project_from(self.project_out, total)
            else:
                indices = self.encode_tokens(tokens, beam_size=beam)
                indices = indices.masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
                out = self.decode_tokens(indices)
            codes = torch.stack(self.layer_codes(indices)) if want_codes else None
            result = out, indices, out.new_zeros(self.num_quantizers, dtype=torch.float32), codes
        else:
            z = project_into(self.project_in, tokens)
            path = None
            if beam > 1:  # the best path's codes, then the training step along it
                flat_valid = None if valid is None else valid.reshape(-1)
                path = self.beam_path(z.detach().reshape(-1, z.shape[-1]), beam, kept, flat_valid).indices
            result = self._train_tokens(z, valid, kept, want_codes, temperature, freeze, accumulate, path)
        if valid is not None and not self.return_zeros_for_masked_padding:  # padding passes through unchanged
            result = (torch.where(valid.unsqueeze(-1), result[0], raw.to(result[0].dtype)), *result[1:])
        return result

    def _train_tokens(
        self,
        z: Tensor,
        valid: Tensor | None,
        kept: int,
        want_codes: bool,
        temperature: float | None,
        freeze: bool | None,
        accumulate: bool = False,
        path: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Training step over the kept layers: each layer's ``quantize_books`` (code choice, losses,
        k-means), its estimator, and its codebook step (once for all layers with a shared codebook).

        ``path`` (b * n, kept): the codes a beam search chose, taken instead of each layer's own choice.
        The residual passed on is ``r - code - quant_grad_frac * (out - sg(out))`` (``out`` the layer's
        output: the value ``r - code``, a fraction of the output's gradient); with DiVeQ the outputs are
        the codes themselves (gradient to the codebooks) and their sum goes through the directional
        reparameterisation."""
        b, n = z.shape[0], z.shape[1]
        first = self.layers[0]
        frac = self.quant_grad_frac
        # with the straight-through estimator and no normalisation, the sum of the layer outputs of a detached
        # chain is sum(codes) + kept * (z - sg(z)): the same values and gradient, without Q estimator graphs
        # (with quant_grad_frac the residual of layer q carries (1 - frac)^q of that gradient)
        fused = first.straight_through_output and not first.use_cosine_sim and not self.diveq
        fused = fused and self.mlps is None  # an implicit codebook's condition carries the layers' gradient
        residual, total = z, None
        indices, losses, codes, seen = [], [], [], []
        for q, layer in enumerate(self.layers):
            if q >= kept:  # quantize dropout: index -1, zero loss, zero code
                indices.append(z.new_full((b, n), DROPPED_INDEX, dtype=torch.long))
                losses.append(z.new_zeros(()))
                if want_codes:
                    codes.append(z.new_zeros(b, n, self.codebook_dim))
                continue
            book_valid = None if valid is None else layer.book_mask(valid)
            zq = layer.to_books(residual)  # (1, b*n, cd); l2-normalised for cosine codebooks
            implicit = bool(q) and self.mlps is not None
            if implicit:  # implicit neural codebook
                assert total is not None  # layer 0 ran: the layers' outputs so far are the condition
                step = self._implicit_step(q, zq, total, book_valid, temperature, freeze)
            else:
                step = layer.quantize_books(
                    zq,
                    book_valid,
                    sample_codebook_temp=temperature,
                    freeze_codebook=freeze,
                    indices=None if path is None else path[:, q].reshape(1, -1),
                )
            code = step.codes
            if book_valid is not None:  # padding: no code, residual unchanged
                code = code.masked_fill(~book_valid.unsqueeze(-1), 0.0)
            if self.diveq:
                out = self._diveq_codes(layer, step.indices, book_valid, freeze)
            else:
                out = (
                    code
                    if fused
                    else layer.estimate(
                        zq,
                        code
                        if implicit
                        else self._output_codes(layer, zq, code, step.indices, book_valid, freeze),
                        step.indices,
                        temperature,
                    )
                )
            if self.shared_codebook:
                seen.append((zq, step.indices))
            else:
                layer.step_codebook_(
                    zq, step.indices, book_valid, freeze_codebook=freeze, accum_ema_update=accumulate
                )
            idx = step.indices if book_valid is None else step.indices.masked_fill(~book_valid, DROPPED_INDEX)
            out = out.reshape(b, n, out.shape[-1])
            total = out if total is None else total + out
            passed = residual - code.reshape(b, n, code.shape[-1])
            if frac > 0:  # the value stays r - code; the gradient: a fraction of the output's
                moving = residual - residual.detach() if fused else out - out.detach()
                passed = passed - frac * moving
            residual = passed
            indices.append(idx.reshape(b, n))
            losses.append(step.loss)
            if want_codes:
                codes.append(out)
        if self.shared_codebook:  # one step (decay applied once) and one expiry pass over every kept layer
            ok = None if valid is None else valid.reshape(1, -1).repeat(1, len(seen))
            z_all = torch.cat([zq for zq, _ in seen], 1)
            first.step_codebook_(
                z_all,
                torch.cat([i for _, i in seen], 1),
                ok,
                freeze_codebook=freeze,
                accum_ema_update=accumulate,
            )
        assert total is not None  # kept >= 1: the first layer always runs
        ran = min(kept, self.num_quantizers)
        if fused and z.requires_grad:
            # the gradient of layer q's residual to z is (1 - frac)^q: the sum over the layers that ran
            total = total + sum((1.0 - frac) ** q for q in range(ran)) * (z - z.detach())
            if want_codes:  # each layer's output carries the straight-through gradient of its residual
                codes = [
                    c + (1.0 - frac) ** q * (z - z.detach()) if q < ran else c for q, c in enumerate(codes)
                ]
        if self.diveq:
            total = directional_reparam(z, total)
        out = project_from(self.project_out, total)
        if valid is not None:
            out = torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))
        return out, torch.stack(indices, -1), torch.stack(losses), torch.stack(codes) if want_codes else None

    def _diveq_codes(
        self, layer: VectorQuantize, indices: Tensor, valid: Tensor | None, freeze: bool | None
    ) -> Tensor:
        """DiVeQ's layer output: the chosen codes (1, N, cd) with their gradient to the learnable codebook
        (detached when the codebook is frozen), zero at padding."""
        codes = layer.codebook_module.lookup(indices)
        if layer.freeze_codebook if freeze is None else freeze:
            codes = codes.detach()
        return codes if valid is None else codes.masked_fill(~valid.unsqueeze(-1), 0.0)

    # -- the cross-entropy path (forward with indices) ---------------------------------------------------
    def target_tokens(
        self, indices: Tensor | Sequence[Tensor], b: int, spatial: tuple, valid: Tensor | None = None
    ) -> Tensor:
        """The target codes of the cross-entropy path -> checked tokens (b, n, Q) int64: ``indices``
        (b, *positions, Q), or a list of Q tensors (b, *positions), one per layer. Every layer of every
        ``valid`` (b, n) token needs a code: -1 (a dropped code) is refused there, and image fmaps are
        refused (as vector-quantize-pytorch)."""
        if self.layout.kind == "image":
            raise ConfigurationError(
                "the cross-entropy path (forward with indices) does not take image fmaps "
                "(accept_image_fmap=True): quantize sequences (b, n, dim) for it"
            )
        if isinstance(indices, (list, tuple)):
            if len(indices) != self.num_quantizers:
                raise ValueError(
                    f"indices as a list needs one tensor per layer ({self.num_quantizers}), "
                    f"got {len(indices)}"
                )
            for q, entry in enumerate(indices):
                check_tensor(entry, f"indices[{q}]")
            indices = torch.stack(list(indices), -1)
        tokens, given = self.index_tokens(cast(Tensor, indices))
        if (tokens.shape[0], given) != (b, spatial) or (
            cast(Tensor, indices).shape[-1] != self.num_quantizers
        ):
            raise ValueError(
                f"indices must have shape {(b, *spatial, self.num_quantizers)} (the input's positions and "
                f"one code per layer), got {tuple(cast(Tensor, indices).shape)}"
            )
        dropped = tokens < 0
        if bool((dropped if valid is None else dropped & valid.unsqueeze(-1)).any()):
            raise ValueError(
                "indices hold -1 (dropped or masked codes); the cross-entropy path needs every layer's code: "
                "use indices from an eval-mode forward without quantize dropout"
            )
        return tokens

    def cross_entropy_tokens(
        self, tokens: Tensor, targets: Tensor, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """tokens (b, n, dim) and target codes (b, n, Q) -> (quantized (b, n, dim), ce_loss ()).

        NaturalSpeech 2's residual-VQ loss: each layer's residual goes through the layer's own nearest code
        (the greedy chain, as vector-quantize-pytorch), and the layer adds
        :func:`~vqcore.blocks.losses.code_cross_entropy` of its target code under ``-||r - c||`` logits
        (``r . c`` for cosine layers) over the valid tokens. The quantized output is the chain's (the
        estimator's output in training mode). No training state is touched (no k-means, EMA or expiry)."""
        z = project_into(self.project_in, zero_padding(tokens, valid))
        b, n = z.shape[0], z.shape[1]
        residual, total, ce = z, None, z.new_zeros(())
        for q, layer in enumerate(self.layers):
            book = layer.codebook_module
            zq = layer.to_books(residual)
            target = targets[..., q].reshape(1, -1)
            if valid is not None:
                target = target.masked_fill(~valid.reshape(1, -1), DROPPED_INDEX)
            codes = book.codes if book.trained_by_gradient else book.codes.detach()
            ce = ce + code_cross_entropy(zq, codes, target, cosine=layer.use_cosine_sim)
            idx = book.nearest(zq.detach())
            code = book.lookup(idx).detach()
            out = layer.estimate(zq, code, idx) if self.training else code
            out = out.reshape(b, n, out.shape[-1])
            total = out if total is None else total + out
            residual = residual - code.reshape(b, n, code.shape[-1])
        assert total is not None  # at least one layer
        out = project_from(self.project_out, total)
        if valid is not None:
            fill = out.new_zeros(()) if self.return_zeros_for_masked_padding else tokens.to(out.dtype)
            out = torch.where(valid.unsqueeze(-1), out, fill)
        return out, ce

    @staticmethod
    def _output_codes(
        layer: VectorQuantize,
        zq: Tensor,
        code: Tensor,
        idx: Tensor,
        book_valid: Tensor | None,
        freeze: bool | None,
    ) -> Tensor:
        """A layer's :meth:`VectorQuantize.output_codes`, zero at padding like ``code``."""
        out = layer.output_codes(zq, code, idx, freeze)
        if out is not code and book_valid is not None:
            out = out.masked_fill(~book_valid.unsqueeze(-1), 0.0)
        return out

    # -- implicit neural codebook (QINCo): layer q > 0 ----------------------------------------------------
    def _implicit_code(
        self, q: int, zq: Tensor, condition: Tensor, temperature: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Books zq (1, b*n, cd) and condition (b, n, cd) -> (indices (1, b*n), chosen transformed codes
        (b, n, cd), differentiable with respect to the MLP, the codes and the condition)."""
        assert self.mlps is not None  # implicit_neural_codebook=True
        layer, mlp = self.layers[q], self.mlps[q - 1]
        cond = condition.reshape(-1, condition.shape[-1])
        x = zq.reshape(cond.shape[0], zq.shape[-1])
        search = nearest_transformed(
            mlp, x, cond, layer.codebook, cosine=layer.use_cosine_sim, temperature=temperature
        )
        code = lookup_transformed(mlp, cond, layer.codebook, search)
        return search.reshape(1, -1), code.reshape(condition.shape)

    def _implicit_step(
        self,
        q: int,
        zq: Tensor,
        condition: Tensor,
        valid: Tensor | None,
        temperature: float | None,
        freeze: bool | None,
    ) -> BookStep:
        """What ``quantize_books`` does for a plain layer, for layer q > 0 of an implicit neural codebook:
        k-means (on the codebook's own codes), the search (or a Gumbel sample) over this token's transformed
        codes, and the layer's losses, whose commitment term trains the MLP, the codes and the condition
        (unless the codebook is frozen)."""
        layer = self.layers[q]
        book = layer.codebook_module
        book.prepare_(zq.detach(), valid, sync=should_sync(layer.sync_codebook))
        temp = layer.sample_codebook_temp if temperature is None else temperature
        sample = temp if layer.stochastic_sample_codes and temp > 0 else None
        frozen = layer.freeze_codebook if freeze is None else bool(freeze)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            indices, code = self._implicit_code(q, zq.detach(), condition, sample)
        code = code.reshape(zq.shape)
        total, terms = layer.losses(zq, code, indices, book, valid)
        return BookStep(indices, code.detach(), total.mean(), {name: t.mean() for name, t in terms.items()})

    # -- export ------------------------------------------------------------------------------------
    def token_ties(self, tokens: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor:
        """Features (b, n, dim) and token indices a, b (b, n, Q) -> ok (b, n, Q): per token, the layers
        before the first differing one agree and that layer's two codes are genuinely tied (float64
        distances within ``tolerance``); the layers after it legitimately follow another residual. With
        an eval beam search, a token's two paths are tied when their float64 scores are."""
        z = project_into(self.project_in, tokens, torch.float64)
        ok = torch.ones_like(a, dtype=torch.bool)
        if self.eval_beam_size is not None and self.eval_beam_size > 1:
            for bi, ni in (a != b).any(-1).nonzero().tolist():
                score_a, scale_a = self.path_score(z[bi, ni], a[bi, ni])
                score_b, scale_b = self.path_score(z[bi, ni], b[bi, ni])
                ok[bi, ni] = abs(score_a - score_b) <= tolerance * max(scale_a, scale_b)
            return ok
        for bi, ni in (a != b).any(-1).nonzero().tolist():
            residual = z[bi, ni].reshape(1, 1, -1)
            condition = None  # implicit neural codebook: the sum of the chosen (transformed) codes so far
            for q, layer in enumerate(self.layers):
                codes = layer.codebook_module.codes.detach()[0].double()
                if q and self.mlps is not None:
                    assert condition is not None  # layer 0 ran
                    codes = transformed_codes(self.mlps[q - 1], condition, codes)
                ia, ib = int(a[bi, ni, q]), int(b[bi, ni, q])
                if ia == ib:
                    residual = residual - codes[ia]
                    condition = codes[ia] if condition is None else condition + codes[ia]
                    continue
                zq = layer.to_books(residual, torch.float64).reshape(-1)
                tied = is_tie(zq, codes[ia], codes[ib], cosine=layer.use_cosine_sim, tolerance=tolerance)
                ok[bi, ni, q:] = tied
                break
        return ok

    def path_score(self, z: Tensor, path: Tensor) -> tuple[float, float]:
        """The beam score of one token's code path: z (codebook_dim,) float64, path (Q,) -> (minus the
        weighted commitment MSEs, the size of float32 rounding on it)."""
        residual, score, scale = z.reshape(1, 1, -1), 0.0, 0.0
        for q, layer in enumerate(self.layers):
            code = layer.codebook_module.codes.detach()[0, int(path[q])].double()
            zq = layer.to_books(residual, torch.float64).reshape(-1)
            weight = self.beam_score_quantizer_weights[q]
            score -= weight * float((zq - code).pow(2).mean())
            scale += abs(weight) * float((zq.norm() + code.norm()) ** 2) / zq.numel()
            residual = residual - code
        return score, scale

    def export_tie_check(self, x: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor:
        """See vqcore.protocols.SupportsExportTieCheck: judged at the first layer where a and b differ
        (greedy), or on the two paths' scores (beam search)."""
        tokens, spatial = self.layout.to_tokens(x)
        ta, tb = (self.layout.indices_to_tokens(i, 1)[0].long() for i in (a, b))
        return self.layout.indices_from_tokens(self.token_ties(tokens, ta, tb, tolerance), spatial).reshape(
            a.shape
        )

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters embedded in exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.codebook_dim,
            "codebook_sizes": list(self.codebook_sizes),
            "num_quantizers": self.num_quantizers,
            "layout": self.layout.kind,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_sizes={self.codebook_sizes}, "
            f"codebook_dim={self.codebook_dim}, shared_codebook={self.shared_codebook}, "
            f"layout={self.layout.kind}"
        )


def _implicit_codebook_options(
    vq_kwargs: dict[str, Any], beam_size: int | None, eval_beam_size: int | None, diveq: bool
) -> None:
    """``implicit_neural_codebook=True``: every layer's codebook is trained by gradient (the commitment term
    reaches the codes through the MLPs), as ``learnable_codebook=True, ema_update=False``; ``vq_kwargs`` are
    rewritten in place. Options that contradict it, or that vqcore does not combine with it yet, are
    refused."""
    for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
        if value is not None and value > 1:
            raise ConfigurationError(
                f"implicit_neural_codebook=True with {name}={value}: beam search over implicit neural "
                f"codebooks is not supported yet; leave {name} unset (greedy search)"
            )
    layer_output = {
        "diveq": diveq,
        "directional_reparam": vq_kwargs.get("directional_reparam", False),
        "route_gradients_to_input": not vq_kwargs.get("route_gradients_to_input", True),
        "sync_update_v": vq_kwargs.get("sync_update_v", 0.0) != 0.0,
    }
    for name, given in layer_output.items():
        if given:
            raise ConfigurationError(
                f"implicit_neural_codebook=True with {name}: the layers' outputs are the transformed codes "
                f"with the straight-through or rotation-trick gradient; {name} is not supported with it"
            )
    if vq_kwargs.get("ema_update"):
        raise ConfigurationError(
            "implicit_neural_codebook=True trains the codes by gradient through the MLPs; ema_update=True "
            "would move them by EMA too: leave ema_update unset (or False) with implicit_neural_codebook"
        )
    if vq_kwargs.get("codebook") is not None:
        raise ConfigurationError(
            "implicit_neural_codebook=True builds the layers' gradient-trained codebooks itself; "
            f"codebook={vq_kwargs['codebook']!r} cannot be combined with it: leave codebook unset"
        )
    if vq_kwargs.get("straight_through"):
        raise ConfigurationError(
            "straight_through=True (Gumbel straight-through) takes its soft assignment over the plain "
            "codebook, not the transformed codes of implicit_neural_codebook=True: use the default "
            "straight-through estimator or rotation_trick=True"
        )
    if vq_kwargs.pop("use_cosine_sim", False):  # the built-in cosine codebook, trained by gradient
        options = {k: vq_kwargs.pop(k) for k in CODEBOOK_OPTIONS if k in vq_kwargs}
        options = {k: v for k, v in options.items() if k not in ("ema_update", "learnable_codebook")}
        vq_kwargs.update(codebook="cosine", codebook_kwargs={**options, "ema": False, "learnable": True})
    else:
        vq_kwargs.update(learnable_codebook=True, ema_update=False)


def _checked_mlp_kwargs(mlp_kwargs: object) -> dict[str, Any]:
    """mlp_kwargs -> the options of every :class:`ImplicitCodebookMLP` (``dim_hidden``, ``depth``)."""
    if mlp_kwargs is None:
        return {}
    if not isinstance(mlp_kwargs, dict):
        raise ConfigurationError(f"mlp_kwargs must be a dict, got {type(mlp_kwargs).__name__}")
    unknown = sorted(set(mlp_kwargs) - {"dim_hidden", "depth"})
    if unknown:
        raise ConfigurationError(
            f"mlp_kwargs takes dim_hidden and depth, got {unknown} (l2norm_output follows use_cosine_sim)"
        )
    return dict(mlp_kwargs)


def _shared_codebook_keys(module: ResidualVQ, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load pre-hook: checkpoints written before the shared codebook was passed to every layer hold it once
    as ``_shared_codebook.*``; give every layer its copy of those tensors."""
    old = f"{prefix}_shared_codebook."
    for key in [k for k in state_dict if k.startswith(old)]:
        value = state_dict.pop(key)
        for q in range(len(module.layers)):
            state_dict[f"{prefix}layers.{q}._codebook.{key[len(old) :]}"] = value


class GroupedResidualVQ(GroupedStacks[ResidualVQ]):
    """x (b, n, d) -> quantized (b, n, d), indices (groups, b, n, Q), losses (groups, Q).

    The feature axis is split into ``groups`` equal chunks, each quantized by an independent
    :class:`ResidualVQ` (``dim // groups`` features, every other keyword argument forwarded), through its
    public token paths (:class:`~vqcore.blocks.residual.GroupedStacks`). Quantize dropout is drawn once
    per step for all groups. ``return_all_codes`` adds a tuple (one entry per group, as the reference) of
    ``(Q, b, *positions, codebook_dim)`` codes.
    """

    def __init__(
        self,
        dim: int,
        groups: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        channel_last: bool = True,
        **rvq_kwargs: Any,
    ):
        layout = TokenLayout.from_flags(
            dim, accept_image_fmap=accept_image_fmap, accept_3d_fmap=accept_3d_fmap, channel_last=channel_last
        )
        super().__init__(dim, groups, lambda group_dim: ResidualVQ(group_dim, **rvq_kwargs))
        self.layout = layout

    @property
    def split_dim(self) -> int:
        """The input's feature axis the groups split: 1 for channel-first layouts, else -1."""
        return 1 if self.layout.channel_first else -1

    def forward(
        self,
        x: Tensor,
        indices: Tensor | Sequence[Tensor | Sequence[Tensor]] | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        mask: Tensor | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        accum_ema_update: bool = False,
    ):
        """``indices``: one entry per group (a tensor (groups, b, *positions, Q) or a sequence, each as
        :meth:`ResidualVQ.forward` takes them; empty: none): the cross-entropy path, returning
        ``(quantized, ce_loss)`` with the groups' losses summed. ``accum_ema_update``: only accumulate this
        batch's EMA statistics (every codebook); the next call without it takes one step from all of them,
        as for one large batch (gradient accumulation)."""
        if indices is not None and len(indices) > 0:
            return self.cross_entropy(x, indices, mask)

        def run(rvq: ResidualVQ, chunk: Tensor, valid: Tensor | None, kept: int) -> GroupStep:
            return GroupStep(
                *rvq.quantize_tokens(
                    chunk,
                    valid,
                    kept,
                    return_all_codes,
                    sample_codebook_temp,
                    freeze_codebook,
                    accum_ema_update,
                )
            )

        step = self.quantize_groups(
            x, run, mask=mask, seed=rand_quantize_dropout_fixed_seed, want_codes=return_all_codes
        )
        assert step.losses is not None  # every layer gives its losses
        if return_all_codes:
            return ResidualVQOutputWithCodes(step.quantized, step.indices, step.losses, step.codes)
        return ResidualVQOutput(step.quantized, step.indices, step.losses)

    def cross_entropy(
        self, x: Tensor, indices: Tensor | Sequence[Tensor | Sequence[Tensor]], mask: Tensor | None = None
    ) -> ResidualVQCrossEntropy:
        """The cross-entropy path: each group's :meth:`ResidualVQ.cross_entropy_tokens` on its chunk with its
        entry of ``indices``; the quantized chunks concatenated, the losses summed."""
        if len(indices) != self.groups:
            raise ValueError(f"indices needs one entry per group ({self.groups}), got {len(indices)}")
        tokens, spatial = self.layout.to_tokens(x)
        b = tokens.shape[0]
        valid = None if mask is None else self.layout.mask_to_tokens(mask, b, spatial)
        outs, total = [], x.new_zeros((), dtype=torch.float32)
        for rvq, chunk, entry in zip(self.rvqs, self._chunks(tokens), indices):
            out, ce = rvq.cross_entropy_tokens(chunk, rvq.target_tokens(entry, b, spatial, valid), valid)
            outs.append(out)
            total = total + ce
        quantized = self.layout.from_tokens(torch.cat(outs, -1).to(x.dtype), spatial)
        return ResidualVQCrossEntropy(quantized, total)

    def export_tie_check(self, x: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor:
        """See vqcore.protocols.SupportsExportTieCheck: each group's residual stack judges its own indices."""
        tokens, spatial = self.layout.to_tokens(x)
        out = []
        for g, (rvq, chunk) in enumerate(zip(self.rvqs, self._chunks(tokens))):
            ta, tb = (self.layout.indices_to_tokens(i[g], 1)[0].long() for i in (a, b))
            out.append(self.layout.indices_from_tokens(rvq.token_ties(chunk, ta, tb, tolerance), spatial))
        return torch.stack(out).reshape(a.shape)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters embedded in exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {"num_quantizers": self.num_quantizers, "groups": self.groups, "layout": self.layout.kind}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, layout={self.layout.kind}"


@hookimpl
def register_quantizers(register):
    register(
        "rvq",
        ResidualVQ,
        aliases=("residual_vq", "ResidualVQ"),
        summary="residual VQ: shared codebook, quantize dropout, image fmaps, coarse decoding",
    )
    register(
        "grouped_rvq",
        GroupedResidualVQ,
        aliases=("grouped_residual_vq", "GroupedResidualVQ"),
        summary="grouped residual VQ: the feature dim split into independent residual stacks",
    )
