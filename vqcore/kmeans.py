"""Batched k-means (Lloyd) for codebook initialisation.

Every book runs independently on its own tokens: x (B, N, d) -> means (B, K, d), counts (B, K).
Assignments use the chunked GEMM search of :mod:`vqcore.distance`; statistics use ``bincount`` and
``index_add_`` (no one-hot). Seeds are drawn by k-means++ (D^2 sampling, Arthur & Vassilvitskii,
SODA 2007), so that well-separated clusters each get a seed; uniform seeding merges planted clusters
often (measured: 80 of 200 runs with 4 blobs). Empty clusters keep their previous mean, which is always
a data point (never a zero vector): when there are fewer valid tokens than codes, every token seeds one
code and the remaining codes are seeded with tokens plus a small jitter, so that they are distinct.
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
    """k distinct starting means per book, drawn from the valid tokens.

    With at least k valid tokens: k-means++ seeding (Arthur & Vassilvitskii 2007), each next seed drawn
    with probability proportional to its squared distance to the nearest seed so far. With fewer: every
    token seeds one code, the rest are tokens plus a small jitter.
    """
    books, n, dim = x.shape
    if valid is None:
        valid = torch.ones(books, n, dtype=torch.bool, device=x.device)
    counts = valid.sum(-1).tolist()
    if min(counts) == 0:
        raise ValueError("k-means needs at least one valid (finite, unmasked) token")
    means = _kmeans_plus_plus(x, k, valid, generator) if max(counts) >= k else x.new_empty(books, k, dim)
    for b in range(books):
        if counts[b] >= k:
            continue
        pool = x[b][valid[b]]
        order = torch.randperm(pool.shape[0], generator=generator, device="cpu").to(x.device)
        extra = k - pool.shape[0]
        picks = torch.randint(pool.shape[0], (extra,), generator=generator, device="cpu").to(x.device)
        scale = JITTER * pool.std().clamp(min=1e-6) if pool.shape[0] > 1 else JITTER
        noise = torch.randn(extra, dim, generator=generator, device="cpu").to(x.device, x.dtype)
        means[b] = torch.cat([pool[order], pool[picks] + scale * noise])
    return means


def _kmeans_plus_plus(x: Tensor, k: int, valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """D^2 seeding of k means per book from the valid tokens of x (B, N, d); no host sync in the loop."""
    books, n, dim = x.shape
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xs = torch.where(valid.unsqueeze(-1), x, zero)  # masked tokens may hold garbage
    x_sq = xs.pow(2).sum(-1)
    xs_t = xs.transpose(1, 2).contiguous()  # (B, d, N): one (1, d) x (d, N) product per book and step
    positions = torch.arange(n, device=x.device)
    rows = torch.arange(books, device=x.device)
    uniform = torch.rand(books, k, generator=generator, device="cpu").to(x.device, x.dtype)
    means = x.new_empty(books, k, dim)
    available = valid.clone()  # valid tokens not chosen yet
    weight = valid.to(x.dtype)  # the first seed: uniform over the valid tokens
    nearest_sq = torch.full((books, n), float("inf"), dtype=x.dtype, device=x.device)
    for j in range(k):
        cumulative = weight.cumsum(-1)
        target = uniform[:, j : j + 1] * cumulative[:, -1:]
        pick = torch.searchsorted(cumulative, target, right=True).squeeze(1)
        last_positive = torch.where(weight > 0, positions, -1).amax(-1)
        pick = torch.minimum(pick, last_positive)  # target rounded up to the total
        centre = xs[rows, pick]  # (B, d)
        means[:, j] = centre
        dist = x_sq + centre.pow(2).sum(-1, keepdim=True) - 2 * torch.bmm(centre.unsqueeze(1), xs_t).squeeze(1)
        nearest_sq = torch.minimum(nearest_sq, dist.clamp(min=0))
        available[rows, pick] = False  # a chosen token is never drawn again
        d2 = torch.where(available, nearest_sq, zero)
        # every available token coincides with a seed (repeated data): uniform over them
        weight = torch.where(d2.sum(-1, keepdim=True) > 0, d2, available.to(x.dtype))
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
