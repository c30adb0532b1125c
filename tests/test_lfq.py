"""LFQ / ResidualLFQ: seed examples, MSB-first indices, the loss wiring (the entropy Loss objects, whose
maths tests/test_entropy.py pins against brute force; commitment; extra losses), reference loss parity
where the reference's log clamp is inactive, masks, layouts and the encode/decode contract, the residual
stack through its layers' public API, return_all_codes, export metadata, state_dict keys, errors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import assert_exports_with_parity, assert_save_load_equal

from vqcore import LFQ, ResidualLFQ
from vqcore.blocks.entropy import BatchEntropyLoss, PerSampleEntropyLoss
from vqcore.blocks.grid import BinaryCodebook
from vqcore.compat import from_reference
from vqcore.errors import ConfigurationError
from vqcore.export.metadata import quantizer_fields
from vqcore.plugins.lfq import (
    CosineSimLinear,
    LFQOutput,
    LFQOutputWithBreakdown,
    LFQOutputWithCodes,
    is_distributed,
    maybe_distributed_mean,
)
from vqcore.testing import check_quantizer

# -- seed README examples (only the import changed) ----------------------------------------------


def test_seed_lfq_image():
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)
    assert (
        quantized.shape == (1, 16, 32, 32) and indices.shape == (1, 32, 32) and entropy_aux_loss.shape == ()
    )
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_seed_lfq_sequence_and_video():
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)
    assert seq.shape == quantized.shape
    video_feats = torch.randn(1, 16, 10, 32, 32)
    quantized, *_ = quantizer(video_feats)
    assert video_feats.shape == quantized.shape


def test_seed_lfq_multiple_codebooks():
    quantizer = LFQ(codebook_size=4096, dim=16, num_codebooks=4)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats)
    assert indices.shape == (1, 32, 32, 4) and entropy_aux_loss.shape == ()
    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_seed_residual_lfq():
    residual_lfq = ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_lfq.eval()
    quantized, indices, commit_loss = residual_lfq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)
    quantized_out = residual_lfq.get_output_from_indices(indices)
    assert quantized_out.shape == (1, 1024, 256)
    assert torch.all(quantized == quantized_out)


# -- quantization and index layout ---------------------------------------------------------------


def test_indices_msb_first_and_codes():
    q = LFQ(codebook_size=16, codebook_scale=0.5)
    x = torch.tensor([[[0.3, -1.0, 0.0, 2.0], [-0.1, 0.2, 0.3, -0.4]]])
    out, indices, _ = q.eval()(x)
    assert indices.tolist() == [[0b1001, 0b0110]]  # 0 maps to -scale
    assert out.tolist() == [[[0.5, -0.5, -0.5, 0.5], [-0.5, 0.5, 0.5, -0.5]]]


def test_indices_match_reference():
    from vector_quantize_pytorch import LFQ as RefLFQ

    ours, ref = LFQ(codebook_size=1024, num_codebooks=2), RefLFQ(codebook_size=1024, num_codebooks=2)
    ours.eval(), ref.eval()
    x = torch.randn(2, 20, 6, 7)
    a, i, _ = ours(x)
    b, j, _ = ref(x)
    assert torch.equal(i, j) and torch.equal(a, b)


# -- the loss --------------------------------------------------------------------------------------------


def entropies(tokens, tau, scale):
    """tokens (M, d) float64 -> (per-sample, batch) entropies of one book, by the Loss objects."""
    x = tokens.double().unsqueeze(0)
    codebook = BinaryCodebook(x.shape[-1], scale)
    indices, q = codebook.quantize(x)
    per_sample = PerSampleEntropyLoss(inv_temperature=tau)(x, q, indices, codebook, None)
    return per_sample[0], BatchEntropyLoss(inv_temperature=tau)(x, q, indices, codebook, None)[0]


def test_module_loss_is_weighted_entropies_plus_commitment():
    torch.manual_seed(0)
    q = LFQ(
        codebook_size=32,
        entropy_loss_weight=0.3,
        diversity_gamma=2.0,
        commitment_loss_weight=0.25,
        codebook_scale=0.5,
    )
    x = torch.randn(2, 40, 5)
    out = q(x, inv_temperature=3.0, return_loss_breakdown=True)
    ps, b = entropies(x.reshape(80, 5), 3.0, 0.5)
    commitment = (x - torch.where(x > 0, 0.5, -0.5)).pow(2).mean()
    torch.testing.assert_close(out.breakdown.per_sample_entropy.double(), ps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.breakdown.batch_entropy.double(), b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.breakdown.commitment, commitment)
    want = 0.3 * (ps - 2.0 * b) + 0.25 * commitment.double()
    torch.testing.assert_close(out.entropy_aux_loss.double(), want, rtol=1e-5, atol=1e-6)
    assert q.eval()(x).entropy_aux_loss.item() == 0.0


def test_loss_matches_reference_where_its_log_clamp_is_inactive():
    from vector_quantize_pytorch import LFQ as RefLFQ

    kwargs = dict(
        codebook_size=16, dim=4, entropy_loss_weight=0.1, diversity_gamma=1.5, commitment_loss_weight=0.2
    )
    ours, ref = LFQ(**kwargs), RefLFQ(**kwargs)
    x = torch.randn(3, 50, 4)
    for tau in (0.05, 0.2):  # every code probability >= 1e-5
        a = ours(x, inv_temperature=tau).entropy_aux_loss
        b = ref(x, inv_temperature=tau).entropy_aux_loss
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_sample_mask", [False, True])
def test_masks_keep_the_batch_entropy(per_sample_mask):
    torch.manual_seed(0)
    q = LFQ(codebook_size=64, entropy_loss_weight=1.0)
    x = torch.randn(3, 20, 6)
    mask = torch.tensor([True, False, True]) if per_sample_mask else torch.rand(3, 20) > 0.4
    token_mask = mask.unsqueeze(1).expand(3, 20) if per_sample_mask else mask
    x = x.masked_fill(~token_mask.unsqueeze(-1), float("nan")).requires_grad_()  # padding may hold NaN
    out = q(x, inv_temperature=0.5, mask=mask, return_loss_breakdown=True)
    ps, b = entropies(x.detach()[token_mask], 0.5, 1.0)
    torch.testing.assert_close(out.breakdown.per_sample_entropy.double(), ps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.breakdown.batch_entropy.double(), b, rtol=1e-5, atol=1e-6)
    assert b > ps + 0.5  # the reference's (b, n) masks collapse the batch term to the per-sample one
    assert torch.all(out.indices[~token_mask] == -1) and torch.all(out.indices[token_mask] >= 0)
    assert torch.all(out.quantized[~token_mask] == 0)
    (out.quantized.sum() + out.entropy_aux_loss).backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[~token_mask] == 0)
    assert torch.equal(q.decode(out.indices), q.eval()(x.detach(), mask=mask).quantized)


@pytest.mark.slow
def test_codebook_size_2_24_trains_with_bounded_tables():
    q = LFQ(codebook_size=2**24)
    x = torch.randn(2, 24, 8, 8, requires_grad=True)
    out = q(x)
    (out.quantized.sum() + out.entropy_aux_loss).backward()
    assert torch.isfinite(out.entropy_aux_loss) and torch.isfinite(x.grad).all()


def test_autocast_and_half_inputs():
    q = LFQ(codebook_size=256, dim=32)
    x = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    assert out.quantized.dtype == torch.float32 and out.entropy_aux_loss.dtype == torch.float32
    out = q(x.bfloat16().float())
    out16 = q(x.bfloat16())
    assert out16.quantized.dtype == torch.bfloat16 and torch.equal(out16.indices, out.indices)


# -- layouts, decode, residual ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs, index_shape",
    [
        ((2, 16, 8), {}, (2, 16)),
        ((2, 8), {}, (2,)),
        ((2, 8, 16), {"channel_first": True}, (2, 16)),
        ((2, 8, 3, 5), {}, (2, 3, 5)),
        ((2, 8, 2, 3, 5), {}, (2, 2, 3, 5)),
        ((2, 12, 3, 5), {"dim": 12, "num_codebooks": 2}, (2, 3, 5, 2)),
    ],
)
def test_decode_equals_eval_forward(shape, kwargs, index_shape):
    q = LFQ(codebook_size=256, **kwargs).eval()
    x = torch.randn(*shape)
    out, indices, loss = q(x)
    assert out.shape == x.shape and indices.shape == index_shape and loss.item() == 0
    assert torch.equal(q.encode(x), indices)
    assert torch.equal(q.decode(indices), out)


@pytest.mark.parametrize("shape", [(2, 8, 32), (2, 32, 3, 4), (2, 32, 2, 3, 4)])
def test_residual_lfq_layouts_decode(shape):
    q = ResidualLFQ(dim=32, codebook_size=64, num_quantizers=3).eval()
    x = torch.randn(*shape)
    out, indices, losses = q(x)
    assert out.shape == x.shape and indices.shape[-1] == 3 and losses.shape == (3,)
    assert torch.equal(q.get_output_from_indices(indices), out)
    assert torch.equal(q.encode(x), indices)


def test_residual_lfq_scales_losses_and_dropout():
    torch.manual_seed(0)
    q = ResidualLFQ(dim=6, codebook_size=64, num_quantizers=4, quantize_dropout=True)
    codes = q.get_codes_from_indices(torch.zeros(1, 2, 4, dtype=torch.long))
    assert [c.abs().unique().item() for c in codes] == [1.0, 0.5, 0.25, 0.125]
    x = torch.randn(2, 30, 6, requires_grad=True)
    seen = set()
    for seed in range(12):
        out, idx, losses = q(x, rand_quantize_dropout_fixed_seed=seed)
        kept = int((idx[0, 0] >= 0).sum())
        seen.add(kept)
        assert (
            torch.all(idx[..., kept:] == -1)
            and torch.all(losses[kept:] == 0)
            and torch.all(losses[:kept] != 0)
        )
    assert len(seen) > 1
    q.eval()
    _, idx, _ = q(x)
    errors = [(q.decode(idx[..., : k + 1]) - x).pow(2).mean().item() for k in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize(
    "factory, example, kwargs",
    [
        (LFQ, (2, 8, 16), dict(codebook_size=256, dim=16)),
        (LFQ, (2, 8, 3, 4), dict(codebook_size=16, dim=8, num_codebooks=2, commitment_loss_weight=0.1)),
        (ResidualLFQ, (2, 8, 32), dict(codebook_size=64, dim=32, num_quantizers=3)),
        (ResidualLFQ, (2, 32, 2, 3, 4), dict(codebook_size=64, dim=32, num_quantizers=3)),
    ],
)
def test_conformance(factory, example, kwargs):
    check_quantizer(factory, torch.randn(*example), **kwargs)


# -- errors -----------------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(ValueError, match="power of 2"):
        LFQ(codebook_size=1000)
    with pytest.raises(ValueError, match="power of 2"):
        ResidualLFQ(dim=8, codebook_size=100, num_quantizers=2)
    with pytest.raises(ValueError, match="codebook_size or dim"):
        LFQ()
    q = LFQ(codebook_size=256, dim=16)
    with pytest.raises(ValueError, match="16 features"):
        q(torch.randn(1, 10, 8))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        q.indices_to_codes(torch.tensor([[256]]))
    with pytest.raises(ValueError, match=r"mask must have shape"):
        q(torch.randn(2, 10, 16), mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        q(torch.randn(2, 10, 16), mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"quantizer axis of 1..2 entries"):
        ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2).decode(torch.zeros(1, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index must be in"):
        ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2, quantize_dropout_cutoff_index=2)
    with pytest.raises(TypeError, match="sets codebook_scale of its layers"):
        ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2, codebook_scale=0.5)
    with pytest.raises(ValueError, match="clash"):
        LFQ(codebook_size=16, extra_losses={"commitment": 1.0})
    with pytest.raises(ValueError, match="max_exact_entropy_bits must be >= 1"):
        LFQ(codebook_size=16, max_exact_entropy_bits=0)


# -- extra losses -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BookScale:
    """A Loss that reports each book's code scale: shows which codebook the quantizer passes."""

    name: ClassVar[str] = "book_scale"

    def __call__(self, x, q, indices, codebook, valid):
        return codebook.scales.to(x.dtype)


