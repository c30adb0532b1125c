"""LFQ / ResidualLFQ: seed examples, MSB-first indices, the exact factorized entropies against a
brute-force float64 softmax over all codes (values and gradients, temperatures, masks), reference loss
parity where the reference's log clamp is inactive, layouts and the encode/decode contract, errors."""

from __future__ import annotations

import pytest
import torch

from vqcore import LFQ, ResidualLFQ
from vqcore.plugins.lfq import batch_code_distribution, lfq_entropies
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


# -- entropy terms vs brute force ---------------------------------------------------------------------


def all_codes(d, scale):
    bits = (torch.arange(2**d).unsqueeze(-1) >> torch.arange(d - 1, -1, -1)) & 1
    return (bits * 2 - 1).double() * scale


def brute_entropies(x, tau, scale, weights=None):
    """x (N, C, d) float64: entropies of softmax(2 tau x.c) materialised over all 2^d codes."""
    logits = 2 * tau * torch.einsum("ncd,kd->nck", x, all_codes(x.shape[-1], scale))
    logp = logits.log_softmax(-1)  # log space throughout: no 0 * log 0 in values or gradients
    log_avg = logp.logsumexp(0) - torch.log(torch.tensor(float(x.shape[0]), dtype=x.dtype))
    return -(logp.exp() * logp).sum(-1).mean(), -(log_avg.exp() * log_avg).sum(-1).mean()


@pytest.mark.parametrize("tau", [0.05, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("d, books, scale", [(1, 1, 1.0), (5, 2, 0.5), (8, 1, 1.0)])
def test_entropies_match_brute_force(tau, d, books, scale):
    torch.manual_seed(d)
    x = torch.randn(300, books, d, dtype=torch.float64, requires_grad=True)
    per_sample, batch = lfq_entropies(x, tau, scale, chunk_bytes=4096)  # several chunks
    want_ps, want_b = brute_entropies(x, tau, scale)
    torch.testing.assert_close(per_sample, want_ps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(batch, want_b, rtol=1e-9, atol=1e-9)
    got = torch.autograd.grad(per_sample - 0.7 * batch, x)[0]
    want = torch.autograd.grad(want_ps - 0.7 * want_b, x)[0]
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_batch_distribution_is_in_code_order():
    x = torch.randn(50, 1, 6, dtype=torch.float64)
    avg = batch_code_distribution((4 * 0.3 * x).transpose(0, 1))[0]
    want = (2 * 0.3 * torch.einsum("nd,kd->nk", x[:, 0], all_codes(6, 1.0))).softmax(-1).mean(0)
    torch.testing.assert_close(avg, want, rtol=1e-10, atol=1e-12)


def test_entropy_groups_above_max_exact_bits():
    x = torch.randn(200, 1, 6, dtype=torch.float64)
    _, batch = lfq_entropies(x, 0.5, 1.0, max_exact_bits=3)
    _, first = brute_entropies(x[..., :3], 0.5, 1.0)
    _, second = brute_entropies(x[..., 3:], 0.5, 1.0)
    torch.testing.assert_close(batch, first + second)
    _, exact = brute_entropies(x, 0.5, 1.0)
    assert batch >= exact - 1e-12  # an upper bound on the joint entropy


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
    ps, b = brute_entropies(x.double().reshape(80, 1, 5), 3.0, 0.5)
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
    ps, b = brute_entropies(x.detach()[token_mask].double().unsqueeze(1), 0.5, 1.0)
    torch.testing.assert_close(out.breakdown.per_sample_entropy.double(), ps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.breakdown.batch_entropy.double(), b, rtol=1e-5, atol=1e-6)
    assert b > ps + 0.5  # the reference's (b, n) masks collapse the batch term to the per-sample one
    assert torch.all(out.indices[~token_mask] == -1) and torch.all(out.indices[token_mask] >= 0)
    assert torch.all(out.quantized[~token_mask] == 0)
    (out.quantized.sum() + out.entropy_aux_loss).backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[~token_mask] == 0)
    assert torch.equal(q.decode(out.indices), q.eval()(x.detach(), mask=mask).quantized)


def test_chunking_does_not_change_values_or_gradients():
    x = torch.randn(500, 2, 12, requires_grad=True)
    a = lfq_entropies(x, 2.0, chunk_bytes=50_000)
    ga = torch.autograd.grad(a[0] - a[1], x)[0]
    b = lfq_entropies(x, 2.0, chunk_bytes=2**30)
    gb = torch.autograd.grad(b[0] - b[1], x)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


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
    with pytest.raises(ValueError, match=r"size <= 2"):
        ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2).decode(torch.zeros(1, 4, 3, dtype=torch.long))


def test_residual_lfq_batched_losses_equal_per_layer_losses():
    torch.manual_seed(0)
    q = ResidualLFQ(
        dim=12, codebook_size=32, num_quantizers=3, commitment_loss_weight=0.3, diversity_gamma=1.5
    )
    x = torch.randn(2, 25, 12)
    mask = torch.rand(2, 25) > 0.3
    _, _, losses = q(x, mask=mask, inv_temperature=2.0)
    residual = q.project_in(torch.where(mask.unsqueeze(-1), x, 0.0))
    for layer, loss in zip(q.layers, losses):
        codes, _, want, _ = layer.quantize_tokens(residual, 2.0, mask)
        torch.testing.assert_close(loss, want)
        residual = residual - codes.detach()
