"""Nearest-code search and its kin (vqcore.blocks.distance): hand computations, the float64 brute force on
random data for every path (fused oneDNN, chunked baddbmm, the one-block traced path), ties, inputs that
require grad, and (slow) the same checks at the sizes where chunking and slicing really happen."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import brute_nearest, generator

from vqcore.blocks import distance
from vqcore.blocks.distance import (
    DEFAULT_CHUNK_BYTES,
    argmin_rows,
    gumbel_sample,
    is_tie,
    l2norm,
    nearest,
    nearest_scored,
    prepare_codes,
    score_tile,
    similarity,
)

FUSED = distance._FUSED_LINEAR is not None  # no public name: whether this torch build has oneDNN's ops
needs_fused = pytest.mark.skipif(not FUSED, reason="this torch build has no oneDNN linear ops")


def clear_nearest(x: torch.Tensor, codes: torch.Tensor, cosine: bool, gap: float = 1e-4):
    """Float64 brute-force nearest codes (B, N) and the (B, N) mask of tokens whose best and second-best
    scores differ by more than ``gap`` (relative): the tokens float32 rounding cannot flip."""
    x64, c64 = x.double(), codes.double()
    scores = -(x64 @ c64.transpose(1, 2)) if cosine else torch.cdist(x64, c64).pow(2)
    top2 = scores.topk(2, dim=-1, largest=False)
    clear = top2.values[..., 1] - top2.values[..., 0] > gap * scores.abs().amax(-1).clamp(min=1)
    return top2.indices[..., 0], clear


EXACT_CDIST = "donot_use_mm_for_euclid_dist"  # cdist by explicit differences: equal codes, equal distances


def one_block_search(monkeypatch, *args, **kwargs):
    """:func:`nearest` as torch.export / torch.compile run it: one block, no chunks, no fused path."""
    with monkeypatch.context() as patch:
        patch.setattr(distance, "is_tracing", lambda: True)
        return nearest(*args, **kwargs)


# -- hand computations ---------------------------------------------------------------------------


def test_nearest_hand_example_euclidean_and_cosine():
    codes = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]]])
    x = torch.tensor([[[1.0, 0.5], [3.0, 1.0], [0.5, 2.0], [2.0, 0.0]]])
    # squared distances: token 0 -> (1.25, 9.25, 7.25); 1 -> (10, 2, 13); 2 -> (4.25, 16.25, 1.25);
    # token 3 is halfway between codes 0 and 1 (4, 4, 13): the tie goes to the lowest index
    assert nearest(x, codes, cosine=False).tolist() == [[0, 1, 2, 0]]
    unit = l2norm(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))
    # dot products: (2, 0.1, 1.48) -> 0; (0.1, -3, -2.05) -> 0, the least negative; (1, 0.9, 1.34) -> 2
    y = torch.tensor([[[2.0, 0.1], [0.1, -3.0], [1.0, 0.9]]])
    assert nearest(y, unit, cosine=True).tolist() == [[0, 0, 2]]
    assert nearest(-y[:, 1:2], unit, cosine=True).tolist() == [[1]]


def test_l2norm_is_unit_length_and_leaves_zero_vectors_zero():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-2.0, 0.0]])
    torch.testing.assert_close(l2norm(x), torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))


def test_similarity_is_minus_the_distance_or_the_dot_product_and_differentiable():
    codes = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    x = torch.tensor([[[0.0, 4.0], [3.0, 4.0]]], requires_grad=True)
    sim = similarity(x, codes, cosine=False)
    torch.testing.assert_close(sim, torch.tensor([[[-4.0, -3.0], [-5.0, -math.sqrt(1e-12)]]]))
    sim[0, 0, 0].backward()  # d(-||x - c||)/dx = -(x - c) / ||x - c|| = (0, -1)
    torch.testing.assert_close(x.grad[0, 0], torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(similarity(x, codes, cosine=True), torch.tensor([[[0.0, 16.0], [0.0, 25.0]]]))


def test_is_tie_within_the_tolerance_of_float32_rounding():
    z = torch.tensor([1.0, 0.0], dtype=torch.float64)
    a, b = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64)
    # squared distances 1 and 1: an exact tie
    assert is_tie(z, a, b, cosine=False, tolerance=0.0)
    # squared distances 1 and 1.21 differ by 0.21; the scale is (|z| + max(|a|, |c|))^2 = 3.1^2 = 9.61,
    # so they tie at a tolerance of 0.21 / 9.61 = 0.02185 and above
    c = torch.tensor([2.1, 0.0], dtype=torch.float64)
    assert is_tie(z, a, c, cosine=False, tolerance=0.0219)
    assert not is_tie(z, a, c, cosine=False, tolerance=0.0218)
    # cosine scores -z.a: 0 and -1, scale (1 + 1)^2 = 4: a tie only at tolerance >= 1/4
    e = torch.tensor([1.0, 0.0], dtype=torch.float64)
    f = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert is_tie(z, e, f, cosine=True, tolerance=0.25) and not is_tie(z, e, f, cosine=True, tolerance=0.24)


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
    assert torch.equal(argmin_rows(scores, out), want) and torch.equal(out, want)
    assert out[50] == size // 2 and out[51] == 3 and out[52] == size - 1 and out[53] == size // 3


# -- every path against the brute force ----------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
@pytest.mark.parametrize(
    "chunk_bytes", [DEFAULT_CHUNK_BYTES, 64, 4 * 37 * 2 * 7 + 3], ids=["one_block", "1_token", "7_tokens"]
)
def test_nearest_matches_brute_force_in_every_chunking(cosine, chunk_bytes, monkeypatch):
    torch.manual_seed(0)
    x = (torch.randn(2, 6, 257) * 3).transpose(1, 2)  # a strided input
    codes = torch.randn(2, 37, 6)
    if cosine:
        x, codes = l2norm(x), l2norm(codes)
    got = nearest(x, codes, cosine=cosine, chunk_bytes=chunk_bytes)
    assert got.dtype == torch.int64 and got.shape == (2, 257)
    want, clear = clear_nearest(x, codes, cosine)
    assert clear.float().mean() > 0.9
    assert torch.equal(got[clear], want[clear])
    assert torch.equal(one_block_search(monkeypatch, x, codes, cosine=cosine, chunk_bytes=chunk_bytes), got)


def test_exact_ties_go_to_the_lowest_index_in_every_chunking():
    torch.manual_seed(0)
    codes = torch.randn(1, 64, 8)
    codes = torch.cat([codes, codes], 1)  # every code twice: the first copy must win
    x = codes[:, torch.randint(64, (500,))]
    for chunk_bytes in (DEFAULT_CHUNK_BYTES, 64, 1000):
        assert (nearest(x, codes, cosine=False, chunk_bytes=chunk_bytes) < 64).all()


@needs_fused
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
    fused = nearest(x, codes, cosine=cosine, chunk_bytes=2**20)  # several chunks per book
    assert calls, "the fused path was not taken"
    monkeypatch.setattr(distance, "_FUSED_LINEAR", None)
    plain = nearest(x, codes, cosine=cosine, chunk_bytes=2**20)
    assert torch.equal(fused, plain)
    assert torch.equal(fused, brute_nearest(x, codes, cosine))


@needs_fused
@pytest.mark.parametrize("cosine", [False, True])
def test_prepared_codes_give_the_search_its_own_packing_gives(cosine):
    torch.manual_seed(0)
    codes, x = torch.randn(2, 100, 8), torch.randn(2, 300, 8)
    prepared = prepare_codes(codes, cosine=cosine, chunk_bytes=2**20)
    # one block of all 100 codes per book; 1 MiB of scores per block: 2**20 // (4 * 100) tokens
    assert (prepared.rows, prepared.cols) == (2**20 // 400, 100)
    assert len(prepared.packed) == 2 and all(len(blocks) == 1 for blocks in prepared.packed)
    if cosine:
        assert prepared.sq is None
    else:
        assert torch.equal(prepared.sq, codes.pow(2).sum(-1))
    want = nearest(x, codes, cosine=cosine, chunk_bytes=2**20)
    assert torch.equal(nearest(x, codes, cosine=cosine, chunk_bytes=2**20, prepared=prepared), want)
    # a codebook (6400 bytes) over the budget is not copied: the search packs it block by block (64 codes)
    small = prepare_codes(codes, cosine=cosine, chunk_bytes=4096)
    assert small.packed is None and (small.rows, small.cols) == (16, 64)
    assert torch.equal(nearest(x, codes, cosine=cosine, chunk_bytes=4096, prepared=small), want)


def test_score_tile_splits_the_codes_only_when_few_tokens_would_fit():
    # all codes in a block while 256 tokens fit: 16 MiB / (4 bytes x 2 books x 1024 codes) = 2048 tokens
    assert score_tile(2, 1024, 16 * 2**20) == (2048, 1024)
    assert score_tile(1, 16384, 16 * 2**20) == (256, 16384)
    # 2^18 codes: 256 tokens x 4096 codes in a 4 MiB block; 16 MiB: 16384 codes
    assert score_tile(1, 2**18, 4 * 2**20) == (256, 4096)
    assert score_tile(1, 2**18, 16 * 2**20) == (256, 16384)
    # blocks of codes are multiples of the argmin groups (64), at least one group, at most the codebook
    assert score_tile(3, 5000, 10**6) == (260, 320)  # 10**6 // 3072 = 325 -> 320 codes; 10**6 // 3840 tokens
    assert score_tile(1, 100, 64) == (1, 64)
    assert score_tile(1, 37, 64) == (1, 37)


@pytest.mark.parametrize("path", ["fused", "baddbmm"])
@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_search_in_blocks_of_codes_is_the_argmin_over_all_codes(path, cosine, monkeypatch):
    """A budget that splits 1000 codes into blocks of 64 (the last one 40 codes) gives the one-block search's
    indices: across blocks, exact ties go to the lowest index and NaN rows to argmin's answer."""
    if path == "fused" and not FUSED:
        pytest.skip("this torch build has no oneDNN linear ops")
    if path == "baddbmm":
        monkeypatch.setattr(distance, "_FUSED_LINEAR", None)
    torch.manual_seed(0)
    codes = torch.randn(2, 1000, 16) * 2
    codes[:, 900:] = codes[:, 100:200]  # codes 900.. repeat codes 100..: the tie goes to the first copy
    x = codes[:, torch.randint(1000, (700,))] + 0.01 * torch.randn(2, 700, 16)
    if cosine:
        codes, x = l2norm(codes), l2norm(x)
    x[0, 5] = float("nan")
    budget = 4 * 2 * 256 * 64  # 2 books x 256 tokens x 64 codes: the smallest block of codes
    assert score_tile(2, 1000, budget)[1] == 64 and score_tile(1, 1000, budget)[1] == 128
    got = nearest(x, codes, cosine=cosine, chunk_bytes=budget)
    want = nearest(x, codes, cosine=cosine, chunk_bytes=10**9)
    assert torch.equal(got, want)
    assert got[0, 5] == torch.argmin(torch.full((1000,), float("nan"))) == 0
    x64, c64 = x.double(), codes.double()
    scores = -(x64 @ c64.transpose(1, 2)) if cosine else torch.cdist(x64, c64, compute_mode=EXACT_CDIST)
    chosen, best = scores.gather(-1, got.unsqueeze(-1)).squeeze(-1), scores.amin(-1)
    assert ((chosen - best)[~x.isnan().any(-1)] <= 1e-5).all()  # the nearest, up to float32 rounding
    assert not (got >= 900).any()  # every token near a repeated code took the first copy


