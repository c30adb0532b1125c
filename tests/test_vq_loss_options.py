"""VectorQuantize's estimator, loss and forward options: DiVeQ (directional_reparam),
route_gradients_to_input, sync_update_v, the codebook diversity loss, the cross-entropy commitment loss,
forward(indices=), forward(topk=), forward(codebook_transform_fn=) and the loss breakdown.

None of them changes the inference path (encode / decode / eval forward without these forward arguments),
so the export checks stay those of tests/test_export.py; the conformance kit and the save/load round trip
run here on modules built with the options.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_state, snapshot

from vqcore import VectorQuantize
from vqcore.blocks.losses import CodebookDiversityLoss, CrossEntropyCommitmentLoss
from vqcore.errors import ConfigurationError
from vqcore.testing import check_quantizer


def books_of(vq: VectorQuantize, x: torch.Tensor) -> torch.Tensor:
    return vq.to_books(x).detach()


# -- the codebook diversity loss ------------------------------------------------------------------------


def hand_diversity(xs, codes, temperature):
    probs = []
    for x in xs:
        sims = [-math.dist(x, c) * temperature for c in codes]
        top = max(sims)
        exps = [math.exp(s - top) for s in sims]
        probs.append([e / sum(exps) for e in exps])
    mean = [sum(p[k] for p in probs) / len(probs) for k in range(len(codes))]
    return sum(p * math.log(p) for p in mean if p > 0)  # -H


def test_diversity_loss_is_the_negative_entropy_of_the_mean_distribution_over_valid_tokens():
    xs = [[0.0, 0.0], [1.0, 0.5], [0.2, -0.4], [9.0, 9.0]]
    codes = [[0.0, 0.1], [1.0, 0.0], [-1.0, 1.0]]
    book = SimpleNamespace(codes=torch.tensor([codes]), cosine=False)
    x = torch.tensor([xs])
    valid = torch.tensor([[True, True, True, False]])
    got = CodebookDiversityLoss(temperature=2.0)(x, x, torch.zeros(1, 4, dtype=torch.long), book, valid)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(hand_diversity(xs[:3], codes, 2.0), rel=1e-6)
    everything = CodebookDiversityLoss(temperature=2.0)(x, x, torch.zeros(1, 4, dtype=torch.long), book, None)
    assert everything.item() == pytest.approx(hand_diversity(xs, codes, 2.0), rel=1e-6)


def test_diversity_loss_in_chunks_equals_one_block_with_the_same_gradient_and_ignores_nan_padding():
    torch.manual_seed(0)
    codes = torch.randn(2, 7, 3, requires_grad=True)
    book = SimpleNamespace(codes=codes, cosine=False)
    x = torch.randn(2, 50, 3)
    valid = torch.rand(2, 50) > 0.3
    x[~valid] = float("nan")
    grads = []
    values = []
    for chunk_bytes in (1 << 24, 4 * 2 * 7 * 3):  # one block; 3 tokens a chunk (recomputed in backward)
        xi = x.clone().requires_grad_(True)
        loss = CodebookDiversityLoss(temperature=3.0, chunk_bytes=chunk_bytes)(
            xi, codes.detach().requires_grad_(True), None, SimpleNamespace(codes=codes, cosine=False), valid
        )
        loss.sum().backward()
        values.append(loss.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.isfinite(grads[0]).all() and (grads[0][~valid] == 0).all()
    assert book.codes is codes


def test_vq_diversity_loss_is_weighted_into_the_loss_and_reported_by_name():
    torch.manual_seed(1)
    vq = VectorQuantize(
        dim=4, codebook_size=6, codebook_diversity_loss_weight=0.3, codebook_diversity_temperature=5.0
    )
    x = torch.randn(2, 9, 4)
    codes = vq.codebook.detach().clone()
    out = vq.train()(x, return_loss_breakdown=True)
    want = hand_diversity(x.reshape(-1, 4).tolist(), codes.tolist(), 5.0)
    assert out.breakdown.codebook_diversity.item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(out.loss, out.breakdown.commitment + 0.3 * out.breakdown.codebook_diversity)


# -- the cross-entropy commitment loss ----------------------------------------------------------------------


def test_cross_entropy_commitment_is_the_ce_of_the_chosen_codes_over_valid_tokens():
    torch.manual_seed(2)
    vq = VectorQuantize(dim=4, codebook_size=5, commitment_weight=0.5, commitment_use_cross_entropy_loss=True)
    x = torch.randn(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    codes = vq.codebook.detach().clone()
    out = vq.train()(x, mask=mask, return_loss_breakdown=True)
    total, count = 0.0, 0
    for token, index in zip(x[mask].tolist(), out.indices[mask].tolist(), strict=True):
        logits = [-math.dist(token, c) for c in codes.tolist()]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[index]
        count += 1
    assert out.breakdown.commitment.item() == pytest.approx(total / count, rel=1e-5)
    torch.testing.assert_close(out.loss, 0.5 * out.breakdown.commitment)
    assert (out.indices[~mask] == -1).all()


def test_cross_entropy_commitment_trains_a_learnable_codebook():
    torch.manual_seed(3)
    vq = VectorQuantize(
        dim=4, codebook_size=5, learnable_codebook=True, commitment_use_cross_entropy_loss=True
    )
    vq.train()(torch.randn(2, 6, 4)).loss.backward()
    assert vq.codebook_module.codes.grad.abs().sum() > 0
    loss = CrossEntropyCommitmentLoss()
    assert loss.name == "cross_entropy_commitment"


# -- DiVeQ, route_gradients_to_input, sync_update_v -------------------------------------------------------


def learnable(**kwargs):
    return VectorQuantize(dim=3, codebook_size=4, learnable_codebook=True, **kwargs).train()


def test_directional_reparam_value_and_gradients_by_hand():
    torch.manual_seed(4)
    vq = learnable(directional_reparam=True, directional_reparam_variance=0.0, threshold_ema_dead_code=1e-9)
    x = torch.randn(2, 5, 3, requires_grad=True)
    codes = vq.codebook.detach().clone()
    out = vq(x, return_loss_breakdown=True)
    q = codes[out.indices]
    torch.testing.assert_close(out.quantized, q)
    assert out.loss.item() == 0.0 and out.breakdown.commitment.item() == 0.0  # no commitment term
    out.quantized.sum().backward()
    error = q - x.detach()
    unit = error / error.norm(dim=-1, keepdim=True)
    along = unit.sum(-1, keepdim=True) * unit  # gradient of ||e|| * sum(unit) with respect to q
    torch.testing.assert_close(x.grad, 1 - along)
    want = torch.zeros_like(codes).index_add_(0, out.indices.reshape(-1), along.reshape(-1, 3))
    torch.testing.assert_close(vq.codebook_module.codes.grad[0], want)


def test_directional_reparam_noise_keeps_the_distance_to_the_input():
    torch.manual_seed(5)
    vq = learnable(directional_reparam=True, directional_reparam_variance=0.5, threshold_ema_dead_code=1e-9)
    x = torch.randn(2, 5, 3, requires_grad=True)
    codes = vq.codebook.detach().clone()
    out = vq(x)
    q = codes[out.indices]
    torch.testing.assert_close((out.quantized - x).norm(dim=-1), (q - x).norm(dim=-1))
    assert not torch.allclose(out.quantized, q)


def test_route_gradients_to_input_false_trains_the_codes_not_the_input():
    torch.manual_seed(6)
    vq = learnable(route_gradients_to_input=False, commitment_weight=0.0)
    x = torch.randn(2, 5, 3, requires_grad=True)
    out = vq(x)
    out.quantized.sum().backward()
    assert x.grad is None
    counts = torch.bincount(out.indices.reshape(-1), minlength=4).float()
    torch.testing.assert_close(vq.codebook_module.codes.grad[0], counts[:, None].expand(4, 3))


@pytest.mark.parametrize("route", [True, False])
def test_sync_update_v_scales_the_output_gradient_by_one_plus_v(route):
    torch.manual_seed(7)
    vq = learnable(route_gradients_to_input=route, commitment_weight=0.0, sync_update_v=0.25)
    x = torch.randn(2, 5, 3, requires_grad=True)
    out = vq(x)
    out.quantized.sum().backward()
    counts = torch.bincount(out.indices.reshape(-1), minlength=4).float()
    if route:  # the straight-through output's gradient is the identity to x: scaled
        torch.testing.assert_close(x.grad, torch.full_like(x, 1.25))
        assert vq.codebook_module.codes.grad is None or vq.codebook_module.codes.grad.abs().sum() == 0
    else:
        assert x.grad is None
        torch.testing.assert_close(vq.codebook_module.codes.grad[0], 1.25 * counts[:, None].expand(4, 3))


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (
            dict(directional_reparam=True, threshold_ema_dead_code=1, rotation_trick=True),
            ("directional", "rotation_trick"),
        ),
        (
            dict(directional_reparam=True, threshold_ema_dead_code=1, straight_through=True),
            ("directional", "straight_through"),
        ),
        (dict(directional_reparam=True), ("directional_reparam", "threshold_ema_dead_code")),
        (dict(sync_update_v=0.5), ("sync_update_v", "learnable_codebook")),
        (dict(sync_update_v=1.5, learnable_codebook=True), ("sync_update_v", "between 0 and 1")),
        (dict(codebook_diversity_loss_weight=-1.0), ("codebook_diversity_loss_weight",)),
        (
            dict(codebook_diversity_loss_weight=1.0, codebook_diversity_temperature=0.0),
            ("codebook_diversity_loss_weight", "codebook_diversity_temperature"),
        ),
    ],
)
def test_conflicting_options_are_refused_naming_both(kwargs, names):
    with pytest.raises(ConfigurationError) as caught:
        VectorQuantize(dim=3, codebook_size=4, **kwargs)
    assert isinstance(caught.value, AssertionError)
    for name in names:
        assert name in str(caught.value)


# -- forward(indices=) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
def test_indices_give_the_cross_entropy_of_the_given_codes_and_change_no_state(cosine):
    torch.manual_seed(8)
    vq = VectorQuantize(dim=4, codebook_size=6, use_cosine_sim=cosine, kmeans_init=True).train()
    x = torch.randn(2, 5, 4)
    target = torch.randint(0, 6, (2, 5))
    target[0, 1] = -1
    before = snapshot(vq)
    quantized, loss = vq(x, indices=target)
    assert_same_state(vq, before)
    z = vq.to_books(x)[0].detach()
    codes = vq.codebook.detach()
    logits = z @ codes.T if cosine else -torch.cdist(z, codes)
    want = F.cross_entropy(logits, target.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, want)
    vq.eval()
    torch.testing.assert_close(quantized, vq(x).quantized)


def test_indices_with_heads_use_each_heads_codebook():
    torch.manual_seed(9)
    vq = VectorQuantize(dim=8, codebook_size=5, heads=2, separate_codebook_per_head=True).eval()
    x = torch.randn(2, 3, 8)
    target = torch.randint(0, 5, (2, 3, 2))
    _, loss = vq(x, indices=target)
    z = vq.to_books(x)  # (2 heads, 6 tokens, 4)
    total = sum(
        F.cross_entropy(-torch.cdist(z[h], vq.codebook[h]), target[..., h].reshape(-1), reduction="sum")
        for h in range(2)
    )
    torch.testing.assert_close(loss, total / 12)


def test_indices_of_the_wrong_shape_are_refused():
    vq = VectorQuantize(dim=4, codebook_size=6)
    with pytest.raises(ValueError, match="one index per token"):
        vq(torch.randn(2, 5, 4), indices=torch.zeros(2, 4, dtype=torch.long))


# -- forward(topk=) ----------------------------------------------------------------------------------------


def test_topk_one_equals_the_forward_without_a_codebook_step():
    torch.manual_seed(10)
    vq1 = VectorQuantize(dim=16, codebook_size=32, rotation_trick=True)
    vq2 = VectorQuantize(dim=16, codebook_size=32, rotation_trick=True)
    vq2.load_state_dict(vq1.state_dict())
    x = torch.randn(1, 64, 16)
    mask = torch.rand(1, 64) > 0.4
    before = snapshot(vq2)
    quantized1, indices1, loss1 = vq1.train()(x, mask=mask)
    quantized2, indices2, losses = vq2.train()(x, mask=mask, topk=1)
    assert quantized2.shape == (1, 64, 1, 16) and indices2.shape == losses.shape == (1, 64, 1)
    torch.testing.assert_close(loss1, losses.sum() / mask.sum())
    assert torch.equal(indices1, indices2[..., 0])
    torch.testing.assert_close(quantized1, quantized2[..., 0, :])
    assert_same_state(vq2, before)  # no EMA step: the caller replays the chosen indices


def test_topk_candidates_are_the_nearest_first_with_their_weighted_mse():
    torch.manual_seed(11)
    vq = VectorQuantize(dim=4, codebook_size=8, commitment_weight=2.0).eval()
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    quantized, indices, loss = vq(x, mask=mask, topk=3)
    codes = vq.codebook.detach()
    distances = torch.cdist(x, codes[None].expand(2, 8, 4))
    want = distances.argsort(-1)[..., :3]
    assert torch.equal(indices[mask], want[mask]) and (indices[~mask] == -1).all()
    chosen = codes[want]
    mse = (chosen - x.unsqueeze(2)).pow(2).mean(-1)
    torch.testing.assert_close(loss[mask], 2.0 * mse[mask])
    assert (loss[~mask] == 0).all() and (quantized[~mask] == 0).all()
    torch.testing.assert_close(quantized[mask], chosen[mask])
    assert vq(x, topk=100).indices.shape == (2, 3, 8)  # k clamped to the codebook size


def test_topk_gradient_is_the_estimator_per_candidate():
    torch.manual_seed(12)
    vq = VectorQuantize(dim=4, codebook_size=8).train()
    x = torch.randn(2, 3, 4, requires_grad=True)
    quantized, _, _ = vq(x, topk=3)
    quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))  # straight-through, once per candidate


def test_topk_follows_the_image_layout():
    vq = VectorQuantize(dim=4, codebook_size=8, accept_image_fmap=True).eval()
    x = torch.randn(2, 4, 3, 5)
    quantized, indices, loss = vq(x, topk=2)
    assert quantized.shape == (2, 4, 3, 5, 2) and indices.shape == loss.shape == (2, 3, 5, 2)
    torch.testing.assert_close(quantized[..., 0], vq(x).quantized)
    assert torch.equal(indices[..., 0], vq(x).indices)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(dim=8, heads=2), ("topk", "heads")),
        (dict(dim=4, commitment_use_cross_entropy_loss=True), ("topk", "commitment_use_cross_entropy_loss")),
    ],
)
def test_topk_conflicts_are_refused_naming_both_without_a_state_change(kwargs, names):
    vq = VectorQuantize(codebook_size=8, kmeans_init=True, **kwargs).train()
    before = snapshot(vq)
    with pytest.raises(ValueError) as caught:
        vq(torch.randn(2, 3, kwargs["dim"]), topk=2)
    for name in names:
        assert name in str(caught.value)
    assert_same_state(vq, before)


# -- forward(codebook_transform_fn=) -----------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
def test_codebook_transform_fn_quantizes_with_each_tokens_codebook(cosine):
    torch.manual_seed(13)
    vq = VectorQuantize(dim=4, codebook_size=6, use_cosine_sim=cosine).eval()
    x = torch.randn(2, 3, 4)
    shift = torch.randn(2, 3, 1, 4)

    def transform(codes):  # (1, 6, 4) -> (1, 2, 3, 6, 4)
        return codes[:, None, None] + shift

    out = vq(x, codebook_transform_fn=transform)
    per_token = vq.codebook.detach() + shift
    if cosine:
        per_token = F.normalize(per_token, dim=-1)
    z = vq.to_books(x)[0].reshape(2, 3, 4)
    scores = -(per_token * z.unsqueeze(2)).sum(-1) if cosine else (per_token - z.unsqueeze(2)).norm(dim=-1)
    want = scores.argmin(-1)
    assert torch.equal(out.indices, want)
    torch.testing.assert_close(
        out.quantized, per_token.gather(2, want[..., None, None].expand(2, 3, 1, 4))[:, :, 0]
    )


def test_codebook_transform_fn_trains_its_parameters_through_the_commitment_term():
    torch.manual_seed(14)
    vq = VectorQuantize(dim=4, codebook_size=6, learnable_codebook=True).train()
    mlp = torch.nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)

    def transform(codes):
        return mlp(codes)[:, None, None].expand(1, 2, 3, 6, 4)

    out = vq(x, codebook_transform_fn=transform)
    out.loss.backward()
    assert mlp.weight.grad.abs().sum() > 0 and vq.codebook_module.codes.grad.abs().sum() > 0


def test_codebook_transform_fn_of_the_wrong_shape_is_refused():
    vq = VectorQuantize(dim=4, codebook_size=6).eval()
    with pytest.raises(ValueError, match="per-token codebooks"):
        vq(torch.randn(2, 3, 4), codebook_transform_fn=lambda codes: codes)


# -- the loss breakdown ------------------------------------------------------------------------------------


def test_breakdown_unpacks_as_the_references_four_terms_with_the_extra_terms_by_name():
    torch.manual_seed(15)
    vq = VectorQuantize(
        dim=4, codebook_size=6, orthogonal_reg_weight=1.0, extra_losses={"codebook": 0.5}
    ).train()
    out = vq(torch.randn(2, 3, 4), return_loss_breakdown=True)
    commitment, diversity, orthogonal, inplace = out.breakdown
    assert out.breakdown._fields == ("commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize")
    assert commitment is out.breakdown.commitment and orthogonal.item() > 0
    assert diversity.item() == 0.0 and inplace.item() == 0.0
    assert out.breakdown.codebook is out.breakdown.extra["codebook"]
    replaced = out.breakdown._replace(inplace_optimize=commitment)
    assert replaced.inplace_optimize is commitment and replaced.codebook is out.breakdown.codebook
    with pytest.raises(AttributeError, match="no term 'nothing'"):
        _ = out.breakdown.nothing


# -- the kit and the save/load round trip -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codebook_diversity_loss_weight=0.1, commitment_use_cross_entropy_loss=True),
        dict(
            learnable_codebook=True, directional_reparam=True, threshold_ema_dead_code=0.5, sync_update_v=0.5
        ),
    ],
)
def test_modules_with_the_options_pass_the_kit(kwargs, tmp_path):
    # (route_gradients_to_input=False sends no gradient to the input on purpose, which the kit refuses)
    from helpers import assert_save_load_equal

    check_quantizer(
        VectorQuantize, torch.randn(2, 6, 4), check_export=False, dim=4, codebook_size=8, **kwargs
    )
    assert_save_load_equal(VectorQuantize(dim=4, codebook_size=8, **kwargs), torch.randn(2, 6, 4), tmp_path)


# -- against the installed reference -------------------------------------------------------------------------


def reference_and_converted(**kwargs):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(16)
    ref = vqp.VectorQuantize(dim=8, codebook_size=16, **kwargs)
    return ref, from_reference(ref)


def test_converter_carries_the_options_and_the_cross_entropy_commitment_matches():
    ref, mine = reference_and_converted(
        commitment_use_cross_entropy_loss=True, commitment_weight=0.5, rotation_trick=False
    )
    assert mine.commitment_use_cross_entropy_loss and mine.commitment_loss_name == "cross_entropy_commitment"
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(mine.train()(x).loss, ref.train()(x)[2], atol=1e-5, rtol=1e-5)


def test_diversity_loss_matches_the_reference_where_its_mean_is_over_the_whole_batch():
    # the reference averages over the batch axis per position: with one position that is every token
    ref, mine = reference_and_converted(
        codebook_diversity_loss_weight=2.0, codebook_diversity_temperature=3.0, rotation_trick=False
    )
    x = torch.randn(9, 1, 8)
    ours, theirs = mine.train()(x, return_loss_breakdown=True), ref.train()(x, return_loss_breakdown=True)
    torch.testing.assert_close(
        ours.breakdown.codebook_diversity, theirs[3].codebook_diversity, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(ours.loss, theirs[2], atol=1e-4, rtol=1e-4)


def test_topk_and_indices_match_the_reference_in_eval():
    ref, mine = reference_and_converted()
    ref.eval(), mine.eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        theirs, ours = ref(x, mask=mask, topk=4), mine(x, mask=mask, topk=4)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5, rtol=1e-5)
        target = torch.randint(-1, 16, (2, 5))
        torch.testing.assert_close(
            mine(x, indices=target).loss, ref(x, indices=target)[1], atol=1e-5, rtol=1e-5
        )


def test_directional_reparam_converts_with_its_learnable_codebook():
    ref, mine = reference_and_converted(directional_reparam=True, threshold_ema_dead_code=1)
    assert mine.directional_reparam and mine.codebook_module.trained_by_gradient
    x = torch.randn(2, 5, 8)
    ref.eval(), mine.eval()
    with torch.no_grad():
        assert torch.equal(mine(x).indices, ref(x)[1])


def test_codebook_transform_fn_with_an_ema_codebook_survives_the_ema_step_before_backward():
    torch.manual_seed(17)
    vq = VectorQuantize(dim=4, codebook_size=6, route_gradients_to_input=False).train()
    mlp = torch.nn.Linear(4, 4)
    before = vq.codebook.detach().clone()
    out = vq(
        torch.randn(2, 3, 4),
        codebook_transform_fn=lambda codes: mlp(codes)[:, None, None].expand(1, 2, 3, 6, 4),
    )
    assert not torch.equal(vq.codebook, before)  # the EMA step rewrote the codes the transform saw
    out.quantized.sum().backward()  # the output carries the transform's gradient only
    assert mlp.weight.grad.abs().sum() > 0
