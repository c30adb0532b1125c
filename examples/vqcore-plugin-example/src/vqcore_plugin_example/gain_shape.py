"""Gain-shape vector quantization (Sabin & Gray, "Product code vector quantizers for waveform and voice
coding", IEEE Trans. ASSP 32(3), 1984), written against vqcore's protocols.

A vector is split into its direction (the "shape", a unit vector) and its length (the "gain"). The shape
is quantized by a codebook of unit directions, the gain by a small scalar grid, and the code is their
product ``g * s``: ``K`` directions and ``L`` gain levels give ``K * L`` codes for the storage and search
cost of ``K + L``. Inputs whose scale varies a lot (audio frames, say) share one set of directions.

- :class:`DirectionCodebook` (registered as codebook ``"unit_direction"``): ``K`` unit directions trained
  by EMA (the normalised mean of the unit inputs each direction won, a spherical k-means step), searched
  by the largest dot product; it follows :class:`vqcore.protocols.Codebook` (``cosine = True``), so it also
  plugs into vqcore's built-in quantizers: ``vqcore.VectorQuantize(dim, codebook_size,
  codebook="unit_direction")``.
- :class:`DirectionLoss` (registered as loss ``"direction_commitment"``): ``mean ||x/|x| - sg(s)||^2``, the
  commitment of the input's direction to its chosen shape whatever its length, following
  :class:`vqcore.protocols.Loss`.
- :class:`GainShapeVQ` (registered as quantizer ``"gain_shape_vq"``): shape ``s`` = the direction nearest
  to ``x / |x|``; gain = the level of a fixed geometric grid (``gain_levels`` values from ``gain_min`` to
  ``gain_max``) nearest to ``x . s`` (for a fixed unit ``s``, ``||x - g s||^2`` is a parabola in ``g``
  with its minimum at ``x . s``). Index ``= shape * gain_levels + gain``. Loss ``commitment_weight *
  mean ||x - sg(q)||^2 + direction_weight * direction_commitment``, straight-through gradient to the
  input. Input ``(..., dim)``, indices ``(...)`` int64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vqcore
from vqcore.blocks.distributed import all_reduce_sum_
from vqcore.module import QuantizerModule


class GainShapeLossBreakdown(NamedTuple):
    """Unweighted terms (0-dim tensors)."""

    commitment: Tensor
    direction_commitment: Tensor


class GainShapeOutput(NamedTuple):
    """vqcore's output convention: ``quantized, indices`` first. ``loss`` is 0-dim."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class GainShapeOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: GainShapeLossBreakdown


