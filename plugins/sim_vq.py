"""SimVQ: x (b, n, d) -> quantized (b, n, d), indices (b, n), loss ().

SimVQ (Zhu et al., arXiv 2411.02038): the codebook is implicit, a FROZEN random codebook ``C``
(buffer ``frozen_codebook``, ``(codebook_size, frozen_codebook_dim)``, entries ``N(0, 1/frozen_codebook_dim)``
then ``init_fn``) mapped by a LEARNED transform ``W`` (``code_transform``: a bias-free
``Linear(frozen_codebook_dim, dim)``, or the user's ``codebook_transform`` module, an MLP say): the codes
in use are ``W(C)``. A gradient on any chosen code moves ``W`` and so the whole codebook; no code is
left behind.

Per forward the implicit codebook ``W(C)`` is computed once (one ``K x d`` transform call), the nearest
code is the chunked GEMM search of :mod:`vqcore.blocks.distance`, and the chosen codes are rows of that
table; ``indices_to_codes`` / ``decode`` look the indices up in the same table, so ``decode(encode(x))``
equals the eval forward's ``quantized`` bit for bit. The loss (training mode) is
``commitment_weight * (mse(sg x, q) + input_to_quantize_commit_loss_weight * mse(x, sg q))``: the first
term trains ``W``, the second pulls the input to its code. The gradient reaches the input through the
rotation trick (default, arXiv 2410.06424) or straight-through (``rotation_trick=False``); it reaches
``W`` through the loss only, never ``C``.

Layouts as the reference: ``(b, *positions, dim)`` of any rank >= 2, or ``(b, dim, *positions)`` with
``channel_first=True``; indices ``(b, *positions)`` int64. Quantization runs in float32 whatever the
module's dtype or autocast (the frozen codebook stays float32 under ``.half()``; the transform runs in
its own dtype).

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- the nearest code is a chunked GEMM search (bounded memory), not ``torch.cdist``;
- ``indices_to_codes`` looks the indices up in the transformed codebook ``W(C)`` (one transform call:
  what the forward chose from); the reference transforms the gathered frozen rows, which differs for a
  transform that mixes codes (``Softmax(dim=0)``, a BatchNorm in training mode) and runs it twice;
- the eval loss is a fresh zero (the reference computes it in eval too); the eval output still carries
  the estimator's gradient to an input that requires grad, as the reference's does;
- the value of ``quantized`` is the chosen code exactly (also with the rotation trick, whose reference
  output is the rotated input, equal up to rounding);
- ``return_loss_breakdown=True`` adds the unweighted terms (``codebook``: ``mse(sg x, q)``,
  ``commitment``: ``mse(x, sg q)``); indices -1 decode to zeros; wrong shapes and out-of-range indices
  raise a ValueError naming what was expected;
- ``init_fn`` defaults to None (the identity). A module built with a ``codebook_transform`` module or an
  ``init_fn`` function has a config that is not JSON: ``vqcore.save`` refuses it (save its
  ``state_dict``, which holds everything, frozen codebook included).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vqcore.blocks.conversion import ReferenceModule
from vqcore.blocks.distance import is_tie, nearest
from vqcore.blocks.estimators import resolve_estimator
from vqcore.blocks.losses import CodebookLoss, CommitmentLoss
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.validation import check_float, check_indices, check_positive_int, check_tensor
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule


class SimVQLossBreakdown(NamedTuple):
    """Unweighted terms (0-dim): ``codebook`` ``mse(sg x, q)`` (trains the transform), ``commitment``
    ``mse(x, sg q)`` (pulls the input to its code)."""

    codebook: Tensor
    commitment: Tensor


class SimVQOutput(NamedTuple):
    """``quantized`` has the input's shape and dtype; ``indices`` (b, *positions) int64; ``loss`` 0-dim."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class SimVQOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: SimVQLossBreakdown


