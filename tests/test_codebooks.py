"""EMACodebook (vqcore.blocks.codebooks), checked against hand computations: the EMA step with Laplace
smoothing, per-code step weights and accumulated steps, dead-code expiry, k-means initialisation, the
search (and its cache of packed codes), lookup, Gumbel sampling, and build_codebook's checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_same_state,
    blobs,
    brute_nearest,
    generator,
    hand_ema,
    set_ema_state,
    snapshot,
)
from torch import nn

from vqcore.blocks.codebooks import EMACodebook, build_codebook
from vqcore.blocks.distance import nearest
from vqcore.protocols import Codebook

# -- EMA step ------------------------------------------------------------------------------------


def test_ema_update_matches_hand_computation_two_books():
    decay, eps = 0.8, 1e-5
    book = EMACodebook(3, 2, books=2, decay=decay, eps=eps)
    embed = [[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [-1.0, -1.0], [5.0, 5.0]]]
    cs = [[1.0, 2.0, 3.0], [0.5, 4.0, 1.0]]
    ea = [[[0.5, 0.5], [3.0, 0.0], [0.0, 5.0]], [[1.0, 0.0], [-2.0, -3.0], [4.0, 4.0]]]
    set_ema_state(book, embed, cs, ea)
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
        cs2, ea2, emb2 = hand_ema(cs[b], ea[b], counts, sums, decay, eps)
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
    set_ema_state(book, embed, cs, ea)
    x = F.normalize(torch.tensor([[[1.0, 0.1], [0.1, 1.0], [1.0, 0.9], [0.9, -0.1]]]), dim=-1)
    indices = book.nearest(x)
    assert indices.tolist() == [[0, 1, 2, 0]]
    book.update(x, indices)
    xs = x[0].tolist()
    counts = [2, 1, 1]
    sums = [[xs[0][j] + xs[3][j] for j in range(2)], xs[1], xs[2]]
    cs2, ea2, emb2 = hand_ema(cs[0], ea[0], counts, sums, decay, eps, cosine=True)
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
    # token 5 masked, 3 and 4 non-finite, 2 overflows: only tokens 0 and 1 count
    valid = torch.tensor([[True, True, True, True, True, False]])
    ref = copy.deepcopy(book)
    ref.update(x[:, :2], indices[:, :2])
    book.update(bad, indices, valid)
    for name in ("cluster_size", "embed_avg", "embed"):
        assert torch.isfinite(getattr(book, name)).all()
        torch.testing.assert_close(getattr(book, name), getattr(ref, name), rtol=0, atol=0)


def test_ema_update_skips_books_without_valid_tokens():
    book = EMACodebook(3, 2, books=2, decay=0.0)
    before = snapshot(book)
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
    before = snapshot(book)
    x = torch.randn(1, 8, 3)
    book.update(x, book.nearest(x))
    assert torch.equal(book.cluster_size, before["cluster_size"])
    assert torch.equal(book.embed_avg, before["embed_avg"])


def test_step_weight_scales_each_codes_step_and_zero_freezes_the_code():
    """``stat <- lerp(stat, batch_stat, (1 - decay) * w)`` per code; w = 0 leaves the code's statistics and
    vector exactly as they were, although the other codes' step moves the Laplace smoothing."""
    decay, eps = 0.5, 1e-5
    book = EMACodebook(3, 1, decay=decay, eps=eps)
    set_ema_state(book, [[0.0], [1.0], [2.0]], [1.0, 1.0, 1.0], [[0.0], [1.0], [2.0]])
    x = torch.tensor([[[0.1], [0.9], [1.1], [2.0]]])
    indices = torch.tensor([[0, 1, 1, 2]])
    frozen = book.update(x, indices, step_weight=torch.tensor([0.0, 0.5, 1.0]))
    assert frozen.tolist() == [[True, False, False]]
    # code 1: step 0.5 * 0.5 = 0.25 towards count 2 and sum 2.0; code 2: step 0.5 towards count 1, sum 2.0
    want_sizes = [1.0, 1.0 + 0.25 * (2.0 - 1.0), 1.0]
    want_avg = [0.0, 1.0 + 0.25 * (2.0 - 1.0), 2.0 + 0.5 * (2.0 - 2.0)]
    torch.testing.assert_close(book.cluster_size[0], torch.tensor(want_sizes))
    torch.testing.assert_close(book.embed_avg[0, :, 0], torch.tensor(want_avg))
    n = sum(want_sizes)
    smoothed = [(c + eps) / (n + 3 * eps) * n for c in want_sizes]
    assert book.embed[0, 0, 0].item() == 0.0  # frozen: not recomputed from the new smoothing
    torch.testing.assert_close(
        book.embed[0, 1:, 0], torch.tensor([want_avg[1] / smoothed[1], 2.0 / smoothed[2]])
    )


