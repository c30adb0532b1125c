"""FSQ / ResidualFSQ: seed examples, index layout (hand computation, exhaustive, reference parity),
layouts and the encode/decode contract, float32 quantization, quantize dropout, coarse and per-layer
codes, return_all_codes, export metadata, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_exports_with_parity

from vqcore import FSQ, ResidualFSQ
from vqcore.errors import ConfigurationError
from vqcore.export.metadata import quantizer_fields
from vqcore.plugins.fsq import FSQOutputWithCodes
from vqcore.testing import check_quantizer

# -- seed README examples (only the import changed) ----------------------------------------------


def test_seed_fsq():
    quantizer = FSQ(levels=[8, 5, 5, 5])
    x = torch.randn(1, 1024, 4)
    xhat, indices = quantizer(x)
    assert xhat.shape == (1, 1024, 4) and indices.shape == (1, 1024)
    assert torch.all(xhat == quantizer.indices_to_codes(indices))


def test_seed_fsq_without_indices():
    quantizer = FSQ(levels=[8, 5, 5, 5], return_indices=False)
    x = torch.randn(1, 1024, 4)
    xhat, indices = quantizer(x)
    assert xhat.shape == (1, 1024, 4)
    assert indices is None
    assert quantizer.codebook_size == 1000  # exists without indices too (reference: missing)


def test_seed_residual_fsq():
    residual_fsq = ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_fsq.eval()
    quantized, indices = residual_fsq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8)
    quantized_out = residual_fsq.get_output_from_indices(indices)
    assert quantized_out.shape == (1, 1024, 256)
    assert torch.all(quantized == quantized_out)


# -- index layout ---------------------------------------------------------------------------------


def hand_fsq(values, levels):
    """Plain-Python FSQ (default bound) of one vector: (codes, index)."""
    codes, index, basis = [], 0, 1
    for z, L in zip(values, levels):
        half_l = (L - 1) * (1 + 1e-3) / 2
        offset = 0.5 if L % 2 == 0 else 0.0
        shift = math.atanh(offset / half_l)
        level = round(math.tanh(z + shift) * half_l - offset)
        codes.append(level / (L // 2))
        index += (level + L // 2) * basis
        basis *= L
    return codes, index


def test_index_matches_hand_computation():
    levels = [8, 5, 5, 5]
    q = FSQ(levels)
    torch.manual_seed(1)
    x = torch.randn(64, 4, dtype=torch.float64) * 1.5
    out, indices = q(x.float().unsqueeze(0))
    for row, got_codes, got_index in zip(x.tolist(), out[0].tolist(), indices[0].tolist()):
        codes, index = hand_fsq(row, levels)
        assert got_index == index
        assert got_codes == pytest.approx(codes, abs=1e-6)
    assert q.grid.basis.tolist() == [1, 8, 40, 200]
    assert indices.dtype == torch.int64


def test_exhaustive_round_trip_8555():
    q = FSQ([8, 5, 5, 5])
    all_indices = torch.arange(1000)
    codes = q.indices_to_codes(all_indices.unsqueeze(0)).squeeze(0)  # (1000, 4)
    assert torch.equal(q.codes_to_indices(codes), all_indices)
    assert torch.unique(codes, dim=0).shape[0] == 1000
    digits = q.indices_to_level_indices(all_indices)
    assert torch.equal(digits[:, 0] + 8 * digits[:, 1] + 40 * digits[:, 2] + 200 * digits[:, 3], all_indices)
    # every code is reached by the forward: invert the bound at each code's centre
    half_l = (q.grid.levels.double() - 1) * (1 + 1e-3) / 2
    offset = torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    level = codes.double() * (q.grid.levels // 2).double()
    z = torch.atanh((level + offset) / half_l) - torch.atanh(offset / half_l)
    out, indices = q(z.float().unsqueeze(0))
    assert torch.equal(indices[0], all_indices)
    assert torch.equal(out[0], codes)


@pytest.mark.parametrize(
    "levels, kwargs",
    [
        ([8, 5, 5, 5], {}),
        ([7, 4, 6, 3], {}),
        ([2, 3, 4, 8], {"preserve_symmetry": True}),
        ([8, 6, 5], {"num_codebooks": 2}),
    ],
)
def test_index_parity_with_reference(levels, kwargs):
    from vector_quantize_pytorch import FSQ as RefFSQ

    ours, ref = FSQ(levels, **kwargs), RefFSQ(levels, **kwargs)
    x = torch.randn(3, 2000, len(levels) * kwargs.get("num_codebooks", 1)) * 2
    a, i = ours(x)
    b, j = ref(x)
    assert torch.equal(i, j.long()) and torch.equal(a, b)


def test_index_parity_with_reference_image_and_projection():
    from vector_quantize_pytorch import FSQ as RefFSQ

    ours, ref = FSQ([8, 5, 5, 5], dim=16), RefFSQ([8, 5, 5, 5], dim=16)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 8, 8)
    a, i = ours(x)
    b, j = ref(x)
    assert i.shape == (2, 8, 8) and torch.equal(i, j.long())
    torch.testing.assert_close(a, b)


def test_residual_fsq_parity_with_reference():
    from vector_quantize_pytorch import ResidualFSQ as RefRFSQ

    ours = ResidualFSQ(dim=64, levels=[8, 5, 5, 3], num_quantizers=4).eval()
    ref = RefRFSQ(dim=64, levels=[8, 5, 5, 3], num_quantizers=4).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 256, 64)
    a, i = ours(x)
    b, j = ref(x)
    assert torch.equal(i, j.long())
    torch.testing.assert_close(a, b)


def test_large_codebook_indices_exact_int64():
    levels = [1000] * 6  # 1e18 codes: beyond float and int32
    q = FSQ(levels)
    top = torch.tensor([[10**18 - 1, 123456789012345678]])
    assert torch.equal(q.codes_to_indices(q.indices_to_codes(top, project_out=False)), top)


# -- symmetric variant, dtypes ------------------------------------------------------------------------


def test_preserve_symmetry_levels():
    q = FSQ([2, 4], preserve_symmetry=True)
    codes = q.indices_to_codes(torch.arange(8).unsqueeze(0))[0]
    assert sorted(set(codes[:, 0].tolist())) == [-1.0, 1.0]
    assert sorted(set(codes[:, 1].tolist())) == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])


def test_bf16_quantizes_in_float32():
    q = FSQ([16, 16, 16])  # 4096 codes: more than bf16 can count exactly
    x = torch.randn(1, 20000, 3) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, indices = q(x.bfloat16())
    _, want = q(x.bfloat16().float())
    assert torch.equal(indices, want)
    assert out.dtype == torch.bfloat16
    assert torch.unique(indices).numel() > 3000  # the reference's bf16 path lost about half the codes


def test_gradient_is_straight_through_the_bound():
    q = FSQ([5, 5])
    x = torch.zeros(1, 1, 2, requires_grad=True)
    q(x).quantized.sum().backward()
    # d/dz tanh(z) * half_l / half_width at 0 (odd L: no shift) = half_l / 2
    assert x.grad[0, 0].tolist() == pytest.approx([2 * (1 + 1e-3) / 2] * 2)


# -- layouts and the encode/decode contract ----------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs, index_shape",
    [
        ((2, 16, 4), {}, (2, 16)),
        ((2, 4), {}, (2,)),
        ((2, 4, 16), {"channel_first": True}, (2, 16)),
        ((2, 4, 3, 5), {}, (2, 3, 5)),
        ((2, 4, 2, 3, 5), {}, (2, 2, 3, 5)),
        ((2, 12, 3, 5), {"dim": 12, "num_codebooks": 2}, (2, 3, 5, 2)),
        ((2, 16, 7), {"dim": 7}, (2, 16)),
    ],
)
def test_decode_equals_eval_forward(shape, kwargs, index_shape):
    levels = [8, 5, 5, 5] if "num_codebooks" not in kwargs else [8, 5, 5, 5, 4, 3]
    q = FSQ(levels, **kwargs).eval()
    x = torch.randn(*shape)
    out, indices = q(x)
    assert out.shape == x.shape and indices.shape == index_shape
    assert torch.equal(q.encode(x), indices)
    assert torch.equal(q.decode(indices), out)


@pytest.mark.parametrize("shape", [(2, 8, 12), (2, 12, 3, 4), (2, 12, 2, 3, 4)])
def test_residual_fsq_layouts_decode(shape):
    q = ResidualFSQ(levels=[5, 4, 3], num_quantizers=3, dim=12).eval()
    x = torch.randn(*shape)
    out, indices = q(x)
    assert out.shape == x.shape and indices.shape == (
        shape[0],
        *(shape[1:2] if len(shape) == 3 else shape[2:]),
        3,
    )
    assert torch.equal(q.get_output_from_indices(indices), out)
    assert torch.equal(q.encode(x), indices)


def test_residual_fsq_layers_refine_and_dropout():
    torch.manual_seed(0)
    q = ResidualFSQ(levels=[8, 5, 5, 3], num_quantizers=4, quantize_dropout=True, dim=4)
    x = torch.randn(4, 256, 4) * 0.5
    q.eval()
    _, indices = q(x)
    errors = [(q.decode(indices[..., : k + 1]) - x).pow(2).mean().item() for k in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    q.train()
    seen = set()
    for seed in range(20):
        _, idx = q(x.requires_grad_(), rand_quantize_dropout_fixed_seed=seed)
        kept = int((idx[0, 0] >= 0).sum())
        assert torch.all(idx[..., kept:] == -1) and torch.all(idx[..., :kept] >= 0)
        seen.add(kept)
        full = q.decode(idx)
        assert torch.equal(full, q.decode(idx[..., :kept]))
    assert len(seen) > 1
    # training mode decides, not grad mode (one rule for every residual stack and training state)
    drop_seed = next(s for s in range(20) if q.dropout.kept_layers(True, s) < 4)
    with torch.no_grad():
        assert (q(x, rand_quantize_dropout_fixed_seed=drop_seed)[1] == -1).any()
    q.eval()
    assert torch.all(q(x, rand_quantize_dropout_fixed_seed=drop_seed)[1] >= 0)


def test_state_dict_empty_without_projections():
    assert FSQ([8, 5, 5, 5]).state_dict() == {}
    assert set(FSQ([8, 5, 5, 5], dim=16).state_dict()) == {
        "project_in.weight",
        "project_in.bias",
        "project_out.weight",
        "project_out.bias",
    }


@pytest.mark.parametrize(
    "factory, example, kwargs",
    [
        (FSQ, (2, 8, 4), dict(levels=[8, 5, 5, 5])),
        (FSQ, (2, 12, 3, 4), dict(levels=[5, 4, 3], dim=12, num_codebooks=2)),
        (FSQ, (2, 6, 2, 3, 4), dict(levels=[2, 3, 4], dim=6, preserve_symmetry=True)),
        (ResidualFSQ, (2, 8, 12), dict(levels=[5, 4, 3], num_quantizers=3, dim=12)),
        (ResidualFSQ, (2, 12, 3, 4), dict(levels=[5, 4, 3], num_quantizers=3, dim=12)),
    ],
)
def test_conformance(factory, example, kwargs):
    check_quantizer(factory, torch.randn(*example), **kwargs)


def test_registry_names():
    import vqcore

    assert isinstance(vqcore.create("fsq", levels=[5, 5]), FSQ)
    assert isinstance(vqcore.create("residual_fsq", levels=[5, 5], num_quantizers=2), ResidualFSQ)


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "levels, error, match",
    [
        ([], ValueError, "must not be empty"),
        ([8, 1], ValueError, "ints >= 2"),
        ([8, 2.5], TypeError, "must contain ints"),
        ([8, 2], ValueError, "preserve_symmetry"),
        (8, TypeError, "must be a list"),
    ],
)
def test_bad_levels(levels, error, match):
    with pytest.raises(error, match=match):
        FSQ(levels)


def test_bad_inputs_and_indices():
    q = FSQ([8, 5, 5, 5])
    with pytest.raises(ValueError, match="4 features"):
        q(torch.randn(1, 10, 5))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        q.indices_to_codes(torch.tensor([[1000]]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        q.decode(torch.tensor([[-1]]))
    with pytest.raises(TypeError, match="integer"):
        q.decode(torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="codebook axis of size 2"):
        FSQ([5, 5], num_codebooks=2).decode(torch.zeros(1, 3, 3, dtype=torch.long))
    r = ResidualFSQ(levels=[5, 5], num_quantizers=2)
    with pytest.raises(ValueError, match="quantizer axis of 1..2 entries"):
        r.decode(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 25\)"):
        r.decode(torch.full((1, 3, 2), 25))


def test_residual_fsq_all_dropped_token_decodes_to_zero_after_projection():
    """Like ResidualVQ and ResidualLFQ: -1 in every layer means no code, so no project_out bias either."""
    from vqcore import ResidualFSQ

    rfsq = ResidualFSQ(dim=8, levels=[5, 5, 5], num_quantizers=3).eval()
    indices = rfsq.encode(torch.randn(2, 4, 8))
    indices[0, 1] = -1
    out = rfsq.decode(indices)
    assert torch.equal(out[0, 1], torch.zeros(8))
    assert not torch.equal(rfsq.decode(indices[..., :1])[0, 0], torch.zeros(8))


def test_residual_fsq_dropout_arguments_are_checked_once():
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index must be in"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, quantize_dropout_cutoff_index=2)
    with pytest.raises(ValueError, match="quantize_dropout_multiple_of must be >= 1"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, quantize_dropout_multiple_of=0)
    with pytest.raises(ValueError, match="num_quantizers must be >= 1"):
        ResidualFSQ(levels=[5, 5], num_quantizers=0)


def test_residual_fsq_return_all_codes():
    q = ResidualFSQ(levels=[5, 4, 3], num_quantizers=3, dim=6, quantize_dropout=True)
    x = torch.randn(2, 7, 6)
    out = q(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=0)
    assert isinstance(out, FSQOutputWithCodes)
    quantized, indices, all_codes = out  # unpacks as before
    assert all_codes.shape == (3, 2, 7, 3)
    kept = int((indices[0, 0] >= 0).sum())
    assert torch.all(all_codes[kept:] == 0)
    torch.testing.assert_close(q.project_out(all_codes.sum(0)), quantized)
    q.eval()
    out = q(torch.randn(2, 6, 3, 4), return_all_codes=True)  # images: codes channel-last, as decoded
    assert out.all_codes.shape == (3, 2, 3, 4, 3)
    assert torch.equal(q.get_codes_from_indices(out.indices), out.all_codes)


def test_residual_fsq_per_layer_codes_by_hand_and_padded():
    q = ResidualFSQ(levels=[3, 5], num_quantizers=3)  # symmetric levels: 3 -> (-1, 0, 1), 5 -> step 0.5
    # index 7 = digits (1, 2): codes (0, 0); index 14 = digits (2, 4): codes (1, 1); scales 1/L^q
    codes = q.get_codes_from_indices(torch.tensor([[[14, 14], [7, -1]]]))  # (b=1, n=2, q=2)
    assert codes.shape == (3, 1, 2, 2)
    assert codes[0, 0, 0].tolist() == [1.0, 1.0]
    assert codes[1, 0, 0].tolist() == pytest.approx([1 / 3, 1 / 5])
    assert codes[0, 0, 1].tolist() == [0.0, 0.0] and torch.all(codes[1, 0, 1] == 0)
    assert torch.all(codes[2] == 0)  # the missing layer
    decoded = q.decode(torch.tensor([[[14, 14], [7, -1]]]))
    torch.testing.assert_close(decoded, codes.sum(0))


def _artifact_fields(quantizer):
    """What an exported artifact records about the quantizer (the generic fields and export_metadata)."""
    fields = quantizer_fields(quantizer)
    fields.pop("config")
    return fields


def test_export_metadata():
    meta = _artifact_fields(FSQ([8, 5, 5, 5], dim=16, num_codebooks=2))
    want = dict(dim=16, codebook_dim=4, codebook_size=1000, num_codebooks=2, levels=[8, 5, 5, 5])
    assert meta == {**want, "channel_first": None}
    assert FSQ([5, 5], channel_first=True).export_metadata()["channel_first"] is True
    meta = _artifact_fields(ResidualFSQ(levels=[5, 4], num_quantizers=2, dim=6))
    scales = meta.pop("scales")  # float32 values, as lists
    assert [row == pytest.approx(want) for row, want in zip(scales, ([1.0, 1.0], [0.2, 0.25]))] == [True] * 2
    assert meta == dict(
        dim=6,
        codebook_dim=2,
        codebook_size=20,
        num_codebooks=1,
        num_quantizers=2,
        levels=[5, 4],
        channel_first=None,
    )
    json.dumps(meta)


def test_residual_fsq_state_dict_keys():
    assert ResidualFSQ(levels=[5, 5], num_quantizers=2).state_dict() == {}
    assert set(ResidualFSQ(levels=[5, 5], num_quantizers=2, dim=6).state_dict()) == {
        "project_in.weight",
        "project_in.bias",
        "project_out.weight",
        "project_out.bias",
    }


# -- the reference's options --------------------------------------------------------------------------


def test_forward_takes_z_by_name_as_the_reference():
    q = FSQ([8, 5, 5, 5]).eval()
    x = torch.randn(2, 7, 4)
    by_name, positional = q(z=x), q(x)
    assert torch.equal(by_name.quantized, positional.quantized) and torch.equal(
        by_name.indices, positional.indices
    )


def _fsq_pair(kwargs, seed=0):
    """vqcore's and the reference's FSQ built from the same seed (so their rotations are the same draw)."""
    from vector_quantize_pytorch import FSQ as RefFSQ

    torch.manual_seed(seed)
    ours = FSQ(**kwargs)
    torch.manual_seed(seed)
    return ours, RefFSQ(**kwargs)


def test_noise_dropout_by_hand_and_only_in_training():
    q = FSQ([5, 4], preserve_symmetry=True, noise_dropout=1.0)  # every component gets noise
    x = torch.randn(2, 9, 2)
    clean, indices = q.eval()(x)
    torch.manual_seed(3)
    torch.empty_like(clean).bernoulli_(1.0)  # the draws the forward makes, in its order
    noise = torch.rand_like(clean) - 0.5
    torch.manual_seed(3)
    noisy, noisy_indices = q.train()(x)
    assert torch.equal(noisy, (clean + noise).clamp(-1.0, 1.0))
    assert torch.equal(noisy_indices, indices)  # the indices are those of the codes before the noise
    assert torch.equal(q.eval()(x).quantized, clean)  # eval: no noise
    with torch.no_grad():  # training mode decides, not grad mode
        assert not torch.equal(q.train()(x).quantized, clean)


def test_noise_dropout_is_the_probability_of_noise():
    # (the reference draws its mask with probability 0.5 whatever noise_dropout: see the module docstring)
    q = FSQ([5, 5], preserve_symmetry=True, noise_dropout=0.2).train()
    x = torch.randn(1, 50_000, 2) * 0.1  # codes in {-0.5, 0, 0.5}: code + noise stays inside [-1, 1]
    changed = (q(x).quantized != q.eval()(x).quantized).float().mean().item()
    assert 0.19 < changed < 0.21


def test_noise_dropout_matches_the_reference_under_one_seed():  # at 0.5, where the reference's mask is right
    ours, ref = _fsq_pair(dict(levels=[8, 5, 5], preserve_symmetry=True, noise_dropout=0.5))
    x = torch.randn(3, 50, 3, requires_grad=True)
    torch.manual_seed(7)
    a, i = ours.train()(x)
    torch.manual_seed(7)
    b, j = ref.train()(x)
    assert torch.equal(i, j.long()) and torch.equal(a, b)
    ga = torch.autograd.grad(a.square().sum(), x)[0]
    torch.manual_seed(7)
    gb = torch.autograd.grad(ref(x)[0].square().sum(), x)[0]
    torch.testing.assert_close(ga, gb)


def test_noise_dropout_errors():
    with pytest.raises(ConfigurationError, match="noise_dropout=0.5 needs preserve_symmetry=True"):
        FSQ([5, 5], noise_dropout=0.5)
    with pytest.raises(AssertionError):  # code written for the reference's assert keeps working
        FSQ([5, 5], noise_dropout=0.5)
    with pytest.raises(ConfigurationError, match=r"noise_dropout must be in \[0, 1\], got 1.5"):
        FSQ([5, 5], preserve_symmetry=True, noise_dropout=1.5)
    with pytest.raises(TypeError, match="noise_dropout must be a number"):
        FSQ([5, 5], preserve_symmetry=True, noise_dropout="0.1")


@pytest.mark.parametrize("preserve_symmetry", [False, True])
def test_orthogonal_rotation_by_hand_and_round_trips(preserve_symmetry):
    q = FSQ([5, 5, 5], dim=6, num_codebooks=2, preserve_symmetry=preserve_symmetry, orthogonal_rotation=True)
    assert set(q.state_dict()) >= {"orthogonal_rot"} and q.orthogonal_rot.shape == (3, 3)
    rot = q.orthogonal_rot
    torch.testing.assert_close(rot @ rot.T, torch.eye(3), atol=1e-6, rtol=0)
    q.eval()
    x = torch.randn(2, 11, 6)
    out, indices = q(x)
    plain = FSQ([5, 5, 5], dim=6, num_codebooks=2, preserve_symmetry=preserve_symmetry).eval()
    plain.load_state_dict({k: v for k, v in q.state_dict().items() if k != "orthogonal_rot"})
    z = q.project_in(x).reshape(2, 11, 2, 3)
    grid_codes = plain.decode(
        plain.encode(q.project_out.weight.new_zeros(0)) if False else indices, project_out=False
    )
    want_indices = plain.grid.quantize(z @ rot)[1]
    assert torch.equal(indices, want_indices)  # the grid quantizes z @ R
    codes = q.decode(indices, project_out=False).reshape(2, 11, 2, 3)
    torch.testing.assert_close(codes, grid_codes.reshape(2, 11, 2, 3) @ rot.T)  # and outputs codes @ R^T
    assert torch.equal(q.decode(q.encode(x)), out)
    assert torch.equal(q.codes_to_indices(codes), indices)


def test_orthogonal_rotation_matches_the_reference_and_stays_float32():
    ours, ref = _fsq_pair(dict(levels=[5, 5], preserve_symmetry=True, orthogonal_rotation=True), seed=4)
    ours.load_state_dict(ref.state_dict())  # strict: the reference's key
    x = torch.randn(2, 40, 2)
    a, i = ours.eval()(x)
    b, j = ref.eval()(x)
    assert torch.equal(i, j.long())
    torch.testing.assert_close(a, b)
    assert ours.half().orthogonal_rot.dtype == torch.float32


def test_bound_hard_clamp_shifts_by_the_offset_as_the_reference():
    # L = 4: half_l = 3 * 1.001 / 2, offset 0.5, shift = offset / half_l;
    # level = round(clamp(z + shift, -1, 1) * half_l - 0.5)
    q = FSQ([4], bound_hard_clamp=True)
    half_l = 3 * 1.001 / 2
    z = [-2.0, -0.9, 0.0, 0.4, 0.9, 3.0]
    want = []
    for v in z:
        level = round(min(max(v + 0.5 / half_l, -1.0), 1.0) * half_l - 0.5)
        want.append(level / 2)
    assert q(torch.tensor(z).reshape(1, -1, 1)).quantized.flatten().tolist() == want
    assert want[3] == 0.5  # z = 0.4 crosses to the next level only with the shift
    ours, ref = _fsq_pair(dict(levels=[8, 6, 5], bound_hard_clamp=True))
    x = torch.randn(2, 500, 3)
    assert torch.equal(ours(x).indices, ref(x)[1].long())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(levels=[8, 5, 5, 5]),
        dict(levels=[8, 5, 4], preserve_symmetry=True),
        dict(levels=[8, 6, 5], bound_hard_clamp=True),
        dict(levels=[4, 5, 3], preserve_symmetry=True, bound_hard_clamp=True),
        dict(levels=[8, 5], num_codebooks=2, dim=6),
    ],
)
def test_gradient_matches_the_reference(kwargs):
    ours, ref = _fsq_pair(kwargs)
    if "dim" in kwargs:
        ours.load_state_dict(ref.state_dict())
    x = (torch.randn(2, 300, ours.dim) * 1.5).requires_grad_()
    a, b = ours.train()(x).quantized, ref.train()(x)[0]
    assert torch.equal(a, b)
    weights = torch.randn_like(a)
    ga, gb = (torch.autograd.grad((out * weights).sum(), x)[0] for out in (a, b))
    torch.testing.assert_close(ga, gb)


def _near_boundaries(levels, n=200):
    """float64 inputs within 1e-9 of the default bound's decision boundaries (float32 cannot tell)."""
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = (lv % 2 == 0).double() * 0.5
    shift = torch.atanh(offset / half_l)
    k = torch.randint(0, 3, (n, len(levels))).double() - 1.0
    z = torch.atanh((k + 0.5 + offset) / half_l) - shift
    return (z + (torch.rand(n, len(levels), dtype=torch.float64) - 0.5) * 2e-9).unsqueeze(0)