class SimVQStep(NamedTuple):
    """One quantization of tokens z (N, dim) against an implicit codebook (:meth:`SimVQ.quantize_tokens`):
    ``indices`` (N,) int64; ``codes`` (N, dim) the chosen codes (differentiable with respect to the
    transform); ``out`` (N, dim) the codes with the estimator's gradient to z; ``terms`` the unweighted
    ``(codebook, commitment)`` terms, or None when not asked for."""

    indices: Tensor
    codes: Tensor
    out: Tensor
    terms: SimVQLossBreakdown | None


class FeatureLayout:
    """Inputs ``(b, *positions, dim)`` of any rank >= 2, or ``(b, dim, *positions)`` when ``channel_first``,
    to tokens ``(b, n, dim)`` and back; indices ``(b, *positions, *extra)`` to ``(b, n, *extra)`` and back.
    Reshapes and ``movedim`` only (symbolic sizes export)."""

    def __init__(self, dim: int, channel_first: bool):
        self.dim, self.channel_first = dim, bool(channel_first)

    def describe(self) -> str:
        return "(batch, dim, *positions)" if self.channel_first else "(batch, *positions, dim)"

    def to_tokens(self, x: Tensor, name: str = "x") -> tuple[Tensor, tuple]:
        check_float(x, name)
        axis = 1 if self.channel_first else -1
        if x.ndim < 2 or x.shape[axis] != self.dim:
            where = "second (channel_first)" if self.channel_first else "last"
            raise ValueError(
                f"{name} must be {self.describe()} with {self.dim} features on its {where} axis, "
                f"got shape {tuple(x.shape)}"
            )
        if self.channel_first:
            x = x.movedim(1, -1)
        spatial = tuple(x.shape[1:-1])
        return x.reshape(x.shape[0], math.prod(spatial), self.dim), spatial

    def from_tokens(self, tokens: Tensor, spatial: tuple) -> Tensor:
        """Tokens (b, n, d') -> the input's layout."""
        out = tokens.reshape(tokens.shape[0], *spatial, tokens.shape[-1])
        return out.movedim(-1, 1) if self.channel_first else out

    def indices_from_tokens(self, indices: Tensor, spatial: tuple) -> Tensor:
        """(b, n, *extra) -> (b, *positions, *extra)."""
        return indices.reshape(indices.shape[0], *spatial, *indices.shape[2:])

    def indices_to_tokens(
        self, indices: Tensor, extra_dims: int, name: str = "indices"
    ) -> tuple[Tensor, tuple]:
        """(b, *positions, *extra) -> ((b, n, *extra), positions)."""
        check_tensor(indices, name)
        if indices.ndim < 1 + extra_dims:
            raise ValueError(
                f"{name} must have at least {1 + extra_dims} dims ((batch, *positions)"
                f"{' + (num_quantizers,)' if extra_dims else ''}), got shape {tuple(indices.shape)}"
            )
        spatial = tuple(indices.shape[1 : indices.ndim - extra_dims])
        tail = tuple(indices.shape[indices.ndim - extra_dims :])
        return indices.reshape(indices.shape[0], math.prod(spatial), *tail), spatial

    def codes_out(self, codes: Tensor, spatial: tuple) -> Tensor:
        """Per-layer codes (Q, b, n, d) -> (Q, b, *positions, d), or (Q, b, d, *positions) channel-first."""
        out = codes.reshape(codes.shape[0], codes.shape[1], *spatial, codes.shape[-1])
        return out.movedim(-1, 2) if self.channel_first else out


def transform_output(transform: nn.Module, frozen: Tensor) -> Tensor:
    """``transform(frozen)`` without grad and in eval mode (no running statistics move), the module's mode
    restored: to read the transform's output shape."""
    was_training = transform.training
    transform.eval()
    try:
        with torch.no_grad():
            return transform(frozen.to(_transform_dtype(transform, frozen.dtype)))
    finally:
        transform.train(was_training)


