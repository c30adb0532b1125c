"""Per-code statistics of a batch: how many tokens chose each code, and the sum of those tokens.

Both work on books-first indices ``(B, N)`` into ``B`` codebooks of ``size`` codes, with fixed-size
outputs (no one-hot matrix, no data-dependent shapes), so that EMA steps and k-means trace under
torch.compile without graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat_codes(indices: Tensor, size: int) -> Tensor:
    """indices (B, N) in [0, size) -> (B * N,) positions in the flat (B * size) table of every book."""
    offsets = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1) * size
    return (indices + offsets).reshape(-1)


def bincount_per_book(indices: Tensor, size: int, weight: Tensor | None = None) -> Tensor:
    """Counts (B, size) float32 of indices (B, N), optionally weighted by weight (B, N).

    A scatter-add into a fixed-size table rather than ``torch.bincount``: same values (counts are
    integers, exact in float32 below 2**24), but the output shape does not depend on the data, so
    torch.compile traces it without a graph break.
    """
    books = indices.shape[0]
    flat = _flat_codes(indices, size)
    w = torch.ones_like(flat, dtype=torch.float32) if weight is None else weight.reshape(-1).to(torch.float32)
    counts = torch.zeros(books * size, dtype=torch.float32, device=indices.device).scatter_add_(0, flat, w)
    return counts.reshape(books, size)


def sum_per_code(x: Tensor, indices: Tensor, size: int, weight: Tensor | None = None) -> Tensor:
    """Sums (B, size, d) of the tokens x (B, N, d) assigned to each code by indices (B, N).

    Deterministic on every device, with a shape-static graph (no torch.compile break): on the CPU one
    ``index_add_`` (rows are added in token order; much faster there than sorting); elsewhere ``index_add_``
    uses atomics, whose order varies, so tokens are sorted by code (stable) and summed per segment, in
    their original order within each code.
    """
    books, _, dim = x.shape
    flat = _flat_codes(indices, size)
    values = (x if weight is None else x * weight.unsqueeze(-1).to(x.dtype)).reshape(-1, dim)
    if x.device.type == "cpu":
        sums = torch.zeros(books * size, dim, dtype=x.dtype, device=x.device).index_add_(0, flat, values)
    else:
        lengths = torch.zeros(books * size, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        order = torch.argsort(flat, stable=True)
        sums = torch.segment_reduce(values[order], "sum", lengths=lengths, unsafe=True)
    return sums.reshape(books, size, dim)
