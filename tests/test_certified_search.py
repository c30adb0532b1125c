"""Certified low-precision nearest-code search (vqcore.blocks.certified), on the CPU's exact emulation of a
bfloat16 GEMM with float32 accumulation: the bound against hand computations and against the true score
errors of random, large, anisotropic and clustered data; the indices against float32 ``nearest`` on random
data, adversarial near-ties (bf16 reorders the best codes), exact ties, a bfloat16-output kernel (and a case
that its rounding term decides), non-finite tokens and codes, empty input and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import generator

from vqcore.blocks.certified import (
    CertifiedStats,
    float32_score_error_bound,
    nearest_certified,
    nearest_certified_with_stats,
    score_error_bound,
)
from vqcore.blocks.distance import nearest

BF16_TINY = 2.0**-126  # bfloat16's smallest normal number (float32's exponent range)


def gamma(n: int, unit: float) -> float:
    return n * unit / (1 - n * unit)


def inflate(value: float, dim: int) -> float:
    return value * (1 + 2 * (dim + 32) * 2**-24) + (dim + 8) * 2**-124


# -- the bound -----------------------------------------------------------------------------------------


def test_bound_by_hand_cosine():
    # d = 4, ||x - x~|| = 0.5, ||x|| = 2, max ||c - c~|| = 0.25, max ||c|| = 3: X~ = 2.5, C~ = 3.25
    ga = gamma(4, 2**-23)
    dot = 0.5 * 3 + 2.5 * 0.25 + 2 * BF16_TINY * (2.5 + 3.25) + ga * 2.5 * 3.25
    got = score_error_bound(0.5, 2.0, 0.25, 3.0, dim=4, cosine=True)
    assert got == pytest.approx(inflate(dot, 4), rel=1e-15)
    assert got == pytest.approx(2.125, rel=1e-5)  # the input rounding terms dominate


def test_bound_by_hand_euclidean_with_bf16_output():
    ga, g = gamma(4, 2**-23), gamma(4, 2**-24)
    big_g = (1 + ga) * 2.5 * 3.25  # bounds |G|
    dot = 0.5 * 3 + 2.5 * 0.25 + 2 * BF16_TINY * 5.75 + ga * 8.125 + 2**-8 * big_g
    total = 2 * dot + g * 9 + 2**-24 * ((1 + g) * 9 + 2 * (1 + 2**-8) * big_g)
    got = score_error_bound(0.5, 2.0, 0.25, 3.0, dim=4, cosine=False, output_rounding=True)
    assert got == pytest.approx(inflate(total, 4), rel=1e-15)
    assert got == pytest.approx(2 * (2.125 + 8.125 / 256), rel=1e-5)
    # float16 output rounds to 2^-11 instead, and its smallest normal number is 2^-14
    half = score_error_bound(
        0.5, 2.0, 0.25, 3.0, dim=4, cosine=True, low_dtype=torch.float16, output_rounding=True
    )
    dot16 = 2.125 + 2 * 2**-14 * 5.75 + ga * 8.125 + 2**-11 * big_g
    assert half == pytest.approx(inflate(dot16, 4), rel=1e-15)


def test_float32_bound_by_hand():
    g3, g4 = gamma(3, 2**-24), gamma(4, 2**-24)
    assert float32_score_error_bound(2.0, 3.0, dim=3, cosine=True) == pytest.approx(
        inflate(g3 * 6, 3), rel=1e-15
    )
    euclidean = g3 * 9 + g4 * ((1 + g3) * 9 + 2 * 6)
    assert float32_score_error_bound(2.0, 3.0, dim=3, cosine=False) == pytest.approx(
        inflate(euclidean, 3), rel=1e-15
    )


def test_bound_covers_a_hand_rounded_example():
    # x = (1 + 2^-9, 0) rounds to (1, 0); c = (3, 4 + 2^-6) rounds (a tie, to even) to (3, 4)
    x = torch.tensor([[[1 + 2**-9, 0.0]]])
    c = torch.tensor([[[3.0, 4 + 2**-6]]])
    assert x.bfloat16().float().tolist() == [[[1.0, 0.0]]] and c.bfloat16().float().tolist() == [[[3.0, 4.0]]]
    # the dot's error: x.c - x~.c~ = 3 (1 + 2^-9) - 3 = 3 * 2^-9, within ||x - x~|| ||c|| + ||x~|| ||c - c~||
    code_norm = math.sqrt(9 + (4 + 2**-6) ** 2)
    bound = score_error_bound(2**-9, 1 + 2**-9, 2**-6, code_norm, dim=2, cosine=True)
    assert 3 * 2**-9 <= bound
    # ||x~|| <= ||x|| + ||x - x~|| = 1 + 2^-8; accumulating two products: 2 * 2^-23 ||x~|| ||c~||
    accumulation = 2 * 2**-23 * (1 + 2**-8) * (code_norm + 2**-6)
    expected = 2**-9 * code_norm + (1 + 2**-8) * 2**-6 + accumulation
    assert bound == pytest.approx(expected * (1 + 2 * 34 * 2**-24), rel=1e-6)


def _exact_and_low_scores(x, codes, *, cosine, output_rounding, low_dtype=torch.bfloat16):
    """(exact float64 scores, the emulated low-precision float32 scores, the float32 search's scores)."""
    x_low, c_low = x.to(low_dtype).float(), codes.to(low_dtype).float()
    dots = torch.bmm(x_low, c_low.transpose(1, 2))
    if output_rounding:
        dots = dots.to(low_dtype).float()
    x64, c64 = x.double(), codes.double()
    exact_dots = torch.bmm(x64, c64.transpose(1, 2))
    if cosine:
        return -exact_dots, -dots, -torch.bmm(x, codes.transpose(1, 2))
    sq = codes.pow(2).sum(-1).unsqueeze(1)
    low = torch.add(sq, dots, alpha=-2)
    f32 = torch.baddbmm(sq, x, codes.transpose(1, 2), alpha=-2)
    return c64.pow(2).sum(-1).unsqueeze(1) - 2 * exact_dots, low, f32


def _data(kind: str, n: int, size: int, dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, codes = torch.randn(1, n, dim, generator=g), torch.randn(1, size, dim, generator=g)
    if kind == "large":
        return x * 3e4, codes * 1e4
    if kind == "anisotropic":
        scale = torch.logspace(-4, 3, dim)
        return x * scale, codes * scale
    if kind == "clustered":  # codes within 1e-3 of the first token: c - c~ is all the difference
        return x, x[:, :1] + 1e-3 * codes
    return x, codes


@pytest.mark.parametrize("dim", [3, 64, 256, 1000])
@pytest.mark.parametrize("output_rounding", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
def test_bound_holds_on_random_draws(dim, output_rounding, cosine):
    g = generator(dim)
    worst = 0.0
    for kind in ("gaussian", "large", "anisotropic", "clustered"):
        for _ in range(3):
            x, codes = _data(kind, 48, 80, dim, g)
            exact, low, f32 = _exact_and_low_scores(x, codes, cosine=cosine, output_rounding=output_rounding)
            x_low, c_low = x.bfloat16().double(), codes.bfloat16().double()
            x_error, x_norm = (x.double() - x_low).norm(dim=-1), x.double().norm(dim=-1)
            code_error = (codes.double() - c_low).norm(dim=-1).max()
            code_norm = codes.double().norm(dim=-1).max()
            bound = score_error_bound(
                x_error,
                x_norm,
                code_error,
                code_norm,
                dim=dim,
                cosine=cosine,
                output_rounding=output_rounding,
            ).unsqueeze(-1)
            error = (low.double() - exact).abs()
            assert (error <= bound).all(), f"{kind}: error {error.max()} over the bound"
            worst = max(worst, float((error / bound).max()))
            bound32 = float32_score_error_bound(x_norm, code_norm, dim=dim, cosine=cosine).unsqueeze(-1)
            assert ((f32.double() - exact).abs() <= bound32).all(), f"{kind}: float32 error over its bound"
    assert worst > 1e-3  # an upper bound, not a vacuous one


# -- the search ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize(
    ("books", "n", "size", "dim", "chunk_bytes"),
    [
        (2, 700, 300, 64, 2**18),
        (3, 257, 37, 3, 2**20),
        (1, 2**16, 200, 16, 2**24),
        (2, 100, 1000, 256, 2**21),
    ],
)
def test_indices_equal_float32_search_on_random_data(cosine, books, n, size, dim, chunk_bytes):
    g = generator(n + size)
    x, codes = torch.randn(books, n, dim, generator=g), torch.randn(books, size, dim, generator=g)
    if cosine:
        x, codes = F.normalize(x, dim=-1), F.normalize(codes, dim=-1)
    before = (x.clone(), codes.clone())
    # all but the second span several chunks (a token's scores and candidates take 4 B (K + 16 d) bytes)
    indices, stats = nearest_certified_with_stats(x, codes, cosine=cosine, chunk_bytes=chunk_bytes)
    assert indices.dtype == torch.int64 and indices.shape == (books, n)
    assert torch.equal(indices, nearest(x, codes, cosine=cosine))
    # random data falls back only for float32 near-ties (two scores within about 1e-5 of each other)
    assert stats.tokens == books * n and stats.fallback_tokens <= books * n // 1000 + 1
    assert torch.equal(x, before[0]) and torch.equal(codes, before[1])


@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("output_rounding", [False, True])
def test_dtypes_and_output_rounding_keep_float32_indices(low_dtype, output_rounding):
    g = generator(5)
    x, codes = torch.randn(2, 500, 32, generator=g), torch.randn(2, 130, 32, generator=g)
    got = nearest_certified(x, codes, cosine=False, low_dtype=low_dtype, output_rounding=output_rounding)
    assert torch.equal(got, nearest(x, codes, cosine=False))


@pytest.mark.parametrize("chunk_bytes", [1, 5000, 2**30])
def test_chunking_does_not_change_the_indices(chunk_bytes):
    g = generator(6)
    x, codes = torch.randn(2, 45, 8, generator=g), torch.randn(2, 70, 8, generator=g)
    got = nearest_certified(x, codes, cosine=False, candidates=4, chunk_bytes=chunk_bytes)
    assert torch.equal(got, nearest(x, codes, cosine=False))


def _low_precision_argmin(x, codes, *, cosine):
    return _exact_and_low_scores(x, codes, cosine=cosine, output_rounding=False)[1].argmin(-1)


def _rings(centres: torch.Tensor, radii: list[float], g: torch.Generator) -> torch.Tensor:
    """For every centre (a row), codes ``centre + r u`` at the given radii, ``u`` a random unit vector
    orthogonal to the centre (so that normalising keeps the order for cosine codebooks), shuffled."""
    rings = []
    for centre in centres:
        u = torch.randn(len(radii), centre.shape[0], generator=g)
        u = F.normalize(u - (u @ centre).unsqueeze(1) * centre / centre.dot(centre), dim=-1)
        ring = centre + torch.tensor(radii).unsqueeze(1) * u
        rings.append(ring[torch.randperm(len(radii), generator=g)])
    return torch.cat(rings)


@pytest.mark.parametrize("cosine", [False, True])
def test_near_ties_below_bf16_resolution_are_ranked_in_float32(cosine):
    # every token has six codes at distances 0.3, 0.4, ... 0.8 (cosine: angles 0.03 ... 0.08): squared
    # distances 0.07 apart, bounds of the low-precision score error several units wide (cosine: 1e-3 apart,
    # error 3e-3), float32's own error 3e-3 at most (cosine: 2e-6); the other codes lie far away
    g = generator(7)
    dim, tokens = 32, 40
    x = torch.randn(tokens, dim, generator=g) * 4
    radii = [0.3 + 0.1 * j for j in range(6)]
    if cosine:
        x, radii = F.normalize(x, dim=-1), [r / 10 for r in radii]
    codes = torch.cat([_rings(x, radii, g), torch.randn(100, dim, generator=g) * 4])[None]
    x = x[None]
    if cosine:
        codes = F.normalize(codes, dim=-1)
    indices, stats = nearest_certified_with_stats(x, codes, cosine=cosine, candidates=16)
    expected = nearest(x, codes, cosine=cosine)
    assert torch.equal(indices, expected)
    assert stats.fallback_tokens == 0  # six codes in the window, sixteen candidates: the re-rank decides
    assert (_low_precision_argmin(x, codes, cosine=cosine) != expected).sum() >= tokens // 4


@pytest.mark.parametrize("cosine", [False, True])
def test_windows_wider_than_the_candidates_fall_back_to_float32(cosine):
    # 40 codes around each of 12 tokens, squared distances 0.012 or more apart, all inside the window: more
    # than the 16 candidates; 30 more tokens sit next to isolated codes and are certified
    g = generator(8)
    dim, tokens = 16, 12
    x = torch.randn(tokens, dim, generator=g) * 3
    radii = [0.3 + 0.02 * j for j in range(40)]
    if cosine:
        x, radii = F.normalize(x, dim=-1), [r / 10 for r in radii]
    isolated = torch.randn(30, dim, generator=g) * 30
    codes = torch.cat([_rings(x, radii, g), isolated])[None]
    x = torch.cat([x, isolated + 0.1 * torch.randn(30, dim, generator=g)])[None]
    if cosine:
        x, codes = F.normalize(x, dim=-1), F.normalize(codes, dim=-1)
    indices, stats = nearest_certified_with_stats(x, codes, cosine=cosine, candidates=16)
    expected = nearest(x, codes, cosine=cosine)
    assert torch.equal(indices, expected)
    assert (_low_precision_argmin(x, codes, cosine=cosine) != expected).any()
    assert stats.fallback_tokens == tokens


def _codes_at_offsets(x: torch.Tensor, offsets: list[list[float]], g: torch.Generator) -> torch.Tensor:
    """For every token (float64 rows of x), codes whose squared distances to it are ``1 + offset`` (so
    their scores ``|x - c|^2 - |x|^2`` are the first one's plus ``offset``), in float32."""
    codes = []
    for token, token_offsets in zip(x, offsets, strict=True):
        u = F.normalize(torch.randn(len(token_offsets), x.shape[1], generator=g, dtype=torch.float64), dim=-1)
        codes.append(token + torch.tensor(token_offsets, dtype=torch.float64).add(1).sqrt().unsqueeze(1) * u)
    return torch.cat(codes).float()


def _public_windows(x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of x (N, d): the low-precision window ``2 (E_low + E_32)`` and the float32 one ``4 E_32``,
    from the public bounds."""
    dim = x.shape[1]
    x_error, x_norm = (x.double() - x.bfloat16().double()).norm(dim=-1), x.double().norm(dim=-1)
    code_error = (codes.double() - codes.bfloat16().double()).norm(dim=-1).max()
    code_norm = codes.double().norm(dim=-1).max()
    f32 = float32_score_error_bound(x_norm, code_norm, dim=dim, cosine=False)
    low = score_error_bound(x_error, x_norm, code_error, code_norm, dim=dim, cosine=False)
    return 2 * (low + f32), 4 * f32


def test_the_windows_have_the_width_of_the_public_bounds():
    # four tokens far apart, three codes each at score offsets 0, a and b from the nearest, where W is the
    # low-precision window and T the float32 one: a third candidate at 0.7 W can still be the answer (fall
    # back), at 1.5 W it cannot; a runner-up at 0.7 T may be a float32 tie (fall back), at 3 T it is not
    g = generator(15)
    x = torch.randn(4, 64, generator=g, dtype=torch.float64) * 2
    windows = torch.ones(4), torch.ones(4)
    for _ in range(3):  # the windows depend on the codes' norms, which depend on the offsets: iterate
        w, t = windows
        offsets = [[0, 0.3 * w[0], 0.7 * w[0]], [0, 0.3 * w[1], 1.5 * w[1]], [0, 0.7 * t[2], 3 * w[2]]]
        offsets = [[float(v) for v in row] for row in [*offsets, [0, 3 * t[3], 3 * w[3]]]]
        codes = _codes_at_offsets(x, offsets, g)
        windows = _public_windows(x.float(), codes)
    w, t = windows
    assert float(t[2]) < 0.1 * float(w[2])  # T is far below W: the runner-up sits inside W
    indices, stats = nearest_certified_with_stats(x.float()[None], codes[None], cosine=False, candidates=3)
    assert indices.tolist() == [[0, 3, 6, 9]] == nearest(x.float()[None], codes[None], cosine=False).tolist()
    assert stats.fallback_tokens == 2  # tokens 0 and 2


def test_every_token_falls_back_with_one_candidate():
    g = generator(9)
    x, codes = torch.randn(3, 50, 8, generator=g), torch.randn(3, 20, 8, generator=g)
    indices, stats = nearest_certified_with_stats(x, codes, cosine=False, candidates=1)
    assert torch.equal(indices, nearest(x, codes, cosine=False))
    assert stats == CertifiedStats(150, 150)  # one candidate never leaves a window of width > 0 behind it


def test_candidates_covering_the_codebook_rescore_every_code():
    g = generator(10)
    x, codes = torch.randn(2, 60, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    codes[:, 3] = codes[:, 1]  # an exact tie: those tokens go to the float32 search, which takes the lowest
    x[:, :10] = codes[:, 1:2] + 1e-6
    indices, stats = nearest_certified_with_stats(x, codes, cosine=False, candidates=16)
    assert torch.equal(indices, nearest(x, codes, cosine=False))
    assert (indices[:, :10] == 1).all() and stats.fallback_tokens == (indices == 1).sum() >= 20


@pytest.mark.parametrize("cosine", [False, True])
def test_float32_near_ties_are_left_to_the_float32_search(cosine):
    # code 4 is code 2 moved by one float32 step in one feature: their scores differ by less than float32's
    # rounding of them, so which one nearest picks depends on its summation order: that token falls back
    g = generator(14)
    codes = torch.randn(1, 12, 64, generator=g)
    if cosine:
        codes = F.normalize(codes, dim=-1)
    codes[0, 4] = codes[0, 2]
    codes[0, 4, 0] = torch.nextafter(codes[0, 2, 0], torch.tensor(10.0))
    x = torch.stack([codes[0, 2] + 1e-2 * torch.randn(64, generator=g), codes[0, 7] + 0.1])[None]
    indices, stats = nearest_certified_with_stats(x, codes, cosine=cosine)
    assert torch.equal(indices, nearest(x, codes, cosine=cosine))
    assert stats.fallback_tokens == 1 and indices[0, 1] == 7


@pytest.mark.parametrize("candidates", [2, 16])
@pytest.mark.parametrize("cosine", [False, True])
def test_exact_float32_ties_go_to_the_lowest_index(candidates, cosine):
    # codes 5, 17 and 40 are equal and nearest to the first tokens; codes 60..62 are permutations of one
    # integer vector, equally near x = (1, ..., 1) * s (integer sums: exact in every order)
    g = generator(11)
    codes = torch.randn(1, 64, 6, generator=g) * 3
    codes[0, 17] = codes[0, 5]
    codes[0, 40] = codes[0, 5]
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) * 10
    codes[0, 60], codes[0, 61], codes[0, 62] = base[[5, 1, 2, 3, 4, 0]], base, base[[1, 0, 2, 3, 4, 5]]
    x = torch.cat([codes[:, 5:6] + 1e-3 * torch.randn(1, 8, 6, generator=g), torch.full((1, 2, 6), 35.0)], 1)
    got = nearest_certified(x, codes, cosine=cosine, candidates=candidates)
    assert torch.equal(got, nearest(x, codes, cosine=cosine))
    if not cosine:
        assert got[0, :8].tolist() == [5] * 8 and got[0, 8:].tolist() == [60, 60]


# -- a bfloat16-output kernel ----------------------------------------------------------------------------

# x and the codes are bfloat16 numbers (no input rounding at all), so only the GEMM's output rounding moves
# the scores: it makes code 2, the float32 search's answer, the worst of the three at low precision
CRAFTED_X = torch.tensor([[[12.0, 10.0]]])
CRAFTED_CODES = torch.tensor([[[9.75, 8.25], [9.5, 8.75], [9.25, 10.0]]])


def test_crafted_case_needs_the_output_rounding_term():
    x, codes = CRAFTED_X, CRAFTED_CODES
    exact, low, _ = _exact_and_low_scores(x, codes, cosine=False, output_rounding=True)
    assert exact[0, 0].tolist() == [-235.875, -236.1875, -236.4375]  # code 2 is nearest
    assert low[0, 0].tolist() == [-236.875, -237.1875, -236.4375]  # but last at low precision
    x_norm, code_norm = float(x.norm()), float(codes.norm(dim=-1).max())

    def window(output_rounding: bool) -> float:
        low_bound = score_error_bound(
            0.0, x_norm, 0.0, code_norm, dim=2, cosine=False, output_rounding=output_rounding
        )
        return 2 * (low_bound + float32_score_error_bound(x_norm, code_norm, dim=2, cosine=False))

    # with two candidates (codes 1 and 0), the second lies 0.3125 above the best: a window without the output
    # term would certify them and the re-rank would answer 1; with the term, the token falls back
    gap = float(low[0, 0, 0] - low[0, 0, 1])
    assert window(False) < gap < window(True)
    indices, stats = nearest_certified_with_stats(x, codes, cosine=False, candidates=2, output_rounding=True)
    assert indices.tolist() == [[2]] and stats.fallback_tokens == 1
    assert nearest(x, codes, cosine=False).tolist() == [[2]]


# -- non-finite, empty and bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
def test_non_finite_tokens_get_nearests_index(cosine):
    g = generator(12)
    x, codes = torch.randn(2, 30, 8, generator=g), torch.randn(2, 25, 8, generator=g)
    x[0, 3, 2] = float("nan")
    x[1, 7, 0] = float("inf")
    x[0, 10] = float("-inf")
    codes[1, 4, 0] = 0.0  # inf * 0 = NaN in token (1, 7)'s score for code 4
    indices, stats = nearest_certified_with_stats(x, codes, cosine=cosine)
    expected = nearest(x, codes, cosine=cosine)
    assert torch.equal(indices, expected)
    assert indices[0, 3] == 0  # a NaN token: argmin's first NaN, code 0
    assert stats.fallback_tokens == 3


def test_a_non_finite_code_sends_every_token_to_the_float32_search():
    g = generator(13)
    x, codes = torch.randn(1, 20, 4, generator=g), torch.randn(1, 10, 4, generator=g)
    codes[0, 6, 1] = float("nan")
    indices, stats = nearest_certified_with_stats(x, codes, cosine=False)
    assert torch.equal(indices, nearest(x, codes, cosine=False))
    assert stats == CertifiedStats(20, 20)


def test_empty_input():
    indices, stats = nearest_certified_with_stats(torch.zeros(2, 0, 4), torch.randn(2, 3, 4), cosine=False)
    assert indices.shape == (2, 0) and indices.dtype == torch.int64 and stats == CertifiedStats(0, 0)


@pytest.mark.parametrize(
    ("x", "codes", "options", "error", "message"),
    [
        ([[[1.0]]], torch.zeros(1, 2, 1), {}, TypeError, "x must be a torch.Tensor, got list"),
        (
            torch.zeros(1, 2, 3, dtype=torch.float64),
            torch.zeros(1, 2, 3),
            {},
            ValueError,
            "x must be float32, got torch.float64",
        ),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 3).half(),
            {},
            ValueError,
            "codes must be float32, got torch.float16",
        ),
        (torch.zeros(2, 3), torch.zeros(1, 2, 3), {}, ValueError, r"x must be \(B, N, d\) .* got x \(2, 3\)"),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 4),
            {},
            ValueError,
            r"agree on B and d; got x \(1, 2, 3\) and codes \(1, 2, 4\)",
        ),
        (torch.zeros(2, 2, 3), torch.zeros(1, 2, 3), {}, ValueError, "agree on B and d"),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 0, 3),
            {},
            ValueError,
            r"at least one code, got shape \(1, 0, 3\)",
        ),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 3),
            {"low_dtype": torch.float32},
            ValueError,
            "low_dtype must be torch.bfloat16 or torch.float16, got torch.float32",
        ),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 3),
            {"candidates": 0},
            ValueError,
            "candidates must be >= 1, got 0",
        ),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 3),
            {"candidates": 2.0},
            TypeError,
            r"candidates must be an int, got float \(2.0\)",
        ),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 3),
            {"chunk_bytes": -1},
            ValueError,
            "chunk_bytes must be >= 1, got -1",
        ),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 3),
            {"emulate": 1},
            TypeError,
            "emulate must be None or a bool, got int",
        ),
        (
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, 3),
            {"emulate": False},
            ValueError,
            "emulate=False needs a CUDA device .* got cpu",
        ),
    ],
)
def test_bad_input_names_what_was_expected(x, codes, options, error, message):
    with pytest.raises(error, match=message):
        nearest_certified(x, codes, cosine=False, **options)
