"""LFQ and ResidualLFQ: x (b, n, d) -> quantized (b, n, d), indices (b, n), entropy_aux_loss ().

Lookup-free quantization (MAGVIT-v2, arXiv 2310.05737): each of the ``d = log2(codebook_size)``
dimensions is quantized to ``±codebook_scale`` by its sign; the index reads the bits MOST significant
first, ``index = sum_i [x_i > 0] 2^(d-1-i)`` (as vector-quantize-pytorch 1.32.0; 0 maps to -scale).

Entropy loss without a tokens x 2^d tensor. The entropy softmax has logits ``2 tau (x . c)`` over the
codes ``c in {-s, +s}^d``; they are a sum over bits, so per token ``p(c) = prod_i p_i(c_i)`` with
``p_i(+) = sigmoid(4 tau s x_i)``. Hence, exactly:

- per-sample entropy = sum of the per-bit binary entropies, ``softplus(a) - a sigmoid(a)`` with
  ``a = 4 tau s x_i``: O(N d);
- batch distribution ``mean_n p_n(c)``: with ``A`` (N x 2^(d/2)) the products over the first half of
  the bits and ``B`` (N x 2^(d - d/2)) over the second half, ``avg = A^T B / N`` — one GEMM giving a
  2^(d/2) x 2^(d - d/2) table in code order (row = high bits). Its entropy is the codebook entropy.

Cost model (float32, per codebook): the table holds ``2^d`` floats (2^16 codes: 256 KiB, 2^24:
64 MiB) plus its gradient and the entropy's temporaries (a 2^24 training step peaks at ~350 MiB,
measured at 128 and 1024 tokens); the half-bit tables are
built ``entropy_chunk_bytes`` (default 32 MiB) of tokens at a time and never stored for backward (the
backward recomputes them per chunk), so memory does not grow with the number of tokens; compute is
``N (2^(d/2) + 2^(d - d/2))`` for the tables plus ``N 2^d`` for the GEMM. Above
``max_exact_entropy_bits`` (default 24) bits the codebook entropy is APPROXIMATED by the sum of the
exact entropies of contiguous bit groups of at most that many bits (an upper bound on the joint
entropy; exact when the groups are independent over the batch).

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- the entropies are exact: the reference clamps ``log(max(p, 1e-5))``, which lowers both entropies
  when codes of probability < 1e-5 carry mass (at tau = 100 and 2^16 codes: most of them); with the
  per-bit form nothing underflows to a NaN, so no clamp is needed. The loss equals the reference's
  when every code probability is >= 1e-5;
- ``(b, n)`` masks work (the reference collapses the batch entropy, §7.8); masked positions give index
  -1 and zero output (the library-wide convention), padding (even NaN) reaches no loss or gradient;
- no ``frac_per_sample_entropy`` (the exact terms are cheap), ``spherical``, ``soft_clamp_input_value``
  (on LFQ) or ``experimental_softplus_entropy_loss``;
- ResidualLFQ accepts images/video (detected, channel-first), and indices decode from a coarse prefix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqcore.blocks.distributed import all_reduce_sum_, differentiable_all_reduce_sum, should_sync
from vqcore.blocks.estimators import straight_through
from vqcore.blocks.layout import TokenLayout, auto_layout, index_tokens
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.residual import QuantizeDropout
from vqcore.blocks.validation import check_positive_int, check_tensor
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import DROPPED_INDEX, INDEX_DTYPE


class LFQLossBreakdown(NamedTuple):
    """Unweighted LFQ terms (0-dim): mean per-token entropy, entropy of the batch code distribution,
    commitment.
    """

    per_sample_entropy: Tensor
    batch_entropy: Tensor
    commitment: Tensor


class LFQOutput(NamedTuple):
    """``entropy_aux_loss``: 0-dim for LFQ, (Q,) for ResidualLFQ."""

    quantized: Tensor
    indices: Tensor
    entropy_aux_loss: Tensor


class LFQOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    entropy_aux_loss: Tensor
    breakdown: LFQLossBreakdown


DEFAULT_ENTROPY_CHUNK_BYTES = 32 * 2**20


# -- exact entropy terms ---------------------------------------------------------------------------


def bit_entropy(logits: Tensor) -> Tensor:
    """Binary entropy (nats) of sigmoid(logits), elementwise and stable for any logit."""
    return F.softplus(logits) - logits * torch.sigmoid(logits)


_BITS_CACHE: dict = {}


def code_bits(k: int, device=None, dtype=torch.float32) -> Tensor:
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
    def forward(ctx, a, d_hi, chunk):
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
    def backward(ctx, grad):
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


def lfq_entropy_terms(
    x: Tensor,
    inv_temperature: float,
    scale: float | Tensor = 1.0,
    *,
    max_exact_bits: int = 24,
    chunk_bytes: int = DEFAULT_ENTROPY_CHUNK_BYTES,
    sync: bool = False,
) -> tuple[Tensor, Tensor]:
    """x (N, C, d) -> per codebook (C,): (mean per-token entropy, entropy of the batch code distribution).

    Both are the entropies of ``softmax(2 inv_temperature x . c)`` over the 2^d codes
    ``c in {-scale, +scale}^d`` (exactly for d <= max_exact_bits; above, the batch entropy is the sum
    over bit groups, see the module docstring). ``scale``: a float, or a (C,) tensor (one code scale per
    codebook, e.g. residual layers).
    """
    if isinstance(scale, Tensor):
        scale = scale.reshape(-1, 1)
    logits = (4.0 * inv_temperature) * scale * x
    per_sample = bit_entropy(logits).sum(-1).mean(0)
    a = logits.transpose(0, 1)  # (C, N, d)
    d = a.shape[-1]
    groups = max(1, math.ceil(d / max_exact_bits))
    bounds = [round(g * d / groups) for g in range(groups + 1)]
    batch = sum(
        entropy(batch_code_distribution(a[..., lo:hi], chunk_bytes=chunk_bytes, sync=sync))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    )
    return per_sample, batch


def lfq_entropies(x: Tensor, inv_temperature: float, scale: float = 1.0, **kwargs) -> tuple[Tensor, Tensor]:
    """x (N, C, d) -> (mean per-token entropy, mean over codebooks of the batch entropy);
    see :func:`lfq_entropy_terms`.
    """
    per_sample, batch = lfq_entropy_terms(x, inv_temperature, scale, **kwargs)
    return per_sample.mean(), batch.mean()


def check_codebook_size(codebook_size, name: str = "codebook_size") -> int:
    check_positive_int(codebook_size, name)
    if codebook_size & (codebook_size - 1):
        suggestion = 2 ** math.ceil(math.log2(codebook_size))
        raise ValueError(
            f"{name} must be a power of 2 for lookup-free quantization, got {codebook_size} "
            f"(try {suggestion})"
        )
    return codebook_size


# -- LFQ -------------------------------------------------------------------------------------------


class LFQ(QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n) int64, entropy_aux_loss ()
    — see the module docstring.

    Give ``codebook_size`` (a power of 2; bits per codebook ``log2(codebook_size)``) and/or ``dim``
    (default ``bits * num_codebooks``; otherwise Linear projections in and out). Layouts (detected):
    ``(b, n, dim)``, ``(b, dim)``, ``(b, dim, n)`` with ``channel_first=True``, images ``(b, dim, h, w)``
    and video ``(b, dim, t, h, w)``; ``num_codebooks > 1`` adds a trailing codebook axis to the indices.
    ``forward(x, inv_temperature=100., return_loss_breakdown=False, mask=None)``; ``mask`` is ``(b,)``
    or shaped like the indices without the codebook axis, True = keep.
    Loss (training only):
    ``entropy_loss_weight (per_sample - diversity_gamma batch) + commitment_loss_weight commitment``.
    """

    def __init__(
        self,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        channel_first: bool | None = None,
        projection_has_bias: bool = True,
        has_projections: bool | None = None,
        max_exact_entropy_bits: int = 24,
        entropy_chunk_bytes: int = DEFAULT_ENTROPY_CHUNK_BYTES,
        sync_entropy: bool | None = None,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs codebook_size or dim (or both)")
        check_positive_int(num_codebooks, "num_codebooks")
        if codebook_size is None:
            check_positive_int(dim, "dim")
            codebook_size = 2**dim
        check_codebook_size(codebook_size)
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        bits = codebook_size.bit_length() - 1
        if bits > 62:
            raise ValueError(f"codebook_size must be <= 2**62 (int64 indices), got 2**{bits}")
        if codebook_scale <= 0:
            raise ValueError(f"codebook_scale must be > 0, got {codebook_scale}")
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks == 1")
        check_positive_int(max_exact_entropy_bits, "max_exact_entropy_bits")
        self.codebook_dim = bits
        self._codebook_size = codebook_size
        self._num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        inner = bits * num_codebooks
        self.dim = inner if dim is None else check_positive_int(dim, "dim")
        self.has_projections = self.dim != inner if has_projections is None else bool(has_projections)
        if not self.has_projections and self.dim != inner:
            raise ValueError(
                f"has_projections=False needs dim == log2(codebook_size) * num_codebooks = {inner}, "
                f"got dim={self.dim}"
            )
        self.project_in, self.project_out = projection_pair(
            self.dim, inner, enabled=self.has_projections, bias=projection_has_bias
        )
        self.entropy_loss_weight = float(entropy_loss_weight)
        self.commitment_loss_weight = float(commitment_loss_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.codebook_scale = float(codebook_scale)
        self.channel_first = channel_first
        self.max_exact_entropy_bits = max_exact_entropy_bits
        self.entropy_chunk_bytes = int(entropy_chunk_bytes)
        self.sync_entropy = sync_entropy
        self.register_buffer(
            "bit_weights", 2 ** torch.arange(bits - 1, -1, -1, dtype=INDEX_DTYPE), persistent=False
        )

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    # -- pieces shared with ResidualLFQ ------------------------------------------------------------------

    def _codes(self, positive: Tensor) -> Tensor:
        return torch.where(positive, self.codebook_scale, -self.codebook_scale).float()

    def _bits_to_indices(self, positive: Tensor) -> Tensor:
        return (positive.to(INDEX_DTYPE) * self.bit_weights).sum(-1)

    def _indices_to_bits(self, indices: Tensor) -> Tensor:
        return (indices.unsqueeze(-1) & self.bit_weights) != 0

    def quantize_tokens(
        self, z: Tensor, inv_temperature: float = 100.0, valid: Tensor | None = None, with_losses: bool = True
    ):
        """Codebook space: z (b, n, C*bits) float32 -> (codes (b, n, C*bits) with STE, indices (b, n, C),
        loss, breakdown).

        Losses are computed in training mode only (zeros otherwise), over the tokens where ``valid`` (b, n).
        """
        b, n = z.shape[0], z.shape[1]
        zc = z.reshape(b, n, self._num_codebooks, self.codebook_dim)
        positive = zc > 0
        indices = self._bits_to_indices(positive)
        codes = self._codes(positive).reshape(z.shape)
        zero = z.new_zeros(())
        per_sample = batch = commitment = zero
        if self.training:
            if z.requires_grad:
                codes = straight_through(z, codes)
            if with_losses:
                flat = zc.reshape(b * n, self._num_codebooks, self.codebook_dim)
                if valid is not None:
                    flat = flat[valid.reshape(-1)]
                per_sample, batch, commitment = (
                    t.mean() for t in self.loss_terms(flat, inv_temperature, self.codebook_scale)
                )
        aux = per_sample - self.diversity_gamma * batch
        loss = self.entropy_loss_weight * aux + self.commitment_loss_weight * commitment
        return codes, indices, loss, LFQLossBreakdown(per_sample, batch, commitment)

    def loss_terms(
        self, flat: Tensor, inv_temperature: float, scale: float | Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Valid tokens (M, C, d) float32 -> unweighted (per_sample, batch, commitment), each (C,);
        zeros when unused.
        """
        zeros = flat.new_zeros(flat.shape[1])
        sync = self.entropy_loss_weight != 0 and should_sync(self.sync_entropy)
        if (
            flat.shape[0] == 0 and not sync
        ):  # under sync an empty rank still joins the batch-entropy all-reduce
            return zeros, zeros, zeros
        per_sample = batch = commitment = zeros
        if self.entropy_loss_weight != 0:
            per_sample, batch = lfq_entropy_terms(
                flat,
                inv_temperature,
                scale,
                max_exact_bits=self.max_exact_entropy_bits,
                chunk_bytes=self.entropy_chunk_bytes,
                sync=sync,
            )
            if flat.shape[0] == 0:
                per_sample = zeros + 0 * per_sample.nan_to_num()  # empty local mean; keeps the graph
        if flat.shape[0] == 0:
            return per_sample, batch, zeros
        if self.commitment_loss_weight > 0:
            s = scale.reshape(-1, 1) if isinstance(scale, Tensor) else scale
            commitment = (flat - torch.where(flat > 0, s, -s)).pow(2).mean((0, 2))
        return per_sample, batch, commitment

    def _token_mask(
        self, mask: Tensor | None, layout: TokenLayout, b: int, n: int, spatial: tuple
    ) -> Tensor | None:
        if mask is None:
            return None
        check_tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.ndim == 1:
            if mask.shape[0] != b:
                raise ValueError(f"a per-sample mask must have shape ({b},), got {tuple(mask.shape)}")
            return mask.unsqueeze(1).expand(b, n)
        return layout.mask_to_tokens(mask, b, spatial)

    def _indices_out(self, indices: Tensor) -> Tensor:
        return indices if self.keep_num_codebooks_dim else indices.squeeze(-1)

    # -- inference paths ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        with float32_region(x.device.type):
            z = project_into(self.project_in, tokens)
            z = z.reshape(z.shape[0], z.shape[1], self._num_codebooks, self.codebook_dim)
            indices = self._bits_to_indices(z > 0)
        return layout.indices_from_tokens(self._indices_out(indices), spatial)

    def decode(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices -> codes (after project_out unless ``project_out=False``) in the input layout;
        -1 gives zeros.
        """
        tokens, spatial, layout = index_tokens(
            indices,
            dim=self.dim,
            channel_first=self.channel_first,
            size=self._codebook_size,
            trailing=self._num_codebooks if self.keep_num_codebooks_dim else None,
        )
        with float32_region(tokens.device.type):
            codes = self._codes(self._indices_to_bits(tokens.clamp(min=0))).flatten(-2)
            out = project_from(self.project_out, codes) if project_out else codes
            out = out.masked_fill((tokens < 0).any(-1, keepdim=True), 0.0)
        return layout.from_tokens(out, spatial)

    indices_to_codes = decode

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        return bits * self.codebook_scale * 2 - self.codebook_scale

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: Tensor | None = None,
    ):
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        valid = self._token_mask(mask, layout, b, n, spatial)
        if valid is not None:
            tokens = torch.where(valid.unsqueeze(-1), tokens, tokens.new_zeros(()))
        with float32_region(x.device.type):
            codes, indices, loss, breakdown = self.quantize_tokens(
                project_into(self.project_in, tokens), inv_temperature, valid
            )
            out = project_from(self.project_out, codes)
            if valid is not None:
                out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
                indices = indices.masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = layout.indices_from_tokens(self._indices_out(indices), spatial)
        if return_loss_breakdown:
            return LFQOutputWithBreakdown(quantized, indices, loss, breakdown)
        return LFQOutput(quantized, indices, loss)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self._codebook_size}, num_codebooks={self._num_codebooks}, "
            f"scale={self.codebook_scale}"
        )


