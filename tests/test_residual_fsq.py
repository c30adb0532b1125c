"""ResidualFSQ's reference options (is_channel_first, soft clamping, bound_hard_clamp, FSQ options forwarded
to the layers), its fused training path against the reference (values, indices, gradients),
GroupedResidualFSQ, the reference converters of both, conformance, save / load and export."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_exports_with_parity, assert_same_state, snapshot

import vqcore
from vqcore import GroupedResidualFSQ, ResidualFSQ
from vqcore.book_layout import BookAxis, BookLayout
from vqcore.compat import from_reference
from vqcore.errors import ConfigurationError
from vqcore.module import QuantizerModule
from vqcore.plugins.residual_fsq import GroupedFSQOutputWithCodes
from vqcore.testing import check_quantizer

vqp = pytest.importorskip("vector_quantize_pytorch")


def _pair(name, kwargs, seed=0):
    """vqcore's and the reference's module from the same seed, the reference's state loaded strictly."""
    torch.manual_seed(seed)
    ours = getattr(vqcore, name)(**kwargs)
    torch.manual_seed(seed)
    ref = getattr(vqp, name)(**kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


# -- the reference's values, indices and gradients --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(levels=[8, 5, 5, 3], num_quantizers=4),
        dict(levels=[8, 5, 5, 3], num_quantizers=4, dim=16),
        dict(levels=[5, 4, 3], num_quantizers=3, bound_hard_clamp=False),
        dict(levels=[5, 4, 3], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=1.5),
        dict(
            levels=[5, 4, 3], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=[1.5, 2.0, 3.0]
        ),
        dict(levels=[5, 5], num_quantizers=3, orthogonal_rotation=True),
    ],
    ids=["default", "projection", "no_clamp", "soft_clamp", "soft_clamp_per_dim", "rotation"],
)
def test_training_step_matches_the_reference(kwargs):
    ours, ref = _pair("ResidualFSQ", kwargs)
    dim = kwargs.get("dim", len(kwargs["levels"]))
    x = (torch.randn(2, 300, dim) * 2).requires_grad_()
    (a, i), (b, j) = ours.train()(x), ref.train()(x)
    assert torch.equal(i, j)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    weights = torch.randn_like(a)
    ga, gb = (torch.autograd.grad((out * weights).sum(), x)[0] for out in (a, b))
    torch.testing.assert_close(ga, gb)
    if "dim" in kwargs:  # the projections' gradients too
        ours.zero_grad(), ref.zero_grad()
        ours(x)[0].square().sum().backward()
        ref(x)[0].square().sum().backward()
        torch.testing.assert_close(
            ours.project_in.weight.grad, ref.project_in.weight.grad, rtol=1e-5, atol=1e-5
        )


def test_fused_value_is_the_decode_of_the_indices_bit_for_bit():
    q = ResidualFSQ(levels=[8, 5, 5, 3], num_quantizers=6, dim=12).train()
    x = torch.randn(3, 40, 12, requires_grad=True)
    out, indices = q(x)
    assert torch.equal(q.decode(indices), out.detach())


def test_quantize_dropout_training_matches_the_reference():
    ours, ref = _pair("ResidualFSQ", dict(levels=[5, 4, 3], num_quantizers=4, quantize_dropout=True))
    x = torch.randn(2, 50, 3, requires_grad=True)
    (a, i, codes), (b, j, ref_codes) = (
        m.train()(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=1) for m in (ours, ref)
    )
    assert (i == -1).any() and torch.equal(i, j)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(codes, ref_codes)


def test_noise_dropout_in_the_layers_matches_the_reference_under_one_seed():
    ours, ref = _pair("ResidualFSQ", dict(levels=[5, 5, 3], num_quantizers=3, noise_dropout=0.5))
    x = torch.randn(2, 60, 3)
    torch.manual_seed(11)
    a, i = ours.train()(x)
    torch.manual_seed(11)
    b, j = ref.train()(x)
    assert torch.equal(i, j)
    torch.testing.assert_close(a, b)
    assert torch.equal(ours.eval()(x)[0], ours.decode(ours.encode(x)))  # no noise in eval