@pytest.mark.parametrize("path", ["fused", "baddbmm"])
def test_nearest_on_inputs_that_require_grad_in_every_mode(path, monkeypatch):
    """The chunked search writes into reused blocks (out=); inputs that require grad must still work, in
    grad mode, inference mode and on another thread."""
    if path == "fused" and not FUSED:
        pytest.skip("this torch build has no oneDNN linear ops")
    if path == "baddbmm":
        monkeypatch.setattr(distance, "_FUSED_LINEAR", None)
    torch.manual_seed(0)
    x, codes = torch.randn(1, 5000, 16), torch.randn(1, 300, 16)
    expected = nearest(x, codes, cosine=False, chunk_bytes=10**9)  # one block
    brute, clear = clear_nearest(x, codes, cosine=False)
    assert torch.equal(expected[clear], brute[clear])
    got = nearest(x.clone().requires_grad_(), codes, cosine=False, chunk_bytes=4096)
    assert torch.equal(got, expected) and not got.requires_grad
    with torch.inference_mode():
        assert torch.equal(nearest(x, codes, cosine=False, chunk_bytes=4096), expected)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(idx=nearest(x, codes, cosine=False, chunk_bytes=4096))
    )
    thread.start()
    thread.join()
    assert torch.equal(result["idx"], expected)


