"""Auxiliary losses: named, unweighted terms (the quantizer owns the weights).

Each loss is a small callable object with a ``name`` (the :class:`vqcore.protocols.Loss` protocol),
registered by the ``blocks`` built-in plugin so that plugins can look them up by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqcore.distance import l2norm


class CommitmentLoss:
    """``mean ||x - sg(q)||^2`` over valid tokens (VQ-VAE, arXiv 1711.00937): pulls the encoder to its codes.

    x, q: (..., N, d) in codebook space; ``valid`` (..., N) bool or None. Returns a 0-dim tensor.
    """

    name = "commitment"

    def __call__(self, x: Tensor, q: Tensor, valid: Tensor | None = None) -> Tensor:
        err = (x - q.detach()).pow(2)
        if valid is None:
            return err.mean()
        weight = valid.unsqueeze(-1).to(err.dtype)
        # where() keeps a NaN in a masked token out of the sum (0 * NaN would be NaN)
        total = torch.where(valid.unsqueeze(-1), err, torch.zeros((), dtype=err.dtype, device=err.device)).sum()
        return total / (weight.sum() * err.shape[-1]).clamp(min=1)


class OrthogonalLoss:
    """Orthogonal codebook regulariser (arXiv 2112.00384): mean squared cosine similarity between codes.

    ``codes (B, n, d) -> Σ (Ĉ Ĉᵀ)² / (B n²) - 1/n`` where Ĉ are the l2-normalised codes; 0 when the
    codes are orthogonal (the diagonal's contribution, 1/n, is removed).
    """

    name = "orthogonal_reg"

    def __call__(self, codes: Tensor) -> Tensor:
        books, n, _ = codes.shape
        normed = l2norm(codes)
        cosine = normed @ normed.transpose(1, 2)
        return cosine.pow(2).sum() / (books * n * n) - 1.0 / n


commitment_loss = CommitmentLoss()
orthogonal_loss = OrthogonalLoss()
