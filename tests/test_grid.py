"""Implicit grid codebooks (vqcore.blocks.grid): mixed-radix digits <-> indices by hand, the levels
check, the BinaryCodebook (Codebook protocol, MSB-first indices, per-book scales, no state), and the
codebook axis of the scalar quantizers (vqcore.blocks.layout.CodebookAxis)."""

from __future__ import annotations

import pytest
import torch

from vqcore.blocks.grid import (
    MAX_FLOAT_INDEX,
    BinaryCodebook,
    check_levels,
    digits_to_indices,
    digits_to_indices_float,
    indices_to_digits,
    mixed_radix_basis,
    with_slope,
)
from vqcore.blocks.layout import CodebookAxis
from vqcore.errors import ConfigurationError
from vqcore.protocols import Codebook

# -- mixed radix ------------------------------------------------------------------------------------


def test_mixed_radix_by_hand():
    levels = [3, 4, 5]
    assert mixed_radix_basis(levels) == [1, 3, 12]
    basis, lv = torch.tensor([1, 3, 12]), torch.tensor(levels)
    digits = torch.tensor([[2, 1, 2], [0, 3, 0], [2, 3, 4]])
    indices = digits_to_indices(digits, basis)
    assert indices.tolist() == [2 + 3 + 24, 9, 2 + 9 + 48] and indices.dtype == torch.int64
    assert indices_to_digits(indices, basis, lv).tolist() == digits.tolist()
    # float digits (as FSQ's rounding gives them) count the same
    assert digits_to_indices(digits.float(), basis).tolist() == indices.tolist()


def test_mixed_radix_round_trip_is_exhaustive_and_exact_in_int64():
    levels = [4, 3, 2]
    basis, lv = torch.tensor(mixed_radix_basis(levels)), torch.tensor(levels)
    every = torch.arange(24)
    digits = indices_to_digits(every, basis, lv)
    assert torch.unique(digits, dim=0).shape[0] == 24
    assert torch.equal(digits_to_indices(digits, basis), every)
    big = [1000] * 6  # 1e18 codes: beyond float and int32
    basis, lv = torch.tensor(mixed_radix_basis(big)), torch.tensor(big)
    top = torch.tensor([10**18 - 1, 123456789012345678])
    assert torch.equal(digits_to_indices(indices_to_digits(top, basis, lv), basis), top)


@pytest.mark.parametrize(
    "levels, allow_two, error, match",
    [
        ([], True, ValueError, "must not be empty"),
        ([8, 1], True, ValueError, "ints >= 2"),
        ([8, 2.5], True, TypeError, "must contain ints"),
        ([8, True], True, TypeError, "must contain ints"),
        ([8, 2], False, ValueError, "preserve_symmetry"),
        (8, True, TypeError, "must be a list"),
        ("85", True, TypeError, "must be a list"),
    ],
)
def test_check_levels_errors(levels, allow_two, error, match):
    with pytest.raises(error, match=match):
        check_levels(levels, allow_two=allow_two)


def test_check_levels_accepts_any_iterable_of_ints():
    assert check_levels((8, 5, 2), allow_two=True) == [8, 5, 2]


def test_float_indices_are_exact_up_to_2_24_and_nan_gives_zero():
    levels = [256, 256, 256]  # 2^24 codes: the largest float32 sum that stays exact
    basis = torch.tensor(mixed_radix_basis(levels), dtype=torch.float32)
    assert MAX_FLOAT_INDEX == 2**24
    digits = torch.tensor([[255.0, 255.0, 255.0], [1.0, 2.0, 3.0], [float("nan"), 1.0, 1.0]])
    got = digits_to_indices_float(digits, basis)
    assert got.dtype == torch.int64 and got.tolist() == [2**24 - 1, 1 + 2 * 256 + 3 * 65536, 0]
    # signed levels plus a constant (FSQ's default bound): (-1, 0) + (1, 1) -> digits (0, 1)
    assert digits_to_indices_float(torch.tensor([[-1.0, 0.0]]), torch.tensor([1.0, 3.0]), 1 + 3).tolist() == [
        3
    ]