@dataclass(frozen=True)
class TokensSeen:
    """A Loss: how many tokens count (LFQ applies its mask before the losses: valid is None)."""

    name: ClassVar[str] = "tokens_seen"

    def __call__(self, x, q, indices, codebook, valid):
        assert valid is None and q.shape == x.shape and indices.shape == x.shape[:2]
        return x.new_full((x.shape[0],), float(x.shape[1]))


def test_extra_losses_are_added_and_reported():
    torch.manual_seed(0)
    kwargs = dict(codebook_size=32, entropy_loss_weight=0.3, commitment_loss_weight=0.25, codebook_scale=0.5)
    plain = LFQ(**kwargs)
    q = LFQ(**kwargs, extra_losses=[("codebook", 2.0), (BookScale(), 0.1), (TokensSeen(), 0.01)])
    x = torch.randn(2, 40, 5)
    mask = torch.arange(40) < torch.tensor([[40], [10]])
    base = plain(x, inv_temperature=3.0, mask=mask)
    out = q(x, inv_temperature=3.0, mask=mask, return_loss_breakdown=True)
    extra = out.breakdown.extra
    assert set(extra) == {"codebook", "book_scale", "tokens_seen"}
    # the codebook term mean ||sg(x) - q||^2 over the 50 valid tokens equals the commitment term by hand
    valid = x[mask]
    want = (valid - torch.where(valid > 0, 0.5, -0.5)).pow(2).mean()
    torch.testing.assert_close(extra["codebook"], want)
    torch.testing.assert_close(out.breakdown.commitment, want)
    assert extra["book_scale"].item() == 0.5  # the implicit binary codebook is passed to the losses
    assert extra["tokens_seen"].item() == 50  # the valid tokens only
    torch.testing.assert_close(
        out.entropy_aux_loss, base.entropy_aux_loss + 2.0 * want + 0.1 * 0.5 + 0.01 * 50
    )
    q.eval()
    out = q(x, return_loss_breakdown=True)
    assert out.entropy_aux_loss.item() == 0.0 and all(t.item() == 0.0 for t in out.breakdown.extra.values())


