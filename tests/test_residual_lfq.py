"""ResidualLFQ's reference options (soft clamp per layer, spherical, rotation) and GroupedResidualLFQ:
layouts, index and loss shapes, one dropout draw for all groups, decode / codes, errors, reference
parity and state_dicts, the conformance kit, save/load and export."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_exports_with_parity, assert_save_load_equal

from vqcore import GroupedResidualLFQ, ResidualLFQ
from vqcore.book_layout import BookAxis, BookLayout
from vqcore.compat import from_reference
from vqcore.errors import ConfigurationError
from vqcore.module import QuantizerModule
from vqcore.plugins.residual_lfq import GroupedLFQOutputWithCodes
from vqcore.testing import check_quantizer

vqp = pytest.importorskip("vector_quantize_pytorch")


def test_soft_clamp_halves_per_layer():
    q = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, soft_clamp_input_value=3.0)
    assert [layer.soft_clamp_input_value for layer in q.layers] == [3.0, 1.5, 0.75]
    x = torch.randn(2, 5, 4) * 4
    q.eval()
    _, indices, _ = q(x)
    first = torch.tanh(x / 3.0) * 3.0
    assert torch.equal(indices[..., 0], ((first > 0).long() * torch.tensor([8, 4, 2, 1])).sum(-1))
    residual = x - torch.where(first > 0, 1.0, -1.0)
    second = torch.tanh(residual / 1.5) * 1.5
    assert torch.equal(indices[..., 1], ((second > 0).long() * torch.tensor([8, 4, 2, 1])).sum(-1))
    with pytest.raises(
        ConfigurationError, match=r"soft_clamp_input_value must be .* >= codebook_scale \(1.0\)"
    ):
        ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, soft_clamp_input_value=0.9)


def test_spherical_rotated_layers_decode_their_codes():
    torch.manual_seed(0)
    q = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, spherical=True, orthogonal_rotation=True)
    rotations = [layer.orthogonal_rot for layer in q.layers]
    assert not torch.equal(rotations[0], rotations[1])  # one rotation per layer
    assert set(q.state_dict()) == {f"layers.{i}.orthogonal_rot" for i in range(3)}
    # layer q's codes: ±2^-q / sqrt(4) corners, rotated back
    signs = LFQ_CORNERS
    want = torch.stack([signs * (2.0**-i / 2) @ r.T for i, r in enumerate(rotations)])
    torch.testing.assert_close(q.codebooks, want)
    x = torch.randn(2, 6, 4)
    q.eval()
    out = q(x, return_all_codes=True)
    gathered = torch.stack([want[i][out.indices[..., i]] for i in range(3)])
    torch.testing.assert_close(out.all_codes, gathered)
    torch.testing.assert_close(out.quantized, gathered.sum(0))
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert torch.equal(q.encode(x), out.indices)


LFQ_CORNERS = (((torch.arange(16).unsqueeze(-1) >> torch.arange(3, -1, -1)) & 1) * 2 - 1).float()


# -- GroupedResidualLFQ ---------------------------------------------------------------------------------


def test_grouped_shapes_losses_and_decode():
    torch.manual_seed(0)
    q = GroupedResidualLFQ(dim=8, groups=2, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.2)
    x = torch.randn(2, 5, 8)
    quantized, indices, losses = q(x)
    assert quantized.shape == x.shape and indices.shape == (2, 2, 5, 3) and losses.shape == (2, 3)
    # each group is its own residual stack on its chunk of the features
    for g, (rvq, chunk) in enumerate(zip(q.rvqs, x.chunk(2, -1))):
        out = rvq(chunk)
        torch.testing.assert_close(out.entropy_aux_loss, losses[g])
        assert torch.equal(out.indices, indices[g])
        torch.testing.assert_close(out.quantized, quantized[..., 4 * g : 4 * g + 4])
    q.eval()
    quantized, indices, _ = q(x)
    assert torch.equal(q.encode(x), indices) and torch.equal(q.get_output_from_indices(indices), quantized)
    codes = q.get_codes_from_indices(indices)
    assert codes.shape == (2, 3, 2, 5, 4)
    torch.testing.assert_close(torch.cat(list(codes.sum(1)), -1), quantized)
    assert q.codebooks.shape == (2, 3, 16, 4)


def test_grouped_dropout_is_one_draw_and_coarse_indices_decode():
    q = GroupedResidualLFQ(dim=8, groups=2, codebook_size=16, num_quantizers=4, quantize_dropout=True)
    x = torch.randn(2, 5, 8)
    seed = next(s for s in range(50) if q.rvqs[0].dropout.kept_layers(True, s) < 4)
    kept = q.rvqs[0].dropout.kept_layers(True, seed)
    out = q(x, rand_quantize_dropout_fixed_seed=seed, return_all_codes=True)
    assert isinstance(out, GroupedLFQOutputWithCodes) and len(out.all_codes) == 2
    assert torch.all(out.indices[..., kept:] == -1) and torch.all(out.indices[..., :kept] >= 0)
    assert torch.all(out.entropy_aux_loss[:, kept:] == 0)
    assert all(torch.all(c[kept:] == 0) for c in out.all_codes)
    q.eval()
    coarse = q.encode(x)[..., :kept]
    torch.testing.assert_close(
        q.decode(coarse), q.decode(torch.cat((coarse, torch.full_like(coarse, -1)), -1)[..., :4])
    )


def test_grouped_image_fmaps_and_masks():
    q = GroupedResidualLFQ(dim=8, groups=2, accept_image_fmap=True, codebook_size=16, num_quantizers=2).eval()
    assert q.split_dim == 1
    x = torch.randn(2, 8, 3, 4)
    quantized, indices, _ = q(x)
    assert quantized.shape == x.shape and indices.shape == (2, 2, 3, 4, 2)
    assert torch.equal(q.decode(indices), quantized)
    q.train()
    mask = torch.rand(2, 3, 4) > 0.5
    quantized, indices, _ = q(x, mask=mask)
    assert torch.all(indices[:, ~mask] == -1) and torch.all(quantized.movedim(1, -1)[~mask] == 0)


def test_grouped_errors_leave_no_state():
    with pytest.raises(ConfigurationError, match=r"dim \(9\) must be divisible by groups \(2\)"):
        GroupedResidualLFQ(dim=9, groups=2, codebook_size=16, num_quantizers=2)
    q = GroupedResidualLFQ(dim=8, groups=2, codebook_size=16, num_quantizers=2)
    with pytest.raises(ValueError, match="groups axis first with 2 entries"):
        q.decode(torch.zeros(3, 1, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="8 features"):
        q(torch.randn(2, 5, 6))


# -- the reference ----------------------------------------------------------------------------------------

RESIDUAL_OPTIONS = {
    "plain_projected": dict(dim=6, codebook_size=16, num_quantizers=3),
    "spherical_rotation_clamp": dict(
        dim=4,
        codebook_size=16,
        num_quantizers=3,
        spherical=True,
        orthogonal_rotation=True,
        soft_clamp_input_value=1.5,
        experimental_softplus_entropy_loss=True,
    ),
}


@pytest.mark.parametrize("kwargs", RESIDUAL_OPTIONS.values(), ids=RESIDUAL_OPTIONS.keys())
def test_residual_reference_parity_and_strict_state(kwargs):
    torch.manual_seed(2)
    ref = vqp.ResidualLFQ(**kwargs)
    q = ResidualLFQ(**kwargs)
    q.load_state_dict(ref.state_dict())  # strict, the reference's mask buffers included
    converted = from_reference(ref)
    x = torch.randn(3, 10, kwargs["dim"])
    r = ref.eval()(x)
    for mine in (q.eval(), converted.eval()):
        m = mine(x)
        assert torch.equal(m.indices, r[1])
        torch.testing.assert_close(m.quantized, r[0])
    ref.train(), q.train()
    torch.testing.assert_close(q(x).entropy_aux_loss, ref(x)[2], rtol=1e-4, atol=1e-6)


def test_grouped_reference_parity():
    torch.manual_seed(3)
    kwargs = dict(dim=8, groups=2, codebook_size=16, num_quantizers=2, spherical=True)
    ref = vqp.GroupedResidualLFQ(**kwargs)
    q = from_reference(ref)
    assert isinstance(q, GroupedResidualLFQ)
    GroupedResidualLFQ(**kwargs).load_state_dict(ref.state_dict())  # strict
    x = torch.randn(3, 10, 8)
    r, m = ref.eval()(x), q.eval()(x)
    assert torch.equal(m.indices, r[1])
    torch.testing.assert_close(m.quantized, r[0])
    ref.train(), q.train()
    torch.testing.assert_close(q(x).entropy_aux_loss, ref(x)[2], rtol=1e-4, atol=1e-6)


# -- the conformance kit, save / load, export -----------------------------------------------------------


class BatchFirstGrouped(QuantizerModule):
    """GroupedResidualLFQ with indices moved to (b, n, groups, Q), so that the conformance kit's
    batch-first rules apply."""

    def __init__(self, **kwargs):
        super().__init__()
        self.inner = GroupedResidualLFQ(**kwargs)
        self.dim, self.codebook_size = self.inner.dim, self.inner.codebook_size
        self.num_codebooks = self.inner.num_codebooks

    def forward(self, x):
        out = self.inner(x)
        return out.quantized, out.indices.movedim(0, -2), out.entropy_aux_loss

    def encode(self, x):
        return self.inner.encode(x).movedim(0, -2)

    def decode(self, indices):
        return self.inner.decode(indices.movedim(-2, 0))

    def book_layout(self):
        inner = self.inner.book_layout()  # (groups, b, ..., Q) -> (b, ..., groups, Q)
        axes = (BookAxis("group", -2, self.inner.groups), BookAxis("layer", -1, self.inner.num_quantizers))
        return BookLayout(axes, inner.sizes, "layer")


@pytest.mark.parametrize(
    "factory, kit_factory, example, kwargs",
    [
        (
            ResidualLFQ,
            ResidualLFQ,
            (2, 8, 6),
            dict(dim=6, codebook_size=16, num_quantizers=2, spherical=True, orthogonal_rotation=True),
        ),
        (
            GroupedResidualLFQ,
            BatchFirstGrouped,
            (2, 8, 8),
            dict(dim=8, groups=2, codebook_size=16, num_quantizers=2, soft_clamp_input_value=2.0),
        ),
    ],
    ids=["residual_spherical_rotation", "grouped"],
)
def test_conform_save_load_and_export(factory, kit_factory, example, kwargs, tmp_path):
    x = torch.randn(*example)
    check_quantizer(kit_factory, x, **kwargs)
    torch.manual_seed(0)
    q = factory(**kwargs)
    assert_save_load_equal(q, x, tmp_path)
    assert_exports_with_parity(q, x, tmp_path)
