"""Lookup-free quantization's entropies as Loss objects: books x (B, N, d) -> (B,), exact, no N x 2^d tensor.

The entropy softmax of lookup-free quantization (MAGVIT-v2, arXiv 2310.05737) has logits
``2 tau (x . c)`` over the codes ``c in {-s, +s}^d``; they are a sum over bits, so per token
``p(c) = prod_i p_i(c_i)`` with ``p_i(+) = sigmoid(a_i)``, ``a = 4 tau s x``. Hence, exactly:

- per-sample entropy (:class:`PerSampleEntropyLoss`) = the sum of the per-bit binary entropies,
  ``softplus(a) - a sigmoid(a)``: O(N d);
- batch distribution ``mean_n p_n(c)``: with ``A`` (N x 2^(d/2)) the products over the first half of
  the bits and ``B`` (N x 2^(d - d/2)) over the second half, ``avg = A^T B / N``: one GEMM giving a
  2^(d/2) x 2^(d - d/2) table in code order (row = high bits). Its entropy is the batch (codebook)
  entropy (:class:`BatchEntropyLoss`).

Cost model (float32, per book): the table holds ``2^d`` floats (2^16 codes: 256 KiB, 2^24: 64 MiB)
plus its gradient and the entropy's temporaries; the half-bit tables are built ``chunk_bytes``
(default 32 MiB) of tokens at a time and never stored for backward (the backward recomputes them per
chunk), so memory does not grow with the number of tokens; compute is ``N (2^(d/2) + 2^(d - d/2))``
for the tables plus ``N 2^d`` for the GEMM. Above ``max_exact_bits`` (default 24) bits the batch
entropy is APPROXIMATED by the sum of the exact entropies of contiguous bit groups of at most that
many bits (an upper bound on the joint entropy; exact when the groups are independent over the batch).

Both losses follow :class:`vqcore.protocols.Loss` (books first, one value per book, unweighted) and
read the code scales ``s`` from the codebook argument's ``scales`` ``(books,)``
(:class:`vqcore.blocks.grid.BinaryCodebook`). A token counts where ``valid``; every book sharing one
mask (an expanded ``(N,)`` mask, as the quantizers pass it) is the fast path. Binary spherical
quantization needs nothing more: its codes ``±s / sqrt(d)`` are a binary codebook of that scale, and its
(normalised) inputs enter as they are. ``PerSampleEntropyLoss(fraction=f)`` averages over a random
``f`` of the valid tokens (an unbiased estimate; exact for ``f == 1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from vqcore.blocks.distributed import all_reduce_sum_, differentiable_all_reduce_sum, should_sync
from vqcore.blocks.validation import check_positive_int
from vqcore.protocols import Codebook

DEFAULT_ENTROPY_CHUNK_BYTES = 32 * 2**20
DEFAULT_MAX_EXACT_BITS = 24


def bit_entropy(logits: Tensor) -> Tensor:
    """Binary entropy (nats) of sigmoid(logits), elementwise and stable for any logit."""
    return F.softplus(logits) - logits * torch.sigmoid(logits)


_BITS_CACHE: dict[tuple[int, str, torch.dtype], Tensor] = {}


def code_bits(k: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(2^k, k) 0/1 bits of every code, first bit most significant (cached per size, device and dtype)."""
    key = (k, str(device), dtype)
    bits = _BITS_CACHE.get(key)
    if bits is None:
        bits = (
            (torch.arange(2**k, device=device).unsqueeze(-1) >> torch.arange(k - 1, -1, -1, device=device))
            & 1
        ).to(dtype)
        if k <= 12 and not torch.compiler.is_compiling():
            _BITS_CACHE[key] = bits
    return bits


def bit_product_table(logits: Tensor) -> Tensor:
    """Bit logits a (..., k) -> (..., 2^k) with entry c = prod_i p_i(c_i), p_i(1) = sigmoid(a_i), MSB first.

    log prod_i p_i(c_i) = a . c - sum_i softplus(a_i), so the table is softmax(a @ bits^T): one GEMM.
    """
    return torch.softmax(logits @ code_bits(logits.shape[-1], logits.device, logits.dtype).T, dim=-1)


