"""FSQ and ResidualFSQ: x (b, n, d) -> quantized (b, n, d), indices (b, n) / (b, n, Q).

Finite scalar quantization (Mentzer et al., arXiv 2309.15505): every dimension is bounded and rounded
to ``L_i`` levels; the implicit codebook is the grid of ``prod(levels)`` points. No codebook, no loss.

Index layout (identical to vector-quantize-pytorch 1.32.0, so token datasets carry over): mixed radix
with the FIRST dimension least significant, ``index = sum_i digit_i * basis_i`` with
``basis = cumprod([1, L_0, L_1, ...])``; computed in int64 integer arithmetic (exact for any size).

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- indices are int64 (the reference uses int32 and float arithmetic);
- quantization always runs in float32 with autocast off (bf16 cannot hold the levels: it rounds the
  bound's constants and moves decision boundaries);
- ``codebook_size`` exists with ``return_indices=False`` too;
- ResidualFSQ accepts image/video inputs (detected, channel-first) and its indices decode, from a coarse
  prefix of the layers too;
- no ``noise_dropout`` / ``orthogonal_rotation`` / unused ``scale`` options.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vqcore.blocks.grid import check_levels, digits_to_indices, indices_to_digits, mixed_radix_basis
from vqcore.blocks.layout import CodebookAxis, TokenLayout, auto_layout, index_tokens
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.validation import check_float, check_indices, check_positive_int
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import INDEX_DTYPE


class FSQOutput(NamedTuple):
    """FSQ / ResidualFSQ: ``quantized`` has the input's shape and dtype; ``indices`` int64 or None."""

    quantized: Tensor
    indices: Tensor | None


class FSQOutputWithCodes(NamedTuple):
    """``ResidualFSQ(..., return_all_codes=True)``: ``all_codes`` (Q, *input layout with len(levels)
    features): each layer's scaled codes before project_out, zeros for dropped layers."""

    quantized: Tensor
    indices: Tensor
    all_codes: Tensor


class FSQGrid(Float32State):
    """The implicit FSQ grid of one codebook: bound + round, digits <-> codes <-> indices (float32)."""

    # non-persistent buffers, (D,) each
    levels: Tensor
    basis: Tensor
    half_l: Tensor
    offset: Tensor
    shift: Tensor
    half_width: Tensor
    half_width_long: Tensor
    step: Tensor

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
        return digits_to_indices(digits, self.basis)

    def indices_to_digits(self, indices: Tensor) -> Tensor:
        return indices_to_digits(indices, self.basis, self.levels)

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
        self.codebook_axis = CodebookAxis(num_codebooks, len(levels), keep_num_codebooks_dim)
        self.levels = levels
        self.codebook_dim = len(levels)
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.dim = self.effective_codebook_dim if dim is None else check_positive_int(dim, "dim")
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
        return self.codebook_axis.num_codebooks

    @property
    def keep_num_codebooks_dim(self) -> bool:
        return self.codebook_axis.keep

    @property
    def implicit_codebook(self) -> Tensor:
        """All codes (codebook_size, len(levels)) in index order (computed on demand)."""
        return self.grid.all_codes()

    def _index_tokens(self, indices: Tensor) -> tuple[Tensor, tuple, TokenLayout]:
        return index_tokens(
            indices,
            dim=self.dim,
            channel_first=self.channel_first,
            size=self.codebook_size,
            trailing=self.codebook_axis.trailing,
            allow_dropped=False,
        )

    # -- inference paths ------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices int64 in the input's layout; indices are computed even with return_indices=False."""
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        axis = self.codebook_axis
        with float32_region(x.device.type):
            _, digits = self.grid.quantize(axis.split(project_into(self.project_in, tokens)))
            indices = self.grid.digits_to_indices(digits)
        return layout.indices_from_tokens(axis.indices_out(indices), spatial)

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
        axis = self.codebook_axis
        with float32_region(x.device.type):
            codes, digits = self.grid.quantize(axis.split(project_into(self.project_in, tokens)))
            out = project_from(self.project_out, codes.flatten(-2))
            indices = None
            if self.return_indices:
                indices = self.grid.digits_to_indices(digits.detach())
                indices = layout.indices_from_tokens(axis.indices_out(indices), spatial)
        return FSQOutput(layout.from_tokens(out, spatial).to(x.dtype), indices)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts, next to the generic dim, codebook_size and
        num_codebooks (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.codebook_dim,
            "levels": list(self.levels),
            "channel_first": self.channel_first,
        }

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
            f"preserve_symmetry={self.preserve_symmetry}"
        )


@hookimpl
def register_quantizers(register):
    register(
        "fsq",
        FSQ,
        aliases=("FSQ", "finite_scalar"),
        summary="finite scalar quantization: bounded, rounded dims",
    )
