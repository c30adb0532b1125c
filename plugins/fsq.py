"""FSQ and ResidualFSQ: x (b, n, d) -> quantized (b, n, d), indices (b, n) / (b, n, Q).

Finite scalar quantization (Mentzer et al., arXiv 2309.15505): every dimension is bounded and rounded
to ``L_i`` levels; the implicit codebook is the grid of ``prod(levels)`` points. No codebook, no loss.

Index layout (identical to vector-quantize-pytorch 1.32.0, so token datasets carry over): mixed radix
with the FIRST dimension least significant, ``index = sum_i digit_i * basis_i`` with
``basis = cumprod([1, L_0, L_1, ...])``; computed in int64 integer arithmetic (exact for any size).

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- indices are int64 (the reference uses int32 and float arithmetic);
- quantization always runs in float32 with autocast off (bf16 cannot hold the levels: #114);
- ``codebook_size`` exists with ``return_indices=False`` too;
- ResidualFSQ accepts image/video inputs (detected, channel-first) and its indices decode;
- no ``noise_dropout`` / ``orthogonal_rotation`` / unused ``scale`` options.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vqcore.blocks.distributed import should_sync
from vqcore.blocks.layout import auto_layout, index_tokens
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.residual import QuantizeDropout
from vqcore.blocks.validation import check_float, check_indices, check_positive_int
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import DROPPED_INDEX, INDEX_DTYPE


class FSQOutput(NamedTuple):
    """FSQ / ResidualFSQ: ``quantized`` has the input's shape and dtype; ``indices`` int64 or None."""

    quantized: Tensor
    indices: Tensor | None


