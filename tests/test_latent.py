"""LatentQuantize: seed examples, initial tables, nearest-value quantization and mixed-radix indices,
the value tables learning (and the round trip holding after), which loss trains what, extra losses,
layouts and the encode/decode contract, export metadata, state_dict keys, errors."""

from __future__ import annotations

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
