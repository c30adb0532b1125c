"""Host synchronisation points, found on any device: ``with record_host_syncs() as syncs: ...``.

On a GPU, an operation whose result the host must read (``.item()``, ``bool(t)``, ``.tolist()``, a boolean
mask index, ``nonzero``) makes the host wait for every queued kernel: a training step with one stops the
pipeline of kernel launches. ``torch.cuda.set_sync_debug_mode("error")`` finds them on a CUDA device; this
recorder finds the same operations on the CPU, so that a test without a GPU can pin a code path as free of
them. It watches the ATen operations that read device data on the host or produce a data-dependent shape,
and the Tensor methods that copy to the host without an ATen call (``tolist``, ``numpy``)::

    with record_host_syncs() as syncs:
        quantizer(x)
    assert not syncs, syncs

Each record is ``"op  (file:line)"`` with the innermost frame outside torch, to say where the sync comes
from. It sees what runs on this device's code path: a branch taken only on CUDA is not exercised on the CPU.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ATen operations that wait for the device on CUDA: a scalar read, or an output whose shape depends on data
SYNCING_OPS = frozenset(
    {
        aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
        aten.is_nonzero.default,
        aten.equal.default,
        aten.nonzero.default,
        aten.nonzero_numpy.default,
        aten.argwhere.default,
        aten.masked_select.default,
        aten._unique2.default,
        aten.unique_dim.default,
        aten.unique_consecutive.default,
        aten.bincount.default,  # its size is the largest index
        aten.repeat_interleave.Tensor,  # without output_size
    }
)
HOST_COPY_METHODS = ("tolist", "numpy")


def _where() -> str:
    """file:line of the innermost caller outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _is_mask_index(func: Any, args: tuple[Any, ...]) -> bool:
    """``x[mask]`` / ``x[mask] = v``: indexing with a boolean tensor (its output size is the mask's sum)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class _Recorder(TorchDispatchMode):
    def __init__(self, records: list[str]) -> None:
        super().__init__()
        self.records = records

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS or _is_mask_index(func, args):
            self.records.append(f"{func}  ({_where()})")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_host_syncs() -> Iterator[list[str]]:
    """Record every host synchronisation point run inside the block (see the module docstring)."""
    records: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPY_METHODS}

    def watched(name: str) -> Any:
        method = originals[name]

        def run(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            records.append(f"Tensor.{name}  ({_where()})")
            return method(self, *args, **kwargs)

        return run

    try:
        for name in HOST_COPY_METHODS:
            setattr(torch.Tensor, name, watched(name))
        with _Recorder(records):
            yield records
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