def test_allowed_dtypes_quantize_float64_in_float64_as_the_reference():
    from vector_quantize_pytorch import FSQ as RefFSQ

    levels = [8, 5, 5, 5]
    x = _near_boundaries(levels)
    default, ref = FSQ(levels), RefFSQ(levels)
    out, indices = default(x)
    assert out.dtype == torch.float64 and torch.equal(indices, ref(x)[1].long())
    only_f32 = FSQ(levels, allowed_dtypes=(torch.float32,))
    assert torch.equal(only_f32(x).indices, default(x.float()).indices)
    assert not torch.equal(only_f32(x).indices, indices)  # float32 rounds some inputs across a boundary


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(allowed_dtypes=(torch.float32, torch.bfloat16)),
        dict(allowed_dtypes=(torch.float32, torch.bfloat16), preserve_symmetry=True),
        dict(force_quantization_f32=False),
        dict(force_quantization_f32=False, preserve_symmetry=True),
    ],
)
def test_low_precision_quantization_on_request_matches_the_reference(kwargs):
    ours, ref = _fsq_pair(dict(levels=[8, 5, 5, 5], **kwargs))
    x = (torch.randn(2, 2000, 4) * 2).bfloat16()
    out, indices = ours(x)
    ref_out, ref_indices = ref(x)
    assert out.dtype == torch.bfloat16 and torch.equal(indices, ref_indices.long())
    assert torch.equal(out, ref_out)


