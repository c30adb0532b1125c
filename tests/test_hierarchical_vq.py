"""HierarchicalVQ: the residual pyramid by hand, masks, nested dropout, codebook / phi sharing, the kit,
save/load, export, the reference converter, bad input, torch.distributed."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
from helpers import assert_exports_with_parity, assert_same_state, snapshot
from torch.nn import functional as F

import vqcore
from vqcore import HierarchicalVQ
from vqcore.errors import ConfigurationError
from vqcore.module import QuantizerModule
from vqcore.testing import check_quantizer

# codes of one dim: -1, 3, 0.5; phi: conv weights (0.25, 0.5, 0.25), bias 0.1, mixed half and half
CODES = [[-1.0], [3.0], [0.5]]
X = [1.0, 2.0, 4.0, 7.0]


def hand_module(**kwargs) -> HierarchicalVQ:
    """dim 1, scales (1, 2), the codes and phi above, no k-means, no expiry."""
    options = dict(
        dim=1, codebook_size=3, scales=(1, 2), kmeans_init=False, threshold_ema_dead_code=0, quant_resi=0.5
    )
    q = HierarchicalVQ(**{**options, **kwargs})
    with torch.no_grad():
        for level in range(q.num_levels):
            q.get_vq(level).codebook = torch.tensor(CODES)
        phis = [q.phi_shared] if q.phi_shared is not None else list(q.phi_levels)
        for phi in phis:
            phi.conv.weight.copy_(torch.tensor([[[0.25, 0.5, 0.25]]]))
            phi.conv.bias.fill_(0.1)
    return q


# -- the pyramid by hand --------------------------------------------------------------------------------


def test_two_level_1d_by_hand():
    # level 0: mean 3.5 -> code 3 (index 1), constant 3 after upsampling; phi: conv (zero padded) =
    # (2.35, 3.1, 3.1, 2.35), lerp 0.5 -> c0 = (2.675, 3.05, 3.05, 2.675);
    # residual (-1.675, -1.05, 0.95, 4.325)
    # level 1: pooled (-1.3625, 2.6375) -> codes (-1, 3) (indices 0, 1); linear upsampling (align_corners
    # False) -> (-1, 0, 2, 3); conv (-0.4, 0.35, 1.85, 2.1) -> c1 = (-0.7, 0.175, 1.925, 2.55)
    q = hand_module().eval()
    x = torch.tensor([[X]])
    out = q(x)
    assert torch.equal(out.indices[0], torch.tensor([[1]])) and torch.equal(
        out.indices[1], torch.tensor([[0, 1]])
    )
    torch.testing.assert_close(out.quantized, torch.tensor([[[1.975, 3.225, 4.975, 5.225]]]))
    assert out.commit_loss.item() == 0.0  # eval
    # the intermediate steps, through the public parts
    pooled, level_mask = q.pool_residual(x, (1,))
    assert pooled.item() == 3.5 and level_mask is None
    c0 = q.upsample_to_full(torch.tensor([[[3.0]]]), (4,), 0)
    torch.testing.assert_close(c0, torch.tensor([[[2.675, 3.05, 3.05, 2.675]]]))
    # encode: the levels flattened and concatenated; decode at the last level's shape by default
    assert torch.equal(q.encode(x), torch.tensor([[1, 0, 1]]))
    full = q.get_output_from_indices(out.indices, full_shape=4)
    assert torch.equal(full, out.quantized)
    assert q.decode(q.encode(x)).shape == (1, 1, 2)  # the last scale


def test_training_losses_by_hand_and_straight_through():
    # per-level codebooks, so that level 1 quantizes with the codes set by hand (not level 0's EMA step):
    # commitment 0: (3.5 - 3)^2 = 0.25; 1: ((-1.3625 + 1)^2 + (2.6375 - 3)^2) / 2 = 0.13140625
    q = hand_module(shared_codebook=False, share_quant_resi=0).train()
    x = torch.tensor([[X]], requires_grad=True)
    out = q(x)
    torch.testing.assert_close(out.commit_loss, torch.tensor((0.25 + 0.13140625) / 2))
    torch.testing.assert_close(out.quantized, torch.tensor([[[1.975, 3.225, 4.975, 5.225]]]))
    out.quantized.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the EMA took its step: level 0's used code moved towards 3.5
    assert q.get_vq(0).codebook[1].item() != 3.0


# -- masks ---------------------------------------------------------------------------------------------


def test_pooled_masks_by_hand():
    q = hand_module()
    t = torch.tensor([[X]])
    pooled, valid = q.pool_residual(t, (2,), torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(pooled, torch.tensor([[[1.5, 4.0]]]))
    assert torch.equal(valid, torch.tensor([[True, True]]))
    pooled, valid = q.pool_residual(t, (1,), torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(pooled, torch.tensor([[[7 / 3]]]))
    pooled, valid = q.pool_residual(t, (2,), torch.tensor([[True, True, False, False]]))
    torch.testing.assert_close(pooled, torch.tensor([[[1.5, 0.0]]]))
    assert torch.equal(valid, torch.tensor([[True, False]]))


@pytest.mark.parametrize("training", [False, True])
def test_mask_padding_reaches_nothing(training):
    torch.manual_seed(0)
    q = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4, 8), kmeans_init=False).train(training)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    other = x.clone()
    other[1, :, 3:] = float("nan")
    a_in, b_in = x.clone().requires_grad_(), other.clone().requires_grad_()
    torch.manual_seed(1)  # the same dead-code replacements in both
    a = copy.deepcopy(q)(a_in, mask=mask)
    torch.manual_seed(1)
    b = copy.deepcopy(q)(b_in, mask=mask)
    assert torch.equal(a.quantized, b.quantized) and torch.isfinite(b.quantized).all()
    assert (b.quantized[1, :, 3:] == 0).all()
    for i, j in zip(a.indices, b.indices):
        assert torch.equal(i, j)
    # cells whose pooling window holds no valid position are -1
    assert torch.equal(b.indices[2][1] < 0, torch.tensor([False, False, True, True]))
    assert torch.equal(b.indices[3][1] < 0, torch.tensor([False] * 3 + [True] * 5))
    assert torch.equal(b.indices[1][1] < 0, torch.tensor([False, True]))
    if training:
        (b.quantized.sum() + b.commit_loss).backward()
        assert torch.isfinite(b_in.grad).all() and (b_in.grad[1, :, 3:] == 0).all()
    # lens is the same mask
    torch.manual_seed(1)
    c = copy.deepcopy(q)(x, lens=torch.tensor([8, 3]))
    assert torch.equal(c.quantized, a.quantized)


def test_decode_of_masked_indices_matches_forward_on_valid_positions():
    torch.manual_seed(0)
    q = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 3, 5, 8), kmeans_init=False).eval()
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    out = q(x, mask=mask)
    decoded = q.get_output_from_indices(out.indices)
    assert torch.equal(decoded[0], out.quantized[0])
    assert torch.equal(decoded[1, :, :5], out.quantized[1, :, :5])


# -- -1 and coarse reconstructions ------------------------------------------------------------------------


def test_minus_one_contributes_nothing():
    torch.manual_seed(0)
    q = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), kmeans_init=False).eval()
    levels = q(torch.randn(3, 4, 4)).indices
    assert not q.decode(tuple(torch.full_like(i, -1) for i in levels)).any()  # phi's bias does not leak
    for keep in range(3):  # levels 0..keep: the sum of their contributions, phi included
        coarse = tuple(i if k <= keep else torch.full_like(i, -1) for k, i in enumerate(levels))
        want = sum(
            q.upsample_to_full(q.get_vq(k).codebook[levels[k].reshape(3, -1)].transpose(1, 2), (4,), k)
            for k in range(keep + 1)
        )
        torch.testing.assert_close(q.decode(coarse), want, rtol=0, atol=1e-6)


# -- nested dropout --------------------------------------------------------------------------------------


def level_losses(q: HierarchicalVQ, x: torch.Tensor, levels) -> list[torch.Tensor]:
    """Each level's commitment term, computed from the indices: the pooled residual of the levels before
    it against its chosen codes."""
    losses = []
    for level, scale in enumerate(q.level_shapes):
        before = tuple(i if k < level else torch.full_like(i, -1) for k, i in enumerate(levels))
        residual = x - q.get_output_from_indices(before, full_shape=x.shape[2:])
        pooled = F.adaptive_avg_pool1d(residual, scale).transpose(1, 2)
        codes = q.get_vq(level).codebook[levels[level].reshape(x.shape[0], -1)]
        losses.append(F.mse_loss(pooled, codes))
    return losses


def test_nested_dropout_keeps_levels_up_to_the_cutoff():
    scales = (1, 2, 4, 8)
    x = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(1))
    seen = set()
    for seed in range(12):
        torch.manual_seed(0)
        q = HierarchicalVQ(
            dim=4,
            codebook_size=8,
            scales=scales,
            shared_codebook=False,
            kmeans_init=False,
            threshold_ema_dead_code=0,
            nested_dropout=1.0,
            nested_dropout_min_levels=2,
        ).train()
        before = copy.deepcopy(q).eval()
        torch.manual_seed(seed)
        out = q(x, return_cutoff=True)
        cutoff = out.cutoff
        assert cutoff in (1, 2)  # [min_levels - 1, levels - 2]
        seen.add(cutoff)
        kept = tuple(i if k <= cutoff else torch.full_like(i, -1) for k, i in enumerate(out.indices))
        torch.testing.assert_close(out.quantized, before.decode(kept), rtol=0, atol=1e-5)
        want = torch.stack(level_losses(before, x, out.indices)[: cutoff + 1]).mean()
        torch.testing.assert_close(out.commit_loss, want)
        # every level is still quantized and its codebook trained
        assert not torch.equal(q.get_vq(3).codebook, before.get_vq(3).codebook)
        torch.manual_seed(seed)  # the draw follows torch.manual_seed
        assert copy.deepcopy(before).train().sample_nested_cutoff() == cutoff
    assert seen == {1, 2}


def test_nested_dropout_probability_and_eval():
    q = HierarchicalVQ(dim=2, codebook_size=4, scales=(1, 2, 4), nested_dropout=0.5).train()
    cutoffs = []
    for seed in range(40):
        torch.manual_seed(seed)
        cutoffs.append(q.sample_nested_cutoff())
    assert None in cutoffs and 0 in cutoffs and 1 in cutoffs and set(cutoffs) <= {None, 0, 1}
    assert q.eval().sample_nested_cutoff() is None
    assert (
        HierarchicalVQ(dim=2, codebook_size=4, scales=(1, 2), nested_dropout=1.0)
        .train()
        .sample_nested_cutoff()
        == 0
    )
    # min_levels covering every level: nothing to drop
    full = HierarchicalVQ(
        dim=2, codebook_size=4, scales=(1, 2), nested_dropout=1.0, nested_dropout_min_levels=2
    )
    assert full.train().sample_nested_cutoff() is None


def test_nested_dropout_draw_matches_the_reference():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    # no k-means, no expiry: no other draw from torch's generator in the forward
    kw = dict(
        dim=4,
        codebook_size=8,
        scales=(1, 2, 4, 8),
        nested_dropout=0.7,
        kmeans_init=False,
        threshold_ema_dead_code=0,
    )
    x = torch.randn(2, 4, 8)
    ref, mine = vqp.HierarchicalVQ(**kw).train(), HierarchicalVQ(**kw).train()
    for seed in range(8):
        torch.manual_seed(seed)
        theirs = ref(x, return_cutoff=True)[-1]
        torch.manual_seed(seed)
        assert mine(x, return_cutoff=True).cutoff == theirs


# -- codebooks and phi -------------------------------------------------------------------------------


def test_shared_and_per_level_parts():
    shared = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4))
    keys = set(shared.state_dict())
    assert {k.split("._codebook")[0] for k in keys if "_codebook" in k} == {"vq"}
    assert {"phi_shared.conv.weight", "phi_shared.conv.bias"} <= keys
    assert shared.num_codebooks == 1 and all(shared.get_vq(i) is shared.vq for i in range(3))
    assert all(shared.choose_phi(i) is shared.phi_shared for i in range(3))

    per = HierarchicalVQ(
        dim=4, codebook_size=(4, 8, 16, 16), scales=(1, 2, 4, 8), shared_codebook=False, share_quant_resi=2
    )
    assert per.codebook_size == 16 and per.num_codebooks == 4
    assert [per.get_vq(i).codebook_size for i in range(4)] == [4, 8, 16, 16]
    assert len(per.phi_levels) == 2
    # level l picks round(l / 3 * (k - 1)): 0, 0.33, 0.67, 1 -> 0, 0, 1, 1
    assert [list(per.phi_levels).index(per.choose_phi(i)) for i in range(4)] == [0, 0, 1, 1]
    three = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4, 8), share_quant_resi=3)
    assert [list(three.phi_levels).index(three.choose_phi(i)) for i in range(4)] == [0, 1, 1, 2]
    every = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), share_quant_resi=0)
    assert [list(every.phi_levels).index(every.choose_phi(i)) for i in range(3)] == [0, 1, 2]
    # quant_resi 0: phi is the identity
    off = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2), quant_resi=0.0)
    y = torch.randn(2, 4, 2)
    assert torch.equal(off.upsample_to_full(y, (2,), 1), y)
    out = per.eval()(torch.randn(2, 4, 8))
    assert [int(i.max()) < s for i, s in zip(out.indices, (4, 8, 16, 16))] == [True] * 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(shared_codebook=False, share_quant_resi=0),
        dict(shared_codebook=False, share_quant_resi=2, accept_image_fmap=True),
        dict(share_quant_resi=5, accept_3d_fmap=True),
    ],
)
def test_state_dict_keys_are_the_reference_keys(kwargs):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    kw = dict(dim=4, codebook_size=8, scales=(1, 2, 4), **kwargs)
    HierarchicalVQ(**kw).load_state_dict(vqp.HierarchicalVQ(**kw).state_dict(), strict=True)


# -- the kit, save / load, export ------------------------------------------------------------------------


class PackedIndices(QuantizerModule):
    """HierarchicalVQ whose forward gives its indices packed as encode does, so check_quantizer's rules
    (one index tensor, equal to encode's) apply."""

    def __init__(self, **kwargs):
        super().__init__()
        self.inner = HierarchicalVQ(**kwargs)
        self.dim, self.codebook_size = self.inner.dim, self.inner.codebook_size
        self.num_codebooks = self.inner.num_codebooks

    def forward(self, x):
        out = self.inner(x)
        return out.quantized, self.inner.pack_indices(out.indices), out.commit_loss

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, indices):
        return self.inner.decode(indices)

    def book_layout(self):
        return self.inner.book_layout()


