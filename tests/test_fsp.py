"""FSP: hand computations (bins, outputs, indices, perturbation, norm loss), the CDF activations and their
derivatives, layouts, int32 forward / int64 encode indices, float32 quantization, errors, the conformance
kit, save/load, export, and parity with vector-quantize-pytorch 1.32.0."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vqcore
from vqcore import FSP, ConfigurationError
from vqcore.compat import from_reference
from vqcore.export import to_onnx, to_torchscript
from vqcore.plugins.fsp import VECTOR_NORM_PRESETS, FSPOutput, batch_stats, build_cdf_act
from vqcore.testing import check_quantizer

vqp = pytest.importorskip("vector_quantize_pytorch")

SQRT12 = math.sqrt(12.0)
EPS32 = torch.finfo(torch.float32).eps

# plain-Python CDFs and inverses
CDFS = {
    "tanh": (lambda z: (math.tanh(z) + 1) / 2, lambda p: math.atanh(2 * p - 1)),
    "sigmoid": (lambda z: 1 / (1 + math.exp(-z)), lambda p: math.log(p / (1 - p))),
    "normal": (lambda z: (1 + math.erf(z / math.sqrt(2))) / 2, None),
    "laplace": (
        lambda z: 0.5 * math.exp(z) if z < 0 else 1 - 0.5 * math.exp(-z),
        lambda p: math.log(2 * p) if p < 0.5 else -math.log(2 * (1 - p)),
    ),
    "cauchy": (lambda z: math.atan(z) / math.pi + 0.5, lambda p: math.tan((p - 0.5) * math.pi)),
}


def hand_fsp(row, levels, act="tanh", inverse=False):
    """Plain-Python FSP (eval) of one latent vector: (outputs, index)."""
    cdf, icdf = CDFS[act]
    out, index, basis = [], 0, 1
    for z, L in zip(row, levels):
        digit = math.floor(min(cdf(z), 1 - EPS32) * L)
        centre = (digit + 0.5) / L
        out.append(icdf(centre) if inverse else (centre - 0.5) * SQRT12)
        index += digit * basis
        basis *= L
    return out, index


# -- README example (the reference's, import changed) ---------------------------------------------------


def test_readme_example():
    quantizer = FSP(levels=[8, 5, 5, 5], act_name="normal", quantize_rate=0.5, vector_norm="var")
    x = torch.randn(1, 1024, 4)
    quantized, indices, norm_loss, other_info = quantizer(x)
    assert quantized.shape == (1, 1024, 4) and indices.shape == (1, 1024)
    assert norm_loss.ndim == 0 and set(other_info) == {"level_indices", "norm_info", "p_accept_prob"}


# -- hand computations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "laplace", "cauchy"])
@pytest.mark.parametrize("inverse", [False, True])
def test_eval_outputs_and_indices_match_hand_computation(act, inverse):
    levels = [8, 5, 3]
    fsp = FSP(levels, act_name=act, need_inv_act=inverse).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 40, 3) * 1.5
    out = fsp(x)
    assert isinstance(out, FSPOutput) and out.indices.dtype == torch.int32
    for row, got, index in zip(
        x.reshape(-1, 3).tolist(), out.quantized.reshape(-1, 3).tolist(), out.indices.flatten()
    ):
        want, want_index = hand_fsp(row, levels, act, inverse)
        assert int(index) == want_index
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert fsp.basis.tolist() == [1, 8, 40]


def test_bins_are_equal_width_with_centred_codes():
    fsp = FSP([4]).eval()
    # p = (tanh(z) + 1) / 2 at the bin edges 1/4, 1/2, 3/4 and just inside them
    edges = torch.tensor([0.25, 0.5, 0.75]).mul(2).sub(1).atanh()
    x = torch.stack([edges - 1e-3, edges + 1e-3], -1).reshape(-1, 1)
    quantized, indices, *_ = fsp(x)
    assert indices.tolist() == [0, 1, 1, 2, 2, 3]
    centres = torch.tensor([0.125, 0.375, 0.375, 0.625, 0.625, 0.875])
    torch.testing.assert_close(quantized.flatten(), (centres - 0.5) * SQRT12)
    # p = 1 (saturated tanh) stays in the last bin
    assert fsp(torch.tensor([[30.0], [-30.0]])).indices.tolist() == [3, 0]


def test_index_layout_first_dimension_least_significant():
    fsp = FSP([3, 4, 2])
    digits = torch.cartesian_prod(torch.arange(2), torch.arange(4), torch.arange(3)).flip(-1)
    indices = fsp.level_indices_to_indices(digits)
    assert indices.dtype == torch.int32 and indices.tolist() == list(range(24))
    assert torch.equal(fsp.indices_to_level_indices(indices), digits)
    assert fsp.indices_to_level_indices(indices).dtype == torch.int64
    assert fsp.codebook_size == 24 and fsp.codebook_dim == 3 and not fsp.has_projections


def test_training_perturbation_draws_the_global_generator():
    levels = torch.tensor([8.0, 5.0])
    fsp = FSP([8, 5], quantize_rate=0.3).train()
    x = torch.randn(3, 10, 2)
    torch.manual_seed(11)
    quantized, indices, _, info = fsp(x)
    after = torch.get_rng_state()

    torch.manual_seed(11)
    p = (torch.tanh(x.reshape(-1, 2)) + 1) / 2
    digits = (p.clamp_max(1 - EPS32) * levels).floor()
    proposal = p + (1 / (2 * levels)) * (torch.rand(30, 2) * 2 - 1)
    accept = (proposal > 0) & (proposal < 1)
    perturb = torch.rand(30, 2) > 0.3
    value = torch.where(perturb, torch.where(accept, proposal, p), (digits + 0.5) / levels)
    assert torch.equal(torch.get_rng_state(), after)  # two (N, D) draws, nothing else
    torch.testing.assert_close(quantized, ((value - 0.5) * SQRT12).reshape(3, 10, 2))
    assert torch.equal(indices, (digits[:, 0] + 8 * digits[:, 1]).int().reshape(3, 10))  # unperturbed bins
    assert info["p_accept_prob"] == pytest.approx(accept.float().mean().item())
    assert 0 < perturb.float().mean() < 1


@pytest.mark.parametrize("training, rate", [(False, 0.0), (True, 1.0)])
def test_quantizing_paths_draw_nothing_and_equal_the_codes(training, rate):
    fsp = FSP([8, 5, 5, 5], quantize_rate=rate, dim=6).train(training)
    x = torch.randn(2, 16, 6, requires_grad=True)
    state = torch.get_rng_state()
    quantized, indices, _, info = fsp(x)
    assert torch.equal(torch.get_rng_state(), state) and "p_accept_prob" not in info
    assert torch.equal(quantized, fsp.indices_to_codes(indices))  # the straight-through value is exact


def test_straight_through_gradient_is_the_cdf_derivative_and_identity_with_inverse():
    x = torch.tensor([[-1.0, 0.0, 0.7], [0.2, -0.3, 2.0]], requires_grad=True)
    FSP([5, 4, 3], quantize_rate=1.0).train()(x).quantized.sum().backward()
    want = (1 - torch.tanh(x.detach()) ** 2) / 2 * SQRT12  # d/dz (tanh(z) + 1) / 2, scaled
    torch.testing.assert_close(x.grad, want)
    x.grad = None
    FSP([5, 4, 3], quantize_rate=1.0, need_inv_act=True).train()(x).quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_norm_loss_matches_hand_computation():
    torch.manual_seed(2)
    x = torch.randn(1, 50, 3) * 2 + 0.5
    fsp = FSP([5, 5, 5], vector_norm="kurt")
    _, _, norm_loss, info = fsp(x)
    cols = x.reshape(-1, 3).double().t().tolist()
    want, preset = 0.0, VECTOR_NORM_PRESETS["kurt"]
    for k, col in enumerate(cols):
        n, mean = len(col), sum(col) / len(col)
        var = sum((v - mean) ** 2 for v in col) / (n - 1)
        skew = sum(((v - mean) / math.sqrt(var)) ** 3 for v in col) / n
        kurt = sum(((v - mean) / math.sqrt(var)) ** 4 for v in col) / n - 3
        assert info["norm_info"]["kurtosis"][k].item() == pytest.approx(kurt, rel=1e-4)
        stats = (mean, var, skew, kurt)
        want += sum(
            preset[f"l{i}_weight"] * (s - preset.get(f"l{i}_target", 0.0)) ** 2 / 3
            for i, s in enumerate(stats, 1)
        )
    assert norm_loss.item() == pytest.approx(want, rel=1e-4)
    assert FSP([5, 5, 5], vector_norm="none")(x).norm_loss.item() == 0.0
    # one token (or none): no unbiased variance, so no statistics loss, whatever the preset (not NaN)
    for preset_name in ("none", "kurt"):
        for tokens in (x[:, :1], x[:, :0]):
            assert FSP([5, 5, 5], vector_norm=preset_name)(tokens).norm_loss.item() == 0.0
    mean, variance, skewness, kurtosis = batch_stats(torch.tensor([[1.0], [2.0], [3.0], [6.0]]))
    assert (mean.item(), variance.item()) == (3.0, pytest.approx(14 / 3))


# -- CDF activations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CDFS))
def test_cdf_values_and_inverse(name):
    cdf, icdf = build_cdf_act(name)
    z = torch.linspace(-4, 4, 81, dtype=torch.float64)
    torch.testing.assert_close(
        cdf(z), torch.tensor([CDFS[name][0](v) for v in z.tolist()], dtype=torch.float64)
    )
    torch.testing.assert_close(icdf(cdf(z)), z, atol=1e-7, rtol=1e-7)


def test_laplace_derivatives_are_analytic_at_the_midpoint_and_tails_finite():
    cdf, icdf = build_cdf_act("laplace")
    z = torch.tensor([-200.0, -1.0, 0.0, 1.0, 200.0], requires_grad=True)
    (grad,) = torch.autograd.grad(cdf(z).sum(), z)
    torch.testing.assert_close(grad, 0.5 * torch.exp(-z.detach().abs()))
    assert grad[2].item() == 0.5  # the sign(z) form gives 0 here
    p = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    (grad,) = torch.autograd.grad(icdf(p).sum(), p)
    torch.testing.assert_close(grad, torch.tensor([10.0, 2.0, 10.0]))
    # tails: e^z / 2 is exact where 1 - (1 - e^z) loses it
    assert cdf(torch.tensor(-30.0)).item() == pytest.approx(0.5 * math.exp(-30), rel=1e-6)


# -- layouts, dtypes, inference paths -------------------------------------------------------------------


def test_channel_first_and_channel_last_layouts():
    fsp = FSP([8, 5, 5, 5], dim=4, channel_first=True).eval()
    image = torch.randn(2, 4, 6, 5)
    quantized, indices, *_ = fsp(image)
    assert quantized.shape == image.shape and indices.shape == (2, 6, 5)
    last = FSP([8, 5, 5, 5]).eval()
    q_last, i_last, *_ = last(image.movedim(1, -1))  # (b, h, w, d): features last
    assert torch.equal(i_last, indices) and torch.equal(q_last.movedim(-1, 1), quantized)
    assert torch.equal(fsp.decode(indices), quantized) and torch.equal(fsp.encode(image), indices.long())


def test_encode_is_int64_and_decode_reproduces_forward():
    fsp = FSP([8, 5, 5, 5], dim=16, act_name="cauchy", need_inv_act=True).eval()
    x = torch.randn(3, 20, 16)
    out = fsp(x)
    indices = fsp.encode(x)
    assert indices.dtype == torch.int64 and torch.equal(indices, out.indices.long())
    assert torch.equal(fsp.decode(indices), out.quantized)
    assert torch.equal(fsp.decode(out.indices), out.quantized)  # int32 indices decode too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantization_runs_in_float32(dtype):
    torch.manual_seed(0)
    fsp = FSP([8, 5, 5], dim=6).eval()
    x = torch.randn(2, 30, 6).to(dtype)
    want = fsp(x.float())
    with torch.autocast("cpu", dtype=dtype):  # projections run with autocast off
        got = fsp(x)
    assert got.quantized.dtype == dtype and got.norm_loss.dtype == torch.float32
    assert torch.equal(got.indices, want.indices) and torch.equal(got.quantized, want.quantized.to(dtype))
    half = copy.deepcopy(FSP([8, 5, 5])).to(dtype)
    assert all(b.dtype == torch.float32 for b in half.buffers() if b.is_floating_point())
    assert torch.equal(half(x[..., :3]).indices, FSP([8, 5, 5])(x[..., :3].float()).indices)


# -- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(levels=[8, 1]), r"levels must be ints >= 2, got 1 in \[8, 1\]"),
        (dict(levels=[]), "levels must not be empty"),
        (dict(levels=[8], quantize_rate=1.5), r"quantize_rate must be in \[0.0, 1.0\], got 1.5"),
        (dict(levels=[8], act_name="relu"), r"act_name must be one of \['tanh', .*'cauchy'\], got 'relu'"),
        (dict(levels=[8], vector_norm="l2"), r"vector_norm must be one of \['none', .*\], got 'l2'"),
        (
            dict(levels=[2**16, 2**16]),
            "indices are int32: the product of levels must be < 2\\^31, got 4294967296",
        ),
        (dict(levels=[8], dim=0), "dim must be >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_configuration_errors(kwargs, message):
    with pytest.raises(ConfigurationError, match=message) as err:
        FSP(**kwargs)
    assert isinstance(err.value, AssertionError) and isinstance(err.value, ValueError)


def test_refused_inputs_name_the_problem_and_change_nothing():
    fsp = FSP([8, 5], dim=4, channel_first=True)
    state = {k: v.clone() for k, v in fsp.state_dict().items()}
    wrong = torch.randn(2, 3, 5)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"4 features on its second \(channel-first.*got shape \(2, 3, 5\)"):
        fsp(wrong)
    with pytest.raises(TypeError, match="x must be a floating point tensor, got dtype torch.int64"):
        fsp.encode(torch.ones(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 40\); got values in \[-1, 3\]"):
        fsp.decode(torch.tensor([[3, -1]]))
    with pytest.raises(ValueError, match="level_indices must end with an axis of 2 digits"):
        fsp.level_indices_to_indices(torch.zeros(3, 4))
    assert all(torch.equal(v, state[k]) for k, v in fsp.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


# -- vqcore contracts: kit, save/load, export -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(levels=[8, 5, 5, 5]), (2, 16, 4)),
        (
            dict(levels=[3, 5, 4], dim=8, channel_first=True, act_name="laplace", need_inv_act=True),
            (2, 8, 6, 5),
        ),
    ],
)
def test_conformance_kit(kwargs, shape):
    report = check_quantizer(FSP, torch.randn(shape), **kwargs)
    assert any("torch.export" in check for check in report.checks)


def test_save_load_round_trip(tmp_path):
    fsp = vqcore.create("fsp", levels=[8, 5, 5], dim=6, act_name="normal", channel_first=True)
    vqcore.save(fsp, tmp_path / "fsp.safetensors")
    loaded = vqcore.load(tmp_path / "fsp.safetensors")
    assert type(loaded) is FSP and loaded.config["kwargs"]["act_name"] == "normal"
    x = torch.randn(2, 6, 7)
    assert torch.equal(loaded(x).quantized, fsp.eval()(x).quantized)


@pytest.mark.parametrize("writer", [to_onnx, to_torchscript], ids=["onnx", "torchscript"])
@pytest.mark.parametrize("graph", ["encode", "decode"])
def test_export_with_parity(writer, graph, tmp_path):
    pytest.importorskip("onnxruntime")
    fsp = FSP([8, 5, 5, 5], dim=6, act_name="laplace", need_inv_act=True).eval()
    x = torch.randn(2, 16, 6)
    example = x if graph == "encode" else fsp.encode(x)
    result = writer(fsp, tmp_path / f"fsp_{graph}", graph=graph, example=example)
    assert result.parity.ok and result.metadata["method"] == "fsp"
    assert result.metadata["levels"] == [8, 5, 5, 5] and result.metadata["act_name"] == "laplace"


# -- the reference ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(levels=[8, 5, 5, 5]),
        dict(levels=[8, 5, 5, 5], dim=16, act_name="normal", need_inv_act=True, vector_norm="kurt"),
        dict(levels=[3, 5], dim=6, act_name="laplace", channel_first=True, vector_norm="var_laplace"),
        dict(levels=[7, 4], act_name="sigmoid", quantize_rate=0.25, projection_has_bias=False, dim=5),
    ],
)
def test_parity_with_the_reference(kwargs):
    torch.manual_seed(0)
    ref = vqp.FSP(**kwargs)
    mine = from_reference(ref)
    assert {k: mine.config["kwargs"][k] for k in kwargs} == kwargs
    FSP(**kwargs).load_state_dict(ref.state_dict(), strict=True)  # the reference's keys, as they are
    x = torch.randn(4, 64, kwargs.get("dim", len(kwargs["levels"]))) * 1.5
    if kwargs.get("channel_first"):
        x = x.transpose(1, 2)
    for training in (False, True):
        ref.train(training), mine.train(training)
        torch.manual_seed(5)
        want = ref(x)
        torch.manual_seed(5)
        got = mine(x)
        assert torch.equal(got.indices, want[1]) and got.indices.dtype == want[1].dtype
        torch.testing.assert_close(got.quantized, want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.norm_loss, want[2])
        assert set(got.other_info) == set(want[3])


def test_converter_refuses_an_edited_vector_norm_unless_allowed():
    ref = vqp.FSP(levels=[5, 5])
    ref.vector_norm.l2_target = 0.5
    with pytest.raises(ValueError, match="vector_norm with targets/weights of no preset"):
        from_reference(ref)
    assert from_reference(ref, allow_training_differences=True).config["kwargs"]["vector_norm"] == "none"
    assert from_reference(vqp.FSP(levels=[5, 5], vector_norm="var")).config["kwargs"]["vector_norm"] == "var"
