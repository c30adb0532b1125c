"""LFQ: x (b, n, d) -> quantized (b, n, d), indices (b, n), entropy_aux_loss ().

Lookup-free quantization (MAGVIT-v2, arXiv 2310.05737): each of the ``d = log2(codebook_size)``
dimensions is quantized to ``±codebook_scale`` by its sign; the index reads the bits MOST significant
first, ``index = sum_i [x_i > 0] 2^(d-1-i)`` (as vector-quantize-pytorch 1.32.0; 0 maps to -scale).
The implicit codebook is a :class:`~vqcore.blocks.grid.BinaryCodebook` (``codebook_module``).

The path of a token (each step optional, in this order, as the reference): ``project_in`` (a Linear, or
the cosine-similarity projection :class:`CosineSimLinear`), the soft clamp ``tanh(z / c) c``
(``soft_clamp_input_value``), the split into codebooks, the fixed orthogonal rotation
(:mod:`vqcore.blocks.rotation`), and for binary spherical quantization (``spherical``, arXiv 2406.07548)
the L2 normalisation of each codebook's features to norm ``codebook_scale``; its codes are then
``±codebook_scale / sqrt(d)``, the scale of the codebook module. The sign test gives the indices; the
codes go back through the inverse rotation and ``project_out``.

Every loss term is a :class:`vqcore.protocols.Loss` evaluated on codebook-space books (one book per
codebook; ResidualLFQ: one per kept layer): the exact factorised entropies
(:mod:`vqcore.blocks.entropy`: ``per_sample_entropy``, ``batch_entropy``; spherical codes only change the
code scale they read), the shared ``commitment``, and any ``extra_losses``. Loss (training only)::

    entropy_loss_weight E + commitment_loss_weight commitment + sum of the weighted extra losses
    E = per_sample - diversity_gamma batch, or softplus(that + entropy_loss_offset)
        with experimental_softplus_entropy_loss

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- the entropies are exact: the reference clamps ``log(max(p, 1e-5))``, which lowers both entropies
  when codes of probability < 1e-5 carry mass (at tau = 100 and 2^16 codes: most of them); with the
  per-bit form nothing underflows to a NaN, so no clamp is needed. The loss equals the reference's
  when every code probability is >= 1e-5. Spherical LFQ keeps them exact too (no tokens x 2^d tensor);
- ``(b, n)`` masks work (the reference's collapse the batch entropy to the per-sample one); masked
  positions give index -1 and zero output (the library-wide convention), padding (even NaN) reaches no
  loss or gradient;
- ``frac_per_sample_entropy < 1`` samples the tokens of the per-sample entropy only (at least one token,
  so a single token keeps its entropy); the batch entropy stays exact over every token (the reference
  computes it from the sampled tokens, a biased estimate);
- quantization always runs in float32 and the output comes back in the input's dtype:
  ``force_quantization_f32=False`` is accepted and changes nothing (the signs, hence the indices, are
  those of the low-precision input either way);
- ``straight_through_activation`` defaults to None (the identity; a module default would not go into a
  JSON config); any module works, as in the reference;
- ``return_loss_breakdown=True`` returns ``((quantized, indices, entropy_aux_loss), breakdown)`` as the
  reference, as :class:`LFQOutputWithBreakdown`, whose fields ``quantized`` ... are also reachable
  directly; the breakdown has a fourth field ``extra`` (the ``extra_losses`` terms);
- the reference's persistent ``mask`` buffer (the bit weights) is not state: a state_dict that holds it
  loads (it is checked against the bit weights) and vqcore's own state_dicts leave it out;
- :attr:`LFQ.codebook` lists the codes as decoded (spherical normalisation and rotation applied); the
  reference's ``codebook`` buffer holds the raw ``±codebook_scale`` corners.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqcore.blocks import distributed
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
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.rotation import ORTHOGONAL_ROTATION_KEY, orthogonal_matrix, rotate, unrotate
from vqcore.blocks.validation import check_positive_int
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import DROPPED_INDEX

REFERENCE_BIT_WEIGHTS_KEY = "mask"  # the reference LFQ's persistent buffer of bit weights


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
    """``LFQ(..., return_loss_breakdown=True)``: ``(output, breakdown)``, which unpacks as the reference's
    ``((quantized, indices, entropy_aux_loss), breakdown)``; ``quantized``, ``indices`` and
    ``entropy_aux_loss`` read ``output``'s fields."""

    output: LFQOutput
    breakdown: LFQLossBreakdown

    @property
    def quantized(self) -> Tensor:
        return self.output.quantized

    @property
    def indices(self) -> Tensor:
        return self.output.indices

    @property
    def entropy_aux_loss(self) -> Tensor:
        return self.output.entropy_aux_loss


