"""ResidualVQ beam search: the search against brute force over every code path and against a plain Python
beam search, per-layer weights, masks, quantize dropout, the training step along the chosen path (EMA by
hand, gradients by an explicit autograd formulation), the option checks, export and save/load."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_exports_with_parity, assert_save_load_equal, snapshot

import vqcore
from vqcore import GroupedResidualVQ, ResidualVQ
from vqcore.blocks.beam import beam_search, nearest_candidates
from vqcore.blocks.estimators import resolve_estimator
from vqcore.errors import ConfigurationError
from vqcore.testing import check_quantizer

# -- references computed the slow, obvious way --------------------------------------------------------


def layer_cost(r, code, cosine):
    """The commitment MSE of one layer in float64: ||r - c||^2 / d (r l2-normalised for cosine layers)."""
    if cosine:
        r = F.normalize(r, dim=-1)
    return float((r - code).pow(2).mean())


def brute_best_path(z, books, weights, cosine=False):
    """The best path of one token z (d,) over every combination of codes, float64: (indices, score)."""
    best, best_score = None, -float("inf")
    for path in itertools.product(*(range(len(book)) for book in books)):
        r, score = z.double(), 0.0
        for q, i in enumerate(path):
            code = books[q][i].double()
            score -= weights[q] * layer_cost(r, code, cosine)
            r = r - code
        if score > best_score:
            best, best_score = path, score
    return list(best), best_score


def python_beam(z, books, weights, beam_size, cosine=False):
    """A plain beam search of one token z (d,), float64: the rule of vqcore.blocks.beam written with lists."""
    beams = [(0.0, [], z.double())]
    for q, book in enumerate(books):
        k = min(beam_size, len(book))
        candidates = []
        for score, path, r in beams:
            costs = sorted((layer_cost(r, book[i].double(), cosine), i) for i in range(len(book)))[:k]
            candidates += [(score - weights[q] * c, [*path, i], r - book[i].double()) for c, i in costs]
        candidates.sort(key=lambda t: -t[0])
        beams = candidates[: 1 if q == len(books) - 1 else beam_size]
    return beams[0][1]


def books_of(rvq):
    return [layer.codebook.detach().clone() for layer in rvq.layers]


def tiny(**kwargs):
    torch.manual_seed(3)
    options = dict(dim=3, num_quantizers=3, codebook_size=4, kmeans_init=False, threshold_ema_dead_code=0)
    return ResidualVQ(**{**options, **kwargs})


# -- the search --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0]])
def test_full_beam_is_the_exact_optimum(cosine, weights):
    # 4 codes, 3 layers: a beam of 4^2 keeps every path until the last layer picks the best
    rvq = tiny(beam_size=16, beam_score_quantizer_weights=weights, use_cosine_sim=cosine).eval()
    x = torch.randn(2, 6, 3)
    indices = rvq.encode(x)
    books, w = books_of(rvq), weights or [1.0, 1.0, 1.0]
    for b, n in itertools.product(range(2), range(6)):
        want, _ = brute_best_path(x[b, n], books, w, cosine)
        assert indices[b, n].tolist() == want


def test_layers_of_different_sizes():
    # 2, 5 and 3 codes: a beam of 10 keeps every path of the first two layers; k is capped per layer
    rvq = tiny(codebook_size=(2, 5, 3), num_quantizers=None, beam_size=10).eval()
    x = torch.randn(2, 4, 3)
    indices = rvq.encode(x)
    books = books_of(rvq)
    for b, n in itertools.product(range(2), range(4)):
        assert indices[b, n].tolist() == brute_best_path(x[b, n], books, [1.0, 1.0, 1.0])[0]
        assert indices[b, n].tolist() == python_beam(x[b, n], books, [1.0, 1.0, 1.0], 10)


@pytest.mark.parametrize("beam_size", [2, 3])
@pytest.mark.parametrize("cosine", [False, True])
def test_beam_follows_the_python_beam_search(beam_size, cosine):
    rvq = tiny(beam_size=beam_size, use_cosine_sim=cosine, beam_score_quantizer_weights=[2.0, 1.0, 0.5])
    x = torch.randn(3, 7, 3)
    indices = rvq.eval().encode(x)
    books = books_of(rvq)
    for b, n in itertools.product(range(3), range(7)):
        assert indices[b, n].tolist() == python_beam(x[b, n], books, [2.0, 1.0, 0.5], beam_size, cosine)


def test_beam_search_lowers_the_error():
    torch.manual_seed(0)
    greedy = ResidualVQ(dim=4, num_quantizers=4, codebook_size=8).eval()
    beam = ResidualVQ(dim=4, num_quantizers=4, codebook_size=8, beam_size=4).eval()
    beam.load_state_dict(greedy.state_dict())
    x = torch.randn(1, 400, 4)
    error_greedy = (greedy(x).quantized - x).pow(2).sum(-1)
    error_beam = (beam(x).quantized - x).pow(2).sum(-1)
    # unit weights: the score is minus the sum of the layers' errors; the final error is the last residual's
    assert (beam(x).indices != greedy(x).indices).any()
    assert error_beam.mean() < error_greedy.mean()


def test_beam_size_one_and_none_are_the_greedy_path_exactly():
    x = torch.randn(2, 9, 3)
    for beam in (1, None):
        greedy, other = tiny(), tiny(beam_size=beam, eval_beam_size=beam)
        torch.manual_seed(1)
        a = greedy.train()(x)
        torch.manual_seed(1)
        b = other.train()(x)
        assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
        assert torch.equal(a.losses, b.losses)
        assert torch.equal(greedy.eval()(x).indices, other.eval()(x).indices)


def test_eval_forward_encode_and_decode_agree():
    rvq = tiny(beam_size=2, eval_beam_size=3).eval()
    x = torch.randn(2, 8, 3)
    out = rvq(x)
    assert torch.equal(rvq.encode(x), out.indices)
    assert torch.equal(rvq.decode(out.indices), out.quantized)  # bit for bit
    assert torch.equal(out.losses, torch.zeros(3))  # eval losses are fresh zeros, as without beams
    # the forward override: beam_size=1 is the greedy chain
    greedy = tiny().eval()
    greedy.load_state_dict(rvq.state_dict())
    assert torch.equal(rvq(x, beam_size=1).indices, greedy(x).indices)
    assert torch.equal(rvq.encode_tokens(x, beam_size=16), tiny(beam_size=16).eval().encode(x))


def test_eval_mask_gives_minus_one_and_leaves_the_rest_alone():
    rvq = tiny(beam_size=3).eval()
    x = torch.randn(2, 6, 3)
    mask = torch.tensor([[True, False, True, True, False, True], [False, True, True, True, True, True]])
    out = rvq(x, mask=mask)
    full = rvq(x)
    assert (out.indices[~mask] == -1).all()
    assert torch.equal(out.indices[mask], full.indices[mask])
    assert torch.equal(out.quantized[~mask], torch.zeros(3, 3))
    assert torch.equal(out.quantized[mask], full.quantized[mask])


def test_block_search_with_a_custom_cost():
    # the search is two functions: here a "layer" whose cost is the L1 distance
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])

    def search(q, residual, condition, k):
        cost = (residual.unsqueeze(1) - codes).abs().sum(-1)
        top = cost.topk(k, -1, largest=False)
        return top.indices, top.values

    def codes_of(q, indices, condition):
        return codes[indices]

    z = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    found = beam_search(z, [3, 3], search, codes_of, 3, [1.0, 1.0])
    # (2, 0): code 1 costs 1, then the residual (1, 0) is code 1 exactly
    assert found.indices[1].tolist() == [1, 1]
    assert torch.equal(found.total, codes[found.indices[:, 0]] + codes[found.indices[:, 1]])
    assert found.score[1].item() == pytest.approx(-1.0)


def test_nearest_candidates_costs():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[0.6, 0.8]])
    idx, cost = nearest_candidates(x, codes, 2, cosine=True)
    assert idx.tolist() == [[1, 0]]
    torch.testing.assert_close(cost, torch.tensor([[(0.36 + 0.04) / 2, (0.16 + 0.64) / 2]]))


# -- training ---------------------------------------------------------------------------------------


def test_training_step_follows_the_chosen_path_by_hand():
    rvq = tiny(beam_size=2, decay=0.6).train()
    x = torch.randn(2, 5, 3)
    books = books_of(rvq)
    before = [
        (layer.codebook_module.cluster_size.clone(), layer.codebook_module.embed_avg.clone())
        for layer in rvq.layers
    ]
    out = rvq(x)
    r = x.reshape(-1, 3)
    for q, layer in enumerate(rvq.layers):
        idx = out.indices.reshape(-1, 3)[:, q]
        counts = torch.bincount(idx, minlength=4).float()
        sums = torch.zeros(4, 3).index_add_(0, idx, r)
        size, avg = before[q]
        torch.testing.assert_close(layer.codebook_module.cluster_size[0], 0.6 * size[0] + 0.4 * counts)
        torch.testing.assert_close(layer.codebook_module.embed_avg[0], 0.6 * avg[0] + 0.4 * sums)
        r = r - books[q][idx]
    # the chosen path is the eval search's on the codebooks before the step
    check = tiny(beam_size=2).eval()
    assert torch.equal(check.encode(x), out.indices)


def test_shared_codebook_takes_one_step_over_every_layer():
    rvq = tiny(beam_size=2, decay=0.6, shared_codebook=True).train()
    x = torch.randn(2, 5, 3)
    book = rvq.layers[0].codebook_module
    codes, size, avg = book.embed[0].clone(), book.cluster_size[0].clone(), book.embed_avg[0].clone()
    out = rvq(x)
    r, counts, sums = x.reshape(-1, 3), torch.zeros(4), torch.zeros(4, 3)
    for q in range(3):
        idx = out.indices.reshape(-1, 3)[:, q]
        counts += torch.bincount(idx, minlength=4).float()
        sums.index_add_(0, idx, r)
        r = r - codes[idx]
    torch.testing.assert_close(book.cluster_size[0], 0.6 * size + 0.4 * counts)  # one decay
    torch.testing.assert_close(book.embed_avg[0], 0.6 * avg + 0.4 * sums)


@pytest.mark.parametrize("estimator", ["straight_through", "rotation_trick"])
@pytest.mark.parametrize("shared", [False, True])
def test_training_values_and_gradients_are_those_of_the_chosen_path(estimator, shared):
    rvq = tiny(beam_size=3, rotation_trick=estimator == "rotation_trick", shared_codebook=shared).train()
    books = books_of(rvq)
    x = torch.randn(2, 5, 3, requires_grad=True)
    out = rvq(x)
    (out.quantized.square().sum() + out.losses.sum()).backward()
    # by hand along the chosen path, with the codebooks before the step
    estimate = resolve_estimator(estimator)
    x2 = x.detach().clone().requires_grad_()
    r, total, losses = x2.reshape(-1, 3), 0.0, []
    for q in range(3):
        code = books[q][out.indices.reshape(-1, 3)[:, q]]
        total = total + estimate(r.unsqueeze(0), code.unsqueeze(0))[0]
        losses.append(F.mse_loss(r, code))
        r = r - code
    total = total.reshape(2, 5, 3)
    torch.testing.assert_close(out.quantized, total, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.losses, torch.stack(losses).detach())
    (total.square().sum() + sum(losses)).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_training_with_masks_and_dropout():
    rvq = tiny(beam_size=16, quantize_dropout=True, decay=0.6).train()
    books = books_of(rvq)
    before = snapshot(rvq)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, True, False, True, False], [True, False, True, True, True]])
    seed = next(s for s in range(100) if random.Random(s).randrange(3) == 1)  # two layers kept
    out = rvq(x, mask=mask, rand_quantize_dropout_fixed_seed=seed)
    assert (out.indices[..., 2] == -1).all() and out.losses[2] == 0
    assert (out.indices[~mask] == -1).all()
    assert torch.equal(out.quantized[~mask], torch.zeros(3, 3))
    # the kept layers hold the exact two-layer optimum (beam 16 keeps every path), last kept layer decides
    for b, n in zip(*mask.nonzero(as_tuple=True)):
        want, _ = brute_best_path(x[b, n], books[:2], [1.0, 1.0])
        assert out.indices[b, n, :2].tolist() == want
    # the third layer never ran: its codebook is as it was
    for key, value in before.items():
        if key.startswith("layers.2."):
            assert torch.equal(rvq.state_dict()[key], value)
    # the losses are the masked means over the valid tokens
    r = x[mask]
    for q in range(2):
        code = books[q][out.indices[mask][:, q]]
        torch.testing.assert_close(out.losses[q], F.mse_loss(r, code))
        r = r - code


# -- options and errors ------------------------------------------------------------------------------


def test_option_errors_name_both_options():
    with pytest.raises(ConfigurationError, match="eval_beam_size=3 needs beam_size"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, eval_beam_size=3)
    with pytest.raises(AssertionError):  # the reference asserts
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, eval_beam_size=3)
    with pytest.raises(ConfigurationError, match=r"one weight per layer \(num_quantizers=2\), got 3"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, beam_score_quantizer_weights=[1, 2, 3])
    with pytest.raises(ConfigurationError, match="beam_size must be None or an int >= 1, got 0"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, beam_size=0)
    with pytest.raises(ConfigurationError, match="beam_size=2 .*stochastic_sample_codes=True"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, beam_size=2, stochastic_sample_codes=True)
    with pytest.raises(ConfigurationError, match="beam_score_quantizer_weights must be a finite number"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, beam_score_quantizer_weights=[1, float("nan")])
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, beam_size=1, eval_beam_size=4)
    assert (rvq.beam_size, rvq.eval_beam_size) == (1, 4)
    assert ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, beam_size=3).eval_beam_size == 3


def test_refused_forward_changes_no_state():
    rvq = tiny(stochastic_sample_codes=True, kmeans_init=True).train()
    before = snapshot(rvq)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="beam_size=2 searches deterministically.*stochastic_sample_codes"):
        rvq(x, beam_size=2)
    with pytest.raises(ValueError, match="beam_size must be None or an int >= 1, got 0"):
        rvq(x, beam_size=0)
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, before[key]), key
    rvq.eval()(x, beam_size=2)  # eval searches deterministically: allowed


# -- contracts: conformance, save/load, export, grouped -------------------------------------------------


def test_conformance_and_save_load(tmp_path):
    options = dict(dim=8, num_quantizers=3, codebook_size=16, beam_size=2, eval_beam_size=3, codebook_dim=4)
    check_quantizer(ResidualVQ, torch.randn(2, 10, 8), **options)
    rvq = ResidualVQ(**options)
    assert_save_load_equal(rvq, torch.randn(2, 10, 8), tmp_path)
    assert vqcore.create("rvq", dim=8, num_quantizers=2, codebook_size=4, beam_size=2).beam_size == 2


def test_beam_search_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, beam_size=2, eval_beam_size=4).eval()
    assert_exports_with_parity(rvq, torch.randn(2, 12, 8), tmp_path)


def test_export_tie_check_judges_paths_by_score():
    rvq = tiny(beam_size=16).eval()
    x = torch.randn(1, 2, 3)
    a = rvq.encode(x)
    b = a.clone()
    b[0, 0] = torch.tensor([(int(a[0, 0, 0]) + 1) % 4, 0, 0])  # a clearly worse path
    ok = rvq.export_tie_check(x.double(), a, b, 1e-6)
    assert not ok[0, 0].any() and ok[0, 1].all()


def test_grouped_beam_search():
    torch.manual_seed(0)
    grouped = GroupedResidualVQ(dim=6, groups=2, num_quantizers=3, codebook_size=4, beam_size=16).eval()
    x = torch.randn(2, 5, 6)
    out = grouped(x)
    assert torch.equal(grouped.encode(x), out.indices)
    assert torch.equal(grouped.decode(out.indices), out.quantized)
    for g, rvq in enumerate(grouped.rvqs):
        books = books_of(rvq)
        want, _ = brute_best_path(x[0, 0, 3 * g : 3 * g + 3], books, [1.0, 1.0, 1.0])
        assert out.indices[g, 0, 0].tolist() == want