def _chunk_tokens(books: int, d_hi: int, d_lo: int, budget: int) -> int:
    per_token = 4 * books * (2**d_hi + 2**d_lo) * 3  # the tables plus their softmax temporaries
    return max(1, budget // per_token)


def _table_product(a: Tensor, d_hi: int) -> Tensor:
    return torch.bmm(bit_product_table(a[..., :d_hi]).transpose(1, 2), bit_product_table(a[..., d_hi:]))


class _BatchCodeSum(torch.autograd.Function):
    """Bit logits (C, N, d) -> sum_n prod_i p_{n,i}(c_i) as (C, 2^hi, 2^lo); chunked over tokens,
    tables recomputed in backward.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, d_hi: int, chunk: int) -> Tensor:
        books, n, d = a.shape
        total = a.new_zeros(books, 2**d_hi, 2 ** (d - d_hi))
        for s in range(0, n, chunk):
            ac = a[:, s : s + chunk]
            total.baddbmm_(
                bit_product_table(ac[..., :d_hi]).transpose(1, 2), bit_product_table(ac[..., d_hi:])
            )
        ctx.save_for_backward(a)
        ctx.d_hi, ctx.chunk = d_hi, chunk
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (a,) = ctx.saved_tensors
        grad = grad.contiguous()
        out = torch.zeros_like(a)
        d_hi = ctx.d_hi
        for s in range(0, a.shape[1], ctx.chunk):
            with torch.enable_grad():
                ac = a[:, s : s + ctx.chunk].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(_table_product(ac, d_hi), (ac,), grad)
            out[:, s : s + ctx.chunk] = g
        return out, None, None


def batch_code_distribution(
    logits: Tensor, *, chunk_bytes: int = DEFAULT_ENTROPY_CHUNK_BYTES, sync: bool = False
) -> Tensor:
    """Bit logits (C, N, d) -> (C, 2^d) batch-mean code distribution ``mean_n prod_i p_{n,i}(c_i)``,
    MSB-first code order.

    One token chunk: plain autograd (the small tables are kept for backward); otherwise chunked,
    recomputing the tables in backward so memory does not grow with N. Under ``sync`` the mean is over
    the GLOBAL batch: the (C, 2^d) sums go through the autograd-aware all-reduce
    (``torch.distributed.nn.functional.all_reduce``, whose backward sums the gradients over ranks) and
    the token counts through a plain one. Each rank's gradient is then world_size times its share of
    the global-batch gradient; DDP's average over ranks turns it into exactly the single-process
    gradient on the concatenated batch. A rank with no tokens (N = 0) still takes part.
    """
    books, n, d = logits.shape
    d_hi = d // 2
    chunk = _chunk_tokens(books, d_hi, d - d_hi, chunk_bytes)
    if n <= chunk:
        total = _table_product(logits, d_hi)
    else:
        total = _BatchCodeSum.apply(logits, d_hi, chunk)
    if not sync:
        return (total / n).reshape(books, 2**d)
    total = differentiable_all_reduce_sum(total.contiguous(), True)
    count = all_reduce_sum_(logits.new_tensor([float(n)]), True)
    return (total / count.clamp(min=1)).reshape(books, 2**d)


def entropy(prob: Tensor) -> Tensor:
    """-sum p log p over the last axis; exact (0 log 0 = 0) with a finite gradient everywhere."""
    return -(prob * prob.clamp(min=torch.finfo(prob.dtype).tiny).log()).sum(-1)


def grouped_batch_entropy(
    logits: Tensor, *, max_exact_bits: int, chunk_bytes: int = DEFAULT_ENTROPY_CHUNK_BYTES, sync: bool = False
) -> Tensor:
    """Bit logits (C, N, d) -> (C,) entropy of the batch code distribution: exact for d <= max_exact_bits,
    else the sum over contiguous groups of at most ``max_exact_bits`` bits."""
    d = logits.shape[-1]
    groups = max(1, math.ceil(d / max_exact_bits))
    bounds = [round(g * d / groups) for g in range(groups + 1)]
    total = sum(
        entropy(batch_code_distribution(logits[..., lo:hi], chunk_bytes=chunk_bytes, sync=sync))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    )
    return cast(Tensor, total)  # at least one group: a tensor, never sum's start value 0


# -- the Loss objects ---------------------------------------------------------------------------------


def bit_logits(x: Tensor, scales: Tensor, inv_temperature: float) -> Tensor:
    """x (B, N, d), code scales (B,) -> the per-bit logits ``a = 4 tau s x`` (B, N, d), in x's dtype."""
    return ((4.0 * inv_temperature) * scales.to(x.dtype)).reshape(-1, 1, 1) * x


def _code_scales(codebook: Codebook | None, loss: str) -> Tensor:
    scales = getattr(codebook, "scales", None)
    if not isinstance(scales, Tensor):
        raise TypeError(
            f"the {loss} loss needs a binary codebook with per-book code scales `scales` "
            f"(vqcore.blocks.grid.BinaryCodebook), got {type(codebook).__name__}"
        )
    return scales


def _per_book(
    x: Tensor, scales: Tensor, valid: Tensor | None, term: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """``term(x_valid (B', M, d), scales (B',)) -> (B',)`` over the valid tokens of every book: once when
    every book shares one mask (stride 0 on the book axis, or one book), else book by book."""
    if valid is None:
        return term(x, scales)
    if valid.shape[0] == 1 or valid.stride(0) == 0:
        return term(x[:, valid[0]], scales)
    return torch.cat([term(x[i : i + 1, valid[i]], scales[i : i + 1]) for i in range(x.shape[0])])


def sampled_token_count(tokens: int, fraction: float) -> int:
    """How many of ``tokens`` a ``fraction`` samples: ``int(tokens * fraction)``, at least one when there
    is a token (a single token keeps its entropy), all of them for ``fraction == 1``."""
    if fraction >= 1.0 or tokens == 0:
        return tokens
    return max(1, int(tokens * fraction))


@dataclass(frozen=True)
class PerSampleEntropyLoss:
    """Mean over valid tokens of the entropy of each token's code distribution ``softmax(2 tau x . c)``
    over the binary codes ``c`` of its book; (B,). A book without valid tokens gives 0.

    ``fraction`` < 1: the mean over a uniformly random subset of :func:`sampled_token_count` of the valid
    tokens (drawn from torch's global generator at every call, shared by the books that share a mask), an
    unbiased estimate of the full mean; 1 (the default): every valid token, exactly."""

    inv_temperature: float = 100.0
    fraction: float = 1.0
    name: ClassVar[str] = "per_sample_entropy"

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)):
            raise TypeError(f"fraction must be a number in (0, 1], got {type(self.fraction).__name__}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None, valid: Tensor | None
    ) -> Tensor:
        return _per_book(x, _code_scales(codebook, self.name), valid, self._term)

    def _term(self, x: Tensor, scales: Tensor) -> Tensor:
        count = sampled_token_count(x.shape[1], self.fraction)
        if count < x.shape[1]:
            x = x.index_select(1, torch.randperm(x.shape[1], device=x.device)[:count])
        per_token = bit_entropy(bit_logits(x, scales, self.inv_temperature)).sum(-1)
        if per_token.shape[1] == 0:  # no token: 0, still connected to the graph
            return per_token.sum(-1)
        return per_token.mean(-1)