def test_with_slope_value_and_gradient_by_hand():
    z = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    value, slope = torch.tensor([1.0, -1.0, 1.0]), torch.tensor([0.25, 0.0, 2.0])
    out = with_slope(z, value, slope)
    assert torch.equal(out, value)
    out.backward(torch.tensor([4.0, 5.0, 6.0]))
    assert z.grad.tolist() == [1.0, 0.0, 12.0]
    mask = torch.tensor([True, False, True])  # a bool mask is a slope of 1 / 0
    z.grad = None
    with_slope(z, value, mask).sum().backward()
    assert z.grad.tolist() == [1.0, 0.0, 1.0]


def test_levels_errors_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="ints >= 2"):
        check_levels([5, 1], allow_two=True)
    with pytest.raises(AssertionError):  # the reference asserts: code catching that keeps working
        check_levels([5, 2], allow_two=False)


# -- binary -----------------------------------------------------------------------------------------


def test_binary_codebook_follows_the_protocol():
    book = BinaryCodebook(3, [1.0, 0.5])
    assert isinstance(book, Codebook)
    assert (book.size, book.dim, book.books) == (8, 3, 2)
    assert not book.cosine and not book.trained_by_gradient
    assert book.state_dict() == {}  # nothing to save: checkpoints do not change


def test_binary_codebook_msb_first_indices_and_scaled_codes():
    book = BinaryCodebook(4, [0.5, 2.0])
    x = torch.tensor([[[0.3, -1.0, 0.0, 2.0]], [[-0.1, 0.2, 0.3, -0.4]]])  # two books of one token
    indices = book.nearest(x)
    assert indices.tolist() == [[0b1001], [0b0110]]  # 0 maps to -scale
    codes = book.lookup(indices)
    assert codes.tolist() == [[[0.5, -0.5, -0.5, 0.5]], [[-2.0, 2.0, 2.0, -2.0]]]
    both = book.quantize(x)
    assert torch.equal(both[0], indices) and torch.equal(both[1], codes)
    listed = BinaryCodebook(2, 0.5).codes
    assert listed.tolist() == [[[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]]


def test_binary_codebook_steps_do_nothing_and_casts_keep_float32():
    book = BinaryCodebook(3, 0.25, books=2)
    x = torch.randn(2, 5, 3)
    book.prepare_(x)
    book.train_step_(x, book.nearest(x))
    assert book.scales.tolist() == [0.25, 0.25]
    assert book.half().lookup(torch.tensor([[7], [0]])).dtype == torch.float32


def test_binary_codebook_leading_books():
    book = BinaryCodebook(2, [1.0, 0.5, 0.25])
    first = book.leading(2)
    assert first.books == 2 and first.scales.tolist() == [1.0, 0.5]
    assert book.leading(3) is book
    with pytest.raises(ValueError, match="books must be <= 3"):
        book.leading(4)


def test_binary_codebook_errors():
    with pytest.raises(ValueError, match="at most 62 bits"):
        BinaryCodebook(63)
    with pytest.raises(ValueError, match="finite numbers > 0"):
        BinaryCodebook(3, 0.0)
    with pytest.raises(ValueError, match="one scale or one per book"):
        BinaryCodebook(3, [1.0, 0.5], books=3)
    with pytest.raises(ValueError, match="too large to list"):
        _ = BinaryCodebook(21).codes


# -- the codebook axis ---------------------------------------------------------------------------------


def test_codebook_axis():
    axis = CodebookAxis(3, 2)
    assert axis.keep and axis.trailing == 3
    z = torch.arange(12.0).reshape(2, 6)
    assert axis.split(z).shape == (2, 3, 2) and axis.split(z)[1, 2].tolist() == [10.0, 11.0]
    one = CodebookAxis(1, 4)
    assert not one.keep and one.trailing is None
    assert one.indices_out(torch.zeros(2, 5, 1)).shape == (2, 5)
    assert CodebookAxis(1, 4, keep=True).indices_out(torch.zeros(2, 5, 1)).shape == (2, 5, 1)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim=False needs num_codebooks == 1"):
        CodebookAxis(2, 4, keep=False)
    with pytest.raises(ValueError, match="num_codebooks must be >= 1"):
        CodebookAxis(0, 4)