# -- Gumbel sampling -----------------------------------------------------------------------------


def test_gumbel_sample_follows_the_softmax_of_the_similarity():
    """Sampling probabilities are softmax(-||x - c|| / temperature), in one block or in chunks of 5 tokens:
    checked by frequencies on copies of one token."""
    codes = torch.tensor([[[0.0], [1.0], [3.0]]])
    x = torch.zeros(1, 20000, 1)
    for temperature in (1.0, 0.5):
        want = torch.softmax(-torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64) / temperature, 0)
        for chunk_bytes in (DEFAULT_CHUNK_BYTES, 64):
            indices = gumbel_sample(
                x,
                codes,
                cosine=False,
                temperature=temperature,
                generator=generator(0),
                chunk_bytes=chunk_bytes,
            )
            freq = torch.bincount(indices[0], minlength=3).double() / x.shape[1]
            torch.testing.assert_close(freq, want, rtol=0, atol=0.015)
    # cosine codebooks: softmax(x.c / temperature)
    unit = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    y = torch.tensor([[1.0, 0.0]]).expand(20000, 2).unsqueeze(0)
    indices = gumbel_sample(y, unit, cosine=True, temperature=1.0, generator=generator(1))
    freq = torch.bincount(indices[0], minlength=2).double() / 20000
    torch.testing.assert_close(freq[0].item(), math.e / (math.e + 1), rtol=0, atol=0.015)


