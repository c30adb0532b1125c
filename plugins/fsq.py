"""FSQ: x (b, n, d) -> quantized (b, n, d), indices (b, n) (ResidualFSQ: vqcore.plugins.residual_fsq).

Finite scalar quantization (Mentzer et al., arXiv 2309.15505): every dimension is bounded and rounded
to ``L_i`` levels; the implicit codebook is the grid of ``prod(levels)`` points. No codebook, no loss.

Index layout (identical to vector-quantize-pytorch 1.32.0, so token datasets carry over): mixed radix
with the FIRST dimension least significant, ``index = sum_i digit_i * basis_i`` with
``basis = cumprod([1, L_0, L_1, ...])``; exact for any size that int64 holds (a float sum of the
rounded digits up to 2^24 codes, int64 arithmetic beyond).

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- indices are int64, ``codes_to_indices`` included (the reference uses int32 and float arithmetic);
- quantization runs with autocast off and, by default, in float32 for every dtype but float64 (which
  ``allowed_dtypes`` lists, as in the reference): bf16 cannot hold the levels (it rounds the bound's
  constants and moves decision boundaries); ``allowed_dtypes`` / ``force_quantization_f32`` opt out;
- the grid's constants stay float32 after ``.half()`` / ``.bfloat16()``, as does ``orthogonal_rot``;
- ``codebook_size`` exists with ``return_indices=False`` too;
- with ``orthogonal_rotation``, ``codes_to_indices`` takes the rotated codes that the forward and
  ``indices_to_codes`` give (the reference reads them as unrotated grid codes), and no message is printed
  for unequal levels;
- ``noise_dropout`` is the probability that a component gets noise; the reference's mask is
  ``full_like(codes, p).bernoulli_()``, whose in-place ``bernoulli_`` ignores the filled values and draws
  with probability 0.5 whatever ``p`` (at 0.5 the two draw the same numbers);
- the forward's value is the grid code exactly (the reference adds ``z + (code - z)``, equal here: the
  difference is exact in float).
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vqcore.blocks.grid import (
    MAX_FLOAT_INDEX,
    check_levels,
    digits_to_indices,
    digits_to_indices_float,
    indices_to_digits,
    mixed_radix_basis,
    with_slope,
)
from vqcore.blocks.layout import CodebookAxis, TokenLayout, auto_layout, index_tokens
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.rotation import ORTHOGONAL_ROTATION_KEY, orthogonal_matrix, rotate, unrotate
from vqcore.blocks.validation import check_float, check_indices, check_positive_int
from vqcore.errors import ConfigurationError
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
    """The implicit FSQ grid of one codebook: bound + round, digits <-> codes <-> indices (float32 constants).

    :meth:`quantize` is the hot path: in float32 / float64 every elementwise step but the first runs in
    place on one scratch tensor, the indices are one matrix-vector product of the rounded levels with the
    mixed-radix basis (exact in float for codebooks of up to 2^24 codes; int64 arithmetic beyond), and the
    straight-through gradient is one autograd node (:func:`~vqcore.blocks.grid.with_slope`) whose slope is
    the bound's derivative. The rounding decisions are the reference's: the same float32 constants and the
    same operations in the same order.
    """

    # non-persistent buffers, (D,) each
    levels: Tensor
    basis: Tensor
    basis_float: Tensor
    half_l: Tensor
    offset: Tensor
    shift: Tensor
    half_width: Tensor
    half_width_long: Tensor
    step: Tensor
    levels_minus_1: Tensor
    slope_scale: Tensor

    def __init__(self, levels: list[int], *, preserve_symmetry: bool = False, hard_clamp: bool = False):
        super().__init__()
        self.levels_list = list(levels)
        self.preserve_symmetry, self.hard_clamp = preserve_symmetry, hard_clamp
        self.size = math.prod(levels)
        self.float_indices = self.size <= MAX_FLOAT_INDEX
        lv = torch.tensor(levels, dtype=torch.int32)
        basis = mixed_radix_basis(levels)
        self.register_buffer("levels", lv.long(), persistent=False)
        self.register_buffer("basis", torch.tensor(basis, dtype=INDEX_DTYPE), persistent=False)
        self.register_buffer("basis_float", torch.tensor(basis, dtype=torch.float32), persistent=False)
        # float32 constants computed the way the reference computes them (identical rounding decisions)
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        shift = offset / half_l  # the hard clamp shifts by the offset itself, tanh by its atanh
        self.register_buffer("half_l", half_l, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("shift", shift if hard_clamp else shift.atanh(), persistent=False)
        self.register_buffer("half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("half_width_long", (lv // 2).long(), persistent=False)
        self.register_buffer("step", 2.0 / (lv - 1), persistent=False)  # symmetric level spacing
        self.register_buffer("levels_minus_1", (lv - 1).float(), persistent=False)
        # d code / d bound: half_l / half_width for the default bound, 1 for the symmetric one
        slope = torch.ones(len(levels)) if preserve_symmetry else half_l / (lv // 2).float()
        self.register_buffer("slope_scale", slope, persistent=False)
        # default bound: index = sum((level + half_width) * basis) = level @ basis + this constant
        self.index_constant = (
            0.0 if preserve_symmetry else float(sum((v // 2) * b for v, b in zip(levels, basis)))
        )

    def quantize(self, z: Tensor, indices: bool = True) -> tuple[Tensor, Tensor | None]:
        """z (..., D) -> (codes (..., D) with a straight-through gradient, indices (...) int64 or None).

        float32 and float64 inputs take the fused path; other dtypes (quantized in their own dtype where
        FSQ's ``allowed_dtypes`` lists them) follow the reference's operations step by step."""
        if z.dtype not in (torch.float32, torch.float64):
            return self._quantize_stepwise(z, indices)
        grad = z.requires_grad and torch.is_grad_enabled()
        codes, index, slope = self.quantize_detached(z, slope=grad, indices=indices)
        if slope is not None:
            codes = with_slope(z, codes, slope)
        return codes, index

    def quantize_detached(
        self, z: Tensor, *, slope: bool = False, indices: bool = True, overwrite: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """z (..., D) float32/float64 -> (codes, indices (...) int64 or None, slope or None), no autograd.

        ``slope``: also d codes / d z, shaped like z: a float tensor, or a bool mask (slope 1 where True,
        0 elsewhere) for the symmetric hard clamp. ``overwrite``: z is a scratch tensor this call may
        overwrite (one allocation less). Computed on ``z.detach()`` rather than under ``torch.no_grad()``,
        which torch.export cannot nest inside the autocast-off region."""
        z = z.detach()
        d = None
        if self.preserve_symmetry:
            if self.hard_clamp:
                if slope:
                    d = z.abs() <= 1.0
                t = z.clamp_(-1.0, 1.0) if overwrite else z.clamp(-1.0, 1.0)
            else:
                t = z.tanh_() if overwrite else z.tanh()
                if slope:
                    d = torch.mul(t, t).neg_().add_(1.0)
            # (L - 1) * (t + 1) / 2 + 0.5, floored: the digit (arXiv 2411.19842, section 3.2)
            digits = t.add_(1.0).mul_(self.levels_minus_1).div_(2.0).add_(0.5).floor_()
            index = self._indices(digits, 0.0) if indices else None
            codes = digits.mul_(self.step).sub_(1.0)
        else:
            u = z.add_(self.shift) if overwrite else z + self.shift
            if self.hard_clamp:
                if slope:
                    d = (u.abs() <= 1.0) * self.slope_scale
                u.clamp_(-1.0, 1.0)
            else:
                u.tanh_()
                if slope:
                    d = torch.mul(u, u).neg_().add_(1.0).mul_(self.slope_scale)
            level = u.mul_(self.half_l).sub_(self.offset).round_()
            index = self._indices(level, self.index_constant) if indices else None
            codes = level.div_(self.half_width)
        return codes, index, d

    def _indices(self, digits: Tensor, constant: float) -> Tensor:
        """Rounded digits (float; the default bound's signed levels with ``constant``) -> int64 indices."""
        if self.float_indices:
            return digits_to_indices_float(digits, self.basis_float, constant)
        if constant:
            digits = digits + self.half_width
        return self.digits_to_indices(digits.nan_to_num(0.0))

    def _quantize_stepwise(self, z: Tensor, indices: bool) -> tuple[Tensor, Tensor | None]:
        """The reference's operations one by one, in z's (low-precision) dtype where torch's promotion
        with the float32 constants keeps it."""
        squash = (lambda t: t.clamp(-1.0, 1.0)) if self.hard_clamp else torch.tanh
        if self.preserve_symmetry:
            bracket = self.levels_minus_1.to(z.dtype) * (squash(z) + 1) / 2.0 + 0.5
            digits = bracket.floor()
            codes = self.step * digits - 1.0
            surrogate = self.step * bracket
        else:
            bounded = squash(z + self.shift) * self.half_l - self.offset
            level = bounded.round()
            codes = level / self.half_width
            digits = level + self.half_width
            surrogate = bounded / self.half_width
        if z.requires_grad and torch.is_grad_enabled():
            codes = codes + (surrogate - surrogate.detach())
        # NaN -> int64 is undefined: a NaN digit counts as digit 0, so every index stays in range
        index = self.digits_to_indices(digits.detach().nan_to_num(0.0)) if indices else None
        return codes, index

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


class FSQ(Float32State, QuantizerModule):
    """z (b, n, dim) -> quantized (b, n, dim), indices (b, n) int64 — see the module docstring.

    Layouts (detected): ``(b, n, dim)``, ``(b, dim)``, ``(b, dim, n)`` with ``channel_first=True``,
    images ``(b, dim, h, w)`` -> indices ``(b, h, w)``, video ``(b, dim, t, h, w)`` -> ``(b, t, h, w)``.
    With ``num_codebooks > 1`` the indices gain a trailing codebook axis. ``dim`` defaults to
    ``len(levels) * num_codebooks``; a different value adds Linear projections in and out.

    Options, with the reference's names and meaning:

    - ``preserve_symmetry``: symmetric levels in [-1, 1] (arXiv 2411.19842), which also allows L = 2;
    - ``noise_dropout`` (needs ``preserve_symmetry``): in a training-mode forward, each code component is
      replaced with probability ``noise_dropout`` by itself plus uniform noise in [-0.5, 0.5), clamped to
      [-1, 1] (arXiv 2411.19842); the indices are those of the codes before the noise;
    - ``orthogonal_rotation``: a fixed random rotation around the grid (:mod:`vqcore.blocks.rotation`,
      buffer ``orthogonal_rot``); ``decode``, ``indices_to_codes`` and ``codes_to_indices`` take the
      rotated (output) codes;
    - ``bound_hard_clamp``: bound with ``clamp(z + offset / half_l, -1, 1)`` instead of tanh (inputs
      already soft-clamped, as in residual FSQ);
    - ``allowed_dtypes`` / ``force_quantization_f32``: an input (after ``project_in``) whose dtype is in
      ``allowed_dtypes`` (default float32 and float64) is quantized in its own dtype; any other dtype is
      cast to float32 first, and autocast is off during quantization. ``force_quantization_f32=False``
      quantizes every dtype as it comes, under the caller's autocast. Listing bfloat16 or float16 (or
      turning the cast off) opts out of vqcore's float32 rule (dtypes may be given by name, "bfloat16",
      which keeps a saved config JSON): the grid's constants stay float32, and
      torch's type promotion applies where they meet the low-precision values, as in the reference;
    - ``scale``: stored as ``self.scale`` and unused, as in the reference.
    """

    orthogonal_rot: Tensor | None

    def __init__(
        self,
        levels,
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype | str, ...] = ("float32", "float64"),
        channel_first: bool | None = None,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        levels = check_levels(levels, allow_two=preserve_symmetry)
        self.allowed_dtypes = _check_dtypes(allowed_dtypes)
        self.noise_dropout = _check_noise_dropout(noise_dropout, preserve_symmetry)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"scale must be a number or None, got {type(scale).__name__} ({scale!r})")
        self.codebook_axis = CodebookAxis(num_codebooks, len(levels), keep_num_codebooks_dim)
        self.levels = levels
        self.codebook_dim = len(levels)
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.dim = self.effective_codebook_dim if dim is None else check_positive_int(dim, "dim")
        self.scale = scale
        self.return_indices = return_indices
        self.force_quantization_f32 = bool(force_quantization_f32)
        self.preserve_symmetry = preserve_symmetry
        self.bound_hard_clamp = bool(bound_hard_clamp)
        self.orthogonal_rotation = bool(orthogonal_rotation)
        self.channel_first = channel_first
        self.grid = FSQGrid(levels, preserve_symmetry=preserve_symmetry, hard_clamp=self.bound_hard_clamp)
        self.has_projections = self.dim != self.effective_codebook_dim
        inner = self.effective_codebook_dim
        self.project_in, self.project_out = projection_pair(
            self.dim, inner, enabled=self.has_projections, bias=projection_has_bias
        )
        if self.orthogonal_rotation:
            self.register_buffer(ORTHOGONAL_ROTATION_KEY, orthogonal_matrix(self.codebook_dim))
        else:
            self.orthogonal_rot = None

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
        """All grid codes (codebook_size, len(levels)) in index order, before any rotation (computed on
        demand)."""
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

    # -- precision --------------------------------------------------------------------------------
    def quantization_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a codebook-space input of ``dtype`` is quantized in (``allowed_dtypes``,
        ``force_quantization_f32``)."""
        if self.force_quantization_f32 and dtype not in self.allowed_dtypes:
            return torch.float32
        return dtype

    def quantization_region(self, device_type: str) -> AbstractContextManager[None]:
        """Autocast off around quantization (unless ``force_quantization_f32=False``)."""
        return float32_region(device_type) if self.force_quantization_f32 else contextlib.nullcontext()

    def into_codebook_space(self, tokens: Tensor) -> Tensor:
        """Tokens (b, n, dim) -> (b, n, num_codebooks, len(levels)) after ``project_in``, in the dtype they
        are quantized in."""
        z = project_into(
            self.project_in, tokens, self.quantization_dtype(projected_dtype(self.project_in, tokens))
        )
        return self.codebook_axis.split(z)

    # -- the token path ---------------------------------------------------------------------------
    def quantize_tokens(
        self, z: Tensor, *, training: bool = False, indices: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """z (..., num_codebooks, len(levels)) in codebook space -> (codes, indices (..., num_codebooks)
        int64 or None): the codes as the forward outputs them before ``project_out`` (rotated back, with
        the noise of ``noise_dropout`` when ``training``), carrying the straight-through gradient."""
        rotation = self.orthogonal_rot
        z = rotate(z, rotation)
        noisy = training and self.noise_dropout > 0
        if noisy and z.dtype in (torch.float32, torch.float64):  # the noise joins the one gradient node
            grad = z.requires_grad and torch.is_grad_enabled()
            codes, index, slope = self.grid.quantize_detached(z, slope=grad, indices=indices)
            codes, inside = self.add_noise_(codes)  # codes are detached
            if slope is not None:
                codes = with_slope(z, codes, slope * inside)
        else:
            codes, index = self.grid.quantize(z, indices=indices)
            if noisy:
                codes = self.add_noise(codes)
        return unrotate(codes, rotation), index

    def quantize(self, z: Tensor) -> Tensor:
        """Codebook-space z (..., len(levels)) -> its grid codes ``zhat`` (same shape), with the
        straight-through gradient: the bound and rounding of the forward, without rotation or noise."""
        check_float(z, "z")
        if z.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"z must have {self.codebook_dim} features on the last axis, got shape {tuple(z.shape)}"
            )
        codes, _ = self.grid.quantize(z, indices=False)
        return codes

    def add_noise(self, codes: Tensor) -> Tensor:
        """Noise dropout on symmetric codes in [-1, 1]: each component with probability ``noise_dropout``
        gets uniform noise in [-0.5, 0.5), then the codes are clamped to [-1, 1] (the mask, then the
        noise: the reference's draws, in its order)."""
        replace = torch.empty_like(codes).bernoulli_(self.noise_dropout).bool()
        noise = torch.rand_like(codes) - 0.5
        return torch.where(replace, codes + noise, codes).clamp(-1.0, 1.0)

    def add_noise_(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`add_noise` in place on a scratch tensor (the same draws, the same values), and where the
        clamp let the gradient through (d noisy / d codes, a bool mask)."""
        replace = torch.empty_like(codes).bernoulli_(self.noise_dropout)
        codes.add_(torch.rand_like(codes).sub_(0.5).mul_(replace))
        inside = codes.abs() <= 1.0
        return codes.clamp_(-1.0, 1.0), inside

    def lookup(self, indices: Tensor) -> Tensor:
        """Checked int64 indices (..., num_codebooks) -> codes (..., num_codebooks, len(levels)) as
        :meth:`quantize_tokens` outputs them in eval (rotated back; no ``project_out``)."""
        return unrotate(self.grid.digits_to_codes(self.grid.indices_to_digits(indices)), self.orthogonal_rot)

    # -- inference paths ------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices int64 in the input's layout; indices are computed even with return_indices=False."""
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        with self.quantization_region(x.device.type):
            _, indices = self.quantize_tokens(self.into_codebook_space(tokens))
        assert indices is not None
        return layout.indices_from_tokens(self.codebook_axis.indices_out(indices), spatial)

    def decode(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices -> codes (after project_out unless ``project_out=False``), in the input's layout."""
        tokens, spatial, layout = self._index_tokens(indices)
        with float32_region(tokens.device.type):
            codes = self.lookup(tokens).flatten(-2)
            out = project_from(self.project_out, codes) if project_out else codes
        return layout.from_tokens(out, spatial)

    indices_to_codes = decode
    get_output_from_indices = decode

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Codes ``zhat`` (..., len(levels)) as the forward outputs them before ``project_out`` -> indices
        (...) int64."""
        check_float(zhat, "zhat")
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"zhat must have {self.codebook_dim} features on the last axis, got shape {tuple(zhat.shape)}"
            )
        grid_codes = rotate(zhat.float(), self.orthogonal_rot)
        return self.grid.digits_to_indices(self.grid.codes_to_digits(grid_codes))

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """indices (...) -> per-dimension level digits (..., len(levels)) int64."""
        check_indices(indices, self.codebook_size, allow_dropped=False)
        return self.grid.indices_to_digits(indices)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> FSQOutput:
        layout = auto_layout(z.ndim, self.dim, self.channel_first, name="z")
        tokens, spatial = layout.to_tokens(z, "z")
        with self.quantization_region(z.device.type):
            codes, indices = self.quantize_tokens(
                self.into_codebook_space(tokens), training=self.training, indices=self.return_indices
            )
            out = project_from(self.project_out, codes.flatten(-2))
        if indices is not None:
            indices = layout.indices_from_tokens(self.codebook_axis.indices_out(indices), spatial)
        return FSQOutput(layout.from_tokens(out, spatial).to(z.dtype), indices)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts, next to the generic dim, codebook_size and
        num_codebooks (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.codebook_dim,
            "levels": list(self.levels),
            "channel_first": self.channel_first,
        }

    def extra_repr(self) -> str:
        options = [f"levels={self.levels}", f"dim={self.dim}", f"num_codebooks={self.num_codebooks}"]
        options += [f"{name}={getattr(self, name)}" for name in _SHOWN_OPTIONS if getattr(self, name)]
        return ", ".join(options)


def projected_dtype(layer: nn.Module, tokens: Tensor) -> torch.dtype:
    """The dtype ``project_into(layer, tokens)`` computes in: a Linear layer's own, else the tokens'."""
    return layer.weight.dtype if isinstance(layer, nn.Linear) else tokens.dtype


_SHOWN_OPTIONS = ("preserve_symmetry", "bound_hard_clamp", "noise_dropout", "orthogonal_rotation")


def _check_dtypes(allowed_dtypes: object) -> tuple[torch.dtype, ...]:
    """Floating dtypes, given as torch dtypes or their names ("float32" or "torch.float32")."""
    if isinstance(allowed_dtypes, (torch.dtype, str)):
        allowed_dtypes = (allowed_dtypes,)
    if not isinstance(allowed_dtypes, (tuple, list, set, frozenset)):
        raise TypeError(f"allowed_dtypes must be a tuple of floating torch dtypes, got {allowed_dtypes!r}")
    dtypes = []
    for entry in allowed_dtypes:
        dtype = getattr(torch, entry.removeprefix("torch."), None) if isinstance(entry, str) else entry
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"allowed_dtypes must be floating torch dtypes (or their names), got {entry!r}")
        dtypes.append(dtype)
    return tuple(dtypes)


def _check_noise_dropout(noise_dropout: object, preserve_symmetry: bool) -> float:
    if isinstance(noise_dropout, bool) or not isinstance(noise_dropout, (int, float)):
        raise TypeError(f"noise_dropout must be a number in [0, 1], got {noise_dropout!r}")
    if not 0.0 <= noise_dropout <= 1.0:
        raise ConfigurationError(f"noise_dropout must be in [0, 1], got {noise_dropout}")
    if noise_dropout > 0 and not preserve_symmetry:
        raise ConfigurationError(
            f"noise_dropout={noise_dropout} needs preserve_symmetry=True (noise on symmetric codes), "
            "got preserve_symmetry=False"
        )
    return float(noise_dropout)


@hookimpl
def register_quantizers(register):
    register(
        "fsq",
        FSQ,
        aliases=("FSQ", "finite_scalar"),
        summary="finite scalar quantization: bounded, rounded dims",
    )