def test_residual_lfq_forwards_extra_losses_with_layers_as_books():
    torch.manual_seed(0)
    kwargs = dict(dim=6, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.2)
    plain = ResidualLFQ(**kwargs)
    q = ResidualLFQ(**kwargs, extra_losses=[(BookScale(), 1.0)])
    q.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 6)
    diff = q(x).entropy_aux_loss - plain(x).entropy_aux_loss
    torch.testing.assert_close(diff, torch.tensor([1.0, 0.5, 0.25]))  # one value per layer: scale 2^-q


def test_residual_lfq_losses_through_the_layers_public_api():
    """Every kept layer's losses, computed at once with the layers as books, equal each layer's own
    losses on its residual, obtained through the LFQ public API only."""
    torch.manual_seed(0)
    q = ResidualLFQ(
        dim=12, codebook_size=32, num_quantizers=3, commitment_loss_weight=0.3, diversity_gamma=1.5
    )
    x = torch.randn(2, 25, 12)
    mask = torch.rand(2, 25) > 0.3
    _, _, losses = q(x, mask=mask, inv_temperature=2.0)
    residual = q.project_in(torch.where(mask.unsqueeze(-1), x, 0.0))
    for layer, loss in zip(q.layers, losses):
        books = layer.to_books(residual)
        indices, codes = layer.codebook_module.quantize(books)
        terms, extra = layer.book_losses(books, codes, indices, mask.reshape(1, -1), inv_temperature=2.0)
        torch.testing.assert_close(loss, layer.weighted_loss(terms, extra)[0])
        residual = residual - layer.from_books(codes, 2, 25)
    assert isinstance(q.layers[0].codebook_module, BinaryCodebook)
    assert q.layer_codebooks.scales.tolist() == [1.0, 0.5, 0.25]


