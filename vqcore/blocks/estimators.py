"""Gradient estimators through the (non-differentiable) code choice.

Both return exactly ``q`` in the forward pass (``q + (f(x) - f(x).detach())``, where ``a - a == 0``
for finite ``a``), and differ only in the gradient that reaches ``x``.
"""

from __future__ import annotations

from torch import Tensor

from vqcore.blocks.distance import l2norm


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Straight-through estimator (arXiv 1711.00937): gradient of the identity."""
    return q.detach() + (x - x.detach())


def rotation_trick(x: Tensor, q: Tensor) -> Tensor:
    """Rotation trick (Fifty et al., arXiv 2410.06424, §4.2).

    The gradient flows through ``λ R x`` with ``R = I - 2 w wᵀ + 2 v uᵀ`` (u = x/|x|, v = q/|q|,
    w = (u + v)/|u + v|, all detached) and ``λ = |q| / |x|``: the fixed rotation and rescaling that
    maps x onto q. R is applied without forming the d x d matrix.
    """
    xd, qd = x.detach(), q.detach()
    u, v = l2norm(xd), l2norm(qd)
    w = l2norm(u + v)
    scale = qd.norm(dim=-1, keepdim=True) / xd.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    rotated = x - 2 * (x * w).sum(-1, keepdim=True) * w + 2 * (x * u).sum(-1, keepdim=True) * v
    rotated = scale * rotated
    return qd + (rotated - rotated.detach())