def test_gumbel_sample_in_blocks_of_codes_follows_the_same_softmax():
    """200 codes in blocks of 64 (a running maximum of the Gumbel keys across blocks): the frequencies are
    still softmax(-||x - c|| / temperature); the likeliest codes sit in different blocks."""
    distances = torch.full((200,), 6.0)
    distances[[3, 70, 150, 199]] = torch.tensor([0.0, 0.5, 1.0, 0.2])
    codes = distances.view(1, 200, 1)
    x = torch.zeros(1, 20000, 1)
    budget = 4 * 256 * 64
    assert score_tile(1, 200, budget) == (256, 64)
    indices = gumbel_sample(
        x, codes, cosine=False, temperature=1.0, generator=generator(2), chunk_bytes=budget
    )
    want = torch.softmax(-distances.double(), 0)
    freq = torch.bincount(indices[0], minlength=200).double() / x.shape[1]
    torch.testing.assert_close(freq, want, rtol=0, atol=0.015)


# -- the full-size checks (run by `make test-slow`) ------------------------------------------------


@pytest.mark.slow
def test_nearest_against_brute_force_at_full_size(monkeypatch):
    """Unchunked, chunked (a short last chunk too), multi-book, strided and cosine searches up to 65536 codes
    against the float64 brute force (near-ties excluded), and the one-block traced path agreeing."""
    torch.manual_seed(0)
    shapes = [
        (1, 100, 37, 6),
        (2, 257, 37, 6),
        (3, 1000, 129, 16),
        (1, 8192, 1024, 64),
        (1, 513, 8192, 32),
        (2, 50, 3, 1),
        (1, 300, 65536, 64),
    ]
    for books, n, size, dim in shapes:
        for cosine in (False, True):
            for chunk_bytes in (DEFAULT_CHUNK_BYTES, 64, 4 * size * books * 7 + 3, 10**9):
                x = (
                    torch.randn(books, n, dim) * 3
                    if n % 2
                    else (torch.randn(books, dim, n) * 3).transpose(1, 2)
                )
                codes = torch.randn(books, size, dim)
                if cosine:
                    x, codes = l2norm(x), l2norm(codes)
                idx = nearest(x, codes, cosine=cosine, chunk_bytes=chunk_bytes)
                where = (books, n, size, dim, cosine, chunk_bytes)
                assert idx.dtype == torch.int64 and idx.shape == (books, n)
                expected, clear = clear_nearest(x, codes, cosine)
                assert dim == 1 or clear.float().mean() > 0.9, where
                assert not ((idx != expected) & clear).any(), where
                traced = one_block_search(monkeypatch, x, codes, cosine=cosine, chunk_bytes=chunk_bytes)
                assert torch.equal(traced, idx), where