KIT_CASES = {
    "sequence": (dict(dim=8, codebook_size=16, scales=(1, 2, 4, 8)), (2, 8, 8)),
    "per_level_channel_last": (
        dict(
            dim=8,
            codebook_size=(8, 16, 16),
            scales=((1, 2), (2, 2), (4, 4)),
            shared_codebook=False,
            share_quant_resi=0,
            channel_first=False,
            accept_image_fmap=True,
        ),
        (2, 4, 4, 8),
    ),
    "video": (dict(dim=4, codebook_size=8, scales=(1, 2), accept_3d_fmap=True), (2, 4, 2, 2, 2)),
}


@pytest.mark.parametrize("case", KIT_CASES, ids=list(KIT_CASES))
def test_conformance_kit(case):
    kwargs, shape = KIT_CASES[case]
    check_quantizer(PackedIndices, torch.randn(shape), dynamic_dims=(0,), **kwargs)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    kwargs, shape = KIT_CASES["per_level_channel_last"]
    q = HierarchicalVQ(**kwargs)
    x = torch.randn(shape)
    q.train()(x)
    q.eval()
    vqcore.save(q, tmp_path / "h.safetensors")
    loaded = vqcore.load(tmp_path / "h.safetensors")
    assert type(loaded) is HierarchicalVQ and loaded.level_shapes == q.level_shapes
    mine, theirs = q(x), loaded(x)
    assert torch.equal(mine.quantized, theirs.quantized)
    assert all(torch.equal(a, b) for a, b in zip(mine.indices, theirs.indices))


