"""Core contracts: what a quantizer, a codebook and an auxiliary loss are, and the output tuples.

Protocols are checked once (a factory's product in :func:`vqcore.create`, a plugin in the
conformance kit), never in a hot path. Tensors are exposed as properties because runtime-checkable
protocols do not see ``nn.Module`` buffers on Python >= 3.12.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

INDEX_DTYPE = torch.int64
DROPPED_INDEX = -1  # marks positions dropped by quantize dropout or masked out


@runtime_checkable
class Quantizer(Protocol):
    """An ``nn.Module`` with three paths.

    - ``forward(x, ...)``: training and eval; returns the method's NamedTuple (``quantized, indices, ...``).
    - ``encode(x) -> indices``: inference only, int64, no training state touched.
    - ``decode(indices) -> quantized``: inference only; ``decode(encode(x))`` equals the eval
      ``forward(x).quantized`` bit for bit.

    ``encode``/``decode`` must pass ``torch.export.export(strict=False)`` with dynamic batch and
    sequence axes: no Python branches on tensor values there.
    """

    dim: int
    codebook_size: int
    num_codebooks: int

    def forward(self, x: Tensor, *args, **kwargs): ...

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, indices: Tensor) -> Tensor: ...


@runtime_checkable
class Codebook(Protocol):
    """Holds code vectors: ``nearest(x) -> indices`` and ``lookup(indices) -> vectors``.

    Explicit codebooks (Euclidean, cosine) also implement ``update(x, indices)`` (EMA),
    ``init_(x)`` (k-means) and ``expire_(x)`` (dead codes).
    """

    @property
    def size(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def codes(self) -> Tensor: ...

    def nearest(self, x: Tensor) -> Tensor: ...

    def lookup(self, indices: Tensor) -> Tensor: ...


@runtime_checkable
class Loss(Protocol):
    """A named, unweighted auxiliary term; the quantizer owns its weight."""

    name: str

    def __call__(self, *args, **kwargs) -> Tensor: ...


# -- outputs: the first two fields are always (quantized, indices) -----------------------------------


class VQLossBreakdown(NamedTuple):
    """Unweighted terms of a VectorQuantize loss (0-dim tensors)."""

    commitment: Tensor
    orthogonal_reg: Tensor


class VQOutput(NamedTuple):
    """``quantized`` has the input's shape and dtype; ``indices`` int64; ``loss`` 0-dim."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class VQOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: VQLossBreakdown


def check_quantizer_instance(obj, origin: str = "factory") -> None:
    """Raise a TypeError naming what is missing when ``obj`` does not follow :class:`Quantizer`."""
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{origin} must build an nn.Module, got {type(obj).__name__}")
    missing = [
        name
        for name in ("dim", "codebook_size", "num_codebooks", "encode", "decode")
        if not hasattr(obj, name)
    ]
    if missing:
        raise TypeError(
            f"{origin} built {type(obj).__name__}, which does not follow vqcore.protocols.Quantizer: "
            f"missing {', '.join(missing)}"
        )


class ResidualVQOutput(NamedTuple):
    """ResidualVQ: indices (b, *positions, Q), losses (Q,); GroupedResidualVQ: indices (G, b, *positions, Q),
    losses (G, Q). Dropped (quantize dropout) and masked positions have index -1 and zero loss."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor


class ResidualVQOutputWithCodes(NamedTuple):
    """``return_all_codes=True``: ``all_codes`` (Q, b, *positions, codebook_dim) in codebook space (before
    project_out); GroupedResidualVQ gives a tuple of those, one per group."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor
    all_codes: Tensor | tuple[Tensor, ...]


# -- scalar quantizers (FSQ, LFQ, latent quantization) --------------------------------------------


class FSQOutput(NamedTuple):
    """FSQ / ResidualFSQ: ``quantized`` has the input's shape and dtype; ``indices`` int64 or None."""

    quantized: Tensor
    indices: Tensor | None


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


class LatentLossBreakdown(NamedTuple):
    """Unweighted latent-quantization terms (0-dim): commitment (trains the encoder),
    quantization (trains the values).
    """

    commitment: Tensor
    quantization: Tensor


class LatentQuantizeOutput(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor


class LatentQuantizeOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: LatentLossBreakdown