@pytest.mark.slow
def test_sliced_code_norms_are_bitwise_the_one_shot_norms():
    """The squared code norms are computed over slices of codes (the temporary stays about 1 MiB); each row
    is reduced on its own, so they equal ``codes.pow(2).sum(-1)`` bit for bit, strided codes included."""
    for books, size, dim in [
        (1, 65536, 64),
        (1, 8192, 256),
        (3, 1000, 17),
        (2, 37, 6),
        (1, 70000, 3),
        (4, 4096, 512),
        (1, 300, 5000),
        (2, 65536, 256),
    ]:
        for scale in (1.0, 1e3):
            codes = torch.randn(books, size, dim) * scale
            for c in (codes, codes.transpose(1, 2).contiguous().transpose(1, 2)):
                # a private helper (no public name returns the norms alone); the search relies on it
                assert torch.equal(distance._sq_norms(c), c.pow(2).sum(-1)), (books, size, dim)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk_bytes", [4 * 2 * 37 * 16, distance.DEFAULT_CHUNK_BYTES])
def test_nearest_k_is_the_sorted_brute_force_top_k(cosine, chunk_bytes):
    g = torch.Generator().manual_seed(3)
    x, codes = torch.randn(2, 301, 8, generator=g), torch.randn(2, 37, 8, generator=g)
    if cosine:
        x, codes = F.normalize(x, dim=-1), F.normalize(codes, dim=-1)
    indices, scores = distance.nearest_k(x, codes, 5, cosine=cosine, chunk_bytes=chunk_bytes)
    exact = (
        -(x.double() @ codes.double().transpose(1, 2))
        if cosine
        else torch.cdist(x.double(), codes.double()) ** 2
    )
    expected = exact.topk(5, -1, largest=False)
    assert indices.dtype == torch.int64 and indices.shape == scores.shape == (2, 301, 5)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores.double(), expected.values, rtol=0, atol=1e-5)
    first, _ = distance.nearest_k(x, codes, 1, cosine=cosine, chunk_bytes=chunk_bytes)
    assert torch.equal(first[..., 0], distance.nearest(x, codes, cosine=cosine))


def test_nearest_k_refuses_k_outside_the_codebook():
    with pytest.raises(ValueError, match="k must be between 1 and the codebook size 4, got 5"):
        distance.nearest_k(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), 5, cosine=False)


@pytest.mark.parametrize("path", ["fused", "baddbmm"])
@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
@pytest.mark.parametrize("chunk_bytes", [DEFAULT_CHUNK_BYTES, 4 * 2 * 256 * 64], ids=["one_block", "tiled"])
def test_nearest_scored_gives_the_indices_and_the_scores_of_the_chosen_codes(
    path, cosine, chunk_bytes, monkeypatch
):
    if path == "fused" and not FUSED:
        pytest.skip("this torch build has no oneDNN linear ops")
    if path == "baddbmm":
        monkeypatch.setattr(distance, "_FUSED_LINEAR", None)
    torch.manual_seed(0)
    x, codes = torch.randn(2, 600, 16), torch.randn(2, 300, 16)
    if cosine:
        x, codes = l2norm(x), l2norm(codes)
    indices, scores = nearest_scored(x, codes, cosine=cosine, chunk_bytes=chunk_bytes)
    assert torch.equal(indices, nearest(x, codes, cosine=cosine, chunk_bytes=chunk_bytes))
    chosen = codes.gather(1, indices.unsqueeze(-1).expand(-1, -1, 16))
    dots = (x.double() * chosen.double()).sum(-1)
    want = -dots if cosine else chosen.double().pow(2).sum(-1) - 2 * dots
    torch.testing.assert_close(scores.double(), want, rtol=0, atol=1e-4)
    # plus ||x||^2, the Euclidean score is the squared distance to the chosen code
    if not cosine:
        torch.testing.assert_close(
            (scores + x.pow(2).sum(-1)).double(),
            (x.double() - chosen.double()).pow(2).sum(-1),
            rtol=0,
            atol=1e-4,
        )