class DirectionCodebook(nn.Module):
    """``books`` codebooks of ``size`` unit directions (buffer ``embed``, books x K x d), trained by EMA.

    The training step accumulates, per direction, the count and the sum of the unit inputs that chose it
    (``cluster_size``, ``embed_sum``, decayed by ``decay``) and sets each used direction to its normalised
    sum; a direction no input has chosen keeps its vector. Under torch.distributed (``sync``) the counts
    and sums are all-reduced first, so every rank takes the step one process would take on all batches.
    """

    cosine = True  # the quantizer l2-normalises its inputs; the nearest code has the largest dot product
    trained_by_gradient = False  # EMA statistics, no gradient

    def __init__(self, size: int, dim: int, books: int = 1, decay: float = 0.9):
        super().__init__()
        if size < 1 or dim < 1 or books < 1:
            raise ValueError(
                f"size, dim and books must be positive, got size={size}, dim={dim}, books={books}"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.register_buffer("embed", F.normalize(torch.randn(books, size, dim), dim=-1))
        self.register_buffer("cluster_size", torch.zeros(books, size))
        self.register_buffer("embed_sum", torch.zeros(books, size, dim))

    # the Codebook protocol exposes tensors as properties (runtime_checkable protocols do not see buffers)
    @property
    def size(self) -> int:
        return self.embed.shape[1]

    @property
    def dim(self) -> int:
        return self.embed.shape[2]

    @property
    def books(self) -> int:
        return self.embed.shape[0]

    @property
    def codes(self) -> Tensor:
        """(books, K, d) unit directions."""
        return self.embed

    def nearest(self, x: Tensor) -> Tensor:
        """Indices (B, N) int64 of the direction with the largest dot product with x (B, N, d).

        Export-safe: one batched matmul and an argmax, no Python branch on tensor values; ties go to the
        lowest index.
        """
        return torch.bmm(x.detach(), self.embed.to(x.dtype).transpose(1, 2)).argmax(-1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Directions (B, N, d) for int64 indices (B, N) in [0, K)."""
        offsets = torch.arange(self.books, device=indices.device).unsqueeze(1) * self.size
        return F.embedding(indices + offsets, self.embed.reshape(-1, self.dim))

    def prepare_(self, x: Tensor, valid: Tensor | None = None, *, sync: bool = False) -> None:
        """No data-dependent initialisation: the directions start uniform on the sphere."""

    @torch.no_grad()
    def train_step_(
        self, x: Tensor, indices: Tensor, valid: Tensor | None = None, *, sync: bool = False
    ) -> None:
        """One EMA step from unit inputs x (B, N, d) that chose ``indices`` (B, N); ``valid`` (B, N) marks
        the tokens that count."""
        weight = torch.ones_like(indices, dtype=x.dtype) if valid is None else valid.to(x.dtype)
        counts = torch.zeros_like(self.cluster_size).scatter_add_(1, indices, weight)
        sums = torch.zeros_like(self.embed_sum)
        sums.scatter_add_(1, indices.unsqueeze(-1).expand_as(x), x.float() * weight.unsqueeze(-1))
        all_reduce_sum_(counts, sync)
        all_reduce_sum_(sums, sync)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        used = (self.cluster_size > 0).unsqueeze(-1)
        self.embed.copy_(torch.where(used, F.normalize(self.embed_sum, dim=-1), self.embed))

    def extra_repr(self) -> str:
        return f"books={self.books}, size={self.size}, dim={self.dim}, decay={self.decay}"


class DirectionLoss:
    """``mean ||x/|x| - sg(s)||^2`` per book over valid tokens: the input's direction to its chosen shape
    ``s``, whatever the input's length. Unweighted; the quantizer owns the weight."""

    name = "direction_commitment"

    def __call__(self, x: Tensor, q: Tensor, indices: Tensor, codebook, valid: Tensor | None) -> Tensor:
        err = (F.normalize(x, dim=-1) - F.normalize(q.detach(), dim=-1)).pow(2).mean(-1)  # (B, N)
        if valid is None:
            return err.mean(-1)
        err = torch.where(valid, err, torch.zeros((), dtype=err.dtype, device=err.device))
        return err.sum(-1) / valid.sum(-1).clamp(min=1)


class GainShapeVQ(QuantizerModule):
    """Gain-shape VQ: ``x (..., dim) -> (quantized (..., dim), indices (...) int64, loss ())``.

    Args:
        dim: feature size of the input (last axis).
        codebook_size: number of shapes (unit directions) K; the quantizer has ``K * gain_levels`` codes.
        gain_levels: number of gain levels L, geometrically spaced in ``[gain_min, gain_max]``.
        decay: EMA decay of the direction codebook.
        commitment_weight, direction_weight: the loss weights (see the module docstring).

    ``forward(x, return_loss_breakdown=False)``: in training, the straight-through output
    ``x + sg(q - x)`` and one EMA step of the directions; in eval ``quantized`` is the code itself, what
    ``decode(encode(x))`` returns bit for bit. ``encode`` / ``decode`` never touch state and trace with
    dynamic leading axes; -1 (dropped or masked) decodes to zeros.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        gain_levels: int = 16,
        gain_min: float = 0.1,
        gain_max: float = 10.0,
        decay: float = 0.9,
        commitment_weight: float = 1.0,
        direction_weight: float = 0.1,
    ):
        super().__init__()
        if gain_levels < 1:
            raise ValueError(f"gain_levels must be >= 1, got {gain_levels}")
        if not 0 < gain_min <= gain_max:
            raise ValueError(
                f"gain_min and gain_max must satisfy 0 < gain_min <= gain_max, got {gain_min}, {gain_max}"
            )
        if commitment_weight < 0 or direction_weight < 0:
            raise ValueError("commitment_weight and direction_weight must be >= 0")
        self.dim, self.num_codebooks = dim, 1
        self.num_shapes, self.gain_levels = codebook_size, gain_levels
        self.codebook_size = codebook_size * gain_levels
        self.commitment_weight, self.direction_weight = float(commitment_weight), float(direction_weight)
        # the codebook and the loss by their registered names: the registry builds them
        self.shapes = vqcore.get_entry("unit_direction", kind="codebook").create(
            size=codebook_size, dim=dim, books=1, decay=decay
        )
        self.direction_loss = vqcore.get_entry("direction_commitment", kind="loss").create()
        self.commitment_loss = vqcore.get_entry("commitment", kind="loss").create()  # vqcore's built-in
        grid = torch.logspace(math.log10(gain_min), math.log10(gain_max), gain_levels)
        self.register_buffer("gains", grid, persistent=False)  # a function of the arguments: not state

    def _books(self, x: Tensor) -> Tensor:
        """(..., dim) -> one book of float32 tokens (1, N, dim)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"GainShapeVQ expects features (..., {self.dim}), got shape {tuple(x.shape)}")
        return x.reshape(1, -1, self.dim).float()

    def _choose(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens (1, N, dim) -> (shape indices (1, N), gain indices (1, N), codes (1, N, dim))."""
        shape = self.shapes.nearest(F.normalize(z, dim=-1))
        direction = self.shapes.lookup(shape)
        projection = (z.detach() * direction).sum(-1, keepdim=True)  # the best gain for this direction
        gain = (projection - self.gains).abs().argmin(-1)
        return shape, gain, self.gains[gain].unsqueeze(-1) * direction

    def encode(self, x: Tensor) -> Tensor:
        """Features (..., dim) -> indices (...) int64: ``shape * gain_levels + gain``."""
        shape, gain, _ = self._choose(self._books(x))
        return (shape * self.gain_levels + gain).reshape(x.shape[:-1])

    def decode(self, indices: Tensor) -> Tensor:
        """Indices (...) int64 in ``[0, codebook_size)`` or -1 -> codes (..., dim); -1 decodes to zeros."""
        if not isinstance(indices, Tensor) or indices.is_floating_point():
            raise TypeError("indices must be an integer tensor")
        flat = indices.reshape(1, -1).long()
        kept = flat.clamp(min=0)
        codes = self.gains[kept % self.gain_levels].unsqueeze(-1) * self.shapes.lookup(
            kept // self.gain_levels
        )
        codes = torch.where((flat >= 0).unsqueeze(-1), codes, codes.new_zeros(()))
        return codes.reshape(*indices.shape, self.dim)

    def forward(self, x: Tensor, return_loss_breakdown: bool = False):
        z = self._books(x)
        shape, gain, q = self._choose(z)
        indices = shape * self.gain_levels + gain
        if self.training:
            commitment = self.commitment_loss(z, q, indices, self.shapes, None)[0]
            direction = self.direction_loss(z, q, indices, self.shapes, None)[0]
            self.shapes.train_step_(F.normalize(z.detach(), dim=-1), shape)
            quantized = z + (q - z).detach() if x.requires_grad else q
        else:
            commitment = direction = torch.zeros((), device=x.device)
            quantized = q
        loss = self.commitment_weight * commitment + self.direction_weight * direction
        quantized, indices = quantized.to(x.dtype).reshape(x.shape), indices.reshape(x.shape[:-1])
        if return_loss_breakdown:
            breakdown = GainShapeLossBreakdown(commitment, direction)
            return GainShapeOutputWithBreakdown(quantized, indices, loss, breakdown)
        return GainShapeOutput(quantized, indices, loss)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, shapes={self.num_shapes}, gain_levels={self.gain_levels}, "
            f"codebook_size={self.codebook_size}"
        )
