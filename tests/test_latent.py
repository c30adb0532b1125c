"""LatentQuantize: seed examples, initial tables, nearest-value quantization and mixed-radix indices,
the value tables learning (and the round trip holding after), which loss trains what, extra losses,
layouts and the encode/decode contract, export metadata, state_dict keys, errors."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from vqcore import LatentQuantize
from vqcore.export.metadata import quantizer_fields
from vqcore.testing import check_quantizer

# -- seed README examples (only the import changed; the last one's dim/num_codebooks defined) ------


def test_seed_latent_image():
    quantizer = LatentQuantize(
        levels=[5, 5, 8], dim=16, commitment_loss_weight=0.1, quantization_loss_weight=0.1
    )
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, loss = quantizer(image_feats)
    assert quantized.shape == (1, 16, 32, 32) and indices.shape == (1, 32, 32) and loss.shape == ()
    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_seed_latent_sequence_and_video():
    quantizer = LatentQuantize(
        levels=[5, 5, 8], dim=16, commitment_loss_weight=0.1, quantization_loss_weight=0.1
    )
    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)
    assert quantized.shape == (1, 32, 16)
    video_feats = torch.randn(1, 16, 10, 32, 32)
    quantized, *_ = quantizer(video_feats)
    assert quantized.shape == (1, 16, 10, 32, 32)


def test_seed_latent_multiple_codebooks():
    dim, num_codebooks = 9, 3  # undefined names in the seed example
    model = LatentQuantize(levels=[4, 8, 16], dim=9, num_codebooks=3)
    input_tensor = torch.randn(2, 3, dim)
    output_tensor, indices, loss = model(input_tensor)
    assert output_tensor.shape == input_tensor.shape
    assert indices.shape == (2, 3, num_codebooks)
    assert loss.item() >= 0


# -- quantization -------------------------------------------------------------------------------------


def test_initial_tables():
    q = LatentQuantize(levels=[3, 4, 5], dim=3)
    tables = [v.tolist() for v in q.values_per_latent]
    assert tables[0] == pytest.approx([-0.5, 0.0, 0.5])
    assert tables[1] == pytest.approx([-0.5, -0.25, 0.0, 0.25])
    assert tables[2] == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    assert LatentQuantize(levels=4, codebook_dim=3, dim=3).levels == [4, 4, 4]


def test_nearest_value_and_mixed_radix_index():
    q = LatentQuantize(levels=[3, 4, 5], dim=3).eval()
    x = torch.tensor([[[0.3, -0.3, 0.1], [-0.26, 0.2, -0.9]]])
    out, indices, loss = q(x)
    # digits: token 1 (2, 1, 2), token 2 (0, 3, 0); basis (1, 3, 12)
    assert out[0].flatten().tolist() == pytest.approx([0.5, -0.25, 0.0, -0.5, 0.25, -0.5])
    assert indices.tolist() == [[2 + 1 * 3 + 2 * 12, 0 + 3 * 3 + 0 * 12]]
    assert loss.item() == 0.0


def test_values_learn_and_round_trip_holds():
    torch.manual_seed(0)
    q = LatentQuantize(levels=[5, 5, 8], dim=16)
    before = [v.detach().clone() for v in q.values_per_latent]
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    x = torch.randn(4, 64, 16)
    for _ in range(3):
        out, _, loss = q(x)
        ((out - x).pow(2).mean() + loss).backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, q.values_per_latent))
    q.eval()
    out, indices, _ = q(x)
    assert torch.equal(q.indices_to_codes(indices), out)
    assert torch.equal(q.encode(x), indices)
    codes = q.indices_to_codes(indices, project_out=False)
    assert torch.equal(q.codes_to_indices(codes), indices)


def test_commitment_trains_encoder_quantization_trains_values():
    q = LatentQuantize(levels=[5, 5], dim=2)
    x = torch.randn(2, 10, 2, requires_grad=True)
    out = q(x, return_loss_breakdown=True)
    commitment, quantization, extra = out.breakdown
    assert extra == {}
    gx = torch.autograd.grad(commitment, x, retain_graph=True)[0]
    assert gx.abs().sum() > 0
    assert all(
        g is None
        for g in torch.autograd.grad(
            commitment, list(q.values_per_latent), retain_graph=True, allow_unused=True
        )
    )
    assert torch.autograd.grad(quantization, x, retain_graph=True, allow_unused=True)[0] is None
    gv = torch.autograd.grad(quantization, list(q.values_per_latent), retain_graph=True)
    assert all(g.abs().sum() > 0 for g in gv)
    # the output: straight-through to the input AND the chosen values receive the decoder's gradient
    gx, *gv = torch.autograd.grad(out.quantized.sum(), (x, *q.values_per_latent))
    assert torch.equal(gx, torch.ones_like(x))
    assert sum(g.sum().item() for g in gv) == pytest.approx(40.0)
    torch.testing.assert_close(out.loss, 0.1 * commitment + 0.1 * quantization)


def test_frozen_values():
    q = LatentQuantize(levels=[5, 5], dim=2, optimize_values=False)
    assert not any(p.requires_grad for p in q.parameters())
    assert len(q.state_dict()) == 2


@pytest.mark.parametrize(
    "shape, kwargs, index_shape",
    [
        ((2, 16, 3), {}, (2, 16)),
        ((2, 3), {}, (2,)),
        ((2, 3, 16), {"channel_first": True}, (2, 16)),
        ((2, 3, 4, 5), {}, (2, 4, 5)),
        ((2, 3, 2, 4, 5), {}, (2, 2, 4, 5)),
        ((2, 9, 4, 5), {"dim": 9, "num_codebooks": 3}, (2, 4, 5, 3)),
        ((2, 16, 7), {"dim": 7}, (2, 16)),
    ],
)
def test_decode_equals_eval_forward(shape, kwargs, index_shape):
    q = LatentQuantize(levels=[4, 8, 5], **kwargs).eval()
    x = torch.randn(*shape)
    out, indices, loss = q(x)
    assert out.shape == x.shape and indices.shape == index_shape and loss.item() == 0
    assert torch.equal(q.encode(x), indices)
    assert torch.equal(q.decode(indices), out)


@pytest.mark.parametrize(
    "example, kwargs",
    [
        ((2, 8, 16), dict(levels=[5, 5, 8], dim=16)),
        ((2, 9, 3, 4), dict(levels=[4, 8, 16], dim=9, num_codebooks=3)),
        (
            (2, 8, 6),
            dict(
                levels=[5, 4], dim=6, in_place_codebook_optimizer=functools.partial(torch.optim.SGD, lr=0.01)
            ),
        ),
    ],
)
def test_conformance(example, kwargs):
    check_quantizer(LatentQuantize, torch.randn(*example), **kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="codebook_dim"):
        LatentQuantize(levels=5, dim=4)
    with pytest.raises(ValueError, match="must not be empty"):
        LatentQuantize(levels=[], dim=4)
    with pytest.raises(ValueError, match="ints >= 2"):
        LatentQuantize(levels=[5, 1], dim=4)
    with pytest.raises(TypeError, match="must contain ints"):
        LatentQuantize(levels=[5, 2.0], dim=4)
    q = LatentQuantize(levels=[5, 5, 8], dim=16)
    with pytest.raises(ValueError, match="16 features"):
        q(torch.randn(1, 10, 15))
    with pytest.raises(ValueError, match=r"\[0, 200\)"):
        q.indices_to_codes(torch.tensor([[200]]))


def test_learned_tables_survive_save_and_load(tmp_path):
    import vqcore

    q = vqcore.create("latent", levels=[5, 4], dim=6)
    with torch.no_grad():
        q.values_per_latent[0].add_(0.1)
    vqcore.save(q, tmp_path / "latent.safetensors")
    loaded = vqcore.load(tmp_path / "latent.safetensors").eval()
    x = torch.randn(2, 10, 6)
    assert torch.equal(loaded(x).quantized, q.eval()(x).quantized)
    assert torch.equal(loaded.values_per_latent[0], q.values_per_latent[0])


@dataclass(frozen=True)
class FiniteShare:
    """A Loss: the fraction of tokens that count, and whether a codebook came (latent has none)."""

    name: ClassVar[str] = "finite_share"

    def __call__(self, x, q, indices, codebook, valid):
        assert codebook is None and indices.shape == x.shape[:2]
        return valid.float().mean(-1)


def test_extra_losses_are_added_and_reported():
    torch.manual_seed(0)
    plain = LatentQuantize(levels=[5, 5], dim=2)
    q = LatentQuantize(levels=[5, 5], dim=2, extra_losses=[(FiniteShare(), 0.5)])
    x = torch.randn(2, 10, 2)
    x[0, 3, 1] = float("nan")  # one non-finite token of 20
    out = q(x, return_loss_breakdown=True)
    base = plain(x, return_loss_breakdown=True)
    assert out.breakdown.extra["finite_share"].item() == pytest.approx(19 / 20)
    torch.testing.assert_close(out.breakdown.quantization, base.breakdown.quantization)
    # the commitment term still shows the NaN token, so compare the finite parts by hand
    finite = torch.isfinite(x).all(-1)
    zhat = q.eval()(x).quantized
    want_quantization = (x[finite] - zhat[finite]).pow(2).mean()
    torch.testing.assert_close(out.breakdown.quantization, want_quantization)
    assert torch.isnan(out.loss)  # commitment (weight 0.1) sees the NaN token, as documented
    clean = torch.randn(2, 10, 2)
    q.train()
    out = q(clean, return_loss_breakdown=True)
    want = 0.1 * out.breakdown.commitment + 0.1 * out.breakdown.quantization + 0.5 * 1.0
    torch.testing.assert_close(out.loss, want)
    q.eval()
    assert q(clean, return_loss_breakdown=True).breakdown.extra["finite_share"].item() == 0.0


def test_extra_losses_name_clash():
    with pytest.raises(ValueError, match="clash"):
        LatentQuantize(levels=[5, 5], dim=2, extra_losses={"codebook": 1.0})


def _artifact_fields(quantizer):
    """What an exported artifact records about the quantizer (the generic fields and export_metadata)."""
    fields = quantizer_fields(quantizer)
    fields.pop("config")
    return fields


def test_export_metadata_and_state_dict_keys():
    q = LatentQuantize(levels=[4, 8, 16], dim=9, num_codebooks=3)
    meta = _artifact_fields(q)
    want = dict(dim=9, codebook_dim=3, codebook_size=512, num_codebooks=3, levels=[4, 8, 16])
    assert meta == {**want, "channel_first": None}
    json.dumps(meta)
    assert LatentQuantize(levels=[3, 5], channel_first=True).export_metadata()["channel_first"] is True
    assert set(LatentQuantize(levels=[4, 8, 16], dim=10, num_codebooks=3).state_dict()) == {
        "values_per_latent.0",
        "values_per_latent.1",
        "values_per_latent.2",
        "project_in.weight",
        "project_in.bias",
        "project_out.weight",
        "project_out.bias",
    }


# -- the reference's names: forward(z=...), in_place_codebook_optimizer ----------------------------


def test_forward_takes_z_by_name():
    q = LatentQuantize(levels=[3, 4], dim=2).eval()
    x = torch.randn(2, 5, 2)
    assert torch.equal(q(z=x).quantized, q(x).quantized)


def _in_place(weight=0.5, lr=0.5, **kwargs):

    return LatentQuantize(
        levels=[3],
        commitment_loss_weight=0.1,
        quantization_loss_weight=weight,
        in_place_codebook_optimizer=functools.partial(torch.optim.SGD, lr=lr),
        **kwargs,
    )


def test_in_place_optimizer_steps_the_tables_then_quantizes_again():
    q = _in_place()
    assert isinstance(q.in_place_codebook_optimizer, torch.optim.SGD)
    held = torch.full((3,), 7.0)
    q.values_per_latent[0].grad = held.clone()
    z = torch.tensor([[[0.1], [0.4]]], requires_grad=True)  # nearest: 0 (digit 1) and 0.5 (digit 2)
    out, indices, loss = q(z)
    # d(0.5 mean((sg(z) - zhat)^2))/dv = 0.5 * 2 (v - z) / 2 per chosen value: -0.05 (v=0), +0.05 (v=0.5);
    # SGD lr 0.5 moves them by -lr * grad
    assert q.values_per_latent[0].tolist() == pytest.approx([-0.5, 0.025, 0.475])
    # the output, indices and loss come from the updated tables
    assert out.flatten().tolist() == pytest.approx([0.025, 0.475])
    assert indices.tolist() == [[1, 2]]
    assert loss.item() == pytest.approx((0.1 + 0.5) * 0.075**2)
    # the step took only its own gradient: the tables' .grad is as before, the encoder side untouched
    assert torch.equal(q.values_per_latent[0].grad, held)
    assert z.grad is None
    (out.sum() + loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_in_place_optimizer_leaves_the_projections_alone():
    q = _in_place(dim=3)
    before = {k: v.clone() for k, v in q.state_dict().items() if k.startswith("project")}
    q(torch.randn(2, 6, 3))
    assert all(torch.equal(q.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in q.project_in.parameters())


@pytest.mark.parametrize(
    "case",
    ["eval", "no_grad", "zero_weight"],
)
def test_in_place_optimizer_does_not_step(case):
    q = _in_place(weight=0.0 if case == "zero_weight" else 0.5)
    if case == "eval":
        q.eval()
    z = torch.tensor([[[0.1], [0.4]]])
    if case == "no_grad":
        with torch.no_grad():
            q(z)
    else:
        q(z)
    assert q.values_per_latent[0].tolist() == pytest.approx([-0.5, 0.0, 0.5])


def test_in_place_optimizer_refused_input_changes_nothing():
    q = _in_place()
    with pytest.raises(ValueError, match="1 features"):
        q(torch.randn(2, 5, 2))
    assert q.values_per_latent[0].tolist() == pytest.approx([-0.5, 0.0, 0.5])


def test_in_place_optimizer_bad_configuration():
    from vqcore.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="optimize_values=False"):
        LatentQuantize(levels=[3], optimize_values=False, in_place_codebook_optimizer=torch.optim.SGD)
    with pytest.raises(TypeError, match="callable params -> torch.optim.Optimizer.*got str"):
        LatentQuantize(levels=[3], in_place_codebook_optimizer="sgd")


def test_eval_forward_is_straight_through():
    q = LatentQuantize(levels=[3, 4], dim=2).eval()
    z = torch.randn(2, 5, 2, requires_grad=True)
    out = q(z).quantized
    assert torch.equal(out, q.decode(q.encode(z)))
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert torch.equal(grad, torch.ones_like(z))


# -- errors the reference raises as RuntimeError / asserts ------------------------------------------


def test_configuration_errors_are_the_references_types():
    from vqcore.errors import ConfigurationError, ConfigurationRuntimeError

    with pytest.raises(ConfigurationRuntimeError, match="give codebook_dim") as info:
        LatentQuantize(levels=5, dim=16)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    for kwargs, message in [
        (dict(levels=[5, 1]), "ints >= 2"),
        (dict(levels=[5, 3], codebook_dim=3), r"codebook_dim \(3\) must equal len\(levels\) \(2\)"),
        (dict(levels=[5, 3], commitment_loss_weight=-1.0), "got -1.0 and 0.1"),
        (dict(levels=[5, 3], num_codebooks=0), "num_codebooks must be >= 1"),
        (dict(levels=[5, 3], dim=0), "dim must be >= 1"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            LatentQuantize(**kwargs)


def test_keep_num_codebooks_dim_false_keeps_the_axis_with_several_codebooks():
    q = LatentQuantize(levels=[3, 4], num_codebooks=2, keep_num_codebooks_dim=False)
    assert q.keep_num_codebooks_dim is True
    assert q(torch.randn(2, 5, 4)).indices.shape == (2, 5, 2)
    assert LatentQuantize(levels=[3, 4], keep_num_codebooks_dim=False).keep_num_codebooks_dim is False


# -- state_dict: the reference's keys, its frozen checkpoints, vqcore's older ones ------------------


def test_frozen_tables_follow_dtype_and_are_saved():
    q = LatentQuantize(levels=[3, 4], optimize_values=False).double()
    assert [v.dtype for v in q.values_per_latent] == [torch.float64, torch.float64]
    state = q.state_dict()
    assert list(state) == ["values_per_latent.0", "values_per_latent.1"]
    assert state._metadata[""]["version"] == 2


def _without_tables(state, version):
    state = type(state)((k, v) for k, v in state.items() if not k.startswith("values_per_latent."))
    state._metadata = {"": {"version": version}}
    return state


def test_version_1_frozen_state_without_tables_loads_the_initial_tables():
    saved = LatentQuantize(levels=[3, 4], dim=5, optimize_values=False)
    q = LatentQuantize(levels=[3, 4], dim=5, optimize_values=False)
    with torch.no_grad():
        q.values_per_latent[0].add_(1.0)
        q.project_in.weight.zero_()
    q.load_state_dict(_without_tables(saved.state_dict(), 1), strict=True)
    assert q.values_per_latent[0].tolist() == pytest.approx([-0.5, 0.0, 0.5])
    assert torch.equal(q.project_in.weight, saved.project_in.weight)


@pytest.mark.parametrize("optimize_values, version", [(False, 2), (True, 1), (True, None)])
def test_missing_tables_still_fail_strict_loading(optimize_values, version):
    q = LatentQuantize(levels=[3, 4], optimize_values=optimize_values)
    state = _without_tables(q.state_dict(), version)
    if version is None:
        state._metadata = {}
    with pytest.raises(RuntimeError, match="values_per_latent.0"):
        q.load_state_dict(state, strict=True)


def test_version_1_state_with_tables_keeps_them():
    """vqcore's checkpoints before state_dict version 2 saved frozen tables: they are loaded as saved."""
    q = LatentQuantize(levels=[3, 4], optimize_values=False)
    state = q.state_dict()
    state["values_per_latent.1"] = torch.tensor([-0.4, -0.1, 0.2, 0.3])
    state._metadata[""]["version"] = 1
    q.load_state_dict(state, strict=True)
    assert q.values_per_latent[1].tolist() == pytest.approx([-0.4, -0.1, 0.2, 0.3])


