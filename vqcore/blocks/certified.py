"""Certified low-precision nearest-code search: the GEMM in bfloat16, the indices of the float32 search.

:func:`nearest_certified` returns the indices of :func:`vqcore.blocks.distance.nearest` (scores
``||c||^2 - 2 x.c``, or ``-x.c`` for cosine codebooks, argmin, ties to the lowest index) while its
(tokens x codes) GEMM runs with bfloat16 inputs, which tensor cores multiply many times faster than float32.

**The bound.** With ``x~ = bf16(x)`` and ``c~ = bf16(c)``,
``x.c - x~.c~ = (x - x~).c + x~.(c - c~)``, so by Cauchy-Schwarz
``|x.c - x~.c~| <= ||x - x~|| ||c|| + ||x~|| ||c - c~||``, from the rounding errors of this very call (not a
worst case). Products of two bfloat16 numbers (8-bit significands) are exact in float32, so the GEMM only
adds its float32 accumulation, at most ``gamma_d ||x~|| ||c~||`` with ``gamma_d = d u / (1 - d u)`` for any
summation order; ``u = 2^-23`` here, twice float32's unit roundoff, because tensor cores may truncate
rather than round while accumulating. A kernel with a bfloat16 output adds ``2^-8 |x~.c~|`` (emulated
by ``output_rounding=True``); inputs a kernel flushes to zero (subnormals) add
``sqrt(d) tiny (||x~|| + ||c~||)``.
The Euclidean score doubles the dot's error and adds the float32 rounding of ``||c||^2`` (``gamma_d ||c||^2``)
and of ``||c||^2 - 2 G`` (one float32 rounding). :func:`score_error_bound` is that bound ``E_low``;
:func:`float32_score_error_bound` is ``E_32``, the same for the float32 search's own scores (any summation
order), so that the result is the float32 search's and not merely the exact-arithmetic one. Both are
evaluated in float32 and inflated to stay upper bounds despite that (a relative ``2 (d + 32) 2^-24`` and an
absolute ``(d + 8) 2^-124`` for underflow).

**Per token, not per code.** ``E_x`` uses the largest ``||c||``, ``||c - c~||`` and ``||c||^2`` of the
codebook, so it is one scalar per token, affine in ``||x - x~||`` and ``||x||`` (two norms, two fused
multiply-adds), and the window test below is one comparison per token. A per-code bound would need a
second (tokens x codes) pass in the hot loop; its only gain is a narrower window when code norms differ
widely, and a window too wide costs a fallback, never a wrong index.

**The re-rank.** A code ``c`` can be the float32 search's answer only if its low-precision score is within
``2 (E_low + E_32)`` of the lowest low-precision score. Every token takes its ``candidates`` lowest
low-precision scores (``topk``) and rescores them in float32 by the float32 search's formula (a gather and
a batched dot). It is certified when (1) its ``candidates``-th lowest low-precision score lies beyond that
window, so no code outside the candidates can win, and (2) its best rescored code leads the next by more
than ``4 E_32``, so every float32 evaluation of the scores, ``nearest``'s whatever its summation order,
ranks that code first. The others are searched again by :func:`~vqcore.blocks.distance.nearest` itself:
more codes inside the window than candidates, float32 near-ties and exact ties (which ``nearest`` gives the
lowest index), NaN or infinite tokens or codes, overflow. Tokens go in chunks whose score block and
gathered candidates stay under ``chunk_bytes``.

**Identity with nearest.** Certified tokens get ``nearest``'s index by the argument above; the others get
``nearest``'s own answer, computed on those tokens alone (identical unless ``nearest``'s kernel rounds a
token's scores differently in a smaller batch, which could only change a float32 near-tie). ``nearest``
must be a float32 search: TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``) make it another one.

**Sync.** One host synchronisation per call: the ``nonzero`` of the uncertified tokens, after all chunks
are queued. When it is empty (the common case) that is all; otherwise it costs a few more (one per book)
and a float32 search of just those tokens. A sync-free variant would need a fixed capacity for the
fallback (``nonzero_static``) and a sync anyway to detect its overflow.

**When to use it.** On a CUDA device with bfloat16 tensor cores, for codebooks large enough that the GEMM
dominates. On the CPU the low-precision GEMM is emulated exactly (``emulate``: inputs rounded to bfloat16,
float32 products and accumulation, optionally a bfloat16 output), which is slower than the float32
search: it exists to test the certificate, not for production.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vqcore.blocks.distance import DEFAULT_CHUNK_BYTES, nearest

# float32's unit roundoff (round to nearest), and the accumulation unit allowed to a low-precision GEMM's
# float32 accumulator (twice it: tensor cores' adders may truncate)
FLOAT32_UNIT = 2.0**-24
ACCUMULATION_UNIT = 2.0**-23
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
# unit roundoff of a low-precision output and the smallest normal number of each supported input dtype
_LOW_DTYPES = {
    torch.bfloat16: (2.0**-8, torch.finfo(torch.bfloat16).tiny),
    torch.float16: (2.0**-11, torch.finfo(torch.float16).tiny),
}
_CODE_SLICE_BYTES = 2**22
# what a codebook's ``search_dtype`` may be: a low-precision dtype of this search, or None (float32 search)
CERTIFIED_DTYPES = frozenset({None, *_LOW_DTYPES})

# a bound's inputs and value: one number, or a tensor of them (one per token, or per book)
NumberOrTensor = float | Tensor


def _gamma(terms: int, unit: float) -> float:
    """``n u / (1 - n u)``: the relative error bound of a sum of ``n`` rounded terms (any order)."""
    return terms * unit / (1.0 - terms * unit)


def _relative_inflation(dim: int) -> float:
    """Relative error of a bound's own float32 evaluation (norms of length ``dim``, products, sums and the
    window comparison stay below ``(dim + 32) 2^-24``), doubled."""
    return 2.0 * (dim + 32) * FLOAT32_UNIT


def _absolute_inflation(dim: int) -> float:
    """More than underflow (subnormal or flushed results of the GEMM's ``dim`` products and sums, a
    low-precision output) can take from a score or its bound."""
    return (dim + 8) * 2.0**-124


def _inflate(bound: NumberOrTensor, dim: int) -> NumberOrTensor:
    """``bound`` made safe against its own float32 evaluation and against underflow."""
    return bound * (1.0 + _relative_inflation(dim)) + _absolute_inflation(dim)


class _AffineBound(NamedTuple):
    """A bound ``per_error * x_error + per_norm * x_norm + constant`` (before :func:`_inflate`)."""

    per_error: NumberOrTensor
    per_norm: NumberOrTensor
    constant: NumberOrTensor


def _low_bound_terms(
    code_error: NumberOrTensor,
    code_norm: NumberOrTensor,
    *,
    dim: int,
    cosine: bool,
    low_dtype: torch.dtype,
    output_rounding: bool,
) -> _AffineBound:
    """:func:`score_error_bound`'s formula, grouped by ``x_error`` and ``x_norm``: every term is one of them
    times a codebook quantity, or a codebook constant, so the search evaluates it with two fused
    multiply-adds per token. With ``X~ = x_norm + x_error``, ``P = code_error + sqrt(d) tiny + (ga + uo (1 +
    ga)) C~`` the dot's error is ``x_error code_norm + X~ P + sqrt(d) tiny C~``."""
    output_unit, tiny = _LOW_DTYPES[low_dtype]
    output_unit = output_unit if output_rounding else 0.0
    ga, g = _gamma(dim, ACCUMULATION_UNIT), _gamma(dim, FLOAT32_UNIT)
    code_low, flushed = code_norm + code_error, math.sqrt(dim) * tiny
    per_low = code_error + flushed + (ga + output_unit * (1.0 + ga)) * code_low
    if cosine:
        return _AffineBound(code_norm + per_low, per_low, flushed * code_low)
    # the float32 rounding of ||c||^2 - 2 G: 2^-24 ((1 + g) ||c||^2 + 2 (1 + uo) (1 + ga) X~ C~)
    combine = 2.0 * FLOAT32_UNIT * (1.0 + output_unit) * (1.0 + ga) * code_low
    code_sq = code_norm * code_norm
    return _AffineBound(
        2.0 * (code_norm + per_low) + combine,
        2.0 * per_low + combine,
        2.0 * flushed * code_low + (g + FLOAT32_UNIT * (1.0 + g)) * code_sq,
    )


