"""Auxiliary losses: named, unweighted terms (the quantizer owns the weights).

Each loss is a small callable object with a ``name`` (the :class:`vqcore.protocols.Loss` protocol),
registered by the ``blocks`` built-in plugin so that plugins can look them up by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqcore.blocks.distance import l2norm
from vqcore.blocks.precision import float32_region


class CommitmentLoss:
    """``mean ||x - sg(q)||^2`` over valid tokens (VQ-VAE, arXiv 1711.00937): pulls the encoder to its codes.

    x, q: (..., N, d) in codebook space; ``valid`` (..., N) bool or None. Returns a 0-dim tensor.
    """

    name = "commitment"

    def __call__(
        self, x: Tensor, q: Tensor, valid: Tensor | None = None, train_codes: bool = False
    ) -> Tensor:
        """``train_codes``: q is not detached, so the same term also pulls the codes to the encoder's outputs
        (the codebook loss of a gradient-trained codebook, VQ-VAE's ``||sg(x) - q||^2``, with equal
        weight).
        """
        if not train_codes:
            q = q.detach()
        if valid is None:  # one fused kernel each way (~4x faster backward than sub + pow + mean on CPU)
            return F.mse_loss(x, q)
        diff = x - q
        weight = valid.unsqueeze(-1).to(diff.dtype)
        # where() before the square keeps a NaN in a masked token out of the sum and out of the gradient
        # (masking after the square would back-propagate 0 * 2 * NaN = NaN into the masked token)
        diff = torch.where(valid.unsqueeze(-1), diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
        return diff.pow(2).sum() / (weight.sum() * diff.shape[-1]).clamp(min=1)


class OrthogonalLoss:
    """Orthogonal codebook regulariser (arXiv 2112.00384): mean squared cosine similarity between codes.

    ``codes (B, n, d) -> Σ (Ĉ Ĉᵀ)² / (B n²) - 1/n`` where Ĉ are the l2-normalised codes; 0 when the
    codes are orthogonal (the diagonal's contribution, 1/n, is removed).
    """

    name = "orthogonal_reg"

    def __call__(self, codes: Tensor) -> Tensor:
        books, n, _ = codes.shape
        # float32 like the codebook it regularises (DESIGN §5): under autocast this GEMM ran in bf16,
        # which put ~2^-8 of rounding on every cosine (a bf16 loss, 0.2% off on random codes) and on the
        # codes' gradient
        with float32_region(codes.device.type):
            normed = l2norm(codes.float())
            cosine = normed @ normed.transpose(1, 2)
            return cosine.pow(2).sum() / (books * n * n) - 1.0 / n


commitment_loss = CommitmentLoss()
orthogonal_loss = OrthogonalLoss()
