"""ResidualVQ options beyond the seed: diveq, quant_grad_frac, heads, return_zeros_for_masked_padding, the
indices= cross-entropy path (ResidualVQ and GroupedResidualVQ) against brute-force formulas, the option
conflicts, and the reference converters of these options."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import snapshot

from vqcore import GroupedResidualVQ, ResidualVQ, VectorQuantize
from vqcore.blocks.estimators import directional_reparam, resolve_estimator
from vqcore.errors import ConfigurationError


def tiny(**kwargs):
    torch.manual_seed(5)
    options = dict(dim=3, num_quantizers=3, codebook_size=4, kmeans_init=False, threshold_ema_dead_code=0)
    return ResidualVQ(**{**options, **kwargs})


def books_of(rvq):
    return [layer.codebook.detach().clone() for layer in rvq.layers]


# -- heads, return_zeros_for_masked_padding ----------------------------------------------------------------


def test_heads_must_be_one():
    with pytest.raises(ConfigurationError, match="heads must be 1, got 2"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, heads=2)
    with pytest.raises(AssertionError):  # the reference asserts
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, heads=2)
    assert ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, heads=1).num_quantizers == 2


@pytest.mark.parametrize("training", [False, True])
def test_return_zeros_for_masked_padding(training):
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, False, True, True], [False, True, True, True]])
    keep = tiny(return_zeros_for_masked_padding=False).train(training)
    zeros = tiny().train(training)
    assert keep.return_zeros_for_masked_padding is False
    assert torch.equal(keep(x, mask=mask).quantized[~mask], x[~mask])
    assert torch.equal(zeros(x, mask=mask).quantized[~mask], torch.zeros(2, 3))


# -- quant_grad_frac -----------------------------------------------------------------------------------


def explicit_chain(x, books, indices, frac, estimator):
    """The residual chain with autograd spelled out: q_st = estimator(r, code); the next residual is
    r - (frac * q_st + (1 - frac) * sg(q_st)); the losses are the commitment MSEs."""
    estimate = resolve_estimator(estimator)
    r, total, losses = x.reshape(-1, x.shape[-1]), 0.0, []
    for q, book in enumerate(books):
        code = book[indices.reshape(-1, len(books))[:, q]]
        q_st = estimate(r.unsqueeze(0), code.unsqueeze(0))[0]
        losses.append(F.mse_loss(r, code))
        total = total + q_st
        r = r - (frac * q_st + (1 - frac) * q_st.detach())
    return total.reshape(x.shape), torch.stack(losses)


@pytest.mark.parametrize("estimator", ["straight_through", "rotation_trick"])
@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_quant_grad_frac_gradient_is_the_explicit_chain(estimator, frac):
    rvq = tiny(quant_grad_frac=frac, rotation_trick=estimator == "rotation_trick").train()
    books = books_of(rvq)
    x = torch.randn(2, 5, 3, requires_grad=True)
    out = rvq(x)
    (out.quantized.square().sum() + out.losses.sum()).backward()
    x2 = x.detach().clone().requires_grad_()
    total, losses = explicit_chain(x2, books, out.indices, frac, estimator)
    (total.square().sum() + losses.sum()).backward()
    torch.testing.assert_close(out.quantized, total.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.losses, losses.detach())
    torch.testing.assert_close(x.grad, x2.grad)


def test_quant_grad_frac_leaves_the_values_alone():
    x = torch.randn(2, 6, 3)
    plain, frac = tiny().train(), tiny(quant_grad_frac=0.5).train()
    a, b = plain(x), frac(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    # with every layer's codes returned, each carries its residual's fraction (1 - frac)^q of the gradient
    frac = tiny(quant_grad_frac=0.5).train()
    x = torch.randn(1, 4, 3, requires_grad=True)
    codes = frac(x, return_all_codes=True).all_codes
    for q in range(3):
        (grad,) = torch.autograd.grad(codes[q].sum(), x, retain_graph=True)
        torch.testing.assert_close(grad, torch.full_like(x, 0.5**q))


def test_quant_grad_frac_range():
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigurationError, match=f"quant_grad_frac must be in \\[0, 1\\], got {bad}"):
            tiny(quant_grad_frac=bad)
    with pytest.raises(ConfigurationError, match="quant_grad_frac must be a number"):
        tiny(quant_grad_frac="half")


# -- diveq ---------------------------------------------------------------------------------------------


def test_diveq_layers_and_training_output():
    rvq = tiny(diveq=True).train()
    assert rvq.quant_grad_frac == 1.0
    for layer in rvq.layers:
        book = layer.codebook_module
        assert book.trained_by_gradient and layer.commitment_weight == 0.0
    books = books_of(rvq)
    x = torch.randn(2, 5, 3, requires_grad=True)
    torch.manual_seed(11)
    out = rvq(x)
    summed = sum(books[q][out.indices.reshape(-1, 3)[:, q]] for q in range(3)).reshape(2, 5, 3)
    torch.manual_seed(11)
    want = directional_reparam(x.detach(), summed)
    torch.testing.assert_close(out.quantized, want)
    assert torch.equal(out.losses, torch.zeros(3))  # commitment 0
    out.quantized.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for layer in rvq.layers:  # the codes learn through the reparameterisation, only those chosen
        grad = layer.codebook_module.codes.grad
        assert grad is not None and grad.abs().sum() > 0
    # eval: plain codes, decode(encode(x)) as always (no noise)
    rvq.eval()
    assert torch.equal(rvq(x).quantized, rvq.decode(rvq.encode(x)))


def test_diveq_gradient_is_the_explicit_formula():
    rvq = tiny(diveq=True).train()
    params = [layer.codebook_module.codes for layer in rvq.layers]
    x = torch.randn(2, 5, 3, requires_grad=True)
    torch.manual_seed(2)
    out = rvq(x)
    out.quantized.pow(3).sum().backward()
    got = [x.grad.clone(), *(p.grad.clone() for p in params)]
    x.grad = None
    for p in params:
        p.grad = None
    torch.manual_seed(2)
    idx = out.indices.reshape(-1, 3)
    summed = sum(F.embedding(idx[:, q], params[q][0]) for q in range(3)).reshape(2, 5, 3)
    directional_reparam(x, summed).pow(3).sum().backward()
    for a, b in zip(got, [x.grad, *(p.grad for p in params)]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(ema_update=True), "ema_update=False.*got ema_update=True"),
        (dict(learnable_codebook=False), "learnable_codebook=True.*got learnable_codebook=False"),
        (dict(commitment_weight=1.0), "commitment_weight=0.0.*got commitment_weight=1.0"),
        (dict(rotation_trick=True), "diveq=True replaces .* rotation_trick=True"),
        (dict(use_cosine_sim=True), "diveq=True .* use_cosine_sim=True"),
        (dict(quant_grad_frac=0.5), "diveq=True .* quant_grad_frac=0.5"),
        (dict(codebook="euclidean"), "diveq=True .* codebook='euclidean'"),
    ],
)
def test_diveq_conflicts_name_both_options(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        tiny(diveq=True, **kwargs)


def test_diveq_accepts_what_it_implies():
    rvq = tiny(
        diveq=True, ema_update=False, learnable_codebook=True, commitment_weight=0.0, quant_grad_frac=1
    )
    assert rvq.diveq and rvq.quant_grad_frac == 1.0


# -- the cross-entropy path ---------------------------------------------------------------------------


def brute_ce(rvq, x, targets, valid=None):
    """Σ_q cross-entropy of targets[..., q] under -||r_q - c|| logits, r_q the greedy chain, float64."""
    books = [b.double() for b in books_of(rvq)]
    r = x.reshape(-1, x.shape[-1]).double()
    t = targets.reshape(-1, len(books))
    keep = torch.ones(len(r), dtype=torch.bool) if valid is None else valid.reshape(-1)
    r = torch.where(keep.unsqueeze(-1), r, 0.0)
    total = 0.0
    for q, book in enumerate(books):
        dist = torch.cdist(r, book)
        total = total + F.cross_entropy(-dist[keep], t[keep, q])
        r = r - book[dist.argmin(-1)]
    return total


@pytest.mark.parametrize("training", [False, True])
def test_cross_entropy_against_brute_force(training):
    rvq = tiny(kmeans_init=True).train(training)  # k-means would run in a training forward: not here
    before = snapshot(rvq)
    x = torch.randn(2, 5, 3, requires_grad=True)
    targets = torch.randint(0, 4, (2, 5, 3))
    out = rvq(x, indices=targets)
    assert out._fields == ("quantized", "ce_loss")
    torch.testing.assert_close(out.ce_loss.double(), brute_ce(rvq, x.detach(), targets))
    for key, value in rvq.state_dict().items():  # no training state touched
        assert torch.equal(value, before[key]), key
    # the quantized output is the greedy chain's
    greedy = rvq.eval()(x.detach()).quantized
    torch.testing.assert_close(out.quantized.detach(), greedy, rtol=0, atol=1e-6)
    out.ce_loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # a list of per-layer tensors is the same targets
    listed = rvq.train(training)(x, indices=[targets[..., q] for q in range(3)])
    torch.testing.assert_close(listed.ce_loss, out.ce_loss)


def test_cross_entropy_with_a_mask_ignores_padding():
    rvq = tiny()
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    targets = torch.randint(0, 4, (2, 4, 3)).masked_fill(~mask.unsqueeze(-1), -1)  # -1 at padding is fine
    out = rvq(x, mask=mask, indices=targets)
    torch.testing.assert_close(out.ce_loss.double(), brute_ce(rvq, x, targets, mask))
    assert torch.equal(out.quantized[~mask], torch.zeros(2, 3))


def test_cross_entropy_refusals():
    rvq = tiny()
    before = snapshot(rvq)
    x = torch.randn(2, 4, 3)
    targets = torch.randint(0, 4, (2, 4, 3))
    with pytest.raises(ValueError, match="indices hold -1"):
        rvq(x, indices=targets.index_fill(2, torch.tensor([1]), -1))
    with pytest.raises(ValueError, match=r"indices must have shape \(2, 4, 3\)"):
        rvq(x, indices=targets[..., :2])
    with pytest.raises(ValueError, match=r"one tensor per layer \(3\), got 2"):
        rvq(x, indices=[targets[..., 0], targets[..., 1]])
    with pytest.raises(ValueError, match="indices"):
        rvq(x, indices=targets + 4)  # out of range
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, before[key]), key
    image = tiny(accept_image_fmap=True)
    with pytest.raises(ConfigurationError, match="accept_image_fmap=True"):
        image(torch.randn(1, 3, 2, 2), indices=torch.zeros(1, 2, 2, 3, dtype=torch.long))


def test_grouped_cross_entropy_sums_the_groups():
    torch.manual_seed(0)
    grouped = GroupedResidualVQ(dim=6, groups=2, num_quantizers=2, codebook_size=4)
    x = torch.randn(2, 5, 6)
    targets = torch.randint(0, 4, (2, 2, 5, 2))
    out = grouped(x, indices=targets)
    want = sum(brute_ce(rvq, x[..., 3 * g : 3 * g + 3], targets[g]) for g, rvq in enumerate(grouped.rvqs))
    torch.testing.assert_close(out.ce_loss.double(), want)
    listed = grouped(x, indices=[targets[0], targets[1]])
    torch.testing.assert_close(listed.ce_loss, out.ce_loss)
    assert out.quantized.shape == x.shape
    with pytest.raises(ValueError, match=r"one entry per group \(2\), got 1"):
        grouped(x, indices=[targets[0]])
    assert len(grouped(x, indices=[])) == 3  # no indices: the usual forward


# -- drop-in signatures and converters -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["ResidualVQ", "GroupedResidualVQ"])
@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_every_reference_argument_is_accepted_by_name(name, method):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    import vqcore

    def named(function):
        return {
            n
            for n, p in inspect.signature(function).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    # implicit_neural_codebook and mlp_kwargs (QINCo) are not options of this module yet
    missing = named(getattr(getattr(vqp, name), method)) - named(getattr(getattr(vqcore, name), method))
    assert missing <= {"implicit_neural_codebook", "mlp_kwargs"}, missing


def test_converter_carries_beam_search_and_quant_grad_frac():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(0)
    ref = vqp.ResidualVQ(
        dim=8,
        num_quantizers=3,
        codebook_size=16,
        beam_size=2,
        eval_beam_size=3,
        beam_score_quantizer_weights=[1.0, 0.5, 2.0],
        quant_grad_frac=0.25,
    ).eval()
    ours = from_reference(ref, allow_training_differences=True)
    assert (ours.beam_size, ours.eval_beam_size) == (2, 3)
    assert ours.beam_score_quantizer_weights == (1.0, 0.5, 2.0) and ours.quant_grad_frac == 0.25
    x = torch.randn(2, 40, 8)
    theirs, mine = ref(x), ours.eval()(x)
    assert torch.equal(theirs[1], mine.indices)  # the reference's beam search finds the same paths
    torch.testing.assert_close(theirs[0], mine.quantized)

    grouped = vqp.GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=8, beam_size=2)
    converted = from_reference(grouped)
    assert all(rvq.beam_size == 2 and rvq.eval_beam_size == 2 for rvq in converted.rvqs)


def test_converter_carries_diveq():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vqcore.compat import from_reference

    torch.manual_seed(0)
    ref = vqp.ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, diveq=True)
    ours = from_reference(ref)
    assert ours.diveq and ours.quant_grad_frac == 1.0
    assert all(layer.codebook_module.trained_by_gradient for layer in ours.layers)
    x = torch.randn(2, 10, 8)
    ref.eval(), ours.eval()
    assert torch.equal(ref.get_output_from_indices(ours.encode(x)), ours.decode(ours.encode(x)))


@pytest.mark.parametrize(
    "options",
    [
        {"sync_update_v": 0.5},
        {"route_gradients_to_input": False},
        {"directional_reparam": True, "threshold_ema_dead_code": 1, "directional_reparam_variance": 0.0},
    ],
    ids=["sync_update_v", "no_route_to_input", "directional_reparam"],
)
def test_layer_output_options_reach_the_layers_as_in_a_vector_quantize(options):
    """A one-layer ResidualVQ with a layer option that changes the output's gradient gives the values and
    gradients of the VectorQuantize with that option (the stack does not fuse such layers)."""
    kwargs = {"learnable_codebook": True, "ema_update": False, **options}
    rvq = ResidualVQ(dim=4, num_quantizers=1, codebook_size=8, **kwargs).train()
    vq = VectorQuantize(dim=4, codebook_size=8, **kwargs).train()
    vq.codebook_module.embed.data.copy_(rvq.layers[0].codebook_module.embed.data)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, idx_r, _ = rvq(xa)
    out_v, idx_v, _ = vq(xb)
    assert torch.equal(idx_r[..., 0], idx_v)
    torch.testing.assert_close(out_r, out_v)
    weights = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1))
    (out_r * weights).sum().backward()
    (out_v * weights).sum().backward()
    torch.testing.assert_close(
        rvq.layers[0].codebook_module.embed.grad, vq.codebook_module.embed.grad, rtol=1e-5, atol=1e-6
    )
    if xa.grad is None:
        assert xb.grad is None
    else:
        torch.testing.assert_close(xa.grad, xb.grad)


def test_a_shared_codebook_follows_the_layers_directional_reparam():
    """DiVeQ in the layers of a shared-codebook stack: the one codebook is gradient-trained (no EMA) and
    its dead-code threshold is the one the DiVeQ check reads."""
    rvq = ResidualVQ(
        dim=8,
        codebook_size=16,
        num_quantizers=2,
        shared_codebook=True,
        directional_reparam=True,
        threshold_ema_dead_code=1,
    )
    book = rvq.layers[0].codebook_module
    assert book is rvq.layers[1].codebook_module
    assert book.trained_by_gradient and not rvq.layers[0].ema_update
    x = torch.randn(2, 5, 8, requires_grad=True)
    out, _, _ = rvq(x)
    out.sum().backward()
    assert book.codes.grad is not None and x.grad is not None
    with pytest.raises(ConfigurationError, match="threshold_ema_dead_code > 0"):
        ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, shared_codebook=True, directional_reparam=True)
