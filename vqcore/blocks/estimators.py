"""Gradient estimators through the (non-differentiable) code choice, following
:class:`vqcore.protocols.Estimator`: ``estimator(x, q, indices, codebook) -> (B, N, d)``.

Each returns exactly ``q`` in the forward pass (``q + (f(x) - f(x).detach())``, where ``a - a == 0`` for
finite ``a``) and differs only in the gradient that reaches ``x``. Registered by name by the built-in
``blocks`` plugin: ``straight_through``, ``rotation_trick``, ``gumbel_straight_through``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vqcore.blocks.distance import l2norm
from vqcore.protocols import Codebook, Estimator


@dataclass(frozen=True)
class StraightThrough:
    """Straight-through estimator (arXiv 1711.00937): the gradient of the identity."""

    name: ClassVar[str] = "straight_through"
    identity_gradient: ClassVar[bool] = True

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor | None = None, codebook: Codebook | None = None
    ) -> Tensor:
        return q.detach() + (x - x.detach())


@dataclass(frozen=True)
class RotationTrick:
    """Rotation trick (Fifty et al., arXiv 2410.06424, §4.2).

    The gradient flows through ``λ R x`` with ``R = I - 2 w wᵀ + 2 v uᵀ`` (u = x/|x|, v = q/|q|,
    w = (u + v)/|u + v|, all detached) and ``λ = |q| / |x|``: the fixed rotation and rescaling that
    maps x onto q. R is applied without forming the d x d matrix.
    """

    name: ClassVar[str] = "rotation_trick"
    identity_gradient: ClassVar[bool] = False

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor | None = None, codebook: Codebook | None = None
    ) -> Tensor:
        xd, qd = x.detach(), q.detach()
        u, v = l2norm(xd), l2norm(qd)
        w = l2norm(u + v)
        scale = qd.norm(dim=-1, keepdim=True) / xd.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        rotated = x - 2 * (x * w).sum(-1, keepdim=True) * w + 2 * (x * u).sum(-1, keepdim=True) * v
        rotated = scale * rotated
        return qd + (rotated - rotated.detach())


@dataclass(frozen=True)
class GumbelStraightThrough:
    """Gumbel-softmax straight-through (Jang et al., arXiv 1611.01144): the value is the chosen code,
    the gradient that of the soft assignment ``softmax(logits(x) / temperature) @ codes``.

    ``logits`` are the codebook's similarities (``-||x - c||^2``, or ``x . c`` for cosine codebooks), so
    the codebook must offer ``logits(x) -> (B, N, size)``; the soft assignment is a (tokens x codes)
    tensor. The codes are detached: they learn from the losses, not through this estimator.
    """

    temperature: float = 1.0
    name: ClassVar[str] = "gumbel_straight_through"
    identity_gradient: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"gumbel_straight_through needs a temperature > 0, got {self.temperature}")

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor | None = None, codebook: Codebook | None = None
    ) -> Tensor:
        logits_of = getattr(codebook, "logits", None)
        if codebook is None or logits_of is None:
            raise TypeError(
                f"gumbel_straight_through needs a codebook with logits(x); got {type(codebook).__name__}"
            )
        soft = torch.softmax(logits_of(x) / self.temperature, dim=-1)
        soft_codes = torch.bmm(soft, codebook.codes.detach().to(soft.dtype))
        return q.detach() + (soft_codes - soft_codes.detach())


def directional_reparam(
    x: Tensor, q: Tensor, variance: float = 5e-3, generator: torch.Generator | None = None
):
    """DiVeQ's directional reparameterisation (arXiv 2509.26469): ``x + ||q - x|| * sg(unit(q - x + noise))``,
    ``noise ~ N(0, variance)`` per feature.

    The value is q moved by the noise along the sphere of radius ``||q - x||`` around x (exactly q when
    ``variance == 0``); the gradient reaches x (the identity plus the error norm's gradient) and q through
    the error norm, so the codes are learned from the task loss without a commitment term. Not an
    :class:`~vqcore.protocols.Estimator`: its value is not q.
    """
    error = q - x
    noise = torch.randn(error.shape, generator=generator, device=error.device, dtype=error.dtype)
    direction = l2norm((error + variance**0.5 * noise).detach())
    return x + direction * error.norm(dim=-1, keepdim=True)


def resolve_estimator(estimator: str | Estimator) -> Estimator:
    """An Estimator object, or one built from its registry name (``vqcore list --all`` shows the names)."""
    if isinstance(estimator, str):
        from vqcore.registry import get_registry

        return get_registry().get_entry(estimator, "estimator").create()
    if not isinstance(estimator, Estimator):
        raise TypeError(
            "an estimator must be a registered name or follow vqcore.protocols.Estimator "
            f"(a callable with a name), got {type(estimator).__name__}"
        )
    return estimator


straight_through = StraightThrough()