@pytest.mark.parametrize("case", ["sequence", "per_level_channel_last"])
def test_export_parity(case, tmp_path):
    torch.manual_seed(0)
    kwargs, shape = KIT_CASES[case]
    q = HierarchicalVQ(**kwargs)
    x = torch.randn(shape)
    q.train()(x)
    assert_exports_with_parity(q, x, tmp_path)


# -- reference converter ------------------------------------------------------------------------------

CONVERT_CASES = {
    "default": (dict(dim=4, codebook_size=8, scales=(1, 2, 4)), (16, 4, 4)),
    "per_level_image": (
        dict(
            dim=4,
            codebook_size=(8, 8, 16),
            scales=(1, 2, 4),
            shared_codebook=False,
            share_quant_resi=0,
            accept_image_fmap=True,
            quant_resi=-0.3,
            decay=0.9,
        ),
        (16, 4, 4, 4),
    ),
    "channel_last_video": (
        dict(
            dim=4,
            codebook_size=8,
            scales=(1, (1, 2, 2), 2),
            share_quant_resi=2,
            accept_3d_fmap=True,
            channel_first=False,
            nested_dropout=0.3,
            nested_dropout_min_levels=2,
            commitment_weight=0.5,
        ),
        (16, 2, 2, 2, 4),
    ),
}