def _transform_dtype(transform: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype the transform computes in: its first floating parameter's (or buffer's), else ``default``."""
    for t in (*transform.parameters(), *transform.buffers()):
        if t.is_floating_point():
            return t.dtype
    return default


class SimVQ(QuantizerModule, Float32State):
    """x (b, *positions, dim) -> quantized, indices (b, *positions) int64, loss () — see the module docstring.

    ``codebook`` is the implicit codebook ``code_transform(frozen_codebook)`` (K, dim) float32;
    ``indices_to_codes`` / ``decode`` map indices back to codes in the input layout (-1: zeros).
    """

    frozen_codebook: Tensor  # a buffer

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_transform: nn.Module | None = None,
        init_fn: Callable[[Tensor], Tensor] | None = None,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(codebook_size, "codebook_size")
        frozen_codebook_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        check_positive_int(frozen_codebook_dim, "frozen_codebook_dim")
        if commitment_weight < 0 or input_to_quantize_commit_loss_weight < 0:
            raise ConfigurationError(
                "commitment_weight and input_to_quantize_commit_loss_weight must be >= 0, got "
                f"{commitment_weight} and {input_to_quantize_commit_loss_weight}"
            )
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise TypeError(
                "codebook_transform must be an nn.Module mapping (codebook_size, frozen_codebook_dim) to "
                f"(codebook_size, dim), got {type(codebook_transform).__name__}"
            )
        self.dim, self.codebook_size, self.frozen_codebook_dim = dim, codebook_size, frozen_codebook_dim
        self.channel_first = bool(channel_first)
        self.layout = FeatureLayout(dim, channel_first)
        self.rotation_trick = bool(rotation_trick)
        self.estimator = resolve_estimator("rotation_trick" if rotation_trick else "straight_through")
        self.input_to_quantize_commit_loss_weight = float(input_to_quantize_commit_loss_weight)
        self.commitment_weight = float(commitment_weight)
        codebook = torch.randn(codebook_size, frozen_codebook_dim) * frozen_codebook_dim**-0.5
        if init_fn is not None:
            codebook = init_fn(codebook)
        if not isinstance(codebook, Tensor) or codebook.shape != (codebook_size, frozen_codebook_dim):
            got = tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__
            raise ConfigurationError(
                f"init_fn must return a ({codebook_size}, {frozen_codebook_dim}) tensor "
                f"(codebook_size, frozen_codebook_dim), got {got}"
            )
        if codebook_transform is None:
            codebook_transform = nn.Linear(frozen_codebook_dim, dim, bias=False)
        self.code_transform = codebook_transform
        self.register_buffer("frozen_codebook", codebook.float())
        table = transform_output(codebook_transform, self.frozen_codebook)
        if table.shape != (codebook_size, dim):
            raise ConfigurationError(
                f"codebook_transform must map (codebook_size, frozen_codebook_dim) = "
                f"({codebook_size}, {frozen_codebook_dim}) to ({codebook_size}, {dim}) (codebook_size, dim), "
                f"got {tuple(table.shape)}"
            )

    # -- properties --------------------------------------------------------------------------------
    @property
    def num_codebooks(self) -> int:
        return 1

    @property
    def codebook_dim(self) -> int:
        return self.dim

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook ``code_transform(frozen_codebook)`` (K, dim) float32, differentiable with
        respect to the transform."""
        return self.implicit_codebook()

    def implicit_codebook(self) -> Tensor:
        """``code_transform(frozen_codebook)`` (K, dim) float32: one call of the transform, in its own dtype
        with autocast off."""
        frozen = self.frozen_codebook
        with float32_region(frozen.device.type):
            table = self.code_transform(frozen.to(_transform_dtype(self.code_transform, frozen.dtype)))
        return table.float()

    # -- token paths (also used by ResidualSimVQ) ----------------------------------------------------
    def nearest_tokens(self, z: Tensor, table: Tensor) -> Tensor:
        """Indices (N,) int64 of the nearest rows of ``table`` (K, dim) for tokens z (N, dim) float32."""
        return nearest(z.detach().unsqueeze(0), table.detach().unsqueeze(0), cosine=False)[0]

    def quantize_tokens(self, z: Tensor, table: Tensor, with_terms: bool, estimate: bool = True) -> SimVQStep:
        """Tokens z (N, dim) float32 and the implicit codebook ``table`` -> :class:`SimVQStep`: the nearest
        codes, the estimator's output (the detached codes themselves when z carries no gradient or not
        ``estimate``) and, when ``with_terms``, the unweighted loss terms."""
        indices = self.nearest_tokens(z, table)
        codes = table[indices]
        terms = None
        if with_terms:
            zb, qb = z.unsqueeze(0), codes.unsqueeze(0)
            terms = SimVQLossBreakdown(
                CodebookLoss()(zb, qb, indices, None, None)[0],
                CommitmentLoss()(zb, qb, indices, None, None)[0],
            )
        out = codes.detach()
        if estimate and z.requires_grad:
            out = self.estimator(z.unsqueeze(0), out.unsqueeze(0), indices, None)[0]
        return SimVQStep(indices, codes, out, terms)

    def weighted_loss(self, terms: SimVQLossBreakdown) -> Tensor:
        """``commitment_weight * (codebook + input_to_quantize_commit_loss_weight * commitment)``."""
        return self.commitment_weight * (
            terms.codebook + self.input_to_quantize_commit_loss_weight * terms.commitment
        )

    def lookup_tokens(self, indices: Tensor, table: Tensor) -> Tensor:
        """Checked int64 indices (...), -1 allowed -> rows of ``table`` (..., dim); -1 gives zeros."""
        codes = table[indices.clamp(min=0)]
        return codes.masked_fill((indices < 0).unsqueeze(-1), 0.0)

    # -- inference paths (export-safe) --------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices (b, *positions) int64; no state of SimVQ's own is touched."""
        tokens, spatial = self.layout.to_tokens(x)
        z = tokens.float().reshape(-1, self.dim)
        indices = self.nearest_tokens(z, self.implicit_codebook())
        return self.layout.indices_from_tokens(indices.reshape(tokens.shape[0], tokens.shape[1]), spatial)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (b, *positions) in [0, codebook_size) or -1 -> codes in the input layout (float32;
        -1 gives zeros), rows of the implicit codebook (differentiable with respect to the transform)."""
        tokens, spatial = self.layout.indices_to_tokens(indices, 0)
        check_indices(tokens, self.codebook_size)
        codes = self.lookup_tokens(tokens.long(), self.implicit_codebook())
        return self.layout.from_tokens(codes, spatial)

    decode = indices_to_codes

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, return_loss_breakdown: bool = False):
        """Quantize x; the loss (training mode) is the module docstring's, a fresh zero in eval."""
        tokens, spatial = self.layout.to_tokens(x)
        b = tokens.shape[0]
        z = tokens.float().reshape(-1, self.dim)
        with float32_region(x.device.type):
            step = self.quantize_tokens(z, self.implicit_codebook(), with_terms=self.training)
        if step.terms is not None:
            terms = step.terms
            loss = self.weighted_loss(terms)
        else:
            loss = torch.zeros((), device=x.device)
            terms = SimVQLossBreakdown(loss, loss)
        n = math.prod(spatial)
        quantized = self.layout.from_tokens(step.out.to(x.dtype).reshape(b, n, self.dim), spatial)
        indices = self.layout.indices_from_tokens(step.indices.reshape(b, n), spatial)
        if return_loss_breakdown:
            return SimVQOutputWithBreakdown(quantized, indices, loss, terms)
        return SimVQOutput(quantized, indices, loss)

    # -- export ------------------------------------------------------------------------------------
    def export_tie_check(self, x: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor:
        """Where indices ``a`` and ``b`` of ``x`` are equal or genuinely tied codes (float64 distances within
        ``tolerance``): the export layer's parity check (vqcore.protocols.SupportsExportTieCheck)."""
        tokens, _ = self.layout.to_tokens(x)
        z = tokens.double().reshape(-1, self.dim)
        codes = self.implicit_codebook().detach().double()
        fa, fb = a.reshape(-1).long(), b.reshape(-1).long()
        ok = fa == fb
        for t in (~ok).nonzero().flatten().tolist():
            ok[t] = is_tie(z[t], codes[fa[t]], codes[fb[t]], cosine=False, tolerance=tolerance)
        return ok.reshape(a.shape)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters embedded in exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_size": self.codebook_size,
            "frozen_codebook_dim": self.frozen_codebook_dim,
            "channel_first": self.channel_first,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, "
            f"frozen_codebook_dim={self.frozen_codebook_dim}, channel_first={self.channel_first}, "
            f"estimator={self.estimator.name}"
        )