# -- residual stack: dropout rule, all codes, coarse codes -------------------------------------------------


def test_residual_lfq_dropout_in_training_mode_whatever_the_grad_mode():
    q = ResidualLFQ(dim=6, codebook_size=16, num_quantizers=4, quantize_dropout=True)
    x = torch.randn(2, 5, 6)
    seed = next(s for s in range(20) if q.dropout.kept_layers(True, s) < 4)
    with torch.no_grad():
        assert (q(x, rand_quantize_dropout_fixed_seed=seed).indices == -1).any()
    assert torch.all(q.eval()(x, rand_quantize_dropout_fixed_seed=seed).indices >= 0)


def test_residual_lfq_return_all_codes():
    q = ResidualLFQ(dim=6, codebook_size=16, num_quantizers=3, quantize_dropout=True)
    x = torch.randn(2, 5, 6)
    out = q(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=0)
    assert isinstance(out, LFQOutputWithCodes)
    quantized, indices, losses, all_codes = out  # unpacks as before
    assert all_codes.shape == (3, 2, 5, 4)
    kept = int((indices[0, 0] >= 0).sum())
    assert torch.all(all_codes[kept:] == 0)
    torch.testing.assert_close(q.project_out(all_codes.sum(0)), quantized)
    q.eval()
    out = q(torch.randn(2, 6, 3, 4), return_all_codes=True)  # images: codes in the input's layout
    assert out.all_codes.shape == (3, 2, 4, 3, 4)
    assert torch.equal(q.get_codes_from_indices(out.indices), out.all_codes.movedim(2, -1))