@pytest.mark.parametrize("case", CONVERT_CASES, ids=list(CONVERT_CASES))
def test_from_reference(case):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    kwargs, shape = CONVERT_CASES[case]
    torch.manual_seed(0)
    ref = vqp.HierarchicalVQ(**kwargs)
    untrained = from_reference(copy.deepcopy(ref))
    assert untrained.get_vq(0).codebook_module.initted.item() is False  # k-means still to run
    for _ in range(3):
        ref(torch.randn(shape) * 2)
    ref.eval()
    mine = from_reference(ref).eval()
    # the reference state loads strictly into the module built with the same arguments
    HierarchicalVQ(**kwargs).load_state_dict(ref.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[key], value), key
    x = torch.randn(shape)
    theirs, ours = ref(x), mine(x)
    for a, b in zip(theirs[1], ours.indices):
        assert torch.equal(a, b)
    torch.testing.assert_close(ours.quantized, theirs[0], rtol=1e-5, atol=1e-5)
    for name in (
        "nested_dropout",
        "nested_dropout_min_levels",
        "level_shapes",
        "codebook_sizes",
        "channel_first",
    ):
        assert getattr(mine, name) == getattr(ref, name), name


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scales=(2, 1)), "non-decreasing"),
        (dict(scales=((1, 2), (2, 1)), accept_image_fmap=True), "non-decreasing"),
        (dict(scales=((1, 2, 3),), accept_image_fmap=True), r"each entry of scales must be an int or 2 ints"),
        (dict(scales=("ab",)), "each entry of scales must be an int"),
        (dict(scales=()), "non-empty"),
        (dict(scales=(0, 1)), "positive"),
        (dict(accept_image_fmap=True, accept_3d_fmap=True), "accept_image_fmap and accept_3d_fmap"),
        (dict(codebook_size=(4, 8)), "shared_codebook=True needs one codebook size"),
        (dict(codebook_size=(4, 8, 8), shared_codebook=False), "2 levels"),
        (dict(nested_dropout=1.5), "nested_dropout"),
        (dict(nested_dropout_min_levels=0), "nested_dropout_min_levels"),
    ],
)
def test_bad_options(kwargs, match):
    options = dict(dim=4, codebook_size=8, scales=(1, 2))
    with pytest.raises(ConfigurationError, match=match) as err:
        HierarchicalVQ(**{**options, **kwargs})
    assert isinstance(err.value, AssertionError)  # as the reference's asserts


