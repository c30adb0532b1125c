"""Non-finite input (NaN / ±Inf tokens) never corrupts the state of a stateful method.

Policy (what these tests pin down):
- non-finite values are data, not an argument error: no method raises on them (a check would cost a
  device sync per call), and every index stays an int64 in [0, codebook_size);
- VQ family (VectorQuantize, ResidualVQ incl. shared codebook, GroupedResidualVQ; k-means init,
  dead-code expiry): a token with any non-finite feature (in codebook space, per group / per layer's
  residual) is left out of every statistic. The training step on a batch with such tokens equals the
  step on the batch without them, and the step with them masked; a batch without any finite token
  leaves the state bit for bit (k-means stays pending), and so does a batch whose every token is masked
  (with any decay); k-means waits until every separate codebook has a finite token;
- LatentQuantize: forward never changes a parameter, and the value tables learn from finite tokens
  only (per token and codebook group): no quantization-loss term and no straight-through gradient from
  a non-finite token reaches ``values_per_latent``, so their gradient equals the one of the batch
  without those tokens. The encoder side is not hidden: the commitment loss, the output at those tokens
  and the input's gradient stay non-finite, so the failure shows (and AMP's GradScaler skips the step).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_state, assert_state_finite, snapshot

from vqcore import (
    FSQ,
    LFQ,
    GroupedResidualVQ,
    LatentQuantize,
    RandomProjectionQuantizer,
    ResidualFSQ,
    ResidualLFQ,
    ResidualVQ,
    VectorQuantize,
)

NAN, INF = float("nan"), float("inf")


def with_bad_tokens(x, whole=False):
    """NaN, +Inf and -Inf in some tokens of x (b >= 2, n >= 8, d >= 4): a single feature suffices, or the
    whole token with ``whole``; -> (bad x, keep mask (b, n))."""
    bad = x.clone()
    bad[0, 2] = NAN
    bad[0, 5, slice(None) if whole else 1] = INF
    bad[1, 0, slice(None) if whole else 3] = -INF
    bad[1, 7, slice(None) if whole else 0] = NAN
    keep = torch.isfinite(bad).all(-1)
    return bad, keep


# -- VQ family: the step with bad tokens == the step without them == the step with them masked ---------

VQ_CASES = {
    "vq_ema": lambda: VectorQuantize(dim=4, codebook_size=6),
    "vq_kmeans_expiry": lambda: VectorQuantize(
        dim=4, codebook_size=6, kmeans_init=True, threshold_ema_dead_code=1.0
    ),
    "vq_kmeans_fewer_finite_tokens_than_codes": lambda: VectorQuantize(
        dim=4, codebook_size=30, kmeans_init=True
    ),
    "vq_kmeans_cosine": lambda: VectorQuantize(dim=4, codebook_size=6, use_cosine_sim=True, kmeans_init=True),
    "vq_projection": lambda: VectorQuantize(
        dim=4, codebook_size=6, codebook_dim=3, kmeans_init=True, threshold_ema_dead_code=1.0
    ),
    "rvq_ema": lambda: ResidualVQ(dim=4, num_quantizers=3, codebook_size=6),
    "rvq_kmeans": lambda: ResidualVQ(dim=4, num_quantizers=3, codebook_size=6, kmeans_init=True),
    "rvq_expiry": lambda: ResidualVQ(dim=4, num_quantizers=3, codebook_size=6, threshold_ema_dead_code=1.0),
    "rvq_kmeans_expiry_cosine": lambda: ResidualVQ(
        dim=4,
        num_quantizers=2,
        codebook_size=6,
        kmeans_init=True,
        threshold_ema_dead_code=1.0,
        use_cosine_sim=True,
    ),
    "rvq_projection": lambda: ResidualVQ(
        dim=4,
        num_quantizers=2,
        codebook_size=6,
        codebook_dim=3,
        kmeans_init=True,
        threshold_ema_dead_code=1.0,
    ),
    "rvq_shared": lambda: ResidualVQ(dim=4, num_quantizers=3, codebook_size=6, shared_codebook=True),
    "rvq_shared_kmeans_expiry": lambda: ResidualVQ(
        dim=4,
        num_quantizers=3,
        codebook_size=6,
        shared_codebook=True,
        kmeans_init=True,
        threshold_ema_dead_code=1.0,
    ),
    "grouped_rvq": lambda: GroupedResidualVQ(dim=4, groups=2, num_quantizers=2, codebook_size=6),
    "grouped_rvq_shared_kmeans_expiry": lambda: GroupedResidualVQ(
        dim=4,
        groups=2,
        num_quantizers=2,
        codebook_size=6,
        shared_codebook=True,
        kmeans_init=True,
        threshold_ema_dead_code=1.0,
    ),
}


def num_codes(module):
    return module.codebook_size


@pytest.mark.parametrize("name", list(VQ_CASES))
def test_bad_tokens_are_left_out_of_every_statistic(name):
    torch.manual_seed(0)
    module = VQ_CASES[name]()
    removed, masked = copy.deepcopy(module), copy.deepcopy(module)
    for step in range(3):  # step 0 runs k-means where enabled, then EMA steps and dead-code expiry
        x = torch.randn(2, 8, 4)
        # groups see their own features: a token bad in one group only is covered by the test below
        bad, keep = with_bad_tokens(x, whole=isinstance(module, GroupedResidualVQ))
        torch.manual_seed(10 + step)
        out = module(bad)
        torch.manual_seed(10 + step)
        removed(x[keep].unsqueeze(0))  # the same finite tokens, in the same order
        torch.manual_seed(10 + step)
        masked(bad, mask=keep)
        assert_state_finite(module)
        assert_same_state(module, removed, "with bad tokens vs without them: ")
        assert_same_state(module, masked, "with bad tokens vs masked: ")
        indices = out[1]
        assert indices.dtype == torch.int64 and indices.min() >= 0 and indices.max() < num_codes(module)
        assert torch.isfinite(out[0][keep]).all()


@pytest.mark.parametrize("fill", [NAN, INF, -INF, "mixed"])
@pytest.mark.parametrize("name", list(VQ_CASES))
def test_batch_without_a_finite_token_leaves_the_state_bit_for_bit(name, fill):
    torch.manual_seed(0)
    module = VQ_CASES[name]()
    x = torch.randn(2, 5, 4)
    if fill == "mixed":  # every token (in each group's features too) has a bad feature, of different kinds
        bad = x.clone()
        bad[0, :, 0], bad[1, :, 1], bad[:, :, 2], bad[0, ::2, 3] = NAN, INF, -INF, NAN
    else:
        bad = torch.full_like(x, fill)
    before = snapshot(module)
    for _ in range(2):
        out = module(bad)
        assert_same_state(module, before)
    assert out[1].min() >= 0 and out[1].max() < num_codes(module)
    for book in [
        m for m in module.modules() if hasattr(m, "initted")
    ]:  # k-means is still pending where enabled
        assert bool(book.initted) == (not book.kmeans_init)
    module(x)  # the first finite batch then trains as usual
    assert_state_finite(module)
    assert any(not torch.equal(module.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize("decay", [0.0, 0.8])
@pytest.mark.parametrize("empty", ["all_nan", "all_masked"])
def test_a_batch_without_valid_tokens_leaves_the_codebook_alone(empty, decay):
    # decay 0 used to give cluster_size 0 everywhere, hence embed = 0 / 0 = NaN
    vq = VectorQuantize(dim=4, codebook_size=6, decay=decay, threshold_ema_dead_code=0.5)
    before = snapshot(vq)
    x = torch.randn(2, 5, 4)
    if empty == "all_nan":
        vq(torch.full_like(x, NAN))
    else:
        vq(x, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert_same_state(vq, before)


def test_kmeans_waits_until_every_head_has_a_finite_token():
    vq = VectorQuantize(dim=4, codebook_size=3, heads=2, separate_codebook_per_head=True, kmeans_init=True)
    book = vq.codebook_module
    x = torch.randn(1, 6, 4)
    x[..., 0] = NAN  # head 0 sees only non-finite chunks; head 1 is fine
    before = vq.codebook.clone()
    vq(x)  # used to raise "k-means needs at least one valid token"
    assert not bool(book.initted)
    assert torch.equal(vq.codebook[0], before[0]), "head 0 had nothing to learn from"
    assert not torch.equal(vq.codebook[1], before[1])
    assert torch.isfinite(vq.codebook).all()
    vq(torch.randn(1, 6, 4))
    assert bool(book.initted)


@pytest.mark.parametrize("shared", [False, True], ids=["own_codebooks", "shared_codebook"])
def test_grouped_rvq_leaves_out_bad_tokens_per_group(shared):
    """A token bad in one group's features only still trains the other group: each group's stack equals a
    ResidualVQ fed that group's chunk without its own bad tokens."""
    kwargs = dict(
        num_quantizers=2,
        codebook_size=6,
        kmeans_init=True,
        threshold_ema_dead_code=1.0,
        shared_codebook=shared,
    )
    torch.manual_seed(0)
    grouped = GroupedResidualVQ(dim=6, groups=2, **kwargs)
    stacks = [copy.deepcopy(rvq) for rvq in grouped.rvqs]
    for step in range(3):
        x = torch.randn(2, 8, 6)
        bad = x.clone()
        bad[0, 1, 0] = NAN  # group 0 only
        bad[0, 4, 5] = INF  # group 1 only
        bad[1, 3, 2] = -INF  # group 0 only
        bad[1, 6] = NAN  # both
        torch.manual_seed(10 + step)
        grouped(bad)
        torch.manual_seed(10 + step)
        for rvq, chunk in zip(stacks, bad.chunk(2, dim=-1)):  # the groups run in order
            keep = torch.isfinite(chunk).all(-1)
            rvq(chunk[keep].unsqueeze(0))
        for g, rvq in enumerate(stacks):
            assert_same_state(grouped.rvqs[g], rvq, f"group {g}: ")
        assert_state_finite(grouped)


