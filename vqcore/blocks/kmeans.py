"""Batched k-means (Lloyd) for codebook initialisation.

Every book runs independently on its own tokens: x (B, N, d) -> means (B, K, d), counts (B, K).
Assignments use the chunked GEMM search of :mod:`vqcore.blocks.distance`; statistics use scatter-add
counts and ``index_add_`` (no one-hot). Seeds are drawn by k-means++ (D^2 sampling, Arthur & Vassilvitskii,
SODA 2007), so that well-separated clusters each get a seed; uniform seeding often merges planted
clusters (benchmarks/README.md has the figures). Empty clusters keep their previous mean, which is always
a data point (never a zero vector): when there are fewer valid tokens than codes, every token seeds one
code and the remaining codes are seeded with tokens plus a small jitter, so that they are distinct.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqcore.blocks.distance import l2norm, nearest, nearest_scored
from vqcore.blocks.distributed import all_reduce_sum_, broadcast_, gather_tokens, rank
from vqcore.blocks.stats import bincount_per_book, sum_per_code

JITTER = 1e-2  # relative to the data's standard deviation, for codes seeded from repeated tokens
KMEANS_PP_ROUNDS = 8  # sequential seeding rounds at most (see _kmeans_plus_plus)
SEED_POOL_MIN = 4096  # distributed seeding: tokens per rank and book gathered at least (see seed_pool_cap)


def seed_pool_cap(k: int) -> int:
    """Valid tokens per rank and book that distributed k-means seeding gathers: max(16 k, 4096)."""
    return max(16 * k, SEED_POOL_MIN)


def seed_means(
    x: Tensor, k: int, valid: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """k distinct starting means per book, drawn from the valid tokens.

    With at least k valid tokens: k-means++ seeding (Arthur & Vassilvitskii 2007; see
    :func:`_kmeans_plus_plus`). With fewer: every token seeds one code, the rest are tokens plus a small
    jitter.
    """
    return _seed(x, k, valid, generator)[0]


def _seed(
    x: Tensor, k: int, valid: Tensor | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """seed_means, plus the first Lloyd assignment when k-means++ computed it."""
    books, n, dim = x.shape
    if valid is None:
        valid = torch.ones(books, n, dtype=torch.bool, device=x.device)
    counts = valid.sum(-1).tolist()
    if min(counts) == 0:
        raise ValueError("k-means needs at least one valid (finite, unmasked) token")
    assignment = None
    if max(counts) >= k:
        means, assignment = _kmeans_plus_plus(x, k, valid, generator)
    else:
        means = x.new_empty(books, k, dim)
    for b in range(books):
        if counts[b] >= k:
            continue
        assignment = None  # this book's seeds are not the ones the assignment refers to
        pool = x[b][valid[b]]
        order = torch.randperm(pool.shape[0], generator=generator, device="cpu").to(x.device)
        extra = k - pool.shape[0]
        picks = torch.randint(pool.shape[0], (extra,), generator=generator, device="cpu").to(x.device)
        scale = JITTER * pool.std().clamp(min=1e-6) if pool.shape[0] > 1 else JITTER
        noise = torch.randn(extra, dim, generator=generator, device="cpu").to(x.device, x.dtype)
        means[b] = torch.cat([pool[order], pool[picks] + scale * noise])
    return means, assignment


def _kmeans_plus_plus(
    x: Tensor, k: int, valid: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """D^2 seeding of k means per book from the valid tokens of x (B, N, d).

    Seeds are drawn in at most ``KMEANS_PP_ROUNDS`` rounds of ``ceil(k / rounds)`` distinct tokens, each
    round a weighted sample without replacement (Gumbel top-k) with weights the squared distance to the
    seeds of earlier rounds: exact k-means++ for k <= rounds; for large codebooks one (N x m) GEMM per
    round instead of k memory-bound (N x 1) products, at the same final inertia as sequential k-means++
    (benchmarks/README.md).
    The Gumbel noise is drawn per valid token in valid-token order, so tokens with zero weight (masked,
    non-finite) change nothing: seeding with them equals seeding without them.

    Returns ``(means (B, k, d), assignment (B, N))``: the index of each token's nearest seed, computed
    along the way, which is the first Lloyd assignment for free.
    """
    books, n, dim = x.shape
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xs = torch.where(valid.unsqueeze(-1), x, zero)  # masked tokens may hold garbage
    x_sq = xs.pow(2).sum(-1)
    rows = torch.arange(books, device=x.device).unsqueeze(1)
    per_round = -(-k // KMEANS_PP_ROUNDS)
    rounds = -(-k // per_round)
    uniform = torch.rand(rounds, int(valid.sum()), generator=generator, device="cpu").clamp_(min=1e-20)
    noise = torch.zeros(rounds, books, n, dtype=x.dtype, device=x.device)
    noise[:, valid] = (-torch.log(-torch.log(uniform))).to(x.device, x.dtype)
    means = x.new_empty(books, k, dim)
    available = valid.clone()  # valid tokens not chosen yet
    weight = valid.to(x.dtype)  # the first round: uniform over the valid tokens
    nearest_sq = torch.full((books, n), float("inf"), dtype=x.dtype, device=x.device)
    assignment = torch.zeros(books, n, dtype=torch.int64, device=x.device)
    for r, start in enumerate(range(0, k, per_round)):
        m = min(per_round, k - start)
        # zero-weight tokens still available (repeated data) rank after every positive weight
        keys = torch.where(weight > 0, weight.log() + noise[r], torch.where(available, -1e30, float("-inf")))
        pick = keys.topk(m, dim=-1).indices  # (B, m), distinct
        available[rows, pick] = False  # a chosen token is never drawn again
        centres = xs[rows, pick]  # (B, m, d)
        means[:, start : start + m] = centres
        # each token's nearest seed of this round and its squared distance, by the chunked search (no
        # (N x m) matrix: 2^20 tokens and the 2^15 seeds of one round would be 128 GiB)
        round_arg, scores = nearest_scored(xs, centres, cosine=False)
        round_sq = scores.add_(x_sq).clamp_(min=0)
        closer = round_sq < nearest_sq
        nearest_sq = torch.where(closer, round_sq, nearest_sq)
        assignment = torch.where(closer, round_arg + start, assignment)
        d2 = torch.where(available, nearest_sq, zero)
        # every available token coincides with a seed (repeated data): uniform over them
        weight = torch.where(d2.sum(-1, keepdim=True) > 0, d2, available.to(x.dtype))
    return means, assignment


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
    rank 0 draws the seeds from every rank's valid tokens (gathered in rank order, at most
    :func:`seed_pool_cap` per rank and book) and broadcasts them, and counts/sums are summed over ranks:
    every rank gets the same means, those of k-means on the concatenated batch (exactly the same draws
    as one process when no rank holds more than the cap). Every book needs a valid token on SOME rank;
    a rank without any is fine.
    """
    first = None
    if sync:
        if valid is None:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        pool, pool_valid = gather_tokens(x, valid, seed_pool_cap(k), sync)
        seeds = (
            seed_means(pool, k, pool_valid, generator)
            if rank() == 0
            else x.new_empty(x.shape[0], k, x.shape[-1])
        )
        means = broadcast_(seeds.contiguous(), sync)
    else:
        means, first = _seed(x, k, valid, generator)
    if cosine:
        means = l2norm(means)
        first = None
    weight = None if valid is None else valid.to(x.dtype)
    counts = torch.zeros(x.shape[0], k, device=x.device)
    for step in range(iters):
        assigned = first if step == 0 and first is not None else nearest(x, means, cosine=cosine)
        counts = all_reduce_sum_(bincount_per_book(assigned, k, weight), sync)
        sums = all_reduce_sum_(sum_per_code(x, assigned, k, weight), sync)
        updated = sums.div_(counts.clamp(min=1).unsqueeze(-1))  # in place: the means take 2 codebooks' memory
        if cosine:
            updated = l2norm(updated)
        means = torch.where(counts.unsqueeze(-1) > 0, updated, means, out=updated)
    return means, counts