def _float32_bound_terms(code_norm: NumberOrTensor, *, dim: int, cosine: bool) -> _AffineBound:
    """:func:`float32_score_error_bound`'s formula, grouped as :func:`_low_bound_terms`."""
    g = _gamma(dim, FLOAT32_UNIT)
    if cosine:
        return _AffineBound(0.0, g * code_norm, 0.0)
    g_next = _gamma(dim + 1, FLOAT32_UNIT)
    return _AffineBound(0.0, 2.0 * g_next * code_norm, (g + g_next * (1.0 + g)) * code_norm * code_norm)


def score_error_bound(
    x_error: NumberOrTensor,
    x_norm: NumberOrTensor,
    code_error: NumberOrTensor,
    code_norm: NumberOrTensor,
    *,
    dim: int,
    cosine: bool,
    low_dtype: torch.dtype = torch.bfloat16,
    output_rounding: bool = False,
) -> NumberOrTensor:
    """Upper bound ``E_low`` on ``|s_low(x, c) - s(x, c)|`` for every code c of a codebook: ``s`` the exact
    score (``||c||^2 - 2 x.c``, or ``-x.c`` if ``cosine``), ``s_low`` the one :func:`nearest_certified`
    computes from a GEMM of ``low_dtype`` inputs with float32 accumulation.

    ``x_error >= ||x - x~||`` and ``x_norm >= ||x||`` (floats or tensors of any shape: one value per token);
    ``code_error >= max ||c - c~||`` and ``code_norm >= max ||c||`` over the codebook; ``x~``, ``c~`` the
    values rounded to ``low_dtype``; ``output_rounding``: the GEMM's output is rounded to ``low_dtype``.
    With ``X~ = x_norm + x_error >= ||x~||``, ``C~ = code_norm + code_error >= ||c~||``,
    ``ga = gamma_d(2^-23)``, ``g = gamma_d(2^-24)``, ``uo`` the output's unit roundoff (0 without output
    rounding), ``tiny`` the smallest normal number of ``low_dtype``, ``G = (1 + ga) X~ C~`` (bounds the
    GEMM's output):

    - dot: ``e = x_error code_norm + X~ code_error + sqrt(d) tiny (X~ + C~) + ga X~ C~ + uo G``;
    - cosine: ``E = e``; Euclidean: ``E = 2 e + g code_norm^2 + 2^-24 ((1 + g) code_norm^2 + 2 (1 + uo) G)``;

    then inflated by ``(1 + 2 (d + 32) 2^-24)`` plus ``(d + 8) 2^-124`` (its own float32 evaluation).
    """
    terms = _low_bound_terms(
        code_error, code_norm, dim=dim, cosine=cosine, low_dtype=low_dtype, output_rounding=output_rounding
    )
    return _inflate(terms.per_error * x_error + terms.per_norm * x_norm + terms.constant, dim)


