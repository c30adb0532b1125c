"""The exact factorised entropies of lookup-free quantization (vqcore.blocks.entropy): both Loss objects
against a brute-force float64 softmax over all 2^d codes (values and gradients, temperatures, scales,
masks, chunks, bit groups), the batch distribution's code order, the Loss protocol and registry,
empty books and errors."""

from __future__ import annotations

import math

import pytest
import torch

import vqcore
from vqcore.blocks.entropy import (
    BatchEntropyLoss,
    PerSampleEntropyLoss,
    batch_code_distribution,
    bit_entropy,
    sampled_token_count,
)
from vqcore.blocks.grid import BinaryCodebook
from vqcore.protocols import Loss


def all_codes(d, scale):
    bits = (torch.arange(2**d).unsqueeze(-1) >> torch.arange(d - 1, -1, -1)) & 1
    return (bits * 2 - 1).double() * scale


def brute_entropies(x, tau, scale):
    """x (B, N, d) float64 -> per book (mean per-token entropy, batch entropy) of softmax(2 tau x.c),
    materialised over all 2^d codes c in {-scale, +scale}^d."""
    logits = 2 * tau * torch.einsum("bnd,kd->bnk", x, all_codes(x.shape[-1], scale))
    logp = logits.log_softmax(-1)  # log space throughout: no 0 * log 0 in values or gradients
    log_avg = logp.logsumexp(1) - math.log(x.shape[1])
    return -(logp.exp() * logp).sum(-1).mean(1), -(log_avg.exp() * log_avg).sum(-1)


def entropies(x, tau, scales, valid=None, **batch_options):
    """The two Loss objects on books x (B, N, d) of a binary codebook with per-book ``scales``."""
    codebook = BinaryCodebook(x.shape[-1], scales, books=x.shape[0])
    indices, q = codebook.quantize(x)
    per_sample = PerSampleEntropyLoss(inv_temperature=tau)(x, q, indices, codebook, valid)
    batch = BatchEntropyLoss(inv_temperature=tau, **batch_options)(x, q, indices, codebook, valid)
    return per_sample, batch


def test_losses_follow_the_protocol_and_are_registered():
    for name, cls in (("per_sample_entropy", PerSampleEntropyLoss), ("batch_entropy", BatchEntropyLoss)):
        loss = vqcore.get_entry(name, kind="loss").create()
        assert isinstance(loss, cls) and isinstance(loss, Loss) and loss.name == name
        assert loss.inv_temperature == 100.0


