"""SimVQ (Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer", arXiv 2411.02038), written against vqcore's protocols.

Plain VQ updates only the codes that get selected, so most of a large codebook dies. SimVQ keeps a
*frozen* random codebook ``C`` (K x d, entries ~ N(0, 1/d)) and learns one linear map ``W`` (d x d):
the codes in use are ``C W``. A gradient on any selected code moves ``W`` and so moves the whole
codebook at once; no code can be left behind.

- :class:`LinearReparamCodebook` (registered as codebook ``"simvq"``): follows
  :class:`vqcore.protocols.Codebook`; ``codes = C W``, ``nearest`` by Euclidean distance.
- :class:`CodebookFitLoss` (registered as loss ``"codebook_fit"``): ``mean ||sg(x) - q||^2``, the
  term that trains ``W`` (VQ-VAE's codebook term). The other term, commitment
  ``mean ||x - sg(q)||^2``, is vqcore's built-in ``"commitment"`` loss.
- :class:`SimVQ` (registered as quantizer ``"simvq"``): ``loss = codebook_fit + beta * commitment``,
  straight-through gradient to the input. Input ``(..., dim)``, indices ``(...)`` int64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqcore.blocks.losses import CommitmentLoss
from vqcore.module import QuantizerModule


class SimVQLossBreakdown(NamedTuple):
    """Unweighted terms (0-dim tensors)."""

    codebook_fit: Tensor
    commitment: Tensor


class SimVQOutput(NamedTuple):
    """vqcore's output convention: ``quantized, indices`` first. ``loss`` is 0-dim."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class SimVQOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: SimVQLossBreakdown


class LinearReparamCodebook(nn.Module):
    """A frozen random basis ``C`` (buffer, K x d) and a learned linear map ``W`` (parameter, d x d).

    ``codes = C @ W``. ``W`` starts as the identity, so the initial codebook is ``C`` itself. ``C`` is a
    persistent buffer: it is random, so it must travel with the weights (state_dict, vqcore.save).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be positive, got size={size}, dim={dim}")
        self.register_buffer("basis", torch.randn(size, dim) * dim**-0.5)
        self.weight = nn.Parameter(torch.eye(dim))

    # the Codebook protocol exposes tensors as properties (runtime_checkable protocols do not see buffers)
    @property
    def size(self) -> int:
        return self.basis.shape[0]

    @property
    def dim(self) -> int:
        return self.basis.shape[1]

    @property
    def codes(self) -> Tensor:
        """(K, d): the codebook in use, ``C W``. Differentiable with respect to ``W``."""
        return self.basis @ self.weight

    def nearest(self, x: Tensor, codes: Tensor | None = None) -> Tensor:
        """Indices (...) int64 of the nearest code for x (..., d).

        Export-safe: one matmul and an argmin over ``||c||^2 - 2 x.c`` (``||x||^2`` is the same for
        every code and dropped) -- no cdist, no Python branch on tensor values. Ties go to the lowest index.
        """
        codes = self.codes if codes is None else codes
        codes = codes.detach().to(x.dtype)
        scores = codes.pow(2).sum(-1) - 2 * (x.detach() @ codes.t())
        return scores.argmin(-1)

    def lookup(self, indices: Tensor, codes: Tensor | None = None) -> Tensor:
        """Vectors (..., d) for int64 indices (...); -1 (dropped / masked) decodes to zeros."""
        codes = self.codes if codes is None else codes
        valid = indices >= 0
        vectors = F.embedding(indices.clamp(min=0), codes)
        return torch.where(valid.unsqueeze(-1), vectors, vectors.new_zeros(()))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"


class CodebookFitLoss:
    """``mean ||sg(x) - q||^2``: moves the codes (here: ``W``) towards the inputs that chose them.

    x, q: (..., d). Returns a 0-dim tensor. Unweighted; the quantizer owns the weight.
    """

    name = "codebook_fit"

    def __call__(self, x: Tensor, q: Tensor) -> Tensor:
        return (x.detach() - q).pow(2).mean()


class SimVQ(QuantizerModule):
    """SimVQ quantizer: ``x (..., dim) -> (quantized (..., dim), indices (...) int64, loss ())``.

    Args:
        dim: feature size of the input (last axis).
        codebook_size: number of codes K.
        beta: weight of the commitment term (the paper's beta; 0.25 as in VQ-VAE).

    ``forward(x, return_loss_breakdown=False)`` in training gives the straight-through output
    ``x + sg(q - x)``; in eval ``quantized`` is the code itself, which is what ``decode(encode(x))``
    returns bit for bit. ``encode`` / ``decode`` never touch state and trace with dynamic leading axes.
    """

    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25):
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = 1
        self.beta = float(beta)
        self.codebook = LinearReparamCodebook(codebook_size, dim)
        self.codebook_fit_loss = CodebookFitLoss()
        self.commitment_loss = CommitmentLoss()

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"SimVQ expects features (..., {self.dim}), got shape {tuple(x.shape)}")

    def encode(self, x: Tensor) -> Tensor:
        """Features (..., dim) -> indices (...) int64."""
        self._check(x)
        return self.codebook.nearest(x)

    def decode(self, indices: Tensor) -> Tensor:
        """Indices (...) int64 -> vectors (..., dim); -1 decodes to zeros."""
        return self.codebook.lookup(indices)

    def forward(self, x: Tensor, return_loss_breakdown: bool = False):
        self._check(x)
        codes = self.codebook.codes
        indices = self.codebook.nearest(x, codes)
        q = self.codebook.lookup(indices, codes).to(x.dtype)
        if self.training:
            fit = self.codebook_fit_loss(x, q)
            commitment = self.commitment_loss(x, q)
            quantized = x + (q - x).detach() if x.requires_grad else q.detach()
        else:
            zero = torch.zeros((), device=x.device)
            fit = commitment = zero
            quantized = q
        loss = fit + self.beta * commitment
        if return_loss_breakdown:
            return SimVQOutputWithBreakdown(quantized, indices, loss, SimVQLossBreakdown(fit, commitment))
        return SimVQOutput(quantized, indices, loss)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}"