def float32_score_error_bound(
    x_norm: NumberOrTensor, code_norm: NumberOrTensor, *, dim: int, cosine: bool
) -> NumberOrTensor:
    """Upper bound ``E_32`` on ``|s_32(x, c) - s(x, c)|``: the error of a float32 evaluation of the score in
    any summation order (the float32 search's GEMM, or this module's rescoring), for ``x_norm >= ||x||`` and
    ``code_norm >= max ||c||``; ``g_n = gamma_n(2^-24)``.

    Cosine: ``g_d x_norm code_norm``; Euclidean: ``g_d code_norm^2`` (the squared norm) ``+ g_(d+1) ((1 + g_d)
    code_norm^2 + 2 x_norm code_norm)`` (d products and the norm summed); inflated as
    :func:`score_error_bound`.
    """
    terms = _float32_bound_terms(code_norm, dim=dim, cosine=cosine)
    return _inflate(terms.per_norm * x_norm + terms.constant, dim)


class CertifiedStats(NamedTuple):
    """What a :func:`nearest_certified_with_stats` call did: ``tokens`` searched (B x N) and how many of
    them were not certified and went to the float32 search (``fallback_tokens``)."""

    tokens: int
    fallback_tokens: int


def _norm_floor(dim: int) -> float:
    """What float32 underflow can take from a computed norm of ``dim`` entries: squares rounded or flushed
    to 0 lose less than ``dim * tiny`` (float32's smallest normal number) from the sum of squares, so
    ``||v|| <= computed + sqrt(dim * tiny)`` (up to the relative rounding the inflation covers)."""
    return math.sqrt(dim * _FLOAT32_TINY)