@pytest.mark.parametrize("training", [True, False])
def test_bad_input_changes_no_state(training):
    q = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4)).train(training)
    before = snapshot(q)
    x = torch.randn(2, 4, 4)
    cases = [
        (lambda: q(torch.randn(2, 3, 4)), ValueError, r"4 features on its second axis \(batch, dim, seq\)"),
        (lambda: q(torch.randn(2, 4, 4, 4)), ValueError, r"1 spatial axes\), got shape \(2, 4, 4, 4\)"),
        (lambda: q(x.long()), TypeError, "floating point"),
        (lambda: q(x, mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 4\)"),
        (lambda: q(x, mask=torch.ones(2, 4)), TypeError, "bool"),
        (
            lambda: q(x, mask=torch.ones(2, 4, dtype=torch.bool), lens=torch.tensor([4, 4])),
            ValueError,
            "either",
        ),
        (lambda: q(x, indices=(torch.zeros(2, 1),)), ValueError, "get_output_from_indices"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind, match=match):
            call()
    assert_same_state(q, before)
    image = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2), accept_image_fmap=True, channel_first=False)
    with pytest.raises(ValueError, match=r"4 features on its last axis \(batch, height, width, dim\)"):
        image(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="lens"):
        image(torch.randn(2, 2, 2, 4), lens=torch.tensor([1, 2]))


