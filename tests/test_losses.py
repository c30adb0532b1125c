"""The auxiliary losses (vqcore.blocks.losses): the Loss call signature, hand computations, masks,
weights and extra losses by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import hand_orthogonal

import vqcore
from vqcore.blocks.losses import (
    CodebookLoss,
    CommitmentLoss,
    OrthogonalLoss,
    WeightedLosses,
    extra_loss_pairs,
    masked_mse,
)
from vqcore.protocols import Loss


def _x_q():
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]]], requires_grad=True)
    q = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [5.0, 5.0]]], requires_grad=True)
    return x, q


def test_builtin_losses_follow_the_protocol_and_are_registered():
    for name, cls in (
        ("commitment", CommitmentLoss),
        ("codebook", CodebookLoss),
        ("orthogonal_reg", OrthogonalLoss),
    ):
        loss = vqcore.get_entry(name, kind="loss").create()
        assert isinstance(loss, cls) and isinstance(loss, Loss) and loss.name == name


def test_commitment_loss_hand_computation_and_mask():
    x, q = _x_q()
    loss = CommitmentLoss()(x, q, None, None, None)
    assert loss.shape == (1,)
    torch.testing.assert_close(loss, torch.tensor([(1 + 0 + 4 + 4 + 25 + 25) / 6]))
    valid = torch.tensor([[True, True, False]])
    masked = CommitmentLoss()(x, q, None, None, valid)
    torch.testing.assert_close(masked, torch.tensor([(1 + 0 + 4 + 4) / 4]))
    masked.sum().backward()
    assert q.grad is None, "the codes are detached"
    torch.testing.assert_close(x.grad, torch.tensor([[[0.5, 0.0], [1.0, -1.0], [0.0, 0.0]]]))
    # a NaN in a masked token stays out of the loss
    xn = x.detach().clone()
    xn[0, 2, 0] = float("nan")
    torch.testing.assert_close(CommitmentLoss()(xn, q, None, None, valid), masked.detach())
    # nothing valid -> 0, not NaN
    assert CommitmentLoss()(x, q, None, None, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_commitment_with_train_codes_reaches_the_codes_and_codebook_loss_only_the_codes():
    x, q = _x_q()
    CommitmentLoss(train_codes=True)(x, q, None, None, None).sum().backward()
    torch.testing.assert_close(q.grad, -x.grad)  # d/dq mean (x - q)^2 = -d/dx
    x, q = _x_q()
    fit = CodebookLoss()(x, q, None, None, None)
    torch.testing.assert_close(fit, CommitmentLoss()(x, q, None, None, None))  # same value
    fit.sum().backward()
    assert x.grad is None
    torch.testing.assert_close(q.grad, 2 * (q - x).detach() / 6)


def test_losses_are_per_book():
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]])  # two books of one token
    q = torch.zeros(2, 1, 2)
    torch.testing.assert_close(masked_mse(x, q, None), torch.tensor([0.5, 4.5]))
    torch.testing.assert_close(masked_mse(x, q, torch.tensor([[True], [False]])), torch.tensor([0.5, 0.0]))


def _codebook(codes):
    return SimpleNamespace(codes=torch.as_tensor(codes, dtype=torch.float32))


def test_orthogonal_loss_hand_computation():
    codes = [
        [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]],
        [[0.0, 0.0, 3.0], [1.0, -1.0, 1.0], [2.0, 0.0, 0.0]],
    ]
    indices = torch.zeros(2, 1, dtype=torch.long)
    got = OrthogonalLoss()(None, None, indices, _codebook(codes), None)
    torch.testing.assert_close(got, torch.tensor([hand_orthogonal(b) for b in codes]))
    # orthogonal codes -> 0 ; identical codes -> 1 - 1/n
    assert (
        OrthogonalLoss()(None, None, indices[:1], _codebook(torch.eye(4)[None] * 3), None).abs().item() < 1e-6
    )
    torch.testing.assert_close(
        OrthogonalLoss()(None, None, indices[:1], _codebook(torch.ones(1, 4, 2)), None),
        torch.tensor([1 - 1 / 4]),
    )


def test_orthogonal_loss_active_codes_only_and_max_codes():
    codes = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 0.0]]])
    indices = torch.tensor([[0, 1, 1, 3]])
    active = OrthogonalLoss(active_codes_only=True)(None, None, indices, _codebook(codes), None)
    torch.testing.assert_close(active, torch.tensor([hand_orthogonal([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0]])]))
    valid = torch.tensor([[True, True, True, False]])  # code 3 only from a masked token: not active
    active = OrthogonalLoss(active_codes_only=True)(None, None, indices, _codebook(codes), valid)
    torch.testing.assert_close(active, torch.tensor([0.0]))
    torch.manual_seed(0)
    capped = OrthogonalLoss(max_codes=2)(None, None, indices, _codebook(codes), None)
    pairs = [
        hand_orthogonal([codes[0, a].tolist(), codes[0, b].tolist()])
        for a in range(4)
        for b in range(4)
        if a != b
    ]
    assert any(abs(capped.item() - p) < 1e-6 for p in pairs)


def test_weighted_losses_total_terms_and_zero_weight_is_not_computed():
    calls = []

    class Counting:
        name = "counting"

        def __call__(self, x, q, indices, codebook, valid):
            calls.append(1)
            return x.new_full((x.shape[0],), 2.0)

    x, q = _x_q()
    losses = WeightedLosses([(CommitmentLoss(), 0.5), (Counting(), 3.0)])
    total, terms = losses(x, q, None, None, None)
    torch.testing.assert_close(total, 0.5 * terms["commitment"] + 6.0)
    assert set(terms) == {"commitment", "counting"} and calls == [1]
    total, terms = WeightedLosses([(Counting(), 0.0)])(x, q, None, None, None)
    assert calls == [1] and total.item() == 0.0 and terms["counting"].item() == 0.0
    with pytest.raises(ValueError, match="unique"):
        WeightedLosses([(CommitmentLoss(), 1.0), (CommitmentLoss(), 1.0)])


def test_extra_loss_specs_by_name_or_object_and_their_errors():
    pairs = extra_loss_pairs({"codebook": 0.25})
    assert isinstance(pairs[0][0], CodebookLoss) and pairs[0][1] == 0.25
    pairs = extra_loss_pairs([(CodebookLoss(), 1), ("orthogonal_reg", 2.0)])
    assert [p[0].name for p in pairs] == ["codebook", "orthogonal_reg"] and pairs[0][1] == 1.0
    with pytest.raises(KeyError, match="unknown loss 'nope'"):
        extra_loss_pairs({"nope": 1.0})
    with pytest.raises(TypeError, match="follow vqcore.protocols.Loss"):
        extra_loss_pairs([(object(), 1.0)])
    with pytest.raises(ValueError, match="finite number"):
        extra_loss_pairs({"codebook": float("nan")})
    with pytest.raises(ValueError, match="clash"):
        extra_loss_pairs({"commitment": 1.0}, reserved=("commitment",))
    with pytest.raises(TypeError, match="pairs"):
        extra_loss_pairs(["codebook"])


def test_code_cross_entropy_is_the_mean_over_non_ignored_targets_of_distance_logits():
    from vqcore.blocks.losses import code_cross_entropy

    g = torch.Generator().manual_seed(0)
    x, codes = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    target = torch.tensor([[0, -1, 4], [2, 2, -1]])
    total, count = 0.0, 0
    for b in range(2):
        for n in range(3):
            t = int(target[b, n])
            if t < 0:
                continue
            logits = -((x[b, n] - codes[b]) ** 2).sum(-1).sqrt()
            total += float(torch.logsumexp(logits, 0) - logits[t])
            count += 1
    got = code_cross_entropy(x, codes, target, cosine=False)
    assert got.shape == () and abs(float(got) - total / count) < 1e-5
    cos = code_cross_entropy(x, codes, target, cosine=True)
    logits = x @ codes.transpose(1, 2)
    keep = target >= 0
    expected = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(cos, expected)


def test_orthogonal_error_counts_a_zero_code_as_an_error_not_a_bonus():
    from vqcore.blocks.losses import orthogonal_error
    from vqcore.plugins.vq import orthogonal_loss_fn

    # one zero code among orthonormal ones: its normalised vector is 0, so its diagonal entry misses 1
    codes = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert torch.allclose(orthogonal_error(codes), torch.tensor([1 / 9]))
    # orthonormal codes: 0; equal codes: every off-diagonal pair counts 1
    assert float(orthogonal_error(torch.eye(3).unsqueeze(0))) == 0.0
    same = torch.ones(1, 2, 2)
    assert torch.allclose(orthogonal_error(same), torch.tensor([2 / 4]))
    # nonzero codes: the classic form sum((C C^T)^2) / n^2 - 1/n
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 5, 3, generator=g)
    normed = torch.nn.functional.normalize(c, dim=-1)
    classic = (normed @ normed.transpose(1, 2)).pow(2).sum((1, 2)) / 25 - 1 / 5
    torch.testing.assert_close(orthogonal_error(c), classic)
    torch.testing.assert_close(orthogonal_loss_fn(c), classic.mean())
