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

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- ``shared_codebook=True`` holds ONE codebook object, passed to every layer: the EMA step runs once per
  training step on the residuals and indices of all (kept) layers together (the reference decays Q
  times) and dead codes expire once; as in the reference, the state_dict lists it under every layer
  (``layers.{q}._codebook.*``, the same tensors; vqcore.save stores them once);
- ``accept_image_fmap`` / ``accept_3d_fmap`` work (broken in the reference): indices ``(b, h, w, Q)``;
- decode accepts indices with fewer than Q trailing entries (coarse codes): missing layers count as
  dropped, whether or not quantize dropout is on; -1 decodes to a zero contribution, and a token whose
  layers are all -1 (masked) decodes to zero, also after ``project_out``;
- the losses are ``(Q,)`` (``(G, Q)`` grouped), fresh zeros in eval; no ``indices=`` cross-entropy path;
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
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from vqcore.blocks.distance import is_tie
from vqcore.blocks.distributed import should_sync
from vqcore.blocks.implicit_codebook import (
    ImplicitCodebookMLP,
    decode_implicit,
    lookup_transformed,
    nearest_transformed,
    transformed_codes,
)
from vqcore.blocks.layout import TokenLayout, zero_padding
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


class ResidualVQ(QuantizerModule):
    """x (b, n, d) -> quantized (b, n, d), indices (b, n, Q) int64, losses (Q,) — see the module docstring.

    Layouts as :class:`VectorQuantize`: ``(b, n, dim)`` / ``(b, dim)``, ``(b, dim, n)`` with
    ``channel_last=False``, ``(b, dim, h, w)`` with ``accept_image_fmap``, ``(b, dim, t, h, w)`` with
    ``accept_3d_fmap``; the indices keep the positions and gain a trailing Q axis.

    The layers are VectorQuantize modules used through their public API only (``to_books``,
    ``quantize_books``, ``estimate``, ``step_codebook_``, ``codebook_module``); a shared codebook is one
    codebook object passed to every layer as its ``codebook``.
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
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict[str, Any] | None = None,
        **vq_kwargs: Any,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        sizes = _layer_sizes(codebook_size, num_quantizers)
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        cosine = bool(vq_kwargs.get("use_cosine_sim", False))
        if implicit_neural_codebook:  # QINCo: the codes are trained by gradient, through the MLPs
            _implicit_codebook_options(vq_kwargs)
        elif mlp_kwargs:
            raise ConfigurationError(
                "mlp_kwargs configure the MLPs of the implicit neural codebook: pass "
                "implicit_neural_codebook=True with them, or leave mlp_kwargs unset"
            )
        if vq_kwargs.pop("heads", 1) != 1:
            raise ValueError("ResidualVQ layers have one head; heads must be 1")
        vq_kwargs.pop("separate_codebook_per_head", None)
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
        self.return_zeros_for_masked_padding = vq_kwargs.pop("return_zeros_for_masked_padding", True)
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

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(Q, K, codebook_dim), or a tuple of (K_q, codebook_dim) when the sizes differ."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if len(set(self.codebook_sizes)) == 1 else books

    # -- token paths shared by encode, decode, forward and GroupedResidualVQ ----------------------------
    def encode_tokens(self, tokens: Tensor, with_total: bool = False) -> Any:
        """Features (b, n, dim) -> indices (b, n, Q): ``project_in``, then the greedy nearest code of each
        residual.

        ``with_total``: also the sum of the chosen codes (codebook space), added in layer order exactly as
        :meth:`decode_tokens` adds them (so ``project_out(total)`` is bit for bit the decode of indices
        without -1), which saves eval the second lookup of every code.
        """
        z = project_into(self.project_in, tokens)
        b, n = z.shape[0], z.shape[1]
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
            code = book.lookup(idx).reshape(b, n, -1)
            residual = residual - code
            codes.append(code)
        stacked = torch.stack(indices, -1)
        return (stacked, sum_layers(codes)) if with_total else stacked

    def layer_codes(self, indices: Tensor) -> list[Tensor]:
        """(b, n, Q) indices, -1 allowed -> Q codebook-space tensors (b, n, cd); -1 gives zeros."""
        b, n = indices.shape[0], indices.shape[1]
        if self.mlps is not None:  # implicit neural codebook: layer by layer, the running sum as condition
            flat = decode_implicit(
                [layer.codebook for layer in self.layers], self.mlps, indices.reshape(b * n, -1)
            )
            return [code.reshape(b, n, -1) for code in flat]
        codes = []
        for q, layer in enumerate(self.layers):
            idx = indices[..., q]
            code = layer.codebook_module.lookup(idx.clamp(min=0).reshape(1, -1)).reshape(b, n, -1)
            codes.append(zero_dropped(code, idx))
        return codes

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
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        accum_ema_update: bool = False,
    ):
        """``accum_ema_update``: only accumulate this batch's EMA statistics (every codebook); the next call
        without it takes one step from all of them, as for one large batch (gradient accumulation)."""
        tokens, spatial = self.layout.to_tokens(x)
        b = tokens.shape[0]
        valid = None if mask is None else self.layout.mask_to_tokens(mask, b, spatial)
        kept = self.kept_layers(rand_quantize_dropout_fixed_seed, x.device)
        out, indices, losses, codes = self.quantize_tokens(
            tokens, valid, kept, return_all_codes, sample_codebook_temp, freeze_codebook, accum_ema_update
        )
        quantized = self.layout.from_tokens(out.to(x.dtype), spatial)
        indices = self.layout.indices_from_tokens(indices, spatial)
        if codes is None:  # return_all_codes=False
            return ResidualVQOutput(quantized, indices, losses)
        codes = codes.reshape(codes.shape[0], b, *spatial, codes.shape[-1])
        return ResidualVQOutputWithCodes(quantized, indices, losses, codes)

    def quantize_tokens(
        self,
        tokens: Tensor,
        valid: Tensor | None,
        kept: int,
        want_codes: bool = False,
        temperature: float | None = None,
        freeze: bool | None = None,
        accumulate: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """tokens (b, n, dim) with ``kept`` layers running -> (out (b, n, dim), indices (b, n, Q),
        losses (Q,), codes (Q, b, n, cd) or None); training-mode steps in training mode, plain encoding
        otherwise."""
        raw = tokens
        tokens = zero_padding(tokens, valid)
        if not self.training:
            if valid is None:  # no -1 anywhere: the decode of the indices is project_out(sum of the codes)
                indices, total = self.encode_tokens(tokens, with_total=True)
                out = project_from(self.project_out, total)
            else:
                indices = self.encode_tokens(tokens).masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
                out = self.decode_tokens(indices)
            codes = torch.stack(self.layer_codes(indices)) if want_codes else None
            result = out, indices, out.new_zeros(self.num_quantizers, dtype=torch.float32), codes
        else:
            z = project_into(self.project_in, tokens)
            result = self._train_tokens(z, valid, kept, want_codes, temperature, freeze, accumulate)
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
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Training step over the kept layers: each layer's ``quantize_books`` (code choice, losses,
        k-means), its estimator, and its codebook step (once for all layers with a shared codebook)."""
        b, n = z.shape[0], z.shape[1]
        first = self.layers[0]
        # with the straight-through estimator and no normalisation, the sum of the layer outputs of a detached
        # chain is sum(codes) + kept * (z - sg(z)): the same values and gradient, without Q estimator graphs
        fused = getattr(first.estimator, "identity_gradient", False) and not first.use_cosine_sim
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
            if q and self.mlps is not None:  # implicit neural codebook
                assert total is not None  # layer 0 ran: the layers' outputs so far are the condition
                step = self._implicit_step(q, zq, total, book_valid, temperature, freeze)
            else:
                step = layer.quantize_books(
                    zq, book_valid, sample_codebook_temp=temperature, freeze_codebook=freeze
                )
            code = step.codes
            if book_valid is not None:  # padding: no code, residual unchanged
                code = code.masked_fill(~book_valid.unsqueeze(-1), 0.0)
            out = code if fused else layer.estimate(zq, code, step.indices, temperature)
            if self.shared_codebook:
                seen.append((zq, step.indices))
            else:
                layer.step_codebook_(
                    zq, step.indices, book_valid, freeze_codebook=freeze, accum_ema_update=accumulate
                )
            idx = step.indices if book_valid is None else step.indices.masked_fill(~book_valid, DROPPED_INDEX)
            out = out.reshape(b, n, -1)
            total = out if total is None else total + out
            residual = residual - code.reshape(b, n, -1)
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
        if fused and z.requires_grad:
            total = total + min(kept, self.num_quantizers) * (z - z.detach())
            if want_codes:  # each layer's output carries the straight-through gradient of its residual
                codes = [c + (z - z.detach()) if q < kept else c for q, c in enumerate(codes)]
        out = project_from(self.project_out, total)
        if valid is not None:
            out = torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))
        return out, torch.stack(indices, -1), torch.stack(losses), torch.stack(codes) if want_codes else None

    # -- implicit neural codebook (QINCo): layer q > 0 ----------------------------------------------------
    def _implicit_code(
        self, q: int, zq: Tensor, condition: Tensor, temperature: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Books zq (1, b*n, cd) and condition (b, n, cd) -> (indices (1, b*n), chosen transformed codes
        (b, n, cd), differentiable with respect to the MLP, the codes and the condition)."""
        assert self.mlps is not None  # implicit_neural_codebook=True
        layer, mlp = self.layers[q], self.mlps[q - 1]
        cond = condition.reshape(-1, condition.shape[-1])
        x = zq.reshape(cond.shape[0], -1)
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
        distances within ``tolerance``); the layers after it legitimately follow another residual."""
        z = project_into(self.project_in, tokens, torch.float64)
        ok = torch.ones_like(a, dtype=torch.bool)
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

    def export_tie_check(self, x: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor:
        """See vqcore.protocols.SupportsExportTieCheck: judged at the first layer where a and b differ."""
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


def _implicit_codebook_options(vq_kwargs: dict[str, Any]) -> None:
    """``implicit_neural_codebook=True``: every layer's codebook is trained by gradient (the commitment term
    reaches the codes through the MLPs), as ``learnable_codebook=True, ema_update=False``; ``vq_kwargs`` are
    rewritten in place. Options that contradict it are refused."""
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

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        accum_ema_update: bool = False,
    ):
        """``accum_ema_update``: only accumulate this batch's EMA statistics (every codebook); the next call
        without it takes one step from all of them, as for one large batch (gradient accumulation)."""

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