class LFQOutputWithCodes(NamedTuple):
    """``ResidualLFQ(..., return_all_codes=True)``: ``all_codes`` (Q, *input layout with log2(codebook_size)
    features): each layer's codes as decoded (before project_out), zeros for dropped layers."""

    quantized: Tensor
    indices: Tensor
    entropy_aux_loss: Tensor
    all_codes: Tensor


# the reference module's names for the two return types
Return = LFQOutput
LossBreakdown = LFQLossBreakdown


def is_distributed() -> bool:
    """Whether torch.distributed runs with more than one rank, evaluated at every call."""
    return distributed.is_distributed()


def maybe_distributed_mean(t: Tensor) -> Tensor:
    """The mean of ``t`` over ranks when torch.distributed runs (autograd sees through it: the backward
    sums the gradients over ranks); ``t`` itself otherwise."""
    if not distributed.is_distributed():
        return t
    return distributed.differentiable_all_reduce_sum(t, True) / torch.distributed.get_world_size()


def check_codebook_size(codebook_size: object, name: str = "codebook_size") -> int:
    """A power of 2 in ``[2, 2^62]`` (int64 indices)."""
    codebook_size = check_positive_int(codebook_size, name)
    if codebook_size & (codebook_size - 1):
        suggestion = 2 ** math.ceil(math.log2(codebook_size))
        raise ConfigurationError(
            f"{name} must be a power of 2 for lookup-free quantization, got {codebook_size} "
            f"(try {suggestion})"
        )
    if codebook_size < 2:
        raise ConfigurationError(f"{name} must be >= 2, got {codebook_size}")
    if codebook_size.bit_length() - 1 > MAX_BITS:
        raise ConfigurationError(
            f"{name} must be <= 2**{MAX_BITS} (int64 indices), got 2**{codebook_size.bit_length() - 1}"
        )
    return codebook_size