def test_bit_entropy_hand_values():
    got = bit_entropy(torch.tensor([0.0, 1000.0, -1000.0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([math.log(2), 0.0, 0.0], dtype=torch.float64))
    a = torch.tensor(1.5, dtype=torch.float64)
    p = torch.sigmoid(a)
    torch.testing.assert_close(bit_entropy(a), -(p * p.log() + (1 - p) * (1 - p).log()))


@pytest.mark.parametrize("tau", [0.05, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("d, books, scale", [(1, 1, 1.0), (5, 2, 0.5), (8, 1, 1.0)])
def test_entropies_match_brute_force(tau, d, books, scale):
    torch.manual_seed(d)
    x = torch.randn(books, 300, d, dtype=torch.float64, requires_grad=True)
    per_sample, batch = entropies(x, tau, scale, chunk_bytes=4096)  # several chunks
    want_ps, want_b = brute_entropies(x, tau, scale)
    assert per_sample.shape == batch.shape == (books,)
    torch.testing.assert_close(per_sample, want_ps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(batch, want_b, rtol=1e-9, atol=1e-9)
    got = torch.autograd.grad((per_sample - 0.7 * batch).sum(), x)[0]
    want = torch.autograd.grad((want_ps - 0.7 * want_b).sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_per_book_scales():
    x = torch.randn(2, 100, 4, dtype=torch.float64)
    per_sample, batch = entropies(x, 2.0, [1.0, 0.25])
    for book, scale in enumerate((1.0, 0.25)):
        want_ps, want_b = brute_entropies(x[book : book + 1], 2.0, scale)
        torch.testing.assert_close(per_sample[book : book + 1], want_ps, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batch[book : book + 1], want_b, rtol=1e-9, atol=1e-9)


def test_batch_distribution_is_in_code_order():
    x = torch.randn(1, 50, 6, dtype=torch.float64)
    avg = batch_code_distribution(4 * 0.3 * x)[0]
    want = (2 * 0.3 * torch.einsum("nd,kd->nk", x[0], all_codes(6, 1.0))).softmax(-1).mean(0)
    torch.testing.assert_close(avg, want, rtol=1e-10, atol=1e-12)


def test_entropy_groups_above_max_exact_bits():
    x = torch.randn(1, 200, 6, dtype=torch.float64)
    _, batch = entropies(x, 0.5, 1.0, max_exact_bits=3)
    _, first = brute_entropies(x[..., :3], 0.5, 1.0)
    _, second = brute_entropies(x[..., 3:], 0.5, 1.0)
    torch.testing.assert_close(batch, first + second)
    _, exact = brute_entropies(x, 0.5, 1.0)
    assert batch >= exact - 1e-12  # an upper bound on the joint entropy


def test_chunking_does_not_change_values_or_gradients():
    x = torch.randn(2, 500, 12, requires_grad=True)
    a = entropies(x, 2.0, 1.0, chunk_bytes=50_000)
    ga = torch.autograd.grad((a[0] - a[1]).sum(), x)[0]
    b = entropies(x, 2.0, 1.0, chunk_bytes=2**30)
    gb = torch.autograd.grad((b[0] - b[1]).sum(), x)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("shared", [True, False])
def test_valid_tokens_only(shared):
    """A shared mask (expanded over books, as the quantizers pass it) and per-book masks give the
    entropies of each book's valid tokens; NaN in invalid tokens reaches neither value nor gradient."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 5, dtype=torch.float64)
    if shared:
        valid = (torch.rand(40) > 0.4).expand(2, 40)
    else:
        valid = torch.rand(2, 40) > 0.4
    x = x.masked_fill(~valid.unsqueeze(-1), float("nan")).requires_grad_()
    per_sample, batch = entropies(x, 0.7, 1.0, valid)
    for book in range(2):
        want_ps, want_b = brute_entropies(x.detach()[book, valid[book]].unsqueeze(0), 0.7, 1.0)
        torch.testing.assert_close(per_sample[book], want_ps[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batch[book], want_b[0], rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad((per_sample - batch).sum(), x)
    assert torch.isfinite(grad).all() and torch.all(grad[~valid] == 0)


def test_a_book_without_tokens_gives_zero():
    x = torch.randn(2, 6, 3, requires_grad=True)
    valid = torch.tensor([[True] * 6, [False] * 6])
    per_sample, batch = entropies(x, 1.0, 1.0, valid)
    assert per_sample[1].item() == 0.0 and batch[1].item() == 0.0
    assert per_sample[0] > 0 and batch[0] > 0
    per_sample, batch = entropies(x[:, :0], 1.0, 1.0)
    assert per_sample.tolist() == [0.0, 0.0] and batch.tolist() == [0.0, 0.0]
    assert per_sample.requires_grad  # still part of the graph


def test_errors():
    x = torch.randn(1, 4, 3)
    with pytest.raises(TypeError, match="binary codebook with per-book code scales"):
        PerSampleEntropyLoss()(x, x, None, None, None)
    with pytest.raises(TypeError, match="binary codebook"):
        BatchEntropyLoss()(x, x, None, object(), None)
    with pytest.raises(ValueError, match="max_exact_bits must be >= 1"):
        BatchEntropyLoss(max_exact_bits=0)
    with pytest.raises(TypeError, match="chunk_bytes must be an int"):
        BatchEntropyLoss(chunk_bytes=1.5)


def test_per_sample_fraction_samples_tokens():
    assert [sampled_token_count(n, 0.25) for n in (0, 1, 3, 8, 10)] == [0, 1, 1, 2, 2]
    assert sampled_token_count(7, 1.0) == 7
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    codebook = BinaryCodebook(3, 1.0, books=2)
    indices, q = codebook.quantize(x)
    per_token = bit_entropy(4 * 0.5 * x).sum(-1)  # (2, 8): each token's entropy at tau 0.5
    loss = PerSampleEntropyLoss(inv_temperature=0.5, fraction=0.125)  # one token of 8
    draws = torch.stack([loss(x, q, indices, codebook, None) for _ in range(30)])
    # one token, the same for both books (they share the draw)
    hits = (draws.unsqueeze(-1) - per_token).abs() < 1e-12  # (30, 2, 8)
    assert torch.equal(hits[:, 0], hits[:, 1]) and torch.all(hits.sum(-1) == 1)
    assert len({int(h.nonzero()[0]) for h in hits[:, 0]}) > 1
    exact = PerSampleEntropyLoss(inv_temperature=0.5, fraction=1.0)(x, q, indices, codebook, None)
    torch.testing.assert_close(exact, per_token.mean(-1))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        PerSampleEntropyLoss(fraction=1.5)
    with pytest.raises(TypeError, match="fraction must be a number"):
        PerSampleEntropyLoss(fraction="half")