class _LowCodes(NamedTuple):
    gemm: Tensor  # (B, K, d): the codes rounded to the low dtype (as float32 values when emulating)
    sq: Tensor  # (B, K) float32 ||c||^2, the float32 search's formula
    norm: Tensor  # (B, 1) max ||c|| per book, raised past underflow
    error: Tensor  # (B, 1) max ||c - c~|| per book, raised past underflow


def _low_codes(codes: Tensor, low_dtype: torch.dtype, emulate: bool) -> _LowCodes:
    """The codebook rounded to ``low_dtype`` with its norms, over slices of codes so that no float32
    temporary is as large as the codebook."""
    books, size, dim = codes.shape
    gemm = codes.new_empty(codes.shape, dtype=torch.float32 if emulate else low_dtype)
    sq, error = codes.new_empty(books, size), codes.new_empty(books, size)
    step = max(256, _CODE_SLICE_BYTES // (4 * books * dim))
    for start in range(0, size, step):
        part, rows = codes[:, start : start + step], slice(start, start + step)
        low = part.to(low_dtype).float()
        gemm[:, rows] = low
        sq[:, rows] = part.pow(2).sum(-1)
        error[:, rows] = torch.linalg.vector_norm(part - low, dim=-1)
    floor = _norm_floor(dim)
    norm = sq.amax(-1, keepdim=True).sqrt() + floor
    return _LowCodes(gemm, sq, norm, error.amax(-1, keepdim=True) + floor)


class _Windows(NamedTuple):
    """Per book (B, 1) float32, the two windows of a token as affine functions of its computed
    ``||x - x~||`` and ``||x||`` (their underflow floor folded into the constants): the low-precision
    window ``2 (E_low + E_32) = per_error ||x - x~|| + per_norm ||x|| + constant`` and the float32 one
    ``4 E_32 = tie_per_norm ||x|| + tie_constant``."""

    per_error: Tensor
    per_norm: Tensor
    constant: Tensor
    tie_per_norm: Tensor
    tie_constant: Tensor


def _windows(
    low: _LowCodes, *, dim: int, cosine: bool, low_dtype: torch.dtype, output_rounding: bool
) -> _Windows:
    """:class:`_Windows` for this codebook: :func:`score_error_bound` and :func:`float32_score_error_bound`
    with the codebook's quantities in, inflated as they are."""
    low_terms = _low_bound_terms(
        low.error, low.norm, dim=dim, cosine=cosine, low_dtype=low_dtype, output_rounding=output_rounding
    )
    f32_terms = _float32_bound_terms(low.norm, dim=dim, cosine=cosine)
    floor, relative, absolute = _norm_floor(dim), 1.0 + _relative_inflation(dim), _absolute_inflation(dim)
    per_error = 2.0 * relative * low_terms.per_error
    per_norm = 2.0 * relative * (low_terms.per_norm + f32_terms.per_norm)
    constant = 2.0 * relative * (low_terms.constant + f32_terms.constant) + 4.0 * absolute
    tie_per_norm = 4.0 * relative * f32_terms.per_norm
    tie_constant = 4.0 * relative * f32_terms.constant + 4.0 * absolute
    terms = (
        per_error,
        per_norm,
        constant + (per_error + per_norm) * floor,
        tie_per_norm,
        tie_constant + tie_per_norm * floor,
    )
    return _Windows(*(torch.as_tensor(t, dtype=torch.float32, device=low.norm.device) for t in terms))


def _low_gemm(
    x_low: Tensor, codes_t: Tensor, low_dtype: torch.dtype, *, emulate: bool, output_rounding: bool
):
    """(B, m, K) float32 ``x~ . c~`` for x~ (B, m, d) and codes_t (B, d, K) (as float32 values when
    emulating). A low-precision output is modelled by rounding the float32 one (on CUDA too: torch's
    bfloat16-output GEMMs may also reduce in bfloat16, ``allow_bf16_reduced_precision_reduction``)."""
    if emulate:  # products of low-precision values are exact in float32: only the accumulation rounds
        dots = torch.bmm(x_low.float(), codes_t)
    else:
        dots = torch.bmm(x_low, codes_t, out_dtype=torch.float32)
    return dots.to(low_dtype).float() if output_rounding else dots


def _check(x, codes, low_dtype, candidates, chunk_bytes, emulate) -> bool:
    """Validates the arguments of :func:`nearest_certified_with_stats`; returns whether to emulate."""
    for name, value in (("x", x), ("codes", codes)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {value.dtype}")
    if x.dim() != 3 or codes.dim() != 3:
        raise ValueError(
            f"x must be (B, N, d) and codes (B, K, d); got x {tuple(x.shape)} and codes {tuple(codes.shape)}"
        )
    if x.shape[0] != codes.shape[0] or x.shape[2] != codes.shape[2]:
        raise ValueError(
            "x (B, N, d) and codes (B, K, d) must agree on B and d; "
            f"got x {tuple(x.shape)} and codes {tuple(codes.shape)}"
        )
    if codes.shape[1] == 0:
        raise ValueError(f"codes must hold at least one code, got shape {tuple(codes.shape)}")
    if x.device != codes.device:
        raise ValueError(f"x and codes must be on one device, got {x.device} and {codes.device}")
    if low_dtype not in _LOW_DTYPES:
        raise ValueError(f"low_dtype must be torch.bfloat16 or torch.float16, got {low_dtype}")
    for name, value in (("candidates", candidates), ("chunk_bytes", chunk_bytes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if x.shape[2] * ACCUMULATION_UNIT >= 0.5:
        raise ValueError(
            f"d must be below {int(0.5 / ACCUMULATION_UNIT)} for the accumulation bound, got {x.shape[2]}"
        )
    if emulate is None:
        return x.device.type != "cuda"
    if not isinstance(emulate, bool):
        raise TypeError(f"emulate must be None or a bool, got {type(emulate).__name__}")
    if not emulate and x.device.type != "cuda":
        raise ValueError(
            f"emulate=False needs a CUDA device (a low-precision GEMM with float32 output), got {x.device}"
        )
    return emulate


def nearest_certified_with_stats(
    x: Tensor,
    codes: Tensor,
    *,
    cosine: bool,
    low_dtype: torch.dtype = torch.bfloat16,
    candidates: int = 16,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    emulate: bool | None = None,
    output_rounding: bool = False,
) -> tuple[Tensor, CertifiedStats]:
    """:func:`nearest_certified`'s indices and its :class:`CertifiedStats` (how many tokens fell back)."""
    emulate = _check(x, codes, low_dtype, candidates, chunk_bytes, emulate)
    books, n, dim = x.shape
    size = codes.shape[1]
    indices = torch.empty(books, n, dtype=torch.int64, device=x.device)
    if indices.numel() == 0:
        return indices, CertifiedStats(0, 0)
    k = min(candidates, size)
    with torch.no_grad():
        low = _low_codes(codes, low_dtype, emulate)
        codes_t = low.gemm.transpose(1, 2)
        flat_codes, flat_sq = codes.reshape(books * size, dim), low.sq.reshape(-1)
        offsets = torch.arange(0, books * size, size, device=x.device).view(books, 1, 1)
        certified = torch.empty(books, n, dtype=torch.bool, device=x.device)
        window = _windows(low, dim=dim, cosine=cosine, low_dtype=low_dtype, output_rounding=output_rounding)
        # per token: a (K) score row and (k, d) gathered candidates, float32
        chunk = max(1, chunk_bytes // (4 * books * (size + k * dim)))
        for start in range(0, n, chunk):
            part, rows = x[:, start : start + chunk], slice(start, start + chunk)
            m = part.shape[1]
            part_low = part.to(low_dtype)
            x_error = torch.linalg.vector_norm(part - part_low, dim=-1)  # promoted to float32, exactly
            x_norm = torch.linalg.vector_norm(part, dim=-1)
            margin = torch.addcmul(window.constant, window.per_error, x_error).addcmul_(
                window.per_norm, x_norm
            )
            scores = _low_gemm(part_low, codes_t, low_dtype, emulate=emulate, output_rounding=output_rounding)
            if cosine:
                scores = scores.neg_()
            else:
                scores = torch.add(low.sq.unsqueeze(1), scores, alpha=-2, out=scores)
            top, where = scores.topk(k, -1, largest=False, sorted=False)
            del scores
            flat = (where + offsets).view(-1)
            dots = torch.bmm(
                flat_codes.index_select(0, flat).view(books * m, k, dim), part.reshape(-1, dim, 1)
            )
            dots = dots.view(books, m, k)
            rescored = dots.neg_() if cosine else torch.add(flat_sq[flat].view(books, m, k), dots, alpha=-2)
            indices[:, rows] = where.gather(-1, rescored.argmin(-1, keepdim=True)).squeeze(-1)
            ok = torch.isfinite(margin)
            if k < size:  # the k-th lowest low-precision score beyond the window: no other code can win
                ok &= top.amax(-1) - top.amin(-1) > margin
            if k > 1:  # the best rescored code ahead of the next by more than float32's rounding of both
                lowest = rescored.topk(2, -1, largest=False).values
                ok &= lowest[..., 1] - lowest[..., 0] > torch.addcmul(
                    window.tie_constant, window.tie_per_norm, x_norm
                )
            else:
                ok &= torch.isfinite(rescored.squeeze(-1))
            certified[:, rows] = ok
        failed = (~certified).nonzero()  # the call's one host sync
        for book in range(books) if failed.shape[0] else ():
            tokens = failed[failed[:, 0] == book, 1]
            if tokens.shape[0]:
                found = nearest(
                    x[book, tokens].unsqueeze(0),
                    codes[book : book + 1],
                    cosine=cosine,
                    chunk_bytes=chunk_bytes,
                )
                indices[book, tokens] = found[0]
    return indices, CertifiedStats(books * n, int(failed.shape[0]))


def nearest_certified(
    x: Tensor,
    codes: Tensor,
    *,
    cosine: bool,
    low_dtype: torch.dtype = torch.bfloat16,
    candidates: int = 16,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    emulate: bool | None = None,
    output_rounding: bool = False,
) -> Tensor:
    """Indices (B, N) int64 of the nearest code for x (B, N, d) float32 among codes (B, K, d) float32, those
    of :func:`~vqcore.blocks.distance.nearest` (see the module's docstring), from a GEMM in ``low_dtype``
    (bfloat16 or float16) certified and re-ranked in float32.

    ``candidates``: codes rescored per token (the window must hold fewer, or the token falls back to the
    float32 search); ``chunk_bytes``: budget of a chunk's score block and gathered candidates;
    ``emulate``: emulate the low-precision GEMM with float32 arithmetic (None: everywhere but on CUDA, the
    only device where torch offers ``bmm(..., out_dtype=torch.float32)``); ``output_rounding``: model a GEMM
    that rounds its output to ``low_dtype`` (the float32 output is rounded), which the bound covers.
    """
    return nearest_certified_with_stats(
        x,
        codes,
        cosine=cosine,
        low_dtype=low_dtype,
        candidates=candidates,
        chunk_bytes=chunk_bytes,
        emulate=emulate,
        output_rounding=output_rounding,
    )[0]