# -- is_channel_first ------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(3,), (4, 3), (2, 4, 3)])
def test_is_channel_first_index_layout_and_decode(spatial):
    torch.manual_seed(0)
    q = ResidualFSQ(levels=[3, 5], num_quantizers=3, dim=4, is_channel_first=True).eval()
    x = torch.randn(2, 4, *spatial)
    out, indices = q(x)
    assert out.shape == x.shape and indices.shape == (2, 3, *spatial)
    assert torch.equal(q.decode(indices), out) and torch.equal(q.encode(x), indices)
    # the same tokens, channel-last: quantizer and spatial axes are never exchanged (3 == 3 here)
    last = ResidualFSQ(levels=[3, 5], num_quantizers=3, dim=4).eval()
    last.load_state_dict(q.state_dict())
    tokens = x.movedim(1, -1).reshape(2, -1, 4)
    want, want_indices, want_codes = last(tokens, return_all_codes=True)
    assert torch.equal(indices.movedim(1, -1).reshape(2, -1, 3), want_indices)
    assert torch.equal(out.movedim(1, -1).reshape(2, -1, 4), want)
    codes = q.get_codes_from_indices(indices)
    assert codes.shape == (3, 2, *spatial, 2) and torch.equal(codes.reshape(3, 2, -1, 2), want_codes)
    # a coarse prefix (b, 1, *spatial) decodes to the first layer alone
    first = q.get_codes_from_indices(indices[:, :1])
    assert torch.all(first[1:] == 0) and torch.equal(first[0], codes[0])


def test_is_channel_first_return_all_codes_and_dropout():
    torch.manual_seed(0)
    q = ResidualFSQ(levels=[3, 5], num_quantizers=3, dim=4, is_channel_first=True, quantize_dropout=True)
    x = torch.randn(2, 4, 4, 5, requires_grad=True)
    out, indices, codes = q(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=1)
    assert codes.shape == (3, 2, 4, 5, 2) and (indices[:, 1:] == -1).all()
    assert torch.equal(codes, q.get_codes_from_indices(indices))
    torch.testing.assert_close(q.project_out(codes.sum(0)).movedim(-1, 1), out)
    torch.testing.assert_close(q.decode(indices[:, :1]), out.detach())
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- options and errors --------------------------------------------------------------------------------


def test_soft_clamp_by_hand():
    q = ResidualFSQ(levels=[5, 5], num_quantizers=1, bound_hard_clamp=False, soft_clamp_input_value=2)
    assert q.soft_clamp_input_value.tolist() == 2.0  # an int works too (the reference needs a float)
    x = torch.tensor([[[0.3, -3.0]]])
    clamped = torch.tanh(x / 2) * 2
    want = (2 / 4) * ((4 * (torch.tanh(clamped) + 1) / 2 + 0.5).floor()) - 1  # the symmetric tanh bound
    assert torch.equal(q(x).quantized, want)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(soft_clamp_input_value=2.0), ConfigurationError, "pass bound_hard_clamp=False to choose it"),
        (dict(bound_hard_clamp=False, soft_clamp_input_value=0.0), ConfigurationError, "finite and > 0"),
        (dict(bound_hard_clamp=False, soft_clamp_input_value=[1.0, 2.0, 3.0]), ConfigurationError, "one per"),
        (dict(bound_hard_clamp=False, soft_clamp_input_value="2"), TypeError, "must be a number"),
        (dict(num_codebooks=2), ConfigurationError, "needs num_codebooks=1"),
        (dict(keep_num_codebooks_dim=True), ConfigurationError, "needs keep_num_codebooks_dim=None"),
        (dict(return_indices=False), ConfigurationError, "needs return_indices=True"),
        (dict(preserve_symmetry=False), TypeError, "always use preserve_symmetry=True"),
        (dict(is_channel_first=True, channel_first=False), ConfigurationError, "got channel_first=False"),
        (dict(noise_dropout=2.0), ConfigurationError, "noise_dropout must be in"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, **kwargs)


def test_rotation_state_dict_keys_and_decode():
    torch.manual_seed(0)
    q = ResidualFSQ(levels=[5, 5, 5], num_quantizers=3, dim=6, orthogonal_rotation=True).eval()
    assert {k for k in q.state_dict() if "orthogonal_rot" in k} == {
        f"layers.{i}.orthogonal_rot" for i in range(3)
    }
    x = torch.randn(2, 20, 6)
    out, indices = q(x)
    assert torch.equal(q.decode(indices), out)  # rotated codes decode (the reference decodes unrotated)


def test_refused_calls_change_no_state():
    q = ResidualFSQ(levels=[5, 5], num_quantizers=2, dim=4, orthogonal_rotation=True)
    before = snapshot(q)
    with pytest.raises(ValueError, match="4 features"):
        q(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="quantizer axis of 1..2 entries"):
        q.decode(torch.zeros(2, 3, 3, dtype=torch.long))
    assert_same_state(q, before)