def test_bad_indices():
    q = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4)).eval()
    with pytest.raises(ValueError, match=r"packed indices must be \(batch, 7\)"):
        q.decode(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one index map per level \(3\), got 2"):
        q.decode((torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"indices\[1\] must have shape \(batch, 2\)"):
        q.decode(tuple(torch.zeros(2, n, dtype=torch.long) for n in (1, 3, 4)))
    with pytest.raises(ValueError, match=r"indices\[0\] must be in \[0, 8\)"):
        q.decode(torch.full((2, 7), 8))
    with pytest.raises(TypeError, match="integer"):
        q.decode(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"full_shape must be an int or 1 ints .*got \(4, 4\)"):
        q.get_output_from_indices(torch.zeros(2, 7, dtype=torch.long), full_shape=(4, 4))


# -- precision -------------------------------------------------------------------------------------------


def test_low_precision_inputs_quantize_in_float32():
    torch.manual_seed(0)
    q = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), kmeans_init=False).eval()
    x = torch.randn(2, 4, 4).bfloat16()
    out, twin = q(x), q(x.float())
    assert out.quantized.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(out.indices, twin.indices))
    assert torch.equal(out.quantized, twin.quantized.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = q(x.float())
    assert torch.equal(auto.quantized, twin.quantized)
    half = copy.deepcopy(q).half()
    assert half.vq.codebook.dtype == torch.float32 and half.phi_shared.conv.weight.dtype == torch.float16
    cast = half(x.half())
    assert cast.quantized.dtype == torch.float16 and torch.equal(
        half.decode(half.encode(x.half())).half(), cast.quantized
    )


# -- torch.distributed -----------------------------------------------------------------------------------


def worker(rank: int, world: int, port: int, out: str) -> None:
    """Every rank draws the nested-dropout cutoff from its own torch seed; rank 0's is used."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    torch.manual_seed(0)
    q = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4, 8, 16), nested_dropout=1.0).train()
    x = torch.randn(4, 4, 16, generator=torch.Generator().manual_seed(rank))
    cutoffs = []
    for step in range(6):
        torch.manual_seed(100 * rank + step)
        cutoffs.append(q(x, return_cutoff=True).cutoff)
    torch.save({"cutoffs": cutoffs, "state": snapshot(q)}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_nested_cutoff_and_codebooks_agree_across_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), "2", str(port), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["cutoffs"] == b["cutoffs"] and len(set(a["cutoffs"])) > 1
    assert_same_state_dicts = [
        torch.equal(a["state"][k], b["state"][k]) for k in a["state"] if "_codebook" in k
    ]
    assert all(assert_same_state_dicts)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