def test_accumulated_updates_make_one_step_equal_to_the_concatenated_batch():
    torch.manual_seed(0)
    book = EMACodebook(8, 4, decay=0.7)
    twin = copy.deepcopy(book)
    parts = [torch.randn(1, 10, 4) for _ in range(3)]
    before = snapshot(book)
    for part in parts[:2]:
        assert book.update(part, book.nearest(part), accumulate=True) is None
    assert_same_state(book, before)  # only pending statistics so far
    book.update(parts[2], book.nearest(parts[2]))
    whole = torch.cat(parts, 1)
    twin.update(whole, twin.nearest(whole))
    for name in ("cluster_size", "embed_avg", "embed"):
        torch.testing.assert_close(getattr(book, name), getattr(twin, name), msg=name)
    assert not book.pending_counts.any() and not book.pending_sums.any()  # folded in and cleared


def test_update_of_counts_only_leaves_the_codes_alone():
    book = EMACodebook(3, 2, decay=0.5)
    before = snapshot(book)
    x = torch.randn(1, 4, 2)
    book.update(x, torch.tensor([[0, 0, 2, 0]]), codes=False)
    torch.testing.assert_close(book.cluster_size[0], torch.tensor([0.5 + 0.5 * 3, 0.5, 0.5 + 0.5 * 1]))
    assert torch.equal(book.embed, before["embed"]) and torch.equal(book.embed_avg, before["embed_avg"])


def test_train_step_without_ema_or_expiry_changes_nothing_and_with_expiry_counts_usage():
    x = torch.randn(1, 6, 2)
    frozen = EMACodebook(4, 2, ema=False)
    before = snapshot(frozen)
    frozen.train_step_(x, frozen.nearest(x))
    assert_same_state(frozen, before)
    usage_only = EMACodebook(4, 2, ema=False, decay=0.5, threshold_ema_dead_code=0.1)
    before = snapshot(usage_only)
    indices = torch.tensor([[0, 0, 1, 1, 1, 3]])
    usage_only.train_step_(x, indices)
    torch.testing.assert_close(usage_only.cluster_size[0], torch.tensor([1.5, 2.0, 0.5, 1.0]))
    assert torch.equal(usage_only.embed, before["embed"])  # nothing fell below 0.1: no expiry either


def test_set_codes_installs_the_codes_and_marks_kmeans_done():
    book = EMACodebook(2, 2, kmeans_init=True)
    book.cluster_size.copy_(torch.tensor([[2.0, 3.0]]))
    book.set_codes_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert book.embed.tolist() == [[[1.0, 2.0], [3.0, 4.0]]]
    assert book.embed_avg.tolist() == [[[2.0, 4.0], [9.0, 12.0]]]
    assert bool(book.initted) and not book.needs_init()


def test_loading_an_uninitialised_state_brings_kmeans_back():
    book = EMACodebook(4, 2, kmeans_init=True)
    fresh = copy.deepcopy(book)
    assert book.init_(torch.randn(1, 10, 2)) and not book.needs_init()
    book.load_state_dict(fresh.state_dict())
    assert book.needs_init()
    book.prepare_(torch.randn(1, 10, 2))
    assert not book.needs_init() and bool(book.initted)


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
    assert torch.equal(got, brute_nearest(x, book.embed, cosine))


def test_search_cache_follows_every_write_to_the_codebook():
    """The fused CPU search keeps the packed codes between calls; every way the codes change refreshes it."""
    torch.manual_seed(0)
    book = EMACodebook(64, 8, books=2, threshold_ema_dead_code=0.5)
    x = torch.randn(2, 400, 8)

    def check():
        assert torch.equal(book.nearest(x), brute_nearest(x, book.embed))

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
    got = learnable.nearest(xl)
    assert torch.equal(got, brute_nearest(xl, learnable.embed)) and not torch.equal(got, before)


