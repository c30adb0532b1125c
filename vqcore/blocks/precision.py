"""Precision policy: quantization runs in float32, whatever the module's dtype or the autocast context.

- :func:`float32_region`: a context with autocast off (distances, statistics, grids, losses on codes);
- :func:`float32_method`: the same for a method whose first argument is a tensor (cast to float32);
- :class:`Float32State`: a mixin whose own buffers (and optionally parameters) stay float32 under
  ``.half()`` / ``.bfloat16()`` / ``.to(dtype)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def float32_region(device_type: str) -> Iterator[None]:
    """Autocast off on ``device_type``: the code inside runs in its tensors' own dtypes (float32 here)."""
    with torch.autocast(device_type, enabled=False):
        yield


def float32_method(method: F) -> F:
    """Run ``method(self, x, ...)`` in a :func:`float32_region` with ``x`` cast to float32."""

    @functools.wraps(method)
    def run(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        with float32_region(x.device.type):
            return method(self, x.float(), *args, **kwargs)

    return run  # type: ignore[return-value]


class Float32State(nn.Module):
    """Mixin: dtype casts (``.half()``, ``.bfloat16()``, ``.to(dtype)``) leave this module's OWN floating
    buffers float32 — and its own parameters too when ``float32_parameters`` — while device moves apply to
    everything and children (projections, say) are cast as usual.

    Quantization runs in float32 (docs/architecture.md, "Precision"): EMA statistics, grid constants and
    frozen tables rounded to bf16 would move its decision boundaries (``FSQ([8, 5, 5]).bfloat16()``
    rounded ``half_l`` 3.5035 -> 3.5 and changed ~0.4% of the indices; ``RandomProjectionQuantizer.half()``
    failed outright).
    """

    float32_parameters = False

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Float32State:
        if recurse:
            for child in self.children():
                child._apply(fn)
        cast_as_usual: set[int] = set()
        if not self.float32_parameters:
            for p in self._parameters.values():
                if p is not None:
                    cast_as_usual.update((id(p), id(p.grad)) if p.grad is not None else (id(p),))

        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if id(t) in cast_as_usual or not t.is_floating_point() or out.dtype == t.dtype:
                return out
            return t.to(device=out.device)

        return super()._apply(keep_float32, recurse=False)