# -- ResidualLFQ -----------------------------------------------------------------------------------


class ResidualLFQ(Float32State, QuantizerModule):  # layer_scales stay float32
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n, Q) int64, aux losses (Q,); images/video too.

    Layer q is an LFQ with code scale ``2^-q`` on the residual of the layers before it (detached);
    one projection pair wraps the stack. Quantize dropout (SoundStream, arXiv 2107.03312) runs in
    training with gradients enabled; dropped layers give index -1 and loss 0 and decode to nothing.
    Extra keyword arguments go to every layer (``entropy_loss_weight``, ``diversity_gamma``, ...).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_quantizers: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool | None = None,
        projection_has_bias: bool = True,
        sync_quantize_dropout: bool | None = None,
        **lfq_kwargs,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_codebook_size(codebook_size)
        check_positive_int(num_quantizers, "num_quantizers")
        check_positive_int(quantize_dropout_multiple_of, "quantize_dropout_multiple_of")
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ValueError(
                f"quantize_dropout_cutoff_index must be in [0, {num_quantizers}), "
                f"got {quantize_dropout_cutoff_index}"
            )
        for key in ("dim", "codebook_scale", "num_codebooks", "channel_first", "has_projections"):
            if key in lfq_kwargs:
                raise TypeError(f"ResidualLFQ sets {key} of its layers itself; do not pass it")
        self.dim = dim
        self.codebook_dim = codebook_size.bit_length() - 1
        self.num_quantizers = num_quantizers
        self.dropout = QuantizeDropout(
            num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of
        )
        self.quantize_dropout = self.dropout.enabled
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.sync_quantize_dropout = sync_quantize_dropout
        self.channel_first = channel_first
        self.has_projections = dim != self.codebook_dim
        self.project_in, self.project_out = projection_pair(
            dim, self.codebook_dim, enabled=self.has_projections, bias=projection_has_bias
        )
        self.layers = nn.ModuleList(
            LFQ(codebook_size=codebook_size, codebook_scale=2.0**-q, **lfq_kwargs)
            for q in range(num_quantizers)
        )
        self._codebook_size = codebook_size
        self.register_buffer(
            "layer_scales", torch.tensor([2.0**-q for q in range(num_quantizers)]), persistent=False
        )

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    @property
    def num_codebooks(self) -> int:
        return 1

    def _run(self, z: Tensor, kept: int | None, inv_temperature: float, valid: Tensor | None):
        residual, total, indices, inputs, all_codes = z, None, [], [], []
        for q, layer in enumerate(self.layers):
            if kept is not None and q >= kept:
                indices.append(torch.full(z.shape[:-1], DROPPED_INDEX, dtype=INDEX_DTYPE, device=z.device))
                all_codes.append(torch.zeros_like(z))
                continue
            inputs.append(residual)
            codes, idx, _, _ = layer.quantize_tokens(residual, with_losses=False)
            residual = residual - codes.detach()
            total = codes if total is None else total + codes
            indices.append(idx.squeeze(-1))
            all_codes.append(codes)
        losses = z.new_zeros(self.num_quantizers)
        if self.training:  # every kept layer's losses at once: layers are the codebook axis
            first = self.layers[0]
            flat = torch.stack(inputs, -2).reshape(-1, len(inputs), self.codebook_dim)
            if valid is not None:
                flat = flat[valid.reshape(-1)]
            per_sample, batch, commitment = first.loss_terms(
                flat, inv_temperature, self.layer_scales[: len(inputs)]
            )
            aux = per_sample - first.diversity_gamma * batch
            kept_losses = first.entropy_loss_weight * aux + first.commitment_loss_weight * commitment
            losses = torch.cat((kept_losses, losses[len(inputs) :]))
        return total, torch.stack(indices, -1), losses, all_codes

    def encode(self, x: Tensor) -> Tensor:
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        with float32_region(x.device.type):
            _, indices, _, _ = self._run(project_into(self.project_in, tokens), None, 100.0, None)
        return layout.indices_from_tokens(indices, spatial)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        inv_temperature: float = 100.0,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        valid = self.layers[0]._token_mask(mask, layout, b, n, spatial)
        if valid is not None:
            tokens = torch.where(valid.unsqueeze(-1), tokens, tokens.new_zeros(()))
        kept = self.dropout.kept_layers(
            self.training,
            rand_quantize_dropout_fixed_seed,
            sync=self.dropout.enabled and self.training and should_sync(self.sync_quantize_dropout),
            device=x.device,
        )
        with float32_region(x.device.type):
            total, indices, losses, all_codes = self._run(
                project_into(self.project_in, tokens), kept, inv_temperature, valid
            )
            out = project_from(self.project_out, total)
            if valid is not None:
                out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
                indices = indices.masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = layout.indices_from_tokens(indices, spatial)
        if return_all_codes:
            codes = torch.stack([layout.from_tokens(c, spatial) for c in all_codes])
            return quantized, indices, losses, codes
        return LFQOutput(quantized, indices, losses)

    def _index_tokens(self, indices: Tensor):
        return index_tokens(
            indices,
            dim=self.dim,
            channel_first=self.channel_first,
            size=self._codebook_size,
            trailing=self.num_quantizers,
            axis="quantizer",
            at_most=True,
        )

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (..., Q') -> per-layer scaled codes (Q', b, n, bits) before project_out; -1 gives zeros."""
        tokens, _, _ = self._index_tokens(indices)
        return torch.stack([self._layer_codes(tokens, q) for q in range(tokens.shape[-1])])

    def _layer_codes(self, tokens: Tensor, q: int) -> Tensor:
        layer, idx = self.layers[q], tokens[..., q]
        codes = layer._codes(layer._indices_to_bits(idx.clamp(min=0)))
        return codes.masked_fill((idx < 0).unsqueeze(-1), 0.0)

    def decode(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, Q') with Q' <= Q -> quantized in the input layout; -1 adds nothing."""
        tokens, spatial, layout = self._index_tokens(indices)
        with float32_region(tokens.device.type):
            total = None
            for q in range(tokens.shape[-1]):
                codes = self._layer_codes(tokens, q)
                total = codes if total is None else total + codes
            out = project_from(self.project_out, total)
            out = out.masked_fill((tokens < 0).all(-1, keepdim=True), 0.0)
        return layout.from_tokens(out, spatial)

    get_output_from_indices = decode

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self._codebook_size}, num_quantizers={self.num_quantizers}"


@hookimpl
def register_quantizers(register):
    register(
        "lfq",
        LFQ,
        aliases=("LFQ", "lookup_free"),
        summary="lookup-free quantization with exact factorized entropy loss",
    )
    register(
        "residual_lfq",
        ResidualLFQ,
        aliases=("ResidualLFQ", "rlfq"),
        summary="residual stack of LFQ layers with code scales 2^-q",
    )