def test_lookup_gathers_each_books_codes():
    book = EMACodebook(4, 2, books=3)
    idx = torch.tensor([[0, 3], [1, 1], [3, 2]])
    out = book.lookup(idx)
    assert out.shape == (3, 2, 2)
    for b in range(3):
        for t in range(2):
            assert torch.equal(out[b, t], book.embed[b, idx[b, t]])


def test_lookup_of_a_learnable_codebook_carries_the_gradient_to_the_codes():
    book = EMACodebook(3, 2, learnable=True, ema=False)
    assert book.trained_by_gradient and isinstance(book, Codebook)
    book.lookup(torch.tensor([[2, 2, 0]])).sum().backward()
    assert book.embed.grad.tolist() == [[[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]]


def test_logits_are_minus_the_distance_or_the_dot_product():
    book = EMACodebook(2, 2)
    set_ema_state(book, [[0.0, 0.0], [3.0, 4.0]], [1.0, 1.0], [[0.0, 0.0], [3.0, 4.0]])
    x = torch.tensor([[[0.0, 4.0]]])
    torch.testing.assert_close(book.logits(x), torch.tensor([[[-4.0, -3.0]]]))
    cosine = EMACodebook(2, 2, cosine=True)
    set_ema_state(cosine, [[1.0, 0.0], [0.6, 0.8]], [1.0, 1.0], [[1.0, 0.0], [0.6, 0.8]])
    torch.testing.assert_close(cosine.logits(x), torch.tensor([[[0.0, 3.2]]]))


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
    cold = book.sample(x, 1e-3, generator=generator(0))
    assert (cold == nearest).float().mean() > 0.97
    hot = book.sample(x, 100.0, generator=generator(0))
    assert (hot == nearest).float().mean() < 0.5
    assert len(set(hot[0].tolist())) > 8, "a hot sample uses many codes"
    # same generator state -> same draw
    assert torch.equal(
        book.sample(x, 1.0, generator=generator(5)), book.sample(x, 1.0, generator=generator(5))
    )


# -- dead-code expiry ----------------------------------------------------------------------------


def test_expire_replaces_exactly_the_codes_below_threshold():
    book = EMACodebook(4, 2, threshold_ema_dead_code=1.5)
    embed = [[[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]]
    cs = [[5.0, 1.0, 1.4999, 1.5]]
    ea = [[[0.0, 0.0], [10.0, 10.0], [-15.0, 15.0], [15.0, -15.0]]]
    set_ema_state(book, embed, cs, ea)
    before = snapshot(book)
    x = torch.tensor([[[0.1, 0.2], [0.3, -0.1], [-0.2, 0.1], [5.0, 5.0], [7.0, 1.0]]])
    replaced = book.expire_(x, generator=generator(0))
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
    before = snapshot(book)
    assert not book.expire_(torch.randn(1, 8, 2)).any()
    assert_same_state(book, before)
    off = EMACodebook(4, 2, threshold_ema_dead_code=0.0)
    off.cluster_size.zero_()
    before = snapshot(off)
    assert not off.expire_(torch.randn(1, 8, 2)).any()
    assert_same_state(off, before)


def test_expire_spares_protected_codes():
    book = EMACodebook(3, 2, threshold_ema_dead_code=2.0)  # every code (cluster_size 1) is dead
    before = snapshot(book)
    replaced = book.expire_(torch.randn(1, 8, 2), protect=torch.tensor([[True, False, True]]))
    assert replaced.tolist() == [[False, True, False]]
    for k in (0, 2):
        assert torch.equal(book.embed[0, k], before["embed"][0, k])


def test_expire_with_fewer_samples_than_dead_codes_replaces_all_from_valid_tokens():
    book = EMACodebook(6, 2, threshold_ema_dead_code=2.0)  # every code (cluster_size 1) is dead
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), 0.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, True, False]])  # only tokens 0, 1 may be used
    replaced = book.expire_(x, valid, generator=generator(3))
    assert replaced.all()
    allowed = {(1.0, 2.0), (3.0, 4.0)}
    assert {tuple(r) for r in book.embed[0].tolist()} <= allowed
    assert torch.isfinite(book.embed).all() and torch.isfinite(book.embed_avg).all()
    assert torch.equal(book.cluster_size, torch.full((1, 6), 2.0))