# -- GroupedResidualFSQ ----------------------------------------------------------------------------------

GROUPED = dict(dim=8, groups=2, levels=[5, 4, 3], num_quantizers=3)


def test_grouped_matches_the_reference():
    ours, ref = _pair("GroupedResidualFSQ", GROUPED)
    x = torch.randn(2, 30, 8, requires_grad=True)
    (a, i, codes), (b, j, ref_codes) = (m.eval()(x, return_all_codes=True) for m in (ours, ref))
    assert isinstance((a, i, codes), tuple) and i.shape == (2, 2, 30, 3) and torch.equal(i, j)
    torch.testing.assert_close(a, b)
    assert isinstance(codes, tuple) and len(codes) == 2
    for mine, theirs in zip(codes, ref_codes):
        torch.testing.assert_close(mine, theirs)
    assert torch.equal(ours.get_output_from_indices(i), a.detach())
    assert ours.get_codes_from_indices(i).shape == (2, 3, 2, 30, 3)
    torch.testing.assert_close(ours.get_codes_from_indices(i), ref.get_codes_from_indices(j))
    assert ours.codebooks.shape == (2, 3, 60, 3) and torch.equal(ours.codebooks, ref.codebooks)


def test_grouped_image_fmap_channel_first():
    torch.manual_seed(0)
    q = GroupedResidualFSQ(**GROUPED, accept_image_fmap=True, is_channel_first=True).eval()
    x = torch.randn(2, 8, 4, 5)
    out, indices, _ = q(x, return_all_codes=True)
    assert out.shape == x.shape and indices.shape == (2, 2, 3, 4, 5)
    assert torch.equal(q.decode(indices), out)
    # each group quantizes its half of the channels on its own
    assert torch.equal(q.rvqs[1](x[:, 4:])[0], out[:, 4:])


def test_grouped_dropout_keeps_the_same_layers_in_every_group():
    q = GroupedResidualFSQ(**GROUPED, quantize_dropout=True).train()
    x = torch.randn(2, 10, 8)
    for seed in range(6):
        out = q(x, rand_quantize_dropout_fixed_seed=seed)
        kept = (out.indices >= 0).all(dim=(1, 2))  # (groups, Q)
        assert torch.equal(kept[0], kept[1])


def test_grouped_errors():
    with pytest.raises(ConfigurationError, match=r"dim \(9\) must be divisible by groups \(2\)"):
        GroupedResidualFSQ(dim=9, groups=2, levels=[5, 5], num_quantizers=2)
    q = GroupedResidualFSQ(**GROUPED)
    with pytest.raises(ValueError, match="8 features on its last axis"):
        q(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="groups axis first with 2 entries"):
        q.decode(torch.zeros(3, 2, 4, 3, dtype=torch.long))


