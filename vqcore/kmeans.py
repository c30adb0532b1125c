"""Batched k-means (Lloyd) for codebook initialisation.

Every book runs independently on its own tokens: x (B, N, d) -> means (B, K, d), counts (B, K).
Assignments use the chunked GEMM search of :mod:`vqcore.distance`; statistics use ``bincount`` and
``index_add_`` (no one-hot). Empty clusters keep their previous mean, which is always a data point
(never a zero vector): when there are fewer valid tokens than codes, every token seeds one code and the
remaining codes are seeded with tokens plus a small jitter, so that they are distinct.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqcore.distance import l2norm, nearest
from vqcore.distributed import all_reduce_sum_, broadcast_

JITTER = 1e-2  # relative to the data's standard deviation, for codes seeded from repeated tokens


def bincount_per_book(indices: Tensor, size: int, weight: Tensor | None = None) -> Tensor:
    """Counts (B, size) of indices (B, N), optionally weighted by weight (B, N)."""
    books = indices.shape[0]
    offsets = torch.arange(books, device=indices.device).unsqueeze(1) * size
    flat = (indices + offsets).reshape(-1)
    w = None if weight is None else weight.reshape(-1).to(torch.float32)
    return torch.bincount(flat, weights=w, minlength=books * size).to(torch.float32).reshape(books, size)


def sum_per_code(x: Tensor, indices: Tensor, size: int, weight: Tensor | None = None) -> Tensor:
    """Sums (B, size, d) of the tokens x (B, N, d) assigned to each code by indices (B, N)."""
    books, _, dim = x.shape
    offsets = torch.arange(books, device=indices.device).unsqueeze(1) * size
    flat = (indices + offsets).reshape(-1)
    values = x if weight is None else x * weight.unsqueeze(-1).to(x.dtype)
    out = torch.zeros(books * size, dim, device=x.device, dtype=x.dtype)
    return out.index_add_(0, flat, values.reshape(-1, dim)).reshape(books, size, dim)


def seed_means(x: Tensor, k: int, valid: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """k distinct starting means per book, drawn from the valid tokens."""
    books, n, dim = x.shape
    means = x.new_empty(books, k, dim)
    for b in range(books):
        pool = x[b] if valid is None else x[b][valid[b]]
        if pool.shape[0] == 0:
            raise ValueError("k-means needs at least one valid (finite, unmasked) token")
        order = torch.randperm(pool.shape[0], generator=generator, device="cpu").to(x.device)
        if pool.shape[0] >= k:
            means[b] = pool[order[:k]]
            continue
        extra = k - pool.shape[0]
        picks = torch.randint(pool.shape[0], (extra,), generator=generator, device="cpu").to(x.device)
        scale = JITTER * pool.std().clamp(min=1e-6) if pool.shape[0] > 1 else JITTER
        noise = torch.randn(extra, dim, generator=generator, device="cpu").to(x.device, x.dtype)
        means[b] = torch.cat([pool[order], pool[picks] + scale * noise])
    return means


def kmeans(
    x: Tensor,
    k: int,
    iters: int = 10,
    *,
    cosine: bool = False,
    valid: Tensor | None = None,
    generator: torch.Generator | None = None,
    sync: bool = False,
) -> tuple[Tensor, Tensor]:
    """Lloyd's algorithm on x (B, N, d) (float32) restricted to ``valid`` (B, N) bool tokens.

    Returns ``(means (B, k, d), counts (B, k))``, the counts of the last assignment. Under ``sync``
    the seeds come from rank 0 and counts/sums are summed over ranks, so every rank gets the same
    means: those of k-means on the concatenated batch from rank 0's seeds.
    """
    means = broadcast_(seed_means(x, k, valid, generator), sync)
    if cosine:
        means = l2norm(means)
    weight = None if valid is None else valid.to(x.dtype)
    counts = torch.zeros(x.shape[0], k, device=x.device)
    for _ in range(iters):
        assigned = nearest(x, means, cosine=cosine)
        counts = all_reduce_sum_(bincount_per_book(assigned, k, weight), sync)
        sums = all_reduce_sum_(sum_per_code(x, assigned, k, weight), sync)
        updated = sums / counts.clamp(min=1).unsqueeze(-1)
        if cosine:
            updated = l2norm(updated)
        means = torch.where(counts.unsqueeze(-1) > 0, updated, means)
    return means, counts