def test_residual_lfq_coarse_codes_are_padded_with_zeros():
    q = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3)
    codes = q.get_codes_from_indices(torch.tensor([[[15, 0], [-1, 3]]]))  # (b=1, n=2, q=2)
    assert codes.shape == (3, 1, 2, 4)
    assert codes[0, 0, 0].tolist() == [1.0] * 4 and codes[1, 0, 0].tolist() == [-0.5] * 4
    assert torch.all(codes[0, 0, 1] == 0) and torch.all(codes[2] == 0)
    assert codes[1, 0, 1].tolist() == [-0.5, -0.5, 0.5, 0.5]


# -- export metadata, state -------------------------------------------------------------------------------


def _artifact_fields(quantizer):
    """What an exported artifact records about the quantizer (the generic fields and export_metadata)."""
    fields = quantizer_fields(quantizer)
    fields.pop("config")
    return fields


def test_export_metadata():
    meta = _artifact_fields(LFQ(dim=16, codebook_size=256, num_codebooks=2, codebook_scale=0.5))
    want = dict(dim=16, codebook_dim=8, codebook_size=256, num_codebooks=2, codebook_scale=0.5)
    assert meta == {**want, "channel_first": None}
    meta = _artifact_fields(LFQ(codebook_size=16, channel_first=True))
    assert meta["channel_first"] is True and meta["dim"] == 4
    meta = _artifact_fields(ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2))
    want = dict(dim=8, codebook_dim=4, codebook_size=16, num_codebooks=1, num_quantizers=2)
    assert meta == {**want, "channel_first": None}
    json.dumps(meta)


def test_state_dict_keys():
    projections = {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"}
    assert LFQ(codebook_size=16).state_dict() == {}
    assert set(LFQ(dim=16, codebook_size=256).state_dict()) == projections
    assert set(LFQ(dim=16, codebook_size=256, extra_losses={"codebook": 1.0}).state_dict()) == projections
    assert set(ResidualLFQ(dim=8, codebook_size=16, num_quantizers=3).state_dict()) == projections
    assert ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3).state_dict() == {}


def test_a_batch_without_valid_tokens_gives_zero_loss():
    q = LFQ(codebook_size=16, commitment_loss_weight=0.5, extra_losses={"codebook": 1.0})
    x = torch.randn(2, 5, 4, requires_grad=True)
    out = q(x, mask=torch.zeros(2, dtype=torch.bool), return_loss_breakdown=True)
    assert out.entropy_aux_loss.item() == 0.0 and torch.all(out.indices == -1)
    assert [t.item() for t in out.breakdown[:3]] == [0.0, 0.0, 0.0] and out.breakdown.extra["codebook"] == 0
    (out.quantized.sum() + out.entropy_aux_loss).backward()
    assert torch.all(x.grad == 0)