def test_expire_cosine_normalises_replacements_per_book():
    book = EMACodebook(3, 2, books=2, cosine=True, threshold_ema_dead_code=1.0)
    book.cluster_size.copy_(torch.tensor([[0.5, 2.0, 2.0], [2.0, 2.0, 2.0]]))
    before = snapshot(book)
    x = torch.tensor([[[3.0, 4.0]], [[100.0, 0.0]]])
    replaced = book.expire_(x, generator=generator(0))
    assert replaced.tolist() == [[True, False, False], [False, False, False]]
    torch.testing.assert_close(book.embed[0, 0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(book.embed_avg[0, 0], torch.tensor([0.6, 0.8]) * 1.0)
    assert torch.equal(book.embed[1], before["embed"][1])


# -- k-means initialisation ----------------------------------------------------------------------


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
    before = snapshot(book)
    assert not book.init_(torch.randn(1, 20, 8))
    assert_same_state(book, before)


def test_init_skips_when_no_finite_token():
    book = EMACodebook(4, 2, kmeans_init=True)
    before = snapshot(book)
    assert not book.init_(torch.full((1, 3, 2), float("nan")))
    assert_same_state(book, before)


def test_init_sets_statistics_from_final_kmeans_assignment():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    x = blobs(centres, 10, 0.2, 0).unsqueeze(0)
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


# -- dtype casts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("learnable", [False, True])
def test_dtype_casts_leave_the_whole_state_float32(learnable):
    book = EMACodebook(4, 2, learnable=learnable)
    before = snapshot(book)
    book.half()
    for name, t in book.state_dict().items():
        assert t.dtype == before[name].dtype, name
    assert_same_state(book, before)


# -- constructor and build_codebook checks -------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(size=0, dim=2), ValueError, "codebook_size must be >= 1, got 0"),
        (dict(size=4, dim=0), ValueError, "codebook dim must be >= 1, got 0"),
        (dict(size=4.0, dim=2), TypeError, r"codebook_size must be an int, got float \(4.0\)"),
        (dict(size=4, dim=2, books=0), ValueError, "books must be >= 1, got 0"),
        (dict(size=4, dim=2, kmeans_iters=-1), ValueError, "kmeans_iters must be >= 0, got -1"),
        (dict(size=4, dim=2, decay=1.5), ValueError, r"decay must be in \[0, 1\], got 1.5"),
        (dict(size=4, dim=2, eps=0.0), ValueError, "eps must be > 0, got 0.0"),
        (
            dict(size=4, dim=2, threshold_ema_dead_code=-1),
            ValueError,
            "threshold_ema_dead_code must be >= 0, got -1",
        ),
    ],
)
def test_codebook_constructor_rejects_bad_arguments(kwargs, exc, msg):
    size, dim = kwargs.pop("size"), kwargs.pop("dim")
    with pytest.raises(exc, match=msg):
        EMACodebook(size, dim, **kwargs)


def test_build_codebook_by_name_and_by_object():
    built = build_codebook("cosine", size=5, dim=3, books=2, decay=0.5)
    assert isinstance(built, EMACodebook) and built.cosine and built.decay == 0.5
    assert (built.size, built.dim, built.books) == (5, 3, 2)
    own = EMACodebook(5, 3)
    assert build_codebook(own, size=5, dim=3) is own


def test_build_codebook_rejects_wrong_objects_with_what_is_wrong():
    with pytest.raises(ValueError, match=r"codebook_kwargs \['decay'\] are for a codebook given by name"):
        build_codebook(EMACodebook(5, 3), size=5, dim=3, decay=0.5)
    with pytest.raises(
        ValueError, match=r"has \(size, dim, books\) = \(5, 3, 1\); the quantizer needs \(5, 4, 1\)"
    ):
        build_codebook(EMACodebook(5, 3), size=5, dim=4)
    with pytest.raises(TypeError, match="does not follow vqcore.protocols.Codebook: missing .*nearest"):
        build_codebook(nn.Linear(2, 2), size=5, dim=3)


def test_search_dtype_is_checked_and_the_cpu_keeps_the_float32_search():
    with pytest.raises(
        ValueError, match=r"search_dtype must be one of .*bfloat16.* or None, got torch.float64"
    ):
        EMACodebook(8, 4, search_dtype=torch.float64)
    book = EMACodebook(64, 4, search_dtype=torch.bfloat16)
    x = torch.randn(1, 100, 4)
    assert torch.equal(book.nearest(x), nearest(x, book.codes.detach(), cosine=False))
