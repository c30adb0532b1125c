"""LFQ and ResidualLFQ: x (b, n, d) -> quantized (b, n, d), indices (b, n), entropy_aux_loss ().

Lookup-free quantization (MAGVIT-v2, arXiv 2310.05737): each of the ``d = log2(codebook_size)``
dimensions is quantized to ``±codebook_scale`` by its sign; the index reads the bits MOST significant
first, ``index = sum_i [x_i > 0] 2^(d-1-i)`` (as vector-quantize-pytorch 1.32.0; 0 maps to -scale).
The implicit codebook is a :class:`~vqcore.blocks.grid.BinaryCodebook` (``codebook_module``).

Every loss term is a :class:`vqcore.protocols.Loss` evaluated on codebook-space books (one book per
codebook; ResidualLFQ: one per kept layer): the exact factorised entropies
(:mod:`vqcore.blocks.entropy`: ``per_sample_entropy``, ``batch_entropy``), the shared ``commitment``, and
any ``extra_losses``. Loss (training only)::

    entropy_loss_weight (per_sample - diversity_gamma batch) + commitment_loss_weight commitment
        + sum of the weighted extra losses

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- the entropies are exact: the reference clamps ``log(max(p, 1e-5))``, which lowers both entropies
  when codes of probability < 1e-5 carry mass (at tau = 100 and 2^16 codes: most of them); with the
  per-bit form nothing underflows to a NaN, so no clamp is needed. The loss equals the reference's
  when every code probability is >= 1e-5;
- ``(b, n)`` masks work (the reference's collapse the batch entropy to the per-sample one); masked
  positions give index -1 and zero output (the library-wide convention), padding (even NaN) reaches no
  loss or gradient;
- no ``frac_per_sample_entropy`` (the exact terms are cheap), ``spherical``, ``soft_clamp_input_value``
  (on LFQ) or ``experimental_softplus_entropy_loss``;
- ResidualLFQ accepts images/video (detected, channel-first), and indices decode from a coarse prefix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vqcore.blocks.entropy import (
    DEFAULT_ENTROPY_CHUNK_BYTES,
    DEFAULT_MAX_EXACT_BITS,
    BatchEntropyLoss,
    PerSampleEntropyLoss,
)
from vqcore.blocks.estimators import straight_through
from vqcore.blocks.grid import MAX_BITS, BinaryCodebook
from vqcore.blocks.layout import (
    CodebookAxis,
    auto_layout,
    index_tokens,
    token_mask,
    zero_padding,
)
from vqcore.blocks.losses import CommitmentLoss, LossSpec, WeightedLosses, extra_loss_pairs
from vqcore.blocks.precision import float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.validation import check_positive_int
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import DROPPED_INDEX


class LFQLossBreakdown(NamedTuple):
    """Unweighted LFQ terms: mean per-token entropy, entropy of the batch code distribution, commitment;
    ``extra``: the terms of ``extra_losses`` by name. 0-dim (means over codebooks) in the forward's
    breakdown; one value per book from :meth:`LFQ.book_losses`."""

    per_sample_entropy: Tensor
    batch_entropy: Tensor
    commitment: Tensor
    extra: dict[str, Tensor]


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


class LFQOutputWithCodes(NamedTuple):
    """``ResidualLFQ(..., return_all_codes=True)``: ``all_codes`` (Q, *input layout with log2(codebook_size)
    features): each layer's scaled codes before project_out, zeros for dropped layers."""

    quantized: Tensor
    indices: Tensor
    entropy_aux_loss: Tensor
    all_codes: Tensor


def check_codebook_size(codebook_size: object, name: str = "codebook_size") -> int:
    """A power of 2 in ``[2, 2^62]`` (int64 indices)."""
    codebook_size = check_positive_int(codebook_size, name)
    if codebook_size & (codebook_size - 1):
        suggestion = 2 ** math.ceil(math.log2(codebook_size))
        raise ValueError(
            f"{name} must be a power of 2 for lookup-free quantization, got {codebook_size} "
            f"(try {suggestion})"
        )
    if codebook_size < 2:
        raise ValueError(f"{name} must be >= 2, got {codebook_size}")
    if codebook_size.bit_length() - 1 > MAX_BITS:
        raise ValueError(
            f"{name} must be <= 2**{MAX_BITS} (int64 indices), got 2**{codebook_size.bit_length() - 1}"
        )
    return codebook_size