@pytest.mark.parametrize("optimize_values", [True, False])
def test_reference_state_dict_loads_strictly(optimize_values):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ref = vqp.LatentQuantize(levels=[5, 3], dim=6, optimize_values=optimize_values)
    q = LatentQuantize(levels=[5, 3], dim=6, optimize_values=optimize_values)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.25)
    q.load_state_dict(ref.state_dict(), strict=True)
    for mine, theirs in zip(q.values_per_latent, ref.values_per_latent, strict=True):
        assert torch.equal(mine, theirs)
    assert torch.equal(q.project_out.bias, ref.project_out.bias)
    if optimize_values:  # the keys are the same: the way back is strict too
        ref.load_state_dict(q.state_dict(), strict=True)
    else:  # the reference keeps frozen tables out of its state_dict
        assert ref.load_state_dict(q.state_dict(), strict=False).unexpected_keys == [
            "values_per_latent.0",
            "values_per_latent.1",
        ]


def test_save_load_and_export_round_trip(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import vqcore
    from vqcore.export import to_onnx, to_torchscript

    q = LatentQuantize(levels=[5, 4], dim=6, num_codebooks=2)
    with torch.no_grad():
        q.values_per_latent[1].copy_(torch.tensor([-0.7, -0.2, 0.1, 0.6]))
    vqcore.save(q, tmp_path / "latent.safetensors")
    loaded = vqcore.load(tmp_path / "latent.safetensors")
    x = torch.randn(2, 7, 6)
    assert torch.equal(loaded(x).indices, q.eval()(x).indices)
    for writer, graph, example in [
        (to_onnx, "encode", x),
        (to_torchscript, "encode", x),
        (to_onnx, "decode", q.encode(x)),
        (to_torchscript, "decode", q.encode(x)),
    ]:
        result = writer(q, str(tmp_path / f"latent_{graph}"), graph=graph, example=example)
        assert result.parity.ok


def test_reference_conversion_carries_the_in_place_optimizer():

    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    factory = functools.partial(torch.optim.Adam, lr=0.01, betas=(0.8, 0.9))
    ref = vqp.LatentQuantize(levels=[5, 3], dim=6, in_place_codebook_optimizer=factory)
    mine = from_reference(ref)
    optimizer = mine.in_place_codebook_optimizer
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["betas"] == (0.8, 0.9)
    assert all(a is b for a, b in zip(group["params"], mine.values_per_latent, strict=True))
    x = torch.randn(2, 6, 7)  # the reference reads (b, dim, n); the conversion sets channel_first
    with torch.no_grad():
        want, got = ref.eval()(x), mine.eval()(x)
    torch.testing.assert_close(got.quantized, want[0])
    assert torch.equal(got.indices, want[1].long())
    # a frozen reference never builds its factory: nothing to carry
    frozen = vqp.LatentQuantize(
        levels=[5, 3], dim=6, optimize_values=False, in_place_codebook_optimizer=factory
    )
    assert from_reference(frozen).in_place_codebook_optimizer is None


def test_channel_first_sequence_without_the_flag_gets_a_hint():
    q = LatentQuantize(levels=[5, 5, 8], dim=16)
    with pytest.raises(
        ValueError, match=r"got shape \(1, 16, 64\); for \(batch, dim, seq\).*channel_first=True"
    ):
        q(torch.randn(1, 16, 64))
    with pytest.raises(ValueError, match="channel_first=True"):
        q.encode(torch.randn(1, 16, 64))
    out = LatentQuantize(levels=[5, 5, 8], dim=16, channel_first=True).eval()(torch.randn(1, 16, 64))
    assert out.quantized.shape == (1, 16, 64) and out.indices.shape == (1, 64)
