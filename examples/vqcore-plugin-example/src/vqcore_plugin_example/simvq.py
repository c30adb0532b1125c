"""SimVQ (Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer", arXiv 2411.02038), written against vqcore's protocols.

Plain VQ updates only the codes that get selected, so most of a large codebook dies. SimVQ keeps a
*frozen* random codebook ``C`` (K x d, entries ~ N(0, 1/d)) and learns one linear map ``W`` (d x d):
the codes in use are ``C W``. A gradient on any selected code moves ``W`` and so moves the whole
codebook at once; no code can be left behind.

- :class:`LinearReparamCodebook` (registered as codebook ``"simvq"``): follows
  :class:`vqcore.protocols.Codebook`, so it also plugs into vqcore's built-in quantizers:
  ``vqcore.VectorQuantize(dim, codebook_size, codebook="simvq")``, ``vqcore.ResidualVQ(...,
  codebook="simvq")``. It is trained by gradient, so those quantizers let the commitment term reach it.
- :class:`CodebookFitLoss` (registered as loss ``"codebook_fit"``): ``mean ||sg(x) - q||^2``, the term
  that trains ``W`` (VQ-VAE's codebook term), following :class:`vqcore.protocols.Loss`. The other
  term, commitment ``mean ||x - sg(q)||^2``, is vqcore's built-in ``"commitment"`` loss.
- :class:`SimVQ` (registered as quantizer ``"simvq"``): ``loss = codebook_fit + beta * commitment``,
  straight-through gradient to the input. Input ``(..., dim)``, indices ``(...)`` int64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vqcore
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
    """``books`` frozen random bases ``C`` (buffer, books x K x d) and learned linear maps ``W``
    (parameter, books x d x d): ``codes = C @ W``.

    ``W`` starts as the identity, so the initial codebook is ``C`` itself. ``C`` is a persistent buffer:
    it is random, so it must travel with the weights (state_dict, vqcore.save). Shapes follow the
    Codebook protocol: books first, ``nearest(x (B, N, d)) -> (B, N)``, ``lookup((B, N)) -> (B, N, d)``.
    """

    cosine = False  # inputs are searched as they are (no l2-normalisation)
    trained_by_gradient = True  # the quantizer's losses train W; there is no statistics step

    def __init__(self, size: int, dim: int, books: int = 1):
        super().__init__()
        if size < 1 or dim < 1 or books < 1:
            raise ValueError(
                f"size, dim and books must be positive, got size={size}, dim={dim}, books={books}"
            )
        self.register_buffer("basis", torch.randn(books, size, dim) * dim**-0.5)
        self.weight = nn.Parameter(torch.eye(dim).repeat(books, 1, 1))

    # the Codebook protocol exposes tensors as properties (runtime_checkable protocols do not see buffers)
    @property
    def size(self) -> int:
        return self.basis.shape[1]

    @property
    def dim(self) -> int:
        return self.basis.shape[2]

    @property
    def books(self) -> int:
        return self.basis.shape[0]

    @property
    def codes(self) -> Tensor:
        """(books, K, d): the codebook in use, ``C W``. Differentiable with respect to ``W``."""
        return self.basis @ self.weight

    def nearest(self, x: Tensor) -> Tensor:
        """Indices (B, N) int64 of the nearest code for x (B, N, d).

        Export-safe: one batched matmul and an argmin over ``||c||^2 - 2 x.c`` (``||x||^2`` is the same
        for every code and dropped) -- no cdist, no Python branch on tensor values. Ties go to the
        lowest index.
        """
        codes = self.codes.detach().to(x.dtype)
        scores = codes.pow(2).sum(-1).unsqueeze(1) - 2 * torch.bmm(x.detach(), codes.transpose(1, 2))
        return scores.argmin(-1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Vectors (B, N, d) for int64 indices (B, N) in [0, K); differentiable with respect to ``W``."""
        offsets = torch.arange(self.books, device=indices.device).unsqueeze(1) * self.size
        return F.embedding(indices + offsets, self.codes.reshape(-1, self.dim))

    def prepare_(self, x: Tensor, valid: Tensor | None = None, *, sync: bool = False) -> None:
        """No data-dependent initialisation."""

    def train_step_(
        self, x: Tensor, indices: Tensor, valid: Tensor | None = None, *, sync: bool = False
    ) -> None:
        """No statistics: W learns from the quantizer's losses (DDP averages its gradient)."""

    def extra_repr(self) -> str:
        return f"books={self.books}, size={self.size}, dim={self.dim}"


