"""Nearest-code search: one GEMM per chunk of tokens, never a tokens x codes matrix larger than a budget.

For Euclidean codebooks the score is ``||c||^2 - 2 x.c`` (``||x||^2`` is constant per token and
dropped); for cosine codebooks (unit vectors) it is ``-x.c``. Lower is better in both, so the search
is an ``argmin``. Tokens are processed in chunks so that the score block stays under
``chunk_bytes`` (default 16 MiB): a 65536-code codebook costs bounded memory, and the block is
reused between chunks, which on CPU is also faster than one fresh large allocation.

Under torch.export / torch.compile the search is done in one block, since a Python loop over a
symbolic number of tokens is not traceable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqcore.validation import is_tracing

DEFAULT_CHUNK_BYTES = 16 * 2**20


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    return F.normalize(x, dim=dim, eps=1e-12)


def _scores(x: Tensor, codes_t: Tensor, code_sq_norms: Tensor | None, out: Tensor | None = None) -> Tensor:
    """Scores (B, m, K) for x (B, m, d) against codes_t (B, d, K); lower is nearer."""
    if code_sq_norms is None:  # cosine: -x.c
        return torch.baddbmm(x.new_zeros(()), x, codes_t, beta=0, alpha=-1, out=out)
    return torch.baddbmm(code_sq_norms.unsqueeze(1), x, codes_t, alpha=-2, out=out)


def _chunk_size(books: int, size: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * books * size))


def nearest(x: Tensor, codes: Tensor, *, cosine: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """Indices (B, N) int64 of the nearest code for x (B, N, d) among codes (B, K, d)."""
    codes_t = codes.transpose(1, 2)
    sq = None if cosine else codes.pow(2).sum(-1)
    n = x.shape[1]
    chunk = _chunk_size(codes.shape[0], codes.shape[1], chunk_bytes)
    if is_tracing() or n <= chunk:
        return _scores(x, codes_t, sq).argmin(-1)
    indices = torch.empty(x.shape[:2], dtype=torch.int64, device=x.device)
    block = x.new_empty(x.shape[0], chunk, codes.shape[1])
    for start in range(0, n, chunk):
        part = x[:, start : start + chunk]
        out = block if part.shape[1] == chunk else None
        indices[:, start : start + chunk] = _scores(part, codes_t, sq, out=out).argmin(-1)
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
    codes_t = codes.transpose(1, 2)
    sq = None if cosine else codes.pow(2).sum(-1)
    x_sq = None if cosine else x.pow(2).sum(-1, keepdim=True)
    chunk = _chunk_size(codes.shape[0], codes.shape[1], chunk_bytes)
    indices = torch.empty(x.shape[:2], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[1], chunk):
        part = x[:, start : start + chunk]
        scores = _scores(part, codes_t, sq)  # lower is nearer
        if x_sq is not None:
            scores = (scores + x_sq[:, start : start + chunk]).clamp_(min=0).sqrt_()
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20)).clamp_(min=1e-20))
        indices[:, start : start + chunk] = (gumbel - scores / temperature).argmax(-1)
    return indices