def test_eval_and_inference_paths_with_bad_tokens_touch_nothing_and_give_valid_indices():
    for name, build in VQ_CASES.items():
        module = build()
        module(torch.randn(2, 8, 4))  # trained state
        module.eval()
        before = snapshot(module)
        bad, keep = with_bad_tokens(torch.randn(2, 8, 4))
        out = module(bad)
        encoded = module.encode(bad)
        assert torch.equal(encoded, out[1]), name
        assert encoded.min() >= 0 and encoded.max() < num_codes(module), name
        assert_same_state(module, before, f"{name}: ")


# -- LatentQuantize: the value tables learn from finite tokens only -----------------------------------------

LATENT_CASES = {
    "plain": lambda: LatentQuantize([3, 5, 4]),
    "projection": lambda: LatentQuantize([3, 5, 4], dim=6),
    "codebooks": lambda: LatentQuantize([3, 5, 4], num_codebooks=2),
}


def latent_bad_tokens(x):
    bad = x.clone()
    bad[0, 2] = NAN
    bad[0, 5, 1] = INF
    bad[1, 0, 0] = -INF
    return bad, torch.isfinite(bad).all(-1)


def latent_grads(module, x):
    module.zero_grad(set_to_none=True)
    out = module(x, return_loss_breakdown=True)
    (out.quantized.sum() + out.loss).backward()
    return out, [v.grad.clone() for v in module.values_per_latent]


@pytest.mark.parametrize("name", list(LATENT_CASES))
def test_latent_value_tables_learn_only_from_finite_tokens(name):
    torch.manual_seed(0)
    q = LATENT_CASES[name]()
    twin = copy.deepcopy(q)
    x = torch.randn(2, 8, q.dim) * 0.4
    bad, keep = latent_bad_tokens(x)
    before = snapshot(q)
    out, grads = latent_grads(q, bad)
    assert_same_state(q, before)  # forward (and backward) never write a parameter
    for g in grads:
        assert torch.isfinite(g).all()
    # the encoder side still sees the bad input: visible, not hidden
    assert not torch.isfinite(out.breakdown.commitment)
    assert torch.isfinite(out.breakdown.quantization)
    # equal to the gradient of the batch without the bad tokens (with codebook groups the unit is one group
    # of one token, and a bad feature spoils only its group: see the next test)
    if q.num_codebooks == 1:
        ref, ref_grads = latent_grads(twin, x[keep].unsqueeze(0))
        torch.testing.assert_close(out.breakdown.quantization, ref.breakdown.quantization)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
    # and a training step keeps the tables finite
    with torch.no_grad():
        for v, g in zip(q.values_per_latent, grads):
            v -= 0.1 * g
    assert_state_finite(q)


def test_latent_groups_gradient_equals_finite_groups_only():
    """With codebook groups, the bad unit is one group of one token; the tables' gradient equals the one
    computed by hand over the finite (token, group) units."""
    torch.manual_seed(0)
    q = LatentQuantize([3, 5], num_codebooks=2, commitment_loss_weight=0.0, quantization_loss_weight=1.0)
    x = torch.randn(1, 4, 4) * 0.4
    bad = x.clone()
    bad[0, 1, 0] = NAN  # token 1, group 0
    out, grads = latent_grads(q, bad)
    units = bad.reshape(-1, 2)  # (token, group) -> 2 latents
    finite = torch.isfinite(units).all(-1)
    tables = [v.detach() for v in q.values_per_latent]
    want = [torch.zeros_like(t) for t in tables]
    for unit in units[finite]:
        for i, value in enumerate(unit):
            k = (value - tables[i]).abs().argmin()
            want[i][k] += 1.0  # quantized.sum(): straight through to the chosen value
            want[i][k] += 2 * (tables[i][k] - value) / (finite.sum() * 2)  # mean over finite units' latents
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_latent_forward_on_all_nan_input_changes_nothing_and_gives_no_table_gradient():
    q = LatentQuantize([3, 5, 4], dim=3)
    before = snapshot(q)
    out, grads = latent_grads(q, torch.full((2, 4, 3), NAN))
    assert_same_state(q, before)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    assert out.indices.min() >= 0 and out.indices.max() < q.codebook_size


def test_latent_frozen_values_take_non_finite_input():
    q = LatentQuantize([3, 5, 4], optimize_values=False)
    before = snapshot(q)
    bad, _ = latent_bad_tokens(torch.randn(2, 8, 3))
    out = q(bad)
    assert_same_state(q, before)
    assert all(v.grad is None for v in q.values_per_latent)
    assert out.indices.min() >= 0 and out.indices.max() < q.codebook_size


def test_latent_plus_inf_gives_an_index_in_range_not_the_padding():
    # before: |+inf - (+inf padding)| = NaN won the argmin, so the digit pointed into the padding of a
    # shorter table: [inf, 0.5] with levels [3, 5] gave index 3 + 4 * 3 = 15 == codebook_size
    q = LatentQuantize([3, 5]).eval()
    x = torch.tensor([[[INF, 0.5], [INF, 0.1], [-INF, 0.0], [NAN, 0.2], [0.2, INF]]])
    indices = q(x).indices
    assert indices.min() >= 0 and indices.max() < q.codebook_size
    assert torch.equal(q.encode(x), indices)
    digits = torch.stack([indices % 3, indices // 3], -1)[0]
    assert digits[:, 0].max() <= 2 and digits[:, 1].max() <= 4
    # +inf in the 3-level dimension: clamped to the last value of that (shorter) table
    assert digits[0].tolist() == [2, 4] and digits[1].tolist() == [2, 2]
    assert torch.isfinite(q.decode(indices)).all()


# -- stateless methods: indices stay in range, finite tokens are unaffected ---------------------------------

STATELESS = {
    "fsq": lambda: FSQ([8, 5, 5, 3]),
    "fsq_symmetric": lambda: FSQ([4, 4, 3, 2], preserve_symmetry=True),
    "residual_fsq": lambda: ResidualFSQ([5, 5, 3, 3], num_quantizers=2),
    "lfq": lambda: LFQ(codebook_size=16),
    "residual_lfq": lambda: ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2),
    "rpq": lambda: RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=3, seed=0),
    "latent": lambda: LatentQuantize([3, 5, 4, 2]),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(STATELESS))
def test_non_finite_tokens_give_indices_in_range_and_leave_finite_tokens_alone(name, training):
    # before: FSQ / ResidualFSQ turned a NaN digit into int64 -2^63 (an index no decoder accepts)
    torch.manual_seed(0)
    module = STATELESS[name]().train(training)
    before = snapshot(module)
    x = torch.randn(2, 8, 4)
    bad, keep = with_bad_tokens(x)
    out, ref = module(bad), module(x)
    indices = out if isinstance(out, torch.Tensor) else out[1]
    ref_indices = ref if isinstance(ref, torch.Tensor) else ref[1]
    assert indices.dtype == torch.int64 and indices.min() >= 0 and indices.max() < module.codebook_size
    assert torch.equal(indices[keep], ref_indices[keep])
    assert_same_state(module, before)
    if not training and not isinstance(out, torch.Tensor):
        assert torch.equal(out.quantized[keep], ref.quantized[keep])
        decoded = module.decode(indices)  # accepted: every index is valid
        assert torch.equal(decoded[keep], ref.quantized[keep])