# -- the reference's LFQ options ------------------------------------------------------------------------


def test_spherical_codes_indices_and_exact_entropies():
    torch.manual_seed(0)
    q = LFQ(codebook_size=16, codebook_scale=0.5, spherical=True, entropy_loss_weight=1.0)
    x = torch.randn(2, 30, 4)
    out = q(x, inv_temperature=2.0, return_loss_breakdown=True)
    # codes are ±scale / sqrt(d) = ±0.25, chosen by the input's signs
    assert torch.equal(out.quantized, torch.where(x > 0, 0.25, -0.25))
    assert torch.equal(out.indices, LFQ(codebook_size=16).eval()(x).indices)
    # the entropies of softmax(2 tau x' . c) with x' = 0.5 x / |x| and codes c = ±0.25, brute force
    normalised = torch.nn.functional.normalize(x.reshape(60, 4).double(), dim=-1) * 0.5
    ps, b = entropies(normalised, 2.0, 0.25)
    torch.testing.assert_close(out.breakdown.per_sample_entropy.double(), ps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.breakdown.batch_entropy.double(), b, rtol=1e-5, atol=1e-6)
    assert q.codebook.shape == (16, 4) and torch.all(q.codebook.abs() == 0.25)
    q.eval()
    assert torch.equal(q.decode(q.encode(x)), q(x).quantized)


def test_frac_per_sample_entropy_samples_tokens_of_the_per_sample_term_only():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3)
    full = LFQ(codebook_size=8, entropy_loss_weight=1.0)
    sampled = LFQ(codebook_size=8, entropy_loss_weight=1.0, frac_per_sample_entropy=0.25)  # 1 token of 4
    per_token = [full(x[:, i : i + 1], inv_temperature=0.5, return_loss_breakdown=True) for i in range(4)]
    per_token = torch.stack([o.breakdown.per_sample_entropy for o in per_token])
    whole = full(x, inv_temperature=0.5, return_loss_breakdown=True).breakdown
    seen = set()
    for _ in range(40):
        terms = sampled(x, inv_temperature=0.5, return_loss_breakdown=True).breakdown
        match = (per_token - terms.per_sample_entropy).abs() < 1e-6
        assert match.sum() >= 1  # one token's own entropy
        seen.add(int(match.nonzero()[0]))
        assert terms.batch_entropy == whole.batch_entropy  # over every token, exactly
    assert seen == {0, 1, 2, 3}  # random, and every token can be drawn: the mean over draws is the full one
    torch.testing.assert_close(per_token.mean(), whole.per_sample_entropy)
    with pytest.raises(ConfigurationError, match=r"frac_per_sample_entropy must be in \(0, 1\], got 0"):
        LFQ(codebook_size=8, frac_per_sample_entropy=0)


def test_soft_clamp_softplus_loss_and_their_errors():
    torch.manual_seed(0)
    q = LFQ(
        codebook_size=8,
        soft_clamp_input_value=2.0,
        experimental_softplus_entropy_loss=True,
        entropy_loss_offset=3.0,
        entropy_loss_weight=0.5,
        diversity_gamma=1.5,
    )
    x = torch.randn(2, 10, 3) * 5
    out = q(x, inv_temperature=1.0, return_loss_breakdown=True)
    clamped = torch.tanh(x / 2.0) * 2.0
    ps, b = entropies(clamped.reshape(20, 3), 1.0, 1.0)
    torch.testing.assert_close(out.breakdown.per_sample_entropy.double(), ps, rtol=1e-5, atol=1e-6)
    want = 0.5 * torch.nn.functional.softplus(ps - 1.5 * b + 3.0)
    torch.testing.assert_close(out.entropy_aux_loss.double(), want, rtol=1e-5, atol=1e-6)
    assert q.eval()(x).entropy_aux_loss.item() == 0.0  # no softplus offset outside training
    with pytest.raises(
        ConfigurationError, match=r"soft_clamp_input_value must be .* >= codebook_scale \(1.0\)"
    ):
        LFQ(codebook_size=8, soft_clamp_input_value=0.5)
    with pytest.raises(AssertionError):  # the reference asserts: code catching AssertionError still works
        LFQ(codebook_size=8, soft_clamp_input_value=0.5)