def check_soft_clamp(
    value: object, codebook_scale: float, name: str = "soft_clamp_input_value"
) -> float | None:
    """None, or a finite number >= ``codebook_scale`` (a clamp below the codes would cut them off)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number or None, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= codebook_scale):
        raise ConfigurationError(
            f"{name} must be a finite number >= codebook_scale ({codebook_scale}), got {value}"
        )
    return float(value)


def spherical_code_scale(bits: int, codebook_scale: float) -> float:
    """The coordinate of the spherical codes, ``codebook_scale / sqrt(bits)``, rounded as float32
    ``normalize(±codebook_scale) * codebook_scale`` rounds it."""
    corner = torch.full((bits,), float(codebook_scale))
    return float((F.normalize(corner, dim=-1) * codebook_scale)[0])


class CosineSimLinear(nn.Module):
    """``normalize(x) @ normalize(weight, dim=0) * scale``: a projection whose outputs are cosine
    similarities times ``scale``; ``weight`` (dim_in, dim_out), no bias (the reference's layout and key)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale

    def extra_repr(self) -> str:
        return f"dim_in={self.weight.shape[0]}, dim_out={self.weight.shape[1]}, scale={self.scale}"


class LFQ(Float32State, QuantizerModule):
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

    The reference's options: ``straight_through_activation`` (a module applied to the books in the
    straight-through path of a training forward: its gradient reaches the input, the value stays the
    code), ``frac_per_sample_entropy``, ``soft_clamp_input_value`` (>= ``codebook_scale``),
    ``cosine_sim_project_in`` / ``cosine_sim_project_in_scale`` (default ``codebook_scale``),
    ``experimental_softplus_entropy_loss`` / ``entropy_loss_offset``, ``spherical``,
    ``force_quantization_f32`` and ``orthogonal_rotation`` (buffer ``orthogonal_rot``, which stays float32
    through ``.half()`` and the like, as the quantization does).
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
        straight_through_activation: nn.Module | None = None,
        frac_per_sample_entropy: float = 1.0,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ConfigurationError("LFQ needs codebook_size or dim (or both), got neither")
        check_positive_int(num_codebooks, "num_codebooks")
        if codebook_size is None:
            codebook_size = 2 ** check_positive_int(dim, "dim")
        check_codebook_size(codebook_size)
        if isinstance(codebook_scale, bool) or not isinstance(codebook_scale, (int, float)):
            raise ConfigurationError(f"codebook_scale must be a number, got {type(codebook_scale).__name__}")
        if not (math.isfinite(codebook_scale) and codebook_scale > 0):
            raise ConfigurationError(f"codebook_scale must be a finite number > 0, got {codebook_scale}")
        if isinstance(frac_per_sample_entropy, bool) or not isinstance(frac_per_sample_entropy, (int, float)):
            raise ConfigurationError(
                f"frac_per_sample_entropy must be a number in (0, 1], "
                f"got {type(frac_per_sample_entropy).__name__}"
            )
        if not 0 < frac_per_sample_entropy <= 1:
            raise ConfigurationError(
                f"frac_per_sample_entropy must be in (0, 1], got {frac_per_sample_entropy}"
            )
        if straight_through_activation is not None and not isinstance(straight_through_activation, nn.Module):
            raise ConfigurationError(
                "straight_through_activation must be an nn.Module or None, "
                f"got {type(straight_through_activation).__name__}"
            )
        self.soft_clamp_input_value = check_soft_clamp(soft_clamp_input_value, codebook_scale)
        bits = codebook_size.bit_length() - 1
        self.codebook_axis = CodebookAxis(num_codebooks, bits, keep_num_codebooks_dim)
        self.codebook_dim = bits
        inner = bits * num_codebooks
        self.dim = inner if dim is None else check_positive_int(dim, "dim")
        self.has_projections = self.dim != inner if has_projections is None else bool(has_projections)
        if not self.has_projections and self.dim != inner:
            raise ConfigurationError(
                f"has_projections=False needs dim == log2(codebook_size) * num_codebooks = {inner}, "
                f"got dim={self.dim}"
            )
        self.project_in, self.project_out = projection_pair(
            self.dim, inner, enabled=self.has_projections, bias=projection_has_bias
        )
        self.cosine_sim_project_in = bool(cosine_sim_project_in)
        if self.cosine_sim_project_in and self.has_projections:
            scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
            self.project_in = CosineSimLinear(self.dim, inner, scale)
        self.entropy_loss_weight = float(entropy_loss_weight)
        self.commitment_loss_weight = float(commitment_loss_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.codebook_scale = float(codebook_scale)
        self.channel_first = channel_first
        self.frac_per_sample_entropy = float(frac_per_sample_entropy)
        self.experimental_softplus_entropy_loss = bool(experimental_softplus_entropy_loss)
        self.entropy_loss_offset = float(entropy_loss_offset)
        self.spherical = bool(spherical)
        self.force_quantization_f32 = bool(force_quantization_f32)
        self.orthogonal_rotation = bool(orthogonal_rotation)
        # the straight-through path's activation (the reference's attribute name); None: the identity
        self.activation = straight_through_activation
        self.orthogonal_rot: Tensor | None
        if self.orthogonal_rotation:  # drawn after the projections: the reference's order of draws
            self.register_buffer(ORTHOGONAL_ROTATION_KEY, orthogonal_matrix(bits))
        else:
            self.orthogonal_rot = None
        self.per_sample_entropy = PerSampleEntropyLoss(fraction=self.frac_per_sample_entropy)
        self.batch_entropy = BatchEntropyLoss(
            max_exact_bits=check_positive_int(max_exact_entropy_bits, "max_exact_entropy_bits"),
            chunk_bytes=check_positive_int(int(entropy_chunk_bytes), "entropy_chunk_bytes"),
            sync=sync_entropy,
        )
        self.commitment = CommitmentLoss()
        reserved = (PerSampleEntropyLoss.name, BatchEntropyLoss.name, CommitmentLoss.name)
        self.extra_losses = WeightedLosses(extra_loss_pairs(extra_losses, reserved=reserved))
        # the implicit codebook: one book per codebook, passed to every loss; spherical codes are
        # ±scale / sqrt(bits)
        code_scale = spherical_code_scale(bits, codebook_scale) if self.spherical else self.codebook_scale
        self.codebook_module = BinaryCodebook(bits, code_scale, books=num_codebooks)
        self.register_load_state_dict_pre_hook(_accept_reference_bit_weights)

    @property
    def codebook_size(self) -> int:
        return self.codebook_module.size

    @property
    def num_codebooks(self) -> int:
        return self.codebook_axis.num_codebooks

    @property
    def keep_num_codebooks_dim(self) -> bool:
        return self.codebook_axis.keep

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the codes (:attr:`codebook`): float32, the precision LFQ quantizes in."""
        return torch.float32

    @property
    def codebook(self) -> Tensor:
        """(codebook_size, codebook_dim) float32: every code as decoded (spherical and rotation applied),
        in index order (up to 2^20 codes)."""
        return unrotate(self.codebook_module.codes[0], self.orthogonal_rot)

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

    def quantizer_books(self, z: Tensor) -> Tensor:
        """Codebook-space tokens (b, n, C * bits) after project_in -> the books the sign test reads
        (C, b * n, bits): soft clamp, split, rotation, spherical normalisation (each where enabled)."""
        if self.soft_clamp_input_value is not None:
            z = torch.tanh(z / self.soft_clamp_input_value) * self.soft_clamp_input_value
        books = rotate(self.to_books(z), self.orthogonal_rot)
        if self.spherical:
            books = F.normalize(books, dim=-1) * self.codebook_scale
        return books

    def output_tokens(self, codes: Tensor, b: int, n: int) -> Tensor:
        """Books of codes (C, b * n, bits) -> codebook-space tokens (b, n, C * bits), rotated back."""
        return self.from_books(unrotate(codes, self.orthogonal_rot), b, n)

    def straight_through(self, books: Tensor, codes: Tensor) -> Tensor:
        """The training output of books that chose ``codes``: the codes' value, the gradient of the
        ``straight_through_activation`` (identity by default) of the books."""
        if self.activation is not None:
            books = self.activation(books)
        return straight_through(books, codes)

    def _project_in(self, tokens: Tensor) -> Tensor:
        """``project_in`` in its own dtype (as :func:`~vqcore.blocks.projection.project_into` runs a Linear),
        the result in float32."""
        if isinstance(self.project_in, CosineSimLinear):
            with float32_region(tokens.device.type):
                return self.project_in(tokens.to(self.project_in.weight.dtype)).float()
        return project_into(self.project_in, tokens)

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
        """``entropy_loss_weight E + commitment_loss_weight commitment + extra_total``, elementwise (per
        book, or on means), ``E = per_sample - diversity_gamma batch`` (with
        ``experimental_softplus_entropy_loss``: ``softplus(that + entropy_loss_offset)``)."""
        aux = terms.per_sample_entropy - self.diversity_gamma * terms.batch_entropy
        if self.experimental_softplus_entropy_loss:
            aux = F.softplus(aux + self.entropy_loss_offset)
        loss = self.entropy_loss_weight * aux + self.commitment_loss_weight * terms.commitment
        return loss + extra_total if self.extra_losses.pairs else loss

    # -- inference paths ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        with float32_region(x.device.type):
            books = self.quantizer_books(self._project_in(tokens))
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
        return layout.from_tokens(self.decode_tokens(tokens, project_out), spatial)

    def decode_tokens(self, tokens: Tensor, project_out: bool = True, dropped: bool = True) -> Tensor:
        """int64 tokens (b, n, num_codebooks) -> codes (b, n, dim) (codebook space without
        ``project_out``). No value check: the caller's tokens are in ``[0, codebook_size)``, or -1 (zeros)
        where ``dropped``; ``dropped=False`` (indices the caller built, never -1) skips the -1 handling."""
        b, n = tokens.shape[0], tokens.shape[1]
        with float32_region(tokens.device.type):
            books = tokens.reshape(-1, self.num_codebooks).transpose(0, 1)
            codes = self.output_tokens(
                self.codebook_module.lookup(books.clamp(min=0) if dropped else books), b, n
            )
            out = project_from(self.project_out, codes) if project_out else codes
            if dropped:
                out = out.masked_fill((tokens < 0).any(-1, keepdim=True), 0.0)
        return out

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
            books = self.quantizer_books(self._project_in(tokens))
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
                    codes = self.straight_through(books, codes)
                loss = self.weighted_loss(terms, extra_total)
            else:
                loss = zero
            out = project_from(self.project_out, self.output_tokens(codes, b, n))
            indices = self.token_indices(indices, b, n)
            if valid is not None:
                out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
                indices = indices.masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = layout.indices_from_tokens(self.codebook_axis.indices_out(indices), spatial)
        output = LFQOutput(quantized, indices, loss)
        if return_loss_breakdown:
            return LFQOutputWithBreakdown(output, terms)
        return output

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts, next to the generic dim, codebook_size and
        num_codebooks (vqcore.protocols.SupportsExportMetadata)."""
        meta: dict[str, Any] = {
            "codebook_dim": self.codebook_dim,
            "codebook_scale": self.codebook_scale,
            "channel_first": self.channel_first,
        }
        if self.spherical:
            meta["spherical"] = True
        if self.orthogonal_rotation:
            meta["orthogonal_rotation"] = True
        return meta

    def extra_repr(self) -> str:
        extra = "".join(
            f", {name}=True"
            for name in ("spherical", "orthogonal_rotation", "cosine_sim_project_in")
            if getattr(self, name)
        )
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
            f"scale={self.codebook_scale}{extra}"
        )


def _accept_reference_bit_weights(
    module: LFQ,
    state_dict: dict[str, Tensor],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: take the reference's ``mask`` buffer (bit weights ``2^(bits-1) ... 1``) out of the
    state_dict, reporting a load error when it holds other values."""
    value = state_dict.pop(prefix + REFERENCE_BIT_WEIGHTS_KEY, None)
    if value is None:
        return
    want = module.codebook_module.bit_weights
    if tuple(value.shape) != tuple(want.shape) or not torch.equal(value.to(want.device, want.dtype), want):
        error_msgs.append(
            f"{prefix}{REFERENCE_BIT_WEIGHTS_KEY}: the reference LFQ's bit weights must be "
            f"{want.tolist()} for codebook_size={module.codebook_size}, got {value.tolist()}"
        )


@hookimpl
def register_quantizers(register):
    register(
        "lfq",
        LFQ,
        aliases=("LFQ", "lookup_free"),
        summary="lookup-free quantization with exact factorized entropy loss",
    )
