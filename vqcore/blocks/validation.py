"""Input checks shared by every method: a clear ValueError/TypeError naming what was expected and what
came, never an assert.

Checks that read tensor values (index ranges) are skipped while tracing or exporting, where they
would be data-dependent control flow; shape and dtype checks are static and always run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqcore.errors import ConfigurationError


def is_tracing() -> bool:
    """True under torch.export, torch.compile, torch.jit tracing or scripting."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def check_tensor(x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(x: object, name: str = "x") -> Tensor:
    tensor = check_tensor(x, name)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {tensor.dtype}")
    return tensor


def check_indices(indices: object, size: int, name: str = "indices", allow_dropped: bool = True) -> Tensor:
    """Integer tensor with values in [0, size), or -1 (dropped/masked) where allowed."""
    indices = check_tensor(indices, name)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {indices.dtype}")
    if not is_tracing() and indices.numel() > 0:
        low, high = int(indices.min()), int(indices.max())
        floor = -1 if allow_dropped else 0
        if low < floor or high >= size:
            allowed = f"[0, {size})" + (" or -1 (dropped)" if allow_dropped else "")
            raise ValueError(f"{name} must be in {allowed}; got values in [{low}, {high}]")
    return indices


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """A constructor's int option: a TypeError for another type, a :class:`ConfigurationError` (a
    ValueError, also an AssertionError as the reference's asserts) below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value}")
    return value
