"""Batched k-means (vqcore.blocks.kmeans): k-means++ seeding, Lloyd's iterations, valid-token masks,
empty clusters, cosine means; results checked against hand computations and planted clusters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import blobs, generator

from vqcore.blocks.kmeans import kmeans, seed_means, seed_pool_cap


def test_seed_pool_cap_is_16_tokens_per_code_and_at_least_4096():
    assert seed_pool_cap(1) == 4096
    assert seed_pool_cap(256) == 4096
    assert seed_pool_cap(257) == 4112
    assert seed_pool_cap(1024) == 16384


def test_two_clusters_by_hand():
    """{0, 1} and {10, 11}: from any two distinct seeds, Lloyd's steps end at the means 0.5 and 10.5."""
    x = torch.tensor([[[0.0], [10.0], [1.0], [11.0]]])
    for seed in range(5):
        means, counts = kmeans(x, 2, 10, generator=generator(seed))
        order = means[0, :, 0].argsort()
        assert means[0, order, 0].tolist() == [0.5, 10.5]
        assert counts[0, order].tolist() == [2.0, 2.0]


def test_as_many_codes_as_tokens_gives_the_tokens_themselves():
    x = torch.tensor([[[3.0, 1.0], [-2.0, 0.5], [0.0, 7.0]], [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]])
    means, counts = kmeans(x, 3, 5, generator=generator(0))
    for b in range(2):
        assert sorted(map(tuple, means[b].tolist())) == sorted(map(tuple, x[b].tolist()))
    assert counts.tolist() == [[1.0] * 3] * 2


def test_an_empty_cluster_keeps_its_seed_a_data_point():
    """Tokens {0, 0, 0, 5} into 3 codes: k-means++ seeds 0, 0 and 5 (once both values are seeds, the
    remaining tokens have zero weight and are drawn uniformly); the three 0 tokens all go to the lower-index
    0 seed, so the other one is empty and keeps its mean 0 (never a zero-count NaN)."""
    x = torch.tensor([[[0.0], [0.0], [0.0], [5.0]]])
    for seed in range(4):
        means, counts = kmeans(x, 3, 3, generator=generator(seed))
        assert sorted(means[0, :, 0].tolist()) == [0.0, 0.0, 5.0]
        assert sorted(counts[0].tolist()) == [0.0, 1.0, 3.0]


@pytest.mark.parametrize("seed", range(6))
def test_kmeans_recovers_well_separated_blobs(seed):
    centres = torch.tensor(
        [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [10.0, 10.0, 10.0]]
    )
    x = blobs(centres, 40, 0.3, seed).unsqueeze(0)
    means, counts = kmeans(x, 5, 10, generator=generator(seed))
    dist = torch.cdist(centres, means[0])
    # every blob centre has exactly one centroid near it, and each centroid holds one blob
    assert dist.min(1).values.max() < 0.3, dist
    assert sorted(dist.argmin(1).tolist()) == list(range(5))
    assert sorted(counts[0].tolist()) == [40.0] * 5


def test_kmeans_means_are_cluster_averages_and_counts_sum_to_valid_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 60, 3)
    valid = torch.rand(2, 60) > 0.25
    means, counts = kmeans(x, 4, 5, valid=valid, generator=generator(1))
    assert torch.equal(counts.sum(-1), valid.sum(-1).float())
    # one more assignment step from the returned means reproduces the counts only if converged; what
    # always holds: each mean is a convex combination of the valid tokens
    for b in range(2):
        pool = x[b][valid[b]]
        assert (means[b] >= pool.min(0).values - 1e-5).all() and (means[b] <= pool.max(0).values + 1e-5).all()


def test_kmeans_valid_mask_equals_running_on_the_subset():
    """Masked tokens take no part anywhere (k-means++ draws included): the result equals k-means on the
    valid tokens alone, whatever the masked tokens hold."""
    torch.manual_seed(0)
    x = torch.randn(1, 50, 3)
    valid = torch.ones(1, 50, dtype=torch.bool)
    valid[0, ::3] = False
    garbage = x.clone()
    garbage[~valid] = 1e6
    m1, c1 = kmeans(garbage, 6, 7, valid=valid, generator=generator(4))
    m2, c2 = kmeans(x[:, valid[0]], 6, 7, generator=generator(4))
    torch.testing.assert_close(m1, m2)
    assert torch.equal(c1, c2)


def test_kmeans_cosine_means_are_unit_vectors():
    x = F.normalize(torch.randn(1, 80, 4, generator=generator(0)), dim=-1)
    means, _ = kmeans(x, 6, 5, cosine=True, generator=generator(0))
    torch.testing.assert_close(means.norm(dim=-1), torch.ones(1, 6))


def test_kmeans_books_are_independent():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 2)
    means, counts = kmeans(x, 4, 5, generator=generator(2))
    assert means.shape == (3, 4, 2) and counts.shape == (3, 4)
    assert counts.sum(-1).tolist() == [40.0] * 3
    for b in range(3):  # each book's means are cluster averages of its own tokens only
        pool = x[b]
        assert (means[b] >= pool.min(0).values - 1e-5).all() and (means[b] <= pool.max(0).values + 1e-5).all()


def test_seed_means_fewer_points_than_codes_are_distinct_data_points_plus_jitter():
    x = torch.randn(1, 5, 3, generator=generator(0))
    means = seed_means(x, 12, generator=generator(0))
    assert means.shape == (1, 12, 3)
    rows = {tuple(r) for r in x[0].tolist()}
    exact = [tuple(r) for r in means[0].tolist() if tuple(r) in rows]
    assert sorted(exact) == sorted(rows), "every data point seeds one code"
    assert torch.pdist(means[0]).min() > 0, "all seeds distinct"
    # the jittered extras stay close to a data point
    assert torch.cdist(means[0], x[0]).min(1).values.max() < 0.2


def test_seed_means_draws_distinct_valid_tokens_and_survives_repeated_data():
    x = torch.randn(1, 30, 2, generator=generator(1))
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, :10] = False
    garbage = x.clone()
    garbage[0, :10] = 1e6
    means = seed_means(garbage, 8, valid, generator=generator(0))
    pool = {tuple(r) for r in x[0, 10:].tolist()}
    seeds = [tuple(r) for r in means[0].tolist()]
    assert all(s in pool for s in seeds) and len(set(seeds)) == 8
    # all tokens identical (n >= k): every seed is that token, nothing else is invented
    same = torch.ones(1, 10, 2)
    assert torch.equal(seed_means(same, 4, generator=generator(0)), torch.ones(1, 4, 2))


def test_seed_means_without_valid_tokens_raises():
    with pytest.raises(ValueError, match=r"k-means needs at least one valid \(finite, unmasked\) token"):
        seed_means(torch.randn(1, 4, 2), 3, valid=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one valid"):  # one empty book is enough to refuse
        kmeans(torch.randn(2, 4, 2), 3, valid=torch.tensor([[True] * 4, [False] * 4]))


def test_same_generator_same_means():
    x = torch.randn(1, 200, 4, generator=generator(3))
    first = kmeans(x, 16, 4, generator=generator(7))
    again = kmeans(x, 16, 4, generator=generator(7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
