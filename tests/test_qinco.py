"""ResidualVQ(implicit_neural_codebook=True) (QINCo) and its block vqcore.blocks.implicit_codebook."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_exports_with_parity, assert_save_load_equal, snapshot
from torch.utils._python_dispatch import TorchDispatchMode

from vqcore import GroupedResidualVQ, ResidualVQ
from vqcore.blocks import implicit_codebook
from vqcore.blocks.implicit_codebook import (
    ImplicitCodebookMLP,
    decode_implicit,
    lookup_transformed,
    nearest_transformed,
    search_chunk_rows,
    transformed_codes,
)
from vqcore.errors import ConfigurationError
from vqcore.testing import check_quantizer


def _mlp(dim=8, seed=0, **kwargs) -> ImplicitCodebookMLP:
    torch.manual_seed(seed)
    mlp = ImplicitCodebookMLP(dim, **kwargs)
    with torch.no_grad():  # weights large enough that the blocks matter
        for p in mlp.parameters():
            p.mul_(3.0)
    return mlp


def _materialised(mlp: ImplicitCodebookMLP, condition, codes):
    """The reference formulation in float64: every (token, code) pair concatenated and through the MLP's
    layers, (N, K, d)."""
    w = {k: v.detach().double() for k, v in mlp.state_dict().items()}
    n, k = condition.shape[0], codes.shape[0]
    pairs = (condition.double()[:, None].expand(n, k, -1), codes.double()[None].expand(n, k, -1))
    x = F.linear(torch.cat(pairs, -1), w["proj_in.weight"], w["proj_in.bias"])
    for j in range(mlp.depth):
        hidden = F.silu(F.linear(x, w[f"layers.{j}.0.weight"], w[f"layers.{j}.0.bias"]))
        x = x + F.linear(hidden, w[f"layers.{j}.2.weight"], w[f"layers.{j}.2.bias"])
    return F.normalize(x, dim=-1) if mlp.l2norm_output else x


# -- the MLP ------------------------------------------------------------------------------------------


def test_mlp_matches_hand_computation():
    mlp = ImplicitCodebookMLP(2, dim_hidden=1, depth=1)
    with torch.no_grad():
        mlp.proj_in.weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, -1.0, 0.0, 1.0]]))
        mlp.proj_in.bias.copy_(torch.tensor([0.5, 0.0]))
        mlp.layers[0][0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        mlp.layers[0][0].bias.copy_(torch.tensor([-1.0]))
        mlp.layers[0][2].weight.copy_(torch.tensor([[2.0], [-1.0]]))
        mlp.layers[0][2].bias.copy_(torch.tensor([0.0, 1.0]))
    condition, code = [1.0, 2.0], [3.0, -1.0]
    # proj_in on [condition, code]: (1 + 2*3 + 0.5, -2 - 1) = (7.5, -3)
    x = [7.5, -3.0]
    h = x[0] + x[1] - 1.0  # 3.5
    silu = h / (1.0 + math.exp(-h))
    expected = [x[0] + 2.0 * silu, x[1] - silu + 1.0]
    codes = torch.tensor([[0.0, 0.0], code])
    cond = torch.tensor([condition])
    full = mlp(codes, condition=cond.unsqueeze(0))  # (b, n, c, d)
    assert full.shape == (1, 1, 2, 2)
    torch.testing.assert_close(full[0, 0, 1], torch.tensor(expected))
    torch.testing.assert_close(
        lookup_transformed(mlp, cond, codes, torch.tensor([1]))[0], torch.tensor(expected)
    )
    got = transformed_codes(mlp, cond[0].double(), codes.double())[1]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    mlp.l2norm_output = True
    norm = math.hypot(*expected)
    torch.testing.assert_close(
        lookup_transformed(mlp, cond, codes, torch.tensor([1]))[0], torch.tensor([e / norm for e in expected])
    )


def test_mlp_state_dict_keys_and_forward_match_the_reference():
    rvq_module = pytest.importorskip("vector_quantize_pytorch.residual_vq")
    ref = rvq_module.MLP(dim=6, dim_hidden=10, depth=3)
    mine = ImplicitCodebookMLP(6, dim_hidden=10, depth=3)
    mine.load_state_dict(ref.state_dict(), strict=True)
    codes, condition = torch.randn(5, 6), torch.randn(2, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(mine(codes, condition=condition), ref(codes, condition=condition))
        heads = torch.randn(2, 5, 6)
        torch.testing.assert_close(mine(heads, condition=condition), ref(heads, condition=condition))
        torch.testing.assert_close(
            mine(codes, condition=condition[:, 0]), ref(codes, condition=condition[:, 0])
        )


# -- the search ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("depth", [0, 2])
def test_chunked_search_equals_brute_force_for_every_chunk_size(cosine, depth):
    mlp = _mlp(8, dim_hidden=12, depth=depth, l2norm_output=cosine)
    g = torch.Generator().manual_seed(1)
    x, condition, codes = (
        torch.randn(37, 8, generator=g),
        torch.randn(37, 8, generator=g),
        torch.randn(16, 8, generator=g),
    )
    if cosine:
        x = F.normalize(x, dim=-1)
    table = _materialised(mlp, condition, codes)  # (N, K, d)
    if cosine:
        expected = (table @ x.double().unsqueeze(-1)).squeeze(-1).argmax(-1)
    else:
        expected = (table - x.double().unsqueeze(1)).pow(2).sum(-1).argmin(-1)
    per_token = 4 * 16 * (8 + (12 if depth else 0))
    results = []
    for chunk_bytes in (1, per_token, 3 * per_token, 10 * per_token, 2**30):
        got = nearest_transformed(mlp, x, condition, codes, cosine=cosine, chunk_bytes=chunk_bytes)
        assert got.dtype == torch.int64 and got.shape == (37,)
        assert torch.equal(got, expected), chunk_bytes
        results.append(got)
    assert search_chunk_rows(mlp, 16, 3 * per_token) == 3


def test_search_ties_go_to_the_lowest_index():
    mlp = _mlp(4, depth=1)
    g = torch.Generator().manual_seed(2)
    codes = torch.randn(6, 4, generator=g)
    codes[4] = codes[1]  # two identical codes: identical transformed codes for every token
    condition = torch.randn(20, 4, generator=g)
    table = _materialised(mlp, condition, codes).float()
    x = table[:, 4] + 1e-3 * torch.randn(20, 4, generator=g)  # nearest to the duplicated code
    for chunk_bytes in (1, 4 * 6 * 8 * 3, 2**30):
        got = nearest_transformed(mlp, x, condition, codes, cosine=False, chunk_bytes=chunk_bytes)
        assert torch.equal(got, torch.ones(20, dtype=torch.int64))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_search_memory_stays_under_the_budget():
    mlp = _mlp(16, dim_hidden=32, depth=2)
    n, size, budget = 300, 64, 64 * 2**10
    x, condition, codes = torch.randn(n, 16), torch.randn(n, 16), torch.randn(size, 16)
    materialised = n * size * 16 * 4
    rows = search_chunk_rows(mlp, size, budget)
    assert rows * size * (16 + 32) * 4 <= budget < (rows + 1) * size * (16 + 32) * 4
    with _LargestTensor() as probe:
        got = nearest_transformed(mlp, x, condition, codes, cosine=False, chunk_bytes=budget)
    assert probe.largest <= budget and probe.largest * 10 < materialised
    assert torch.equal(
        got, (_materialised(mlp, condition, codes) - x.double().unsqueeze(1)).pow(2).sum(-1).argmin(-1)
    )


def test_training_step_never_materialises_the_transformed_codebooks(monkeypatch):
    monkeypatch.setattr(implicit_codebook, "SEARCH_CHUNK_BYTES", 64 * 2**10)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=64, implicit_neural_codebook=True)
    x = torch.randn(2, 150, 16, requires_grad=True)
    with _LargestTensor() as probe:
        out, _, losses = rvq(x)
        (out.sum() + losses.sum()).backward()
    # the largest is layer 0's plain (tokens, codes) score block; the reference holds (tokens, codes, dim)
    # transformed codebooks, and (tokens, codes, 2 * dim) for their concatenated inputs
    assert probe.largest * 10 < 300 * 64 * 16 * 4


# -- the residual stack ----------------------------------------------------------------------------------


def _hand_forward(rvq: ResidualVQ, x):
    """The materialised formulation of a training forward (the reference's): straight-through outputs,
    the sum of the layers' outputs so far as condition, a one-hot selection of the (tokens, codes, d)
    transformed codebook, commitment losses that train the codes (and the MLPs)."""
    z = x.reshape(-1, x.shape[-1])
    residual, total, indices, losses = z, None, [], []
    for q, layer in enumerate(rvq.layers):
        codes = layer.codebook
        if q == 0:
            table = codes.unsqueeze(0).expand(z.shape[0], -1, -1)
        else:
            table = rvq.mlps[q - 1](codes, condition=total.unsqueeze(0))[0]  # (N, K, d)
        with torch.no_grad():
            idx = (table - residual.unsqueeze(1)).pow(2).sum(-1).argmin(-1)
        onehot = F.one_hot(idx, codes.shape[0]).to(table.dtype)
        chosen = torch.einsum("nk,nkd->nd", onehot, table)
        losses.append(F.mse_loss(residual, chosen))
        out = residual + (chosen - residual).detach()
        total = out if total is None else total + out
        residual = residual - chosen.detach()
        indices.append(idx)
    return total.reshape(x.shape), torch.stack(indices, -1).reshape(*x.shape[:-1], -1), torch.stack(losses)


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


def test_training_gradients_equal_the_materialised_formulation():
    torch.manual_seed(3)
    rvq = ResidualVQ(
        dim=8, num_quantizers=3, codebook_size=12, implicit_neural_codebook=True, mlp_kwargs={"depth": 2}
    )
    x = torch.randn(2, 25, 8)
    weights = torch.randn(2, 25, 8)
    results = []
    for forward in (lambda t: rvq(t), lambda t: _hand_forward(rvq, t)):
        rvq.zero_grad()
        xi = x.clone().requires_grad_()
        out, indices, losses = forward(xi)
        ((out * weights).sum() + (losses * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
        results.append((out.detach(), indices, losses.detach(), [g.clone() for g in _grads(rvq, xi)]))
    (out_a, idx_a, loss_a, grads_a), (out_b, idx_b, loss_b, grads_b) = results
    assert torch.equal(idx_a, idx_b)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) == 1 + len(list(rvq.parameters()))
    for ga, gb in zip(grads_a, grads_b):
        assert ga is not None and gb is not None and gb.abs().sum() > 0
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_frozen_codebook_trains_neither_codes_nor_mlps():
    torch.manual_seed(4)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, implicit_neural_codebook=True)
    x = torch.randn(1, 20, 8, requires_grad=True)
    out, _, losses = rvq(x, freeze_codebook=True)
    (out.sum() + losses.sum()).backward()
    assert all(p.grad is None or not p.grad.any() for p in rvq.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


CONFIGS = {
    "plain": dict(dim=8, num_quantizers=3, codebook_size=16),
    "cosine": dict(dim=8, num_quantizers=3, codebook_size=16, use_cosine_sim=True),
    "shared": dict(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True),
    "projection_sizes": dict(dim=8, num_quantizers=3, codebook_size=(16, 8, 12), codebook_dim=6),
    "dropout": dict(dim=8, num_quantizers=4, codebook_size=16, quantize_dropout=True),
    "mlp_kwargs": dict(dim=8, num_quantizers=2, codebook_size=16, mlp_kwargs={"dim_hidden": 5, "depth": 1}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_encode_equals_eval_forward_and_training_quantized(name):
    torch.manual_seed(5)
    rvq = ResidualVQ(implicit_neural_codebook=True, **CONFIGS[name])
    x = torch.randn(2, 30, 8)
    rvq.train()
    out, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=1)
    torch.testing.assert_close(rvq.decode(indices), out, rtol=0, atol=1e-5)
    assert losses.shape == (rvq.num_quantizers,)
    rvq.eval()
    state = snapshot(rvq)
    with torch.no_grad():
        quantized, indices, losses, all_codes = rvq(x, return_all_codes=True)
        assert torch.equal(rvq.encode(x), indices)
        assert torch.equal(rvq.decode(indices), quantized)
        assert torch.equal(rvq.get_codes_from_indices(indices), all_codes)
    assert all_codes.shape == (rvq.num_quantizers, 2, 30, rvq.codebook_dim)
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_coarse_and_masked_decoding():
    torch.manual_seed(6)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, implicit_neural_codebook=True).eval()
    x = torch.randn(1, 10, 8)
    indices = rvq.encode(x)
    codes = rvq.get_codes_from_indices(indices)
    # two layers of three: the first two layers' codes, the third zero (its condition would be theirs)
    coarse = rvq.decode(indices[..., :2])
    torch.testing.assert_close(coarse, codes[0] + codes[1], rtol=0, atol=0)
    dropped = indices.clone()
    dropped[..., 2] = -1
    assert torch.equal(rvq.decode(dropped), coarse)
    assert torch.equal(rvq.get_codes_from_indices(dropped)[2], torch.zeros(1, 10, 8))
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 7:] = False
    with torch.no_grad():
        out, idx, _ = rvq(x, mask=mask)
    assert (idx[0, 7:] == -1).all() and torch.equal(out[0, 7:], torch.zeros(3, 8))
    assert torch.equal(idx[0, :7], indices[0, :7]) and torch.equal(rvq.decode(idx), out)


def test_masked_training_matches_the_unmasked_prefix():
    torch.manual_seed(7)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, implicit_neural_codebook=True)
    x = torch.randn(1, 24, 8)
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[0, :16] = True
    out, indices, losses = rvq(x[:, :16])
    masked_out, masked_indices, masked_losses = rvq(x, mask=mask)
    assert torch.equal(masked_indices[:, :16], indices) and (masked_indices[:, 16:] == -1).all()
    torch.testing.assert_close(masked_out[:, :16], out)
    torch.testing.assert_close(masked_losses, losses)
    assert torch.equal(masked_out[:, 16:], torch.zeros(1, 8, 8))


def test_grouped_residual_vq_with_implicit_codebooks():
    torch.manual_seed(8)
    grvq = GroupedResidualVQ(
        dim=8, groups=2, num_quantizers=2, codebook_size=8, implicit_neural_codebook=True
    )
    assert all(len(rvq.mlps) == 1 for rvq in grvq.rvqs)
    x = torch.randn(2, 12, 8)
    grvq.eval()
    out, indices, _ = grvq(x)
    assert torch.equal(grvq.decode(indices), out)


def test_stochastic_sampling_draws_from_the_transformed_codes():
    torch.manual_seed(9)
    kwargs = dict(dim=8, num_quantizers=2, codebook_size=16, implicit_neural_codebook=True)
    rvq = ResidualVQ(stochastic_sample_codes=True, sample_codebook_temp=1e-4, **kwargs)
    x = torch.randn(1, 40, 8)
    _, indices, _ = rvq(x)
    assert torch.equal(indices, rvq.encode(x))  # a temperature near 0 picks the nearest code
    _, hot, _ = rvq(x, sample_codebook_temp=100.0)
    assert not torch.equal(hot[..., 1], indices[..., 1])


def test_check_quantizer_save_load_and_export(tmp_path):
    kwargs = dict(dim=8, num_quantizers=3, codebook_size=16, implicit_neural_codebook=True)
    x = torch.randn(2, 10, 8)
    check_quantizer(ResidualVQ, x, **kwargs)
    torch.manual_seed(10)
    rvq = ResidualVQ(**kwargs)
    rvq(x)
    assert_save_load_equal(rvq, x, tmp_path)
    assert_exports_with_parity(rvq, x, tmp_path)


def test_export_with_cosine(tmp_path):
    torch.manual_seed(11)
    rvq = ResidualVQ(
        dim=8, num_quantizers=2, codebook_size=16, implicit_neural_codebook=True, use_cosine_sim=True
    )
    assert_exports_with_parity(rvq, torch.randn(2, 10, 8), tmp_path, writers=("torchscript",))


def test_export_tie_check_judges_transformed_codes():
    torch.manual_seed(12)
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=6, implicit_neural_codebook=True).eval()
    with torch.no_grad():
        codes = rvq.layers[1].codebook_module.codes
        codes[0, 5] = codes[0, 2]  # identical transformed codes for every condition
    x = torch.randn(1, 8, 4)
    indices = rvq.encode(x)
    other = indices.clone()
    other[..., 1] = torch.where(indices[..., 1] == 2, 5, indices[..., 1])
    ties = rvq.export_tie_check(x, indices, other, 1e-6)
    assert ties.all()
    far = indices.clone()
    far[..., 1] = (indices[..., 1] + 1) % 6
    far[..., 1] = torch.where(far[..., 1] == 5, 0, far[..., 1])  # never the duplicate of code 2
    far[..., 1] = torch.where((indices[..., 1] == 5) & (far[..., 1] == 0), 1, far[..., 1])
    assert not rvq.export_tie_check(x, indices, far, 1e-6)[..., 1].any()  # layer 0 agrees


# -- converter -------------------------------------------------------------------------------------------


def test_converter_against_the_reference():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(13)
    ref = vqp.ResidualVQ(
        dim=8,
        num_quantizers=3,
        codebook_size=16,
        implicit_neural_codebook=True,
        mlp_kwargs=dict(dim_hidden=12, depth=2),
    )
    ref.train()
    ref(torch.randn(2, 20, 8))
    ref.eval()
    mine = from_reference(ref).eval()
    assert mine.implicit_neural_codebook and mine.mlps[0].dim_hidden == 12 and mine.mlps[0].depth == 2
    fresh = ResidualVQ(
        dim=8,
        num_quantizers=3,
        codebook_size=16,
        implicit_neural_codebook=True,
        mlp_kwargs=dict(dim_hidden=12, depth=2),
    )
    fresh.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 20, 8)
    with torch.no_grad():
        ref_out, ref_indices, _ = ref(x)
        out, indices, _ = mine(x)
        ref_codes = ref.get_codes_from_indices(ref_indices)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.get_codes_from_indices(indices), ref_codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh.eval()(x).quantized, out, rtol=0, atol=0)


def test_training_gradients_match_the_reference():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(14)
    kwargs = dict(dim=8, num_quantizers=3, codebook_size=16, implicit_neural_codebook=True)
    ref = vqp.ResidualVQ(rotation_trick=False, **kwargs)
    mine = ResidualVQ(**kwargs)
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 20, 8)
    results = []
    for module in (ref, mine):
        xi = x.clone().requires_grad_()
        out, indices, losses = module(xi)
        (out.pow(2).sum() + losses.sum()).backward()
        results.append(
            (indices, out.detach(), losses.detach(), [xi.grad] + [p.grad for p in module.parameters()])
        )
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][3], results[1][3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ema_update=True), "ema_update=True"),
        (dict(codebook="euclidean"), "codebook='euclidean'"),
        (dict(straight_through=True), "straight_through=True"),
        (dict(mlp_kwargs={"width": 3}), "mlp_kwargs takes dim_hidden and depth, got ['width']"),
        (dict(mlp_kwargs={"l2norm_output": True}), "l2norm_output follows use_cosine_sim"),
        (dict(mlp_kwargs={"depth": -1}), "depth must be an int >= 0, got -1"),
        (dict(mlp_kwargs={"dim_hidden": 0}), "dim_hidden must be a positive int, got 0"),
        (dict(mlp_kwargs=[2]), "mlp_kwargs must be a dict, got list"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ConfigurationError) as info:
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, implicit_neural_codebook=True, **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, AssertionError)  # the reference asserts


def test_mlp_kwargs_without_implicit_codebook_is_refused():
    with pytest.raises(ConfigurationError, match="implicit_neural_codebook=True"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, mlp_kwargs={"depth": 2})


def test_bad_input_changes_no_state():
    torch.manual_seed(15)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, implicit_neural_codebook=True)
    state = snapshot(rvq)
    with pytest.raises(ValueError, match="8"):
        rvq(torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="indices"):
        rvq.decode(torch.full((1, 5, 2), 8))
    with pytest.raises(TypeError, match="indices"):
        rvq.decode([[0, 1]])
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_decode_implicit_zero_for_dropped_layers_and_condition_chain():
    mlp = _mlp(4, depth=1)
    books = [torch.randn(5, 4), torch.randn(7, 4)]
    indices = torch.tensor([[1, 3], [2, -1], [-1, -1]])
    codes = decode_implicit(books, [mlp], indices)
    torch.testing.assert_close(codes[0][0], books[0][1])
    expected = _materialised(mlp, books[0][1].unsqueeze(0), books[1])[0, 3].float()
    torch.testing.assert_close(codes[1][0], expected)
    assert torch.equal(codes[1][1], torch.zeros(4)) and torch.equal(codes[0][2], torch.zeros(4))


def test_mlps_stay_float32_and_compute_in_float32_under_autocast():
    torch.manual_seed(16)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=8, implicit_neural_codebook=True)
    rvq.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in rvq.mlps.parameters())
    rvq.float()
    x = torch.randn(2, 6, 8)
    rvq.eval()
    plain = rvq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = rvq(x)
        assert torch.equal(rvq.decode(mixed.indices), mixed.quantized)
    assert torch.equal(mixed.indices, plain.indices) and torch.equal(mixed.quantized, plain.quantized)
    rvq.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, losses = rvq(x.requires_grad_())
        (out.sum() + losses.sum()).backward()
    assert rvq.mlps[0].proj_in.weight.grad.dtype == torch.float32


def test_grouped_converter_carries_every_groups_mlps():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(17)
    ref = vqp.GroupedResidualVQ(
        dim=8, groups=2, num_quantizers=2, codebook_size=8, implicit_neural_codebook=True
    )
    ref.eval()
    mine = from_reference(ref).eval()
    assert torch.equal(mine.rvqs[1].mlps[0].proj_in.weight, ref.rvqs[1].mlps[0].proj_in.weight)
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        ref_out, ref_indices, _ = ref(x)
        out, indices, _ = mine(x)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_a_beam_asked_per_call_is_refused_with_the_implicit_codebook_and_changes_no_state():
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, implicit_neural_codebook=True)
    state = snapshot(rvq)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="beam_size=2 with implicit_neural_codebook=True"):
        rvq(x, beam_size=2)
    with pytest.raises(ValueError, match="beam search over implicit neural codebooks"):
        rvq.encode_tokens(x, beam_size=3)
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, state[key])
    with pytest.raises(ConfigurationError, match="implicit_neural_codebook=True with beam_size=4"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, implicit_neural_codebook=True, beam_size=4)
