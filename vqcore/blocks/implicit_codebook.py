"""Implicit neural codebooks (QINCo, arXiv 2401.14732): every token sees its own transformed codebook.

In a residual stack, layer ``q > 0`` does not search its codebook ``C`` (K, d) itself but
``T = f(C, s)``: an MLP applied to each code concatenated with the token's condition ``s`` (the sum of
the previous layers' codes), so ``T`` is (tokens, K, d). The MLP (:class:`ImplicitCodebookMLP`) is::

    x = W [s, c] + b                          proj_in, on the concatenation (condition first)
    x = x + W2 silu(W1 x + b1) + b2           ``depth`` residual blocks
    t = x / ||x||                             only with ``l2norm_output`` (cosine codebooks)

Materialising ``T`` costs tokens x K x d floats per activation (4 GiB at 4096 tokens, 1024 codes,
d 256); this block never does:

- ``proj_in`` is separable: ``W [s, c] + b = (W_s s + b) + W_c c``. The token part (tokens, d) and the
  code part (K, d) are computed once, and only added per block of (tokens, codes) pairs;
- the search (:func:`nearest_transformed`) runs under ``no_grad`` over chunks of tokens whose
  (chunk, K, d) activations and (chunk, K, hidden) hidden units stay under ``chunk_bytes``
  (:func:`search_chunk_rows`), updated in place in two reused buffers (and the first block's inner layer
  and the outer biases separated too, see :class:`_SearchPlan`);
- the chosen code of each token (:func:`lookup_transformed`) is recomputed with gradient for the chosen
  (token, code) pairs only, (tokens, d): the indices are an argmin (no gradient), and the gradient of a
  one-hot selection of ``T`` reaches the MLP, the codes and the condition through the chosen pairs
  alone, so this is the gradient of the materialised formulation.

Distances: squared Euclidean ``||x - t||^2`` computed as the sum of squared differences (no
``||t||^2 - 2 x.t`` cancellation, and each token's value independent of the chunk it falls in), or, for
cosine codebooks, ``-x.t / ||t||``. Under tracing (export) the search is one block over all tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqcore.blocks.distance import DEFAULT_CHUNK_BYTES
from vqcore.blocks.precision import float32_region
from vqcore.blocks.validation import check_positive_int, is_tracing
from vqcore.errors import ConfigurationError

# the search's activation budget when the caller gives none (read at every call)
SEARCH_CHUNK_BYTES = DEFAULT_CHUNK_BYTES


class ImplicitCodebookMLP(nn.Module):
    """The code transform ``f(c, s)`` of one residual layer (see the module docstring).

    State_dict keys as vector-quantize-pytorch's ``MLP``: ``proj_in.*`` (a ``Linear(2 * dim, dim)`` on
    ``[condition, code]``), ``layers.{j}.0.*`` and ``layers.{j}.2.*`` (the two ``Linear`` of block ``j``).
    Calling the module materialises every transformed code (the reference's ``MLP.forward``: codes
    (c, d) or (h, c, d), condition (b, n, d) or (b, d) -> (b, n, c, d) or (h, b, n, c, d)); the residual
    stacks use the bounded-memory functions of this module instead. A (b, d) condition counts as one
    position, (b, 1, c, d), as in the reference. Part of the codebook: its parameters stay float32 under
    ``.half()`` / ``.to(bfloat16)``, and the functions below compute in float32 under autocast.
    """

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        check_positive_int(dim, "dim")
        dim_hidden = dim if dim_hidden is None else dim_hidden
        if isinstance(dim_hidden, bool) or not isinstance(dim_hidden, int) or dim_hidden < 1:
            raise ConfigurationError(f"mlp_kwargs dim_hidden must be a positive int, got {dim_hidden!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ConfigurationError(f"mlp_kwargs depth must be an int >= 0, got {depth!r}")
        self.dim, self.dim_hidden, self.depth = dim, dim_hidden, depth
        self.l2norm_output = bool(l2norm_output)
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim))
            for _ in range(depth)
        )

    def forward(self, codes: Tensor, *, condition: Tensor) -> Tensor:
        one_headed = codes.ndim == 2
        heads = codes if not one_headed else codes.unsqueeze(0)
        cond = condition if condition.ndim == 3 else condition.unsqueeze(1)
        b, n = cond.shape[0], cond.shape[1]
        h, c = heads.shape[0], heads.shape[1]
        x = torch.cat(
            (
                cond[None, :, :, None].expand(h, b, n, c, cond.shape[-1]),
                heads[:, None, None].expand(h, b, n, c, heads.shape[-1]),
            ),
            -1,
        )
        x = self.proj_in(x)
        for block in self.layers:
            x = block(x) + x
        if self.l2norm_output:
            x = F.normalize(x, dim=-1)
        return x[0] if one_headed else x

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ImplicitCodebookMLP:
        """dtype casts leave every parameter of the MLP (its Linear children's too) float32; device moves
        apply."""

        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if not t.is_floating_point() or out.dtype == t.dtype:
                return out
            return t.to(device=out.device)

        return super()._apply(keep_float32, recurse)

    def extra_repr(self) -> str:
        return f"l2norm_output={self.l2norm_output}"


def _block_linears(mlp: ImplicitCodebookMLP) -> Iterator[tuple[nn.Linear, nn.Linear]]:
    """The (inner, outer) Linear pair of each residual block."""
    for block in mlp.layers:
        sequential = cast(nn.Sequential, block)
        yield cast(nn.Linear, sequential[0]), cast(nn.Linear, sequential[2])


def _split_proj_in(mlp: ImplicitCodebookMLP) -> tuple[Tensor, Tensor, Tensor]:
    """proj_in's weight split into its condition half and its code half, and its bias (float32)."""
    weight, d = mlp.proj_in.weight.float(), mlp.dim
    return weight[:, :d], weight[:, d:], mlp.proj_in.bias.float()


def condition_part(mlp: ImplicitCodebookMLP, condition: Tensor) -> Tensor:
    """``W_s s + b``: the condition's share of proj_in, (N, d) -> (N, d)."""
    w_cond, _, bias = _split_proj_in(mlp)
    return torch.addmm(bias, condition.float(), w_cond.t())


def code_part(mlp: ImplicitCodebookMLP, codes: Tensor) -> Tensor:
    """``W_c c``: the codes' share of proj_in, (K, d) -> (K, d)."""
    _, w_code, _ = _split_proj_in(mlp)
    return codes.float() @ w_code.t()


def _blocks(mlp: ImplicitCodebookMLP, x: Tensor) -> Tensor:
    """The residual blocks on rows x (R, d), out of place (autograd, tracing)."""
    for inner, outer in _block_linears(mlp):
        hidden = F.silu(F.linear(x, inner.weight.float(), inner.bias.float()))
        x = x + F.linear(hidden, outer.weight.float(), outer.bias.float())
    return x


class _SearchPlan:
    """The MLP's weights arranged for the in-place search (float32, no gradient).

    Two more separable steps save passes over the (chunk, K, ·) blocks:

    - the first block's inner layer is affine in ``x = t + c`` (token part plus code part), so its
      pre-activation is ``(W1 t + b1) + W1 c``: a broadcast add of a (tokens, hidden) and a (K, hidden)
      table instead of a GEMM;
    - the outer biases are not added to the block: the block holds ``x - o_j`` with ``o_j`` the sum of
      the outer biases so far, which later inner layers take into their bias (``b1 + W1 o_j``) and the
      distance into the token (``||(x - o) - (r - o)||``).
    """

    def __init__(self, mlp: ImplicitCodebookMLP, tokens: Tensor, codes: Tensor):
        pairs = list(_block_linears(mlp))
        self.inner = [inner.weight.float().t() for inner, _ in pairs]
        self.outer = [outer.weight.float().t() for _, outer in pairs]
        offset = tokens.new_zeros(mlp.dim)
        self.inner_bias = []
        for (inner, outer), w_inner in zip(pairs, self.inner):
            self.inner_bias.append(torch.addmv(inner.bias.float(), w_inner.t(), offset))
            offset = offset + outer.bias.float()
        self.offset = offset  # what the block lacks after the last block
        self.first_tokens = self.first_codes = None
        if pairs:
            self.first_tokens = torch.addmm(self.inner_bias[0], tokens, self.inner[0])
            self.first_codes = codes @ self.inner[0]

    def run_(self, acts: Tensor, hidden: Tensor, start: int) -> None:
        """The blocks on ``acts`` (m, K, d) in place (holding ``x - offset`` after), rows from ``start``."""
        m, size = acts.shape[0], acts.shape[1]
        flat = acts.view(m * size, -1)
        for j, (w_inner, w_outer) in enumerate(zip(self.inner, self.outer)):
            if j == 0:
                assert self.first_tokens is not None and self.first_codes is not None  # a first block
                rows = self.first_tokens[start : start + m].unsqueeze(1)
                torch.add(rows, self.first_codes, out=hidden.view(m, size, -1))
            else:
                torch.addmm(self.inner_bias[j], flat, w_inner, out=hidden)
            F.silu(hidden, inplace=True)
            flat.addmm_(hidden, w_outer)


def search_chunk_rows(mlp: ImplicitCodebookMLP, codebook_size: int, chunk_bytes: int) -> int:
    """Tokens per search block: the block's two float32 buffers, (rows, K, d) activations and
    (rows, K, dim_hidden) hidden units, take at most ``chunk_bytes`` (at least one token)."""
    per_token = 4 * codebook_size * (mlp.dim + (mlp.dim_hidden if mlp.depth else 0))
    return max(1, chunk_bytes // per_token)


def _scores(block: Tensor, x: Tensor, cosine: bool) -> Tensor:
    """Scores (m, K), lower is nearer, of tokens x (m, d) against their transformed codes block (m, K, d);
    ``block`` is overwritten (Euclidean)."""
    if cosine:
        dots = torch.bmm(block, x.unsqueeze(-1)).squeeze(-1)
        return -dots / torch.linalg.vector_norm(block, dim=-1).clamp(min=1e-12)
    return block.sub_(x.unsqueeze(1)).square_().sum(-1)


def _choose(scores: Tensor, cosine: bool, temperature: float | None) -> Tensor:
    """argmin of the scores, or a Gumbel-max sample of ``softmax(similarity / temperature)`` (similarity:
    minus the distance, or the cosine)."""
    if temperature is None or temperature <= 0:
        return scores.argmin(-1)
    similarity = -scores if cosine else -scores.clamp(min=0).sqrt()
    uniform = torch.rand_like(similarity).clamp_(min=1e-20)
    gumbel = -torch.log((-torch.log(uniform)).clamp_(min=1e-20))
    return (similarity / temperature + gumbel).argmax(-1)


def nearest_transformed(
    mlp: ImplicitCodebookMLP,
    x: Tensor,
    condition: Tensor,
    codes: Tensor,
    *,
    cosine: bool,
    chunk_bytes: int | None = None,
    temperature: float | None = None,
) -> Tensor:
    """Indices (N,) int64 of each token's nearest transformed code: x (N, d) (unit vectors for cosine),
    condition (N, d), codes (K, d). ``temperature > 0`` samples instead (Gumbel-max). No gradient; the
    activations stay under ``chunk_bytes`` (default :data:`SEARCH_CHUNK_BYTES`; see
    :func:`search_chunk_rows`)."""
    chunk_bytes = SEARCH_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    with torch.no_grad(), float32_region(x.device.type):
        x, condition, codes = x.float(), condition.float(), codes.float()
        tokens, d = condition_part(mlp, condition), code_part(mlp, codes)
        n, size = x.shape[0], codes.shape[0]
        if is_tracing():  # one block: a Python loop over a symbolic number of tokens is not traceable
            block = _blocks(mlp, (tokens.unsqueeze(1) + d).reshape(n * size, -1)).reshape(n, size, -1)
            if mlp.l2norm_output:
                block = F.normalize(block, dim=-1)
            if cosine:
                scores = -torch.bmm(block, x.unsqueeze(-1)).squeeze(-1)
                scores = scores / torch.linalg.vector_norm(block, dim=-1).clamp(min=1e-12)
            else:
                scores = (block - x.unsqueeze(1)).pow(2).sum(-1)
            return _choose(scores, cosine, temperature)
        plan = _SearchPlan(mlp, tokens, d)
        exact = cosine or mlp.l2norm_output  # the block itself is needed, not only its distance to x
        target = x if exact else x - plan.offset
        rows = max(1, min(n, search_chunk_rows(mlp, size, chunk_bytes)))  # >= 1: range() steps by it
        block = x.new_empty(rows * size, mlp.dim)
        hidden = x.new_empty(rows * size, mlp.dim_hidden) if mlp.depth else block
        indices = torch.empty(n, dtype=torch.int64, device=x.device)
        for start in range(0, n, rows):
            m = min(rows, n - start)
            acts = block[: m * size].view(m, size, mlp.dim)
            torch.add(tokens[start : start + m].unsqueeze(1), d, out=acts)
            plan.run_(acts, hidden[: m * size], start)
            if exact:
                acts.add_(plan.offset)
            if mlp.l2norm_output:
                acts.div_(torch.linalg.vector_norm(acts, dim=-1, keepdim=True).clamp_(min=1e-12))
            scores = _scores(acts, target[start : start + m], cosine)
            indices[start : start + m] = _choose(scores, cosine, temperature)
        return indices


def lookup_transformed(mlp: ImplicitCodebookMLP, condition: Tensor, codes: Tensor, indices: Tensor) -> Tensor:
    """The chosen transformed codes ``f(codes[indices], condition)`` (N, d), differentiable with respect to
    the MLP, the codes and the condition; ``indices`` (N,) in [0, K)."""
    with float32_region(codes.device.type):
        chosen = code_part(mlp, codes.index_select(0, indices))
        x = _blocks(mlp, condition_part(mlp, condition) + chosen)
        return F.normalize(x, dim=-1, eps=1e-12) if mlp.l2norm_output else x


def transformed_codes(mlp: ImplicitCodebookMLP, condition: Tensor, codes: Tensor) -> Tensor:
    """Every transformed code (K, d) of ONE token's condition (d,), in the codes' dtype (the export layer's
    float64 tie check): one token's materialised codebook."""
    with float32_region(codes.device.type):
        return _transformed_codes(mlp, condition, codes)


def _transformed_codes(mlp: ImplicitCodebookMLP, condition: Tensor, codes: Tensor) -> Tensor:
    dtype = codes.dtype
    weight = mlp.proj_in.weight.to(dtype)
    x = (
        condition.to(dtype) @ weight[:, : mlp.dim].t()
        + mlp.proj_in.bias.to(dtype)
        + codes @ weight[:, mlp.dim :].t()
    )
    for inner, outer in _block_linears(mlp):
        hidden = F.silu(F.linear(x, inner.weight.to(dtype), inner.bias.to(dtype)))
        x = x + F.linear(hidden, outer.weight.to(dtype), outer.bias.to(dtype))
    return F.normalize(x, dim=-1, eps=1e-12) if mlp.l2norm_output else x


def decode_implicit(
    codebooks: Sequence[Tensor], mlps: Sequence[ImplicitCodebookMLP], indices: Tensor
) -> list[Tensor]:
    """Every layer's code (N, d) for indices (N, Q), -1 allowed (a zero code): layer 0 looks its codebook
    up, layer q > 0 transforms its chosen code with the running sum of the codes before it as condition."""
    codes: list[Tensor] = []
    condition: Tensor | None = None
    for q, book in enumerate(codebooks):
        idx = indices[:, q]
        safe = idx.clamp(min=0)
        if q == 0:
            code = F.embedding(safe, book.float())
        else:
            assert condition is not None  # layer 0 ran
            code = lookup_transformed(mlps[q - 1], condition, book, safe)
        code = code.masked_fill((idx < 0).unsqueeze(-1), 0.0)
        codes.append(code)
        condition = code if condition is None else condition + code
    return codes
