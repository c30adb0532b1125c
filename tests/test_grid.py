"""Implicit grid codebooks (vqcore.blocks.grid): mixed-radix digits <-> indices by hand, the levels
check, the BinaryCodebook (Codebook protocol, MSB-first indices, per-book scales, no state), and the
codebook axis of the scalar quantizers (vqcore.blocks.layout.CodebookAxis)."""

from __future__ import annotations

import pytest
import torch

from vqcore.blocks.grid import (
    BinaryCodebook,
    check_levels,
    digits_to_indices,
    indices_to_digits,
    mixed_radix_basis,
)
from vqcore.blocks.layout import CodebookAxis
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