@dataclass(frozen=True)
class BatchEntropyLoss:
    """Entropy of the batch-mean code distribution of each book (the codebook usage), (B,): to be
    MAXIMISED (quantizers weigh it negatively). ``sync``: over the global batch of every rank
    (None: whenever torch.distributed runs); ``max_exact_bits`` / ``chunk_bytes``: see the module
    docstring. A book without valid tokens gives 0 (under sync, the other ranks' entropy)."""

    inv_temperature: float = 100.0
    max_exact_bits: int = DEFAULT_MAX_EXACT_BITS
    chunk_bytes: int = DEFAULT_ENTROPY_CHUNK_BYTES
    sync: bool | None = None
    name: ClassVar[str] = "batch_entropy"

    def __post_init__(self) -> None:
        check_positive_int(self.max_exact_bits, "max_exact_bits")
        check_positive_int(self.chunk_bytes, "chunk_bytes")

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None, valid: Tensor | None
    ) -> Tensor:
        sync = should_sync(self.sync)  # decided once: every book's all-reduce runs on every rank
        scales = _code_scales(codebook, self.name)
        return _per_book(x, scales, valid, lambda xv, s: self._term(xv, s, sync))

    def _term(self, x: Tensor, scales: Tensor, sync: bool) -> Tensor:
        if x.shape[1] == 0 and not sync:
            return x.new_zeros(x.shape[0])
        return grouped_batch_entropy(
            bit_logits(x, scales, self.inv_temperature),
            max_exact_bits=self.max_exact_bits,
            chunk_bytes=self.chunk_bytes,
            sync=sync,
        )
