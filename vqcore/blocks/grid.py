"""Implicit grid codebooks: digits (..., D) <-> indices (...); BinaryCodebook x (B, N, bits) -> (B, N).

The scalar quantizers' codes are the points of a grid, never stored:

- Mixed radix (FSQ, latent quantization): a code is one digit per dimension, digit ``i`` in
  ``[0, levels[i])``, and its index is ``sum_i digit_i * basis_i`` with the FIRST dimension least
  significant, ``basis = (1, L_0, L_0 L_1, ...)`` (vector-quantize-pytorch's layout). Integer arithmetic
  in int64, exact for any codebook size that int64 holds.
- Straight-through with a known slope (:func:`with_slope`): a grid quantizer's value is its code, and
  the gradient that reaches the input is the derivative of the bound (tanh, clamp) it rounds, which the
  quantizer computes with the code; one autograd node instead of one per elementwise step.
- Binary (lookup-free quantization): :class:`BinaryCodebook`, the corners ``{-s, +s}^bits`` of a
  hypercube, indexed by the sign bits read MOST significant first, ``index = sum_i [x_i > 0] 2^(bits-1-i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vqcore.blocks.precision import Float32State
from vqcore.blocks.validation import check_positive_int
from vqcore.errors import ConfigurationError
from vqcore.protocols import INDEX_DTYPE

MAX_BITS = 62  # int64 indices
MAX_FLOAT_INDEX = 2**24  # float32 holds every integer up to 2^24: index sums below it are exact
MAX_LISTED_BITS = 20  # BinaryCodebook.codes lists every code up to 2^20 of them


# -- mixed radix ------------------------------------------------------------------------------------


def check_levels(levels, *, allow_two: bool, name: str = "levels") -> list[int]:
    """Levels: a non-empty list of ints >= 2 (2 only where ``allow_two``, else >= 3)."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise TypeError(f"{name} must be a list of ints, got {type(levels).__name__} ({levels!r})")
    levels = list(levels)
    if not levels:
        raise ConfigurationError(f"{name} must not be empty")
    for value in levels:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must contain ints, got {value!r} ({type(value).__name__}) in {levels}")
        if value < 2:
            raise ConfigurationError(f"{name} must be ints >= 2, got {value} in {levels}")
    if not allow_two and 2 in levels:
        raise ConfigurationError(
            f"{name} contains 2 ({levels}): use preserve_symmetry=True for 2 levels, or a level >= 3"
        )
    return levels


def mixed_radix_basis(levels: Sequence[int]) -> list[int]:
    """``(1, L_0, L_0 L_1, ...)``: the place value of each digit, first dimension least significant."""
    basis, acc = [], 1
    for level in levels:
        basis.append(acc)
        acc *= level
    return basis


def digits_to_indices(digits: Tensor, basis: Tensor) -> Tensor:
    """Digits (..., D) (integers, or floats holding integers) -> int64 indices (...)."""
    return (digits.to(INDEX_DTYPE) * basis).sum(-1)