class CodebookFitLoss:
    """``mean ||sg(x) - q||^2`` per book, over valid tokens: moves the codes (here: ``W``) towards the
    inputs that chose them. Unweighted; the quantizer owns the weight."""

    name = "codebook_fit"

    def __call__(self, x: Tensor, q: Tensor, indices: Tensor, codebook, valid: Tensor | None) -> Tensor:
        err = (x.detach() - q).pow(2).mean(-1)  # (B, N)
        if valid is None:
            return err.mean(-1)
        err = torch.where(valid, err, torch.zeros((), dtype=err.dtype, device=err.device))
        return err.sum(-1) / valid.sum(-1).clamp(min=1)


class SimVQ(QuantizerModule):
    """SimVQ quantizer: ``x (..., dim) -> (quantized (..., dim), indices (...) int64, loss ())``.

    Args:
        dim: feature size of the input (last axis).
        codebook_size: number of codes K.
        beta: weight of the commitment term (the paper's beta; 0.25 as in VQ-VAE).

    ``forward(x, return_loss_breakdown=False)`` in training gives the straight-through output
    ``x + sg(q - x)``; in eval ``quantized`` is the code itself, which is what ``decode(encode(x))``
    returns bit for bit. ``encode`` / ``decode`` never touch state and trace with dynamic leading axes;
    -1 (dropped or masked) decodes to zeros.
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
        self.commitment_loss = vqcore.get_entry("commitment", kind="loss").create()  # vqcore's built-in

    def _books(self, x: Tensor) -> Tensor:
        """(..., dim) -> one book of tokens (1, N, dim)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"SimVQ expects features (..., {self.dim}), got shape {tuple(x.shape)}")
        return x.reshape(1, -1, self.dim)

    def encode(self, x: Tensor) -> Tensor:
        """Features (..., dim) -> indices (...) int64."""
        return self.codebook.nearest(self._books(x)).reshape(x.shape[:-1])

    def decode(self, indices: Tensor) -> Tensor:
        """Indices (...) int64 -> vectors (..., dim); -1 decodes to zeros."""
        flat = indices.reshape(1, -1)
        vectors = self.codebook.lookup(flat.clamp(min=0))
        vectors = torch.where((flat >= 0).unsqueeze(-1), vectors, vectors.new_zeros(()))
        return vectors.reshape(*indices.shape, self.dim)

    def forward(self, x: Tensor, return_loss_breakdown: bool = False):
        z = self._books(x)
        indices = self.codebook.nearest(z)
        q = self.codebook.lookup(indices).to(x.dtype)
        if self.training:
            fit = self.codebook_fit_loss(z, q, indices, self.codebook, None)[0]
            commitment = self.commitment_loss(z, q, indices, self.codebook, None)[0]
            quantized = z + (q - z).detach() if x.requires_grad else q.detach()
        else:
            zero = torch.zeros((), device=x.device)
            fit = commitment = zero
            quantized = q
        loss = fit + self.beta * commitment
        quantized, indices = quantized.reshape(x.shape), indices.reshape(x.shape[:-1])
        if return_loss_breakdown:
            return SimVQOutputWithBreakdown(quantized, indices, loss, SimVQLossBreakdown(fit, commitment))
        return SimVQOutput(quantized, indices, loss)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}"