def test_scale_is_stored_and_unused_and_dtype_names_keep_the_config_json(tmp_path):
    import vqcore

    q = FSQ(
        [5, 5], dim=4, scale=2.0, allowed_dtypes=(torch.float32, torch.bfloat16), orthogonal_rotation=True
    )
    assert q.scale == 2.0 and q.allowed_dtypes == (torch.float32, torch.bfloat16)
    assert q.config["kwargs"]["allowed_dtypes"] == ["float32", "bfloat16"]
    assert FSQ([5, 5], allowed_dtypes=["float32", "torch.float64"]).allowed_dtypes == (
        torch.float32,
        torch.float64,
    )
    plain = FSQ([5, 5], dim=4, orthogonal_rotation=True)
    plain.load_state_dict(q.state_dict())
    x = torch.randn(2, 6, 4)
    assert torch.equal(q(x).quantized, plain(x).quantized)  # scale changes nothing
    vqcore.save(q, tmp_path / "fsq.safetensors")
    loaded = vqcore.load(tmp_path / "fsq.safetensors")
    assert torch.equal(loaded.orthogonal_rot, q.orthogonal_rot) and loaded.allowed_dtypes == q.allowed_dtypes
    assert torch.equal(loaded(x).quantized, q(x).quantized)
    with pytest.raises(TypeError, match="scale must be a number or None"):
        FSQ([5, 5], scale="2")
    with pytest.raises(TypeError, match="allowed_dtypes must be floating torch dtypes"):
        FSQ([5, 5], allowed_dtypes=(torch.int64,))


