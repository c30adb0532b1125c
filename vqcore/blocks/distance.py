"""Nearest-code search: one GEMM per chunk of tokens, never a tokens x codes matrix larger than a budget.

For Euclidean codebooks the score is ``||c||^2 - 2 x.c`` (``||x||^2`` is constant per token and
dropped); for cosine codebooks (unit vectors) it is ``-x.c``. Lower is better in both, so the search
is an ``argmin`` (ties go to the lowest index). Tokens are processed in chunks so that the score
block stays under ``chunk_bytes`` (default 16 MiB), and a codebook too large for 256 tokens per block is
split into blocks of codes whose minima are folded into a running one (:func:`score_tile`): a 2^18-code
codebook costs bounded memory and is searched at the GEMM's speed. The block is reused between chunks
(the last, shorter chunk included), which on CPU is also faster than one fresh large allocation. A block
under glibc's largest dynamic mmap threshold (32 MiB) is recycled by malloc from call to call without page
faults; larger ones are fresh mmaps every time.

The squared code norms are computed over slices of codes, so no temporary is as large as the
codebook either. The search runs under ``no_grad``: the indices carry no gradient, and ``out=`` refuses
inputs that require grad (``encode`` of a tensor that requires grad would otherwise fail on long inputs).

Under torch.export / torch.compile the search is done in one block, since a Python loop over a
symbolic number of tokens is not traceable.

On the CPU (float32, eager) each block is one oneDNN GEMM with the code norms fused in as its bias
(``x @ (-2c)^T + ||c||^2``; scaling by -2 is exact) on codes packed into oneDNN's blocked layout (once
per call, or once per codebook state: :func:`prepare_codes`), through the ops inductor itself uses for
CPU linear layers, and 4 MiB blocks that argmin reads from cache. ``baddbmm`` (MKL) would first broadcast
the bias into the block, an extra pass over it (the measured gain: benchmarks/README.md, "Why the code is
shaped this way"); the packed copy costs the codebook's size in memory once. Builds without the ops,
other devices and traced graphs use ``baddbmm``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vqcore.blocks.validation import is_tracing

DEFAULT_CHUNK_BYTES = 16 * 2**20
# score block of the fused CPU search: small enough that argmin reads it from cache right after the GEMM
# wrote it (4 MiB: 1024 tokens x 1024 codes)
_FUSED_BLOCK_BYTES = 4 * 2**20
_NORM_SLICE_BYTES = 2**20
# tokens per score block below which a codebook is split into blocks of codes (see score_tile)
TILE_MIN_ROWS = 256


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    return F.normalize(x, dim=dim, eps=1e-12)


def _scores(x: Tensor, codes_t: Tensor, code_sq_norms: Tensor | None, out: Tensor | None = None) -> Tensor:
    """Scores (B, m, K) for x (B, m, d) against codes_t (B, d, K); lower is nearer."""
    if code_sq_norms is None:  # cosine: -x.c
        return torch.baddbmm(x.new_zeros(()), x, codes_t, beta=0, alpha=-1, out=out)
    return torch.baddbmm(code_sq_norms.unsqueeze(1), x, codes_t, alpha=-2, out=out)


def _sq_norms(codes: Tensor) -> Tensor:
    """``codes.pow(2).sum(-1)`` (B, K), over slices of codes so that the temporary stays about 1 MiB
    instead of the codebook's size (64 MiB for 65536 x 256). Each row is reduced on its own, so the
    values are those of the one-shot expression (bitwise: the slow tests of tests/test_distance.py)."""
    books, size, dim = codes.shape
    step = max(256, _NORM_SLICE_BYTES // (codes.element_size() * books * dim))
    if step >= size:
        return codes.pow(2).sum(-1)
    out = codes.new_empty(books, size)
    for start in range(0, size, step):
        torch.sum(codes[:, start : start + step].pow(2), -1, out=out[:, start : start + step])
    return out


def _fused_linear():
    """``(linear, pack)``: oneDNN's ``x @ w^T + b`` with the bias fused into the GEMM, and the weight packing
    it runs fastest with (``torch.ops.mkldnn``, the ops inductor uses for CPU linear layers), or None.

    They are internal ops: a build without them, or one where they behave otherwise (torch >= 2.4 is
    supported), is detected here once, on a small problem checked against ``addmm``, and the search then
    uses ``baddbmm``.
    """
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        linear, pack = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=g) for shape in ((5, 24), (7, 24), (7,)))
        got = linear(x, pack(w, 5), b, "none", [], "")
        if got.shape == (5, 7) and torch.allclose(got, torch.addmm(b, x, w.T), rtol=1e-4, atol=1e-4):
            return linear, pack
    except Exception:  # any failure of an internal op means: do not use it
        pass
    return None


_FUSED_LINEAR = _fused_linear()


_ARGMIN_GROUP = 64


def argmin_rows(scores: Tensor, out: Tensor) -> Tensor:
    """``torch.argmin(scores, -1, out=out)`` for a (m, K) CPU block, ties to the lowest index, but faster.

    ATen's argmin runs scalar on the CPU while ``amin`` is vectorised: take the minimum of every group
    of 64 codes (amin), the first group holding the row's minimum (argmin over K/64 values), then the
    argmin inside that group. The first group holding the minimum holds its first occurrence, so the index
    is argmin's, ties and NaN (which both treat as the minimum) included. Other sizes (K not a multiple
    of 64) use argmin itself.
    """
    rows, size = scores.shape
    group = _ARGMIN_GROUP
    if size % group or size <= group:
        return torch.argmin(scores, -1, out=out)
    groups = scores.view(rows, size // group, group)
    first = groups.amin(-1).argmin(-1)
    inner = groups.gather(1, first.view(rows, 1, 1).expand(rows, 1, group)).squeeze(1).argmin(-1)
    return torch.add(inner, first, alpha=group, out=out)


class PreparedCodes(NamedTuple):
    """Codes made ready for the fused CPU search (see :func:`prepare_codes`)."""

    # per book, per block of ``cols`` codes: -2 codes (-codes for cosine) in oneDNN's blocked layout; None
    # when the codebook is larger than the search's byte budget: the search then packs block by block
    packed: tuple[tuple[Tensor, ...], ...] | None
    sq: Tensor | None  # (B, K) squared norms; None for cosine codebooks
    rows: int  # tokens per score block
    cols: int  # codes per score block (the codebook's size unless it is tiled)


def fused_search_applies(x: Tensor, codes: Tensor) -> bool:
    """Whether :func:`nearest` takes the fused oneDNN path for these tensors (CPU, float32, eager)."""
    return (
        _FUSED_LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and codes.dtype == torch.float32
        and not is_tracing()
    )


def score_tile(books: int, size: int, chunk_bytes: int, min_rows: int = TILE_MIN_ROWS) -> tuple[int, int]:
    """``(rows, cols)``: tokens and codes per score block, ``books x rows x cols`` float32 scores within
    ``chunk_bytes``. A codebook is split into blocks of codes only when fewer than ``min_rows`` tokens
    would fit a block with all of its codes: a GEMM of a few tokens against a large codebook reads the whole
    codebook for every few tokens, and is bound by memory instead of arithmetic. Blocks of codes are
    multiples of the grouped argmin's groups."""
    if books * size * 4 * min_rows <= chunk_bytes:
        cols = size
    else:
        cols = max(_ARGMIN_GROUP, chunk_bytes // (4 * books * min_rows) // _ARGMIN_GROUP * _ARGMIN_GROUP)
        cols = min(cols, size)
    return max(1, chunk_bytes // (4 * books * cols)), cols


def _pack(codes: Tensor, scale: float, rows: int) -> Tensor:
    _, pack = _FUSED_LINEAR
    return pack((codes * scale).contiguous(), rows)


def prepare_codes(codes: Tensor, *, cosine: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PreparedCodes:
    """Pack codes (B, K, d) for :func:`nearest`'s fused CPU path; a caller whose codes do not change between
    searches (an eval codebook) can keep the result and pass it as ``prepared``, saving the packing and the
    norms on every call.

    The scale goes into the packed copy: (-2c) is exact, so the scores are those of ``||c||^2 - 2 x.c``.
    Books are packed one block at a time: the transient scaled copy is one block's size. A codebook larger
    than ``chunk_bytes`` is not packed here (a copy of it would double the memory the codes take): the search
    packs each block of codes as it reaches it.
    """
    books, size, _ = codes.shape
    rows, cols = score_tile(1, size, min(chunk_bytes, _FUSED_BLOCK_BYTES))
    if cols < size:  # a codebook searched in blocks of codes: larger tiles, fewer running-minimum merges
        rows, cols = score_tile(1, size, chunk_bytes, min_rows=2 * TILE_MIN_ROWS)
    scale = -1.0 if cosine else -2.0
    with torch.no_grad():
        packed = None
        if codes.numel() * codes.element_size() <= chunk_bytes:
            packed = tuple(
                tuple(_pack(book[start : start + cols], scale, rows) for start in range(0, size, cols))
                for book in codes
            )
        sq = None if cosine else _sq_norms(codes)
    return PreparedCodes(packed, sq, rows, cols)


def _merge_min(scores: Tensor, best: Tensor, best_index: Tensor, offset: int) -> None:
    """Fold a score block (..., m, k) of codes ``offset .. offset + k`` into the running minimum ``best``
    (..., m) and its index ``best_index`` (..., m), in place. Blocks come in increasing code order and only
    a strictly lower score (or a first NaN, which argmin treats as the minimum) replaces the running one, so
    the result is ``argmin`` over all codes, ties to the lowest index."""
    *lead, size = scores.shape
    group = _ARGMIN_GROUP
    if size % group or size <= group:
        value, index = scores.min(-1)
    else:
        groups = scores.view(*lead, size // group, group)
        value, first = groups.amin(-1).min(-1)
        where = first.view(*lead, 1, 1).expand(*lead, 1, group)
        index = groups.gather(-2, where).squeeze(-2).argmin(-1).add_(first, alpha=group)
    better = (value < best) | (value.isnan() & ~best.isnan())
    best.copy_(torch.where(better, value, best))
    best_index.copy_(torch.where(better, index + offset, best_index))


def _nearest_fused(
    x: Tensor, codes: Tensor, cosine: bool, prepared: PreparedCodes, scored: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`nearest_scored` on the CPU: per book and block of tokens (and of codes, for large codebooks),
    one fused oneDNN GEMM and a grouped argmin. With blocks of codes the loop runs over codes outside and
    tokens inside, so that each block of codes is packed (when it is not prepared) and read from memory
    once. The scores are kept only when ``scored`` or the codebook is split."""
    linear, _ = _FUSED_LINEAR
    books, n = x.shape[:2]
    size = codes.shape[1]
    rows, cols = prepared.rows, prepared.cols
    scale = -1.0 if cosine else -2.0
    running = scored or cols < size
    indices = (torch.zeros if running else torch.empty)(books, n, dtype=torch.int64, device=x.device)
    best = x.new_full((books, n), float("inf")) if running else None
    for b in range(books):
        book = x[b].contiguous()
        for block, start in enumerate(range(0, size, cols)):
            weight = (
                _pack(codes[b, start : start + cols], scale, rows)
                if prepared.packed is None
                else prepared.packed[b][block]
            )
            bias = None if prepared.sq is None else prepared.sq[b, start : start + cols]
            for first in range(0, n, rows):
                scores = linear(book[first : first + rows], weight, bias, "none", [], "")
                if best is None:
                    argmin_rows(scores, indices[b, first : first + rows])
                else:
                    _merge_min(scores, best[b, first : first + rows], indices[b, first : first + rows], start)
    return indices, best


def nearest(
    x: Tensor,
    codes: Tensor,
    *,
    cosine: bool,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prepared: PreparedCodes | None = None,
) -> Tensor:
    """Indices (B, N) int64 of the nearest code for x (B, N, d) among codes (B, K, d).

    ``prepared``: :func:`prepare_codes` of these very codes (used only where the fused path applies).
    """
    return _search(x, codes, cosine, chunk_bytes, prepared, scored=False)[0]


def nearest_scored(
    x: Tensor, codes: Tensor, *, cosine: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[Tensor, Tensor]:
    """:func:`nearest`'s indices (B, N) and their scores (B, N) as the search computed them:
    ``||c||^2 - 2 x.c`` for Euclidean codebooks (plus ``||x||^2``, the squared distance), ``-x.c`` for
    cosine ones."""
    indices, scores = _search(x, codes, cosine, chunk_bytes, None, scored=True)
    assert scores is not None
    return indices, scores


def _search(
    x: Tensor, codes: Tensor, cosine: bool, chunk_bytes: int, prepared: PreparedCodes | None, scored: bool
) -> tuple[Tensor, Tensor | None]:
    codes_t = codes.transpose(1, 2)
    if is_tracing():
        sq = None if cosine else codes.pow(2).sum(-1)
        scores, indices = _scores(x, codes_t, sq).min(-1)
        return indices, scores
    books, n = x.shape[:2]
    size = codes.shape[1]
    with torch.no_grad():
        if fused_search_applies(x, codes):
            prepared = prepared or prepare_codes(codes, cosine=cosine, chunk_bytes=chunk_bytes)
            return _nearest_fused(x, codes, cosine, prepared, scored)
        sq = None if cosine else _sq_norms(codes)
        rows, cols = score_tile(books, size, chunk_bytes)
        running = scored or cols < size
        if n <= rows and not running:
            return _scores(x, codes_t, sq).argmin(-1), None
        indices = (torch.zeros if running else torch.empty)(books, n, dtype=torch.int64, device=x.device)
        block = x.new_empty(books, min(rows, n), cols)
        best = x.new_full((books, n), float("inf")) if running else None
        for start in range(0, size, cols):
            part_t = codes_t[:, :, start : start + cols]
            part_sq = None if sq is None else sq[:, start : start + cols]
            for first in range(0, n, rows):
                tokens = x[:, first : first + rows]
                out = block[:, : tokens.shape[1], : part_t.shape[2]]
                scores = _scores(tokens, part_t, part_sq, out=out)
                if best is None:
                    torch.argmin(scores, -1, out=indices[:, first : first + rows])
                else:
                    _merge_min(scores, best[:, first : first + rows], indices[:, first : first + rows], start)
    return indices, best


def nearest_k(
    x: Tensor, codes: Tensor, k: int, *, cosine: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest codes of x (B, N, d) among codes (B, K, d), nearest first: (indices (B, N, k) int64,
    scores (B, N, k) in x's dtype).

    The scores are the squared distances ``||x - c||^2`` (``||x||^2 + ||c||^2 - 2 x.c``, clamped at 0) for
    Euclidean codebooks and ``-x.c`` for cosine ones. With ``k == 1`` ties go to the lowest index as in
    :func:`nearest`; among more candidates the order of exactly equal scores is unspecified. Tokens are
    scored in chunks whose (chunk x K) block stays under ``chunk_bytes`` (one block while tracing); no
    gradient. ``1 <= k <= K``.
    """
    size = codes.shape[1]
    if not 1 <= k <= size:
        raise ValueError(f"k must be between 1 and the codebook size {size}, got {k}")
    codes_t = codes.transpose(1, 2)

    def best(part: Tensor) -> tuple[Tensor, Tensor]:
        block = _scores(part, codes_t, sq)
        if sq is not None:
            block = (block + part.pow(2).sum(-1, keepdim=True)).clamp(min=0)
        if k == 1:
            where = block.argmin(-1, keepdim=True)
            return where, block.gather(-1, where)
        top, where = block.topk(k, -1, largest=False, sorted=True)
        return where, top

    with torch.no_grad():
        sq = None if cosine else _sq_norms(codes)
        n = x.shape[1]
        chunk = max(1, chunk_bytes // (4 * codes.shape[0] * size))  # whole rows: top-k needs every code
        if is_tracing() or n <= chunk:
            return best(x)
        indices = torch.empty(*x.shape[:2], k, dtype=torch.int64, device=x.device)
        scores = torch.empty(*x.shape[:2], k, dtype=x.dtype, device=x.device)
        for start in range(0, n, chunk):
            where, top = best(x[:, start : start + chunk])
            indices[:, start : start + chunk] = where
            scores[:, start : start + chunk] = top
    return indices, scores


def gumbel_sample(
    x: Tensor,
    codes: Tensor,
    *,
    cosine: bool,
    temperature: float,
    generator: torch.Generator | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Sample codes with probability ``softmax(similarity / temperature)`` (Gumbel-max trick).

    Similarity is ``-||x - c||`` for Euclidean codebooks and ``x.c`` for cosine ones, as in the
    SoundStream/RQ-VAE recipe. ``temperature`` must be > 0.
    """
    with torch.no_grad():  # no autograd graph over the (chunk x codes) temporaries
        codes_t = codes.transpose(1, 2)
        sq = None if cosine else _sq_norms(codes)
        x_sq = None if cosine else x.pow(2).sum(-1, keepdim=True)
        books, n = x.shape[:2]
        size = codes.shape[1]
        rows, cols = score_tile(books, size, chunk_bytes)
        indices = torch.zeros(books, n, dtype=torch.int64, device=x.device)
        best = x.new_full((books, n), float("-inf")) if cols < size else None
        for start in range(0, size, cols):
            part_t = codes_t[:, :, start : start + cols]
            part_sq = None if sq is None else sq[:, start : start + cols]
            for first in range(0, n, rows):
                scores = _scores(x[:, first : first + rows], part_t, part_sq)  # lower is nearer
                if x_sq is not None:
                    scores = (scores + x_sq[:, first : first + rows]).clamp_(min=0).sqrt_()
                uniform = torch.rand(
                    scores.shape, generator=generator, device=scores.device, dtype=scores.dtype
                )
                gumbel = -torch.log((-torch.log(uniform.clamp_(min=1e-20))).clamp_(min=1e-20))
                keys = gumbel - scores / temperature
                if best is None:
                    indices[:, first : first + rows] = keys.argmax(-1)
                    continue
                value, index = keys.max(-1)  # blocks in code order: a strictly higher key wins
                running = best[:, first : first + rows]
                better = value > running
                running.copy_(torch.where(better, value, running))
                chosen = indices[:, first : first + rows]
                chosen.copy_(torch.where(better, index + start, chosen))
    return indices


def similarity(x: Tensor, codes: Tensor, *, cosine: bool) -> Tensor:
    """Similarities (B, N, K) of x (B, N, d) to codes (B, K, d), higher is nearer: ``-||x - c||`` (the
    distance, as Gumbel sampling uses it) or ``x . c`` for cosine codebooks. Differentiable with respect to
    x (the squared distance is clamped away from 0 before the square root); one full block."""
    dots = torch.bmm(x, codes.transpose(1, 2))
    if cosine:
        return dots
    squared = x.pow(2).sum(-1, keepdim=True) - 2 * dots + codes.pow(2).sum(-1).unsqueeze(1)
    return -squared.clamp(min=1e-12).sqrt()


def is_tie(z: Tensor, a: Tensor, b: Tensor, *, cosine: bool, tolerance: float) -> bool:
    """Whether codes ``a`` and ``b`` are equally near ``z`` (vectors, float64): their scores differ by at
    most ``tolerance * (|z| + max(|a|, |b|))^2``, the rounding that float32 arithmetic can put on them."""
    if cosine:
        da, db = -(z * a).sum(), -(z * b).sum()
    else:
        da, db = (z - a).pow(2).sum(), (z - b).pow(2).sum()
    scale = (z.norm() + torch.maximum(a.norm(), b.norm())) ** 2
    return bool((da - db).abs() <= tolerance * scale)