# -- conversion, conformance, save / load, export -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("ResidualFSQ", dict(levels=[8, 5, 5, 3], num_quantizers=4, dim=16), (2, 30, 16)),
        ("ResidualFSQ", dict(levels=[5, 5], num_quantizers=3, orthogonal_rotation=True), (2, 30, 2)),
        (
            "ResidualFSQ",
            dict(
                levels=[5, 4, 3],
                num_quantizers=2,
                bound_hard_clamp=False,
                soft_clamp_input_value=[2.0, 1.0, 3.0],
            ),
            (2, 30, 3),
        ),
        ("ResidualFSQ", dict(levels=[5, 4], num_quantizers=2, dim=4, is_channel_first=True), (2, 4, 3, 5)),
        ("GroupedResidualFSQ", dict(GROUPED, orthogonal_rotation=True), (2, 30, 8)),
        ("FSQ", dict(levels=[5, 5, 5], dim=6, orthogonal_rotation=True, preserve_symmetry=True), (2, 30, 6)),
    ],
)
def test_from_reference(name, kwargs, shape):
    torch.manual_seed(3)
    ref = getattr(vqp, name)(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mine = from_reference(ref).eval()
    assert type(mine).__name__ == name
    x = torch.randn(*shape)
    (a, i), (b, j) = mine(x)[:2], ref(x)[:2]
    assert torch.equal(i, j.long())
    torch.testing.assert_close(a, b)


def test_from_reference_noise_dropout_needs_opt_in_unless_half():
    assert (
        from_reference(vqp.ResidualFSQ(levels=[5, 5], num_quantizers=2, noise_dropout=0.5))
        .layers[0]
        .noise_dropout
        == 0.5
    )
    ref = vqp.FSQ(levels=[5, 5], preserve_symmetry=True, noise_dropout=0.2)
    with pytest.raises(ValueError, match="noise_dropout=0.2 .*allow_training_differences"):
        from_reference(ref)
    assert from_reference(ref, allow_training_differences=True).noise_dropout == 0.2


class BatchFirstGrouped(QuantizerModule):
    """GroupedResidualFSQ with indices moved to (b, *positions, groups, Q), so that check_quantizer's
    batch-first rules apply."""

    def __init__(self, **kwargs):
        super().__init__()
        self.inner = GroupedResidualFSQ(**kwargs)
        self.dim, self.codebook_size = self.inner.dim, self.inner.codebook_size
        self.num_codebooks = self.inner.num_codebooks

    def forward(self, x):
        out = self.inner(x)
        return out.quantized, out.indices.movedim(0, -2)

    def encode(self, x):
        return self.inner.encode(x).movedim(0, -2)

    def decode(self, indices):
        return self.inner.decode(indices.movedim(-2, 0))

    def book_layout(self):
        inner = self.inner.book_layout()  # (groups, b, ..., Q) -> (b, ..., groups, Q)
        axes = (BookAxis("group", -2, self.inner.groups), BookAxis("layer", -1, self.inner.num_quantizers))
        return BookLayout(axes, inner.sizes, "layer")


@pytest.mark.parametrize(
    "factory, kwargs, example",
    [
        (ResidualFSQ, dict(levels=[5, 4], num_quantizers=2, dim=4, is_channel_first=True), (2, 4, 3, 5)),
        (ResidualFSQ, dict(levels=[5, 5], num_quantizers=2, orthogonal_rotation=True), (2, 8, 2)),
        (ResidualFSQ, dict(levels=[5, 4, 3], num_quantizers=2, bound_hard_clamp=False), (2, 8, 3)),
        (BatchFirstGrouped, GROUPED, (2, 8, 8)),
        (BatchFirstGrouped, dict(GROUPED, accept_image_fmap=True), (2, 8, 3, 4)),
    ],
)
def test_conformance(factory, kwargs, example):
    check_quantizer(factory, torch.randn(*example), **kwargs)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("residual_fsq", dict(levels=[5, 5], num_quantizers=2, dim=4, orthogonal_rotation=True)),
        ("grouped_residual_fsq", dict(GROUPED, allowed_dtypes=("float32",))),
    ],
)
def test_save_load_round_trip(
    name, kwargs, tmp_path
):  # (dtypes by name: vqcore.create records them as passed)
    torch.manual_seed(0)
    q = vqcore.create(name, **kwargs).eval()
    vqcore.save(q, tmp_path / "q.safetensors")
    loaded = vqcore.load(tmp_path / "q.safetensors").eval()
    assert_same_state(loaded, q)
    x = torch.randn(2, 7, kwargs["dim"])
    assert torch.equal(loaded(x)[1], q(x)[1]) and torch.equal(loaded(x)[0], q(x)[0])


@pytest.mark.parametrize("writer", ["onnx", "torchscript"])
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("grouped_residual_fsq", GROUPED),
        ("residual_fsq", dict(levels=[5, 4], num_quantizers=2, dim=6, orthogonal_rotation=True)),
    ],
)
def test_export_parity(writer, name, kwargs, tmp_path):
    q = vqcore.create(name, **kwargs)
    assert_exports_with_parity(q, torch.randn(2, 5, kwargs["dim"]), tmp_path, writers=(writer,))


def test_grouped_output_type():
    q = GroupedResidualFSQ(**GROUPED).eval()
    out = q(torch.randn(1, 3, 8), return_all_codes=True)
    assert isinstance(out, GroupedFSQOutputWithCodes) and out.all_codes[0].shape == (3, 1, 3, 3)


@pytest.mark.parametrize("name", ["fsq", "residual_fsq"])
def test_projected_encode_exports_as_pt2(name, tmp_path):
    # torch.export cannot nest torch.no_grad, nor leave an unused project_out, inside the autocast-off region
    kwargs = dict(levels=[3, 5], dim=8) if name == "fsq" else dict(levels=[3, 5], dim=8, num_quantizers=2)
    assert_exports_with_parity(
        vqcore.create(name, **kwargs), torch.randn(2, 5, 8), tmp_path, writers=("pt2",)
    )
