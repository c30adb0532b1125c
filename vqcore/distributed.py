"""torch.distributed helpers. Sync is decided at call time, never at construction.

``sync`` arguments take ``None`` (automatic: an initialized process group with world size > 1),
``True`` or ``False``. Collectives run only where every rank runs them: in training-mode forwards.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Evaluated at every call (the reference caches it for the life of the process)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def should_sync(flag: bool | None) -> bool:
    return is_distributed() if flag is None else bool(flag) and is_distributed()


def all_reduce_sum_(tensor: Tensor, sync: bool) -> Tensor:
    """In-place sum over ranks (a no-op when ``sync`` is False)."""
    if sync:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: Tensor, sync: bool, src: int = 0) -> Tensor:
    """In-place copy of rank ``src``'s tensor to every rank (a no-op when ``sync`` is False)."""
    if sync:
        dist.broadcast(tensor, src=src)
    return tensor