def check_levels(levels, *, allow_two: bool, name: str = "levels") -> list[int]:
    """Levels: a non-empty list of ints >= 2 (2 only where ``allow_two``, else >= 3)."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise TypeError(f"{name} must be a list of ints, got {type(levels).__name__} ({levels!r})")
    levels = list(levels)
    if not levels:
        raise ValueError(f"{name} must not be empty")
    for value in levels:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must contain ints, got {value!r} ({type(value).__name__}) in {levels}")
        if value < 2:
            raise ValueError(f"{name} must be ints >= 2, got {value} in {levels}")
    if not allow_two and 2 in levels:
        raise ValueError(
            f"{name} contains 2 ({levels}): use preserve_symmetry=True for 2 levels, or a level >= 3"
        )
    return levels


def mixed_radix_basis(levels: list[int]) -> list[int]:
    basis, acc = [], 1
    for level in levels:
        basis.append(acc)
        acc *= level
    return basis


class FSQGrid(Float32State):
    """The implicit FSQ grid of one codebook: bound + round, digits <-> codes <-> indices (float32)."""

    def __init__(self, levels: list[int], *, preserve_symmetry: bool = False, hard_clamp: bool = False):
        super().__init__()
        self.levels_list = list(levels)
        self.preserve_symmetry, self.hard_clamp = preserve_symmetry, hard_clamp
        self.size = math.prod(levels)
        lv = torch.tensor(levels, dtype=torch.int32)
        self.register_buffer("levels", lv.long(), persistent=False)
        self.register_buffer(
            "basis", torch.tensor(mixed_radix_basis(levels), dtype=INDEX_DTYPE), persistent=False
        )
        # float32 constants computed the way the reference computes them (identical rounding decisions)
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        self.register_buffer("half_l", half_l, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("shift", (offset / half_l).atanh(), persistent=False)
        self.register_buffer("half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("half_width_long", (lv // 2).long(), persistent=False)
        self.register_buffer("step", 2.0 / (lv - 1), persistent=False)  # symmetric level spacing

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (..., D) float32 -> (codes (...,D) with straight-through gradient, digits (..., D) float)."""
        squash = (lambda t: t.clamp(-1.0, 1.0)) if self.hard_clamp else torch.tanh
        if self.preserve_symmetry:  # arXiv 2411.19842 §3.2
            bracket = (self.levels - 1) * (squash(z) + 1) / 2.0 + 0.5
            digits = bracket.floor()
            codes = self.step * digits - 1.0
            surrogate = self.step * bracket
        else:
            shift = 0.0 if self.hard_clamp else self.shift
            bounded = squash(z + shift) * self.half_l - self.offset
            level = bounded.round()
            codes = level / self.half_width
            digits = level + self.half_width
            surrogate = bounded / self.half_width
        # a NaN input gives a NaN digit, and NaN -> int64 is undefined (INT64_MIN on x86): map it to digit 0
        # so that every index stays in [0, codebook_size) (the codes keep the NaN)
        digits = digits.nan_to_num(0.0)
        if z.requires_grad:
            codes = codes + (surrogate - surrogate.detach())
        return codes, digits

    def digits_to_codes(self, digits: Tensor) -> Tensor:
        """Integer digits (..., D) -> float32 codes, the same arithmetic as :meth:`quantize`."""
        if self.preserve_symmetry:
            return self.step * digits.float() - 1.0
        return (digits - self.half_width_long).float() / self.half_width

    def codes_to_digits(self, codes: Tensor) -> Tensor:
        if self.preserve_symmetry:
            digits = ((codes.float() + 1.0) / self.step).round()
        else:
            digits = (codes.float() * self.half_width + self.half_width).round()
        return digits.long()

    def digits_to_indices(self, digits: Tensor) -> Tensor:
        return (digits.to(INDEX_DTYPE) * self.basis).sum(-1)

    def indices_to_digits(self, indices: Tensor) -> Tensor:
        return (indices.to(INDEX_DTYPE).unsqueeze(-1) // self.basis) % self.levels

    def all_codes(self) -> Tensor:
        return self.digits_to_codes(self.indices_to_digits(torch.arange(self.size, device=self.basis.device)))


class FSQ(QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n) int64 — see the module docstring.

    Layouts (detected): ``(b, n, dim)``, ``(b, dim)``, ``(b, dim, n)`` with ``channel_first=True``,
    images ``(b, dim, h, w)`` -> indices ``(b, h, w)``, video ``(b, dim, t, h, w)`` -> ``(b, t, h, w)``.
    With ``num_codebooks > 1`` the indices gain a trailing codebook axis. ``dim`` defaults to
    ``len(levels) * num_codebooks``; a different value adds Linear projections in and out.
    ``preserve_symmetry``: symmetric levels in [-1, 1] (arXiv 2411.19842), which also allows L = 2.
    """

    def __init__(
        self,
        levels,
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        return_indices: bool = True,
        preserve_symmetry: bool = False,
        channel_first: bool | None = None,
        projection_has_bias: bool = True,
        bound_hard_clamp: bool = False,
    ):
        super().__init__()
        levels = check_levels(levels, allow_two=preserve_symmetry)
        check_positive_int(num_codebooks, "num_codebooks")
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks == 1")
        self.levels = levels
        self.codebook_dim = len(levels)
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.dim = self.effective_codebook_dim if dim is None else check_positive_int(dim, "dim")
        self._num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.return_indices = return_indices
        self.preserve_symmetry = preserve_symmetry
        self.channel_first = channel_first
        self.grid = FSQGrid(levels, preserve_symmetry=preserve_symmetry, hard_clamp=bound_hard_clamp)
        self.has_projections = self.dim != self.effective_codebook_dim
        inner = self.effective_codebook_dim
        self.project_in, self.project_out = projection_pair(
            self.dim, inner, enabled=self.has_projections, bias=projection_has_bias
        )

    @property
    def codebook_size(self) -> int:
        return self.grid.size

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    @property
    def implicit_codebook(self) -> Tensor:
        """All codes (codebook_size, len(levels)) in index order (computed on demand)."""
        return self.grid.all_codes()

    # -- shared pieces -------------------------------------------------------------------------------

    def _split(self, z: Tensor) -> Tensor:
        return z.reshape(*z.shape[:-1], self._num_codebooks, self.codebook_dim)

    def _indices_out(self, indices: Tensor) -> Tensor:
        return indices if self.keep_num_codebooks_dim else indices.squeeze(-1)

    def _index_tokens(self, indices: Tensor):
        return index_tokens(
            indices,
            dim=self.dim,
            channel_first=self.channel_first,
            size=self.codebook_size,
            trailing=self._num_codebooks if self.keep_num_codebooks_dim else None,
            allow_dropped=False,
        )

    # -- inference paths ------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices int64 in the input's layout; indices are computed even with return_indices=False."""
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        with float32_region(x.device.type):
            _, digits = self.grid.quantize(self._split(project_into(self.project_in, tokens)))
            indices = self.grid.digits_to_indices(digits)
        return layout.indices_from_tokens(self._indices_out(indices), spatial)

    def decode(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices -> codes (after project_out unless ``project_out=False``), in the input's layout."""
        tokens, spatial, layout = self._index_tokens(indices)
        with float32_region(tokens.device.type):
            codes = self.grid.digits_to_codes(self.grid.indices_to_digits(tokens)).flatten(-2)
            out = project_from(self.project_out, codes) if project_out else codes
        return layout.from_tokens(out, spatial)

    indices_to_codes = decode
    get_output_from_indices = decode

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Normalised codes (..., len(levels)) -> indices (...) int64."""
        check_float(codes, "codes")
        if codes.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"codes must have {self.codebook_dim} features on the last axis, "
                f"got shape {tuple(codes.shape)}"
            )
        return self.grid.digits_to_indices(self.grid.codes_to_digits(codes))

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """indices (...) -> per-dimension level digits (..., len(levels)) int64."""
        check_indices(indices, self.codebook_size, allow_dropped=False)
        return self.grid.indices_to_digits(indices)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> FSQOutput:
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        with float32_region(x.device.type):
            codes, digits = self.grid.quantize(self._split(project_into(self.project_in, tokens)))
            out = project_from(self.project_out, codes.flatten(-2))
            indices = None
            if self.return_indices:
                indices = self.grid.digits_to_indices(digits.detach())
                indices = layout.indices_from_tokens(self._indices_out(indices), spatial)
        return FSQOutput(layout.from_tokens(out, spatial).to(x.dtype), indices)

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, num_codebooks={self._num_codebooks}, "
            f"preserve_symmetry={self.preserve_symmetry}"
        )


class ResidualFSQ(Float32State, QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n, Q) int64; images/video (detected) too.

    Layer q quantizes ``residual / scale_q`` with the symmetric FSQ grid (hard clamp) and adds back
    ``code * scale_q``, ``scale_q = L_i^(-q)`` per dimension (as the reference); the input is first
    soft-clamped with ``tanh(x / c) c``, ``c = 1 + 1 / (L - 1)``. Quantize dropout (SoundStream,
    arXiv 2107.03312) keeps the first layers only, in training with gradients enabled; dropped
    layers give index -1, which decodes to nothing.
    """

    def __init__(
        self,
        levels,
        num_quantizers: int,
        dim: int | None = None,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool | None = None,
        projection_has_bias: bool = True,
        sync_quantize_dropout: bool | None = None,
    ):
        super().__init__()
        levels = check_levels(levels, allow_two=True)
        check_positive_int(num_quantizers, "num_quantizers")
        check_positive_int(quantize_dropout_cutoff_index, "quantize_dropout_cutoff_index", minimum=0)
        if quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(
                f"quantize_dropout_cutoff_index must be < num_quantizers ({num_quantizers}), "
                f"got {quantize_dropout_cutoff_index}"
            )
        check_positive_int(quantize_dropout_multiple_of, "quantize_dropout_multiple_of")
        self.levels = levels
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else check_positive_int(dim, "dim")
        self.num_quantizers = num_quantizers
        self.dropout = QuantizeDropout(
            num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of
        )
        self.quantize_dropout = self.dropout.enabled
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.sync_quantize_dropout = sync_quantize_dropout
        self.channel_first = channel_first
        self.grid = FSQGrid(levels, preserve_symmetry=True, hard_clamp=True)
        lv = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("scales", torch.stack([lv**-q for q in range(num_quantizers)]), persistent=False)
        self.register_buffer("soft_clamp", 1 + 1 / (lv - 1), persistent=False)
        self.has_projections = self.dim != self.codebook_dim
        self.project_in, self.project_out = projection_pair(
            self.dim, self.codebook_dim, enabled=self.has_projections, bias=projection_has_bias
        )

    @property
    def codebook_size(self) -> int:
        return self.grid.size

    @property
    def num_codebooks(self) -> int:
        return 1

    @property
    def codebooks(self) -> Tensor:
        """(Q, codebook_size, len(levels)): every layer's codes, unscaled (all layers share the grid)."""
        return self.grid.all_codes().unsqueeze(0).expand(self.num_quantizers, -1, -1)

    def _run(self, x: Tensor, kept: int | None, return_all_codes: bool = False):
        """x -> (summed scaled codes (b, n, D) float32, indices (b, n, Q), per-layer codes or None,
        layout, spatial).
        """
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        with float32_region(x.device.type):
            z = project_into(self.project_in, tokens)
            z = (z / self.soft_clamp).tanh() * self.soft_clamp
            residual, total, indices, all_codes = z, None, [], []
            for q in range(self.num_quantizers):
                if kept is not None and q >= kept:
                    indices.append(
                        torch.full(z.shape[:-1], DROPPED_INDEX, dtype=INDEX_DTYPE, device=z.device)
                    )
                    all_codes.append(torch.zeros_like(z))
                    continue
                scale = self.scales[q]
                codes, digits = self.grid.quantize(residual / scale)
                scaled = codes * scale
                residual = residual - scaled.detach()
                total = scaled if total is None else total + scaled
                indices.append(self.grid.digits_to_indices(digits))
                all_codes.append(scaled)
        return total, torch.stack(indices, -1), all_codes if return_all_codes else None, layout, spatial

    def encode(self, x: Tensor) -> Tensor:
        _, indices, _, layout, spatial = self._run(x, None)
        return layout.indices_from_tokens(indices, spatial)

    def forward(
        self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None
    ):
        kept = self.dropout.kept_layers(
            self.training,
            rand_quantize_dropout_fixed_seed,
            sync=self.dropout.enabled and self.training and should_sync(self.sync_quantize_dropout),
            device=x.device,
        )
        total, indices, all_codes, layout, spatial = self._run(x, kept, return_all_codes)
        with float32_region(x.device.type):
            out = project_from(self.project_out, total)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = layout.indices_from_tokens(indices, spatial)
        if return_all_codes:
            codes = torch.stack([layout.from_tokens(c, spatial) for c in all_codes])
            return quantized, indices, codes
        return FSQOutput(quantized, indices)

    def _index_tokens(self, indices: Tensor):
        return index_tokens(
            indices,
            dim=self.dim,
            channel_first=self.channel_first,
            size=self.codebook_size,
            trailing=self.num_quantizers,
            axis="quantizer",
            at_most=True,
        )

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (..., Q') -> scaled per-layer codes (Q', b, n, len(levels)) before project_out;
        -1 gives zeros.
        """
        tokens, _, _ = self._index_tokens(indices)
        return self._layer_codes(tokens)

    def _layer_codes(self, tokens: Tensor) -> Tensor:
        dropped = tokens < 0
        codes = self.grid.digits_to_codes(self.grid.indices_to_digits(tokens.clamp(min=0)))
        out = []
        for q in range(tokens.shape[-1]):
            scaled = codes[..., q, :] * self.scales[q]
            out.append(scaled.masked_fill(dropped[..., q].unsqueeze(-1), 0.0))
        return torch.stack(out)

    def decode(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, Q') with Q' <= Q (a coarse prefix decodes too) -> quantized;
        -1 adds nothing.
        """
        tokens, spatial, layout = self._index_tokens(indices)
        with float32_region(tokens.device.type):
            dropped = tokens < 0
            digits = self.grid.indices_to_digits(tokens.clamp(min=0))
            total = None
            for q in range(tokens.shape[-1]):
                scaled = self.grid.digits_to_codes(digits[..., q, :]) * self.scales[q]
                scaled = scaled.masked_fill(dropped[..., q].unsqueeze(-1), 0.0)
                total = scaled if total is None else total + scaled
            out = project_from(self.project_out, total)
            # a token with every layer dropped decodes to zero, after project_out too (as RVQ and ResidualLFQ)
            out = out.masked_fill(dropped.all(-1, keepdim=True), 0.0)
        return layout.from_tokens(out, spatial)

    get_output_from_indices = decode

    def extra_repr(self) -> str:
        return f"levels={self.levels}, num_quantizers={self.num_quantizers}, dim={self.dim}"


@hookimpl
def register_quantizers(register):
    register(
        "fsq",
        FSQ,
        aliases=("FSQ", "finite_scalar"),
        summary="finite scalar quantization: bounded, rounded dims",
    )
    register(
        "residual_fsq",
        ResidualFSQ,
        aliases=("ResidualFSQ", "rfsq"),
        summary="residual stack of symmetric FSQ layers with per-layer scales L^-q",
    )
