"""Quantizers built and called the way projects written for vector-quantize-pytorch build and call them
(the constructor arguments and unpacking of audiolm-pytorch's SoundStream, magvit2-pytorch's video
tokenizer and meshgpt-pytorch's mesh autoencoder), with the import changed to vqcore; and the same
configurations converted from the reference with their trained state."""

from __future__ import annotations

import pytest
import torch

import vqcore
from vqcore import FSQ, LFQ, GroupedResidualFSQ, GroupedResidualLFQ, ResidualLFQ

vqp = pytest.importorskip("vector_quantize_pytorch")


def test_soundstream_grouped_residual_lfq():
    # (batch, time, codebook_dim) features; SoundStream unpacks three outputs and decodes the indices
    rq = GroupedResidualLFQ(
        dim=64,
        num_quantizers=4,
        codebook_size=256,
        groups=2,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=1,
    )
    x = torch.randn(2, 50, 64, requires_grad=True)
    quantized, indices, commit_loss = rq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 2, 50, 4) and commit_loss.shape == (2, 4)
    (quantized.sum() + commit_loss.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    rq.eval()
    quantized, indices, _ = rq(x)
    torch.testing.assert_close(rq.get_output_from_indices(indices), quantized)


def test_soundstream_grouped_residual_fsq():
    rq = GroupedResidualFSQ(
        dim=64,
        levels=[8, 5, 5, 5],
        num_quantizers=4,
        groups=2,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=1,
    )
    assert rq.codebook_size == 8 * 5 * 5 * 5
    x = torch.randn(2, 50, 64)
    quantized, indices = rq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 2, 50, 4)
    rq.eval()
    quantized, indices = rq(x)
    torch.testing.assert_close(rq.get_output_from_indices(indices), quantized)


@pytest.mark.parametrize("spherical", [False, True])
def test_magvit2_lfq_nested_breakdown(spherical):
    quantizers = LFQ(
        dim=18,
        codebook_size=2**18,
        num_codebooks=1,
        entropy_loss_weight=0.1,
        commitment_loss_weight=0.25,
        diversity_gamma=1.0,
        soft_clamp_input_value=10.0,
        spherical=spherical,
    )
    x = torch.randn(1, 18, 2, 8, 8, requires_grad=True)  # video features (b, d, t, h, w)
    (quantized, codes, aux_losses), breakdown = quantizers(x, return_loss_breakdown=True)
    assert quantized.shape == x.shape and codes.shape == (1, 2, 8, 8) and aux_losses.shape == ()
    assert torch.isfinite(breakdown.per_sample_entropy) and torch.isfinite(breakdown.batch_entropy)
    (quantized.sum() + aux_losses).backward()
    assert torch.isfinite(x.grad).all()


def test_magvit2_fsq():
    quantizers = FSQ([8, 5, 5, 5], dim=16, num_codebooks=1)
    quantized, codes = quantizers(torch.randn(1, 16, 2, 8, 8))
    assert quantized.shape == (1, 16, 2, 8, 8) and codes.shape == (1, 2, 8, 8)


MESHGPT_RESIDUAL_LFQ = dict(
    dim=192,
    num_quantizers=2,
    codebook_size=16384,
    commitment_loss_weight=1.0,
    frac_per_sample_entropy=1.0,
    soft_clamp_input_value=10.0,
    experimental_softplus_entropy_loss=True,
    quantize_dropout=True,
    quantize_dropout_cutoff_index=1,
    quantize_dropout_multiple_of=1,
)


def test_meshgpt_residual_lfq_with_mask():
    quantizer = ResidualLFQ(**MESHGPT_RESIDUAL_LFQ)
    x = torch.randn(2, 9, 192, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, -1] = False  # the null vertex
    quantized, codes, commit_loss = quantizer(x, mask=mask)
    assert quantized.shape == x.shape and codes.shape == (2, 9, 2) and commit_loss.shape == (2,)
    (quantized.sum() + commit_loss.sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_meshgpt_checkpoint_moves_over():
    torch.manual_seed(0)
    ref = vqp.ResidualLFQ(**MESHGPT_RESIDUAL_LFQ)
    with torch.no_grad():  # a "trained" projection pair
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref.eval()
    ours = vqcore.compat.from_reference(ref)
    x = torch.randn(2, 9, 192)
    with torch.no_grad():
        ref_out, ref_codes, _ = ref(x)
        our_out, our_codes, _ = ours(x)
    assert torch.equal(our_codes, ref_codes.long())
    torch.testing.assert_close(our_out, ref_out, atol=1e-5, rtol=1e-5)
