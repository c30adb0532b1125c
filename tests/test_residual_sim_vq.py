"""ResidualSimVQ: the residual chain over SimVQ layers, quantize dropout, coarse decoding, layouts,
artifacts and the conversion from vector-quantize-pytorch."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import (
    assert_exports_with_parity,
    assert_same_state,
    assert_save_load_equal,
    brute_nearest,
    snapshot,
)
from torch import nn

import vqcore
from vqcore.errors import ConfigurationError
from vqcore.plugins.residual_sim_vq import ResidualSimVQ
from vqcore.testing import check_quantizer


def stack(**kwargs) -> ResidualSimVQ:
    options = dict(dim=4, num_quantizers=3, codebook_size=8)
    torch.manual_seed(kwargs.pop("seed", 0))
    return ResidualSimVQ(**{**options, **kwargs})


def test_greedy_residual_chain_against_brute_force():
    q = stack().eval()
    x = torch.randn(2, 5, 4)
    out = q(x)
    tables = q.codebooks.detach()
    residual, total = x.reshape(-1, 4), torch.zeros(10, 4)
    for layer in range(3):
        chosen = brute_nearest(residual, tables[layer])
        assert torch.equal(out.indices.reshape(-1, 3)[:, layer], chosen)
        residual = residual - tables[layer][chosen]
        total = total + tables[layer][chosen]
    torch.testing.assert_close(out.quantized.reshape(-1, 4), total)
    assert torch.equal(out.losses, torch.zeros(3))
    assert torch.equal(q.decode(out.indices), out.quantized)


def test_training_losses_are_each_layers_simvq_loss():
    q = stack(commitment_weight=2.0, input_to_quantize_commit_loss_weight=0.5).train()
    x = torch.randn(2, 5, 4)
    out = q(x)
    tables = q.codebooks.detach()
    residual = x.reshape(-1, 4)
    for layer in range(3):
        code = tables[layer][out.indices.reshape(-1, 3)[:, layer]]
        mse = (residual - code).pow(2).mean()
        torch.testing.assert_close(out.losses[layer], 2.0 * (mse + 0.5 * mse))
        residual = residual - code
    assert out.losses.shape == (3,)


def test_quantize_dropout_shapes_minus_one_and_coarse_decode():
    q = stack(quantize_dropout=True, quantize_dropout_multiple_of=2, num_quantizers=4).train()
    seed = 3
    last = random.Random(seed).randrange(0, 4)
    kept = min(4, -(-(last + 1) // 2) * 2)
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    out = q(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=seed)
    assert out.indices.shape == (2, 3, 5, 4) and out.all_codes.shape == (4, 2, 3, 5, 4)
    assert (out.indices[..., kept:] == -1).all() and (out.indices[..., :kept] >= 0).all()
    assert torch.equal(out.losses[kept:], torch.zeros(4 - kept)) and (out.losses[:kept] > 0).all()
    assert torch.equal(out.all_codes[kept:], torch.zeros_like(out.all_codes[kept:]))
    # -1 and coarse prefixes decode to the sum of the kept layers' codes
    assert torch.equal(q.get_output_from_indices(out.indices), out.quantized.detach())
    assert torch.equal(q.decode(out.indices[..., :kept]), out.quantized.detach())
    first = q.get_codes_from_indices(out.indices[..., :1])
    assert torch.equal(first[0], out.all_codes[0].detach()) and torch.equal(
        first[1:], torch.zeros_like(first[1:])
    )
    # straight-through through every kept layer; dropped layers' transforms get no gradient
    (out.quantized.sum() + out.losses.sum()).backward()
    for layer in q.layers[:kept]:
        assert layer.code_transform.weight.grad is not None
    for layer in q.layers[kept:]:
        assert layer.code_transform.weight.grad is None
    # eval runs every layer
    assert (q.eval()(x.detach()).indices >= 0).all()


def test_straight_through_gradient_counts_the_kept_layers():
    q = stack(rotation_trick=False, quantize_dropout=True).train()
    x = torch.randn(2, 6, 4, requires_grad=True)
    out = q(x, rand_quantize_dropout_fixed_seed=1)
    kept = int((out.indices[0, 0] >= 0).sum())
    (grad,) = torch.autograd.grad(out.quantized.sum(), x)
    assert torch.equal(grad, torch.full_like(x, float(kept)))


def test_channel_first_layout():
    last = stack()
    first = stack(channel_first=True)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 3, 2, 4)
    a = last.eval()(x, return_all_codes=True)
    b = first.eval()(x.movedim(-1, 1), return_all_codes=True)
    assert b.indices.shape == (2, 3, 2, 3) and torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized.movedim(-1, 1), b.quantized)
    assert b.all_codes.shape == (3, 2, 4, 3, 2) and torch.equal(a.all_codes.movedim(-1, 2), b.all_codes)
    assert torch.equal(first.get_codes_from_indices(b.indices), b.all_codes)
    assert torch.equal(first.decode(b.indices), b.quantized)


def test_a_shared_transform_module_serves_every_layer():
    transform = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    q = stack(codebook_transform=transform)
    assert all(layer.code_transform is transform for layer in q.layers)
    assert not torch.equal(q.codebooks[0], q.codebooks[1])  # each layer has its own frozen codebook


def test_bad_input_names_what_was_expected_and_changes_nothing():
    q = stack(quantize_dropout=True)
    before = snapshot(q)
    with pytest.raises(ValueError, match=r"4 features on its last axis, got shape \(2, 5, 3\)"):
        q(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"quantizer axis of 1\.\.3 entries \(num_quantizers=3\)"):
        q.decode(torch.zeros(2, 5, 4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"indices must be in \[0, 8\) or -1 \(dropped\); got values in \[-2, 0\]"
    ):
        q.decode(torch.tensor([[[0, -2]]]))
    assert_same_state(q, before)


def test_configuration_errors_name_the_options():
    with pytest.raises(AssertionError, match="heads must be 1, got heads=2"):
        stack(heads=2)
    with pytest.raises(ConfigurationError, match=r"quantize_dropout_cutoff_index must be in \[0, 3\)"):
        stack(quantize_dropout=True, quantize_dropout_cutoff_index=3)
    with pytest.raises(TypeError):
        stack(unknown_option=1)


def test_registered_and_lazily_exported():
    assert vqcore.ResidualSimVQ is ResidualSimVQ
    q = vqcore.create("ResidualSimVQ", dim=4, num_quantizers=2, codebook_size=8)
    assert q.config["name"] == "residual_sim_vq" and q.codebook_dim == 4 and q.num_codebooks == 2


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_conformance_kit(rotation_trick):
    check_quantizer(
        "residual_sim_vq",
        torch.randn(2, 10, 8),
        dim=8,
        num_quantizers=3,
        codebook_size=16,
        rotation_trick=rotation_trick,
    )


def test_save_load_and_export_with_parity(tmp_path):
    q = stack(dim=8, codebook_size=64, num_quantizers=4, frozen_codebook_dim=6)
    x = torch.randn(3, 16, 8)
    q.train()(x)
    assert_save_load_equal(q, x, tmp_path)
    assert_exports_with_parity(q, x, tmp_path)


# -- vector-quantize-pytorch -----------------------------------------------------------------------------


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_converted_module_matches_the_reference_in_training(rotation_trick):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(8)
    ref = vqp.ResidualSimVQ(
        dim=6, num_quantizers=4, codebook_size=16, rotation_trick=rotation_trick, quantize_dropout=True
    )
    mine = from_reference(ref)
    assert isinstance(mine, ResidualSimVQ) and mine.quantize_dropout and mine.training
    x = torch.randn(2, 12, 6)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = ref(xr, return_all_codes=True, rand_quantize_dropout_fixed_seed=5)
    b = mine(xm, return_all_codes=True, rand_quantize_dropout_fixed_seed=5)
    assert torch.equal(a[1], b.indices)
    torch.testing.assert_close(a[0], b.quantized)
    torch.testing.assert_close(a[2], b.losses)
    torch.testing.assert_close(a[3], b.all_codes)
    (a[0].square().sum() + a[2].sum()).backward()
    (b.quantized.square().sum() + b.losses.sum()).backward()
    torch.testing.assert_close(xr.grad, xm.grad)
    for r, m in zip(ref.layers, mine.layers):
        g = r.code_transform.weight.grad
        assert (g is None) == (m.code_transform.weight.grad is None)
        if g is not None:
            torch.testing.assert_close(g, m.code_transform.weight.grad)


def test_reference_state_dict_loads_strictly_with_a_shared_mlp():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    def mlp():
        return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 4))

    torch.manual_seed(9)
    options = dict(dim=4, num_quantizers=2, codebook_size=8, frozen_codebook_dim=5, channel_first=True)
    ref = vqp.ResidualSimVQ(codebook_transform=mlp(), **options).eval()
    mine = ResidualSimVQ(codebook_transform=mlp(), **options).eval()
    mine.load_state_dict(ref.state_dict())  # strict: the same keys
    converted = from_reference(ref)
    assert converted.layers[0].code_transform is converted.layers[1].code_transform
    x = torch.randn(2, 4, 7)
    ref_quantized, ref_indices, _ = ref(x)
    for module in (mine, converted):
        quantized, indices, _ = module(x)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(quantized, ref_quantized)
        torch.testing.assert_close(
            module.get_output_from_indices(indices), ref.get_output_from_indices(indices)
        )


def _dropout_worker(rank: int, world: int, folder: str) -> None:
    """One rank of test_quantize_dropout_draw_is_agreed_across_ranks: its own torch seed, the same weights."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    try:
        torch.manual_seed(0)
        q = ResidualSimVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True).train()
        torch.manual_seed(100 + rank)  # each rank's own draw, before rank 0's is broadcast
        kept = [int((q(torch.randn(2, 3, 4)).indices[0, 0] >= 0).sum()) for _ in range(8)]
        torch.save(kept, f"{folder}/kept{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_quantize_dropout_draw_is_agreed_across_ranks(tmp_path):
    """Two gloo processes drawing from different torch seeds keep the same layers at every step."""
    import torch.multiprocessing as mp

    mp.spawn(_dropout_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    kept = [torch.load(tmp_path / f"kept{rank}.pt") for rank in range(2)]
    assert kept[0] == kept[1]
    assert len(set(kept[0])) > 1  # the draw really varied over the steps