def test_refused_forward_changes_no_state():
    from helpers import assert_same_state, snapshot

    q = FSQ([5, 5], dim=4, preserve_symmetry=True, noise_dropout=0.2, orthogonal_rotation=True)
    before = snapshot(q)
    with pytest.raises(ValueError, match="must have 4 features"):
        q(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating point"):
        q(torch.ones(2, 3, 4, dtype=torch.long))
    assert_same_state(q, before)


@pytest.mark.parametrize(
    "kwargs, example",
    [
        (dict(levels=[5, 5, 4], orthogonal_rotation=True), (2, 8, 3)),
        (dict(levels=[5, 4], dim=6, preserve_symmetry=True, noise_dropout=0.3), (2, 6, 3, 4)),
        (dict(levels=[8, 6], bound_hard_clamp=True, num_codebooks=2), (2, 8, 4)),
    ],
)
def test_conformance_with_the_new_options(kwargs, example):
    check_quantizer(FSQ, torch.randn(*example), **kwargs)


@pytest.mark.parametrize("writer", ["onnx", "torchscript"])
def test_export_with_rotation_and_hard_clamp(writer, tmp_path):
    q = FSQ([5, 5, 4], dim=6, orthogonal_rotation=True, bound_hard_clamp=True)
    assert_exports_with_parity(q, torch.randn(2, 5, 6), tmp_path, writers=(writer,))


def test_quantize_gives_the_forward_codes_with_the_straight_through_gradient():
    q = FSQ(levels=[8, 5, 5])
    z = torch.randn(2, 7, 3, requires_grad=True)
    zhat = q.quantize(z)
    out = q(z)
    assert torch.equal(zhat, out.quantized)  # no projection: the forward's output is the codes
    assert torch.equal(q.codes_to_indices(zhat), out.indices)
    zhat.sum().backward()
    assert z.grad is not None and torch.all(z.grad > 0)  # the bound's slope, never zero
    with pytest.raises(ValueError, match="z must have 3 features on the last axis, got shape"):
        q.quantize(torch.zeros(2, 4))
