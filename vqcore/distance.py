"""Nearest-code search: one GEMM per chunk of tokens, never a tokens x codes matrix larger than a budget.

For Euclidean codebooks the score is ``||c||^2 - 2 x.c`` (``||x||^2`` is constant per token and
dropped); for cosine codebooks (unit vectors) it is ``-x.c``. Lower is better in both, so the search
is an ``argmin`` (ties go to the lowest index). Tokens are processed in chunks so that the score
block stays under ``chunk_bytes`` (default 16 MiB): a 65536-code codebook costs bounded memory, and the
block is reused between chunks (the last, shorter chunk included), which on CPU is also faster than one
fresh large allocation. A block under glibc's largest dynamic mmap threshold (32 MiB) is recycled by
malloc from call to call without page faults; larger ones are fresh mmaps every time (DESIGN.md §5).

The squared code norms are computed over slices of codes, so no temporary is as large as the
codebook either. The search runs under ``no_grad``: the indices carry no gradient, and ``out=`` refuses
inputs that require grad (``encode`` of a tensor that requires grad would otherwise fail on long inputs).

Under torch.export / torch.compile the search is done in one block, since a Python loop over a
symbolic number of tokens is not traceable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqcore.validation import is_tracing

DEFAULT_CHUNK_BYTES = 16 * 2**20
_NORM_SLICE_BYTES = 2**20


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
    values are those of the one-shot expression (bitwise: benchmarks/check_distance.py)."""
    books, size, dim = codes.shape
    step = max(256, _NORM_SLICE_BYTES // (codes.element_size() * books * dim))
    if step >= size:
        return codes.pow(2).sum(-1)
    out = codes.new_empty(books, size)
    for start in range(0, size, step):
        torch.sum(codes[:, start : start + step].pow(2), -1, out=out[:, start : start + step])
    return out


def _chunk_size(books: int, size: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * books * size))


def nearest(x: Tensor, codes: Tensor, *, cosine: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """Indices (B, N) int64 of the nearest code for x (B, N, d) among codes (B, K, d)."""
    codes_t = codes.transpose(1, 2)
    if is_tracing():
        sq = None if cosine else codes.pow(2).sum(-1)
        return _scores(x, codes_t, sq).argmin(-1)
    n = x.shape[1]
    chunk = _chunk_size(codes.shape[0], codes.shape[1], chunk_bytes)
    with torch.no_grad():
        sq = None if cosine else _sq_norms(codes)
        if n <= chunk:
            return _scores(x, codes_t, sq).argmin(-1)
        indices = torch.empty(x.shape[:2], dtype=torch.int64, device=x.device)
        block = x.new_empty(x.shape[0], chunk, codes.shape[1])
        for start in range(0, n, chunk):
            part = x[:, start : start + chunk]
            out = block[:, : part.shape[1]]
            torch.argmin(_scores(part, codes_t, sq, out=out), -1, out=indices[:, start : start + chunk])
    return indices


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
        chunk = _chunk_size(codes.shape[0], codes.shape[1], chunk_bytes)
        indices = torch.empty(x.shape[:2], dtype=torch.int64, device=x.device)
        for start in range(0, x.shape[1], chunk):
            part = x[:, start : start + chunk]
            scores = _scores(part, codes_t, sq)  # lower is nearer
            if x_sq is not None:
                scores = (scores + x_sq[:, start : start + chunk]).clamp_(min=0).sqrt_()
            uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
            gumbel = -torch.log((-torch.log(uniform.clamp_(min=1e-20))).clamp_(min=1e-20))
            indices[:, start : start + chunk] = (gumbel - scores / temperature).argmax(-1)
    return indices
