"""Gradient estimators (vqcore.blocks.estimators): the value is q, the gradient is each method's own."""

from __future__ import annotations

import pytest
import torch

import vqcore
from vqcore.blocks.codebooks import EMACodebook
from vqcore.blocks.estimators import GumbelStraightThrough, RotationTrick, StraightThrough, resolve_estimator
from vqcore.protocols import Estimator


def test_builtin_estimators_are_registered_and_follow_the_protocol():
    for name, cls in (
        ("straight_through", StraightThrough),
        ("rotation_trick", RotationTrick),
        ("gumbel_straight_through", GumbelStraightThrough),
    ):
        est = vqcore.get_entry(name, kind="estimator").create()
        assert isinstance(est, cls) and isinstance(est, Estimator) and resolve_estimator(name) == est
    assert resolve_estimator("ste") == StraightThrough() and StraightThrough.identity_gradient
    with pytest.raises(TypeError, match="follow vqcore.protocols.Estimator"):
        resolve_estimator(42)


def test_straight_through_forward_is_q_and_gradient_is_identity():
    torch.manual_seed(0)
    x = torch.randn(4, 5, requires_grad=True)
    q = torch.randn(4, 5)
    out = StraightThrough()(x, q)
    assert torch.equal(out, q)
    g = torch.randn(4, 5)
    out.backward(g)
    assert torch.equal(x.grad, g)


def _rotation_matrix(x, q):
    u = x / x.norm()
    v = q / q.norm()
    w = (u + v) / (u + v).norm()
    eye = torch.eye(len(x), dtype=x.dtype)
    return (q.norm() / x.norm()) * (eye - 2 * torch.outer(w, w) + 2 * torch.outer(v, u))


def test_rotation_trick_forward_is_q_and_jacobian_is_lambda_r():
    torch.manual_seed(0)
    rotation_trick = RotationTrick()
    x = torch.randn(2, 3, dtype=torch.float64)
    q = torch.randn(2, 3, dtype=torch.float64)
    out = rotation_trick(x.clone().requires_grad_(), q)
    assert torch.equal(out.detach(), q)
    for t in range(2):
        lam_r = _rotation_matrix(x[t], q[t])
        # λR maps x onto q
        torch.testing.assert_close(lam_r @ x[t], q[t])
        jac = torch.autograd.functional.jacobian(
            lambda z, t=t: rotation_trick(z, q[t : t + 1])[0], x[t : t + 1]
        )[:, 0]
        torch.testing.assert_close(jac, lam_r)
    xg = x.clone().requires_grad_()
    g = torch.randn(2, 3, dtype=torch.float64)
    rotation_trick(xg, q).backward(g)
    want = torch.stack([_rotation_matrix(x[t], q[t]).T @ g[t] for t in range(2)])
    torch.testing.assert_close(xg.grad, want)
    assert not torch.allclose(xg.grad, g)


@pytest.mark.parametrize("cosine", [False, True])
def test_gumbel_straight_through_value_is_q_and_gradient_is_the_soft_assignment(cosine):
    torch.manual_seed(0)
    book = EMACodebook(6, 3, cosine=cosine)
    x = torch.randn(1, 5, 3, dtype=torch.float32)
    indices = book.nearest(x)
    q = book.lookup(indices).detach()
    xg = x.clone().requires_grad_()
    out = GumbelStraightThrough(temperature=0.5)(xg, q, indices, book)
    assert torch.equal(out.detach(), q)
    g = torch.randn_like(out)
    out.backward(g)
    # by hand: soft = softmax(sim(x, c) / t) @ c, sim = -||x - c|| (x . c for cosine)
    xs = x.clone().requires_grad_()
    codes = book.codes.detach()
    sim = xs @ codes.transpose(1, 2) if cosine else -torch.cdist(xs, codes)
    soft = torch.softmax(sim / 0.5, -1) @ codes
    soft.backward(g)
    torch.testing.assert_close(xg.grad, xs.grad)
    with pytest.raises(ValueError, match="temperature > 0"):
        GumbelStraightThrough(temperature=0.0)
    with pytest.raises(TypeError, match="logits"):
        GumbelStraightThrough()(xg, q, indices, None)


def test_directional_reparam_moves_along_the_error_sphere_and_trains_both_sides():
    from vqcore.blocks.estimators import directional_reparam

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g).requires_grad_()
    q = torch.randn(4, 6, generator=g).requires_grad_()
    exact = directional_reparam(x, q, 0.0)
    torch.testing.assert_close(exact, q, rtol=0, atol=1e-6)  # no noise: the value is q
    noisy = directional_reparam(x, q, 0.5, generator=torch.Generator().manual_seed(1))
    radius = (noisy - x).norm(dim=-1)
    torch.testing.assert_close(radius, (q - x).norm(dim=-1))  # the error's length is kept
    assert not torch.allclose(noisy, q)
    noisy.sum().backward()
    assert x.grad is not None and q.grad is not None
    direction = torch.nn.functional.normalize((noisy - x).detach(), dim=-1)
    unit_error = torch.nn.functional.normalize((q - x).detach(), dim=-1)
    # d/dq of sum(x + dir * |q - x|) = (sum of dir) * unit(q - x)
    torch.testing.assert_close(q.grad, direction.sum(-1, keepdim=True) * unit_error)
