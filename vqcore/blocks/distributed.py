"""torch.distributed helpers. Sync is decided at call time, never at construction.

``sync`` arguments take ``None`` (automatic: an initialized process group with world size > 1),
``True`` or ``False``. Collectives run only where every rank runs them: in training-mode forwards.
Eval forwards, ``encode`` and ``decode`` never call anything here with ``sync=True``.

What is synchronised, and how (every rank ends with the same codebook, equal to what one process
computes on the concatenated batch, rank order):

- EMA step: per-code counts and sums are summed over ranks (:func:`all_reduce_sum_`).
- k-means init: seeds are drawn on rank 0 from the gathered valid tokens of every rank
  (:func:`gather_tokens`, at most ``cap`` per rank and book) and broadcast; Lloyd counts and sums are
  summed over ranks.
- dead-code expiry: rank 0 draws positions in the global (concatenated) pool of valid tokens and
  broadcasts them; the rank holding each position contributes the vector, and one sum over ranks
  assembles the replacements (:func:`global_pool_draw`).
- quantize dropout: rank 0's draw is broadcast.
- LFQ batch entropy: the batch code distribution is summed with the autograd-aware
  ``torch.distributed.nn.functional.all_reduce``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from vqcore.blocks.distance import DEFAULT_CHUNK_BYTES


def is_distributed() -> bool:
    """Evaluated at every call (the reference caches it for the life of the process)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def should_sync(flag: bool | None) -> bool:
    return is_distributed() if flag is None else bool(flag) and is_distributed()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(tensor: Tensor, sync: bool) -> Tensor:
    """In-place sum over ranks (a no-op when ``sync`` is False)."""
    if sync:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: Tensor, sync: bool) -> Tensor:
    """In-place max over ranks (a no-op when ``sync`` is False)."""
    if sync:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_(tensor: Tensor, sync: bool, src: int = 0) -> Tensor:
    """In-place copy of rank ``src``'s tensor to every rank (a no-op when ``sync`` is False)."""
    if sync:
        dist.broadcast(tensor, src=src)
    return tensor


def differentiable_all_reduce_sum(tensor: Tensor, sync: bool) -> Tensor:
    """Sum over ranks that autograd sees through: the backward sums the incoming gradients over ranks
    (``torch.distributed.nn.functional.all_reduce``). Identity when ``sync`` is False."""
    if not sync:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_gather_stack(tensor: Tensor, sync: bool) -> Tensor:
    """(...) -> (world, ...) with every rank's tensor, in rank order; (1, ...) when ``sync`` is False."""
    if not sync:
        return tensor.unsqueeze(0)
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return torch.stack(out)


def gather_tokens(x: Tensor, valid: Tensor, cap: int, sync: bool) -> tuple[Tensor, Tensor]:
    """Every rank's valid tokens, concatenated in rank order: x (B, N, d), valid (B, N) ->
    (B, world * m, d) and its (B, world * m) validity, m = min(cap, largest local valid count).

    Each rank contributes its first ``cap`` valid tokens per book (in batch order), so the result is
    bounded by ``world * cap`` tokens per book whatever the batch size. Without ``sync``: (x, valid)
    restricted the same way.
    """
    books, _, dim = x.shape
    counts = valid.sum(-1)
    m = int(all_reduce_max_(counts.max().reshape(1).clone(), sync).item()) if counts.numel() else 0
    m = max(1, min(cap, m))
    # compact: valid tokens first, in their original order (stable sort of the invalid flags)
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)[:, :m]
    local = (
        torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, dim))
        if x.shape[1]
        else x.new_zeros(books, m, dim)
    )
    local_valid = torch.gather(valid, 1, order) if x.shape[1] else valid.new_zeros(books, m)
    if local.shape[1] < m:  # fewer tokens than the largest rank: pad with invalid zeros
        pad = m - local.shape[1]
        local = torch.cat([local, local.new_zeros(books, pad, dim)], 1)
        local_valid = torch.cat([local_valid, local_valid.new_zeros(books, pad)], 1)
    local = torch.where(local_valid.unsqueeze(-1), local, local.new_zeros(()))
    xs = all_gather_stack(local.float(), sync)  # (W, B, m, d)
    vs = all_gather_stack(local_valid.to(torch.uint8), sync).bool()  # (W, B, m)
    return xs.transpose(0, 1).reshape(books, -1, dim), vs.transpose(0, 1).reshape(books, -1)


def global_pool_draw(
    x: Tensor, valid: Tensor, wanted: Tensor, draw: Callable[[int, int], Tensor], sync: bool
) -> tuple[Tensor, Tensor]:
    """Vectors drawn from the global pool of valid tokens, identically on every rank.

    x (B, N, d), valid (B, N); ``wanted`` (B, K) bool marks the slots to fill (identical on every rank).
    ``draw(total, count) -> positions`` (int64, in ``[0, total)``) is called on rank 0 only, per book,
    with the global number of valid tokens; positions index the concatenation of every rank's valid
    tokens in rank order (so that one process on the concatenated batch draws the same vectors).
    Returns ``(vectors (B, K, d), filled (B, K) bool)``; books without any valid token are not filled.
    Cost: a gather of (world, B) counts, a broadcast of (B, K) positions and a sum of (B, K, d) vectors.
    """
    books, size = wanted.shape
    dim = x.shape[-1]
    local_counts = valid.sum(-1).to(torch.int64)  # (B,)
    counts = all_gather_stack(local_counts, sync)  # (W, B)
    totals = counts.sum(0)
    offsets = counts.cumsum(0) - counts  # (W, B): where each rank's tokens start in the global pool
    positions = torch.full((books, size), -1, dtype=torch.int64, device=x.device)
    if rank() == 0 or not sync:
        for b in range(books):
            slots = wanted[b].nonzero().squeeze(1)
            total = int(totals[b])
            if slots.numel() and total:
                positions[b, slots] = draw(total, slots.numel()).to(x.device)
    broadcast_(positions, sync)
    me = rank() if sync else 0
    local = positions - offsets[me].unsqueeze(1)
    mine = (positions >= 0) & (local >= 0) & (local < local_counts.unsqueeze(1))
    vectors = x.new_zeros(books, size, dim, dtype=torch.float32)
    rows = max(1, DEFAULT_CHUNK_BYTES // (4 * dim))  # rows copied at a time: no second (K, d) temporary
    for b in range(books):
        take = mine[b].nonzero().squeeze(1)
        if take.numel():
            pool = x[b][valid[b]].float()
            for start in range(0, take.numel(), rows):
                part = take[start : start + rows]
                vectors[b, part] = pool[local[b, part]]
    all_reduce_sum_(vectors, sync)  # each slot is filled by exactly one rank: the sum is exact
    return vectors, positions >= 0


def all_reduce_mean_(tensor: Tensor, sync: bool) -> Tensor:
    """In-place mean over ranks (a no-op when ``sync`` is False): the gradient averaging of data parallel
    training."""
    if sync:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor
