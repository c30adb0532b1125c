"""VectorQuantize's codebook-training options: vq_bridge, affine_param, manual_ema_update, forward ema_update,
update_indices, expire_codes_, the in-place codebook optimizer, and their defaults and conflicts.

Hand computations check the formulas (the affine transform and its statistics' EMA, the inverse-transformed
EMA step, one SGD step of the in-place optimizer); the distributed cases run in two gloo processes (this
file, run as a script) and compare with one process on the concatenated batch.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import assert_exports_with_parity, assert_same_state, generator, snapshot
from torch import nn

from vqcore import ResidualVQ, VectorQuantize
from vqcore.errors import ConfigurationError
from vqcore.testing import check_quantizer

SGD = functools.partial(torch.optim.SGD, lr=0.5)


def inplace_term(breakdown):
    """The in-place optimizer's loss in the breakdown (a field of its own once the breakdown has one)."""
    value = getattr(breakdown, "inplace_optimize", None)
    return breakdown.extra["inplace_optimize"] if value is None else value


def set_codes(vq: VectorQuantize, codes: torch.Tensor) -> None:
    """Write the trained codes (and the EMA sums that go with cluster sizes of 1) of a 1-book quantizer."""
    book = vq.codebook_module
    with torch.no_grad():
        book.embed.copy_(codes.reshape(book.embed.shape))
        book.embed_avg.copy_(codes.reshape(book.embed.shape))


def nearest_by_hand(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), codes.double()).argmin(-1)


# -- defaults and conflicts --------------------------------------------------------------------------------


def test_defaults_follow_the_reference():
    plain = VectorQuantize(dim=4, codebook_size=8)
    assert not plain.codebook_module.trained_by_gradient and plain.codebook_module.ema
    bridged = VectorQuantize(dim=4, codebook_size=8, vq_bridge=nn.Linear(4, 4))
    assert bridged.codebook_module.trained_by_gradient and not bridged.codebook_module.ema
    learnable = VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True)
    assert learnable.codebook_module.trained_by_gradient and not learnable.codebook_module.ema


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(vq_bridge=nn.Linear(4, 4), ema_update=True), ("vq_bridge", "ema_update")),
        (dict(vq_bridge=nn.Linear(4, 4), learnable_codebook=False), ("vq_bridge", "learnable_codebook")),
        (dict(learnable_codebook=True, ema_update=True), ("learnable_codebook", "ema_update")),
        (dict(learnable_codebook=True, use_cosine_sim=True), ("learnable_codebook", "use_cosine_sim")),
        (dict(affine_param=True, use_cosine_sim=True), ("affine_param", "use_cosine_sim")),
        (dict(sync_affine_param=True), ("sync_affine_param", "affine_param")),
        (dict(affine_param=True, affine_param_batch_decay=1.5), ("affine_param_batch_decay",)),
        (dict(manual_ema_update=True, ema_update=False), ("manual_ema_update", "ema_update")),
        (dict(in_place_codebook_optimizer=SGD), ("in_place_codebook_optimizer", "learnable_codebook")),
        (
            dict(manual_in_place_optimizer_update=True),
            ("manual_in_place_optimizer_update", "in_place_codebook_optimizer"),
        ),
    ],
)
def test_conflicts_name_both_options(kwargs, names):
    with pytest.raises(ConfigurationError) as info:
        VectorQuantize(dim=4, codebook_size=8, **kwargs)
    assert isinstance(info.value, AssertionError)  # the reference asserts
    for name in names:
        assert name in str(info.value)


def test_bad_types_are_type_errors():
    with pytest.raises(TypeError, match="vq_bridge must be an nn.Module"):
        VectorQuantize(dim=4, codebook_size=8, vq_bridge=lambda c: c)
    with pytest.raises(TypeError, match="in_place_codebook_optimizer must be a callable"):
        VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True, in_place_codebook_optimizer=0.1)


def test_refused_forward_calls_change_no_state():
    vq = VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True, threshold_ema_dead_code=1).train()
    before = snapshot(vq)
    with pytest.raises(ValueError, match="ema_update=True: this codebook is trained by gradient"):
        vq(torch.randn(2, 5, 4), ema_update=True)
    manual = VectorQuantize(dim=4, codebook_size=8, manual_ema_update=True).train()
    manual_before = snapshot(manual)
    with pytest.raises(ValueError, match="ema_update_weight .* update_ema"):
        manual(torch.randn(2, 5, 4), ema_update_weight=torch.ones(8))
    with pytest.raises(ValueError, match="indices must be shaped like"):
        manual.update_indices(torch.randn(2, 5, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 8\)"):
        manual.update_indices(torch.randn(2, 5, 4), torch.full((2, 5), 8))
    with pytest.raises(ValueError, match="heads \\* codebook_dim = 4"):
        manual.expire_codes_(torch.randn(3, 5))
    assert_same_state(vq, before)
    assert_same_state(manual, manual_before)


# -- affine_param ------------------------------------------------------------------------------------------

E = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
X1 = torch.tensor([[[0.5, 0.1], [2.0, 1.0], [4.0, -2.0], [1.0, 3.0]]])
X2 = torch.tensor([[[-1.0, 0.5], [0.0, 2.0], [3.0, 1.0], [2.5, -0.5]]])


def affine_vq(**kwargs) -> VectorQuantize:
    vq = VectorQuantize(
        dim=2,
        codebook_size=3,
        affine_param=True,
        decay=0.5,
        affine_param_batch_decay=0.9,
        affine_param_codebook_decay=0.8,
        **kwargs,
    )
    set_codes(vq, E)
    return vq


def transform(codes, cm, cv, bm, bv):
    return (codes - cm) * (bv.clamp(min=1e-5).sqrt() / cv.clamp(min=1e-5).sqrt()) + bm


def test_affine_first_step_by_hand():
    vq = affine_vq().train()
    out = vq(X1)
    book = vq.codebook_module
    x = X1[0]
    bm, bv = x.mean(0), x.var(0, unbiased=False)
    cm, cv = E.mean(0), E.var(0, unbiased=False)
    torch.testing.assert_close(book.batch_mean[0, 0], bm)
    torch.testing.assert_close(book.batch_variance[0, 0], bv)
    torch.testing.assert_close(book.codebook_mean[0, 0], cm)
    torch.testing.assert_close(book.codebook_variance[0, 0], cv)
    assert not book.codebook_mean_needs_init and not book.codebook_variance_needs_init
    # the search and the output use the transformed codes (the statistics of this very step)
    codes = transform(E, cm, cv, bm, bv)
    idx = nearest_by_hand(x, codes)
    assert torch.equal(out.indices[0], idx)
    torch.testing.assert_close(out.quantized[0], codes[idx])
    # the EMA step sees the inputs through the inverse transform
    inverse = (x - bm) * (cv.sqrt() / bv.sqrt()) + cm
    counts = torch.bincount(idx, minlength=3).float()
    sums = torch.zeros(3, 2).index_add_(0, idx, inverse)
    cluster = 0.5 * 1 + 0.5 * counts
    embed_avg = 0.5 * E + 0.5 * sums
    n = cluster.sum()
    smoothed = (cluster + 1e-5) / (n + 3 * 1e-5) * n
    torch.testing.assert_close(book.cluster_size[0], cluster)
    torch.testing.assert_close(book.embed_avg[0], embed_avg)
    torch.testing.assert_close(book.embed[0], embed_avg / smoothed.unsqueeze(-1))


def test_affine_statistics_take_ema_steps():
    vq = affine_vq().train()
    vq(X1)
    book = vq.codebook_module
    embed_after_first = book.embed[0].clone()
    stats = {k: book.get_buffer(k)[0, 0].clone() for k in ("batch_mean", "batch_variance", "codebook_mean")}
    stats["codebook_variance"] = book.codebook_variance[0, 0].clone()
    vq(X2)
    x = X2[0]
    torch.testing.assert_close(book.batch_mean[0, 0], 0.9 * stats["batch_mean"] + 0.1 * x.mean(0))
    torch.testing.assert_close(
        book.batch_variance[0, 0], 0.9 * stats["batch_variance"] + 0.1 * x.var(0, unbiased=False)
    )
    torch.testing.assert_close(
        book.codebook_mean[0, 0], 0.8 * stats["codebook_mean"] + 0.2 * embed_after_first.mean(0)
    )
    torch.testing.assert_close(
        book.codebook_variance[0, 0],
        0.8 * stats["codebook_variance"] + 0.2 * embed_after_first.var(0, unbiased=False),
    )


def test_affine_masked_tokens_and_eval_leave_the_statistics_alone():
    vq = affine_vq().train()
    x = torch.cat([X1, torch.full((1, 2, 2), float("nan"))], 1)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    vq(x, mask=mask)
    torch.testing.assert_close(vq.codebook_module.batch_mean[0, 0], X1[0].mean(0))
    vq.eval()
    before = snapshot(vq)
    out = vq(X2)
    assert_same_state(vq, before, "an eval forward changed the state: ")
    assert torch.equal(vq.decode(vq.encode(X2)), out.quantized)


def test_affine_before_any_training_step_is_the_identity():
    vq = affine_vq().eval()
    assert torch.equal(vq.codebook, E)
    assert torch.equal(vq(X1).indices[0], nearest_by_hand(X1[0], E))


def test_affine_kit_save_load_and_export(tmp_path):
    from helpers import assert_save_load_equal

    x = torch.randn(2, 12, 8)
    check_quantizer(VectorQuantize, x, dim=8, codebook_size=16, affine_param=True, check_export=False)
    vq = VectorQuantize(dim=8, codebook_size=16, affine_param=True, heads=2, separate_codebook_per_head=True)
    vq.train()
    for _ in range(3):
        vq(torch.randn(2, 12, 8) * 3 + 1)
    assert_save_load_equal(vq, x, tmp_path)
    assert_exports_with_parity(vq, x, tmp_path)


# -- vq_bridge ---------------------------------------------------------------------------------------------


class CountingLinear(nn.Linear):
    calls = 0

    def forward(self, codes):
        CountingLinear.calls += 1
        return super().forward(codes)


def test_vq_bridge_runs_once_per_forward_and_trains_by_gradient():
    torch.manual_seed(0)
    bridge = CountingLinear(4, 4)
    vq = VectorQuantize(dim=4, codebook_size=8, vq_bridge=bridge).train()
    x = torch.randn(2, 6, 4, requires_grad=True)
    CountingLinear.calls = 0
    out = vq(x)
    assert CountingLinear.calls == 1
    (out.quantized.sum() + out.loss).backward()
    assert bridge.weight.grad is not None and bridge.weight.grad.abs().sum() > 0
    assert vq.codebook_module.embed.grad is not None
    vq.eval()
    CountingLinear.calls = 0
    out = vq(x)
    assert CountingLinear.calls == 1
    codes = bridge(vq.codebook_module.embed)[0]
    assert torch.equal(out.indices, nearest_by_hand(x.detach(), codes.detach()).reshape(2, 6))
    assert torch.equal(vq.decode(vq.encode(x)), out.quantized)
    assert "_codebook.vq_bridge.weight" in vq.state_dict()


def test_vq_bridge_kit_state_dict_and_export(tmp_path):
    from safetensors.torch import load_model, save_model

    import vqcore

    torch.manual_seed(0)
    x = torch.randn(2, 12, 8)
    bridge = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    check_quantizer(VectorQuantize, x, dim=8, codebook_size=16, vq_bridge=bridge, check_export=False)
    vq = VectorQuantize(dim=8, codebook_size=16, vq_bridge=bridge).eval()
    with pytest.raises(TypeError, match="JSON-serialisable"):  # a module is no JSON config: keep the weights
        vqcore.save(vq, tmp_path / "vq.safetensors")
    save_model(vq, str(tmp_path / "weights.safetensors"))
    again = VectorQuantize(
        dim=8, codebook_size=16, vq_bridge=nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    ).eval()
    load_model(again, str(tmp_path / "weights.safetensors"))
    assert torch.equal(again(x).quantized, vq(x).quantized)
    assert_exports_with_parity(vq, x, tmp_path)


# -- manual EMA, forward ema_update, update_indices, expire_codes_ ------------------------------------------


def test_manual_ema_defers_one_step_over_every_batch():
    torch.manual_seed(0)
    xs = torch.randn(2, 3, 10, 4)
    manual = VectorQuantize(dim=4, codebook_size=8, manual_ema_update=True).train()
    plain = VectorQuantize(dim=4, codebook_size=8).train()
    plain.load_state_dict(manual.state_dict())
    before = snapshot(manual)
    first = manual(xs[0]).indices
    second = manual(xs[1]).indices
    assert_same_state(manual, before, "manual EMA changed the codebook before update_ema: ")
    manual.update_ema()
    # one EMA step on the concatenated batches, with the codes each batch chose
    plain.update_indices(torch.cat([xs[0], xs[1]]), torch.cat([first, second]))
    torch.testing.assert_close(manual.codebook_module.embed, plain.codebook_module.embed)
    torch.testing.assert_close(manual.codebook_module.cluster_size, plain.codebook_module.cluster_size)


def test_update_indices_equals_a_training_step():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 8)
    mask = torch.rand(1, 64) > 0.5
    trained = VectorQuantize(dim=8, codebook_size=16).train()
    replayed = VectorQuantize(dim=8, codebook_size=16).train()
    replayed.load_state_dict(trained.state_dict())
    out = trained(x, mask=mask)
    before = snapshot(replayed)
    again = replayed(x, mask=mask, ema_update=False)
    assert_same_state(replayed, before, "ema_update=False took a step: ")
    assert torch.equal(again.indices, out.indices)
    replayed.update_ema_indices(x, again.indices, mask=mask)
    assert_same_state(replayed, trained)


def test_update_indices_ignores_dropped_indices():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    a = VectorQuantize(dim=4, codebook_size=8).train()
    b = VectorQuantize(dim=4, codebook_size=8).train()
    b.load_state_dict(a.state_dict())
    indices = a.encode(x)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    a.update_indices(x, indices.masked_fill(~mask, -1))
    b.update_indices(x, indices, mask=mask)
    assert_same_state(a, b)


def test_ema_update_false_steps_only_the_usage_counts():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, threshold_ema_dead_code=0.01).train()
    before = snapshot(vq)
    out = vq(torch.randn(2, 6, 4), ema_update=False)
    book = vq.codebook_module
    assert torch.equal(book.embed, before["_codebook.embed"])
    assert torch.equal(book.embed_avg, before["_codebook.embed_avg"])
    counts = torch.bincount(out.indices.flatten(), minlength=8).float()
    torch.testing.assert_close(book.cluster_size[0], 0.8 * 1 + 0.2 * counts)


def test_expire_codes_replaces_dead_codes_with_given_vectors():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, threshold_ema_dead_code=2.0)
    x = torch.randn(3, 5, 4)
    vq.expire_codes_(x)  # every cluster size (1) is below the threshold: all codes replaced
    pool = x.reshape(-1, 4)
    codes = vq.codebook_module.embed[0]
    assert all(any(torch.equal(c, v) for v in pool) for c in codes)
    assert torch.equal(vq.codebook_module.cluster_size, torch.full((1, 8), 2.0))


# -- in-place codebook optimizer ---------------------------------------------------------------------------


def test_in_place_step_is_one_sgd_step_by_hand():
    vq = VectorQuantize(
        dim=2, codebook_size=3, learnable_codebook=True, in_place_codebook_optimizer=SGD, rotation_trick=False
    ).train()
    set_codes(vq, E)
    x = X1[0]
    idx = nearest_by_hand(x, E)
    q = E[idx]
    loss = ((q - x) ** 2).mean()
    grad = torch.zeros(3, 2).index_add_(0, idx, 2 * (q - x) / x.numel())
    updated = E - 0.5 * grad
    out = vq(X1, return_loss_breakdown=True)
    torch.testing.assert_close(vq.codebook_module.embed[0], updated)
    torch.testing.assert_close(inplace_term(out.breakdown), loss)
    assert torch.equal(out.indices[0], nearest_by_hand(x, updated))  # quantized again with the new codes
    assert vq.codebook_module.embed.grad is None or not vq.codebook_module.embed.grad.any()
    assert not out.loss.requires_grad or torch.isfinite(out.loss)


def test_in_place_step_skips_masked_tokens_and_frozen_codebooks():
    vq = VectorQuantize(dim=2, codebook_size=3, learnable_codebook=True, in_place_codebook_optimizer=SGD)
    set_codes(vq, E)
    x = torch.cat([X1, torch.full((1, 1, 2), float("nan"))], 1)
    mask = torch.tensor([[True] * 4 + [False]])
    vq.train()(x, mask=mask)
    idx = nearest_by_hand(X1[0], E)
    grad = torch.zeros(3, 2).index_add_(0, idx, 2 * (E[idx] - X1[0]) / X1[0].numel())
    torch.testing.assert_close(vq.codebook_module.embed[0], E - 0.5 * grad)
    before = snapshot(vq)
    out = vq(X1, freeze_codebook=True, return_loss_breakdown=True)
    assert_same_state(vq, before)
    assert inplace_term(out.breakdown) == 0


def test_manual_in_place_update_waits_for_the_caller():
    vq = VectorQuantize(
        dim=2,
        codebook_size=3,
        learnable_codebook=True,
        in_place_codebook_optimizer=SGD,
        manual_in_place_optimizer_update=True,
    ).train()
    set_codes(vq, E)
    vq(X1)
    assert torch.equal(vq.codebook_module.embed[0], E)
    idx = nearest_by_hand(X1[0], E)
    grad = torch.zeros(3, 2).index_add_(0, idx, 2 * (E[idx] - X1[0]) / X1[0].numel())
    torch.testing.assert_close(vq.codebook_module.embed.grad[0], grad)
    vq.update_in_place_optimizer()
    torch.testing.assert_close(vq.codebook_module.embed[0], E - 0.5 * grad)


def test_in_place_optimizer_under_no_grad_and_eval():
    vq = VectorQuantize(dim=2, codebook_size=3, learnable_codebook=True, in_place_codebook_optimizer=SGD)
    set_codes(vq, E)
    vq.eval()
    before = snapshot(vq)
    out = vq(X1, return_loss_breakdown=True)
    assert_same_state(vq, before)
    assert inplace_term(out.breakdown) == 0
    vq.train()
    with torch.no_grad():
        vq(X1)
    assert not torch.equal(vq.codebook_module.embed[0], E)


# -- residual stacks ---------------------------------------------------------------------------------------


def test_residual_layers_take_the_options():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, affine_param=True).train()
    rvq(x)
    for layer in rvq.layers:
        assert not layer.codebook_module.codebook_mean_needs_init
    rvq.eval()
    out = rvq(x)
    assert torch.equal(rvq.decode(rvq.encode(x)), out.quantized)

    inplace = ResidualVQ(
        dim=8, num_quantizers=2, codebook_size=16, learnable_codebook=True, in_place_codebook_optimizer=SGD
    ).train()
    before = [layer.codebook_module.embed.detach().clone() for layer in inplace.layers]
    inplace(x)
    for layer, old in zip(inplace.layers, before):
        assert not torch.equal(layer.codebook_module.embed, old)

    shared = ResidualVQ(
        dim=8, num_quantizers=2, codebook_size=16, shared_codebook=True, vq_bridge=nn.Linear(8, 8)
    )
    assert shared.layers[0].codebook_module is shared.layers[1].codebook_module
    assert "layers.1._codebook.vq_bridge.weight" in shared.state_dict()
    with pytest.raises(ConfigurationError, match="in_place_codebook_optimizer.*shared_codebook"):
        ResidualVQ(
            dim=8,
            num_quantizers=2,
            codebook_size=16,
            shared_codebook=True,
            learnable_codebook=True,
            in_place_codebook_optimizer=SGD,
        )


# -- the reference: state_dicts load strictly, same eval outputs, converters -----------------------------