def test_orthogonal_rotation_indices_codes_and_state():
    torch.manual_seed(0)
    q = LFQ(codebook_size=16, orthogonal_rotation=True).eval()
    rot = q.orthogonal_rot
    torch.testing.assert_close(rot @ rot.T, torch.eye(4))
    assert set(q.state_dict()) == {"orthogonal_rot"}
    x = torch.randn(2, 7, 4)
    out = q(x)
    signs = (x @ rot) > 0
    assert torch.equal(out.indices, (signs.long() * torch.tensor([8, 4, 2, 1])).sum(-1))
    torch.testing.assert_close(out.quantized, torch.where(signs, 1.0, -1.0) @ rot.T)
    assert torch.equal(q.decode(q.encode(x)), out.quantized)


def test_cosine_sim_project_in():
    torch.manual_seed(0)
    q = LFQ(codebook_size=16, dim=6, cosine_sim_project_in=True, cosine_sim_project_in_scale=3.0).eval()
    assert isinstance(q.project_in, CosineSimLinear) and q.project_in.weight.shape == (6, 4)
    assert set(q.state_dict()) == {"project_in.weight", "project_out.weight", "project_out.bias"}
    x = torch.randn(2, 5, 6)
    w = q.project_in.weight
    z = (x / x.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=0, keepdim=True)) * 3.0
    want = q.project_out(torch.where(z > 0, 1.0, -1.0))
    torch.testing.assert_close(q(x).quantized, want)
    assert (
        LFQ(codebook_size=16, dim=6, cosine_sim_project_in=True, codebook_scale=0.5).project_in.scale == 0.5
    )


def test_straight_through_activation_routes_the_gradient():
    q = LFQ(codebook_size=8, straight_through_activation=torch.nn.Tanh(), entropy_loss_weight=0.0)
    x = torch.randn(2, 5, 3, requires_grad=True)
    out = q(x)
    assert torch.equal(out.quantized, torch.where(x > 0, 1.0, -1.0))
    out.quantized.sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_loss_breakdown_nests_like_the_reference():
    q = LFQ(codebook_size=16, commitment_loss_weight=0.1)
    x = torch.randn(2, 5, 4)
    (quantized, indices, aux_loss), breakdown = q(x, return_loss_breakdown=True)
    out = q(x, return_loss_breakdown=True)
    assert isinstance(out, LFQOutputWithBreakdown) and isinstance(out.output, LFQOutput)
    assert out.quantized is out.output.quantized and out.indices is out.output.indices
    assert out.entropy_aux_loss is out[0][2] and out.breakdown is out[1]
    assert breakdown._fields == ("per_sample_entropy", "batch_entropy", "commitment", "extra")


def test_force_quantization_f32_false_is_accepted_and_changes_nothing():
    torch.manual_seed(0)
    a = LFQ(codebook_size=16, dim=8)
    b = LFQ(codebook_size=16, dim=8, force_quantization_f32=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 8).bfloat16()
    assert torch.equal(a(x).quantized, b(x).quantized) and torch.equal(a(x).indices, b(x).indices)


def test_reference_state_dict_with_its_mask_buffer_loads_strictly():
    from vector_quantize_pytorch import LFQ as RefLFQ

    kwargs = dict(codebook_size=16, dim=6, orthogonal_rotation=True)
    ref = RefLFQ(**kwargs)
    q = LFQ(**kwargs)
    assert "mask" in ref.state_dict() and "mask" not in q.state_dict()
    q.load_state_dict(ref.state_dict())  # strict
    assert torch.equal(q.orthogonal_rot, ref.orthogonal_rot)
    bad = dict(ref.state_dict(), mask=torch.tensor([1, 2, 4, 8]))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"mask: the reference LFQ's bit weights must be \[8, 4, 2, 1\]"):
        q.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_distributed_helpers_outside_a_process_group():
    t = torch.tensor([1.0, 2.0])
    assert not is_distributed() and maybe_distributed_mean(t) is t


