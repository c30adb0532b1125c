"""Input checks (vqcore.blocks.validation): the TypeError / ValueError each bad input gets, with its message,
and the value checks skipped while tracing (where they would be data-dependent control flow)."""

from __future__ import annotations

import pytest
import torch

from vqcore.blocks.validation import check_float, check_indices, check_positive_int, check_tensor, is_tracing
from vqcore.errors import ConfigurationError


def test_check_tensor_and_check_float():
    x = torch.zeros(2)
    assert check_tensor(x) is x and check_float(x) is x
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        check_tensor([0.0])
    with pytest.raises(TypeError, match="codes must be a torch.Tensor, got ndarray"):
        check_float(x.numpy(), "codes")
    with pytest.raises(TypeError, match="x must be a floating point tensor, got dtype torch.int32"):
        check_float(torch.zeros(2, dtype=torch.int32))


def test_check_indices_values_and_dtypes():
    idx = torch.tensor([0, 3, -1])
    assert check_indices(idx, 4) is idx
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\); got values in \[-1, 3\]"):
        check_indices(idx, 4, allow_dropped=False)
    with pytest.raises(
        ValueError, match=r"codes must be in \[0, 3\) or -1 \(dropped\); got values in \[-1, 3\]"
    ):
        check_indices(idx, 3, "codes")
    with pytest.raises(ValueError, match=r"got values in \[-2, 0\]"):
        check_indices(torch.tensor([0, -2]), 4)
    assert check_indices(torch.zeros(0, dtype=torch.int64), 4).numel() == 0  # nothing to read
    assert check_indices(torch.tensor([2], dtype=torch.uint8), 4).dtype == torch.uint8
    for dtype in (torch.float32, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=f"indices must be an integer tensor, got dtype {dtype}"):
            check_indices(torch.zeros(2, dtype=dtype), 4)
    with pytest.raises(TypeError, match="indices must be a torch.Tensor, got list"):
        check_indices([0, 1], 4)


def test_value_checks_are_skipped_while_tracing_and_static_checks_are_not():
    assert not is_tracing()

    def checked(idx):
        check_indices(idx, 4)
        return idx + int(is_tracing())

    compiled = torch.compile(checked, backend="eager", fullgraph=True)
    out_of_range = torch.tensor([0, 9])
    assert compiled(out_of_range).tolist() == [1, 10]  # traced: no value check, and is_tracing() was True
    with pytest.raises(ValueError, match="must be in"):
        checked(out_of_range)
    # the dtype check runs while tracing too (dynamo reports the TypeError wrapped, its message included)
    with pytest.raises(Exception, match="indices must be an integer tensor, got dtype torch.float32"):
        compiled(torch.zeros(2))


@pytest.mark.parametrize(
    "value, minimum, exc, message",
    [
        (True, 1, TypeError, r"n must be an int, got bool \(True\)"),
        (2.0, 1, TypeError, r"n must be an int, got float \(2.0\)"),
        ("3", 1, TypeError, r"n must be an int, got str \('3'\)"),
        (0, 1, ConfigurationError, "n must be >= 1, got 0"),
        (-1, 0, AssertionError, "n must be >= 0, got -1"),  # a ConfigurationError, caught as the reference's
    ],
)
def test_check_positive_int_rejects(value, minimum, exc, message):
    with pytest.raises(exc, match=message):
        check_positive_int(value, "n", minimum)


def test_check_positive_int_accepts_and_returns_the_value():
    assert check_positive_int(5, "n") == 5
    assert check_positive_int(0, "n", minimum=0) == 0
