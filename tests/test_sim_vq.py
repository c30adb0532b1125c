"""SimVQ: the implicit codebook code_transform(frozen_codebook), its loss, gradients, layouts, artifacts and
the conversion from vector-quantize-pytorch."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_exports_with_parity, assert_same_state, assert_save_load_equal, snapshot
from torch import nn

import vqcore
from vqcore.errors import ConfigurationError
from vqcore.plugins.sim_vq import SimVQ
from vqcore.testing import check_quantizer

FROZEN = [[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]
WEIGHT = [[2.0, 0.0], [0.0, 0.5]]  # code_transform: (a, b) -> (2a, 0.5b); codes (2, 0), (0, 1), (-2, -0.5)


def small(**kwargs) -> SimVQ:
    q = SimVQ(dim=2, codebook_size=3, **kwargs)
    with torch.no_grad():
        q.frozen_codebook.copy_(torch.tensor(FROZEN))
        q.code_transform.weight.copy_(torch.tensor(WEIGHT))
    return q


def test_the_codebook_is_the_transform_of_the_frozen_codes():
    q = small()
    assert q.frozen_codebook.shape == (3, 2) and not q.frozen_codebook.requires_grad
    assert q.code_transform.bias is None
    assert torch.equal(q.codebook, torch.tensor([[2.0, 0.0], [0.0, 1.0], [-2.0, -0.5]]))
    assert sorted(q.state_dict()) == ["code_transform.weight", "frozen_codebook"]


def test_frozen_codebook_is_scaled_gaussian_then_init_fn():
    torch.manual_seed(3)
    q = SimVQ(dim=4, codebook_size=4096, frozen_codebook_dim=16)
    assert q.frozen_codebook.shape == (4096, 16) and q.code_transform.weight.shape == (4, 16)
    assert abs(q.frozen_codebook.var().item() - 1 / 16) < 0.005
    doubled = SimVQ(dim=4, codebook_size=8, init_fn=lambda c: c.sign())
    assert set(doubled.frozen_codebook.unique().tolist()) <= {-1.0, 1.0}


def test_loss_formula_by_hand():
    q = small(commitment_weight=2.0, input_to_quantize_commit_loss_weight=0.5).train()
    x = torch.tensor([[[1.5, 0.5], [0.2, 0.7], [-1.0, -1.0]]])
    out = q(x, return_loss_breakdown=True)
    # nearest codes: (2, 0), (0, 1), (-2, -0.5)
    assert out.indices.tolist() == [[0, 1, 2]]
    squared = (0.25 + 0.25) + (0.04 + 0.09) + (1.0 + 0.25)  # sum of ||x - q||^2 over the 3 tokens
    mse = squared / 6
    torch.testing.assert_close(out.breakdown.codebook, torch.tensor(mse))
    torch.testing.assert_close(out.breakdown.commitment, torch.tensor(mse))
    torch.testing.assert_close(out.loss, torch.tensor(2.0 * (mse + 0.5 * mse)))
    assert torch.equal(out.quantized, q.codebook[out.indices].detach())
    # eval: a fresh zero loss, the same codes
    q.eval()
    evaluated = q(x)
    assert evaluated.loss.item() == 0.0 and not evaluated.loss.requires_grad
    assert torch.equal(evaluated.indices, out.indices)


def test_gradient_paths_straight_through():
    q = small(rotation_trick=False).train()
    x = torch.tensor([[[1.5, 0.5], [0.2, 0.7]]], requires_grad=True)
    out = q(x)
    weight = q.code_transform.weight
    # the output reaches the input with the identity and never the transform
    (gx,) = torch.autograd.grad(out.quantized.sum(), x, retain_graph=True)
    assert torch.equal(gx, torch.ones_like(x))
    assert torch.autograd.grad(out.quantized.sum(), weight, allow_unused=True)[0] is None
    # the loss: the transform through mse(sg x, q) only; the input through the weighted commitment term
    out.loss.backward()
    codes = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    xv = x.detach()[0]
    expected_x = 0.25 * 2 * (xv - codes) / 4
    torch.testing.assert_close(x.grad[0], expected_x)
    # d/dW of mean ||sg x - W c||^2 = -2/4 Σ (x - q) c^T over the chosen frozen codes c
    frozen = torch.tensor(FROZEN)[[0, 1]]
    expected_w = -2 / 4 * (xv - codes).T @ frozen
    torch.testing.assert_close(weight.grad, expected_w)
    assert q.frozen_codebook.grad is None


def test_gradient_rotation_trick_rotates_the_input_onto_its_code():
    q = small().train()  # rotation_trick=True is the default
    x = torch.tensor([[[1.5, 0.5]]], requires_grad=True)
    out = q(x)
    assert torch.equal(out.quantized.detach(), torch.tensor([[[2.0, 0.0]]]))
    (gx,) = torch.autograd.grad(out.quantized[0, 0, 0], x)
    # d(λ R x)_0 / dx with u = x/|x|, v = q/|q|, w = (u+v)/|u+v|, λ = |q|/|x|: row 0 of λ (I - 2wwᵀ + 2vuᵀ)
    xv, qv = torch.tensor([1.5, 0.5]), torch.tensor([2.0, 0.0])
    u, v = xv / xv.norm(), qv / qv.norm()
    w = (u + v) / (u + v).norm()
    rotation = torch.eye(2) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
    expected = qv.norm() / xv.norm() * rotation[0]
    torch.testing.assert_close(gx[0, 0], expected)
    assert not torch.allclose(gx[0, 0], torch.tensor([1.0, 0.0]))


def test_channel_first_and_any_number_of_positions():
    torch.manual_seed(0)
    last = SimVQ(dim=4, codebook_size=8)
    first = SimVQ(dim=4, codebook_size=8, channel_first=True)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 3, 5, 2, 4)
    a = last.eval()(x)
    b = first.eval()(x.movedim(-1, 1))
    assert a.indices.shape == b.indices.shape == (2, 3, 5, 2)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized.movedim(-1, 1), b.quantized)
    assert torch.equal(first.decode(b.indices), b.quantized)
    single = last(torch.randn(3, 4))  # (batch, dim): one token each
    assert single.indices.shape == (3,) and single.quantized.shape == (3, 4)


def test_decode_reads_the_transformed_table_and_minus_one_gives_zeros():
    q = small()
    # a transform that mixes codes: looking up the table is not transforming the gathered rows
    q.code_transform = nn.Sequential(q.code_transform, nn.Softmax(dim=0))
    table = q.codebook
    indices = torch.tensor([[2, -1, 0]])
    codes = q.indices_to_codes(indices)
    assert torch.equal(codes[0, 0], table[2]) and torch.equal(codes[0, 2], table[0])
    assert torch.equal(codes[0, 1], torch.zeros(2))


def test_eval_output_keeps_the_estimator_gradient():
    q = small(rotation_trick=False).eval()
    x = torch.tensor([[[1.5, 0.5]]], requires_grad=True)
    out = q(x)
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(out.quantized.detach(), q.decode(q.encode(x.detach())))


def test_half_module_keeps_the_frozen_codebook_float32():
    torch.manual_seed(1)
    q = SimVQ(dim=8, codebook_size=16).eval()
    x = torch.randn(2, 5, 8)
    q.half()
    assert q.frozen_codebook.dtype == torch.float32 and q.code_transform.weight.dtype == torch.float16
    out = q(x.half())
    assert out.quantized.dtype == torch.float16 and out.indices.dtype == torch.int64
    assert torch.equal(out.indices, q.encode(x))


def test_bad_input_names_what_was_expected_and_changes_nothing():
    torch.manual_seed(2)
    q = SimVQ(dim=4, codebook_size=8)
    before = snapshot(q)
    with pytest.raises(ValueError, match=r"4 features on its last axis, got shape \(2, 3, 5\)"):
        q(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating point"):
        q(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"indices must be in \[0, 8\) or -1 \(dropped\); got values in \[0, 8\]"
    ):
        q.decode(torch.tensor([[0, 8]]))
    with pytest.raises(TypeError, match="integer tensor"):
        q.decode(torch.zeros(2, 3))
    assert_same_state(q, before)
    first = SimVQ(dim=4, codebook_size=8, channel_first=True)
    with pytest.raises(ValueError, match=r"\(batch, dim, \*positions\) with 4 features on its second"):
        first(torch.randn(2, 3, 4))


def test_configuration_errors():
    with pytest.raises(ConfigurationError, match="codebook_size must be >= 1"):
        SimVQ(dim=4, codebook_size=0)
    with pytest.raises(AssertionError, match=r"codebook_transform must map .* to \(8, 4\) .*got \(8, 3\)"):
        SimVQ(dim=4, codebook_size=8, codebook_transform=nn.Linear(4, 3))
    with pytest.raises(ConfigurationError, match=r"init_fn must return a \(8, 4\) tensor"):
        SimVQ(dim=4, codebook_size=8, init_fn=lambda c: c[:2])
    with pytest.raises(TypeError, match="codebook_transform must be an nn.Module"):
        SimVQ(dim=4, codebook_size=8, codebook_transform=lambda c: c)
    with pytest.raises(
        ConfigurationError, match="commitment_weight and input_to_quantize_commit_loss_weight"
    ):
        SimVQ(dim=4, codebook_size=8, commitment_weight=-1.0)


def test_registered_and_lazily_exported():
    assert vqcore.SimVQ is SimVQ
    q = vqcore.create("SimVQ", dim=4, codebook_size=8)
    assert isinstance(q, SimVQ) and q.config["name"] == "sim_vq"


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_conformance_kit(rotation_trick):
    check_quantizer("sim_vq", torch.randn(2, 12, 8), dim=8, codebook_size=32, rotation_trick=rotation_trick)


def test_save_load_and_export_with_parity(tmp_path):
    torch.manual_seed(4)
    q = SimVQ(dim=8, codebook_size=64, frozen_codebook_dim=12)
    x = torch.randn(3, 20, 8)
    q.train()(x)
    assert_save_load_equal(q, x, tmp_path)
    assert_exports_with_parity(q, x, tmp_path)


def test_channel_first_exports_with_parity(tmp_path):
    torch.manual_seed(5)
    q = SimVQ(dim=6, codebook_size=32, channel_first=True)
    assert_exports_with_parity(q, torch.randn(2, 6, 7), tmp_path, writers=("torchscript",))


# -- vector-quantize-pytorch -----------------------------------------------------------------------------


def _reference_pair(**kwargs):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(6)
    ref = vqp.SimVQ(**kwargs)
    return ref, from_reference(ref)


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_converted_module_matches_the_reference(rotation_trick):
    ref, mine = _reference_pair(dim=8, codebook_size=32, rotation_trick=rotation_trick, commitment_weight=0.5)
    assert isinstance(mine, SimVQ) and mine.training
    x = torch.randn(2, 30, 8)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ref(xr), mine(xm)
    assert torch.equal(a[1], b.indices)
    torch.testing.assert_close(a[0], b.quantized)
    torch.testing.assert_close(a[2], b.loss)
    (a[0].square().sum() + a[2]).backward()
    (b.quantized.square().sum() + b.loss).backward()
    torch.testing.assert_close(xr.grad, xm.grad)
    torch.testing.assert_close(ref.code_transform.weight.grad, mine.code_transform.weight.grad)


def test_reference_state_dict_loads_strictly_with_an_mlp_transform():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    def mlp():
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    torch.manual_seed(7)
    ref = vqp.SimVQ(
        dim=4, codebook_size=16, codebook_transform=mlp(), frozen_codebook_dim=6, channel_first=True
    )
    mine = SimVQ(dim=4, codebook_size=16, codebook_transform=mlp(), frozen_codebook_dim=6, channel_first=True)
    mine.load_state_dict(ref.state_dict())  # strict: the same keys
    converted = from_reference(ref.eval())
    x = torch.randn(2, 4, 3, 5)
    for module in (mine.eval(), converted):
        quantized, indices, _ = module(x)
        ref_quantized, ref_indices, _ = ref(x)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(quantized, ref_quantized)


def test_a_transform_module_in_the_config_is_refused_by_save_not_by_state_dict(tmp_path):
    q = SimVQ(dim=4, codebook_size=8, codebook_transform=nn.Linear(4, 4))
    with pytest.raises(TypeError, match="must be JSON-serialisable to save: Object of type Linear"):
        vqcore.save(q, tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()
    twin = SimVQ(dim=4, codebook_size=8, codebook_transform=nn.Linear(4, 4))
    twin.load_state_dict(q.state_dict())
    x = torch.randn(2, 3, 4)
    assert torch.equal(twin.encode(x), q.encode(x))
