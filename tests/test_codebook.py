"""Core building blocks, checked against hand computations.

EMACodebook (EMA step, Laplace smoothing, dead-code expiry, k-means init), the batched k-means,
per-code statistics. Losses: test_losses.py; estimators: test_estimators.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqcore.blocks import distance
from vqcore.blocks.codebooks import EMACodebook
from vqcore.blocks.kmeans import kmeans, seed_means
from vqcore.blocks.stats import bincount_per_book, sum_per_code


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _set_state(book: EMACodebook, embed, cluster_size, embed_avg):
    with torch.no_grad():
        book.embed.data.copy_(torch.as_tensor(embed, dtype=torch.float32))
        book.cluster_size.copy_(torch.as_tensor(cluster_size, dtype=torch.float32))
        book.embed_avg.copy_(torch.as_tensor(embed_avg, dtype=torch.float32))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(module, snap):
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), f"state {k} changed"


# -- per-code statistics -------------------------------------------------------------------------


def test_bincount_and_sum_per_book_match_loops():
    torch.manual_seed(0)
    books, n, k, d = 3, 17, 5, 4
    indices = torch.randint(k, (books, n))
    x = torch.randn(books, n, d)
    weight = (torch.rand(books, n) > 0.3).float()
    counts = bincount_per_book(indices, k, weight)
    sums = sum_per_code(x, indices, k, weight)
    assert counts.shape == (books, k) and counts.dtype == torch.float32
    assert sums.shape == (books, k, d)
    for b in range(books):
        for c in range(k):
            sel = (indices[b] == c) & (weight[b] > 0)
            assert counts[b, c].item() == sel.sum().item()
            torch.testing.assert_close(sums[b, c], x[b][sel].sum(0))
    # unweighted: counts sum to n per book
    assert torch.equal(bincount_per_book(indices, k).sum(-1), torch.full((books,), float(n)))


# -- EMA step ------------------------------------------------------------------------------------


def _hand_ema(cs, ea, counts, sums, decay, eps, cosine=False):
    """Plain-Python EMA + Laplace smoothing, list-of-floats in and out."""
    k = len(cs)
    cs2 = [decay * cs[i] + (1 - decay) * counts[i] for i in range(k)]
    ea2 = [[decay * ea[i][j] + (1 - decay) * sums[i][j] for j in range(len(ea[i]))] for i in range(k)]
    n = sum(cs2)
    smoothed = [(cs2[i] + eps) / (n + k * eps) * n for i in range(k)]
    embed = [[ea2[i][j] / smoothed[i] for j in range(len(ea2[i]))] for i in range(k)]
    if cosine:
        embed = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in embed]
    return cs2, ea2, embed


def test_ema_update_matches_hand_computation_two_books():
    decay, eps = 0.8, 1e-5
    book = EMACodebook(3, 2, books=2, decay=decay, eps=eps)
    embed = [[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [-1.0, -1.0], [5.0, 5.0]]]
    cs = [[1.0, 2.0, 3.0], [0.5, 4.0, 1.0]]
    ea = [[[0.5, 0.5], [3.0, 0.0], [0.0, 5.0]], [[1.0, 0.0], [-2.0, -3.0], [4.0, 4.0]]]
    _set_state(book, embed, cs, ea)
    x = torch.tensor(
        [
            [[0.1, 0.2], [1.9, 0.1], [2.2, -0.1], [0.2, 1.8]],
            [[0.9, 1.2], [1.1, 0.8], [-0.5, -0.9], [0.7, 1.0]],
        ]
    )
    indices = book.nearest(x)
    assert indices.tolist() == [[0, 1, 1, 2], [0, 0, 1, 0]]
    book.update(x, indices)

    xs = x.tolist()
    for b in range(2):
        counts = [sum(1 for i in indices[b].tolist() if i == c) for c in range(3)]
        sums = [
            [sum(xs[b][t][j] for t in range(4) if indices[b, t] == c) for j in range(2)] for c in range(3)
        ]
        cs2, ea2, emb2 = _hand_ema(cs[b], ea[b], counts, sums, decay, eps)
        torch.testing.assert_close(book.cluster_size[b], torch.tensor(cs2))
        torch.testing.assert_close(book.embed_avg[b], torch.tensor(ea2))
        torch.testing.assert_close(book.embed[b], torch.tensor(emb2))
    # the first book's numbers written out once, so a wrong formula cannot hide behind the helper
    torch.testing.assert_close(book.cluster_size[0], torch.tensor([1.0, 2.0, 2.6]))
    n = 5.6
    s0 = (1.0 + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(
        book.embed[0, 0], torch.tensor([(0.8 * 0.5 + 0.2 * 0.1) / s0, (0.8 * 0.5 + 0.2 * 0.2) / s0])
    )


def test_ema_update_cosine_renormalises():
    decay, eps = 0.5, 1e-5
    book = EMACodebook(3, 2, cosine=True, decay=decay, eps=eps)
    s = math.sqrt(0.5)
    embed = [[[1.0, 0.0], [0.0, 1.0], [s, s]]]
    cs = [[2.0, 1.0, 1.0]]
    ea = [[[2.0, 0.0], [0.0, 1.0], [s, s]]]
    _set_state(book, embed, cs, ea)
    x = F.normalize(torch.tensor([[[1.0, 0.1], [0.1, 1.0], [1.0, 0.9], [0.9, -0.1]]]), dim=-1)
    indices = book.nearest(x)
    assert indices.tolist() == [[0, 1, 2, 0]]
    book.update(x, indices)
    xs = x[0].tolist()
    counts = [2, 1, 1]
    sums = [[xs[0][j] + xs[3][j] for j in range(2)], xs[1], xs[2]]
    cs2, ea2, emb2 = _hand_ema(cs[0], ea[0], counts, sums, decay, eps, cosine=True)
    torch.testing.assert_close(book.cluster_size[0], torch.tensor(cs2))
    torch.testing.assert_close(book.embed_avg[0], torch.tensor(ea2))
    torch.testing.assert_close(book.embed[0], torch.tensor(emb2))
    torch.testing.assert_close(book.embed.norm(dim=-1), torch.ones(1, 3))


def test_ema_update_ignores_masked_and_non_finite_tokens():
    torch.manual_seed(0)
    book = EMACodebook(4, 3, decay=0.7)
    x = torch.randn(1, 6, 3)
    indices = book.nearest(x)

    bad = x.clone()
    bad[0, 3, 1] = float("nan")
    bad[0, 4, 0] = float("inf")
    bad[0, 2] = torch.tensor([3e38, 3e38, -1.0])  # finite, but its sum (and its EMA sums) overflow float32
    valid = torch.tensor(
        [[True, True, True, True, True, False]]
    )  # token 5 masked, 3 and 4 non-finite, 2 overflows
    ref = EMACodebook(4, 3, decay=0.7)
    ref.load_state_dict(book.state_dict())
    ref.update(x[:, :2], indices[:, :2])
    book.update(bad, indices, valid)
    for name in ("cluster_size", "embed_avg", "embed"):
        assert torch.isfinite(getattr(book, name)).all()
        torch.testing.assert_close(getattr(book, name), getattr(ref, name), rtol=0, atol=0)


def test_ema_update_skips_books_without_valid_tokens():
    book = EMACodebook(3, 2, books=2, decay=0.0)
    before = _snapshot(book)
    x = torch.randn(2, 4, 2)
    valid = torch.tensor([[False] * 4, [True] * 4])
    indices = book.nearest(x)
    book.update(x, indices, valid)
    for name in ("embed", "cluster_size", "embed_avg"):
        assert torch.equal(getattr(book, name)[0], before[name][0]), name
    assert torch.isfinite(book.embed).all()
    counts = torch.bincount(indices[1], minlength=3).float()
    assert torch.equal(book.cluster_size[1], counts)  # decay 0: the batch counts


def test_ema_decay_one_keeps_statistics_and_initial_state():
    book = EMACodebook(5, 3, decay=1.0)
    assert torch.equal(book.cluster_size, torch.ones(1, 5))
    assert torch.equal(book.embed_avg, book.embed)
    before = _snapshot(book)
    x = torch.randn(1, 8, 3)
    book.update(x, book.nearest(x))
    assert torch.equal(book.cluster_size, before["cluster_size"])
    assert torch.equal(book.embed_avg, before["embed_avg"])


# -- nearest / lookup / sampling -----------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk_bytes", [16 * 2**20, 64])  # the second forces many small chunks
def test_nearest_matches_brute_force(cosine, chunk_bytes):
    torch.manual_seed(1)
    book = EMACodebook(37, 6, books=2, cosine=cosine, chunk_bytes=chunk_bytes)
    x = torch.randn(2, 101, 6)
    if cosine:
        x = F.normalize(x, dim=-1)
    got = book.nearest(x)
    assert got.dtype == torch.int64 and got.shape == (2, 101)
    for b in range(2):
        if cosine:
            want = (x[b] @ book.embed[b].T).argmax(-1)
        else:
            want = torch.cdist(x[b].double(), book.embed[b].double()).argmin(-1)
        assert torch.equal(got[b], want)


@pytest.mark.parametrize(
    "size", [1024, 192, 100, 64]
)  # grouped argmin (multiples of 64 above 64), plain otherwise
def test_argmin_rows_is_argmin_with_ties_and_nan(size):
    torch.manual_seed(0)
    scores = torch.randn(300, size)
    scores[:50] = scores[:50].round()  # many exact ties: the lowest index must win
    scores[50, size // 2] = scores[50, size - 1] = -1e9  # a tie across groups
    scores[51, 3:] = -5.0  # a tie inside the first group and beyond it
    scores[52, size - 1] = float("nan")  # NaN counts as the minimum for argmin
    scores[53, [size // 3, size - 2]] = float("nan")
    want = torch.argmin(scores, -1)
    out = torch.empty(300, dtype=torch.int64)
    assert torch.equal(distance.argmin_rows(scores, out), want) and torch.equal(out, want)
    assert out[50] == size // 2 and out[51] == 3 and out[52] == size - 1 and out[53] == size // 3


@pytest.mark.skipif(distance._FUSED_LINEAR is None, reason="this torch build has no oneDNN linear ops")
@pytest.mark.parametrize("cosine", [False, True])
def test_fused_cpu_search_equals_the_baddbmm_search(cosine, monkeypatch):
    """The oneDNN path (bias fused, codes packed, grouped argmin) picks the codes the baddbmm path picks."""
    torch.manual_seed(0)
    codes = torch.randn(2, 1024, 32) * 3  # well separated: no near-ties between the two GEMMs' roundings
    x = codes[:, torch.randint(1024, (3000,))] + 0.05 * torch.randn(2, 3000, 32)
    if cosine:
        codes, x = F.normalize(codes, dim=-1), F.normalize(x, dim=-1)
    calls = []
    linear, pack = distance._FUSED_LINEAR
    monkeypatch.setattr(distance, "_FUSED_LINEAR", (lambda *a: calls.append(1) or linear(*a), pack))
    fused = distance.nearest(x, codes, cosine=cosine, chunk_bytes=2**20)  # several chunks per book
    assert calls, "the fused path was not taken"
    monkeypatch.setattr(distance, "_FUSED_LINEAR", None)
    plain = distance.nearest(x, codes, cosine=cosine, chunk_bytes=2**20)
    assert torch.equal(fused, plain)
    brute = (
        (x @ codes.transpose(1, 2)).argmax(-1)
        if cosine
        else torch.cdist(x.double(), codes.double()).argmin(-1)
    )
    assert torch.equal(fused, brute)


def test_search_cache_follows_every_write_to_the_codebook():
    """The fused CPU search keeps the packed codes between calls; every way the codes change refreshes it."""
    torch.manual_seed(0)
    book = EMACodebook(64, 8, books=2, threshold_ema_dead_code=0.5)
    x = torch.randn(2, 400, 8)

    def check():
        want = torch.stack([torch.cdist(x[b].double(), book.embed[b].double()).argmin(-1) for b in range(2)])
        assert torch.equal(book.nearest(x), want)

    check()
    check()  # cached
    book.update(x * 3, book.nearest(x * 3))  # EMA step
    check()
    book.cluster_size[:, :10] = 0.0
    book.expire_(x + 5)  # dead codes replaced by (shifted) batch vectors
    check()
    other = EMACodebook(64, 8, books=2, threshold_ema_dead_code=0.5)
    book.load_state_dict(other.state_dict())
    check()
    with torch.no_grad():
        book.embed.mul_(-1)  # any in-place write bumps the version
    check()
    learnable = EMACodebook(64, 8, learnable=True)
    xl = torch.randn(1, 300, 8)
    before = learnable.nearest(xl)
    optimizer = torch.optim.SGD(learnable.parameters(), lr=10.0)
    (learnable.embed.square().sum() * -1).backward()
    optimizer.step()  # an optimizer step on a learnable codebook
    want = torch.cdist(xl[0].double(), learnable.embed[0].double()).argmin(-1)
    got = learnable.nearest(xl)
    assert torch.equal(got[0], want) and not torch.equal(got, before)


def test_lookup_gathers_each_books_codes():
    book = EMACodebook(4, 2, books=3)
    idx = torch.tensor([[0, 3], [1, 1], [3, 2]])
    out = book.lookup(idx)
    for b in range(3):
        for t in range(2):
            assert torch.equal(out[b, t], book.embed[b, idx[b, t]])


def test_sample_temperature_zero_is_nearest():
    torch.manual_seed(2)
    book = EMACodebook(16, 4)
    x = torch.randn(1, 400, 4)
    assert torch.equal(book.sample(x, 0.0), book.nearest(x))


def test_sample_low_temperature_mostly_nearest_high_temperature_spreads():
    torch.manual_seed(2)
    book = EMACodebook(16, 4)
    x = torch.randn(1, 400, 4)
    nearest = book.nearest(x)
    cold = book.sample(x, 1e-3, generator=_gen(0))
    assert (cold == nearest).float().mean() > 0.97
    hot = book.sample(x, 100.0, generator=_gen(0))
    assert (hot == nearest).float().mean() < 0.5
    assert len(set(hot[0].tolist())) > 8, "a hot sample uses many codes"
    # same generator state -> same draw
    assert torch.equal(book.sample(x, 1.0, generator=_gen(5)), book.sample(x, 1.0, generator=_gen(5)))


# -- dead-code expiry ----------------------------------------------------------------------------


def test_expire_replaces_exactly_the_codes_below_threshold():
    book = EMACodebook(4, 2, threshold_ema_dead_code=1.5)
    embed = [[[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]]
    cs = [[5.0, 1.0, 1.4999, 1.5]]
    ea = [[[0.0, 0.0], [10.0, 10.0], [-15.0, 15.0], [15.0, -15.0]]]
    _set_state(book, embed, cs, ea)
    before = _snapshot(book)
    x = torch.tensor([[[0.1, 0.2], [0.3, -0.1], [-0.2, 0.1], [5.0, 5.0], [7.0, 1.0]]])
    replaced = book.expire_(x, generator=_gen(0))
    assert replaced.tolist() == [[False, True, True, False]]
    rows = {tuple(r) for r in x[0].tolist()}
    new = [tuple(book.embed[0, k].tolist()) for k in (1, 2)]
    assert all(r in rows for r in new), "replacements must be batch vectors"
    assert new[0] != new[1], "enough samples: replacements drawn without replacement"
    for k in (1, 2):
        assert book.cluster_size[0, k].item() == 1.5
        assert torch.equal(book.embed_avg[0, k], book.embed[0, k] * 1.5)
    for k in (0, 3):  # live codes untouched
        assert torch.equal(book.embed[0, k], before["embed"][0, k])
        assert torch.equal(book.embed_avg[0, k], before["embed_avg"][0, k])
        assert torch.equal(book.cluster_size[0, k], before["cluster_size"][0, k])


def test_expire_without_dead_codes_or_threshold_changes_nothing():
    book = EMACodebook(4, 2, threshold_ema_dead_code=0.5)  # initial cluster_size 1 > 0.5
    before = _snapshot(book)
    assert not book.expire_(torch.randn(1, 8, 2)).any()
    _assert_same_state(book, before)
    off = EMACodebook(4, 2, threshold_ema_dead_code=0.0)
    off.cluster_size.zero_()
    before = _snapshot(off)
    assert not off.expire_(torch.randn(1, 8, 2)).any()
    _assert_same_state(off, before)


def test_expire_with_fewer_samples_than_dead_codes_replaces_all_from_valid_tokens():
    book = EMACodebook(6, 2, threshold_ema_dead_code=2.0)  # every code (cluster_size 1) is dead
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), 0.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, True, False]])  # only tokens 0, 1 may be used
    replaced = book.expire_(x, valid, generator=_gen(3))
    assert replaced.all()
    allowed = {(1.0, 2.0), (3.0, 4.0)}
    assert {tuple(r) for r in book.embed[0].tolist()} <= allowed
    assert torch.isfinite(book.embed).all() and torch.isfinite(book.embed_avg).all()
    assert torch.equal(book.cluster_size, torch.full((1, 6), 2.0))


def test_expire_cosine_normalises_replacements_per_book():
    book = EMACodebook(3, 2, books=2, cosine=True, threshold_ema_dead_code=1.0)
    book.cluster_size.copy_(torch.tensor([[0.5, 2.0, 2.0], [2.0, 2.0, 2.0]]))
    before = _snapshot(book)
    x = torch.tensor([[[3.0, 4.0]], [[100.0, 0.0]]])
    replaced = book.expire_(x, generator=_gen(0))
    assert replaced.tolist() == [[True, False, False], [False, False, False]]
    torch.testing.assert_close(book.embed[0, 0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(book.embed_avg[0, 0], torch.tensor([0.6, 0.8]) * 1.0)
    assert torch.equal(book.embed[1], before["embed"][1])


# -- k-means -------------------------------------------------------------------------------------


def _blobs(centres, per, sigma, seed):
    g = _gen(seed)
    pts = centres.repeat_interleave(per, 0) + sigma * torch.randn(
        len(centres) * per, centres.shape[1], generator=g
    )
    return pts[torch.randperm(len(pts), generator=g)]


@pytest.mark.parametrize("seed", range(6))
def test_kmeans_recovers_well_separated_blobs(seed):
    centres = torch.tensor(
        [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [10.0, 10.0, 10.0]]
    )
    x = _blobs(centres, 40, 0.3, seed).unsqueeze(0)
    means, counts = kmeans(x, 5, 10, generator=_gen(seed))
    dist = torch.cdist(centres, means[0])
    # every blob centre has exactly one centroid near it, and each centroid holds one blob
    assert dist.min(1).values.max() < 0.3, dist
    assert sorted(dist.argmin(1).tolist()) == list(range(5))
    assert sorted(counts[0].tolist()) == [40.0] * 5


def test_kmeans_means_are_cluster_averages_and_counts_sum_to_valid_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 60, 3)
    valid = torch.rand(2, 60) > 0.25
    means, counts = kmeans(x, 4, 5, valid=valid, generator=_gen(1))
    assert torch.equal(counts.sum(-1), valid.sum(-1).float())
    # one more assignment step from the returned means must reproduce the counts only if converged;
    # what always holds: each mean with count > 0 is a convex combination of the valid tokens
    for b in range(2):
        pool = x[b][valid[b]]
        assert (means[b] >= pool.min(0).values - 1e-5).all() and (means[b] <= pool.max(0).values + 1e-5).all()


def test_kmeans_valid_mask_equals_running_on_the_subset():
    torch.manual_seed(0)
    x = torch.randn(1, 50, 3)
    valid = torch.ones(1, 50, dtype=torch.bool)
    valid[0, ::3] = False
    garbage = x.clone()
    garbage[~valid] = 1e6
    m1, c1 = kmeans(garbage, 6, 7, valid=valid, generator=_gen(4))
    m2, c2 = kmeans(x[:, valid[0]], 6, 7, generator=_gen(4))
    torch.testing.assert_close(m1, m2)
    assert torch.equal(c1, c2)


def test_kmeans_cosine_means_are_unit_vectors():
    x = F.normalize(torch.randn(1, 80, 4, generator=_gen(0)), dim=-1)
    means, _ = kmeans(x, 6, 5, cosine=True, generator=_gen(0))
    torch.testing.assert_close(means.norm(dim=-1), torch.ones(1, 6))


def test_seed_means_fewer_points_than_codes_are_distinct_data_points_plus_jitter():
    x = torch.randn(1, 5, 3, generator=_gen(0))
    means = seed_means(x, 12, generator=_gen(0))
    assert means.shape == (1, 12, 3)
    rows = {tuple(r) for r in x[0].tolist()}
    exact = [tuple(r) for r in means[0].tolist() if tuple(r) in rows]
    assert sorted(exact) == sorted(rows), "every data point seeds one code"
    assert torch.pdist(means[0]).min() > 0, "all seeds distinct"
    # the jittered extras stay close to a data point
    assert torch.cdist(means[0], x[0]).min(1).values.max() < 0.2


def test_seed_means_draws_distinct_valid_tokens_and_survives_repeated_data():
    x = torch.randn(1, 30, 2, generator=_gen(1))
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, :10] = False
    garbage = x.clone()
    garbage[0, :10] = 1e6
    means = seed_means(garbage, 8, valid, generator=_gen(0))
    pool = {tuple(r) for r in x[0, 10:].tolist()}
    seeds = [tuple(r) for r in means[0].tolist()]
    assert all(s in pool for s in seeds) and len(set(seeds)) == 8
    # all tokens identical (n >= k): every seed is that token, nothing else is invented
    same = torch.ones(1, 10, 2)
    assert torch.equal(seed_means(same, 4, generator=_gen(0)), torch.ones(1, 4, 2))


def test_seed_means_without_valid_tokens_raises():
    with pytest.raises(ValueError, match="at least one valid"):
        seed_means(torch.randn(1, 4, 2), 3, valid=torch.zeros(1, 4, dtype=torch.bool))


def test_init_kmeans_with_fewer_points_than_codes_leaves_no_zero_codes():
    torch.manual_seed(0)
    book = EMACodebook(64, 8, kmeans_init=True)
    assert not bool(book.initted)
    x = torch.randn(1, 20, 8)
    assert book.init_(x)
    assert bool(book.initted)
    embed = book.embed[0]
    assert torch.isfinite(embed).all()
    assert embed.norm(dim=-1).min() > 0.1, "no zero-vector codes"
    assert torch.pdist(embed).min() > 0, "codes distinct"
    # every data point has its own code (within float noise of the smoothing)
    assert torch.cdist(x[0], embed, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-4
    assert len(set(book.nearest(x)[0].tolist())) == 20
    # empty clusters get a pseudo-count of 1, so cluster_size is 1 everywhere here
    assert torch.equal(book.cluster_size, torch.ones(1, 64))
    # runs once
    snap = _snapshot(book)
    assert not book.init_(torch.randn(1, 20, 8))
    _assert_same_state(book, snap)


def test_init_skips_when_no_finite_token():
    book = EMACodebook(4, 2, kmeans_init=True)
    snap = _snapshot(book)
    assert not book.init_(torch.full((1, 3, 2), float("nan")))
    _assert_same_state(book, snap)


def test_init_sets_statistics_from_final_kmeans_assignment():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    x = _blobs(centres, 10, 0.2, 0).unsqueeze(0)
    book = EMACodebook(3, 2, kmeans_init=True, kmeans_iters=10)
    book.init_(x)
    assert sorted(book.cluster_size[0].tolist()) == [10.0, 10.0, 10.0]
    # embed_avg = means * counts; embed = embed_avg / smoothed
    n, eps = 30.0, book.eps
    smoothed = (10.0 + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(book.embed, book.embed_avg / smoothed)
    idx = book.nearest(x)[0]
    for k in range(3):
        torch.testing.assert_close(book.embed_avg[0, k], x[0][idx == k].sum(0), rtol=1e-5, atol=1e-5)


# -- constructor validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(size=0, dim=2), ValueError, "codebook_size must be >= 1"),
        (dict(size=4, dim=0), ValueError, "codebook dim must be >= 1"),
        (dict(size=4.0, dim=2), TypeError, "codebook_size must be an int"),
        (dict(size=4, dim=2, decay=1.5), ValueError, "decay must be in"),
        (dict(size=4, dim=2, eps=0.0), ValueError, "eps must be > 0"),
        (dict(size=4, dim=2, threshold_ema_dead_code=-1), ValueError, "threshold_ema_dead_code must be >= 0"),
    ],
)
def test_codebook_constructor_rejects_bad_arguments(kwargs, exc, msg):
    size, dim = kwargs.pop("size"), kwargs.pop("dim")
    with pytest.raises(exc, match=msg):
        EMACodebook(size, dim, **kwargs)


def test_nearest_on_inputs_that_require_grad_in_chunks():
    """The chunked search writes into reused blocks (out=); inputs that require grad must still work."""
    from vqcore.blocks.distance import nearest

    torch.manual_seed(0)
    x = torch.randn(1, 300, 8, requires_grad=True)
    codes = torch.randn(1, 32, 8)
    got = nearest(x, codes, cosine=False, chunk_bytes=64 * 4 * 32)  # 64 tokens per chunk
    want = torch.cdist(x.detach().double(), codes.double()).argmin(-1)
    assert not got.requires_grad and torch.equal(got, want)