def indices_to_digits(indices: Tensor, basis: Tensor, levels: Tensor) -> Tensor:
    """Indices (...) -> int64 digits (..., D); ``basis`` and ``levels`` are int64 (D,) tensors."""
    return (indices.to(INDEX_DTYPE).unsqueeze(-1) // basis) % levels


def digits_to_indices_float(digits: Tensor, basis: Tensor, constant: float = 0.0) -> Tensor:
    """Float digits (..., D) -> int64 indices (...) as ``digits @ basis + constant`` in the digits' float
    dtype: one matrix-vector product instead of an int64 copy of the digits. Exact while every index is
    below :data:`MAX_FLOAT_INDEX` (float32 basis, for codebooks of at most 2^24 codes); a NaN digit
    gives index 0 (NaN -> int64 is undefined), so every index stays in range."""
    indices = torch.matmul(digits, basis.to(digits.dtype))
    if constant:
        indices = indices.add_(constant)
    return indices.nan_to_num_(0.0).long()


class _WithSlope(torch.autograd.Function):
    """``value`` forward; ``grad * slope`` to ``z`` backward (both shaped like ``z``)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, value: Tensor, slope: Tensor) -> Tensor:
        ctx.save_for_backward(slope)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


def with_slope(z: Tensor, value: Tensor, slope: Tensor) -> Tensor:
    """``value`` (computed from ``z`` without autograd) whose gradient reaches ``z`` times ``slope``:
    the straight-through estimator of a rounded bound, ``slope = d bound / dz`` (value and slope
    shaped like ``z``; ``value`` and ``slope`` must not require grad)."""
    return _WithSlope.apply(z, value, slope)


# -- binary -----------------------------------------------------------------------------------------


class BinaryCodebook(Float32State):
    """``books`` implicit binary codebooks, book ``b`` holding the ``2^bits`` codes ``{-s_b, +s_b}^bits``.

    Follows :class:`vqcore.protocols.Codebook`: ``size = 2^bits``, ``dim = bits``; ``nearest`` reads the
    sign bits (``x_i > 0``; 0 maps to ``-s``), most significant first; ``lookup`` maps an index's bits
    back to ``±s_b``. Not cosine, not trained (``prepare_`` and ``train_step_`` do nothing). ``scales``
    ``(books,)`` float32 are the per-book code scales (lookup-free quantization: ``codebook_scale``;
    its residual stack: ``2^-q`` for layer q). No persistent state: nothing enters a state_dict.
    """

    # non-persistent buffers
    bit_weights: Tensor  # (bits,) int64: 2^(bits-1) ... 1
    scales: Tensor  # (books,) float32

    def __init__(self, bits: int, scale: float | Sequence[float] = 1.0, *, books: int | None = None):
        super().__init__()
        check_positive_int(bits, "bits")
        if bits > MAX_BITS:
            raise ConfigurationError(
                f"a binary codebook has at most {MAX_BITS} bits (int64 indices), got {bits}"
            )
        scales = [scale] if isinstance(scale, (int, float)) else list(scale)
        if books is not None:
            check_positive_int(books, "books")
            if len(scales) == 1:
                scales = scales * books
            elif len(scales) != books:
                raise ConfigurationError(
                    f"give one scale or one per book ({books}), got {len(scales)} scales"
                )
        for s in scales:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
                raise ConfigurationError(f"binary code scales must be finite numbers > 0, got {scale!r}")
        if not scales:
            raise ConfigurationError("a binary codebook needs at least one book (one scale)")
        self.bits = bits
        self.scale_values = tuple(float(s) for s in scales)  # the scales as numbers (no device read)
        self.register_buffer(
            "bit_weights", 2 ** torch.arange(bits - 1, -1, -1, dtype=INDEX_DTYPE), persistent=False
        )
        self.register_buffer("scales", torch.tensor([float(s) for s in scales]), persistent=False)

    # -- protocol ----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return 2**self.bits

    @property
    def dim(self) -> int:
        return self.bits

    @property
    def books(self) -> int:
        return self.scales.shape[0]

    @property
    def cosine(self) -> bool:
        return False

    @property
    def trained_by_gradient(self) -> bool:
        return False

    @property
    def codes(self) -> Tensor:
        """(books, 2^bits, bits) float32, in index order (listed on demand, up to 2^20 codes)."""
        if self.bits > MAX_LISTED_BITS:
            raise ValueError(
                f"a binary codebook of 2^{self.bits} codes is too large to list "
                f"(at most 2^{MAX_LISTED_BITS}); use lookup on the indices you need"
            )
        every = torch.arange(self.size, device=self.bit_weights.device)
        return self.lookup(every.unsqueeze(0).expand(self.books, -1))

    def nearest(self, x: Tensor) -> Tensor:
        """x (B, N, bits) -> (B, N) int64 (any leading shape: (..., bits) -> (...))."""
        return self.signs_to_indices(x > 0)

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (B, N) in ``[0, 2^bits)`` -> codes (B, N, bits) float32, book b scaled by ``scales[b]``."""
        return self.signs_to_codes(self.indices_to_signs(indices))

    def prepare_(self, x: Tensor, valid: Tensor | None = None, *, sync: bool = False) -> None:
        return None

    def train_step_(
        self, x: Tensor, indices: Tensor, valid: Tensor | None = None, *, sync: bool = False, **options: Any
    ) -> None:
        return None

    # -- one sign test for both (the quantizers' hot path) ------------------------------------------
    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, N, bits) -> (indices (B, N), codes (B, N, bits)): ``nearest`` and its ``lookup`` at once."""
        positive = x > 0
        return self.signs_to_indices(positive), self.signs_to_codes(positive)

    def signs_to_indices(self, positive: Tensor) -> Tensor:
        """Bool (..., bits) -> int64 (...), first bit most significant."""
        return (positive.to(INDEX_DTYPE) * self.bit_weights).sum(-1)

    def indices_to_signs(self, indices: Tensor) -> Tensor:
        """Int (...) -> bool (..., bits), first bit most significant."""
        return (indices.unsqueeze(-1) & self.bit_weights) != 0

    def signs_to_codes(self, positive: Tensor) -> Tensor:
        """Bool (B, ..., bits), book axis first -> ``±scales[b]`` float32."""
        scale = self.scales.reshape(-1, *(1,) * (positive.ndim - 1))
        return torch.where(positive, scale, -scale)

    def leading(self, books: int) -> BinaryCodebook:
        """The first ``books`` books as a codebook of their own (a residual stack's kept layers)."""
        if books == self.books:
            return self
        check_positive_int(books, "books")
        if books > self.books:
            raise ValueError(f"books must be <= {self.books}, got {books}")
        part = BinaryCodebook(self.bits, [1.0] * books)
        part.bit_weights, part.scales = self.bit_weights, self.scales[:books]  # on this codebook's device
        return part

    def extra_repr(self) -> str:
        return f"bits={self.bits}, books={self.books}, scales={self.scales.tolist()}"