REFERENCE_OPTIONS = {
    "spherical_rotation_clamp": dict(
        codebook_size=16, dim=6, spherical=True, orthogonal_rotation=True, soft_clamp_input_value=2.0
    ),
    "cosine_activation": dict(
        codebook_size=16, dim=6, cosine_sim_project_in=True, straight_through_activation=torch.nn.Tanh()
    ),
    "softplus_codebooks": dict(
        codebook_size=64,
        dim=12,
        num_codebooks=2,
        spherical=True,
        experimental_softplus_entropy_loss=True,
        commitment_loss_weight=0.2,
    ),
}


@pytest.mark.parametrize("kwargs", REFERENCE_OPTIONS.values(), ids=REFERENCE_OPTIONS.keys())
def test_reference_parity_of_the_new_options(kwargs):
    """Converted from the reference: eval outputs and indices equal, training losses equal at a
    temperature where the reference's log clamp is inactive, and the gradients that reach the input."""
    from vector_quantize_pytorch import LFQ as RefLFQ

    torch.manual_seed(1)
    ref = RefLFQ(**kwargs)
    q = from_reference(ref)
    x = torch.randn(3, 20, kwargs["dim"])
    r, m = ref.eval()(x), q.eval()(x)
    assert torch.equal(m.indices, r.indices)
    torch.testing.assert_close(m.quantized, r.quantized)
    ref.train(), q.train()
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    (r_out, r_terms), (m_out, m_terms) = (
        ref(xr, inv_temperature=0.1, return_loss_breakdown=True),
        q(xm, inv_temperature=0.1, return_loss_breakdown=True),
    )
    torch.testing.assert_close(m_out.entropy_aux_loss, r_out.entropy_aux_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m_terms.batch_entropy, r_terms.batch_entropy, rtol=1e-5, atol=1e-6)
    (r_out.quantized.sum() + r_out.entropy_aux_loss).backward()
    (m_out.quantized.sum() + m_out.entropy_aux_loss).backward()
    torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "example, kwargs",
    [
        ((2, 8, 6), REFERENCE_OPTIONS["spherical_rotation_clamp"]),
        ((2, 8, 6), dict(codebook_size=16, dim=6, cosine_sim_project_in=True, frac_per_sample_entropy=0.5)),
        ((2, 12, 3, 4), REFERENCE_OPTIONS["softplus_codebooks"]),
    ],
    ids=["spherical_rotation_clamp", "cosine_frac", "softplus_codebooks"],
)
def test_new_options_conform_save_load_and_export(example, kwargs, tmp_path):
    x = torch.randn(*example)
    check_quantizer(LFQ, x, **kwargs)
    torch.manual_seed(0)
    q = LFQ(**kwargs)
    assert_save_load_equal(q, x, tmp_path)
    assert_exports_with_parity(q, x, tmp_path)


def test_spherical_2_18_codes_trains_without_a_codes_sized_tensor_per_token():
    q = LFQ(codebook_size=2**18, dim=18, spherical=True)
    x = torch.randn(2, 18, 4, 4, requires_grad=True)
    out = q(x, return_loss_breakdown=True)
    (out.quantized.sum() + out.entropy_aux_loss).backward()
    assert torch.isfinite(out.entropy_aux_loss) and torch.isfinite(x.grad).all()
    assert 0 < out.breakdown.batch_entropy <= 18 * math.log(2)
    # the per-sample term by hand: per-bit binary entropies of logits 4 tau (1 / sqrt(18)) x / |x|
    tokens = torch.nn.functional.normalize(x.detach().movedim(1, -1).reshape(-1, 18).double(), dim=-1)
    p = torch.sigmoid(4 * 100.0 / math.sqrt(18) * tokens)
    bits = -(p * p.clamp(min=1e-300).log() + (1 - p) * (1 - p).clamp(min=1e-300).log())
    torch.testing.assert_close(
        out.breakdown.per_sample_entropy.double(), bits.sum(-1).mean(), rtol=1e-4, atol=1e-6
    )


def test_dtype_is_the_codebook_dtype():
    q = LFQ(codebook_size=16, dim=4)
    assert q.dtype == q.codebook.dtype == torch.float32
    assert q.half().dtype == torch.float32  # the codes stay float32 under .half()