# -- conversion from the reference ------------------------------------------------------------------


def transform_kwarg(transform: nn.Module, frozen_dim: int, dim: int) -> nn.Module | None:
    """The ``codebook_transform`` argument that rebuilds a reference transform: None for the default bias-free
    ``Linear(frozen_dim, dim)`` (built by the constructor, same keys), else a copy of the user's module
    (its state is loaded from the reference's state_dict afterwards)."""
    if (
        type(transform) is nn.Linear
        and transform.bias is None
        and (transform.in_features, transform.out_features) == (frozen_dim, dim)
    ):
        return None
    return copy.deepcopy(transform)


def reference_dim(ref: ReferenceModule) -> int:
    """A reference SimVQ's ``dim`` (it keeps no attribute of that name): the transform's output size."""
    transform = ref.code_transform
    if type(transform) is nn.Linear:
        return int(transform.out_features)
    return int(transform_output(transform, ref.frozen_codebook).shape[-1])


def reference_layer_kwargs(ref: ReferenceModule) -> dict[str, Any]:
    """The options of a reference SimVQ (also a ResidualSimVQ's layer) as vqcore SimVQ arguments."""
    frozen_dim = int(ref.frozen_codebook.shape[-1])
    dim = reference_dim(ref)
    return dict(
        dim=dim,
        codebook_size=int(ref.codebook_size),
        codebook_transform=transform_kwarg(ref.code_transform, frozen_dim, dim),
        channel_first=bool(ref.channel_first),
        rotation_trick=bool(ref.rotation_trick),
        input_to_quantize_commit_loss_weight=float(ref.input_to_quantize_commit_loss_weight),
        commitment_weight=float(ref.commitment_weight),
        frozen_codebook_dim=frozen_dim,
    )


def same_keys(module: nn.Module, ref_state_dict: Any) -> dict[str, Tensor]:
    """The reference's state under the vqcore module's own keys (the same names: ``frozen_codebook``,
    ``code_transform.*``); a key the reference lacks raises KeyError."""
    return {key: ref_state_dict[key] for key in module.state_dict()}


class SimVQConverter:
    """Reference ``SimVQ`` -> vqcore ``SimVQ``: the same options, the same state_dict keys."""

    quantizer = "SimVQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        return reference_layer_kwargs(ref)

    def state_dict(self, module: nn.Module, ref_state_dict: Any) -> dict[str, Tensor]:
        return same_keys(module, ref_state_dict)


@hookimpl
def register_quantizers(register):
    register(
        "sim_vq",
        SimVQ,
        aliases=("SimVQ",),
        summary="SimVQ: a frozen random codebook times a learned transform (arXiv 2411.02038)",
    )


@hookimpl
def register_converters(register):
    register(
        "SimVQ", SimVQConverter, summary="frozen codebook and its transform (Linear or the user's module)"
    )