def reference_cases():
    return {
        # the reference's eval forward also steps its batch statistics (vqcore's does not): decay 1 keeps
        # them where training left them, so that both eval forwards see the same statistics
        "affine": dict(affine_param=True, affine_param_batch_decay=1.0),
        "vq_bridge": dict(vq_bridge=nn.Linear(8, 8)),
        "in_place": dict(learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=SGD),
        "manual_ema": dict(manual_ema_update=True),
    }


@pytest.mark.parametrize("case", ["affine", "vq_bridge", "in_place", "manual_ema"])
def test_reference_state_dict_loads_and_converts(case):
    ref = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(0)
    kwargs = reference_cases()[case]
    theirs = ref.VectorQuantize(dim=8, codebook_size=16, rotation_trick=False, **kwargs).train()
    x = torch.randn(2, 24, 8)
    for _ in range(3):
        theirs(x + torch.randn_like(x) * 0.1)
    theirs.eval()
    ours = VectorQuantize(dim=8, codebook_size=16, rotation_trick=False, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())  # strict
    converted = from_reference(theirs).eval()
    with torch.no_grad():
        expected = theirs(x)
        for module in (ours, converted):
            out = module(x)
            assert torch.equal(out.indices, expected[1])
            torch.testing.assert_close(out.quantized, expected[0])


@pytest.mark.parametrize("shared", [False, True])
def test_reference_residual_stacks_convert(shared):
    ref = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(0)
    x = torch.randn(2, 24, 8)
    for kwargs in (dict(affine_param=True, affine_param_batch_decay=1.0), dict(vq_bridge=nn.Linear(8, 8))):
        theirs = ref.ResidualVQ(
            dim=8, num_quantizers=3, codebook_size=16, shared_codebook=shared, rotation_trick=False, **kwargs
        ).train()
        for _ in range(3):
            theirs(x)
        theirs.eval()
        ours = from_reference(theirs).eval()
        with torch.no_grad():
            expected, out = theirs(x), ours(x)
        assert torch.equal(out.indices, expected[1])
        torch.testing.assert_close(out.quantized, expected[0])


def test_untrained_reference_affine_state_dict_loads():
    ref = pytest.importorskip("vector_quantize_pytorch")
    theirs = ref.VectorQuantize(dim=8, codebook_size=16, affine_param=True)
    assert "_codebook.batch_mean" not in theirs.state_dict()  # registered on its first forward
    ours = VectorQuantize(dim=8, codebook_size=16, affine_param=True)
    ours.load_state_dict(theirs.state_dict())
    assert ours.codebook_module.codebook_mean_needs_init


# -- distributed -------------------------------------------------------------------------------------------

WORLD = 2
TIMEOUT_S = 90


def scenario_affine(rank: int, world: int):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, affine_param=True, sync_affine_param=True).train()
    g = generator(5)
    for _ in range(3):
        x = torch.randn(4, 6, 4, generator=g) * 2 + 1
        n = x.shape[0] // world
        vq(x[rank * n : (rank + 1) * n])
    return snapshot(vq)


def scenario_in_place(rank: int, world: int):
    torch.manual_seed(0)
    vq = VectorQuantize(
        dim=4, codebook_size=8, learnable_codebook=True, in_place_codebook_optimizer=SGD, commitment_weight=0
    ).train()
    x = torch.randn(4, 6, 4, generator=generator(6))
    n = x.shape[0] // world
    vq(x[rank * n : (rank + 1) * n])
    return snapshot(vq)


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    results = {"affine": scenario_affine(rank, world), "in_place": scenario_in_place(rank, world)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(WORLD), str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for r in range(WORLD)
    ]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed workers hung (> {TIMEOUT_S} s)")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", ["affine", "in_place"])
def test_distributed_equals_one_process_on_the_concatenated_batch(ranks, name):
    single = {"affine": scenario_affine, "in_place": scenario_in_place}[name](0, 1)
    for state in (ranks[0][name], ranks[1][name]):
        assert state.keys() == single.keys()
        for key in state:
            torch.testing.assert_close(state[key], single[key], atol=1e-5, rtol=1e-5, msg=key)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