class LFQ(QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n) int64, entropy_aux_loss ()
    — see the module docstring.

    Give ``codebook_size`` (a power of 2; bits per codebook ``log2(codebook_size)``) and/or ``dim``
    (default ``bits * num_codebooks``; otherwise Linear projections in and out). Layouts (detected):
    ``(b, n, dim)``, ``(b, dim)``, ``(b, dim, n)`` with ``channel_first=True``, images ``(b, dim, h, w)``
    and video ``(b, dim, t, h, w)``; ``num_codebooks > 1`` adds a trailing codebook axis to the indices.
    ``forward(x, inv_temperature=100., return_loss_breakdown=False, mask=None)``; ``mask`` is ``(b,)``
    or shaped like the indices without the codebook axis, True = keep. ``extra_losses``:
    ``{"name": weight}`` or ``[(name or Loss, weight), ...]``, added to the loss and reported in the
    breakdown's ``extra``; they see the codebook-space books and the :attr:`codebook_module`.
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
        max_exact_entropy_bits: int = DEFAULT_MAX_EXACT_BITS,
        entropy_chunk_bytes: int = DEFAULT_ENTROPY_CHUNK_BYTES,
        sync_entropy: bool | None = None,
        extra_losses: LossSpec = None,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs codebook_size or dim (or both)")
        check_positive_int(num_codebooks, "num_codebooks")
        if codebook_size is None:
            codebook_size = 2 ** check_positive_int(dim, "dim")
        check_codebook_size(codebook_size)
        if codebook_scale <= 0:
            raise ValueError(f"codebook_scale must be > 0, got {codebook_scale}")
        bits = codebook_size.bit_length() - 1
        self.codebook_axis = CodebookAxis(num_codebooks, bits, keep_num_codebooks_dim)
        self.codebook_dim = bits
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
        self.per_sample_entropy = PerSampleEntropyLoss()
        self.batch_entropy = BatchEntropyLoss(
            max_exact_bits=check_positive_int(max_exact_entropy_bits, "max_exact_entropy_bits"),
            chunk_bytes=check_positive_int(int(entropy_chunk_bytes), "entropy_chunk_bytes"),
            sync=sync_entropy,
        )
        self.commitment = CommitmentLoss()
        reserved = (PerSampleEntropyLoss.name, BatchEntropyLoss.name, CommitmentLoss.name)
        self.extra_losses = WeightedLosses(extra_loss_pairs(extra_losses, reserved=reserved))
        # the implicit codebook: one book per codebook, passed to every loss
        self.codebook_module = BinaryCodebook(bits, self.codebook_scale, books=num_codebooks)

    @property
    def codebook_size(self) -> int:
        return self.codebook_module.size

    @property
    def num_codebooks(self) -> int:
        return self.codebook_axis.num_codebooks

    @property
    def keep_num_codebooks_dim(self) -> bool:
        return self.codebook_axis.keep

    # -- books: codebook space (b, n, C * bits) <-> (C, b * n, bits) -------------------------------------
    def to_books(self, z: Tensor) -> Tensor:
        """Codebook-space tokens (b, n, C * bits) -> books (C, b * n, bits) (a view)."""
        return z.reshape(-1, self.num_codebooks, self.codebook_dim).transpose(0, 1)

    def from_books(self, q: Tensor, b: int, n: int) -> Tensor:
        """Books (C, b * n, bits) -> tokens (b, n, C * bits)."""
        return q.transpose(0, 1).reshape(b, n, self.num_codebooks * self.codebook_dim)

    def token_indices(self, indices: Tensor, b: int, n: int) -> Tensor:
        """Book indices (C, b * n) -> (b, n, C)."""
        return indices.transpose(0, 1).reshape(b, n, self.num_codebooks)

    # -- losses on books (used by forward and by ResidualLFQ) ---------------------------------------------
    def book_losses(
        self,
        x: Tensor,
        q: Tensor,
        indices: Tensor,
        valid: Tensor | None = None,
        *,
        inv_temperature: float = 100.0,
        codebook: BinaryCodebook | None = None,
    ) -> tuple[LFQLossBreakdown, Tensor]:
        """Books x (B, N, bits) float32 that chose codes q / indices, tokens where ``valid`` (B, N) ->
        (every unweighted term (B,), the weighted extra losses (B,)); the term is zeros where its weight
        is 0. ``codebook``: the books' :class:`BinaryCodebook` (default: ``codebook_module``).

        A mask shared by every book (one book, or expanded over books, as the forward paths pass it) is
        applied once: every term then sees the valid tokens only, with ``valid=None``."""
        codebook = self.codebook_module if codebook is None else codebook
        if valid is not None and (valid.shape[0] == 1 or valid.stride(0) == 0):
            keep = valid[0].nonzero().squeeze(1)
            x, q, indices, valid = (
                x.index_select(1, keep),
                q.index_select(1, keep),
                indices.index_select(1, keep),
                None,
            )
        if valid is None and x.shape[1] == 0:  # no token: every term 0; still one shared mask under sync
            valid = torch.zeros((1, 0), dtype=torch.bool, device=x.device).expand(x.shape[0], 0)
        zeros = x.new_zeros(x.shape[0])
        per_sample = batch = commitment = zeros
        if self.entropy_loss_weight != 0:
            per_sample_loss, batch_loss = self.per_sample_entropy, self.batch_entropy
            if inv_temperature != per_sample_loss.inv_temperature:
                per_sample_loss = dataclasses.replace(per_sample_loss, inv_temperature=inv_temperature)
                batch_loss = dataclasses.replace(batch_loss, inv_temperature=inv_temperature)
            per_sample = per_sample_loss(x, q, indices, codebook, valid)
            batch = batch_loss(x, q, indices, codebook, valid)
        if self.commitment_loss_weight > 0:
            commitment = self.commitment(x, q, indices, codebook, valid)
        extra_total, extra = self.extra_losses(x, q, indices, codebook, valid)
        return LFQLossBreakdown(per_sample, batch, commitment, extra), extra_total

    def weighted_loss(self, terms: LFQLossBreakdown, extra_total: Tensor) -> Tensor:
        """``entropy_loss_weight (per_sample - diversity_gamma batch) + commitment_loss_weight commitment
        + extra_total``, elementwise (per book, or on means)."""
        aux = terms.per_sample_entropy - self.diversity_gamma * terms.batch_entropy
        loss = self.entropy_loss_weight * aux + self.commitment_loss_weight * terms.commitment
        return loss + extra_total if self.extra_losses.pairs else loss

    # -- inference paths ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        with float32_region(x.device.type):
            books = self.to_books(project_into(self.project_in, tokens))
            indices = self.token_indices(self.codebook_module.nearest(books), b, n)
        return layout.indices_from_tokens(self.codebook_axis.indices_out(indices), spatial)

    def decode(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices -> codes (after project_out unless ``project_out=False``) in the input layout;
        -1 gives zeros.
        """
        tokens, spatial, layout = index_tokens(
            indices,
            dim=self.dim,
            channel_first=self.channel_first,
            size=self.codebook_size,
            trailing=self.codebook_axis.trailing,
        )
        b, n = tokens.shape[0], tokens.shape[1]
        with float32_region(tokens.device.type):
            books = tokens.reshape(-1, self.num_codebooks).transpose(0, 1)
            codes = self.from_books(self.codebook_module.lookup(books.clamp(min=0)), b, n)
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
        valid = token_mask(layout, b, n, spatial, mask, per_sample=True)
        tokens = zero_padding(tokens, valid)
        with float32_region(x.device.type):
            books = self.to_books(project_into(self.project_in, tokens))
            indices, codes = self.codebook_module.quantize(books)
            zero = books.new_zeros(())
            terms = LFQLossBreakdown(zero, zero, zero, dict.fromkeys(self.extra_losses.names, zero))
            extra_total = zero
            if self.training:
                book_valid = None if valid is None else valid.reshape(1, -1).expand(self.num_codebooks, -1)
                book_terms, extra_total = self.book_losses(
                    books, codes, indices, book_valid, inv_temperature=inv_temperature
                )
                terms = LFQLossBreakdown(
                    book_terms.per_sample_entropy.mean(),
                    book_terms.batch_entropy.mean(),
                    book_terms.commitment.mean(),
                    {k: t.mean() for k, t in book_terms.extra.items()},
                )
                extra_total = extra_total.mean()
                if books.requires_grad:
                    codes = straight_through(books, codes)
            loss = self.weighted_loss(terms, extra_total)
            out = project_from(self.project_out, self.from_books(codes, b, n))
            indices = self.token_indices(indices, b, n)
            if valid is not None:
                out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
                indices = indices.masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = layout.indices_from_tokens(self.codebook_axis.indices_out(indices), spatial)
        if return_loss_breakdown:
            return LFQOutputWithBreakdown(quantized, indices, loss, terms)
        return LFQOutput(quantized, indices, loss)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts, next to the generic dim, codebook_size and
        num_codebooks (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.codebook_dim,
            "codebook_scale": self.codebook_scale,
            "channel_first": self.channel_first,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
            f"scale={self.codebook_scale}"
        )


@hookimpl
def register_quantizers(register):
    register(
        "lfq",
        LFQ,
        aliases=("LFQ", "lookup_free"),
        summary="lookup-free quantization with exact factorized entropy loss",
    )
