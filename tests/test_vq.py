"""VectorQuantize behaviour: seed README examples, EMA / expiry / k-means state after a step, losses
against hand computations, estimators, masks, layouts and the encode/decode contract, errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_state, assert_same_state, hand_ema, hand_orthogonal, set_ema_state, snapshot
from torch import nn

from vqcore import VectorQuantize

# -- helpers -------------------------------------------------------------------------------------


def unit(rows):
    return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]


# -- seed README examples (only the import changed; losses are 0-dim) -----------------------------


def readme_basic():
    vq = VectorQuantize(
        dim=256,
        codebook_size=512,  # codebook size
        decay=0.8,  # the exponential moving average decay, lower means the dictionary will change faster
        commitment_weight=1.0,  # the weight on the commitment loss
    )
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)  # (1, 1024, 256), (1, 1024), (1)
    return (quantized, indices, commit_loss), ((1, 1024, 256), (1, 1024), ())


def readme_codebook_dim():
    vq = VectorQuantize(
        dim=256,
        codebook_size=256,
        codebook_dim=16,  # paper proposes setting this to 32 or as low as 8 to increase codebook usage
    )
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    # (1, 1024, 256), (1, 1024), (1,)
    return (quantized, indices, commit_loss), ((1, 1024, 256), (1, 1024), ())


def readme_cosine():
    vq = VectorQuantize(
        dim=256,
        codebook_size=256,
        use_cosine_sim=True,  # set this to True
    )
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    # (1, 1024, 256), (1, 1024), (1,)
    return (quantized, indices, commit_loss), ((1, 1024, 256), (1, 1024), ())


def readme_expire():
    vq = VectorQuantize(
        dim=256,
        codebook_size=512,
        # should actively replace any codes that have an exponential moving average cluster size
        # less than 2
        threshold_ema_dead_code=2,
    )
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    # (1, 1024, 256), (1, 1024), (1,)
    return (quantized, indices, commit_loss), ((1, 1024, 256), (1, 1024), ())


def readme_orthogonal():
    vq = VectorQuantize(
        dim=256,
        codebook_size=256,
        accept_image_fmap=True,  # set this true to be able to pass in an image feature map
        orthogonal_reg_weight=10,  # in paper, they recommended a value of 10
        # this would randomly sample from the codebook for the orthogonal regularization loss,
        # for limiting memory usage
        orthogonal_reg_max_codes=128,
        # set this to True if you have a very large codebook, and would only like to enforce the loss
        # on the activated codes per batch
        orthogonal_reg_active_codes_only=False,
    )
    img_fmap = torch.randn(1, 256, 32, 32)
    quantized, indices, loss = vq(img_fmap)  # (1, 256, 32, 32), (1, 32, 32), (1,)
    # loss now contains the orthogonal regularization loss with the weight as assigned
    return (quantized, indices, loss), ((1, 256, 32, 32), (1, 32, 32), ())


def readme_multihead():
    vq = VectorQuantize(
        dim=256,
        codebook_dim=32,  # a number of papers have shown smaller codebook dimension to be acceptable
        heads=8,  # number of heads to vector quantize, codebook shared across all heads
        # whether to have a separate codebook per head. False would mean 1 shared codebook
        separate_codebook_per_head=True,
        codebook_size=8196,
        accept_image_fmap=True,
    )
    img_fmap = torch.randn(1, 256, 32, 32)
    quantized, indices, loss = vq(img_fmap)
    # (1, 256, 32, 32), (1, 32, 32, 8), (1,)
    return (quantized, indices, loss), ((1, 256, 32, 32), (1, 32, 32, 8), ())


@pytest.mark.parametrize(
    "example",
    [readme_basic, readme_codebook_dim, readme_cosine, readme_expire, readme_orthogonal, readme_multihead],
    ids=lambda f: f.__name__,
)
def test_seed_readme_example(example):
    (quantized, indices, loss), shapes = example()
    assert (tuple(quantized.shape), tuple(indices.shape), tuple(loss.shape)) == shapes
    assert quantized.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.isfinite(loss) and loss.item() > 0  # training mode: commitment (+ orthogonal) loss
    size = 8196 if example is readme_multihead else (512 if example in (readme_basic, readme_expire) else 256)
    assert indices.min() >= 0 and indices.max() < size


def test_readme_orthogonal_loss_includes_weighted_term():
    torch.manual_seed(0)
    vq = VectorQuantize(
        dim=16, codebook_size=32, accept_image_fmap=True, orthogonal_reg_weight=10, orthogonal_reg_max_codes=8
    )
    _, _, loss, parts = vq(torch.randn(1, 16, 4, 4), return_loss_breakdown=True)
    torch.testing.assert_close(loss, parts.commitment + 10 * parts.orthogonal_reg)
    assert parts.orthogonal_reg.item() > 0


# -- EMA update against a hand computation ------------------------------------------------------


def test_ema_step_matches_hand_computation_and_output_uses_old_codebook():
    decay, eps = 0.8, 1e-5
    vq = VectorQuantize(dim=2, codebook_size=3, decay=decay, eps=eps)
    embed = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]
    cs = [1.0, 2.0, 3.0]
    ea = [[0.5, 0.5], [3.0, 0.0], [0.0, 5.0]]
    set_ema_state(vq.codebook_module, embed, cs, ea)
    x = torch.tensor([[[0.1, 0.2], [1.9, 0.1], [2.2, -0.1], [0.2, 1.8]]])
    quantized, indices, loss = vq(x)

    assert indices.tolist() == [[0, 1, 1, 2]]
    # output and commitment loss use the codebook before this step's update
    old = torch.tensor(embed)[indices[0]]
    assert torch.equal(quantized[0], old)
    xs = x[0].tolist()
    want_loss = sum((xs[t][j] - old[t, j].item()) ** 2 for t in range(4) for j in range(2)) / 8
    torch.testing.assert_close(loss, torch.tensor(want_loss))

    counts = [1, 2, 1]
    sums = [xs[0], [xs[1][0] + xs[2][0], xs[1][1] + xs[2][1]], xs[3]]
    cs2, ea2, emb2 = hand_ema(cs, ea, counts, sums, decay, eps)
    book = vq.codebook_module
    torch.testing.assert_close(book.cluster_size[0], torch.tensor(cs2))
    torch.testing.assert_close(book.embed_avg[0], torch.tensor(ea2))
    torch.testing.assert_close(vq.codebook, torch.tensor(emb2))
    # the numbers, written out: cluster_size = 0.8 cs + 0.2 counts
    torch.testing.assert_close(book.cluster_size[0], torch.tensor([1.0, 2.0, 2.6]))
    # a second step starts from the updated codebook
    q2, idx2, _ = vq(x)
    torch.testing.assert_close(q2[0], torch.tensor(emb2)[idx2[0]])


def test_ema_step_cosine_renormalises():
    decay, eps = 0.5, 1e-5
    vq = VectorQuantize(dim=2, codebook_size=3, decay=decay, eps=eps, use_cosine_sim=True)
    s = math.sqrt(0.5)
    embed = [[1.0, 0.0], [0.0, 1.0], [s, s]]
    cs = [2.0, 1.0, 1.0]
    ea = [[2.0, 0.0], [0.0, 1.0], [s, s]]
    set_ema_state(vq.codebook_module, embed, cs, ea)
    raw = [[3.0, 0.3], [0.2, 2.0], [1.0, 0.9], [4.5, -0.5]]
    x = torch.tensor([raw])
    quantized, indices, loss = vq(x)
    assert indices.tolist() == [[0, 1, 2, 0]]
    # output: the old unit codes; loss in codebook space (normalised input vs old code)
    xn = unit(raw)
    assert torch.equal(quantized[0], torch.tensor(embed)[indices[0]])
    want = sum((xn[t][j] - embed[i][j]) ** 2 for t, i in enumerate([0, 1, 2, 0]) for j in range(2)) / 8
    torch.testing.assert_close(loss, torch.tensor(want))
    counts = [2, 1, 1]
    sums = [[xn[0][0] + xn[3][0], xn[0][1] + xn[3][1]], xn[1], xn[2]]
    cs2, ea2, emb2 = hand_ema(cs, ea, counts, sums, decay, eps, cosine=True)
    torch.testing.assert_close(vq.codebook_module.cluster_size[0], torch.tensor(cs2))
    torch.testing.assert_close(vq.codebook_module.embed_avg[0], torch.tensor(ea2))
    torch.testing.assert_close(vq.codebook, torch.tensor(emb2))
    torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(3))


def test_ema_step_separate_heads_use_their_own_chunks():
    vq = VectorQuantize(dim=4, codebook_size=2, heads=2, separate_codebook_per_head=True, decay=0.5)
    embed = [[[0.0, 0.0], [5.0, 5.0]], [[1.0, 0.0], [0.0, 1.0]]]
    cs = [[1.0, 1.0], [1.0, 1.0]]
    set_ema_state(vq.codebook_module, embed, cs, embed)
    x = torch.tensor([[[0.1, 0.1, 0.9, 0.1], [4.0, 4.0, 0.2, 0.8]]])
    _, indices, _ = vq(x)
    assert indices.shape == (1, 2, 2) and indices.tolist() == [[[0, 0], [1, 1]]]
    for h in range(2):
        chunk = x[0, :, 2 * h : 2 * h + 2].tolist()
        sums = [chunk[0], chunk[1]]
        cs2, ea2, emb2 = hand_ema(cs[h], embed[h], [1, 1], sums, 0.5, vq.codebook_module.eps)
        torch.testing.assert_close(vq.codebook[h], torch.tensor(emb2))
        torch.testing.assert_close(vq.codebook_module.embed_avg[h], torch.tensor(ea2))


# -- dead-code expiry ----------------------------------------------------------------------------


def test_dead_codes_replaced_by_batch_vectors_live_codes_follow_ema():
    embed = [[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]
    cs = [5.0, 1.0, 5.0, 1.0]
    ea = [[e * c for e in row] for row, c in zip(embed, cs)]
    vq = VectorQuantize(dim=2, codebook_size=4, decay=0.8, threshold_ema_dead_code=1.5)
    set_ema_state(vq.codebook_module, embed, cs, ea)
    twin = VectorQuantize(dim=2, codebook_size=4, decay=0.8)  # EMA only
    set_ema_state(twin.codebook_module, embed, cs, ea)
    x = torch.tensor([[[0.1, 0.2], [0.3, -0.1], [-0.2, 0.1], [-9.0, 9.5], [-10.5, 10.2], [-9.8, 9.9]]])
    q, idx, _ = vq(x)
    twin(x)
    assert idx.tolist() == [[0, 0, 0, 2, 2, 2]]
    assert torch.equal(q[0], torch.tensor(embed)[idx[0]]), "output uses the codes before expiry"
    book = vq.codebook_module
    # after EMA: cluster_size = [4.6, 0.8, 4.6, 0.8] -> codes 1 and 3 are below 1.5
    rows = {tuple(r) for r in x[0].tolist()}
    new = [tuple(book.embed[0, k].tolist()) for k in (1, 3)]
    assert all(r in rows for r in new) and new[0] != new[1]
    for k in (1, 3):
        assert book.cluster_size[0, k].item() == 1.5
        assert torch.equal(book.embed_avg[0, k], book.embed[0, k] * 1.5)
    for k in (0, 2):
        assert torch.equal(book.embed[0, k], twin.codebook_module.embed[0, k])
        assert torch.equal(book.embed_avg[0, k], twin.codebook_module.embed_avg[0, k])
        assert torch.equal(book.cluster_size[0, k], twin.codebook_module.cluster_size[0, k])
    torch.testing.assert_close(book.cluster_size[0, [0, 2]], torch.tensor([4.6, 4.6]))


@pytest.mark.parametrize("cosine", [False, True])
def test_dead_code_replacements_are_codebook_space_inputs(cosine):
    torch.manual_seed(0)
    vq = VectorQuantize(
        dim=6, codebook_size=5, codebook_dim=3, threshold_ema_dead_code=100.0, use_cosine_sim=cosine
    )
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        z = vq.project_in(x).reshape(-1, 3)
        if cosine:
            z = F.normalize(z, dim=-1)
    vq(x)
    book = vq.codebook_module
    # every code is dead (threshold 100): each is now one of the 8 projected (normalised) tokens
    dist = torch.cdist(book.embed[0], z, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(1).values.max() < 1e-6
    assert len(set(dist.argmin(1).tolist())) == 5, "drawn without replacement"
    assert torch.equal(book.cluster_size, torch.full((1, 5), 100.0))
    torch.testing.assert_close(book.embed_avg, book.embed * 100.0)


def test_dead_codes_per_head_replaced_from_that_heads_chunks():
    vq = VectorQuantize(
        dim=4, codebook_size=3, heads=2, separate_codebook_per_head=True, threshold_ema_dead_code=2.0
    )
    set_ema_state(vq.codebook_module, torch.randn(2, 3, 2), [[10.0] * 3, [0.5] * 3], torch.randn(2, 3, 2))
    before = snapshot(vq)
    x = torch.randn(1, 6, 4)
    vq(x)
    book = vq.codebook_module
    # head 0: 0.8 * 10 + 0.2 count >= 8, nothing dead; head 1: 0.8 * 0.5 + 0.2 count <= 1.6 < 2, all dead
    assert not torch.isin(book.embed[0], x[0, :, :2]).all(-1).any()
    head1 = {tuple(r) for r in x[0, :, 2:].tolist()}
    replaced = book.cluster_size[1] == 2.0
    assert replaced.all()
    assert all(tuple(r) in head1 for r in book.embed[1].tolist())
    assert not torch.equal(book.embed[0], before["_codebook.embed"][0])  # EMA still ran on head 0


# -- k-means init --------------------------------------------------------------------------------


def test_kmeans_init_fewer_points_than_codes():
    vq = VectorQuantize(dim=8, codebook_size=64, kmeans_init=True)
    x = torch.randn(1, 20, 8)
    quantized, indices, _ = vq(x)
    assert bool(vq.codebook_module.initted)
    codes = vq.codebook
    assert torch.isfinite(codes).all()
    assert codes.norm(dim=-1).min() > 0.05, "no zero-vector codes"
    assert torch.pdist(codes).min() > 0, "all codes distinct"
    # every point quantizes to its own code (k-means from a batch smaller than the codebook)
    assert len(set(indices[0].tolist())) == 20
    torch.testing.assert_close(quantized, x, atol=1e-4, rtol=0)
    for name in ("cluster_size", "embed_avg"):
        assert torch.isfinite(getattr(vq.codebook_module, name)).all()


def test_kmeans_init_recovers_planted_blobs():
    centres = torch.tensor([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 8.0]])
    label = torch.arange(4).repeat_interleave(30)
    x = (centres[label] + 0.2 * torch.randn(120, 3)).unsqueeze(0)
    vq = VectorQuantize(dim=3, codebook_size=4, kmeans_init=True, kmeans_iters=10)
    _, indices, _ = vq(x)
    dist = torch.cdist(centres, vq.codebook)
    assert dist.min(1).values.max() < 0.2
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3]
    # each blob maps to exactly one code
    for b in range(4):
        assert len(set(indices[0, label == b].tolist())) == 1
    assert len(set(indices[0].tolist())) == 4


def test_kmeans_does_not_run_in_eval_and_runs_once(monkeypatch):
    import vqcore.blocks.codebooks as codebook_module

    calls = []
    original = codebook_module.kmeans

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(codebook_module, "kmeans", counting)
    vq = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True)
    # before k-means the codebook holds random codes, never zeros
    assert vq.codebook.norm(dim=-1).min() > 0
    before = snapshot(vq)
    vq.eval()
    x = torch.randn(2, 10, 4)
    vq(x)
    vq.encode(x)
    assert not bool(vq.codebook_module.initted) and calls == []
    assert_same_state(vq, before)
    vq.train()
    vq.encode(x)  # encode never initialises, even in train mode
    assert calls == []
    vq(x)
    assert bool(vq.codebook_module.initted) and len(calls) == 1
    vq(torch.randn(2, 10, 4))
    vq(torch.randn(2, 10, 4))
    assert len(calls) == 1


def test_codebook_setter_counts_as_initialised():
    vq = VectorQuantize(dim=2, codebook_size=3, kmeans_init=True, decay=0.5)
    codes = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    vq.codebook = codes
    assert bool(vq.codebook_module.initted)
    assert torch.equal(vq.codebook, codes)
    assert torch.equal(
        vq.codebook_module.embed_avg[0], codes * vq.codebook_module.cluster_size[0].unsqueeze(-1)
    )
    q, idx, _ = vq(torch.tensor([[[0.1, 0.1], [3.9, 0.2], [0.2, 4.1]]]))
    assert idx.tolist() == [[0, 1, 2]], "k-means did not overwrite the user's codebook"
    assert torch.equal(q[0], codes)


# -- orthogonal regulariser ----------------------------------------------------------------------

ORTHO_CODES = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.5, -1.0, 2.0], [-1.0, 0.0, 0.3]]


def _ortho_vq(**kwargs):
    vq = VectorQuantize(dim=3, codebook_size=5, orthogonal_reg_weight=2.0, decay=0.5, **kwargs)
    vq.codebook = torch.tensor(ORTHO_CODES)
    return vq


def test_orthogonal_loss_value_on_pre_update_codebook_and_gradient():
    vq = _ortho_vq()
    assert isinstance(vq.codebook_module.embed, nn.Parameter)
    x = torch.tensor([[[0.9, 0.1, 0.0], [0.1, 1.9, 0.9], [1.0, 1.1, 0.1]]])
    _, _, loss, parts = vq(x, return_loss_breakdown=True)
    assert not torch.allclose(vq.codebook, torch.tensor(ORTHO_CODES)), "EMA ran"
    torch.testing.assert_close(parts.orthogonal_reg, torch.tensor(hand_orthogonal(ORTHO_CODES)))
    torch.testing.assert_close(loss, parts.commitment + 2.0 * parts.orthogonal_reg)
    # the codebook receives the gradient of 2 * L_orth evaluated at the pre-update codes
    loss.backward()
    ref = torch.tensor(ORTHO_CODES, dtype=torch.float64, requires_grad=True)
    normed = F.normalize(ref, dim=-1)
    (2.0 * ((normed @ normed.T).pow(2).sum() / 25 - 1 / 5)).backward()
    torch.testing.assert_close(vq.codebook_module.embed.grad[0], ref.grad.float())


def test_orthogonal_loss_active_codes_only():
    vq = _ortho_vq(orthogonal_reg_active_codes_only=True)
    x = torch.tensor([[[0.9, 0.1, 0.0], [0.9, 1.0, 0.0], [1.0, 0.05, 0.0]]])
    _, indices, loss, parts = vq(x, return_loss_breakdown=True)
    used = sorted(set(indices[0].tolist()))
    assert used == [0, 1]  # two codes at 45 degrees: a loss with a gradient (orthogonal ones have none)
    torch.testing.assert_close(
        parts.orthogonal_reg, torch.tensor(hand_orthogonal([ORTHO_CODES[i] for i in used]))
    )
    loss.backward()
    grad = vq.codebook_module.embed.grad[0]
    assert (grad[[2, 3, 4]] == 0).all() and (grad[[0, 1]] != 0).any()


def test_orthogonal_loss_max_codes_subsamples():
    subsets = {
        round(hand_orthogonal([ORTHO_CODES[i] for i in pair]), 5)
        for pair in itertools.combinations(range(5), 2)
    }
    seen = set()
    x = torch.randn(1, 6, 3)
    for seed in range(8):
        torch.manual_seed(seed)
        vq = _ortho_vq(orthogonal_reg_max_codes=2)
        _, _, _, parts = vq(x, return_loss_breakdown=True)
        value = round(parts.orthogonal_reg.item(), 5)
        assert value in subsets
        seen.add(value)
    assert len(seen) > 1, "a random subset each call"
    # max_codes >= codebook size: no subsampling
    vq = _ortho_vq(orthogonal_reg_max_codes=5)
    _, _, _, parts = vq(x, return_loss_breakdown=True)
    torch.testing.assert_close(parts.orthogonal_reg, torch.tensor(hand_orthogonal(ORTHO_CODES)))


def test_losses_are_fresh_zeros_in_eval():
    vq = _ortho_vq()
    vq(torch.randn(1, 4, 3))  # a training step first
    vq.eval()
    _, _, loss, parts = vq(torch.randn(1, 4, 3), return_loss_breakdown=True)
    assert loss.shape == () and loss.item() == 0.0 and not loss.requires_grad
    assert parts.commitment.item() == 0.0 and parts.orthogonal_reg.item() == 0.0


def test_commitment_loss_in_codebook_space_with_projection():
    vq = VectorQuantize(dim=6, codebook_size=4, codebook_dim=2, commitment_weight=0.5, freeze_codebook=True)
    x = torch.randn(2, 3, 6)
    q, idx, loss, parts = vq(x, return_loss_breakdown=True)
    with torch.no_grad():
        z = vq.project_in(x)
        codes = vq.codebook[idx]
    torch.testing.assert_close(parts.commitment, (z - codes).pow(2).mean())
    torch.testing.assert_close(loss, 0.5 * parts.commitment)
    torch.testing.assert_close(q, vq.project_out(codes))


# -- estimators ----------------------------------------------------------------------------------


def _rotation_matrix(x, q):
    u, v = x / x.norm(), q / q.norm()
    w = (u + v) / (u + v).norm()
    return (q.norm() / x.norm()) * (torch.eye(len(x)) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u))


def test_ste_is_default_rotation_trick_same_forward_different_gradient():
    assert VectorQuantize(dim=3, codebook_size=4).estimator.name == "straight_through"
    ste = VectorQuantize(dim=3, codebook_size=4, commitment_weight=0.0, freeze_codebook=True)
    rot = VectorQuantize(
        dim=3, codebook_size=4, commitment_weight=0.0, rotation_trick=True, freeze_codebook=True
    )
    rot.load_state_dict(ste.state_dict())
    x = torch.randn(1, 2, 3)
    g = torch.randn(1, 2, 3)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    q1, i1, _ = ste(x1)
    q2, i2, _ = rot(x2)
    assert torch.equal(q1, q2) and torch.equal(i1, i2)
    q1.backward(g)
    q2.backward(g)
    assert torch.equal(x1.grad, g), "STE: identity gradient"
    codes = q1.detach()[0]
    want = torch.stack([_rotation_matrix(x[0, t], codes[t]).T @ g[0, t] for t in range(2)])
    torch.testing.assert_close(x2.grad[0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x2.grad, g)
    # the explicit d x d Jacobian of the output w.r.t. the input is lambda * R
    jac = torch.autograd.functional.jacobian(lambda z: rot(z.reshape(1, 1, 3))[0].reshape(3), x[0, 0])
    torch.testing.assert_close(jac, _rotation_matrix(x[0, 0], codes[0]), rtol=1e-5, atol=1e-5)


# -- masks ---------------------------------------------------------------------------------------

MASK_CONFIGS = {
    "plain": dict(dim=4, codebook_size=6),
    "projection": dict(dim=6, codebook_dim=3, codebook_size=6),
    "heads_shared": dict(dim=4, heads=2, codebook_size=6),
    "heads_separate": dict(dim=4, heads=2, separate_codebook_per_head=True, codebook_size=6),
    "cosine": dict(dim=4, codebook_size=6, use_cosine_sim=True),
    "everything": dict(
        dim=6,
        codebook_dim=2,
        heads=2,
        separate_codebook_per_head=True,
        use_cosine_sim=True,
        codebook_size=6,
        threshold_ema_dead_code=0.9,
        rotation_trick=True,
    ),
}
LENGTHS = [5, 2, 4]


def _padded_batch(dim, garbage=100.0):
    n = max(LENGTHS)
    mask = torch.arange(n) < torch.tensor(LENGTHS).unsqueeze(1)
    x = torch.randn(len(LENGTHS), n, dim)
    x = torch.where(mask.unsqueeze(-1), x, garbage * torch.randn_like(x))
    x[1, 4, 0] = float("nan")  # padding may hold anything
    return x, mask


@pytest.mark.parametrize("name", list(MASK_CONFIGS))
def test_masked_batch_equals_unpadded(name):
    cfg = MASK_CONFIGS[name]
    vq = VectorQuantize(**cfg)
    ref = copy.deepcopy(vq)
    x, mask = _padded_batch(cfg["dim"])
    xp = x.clone().requires_grad_()
    torch.manual_seed(1)
    q, idx, loss = vq(xp, mask=mask)
    torch.manual_seed(1)
    q_ref, idx_ref, loss_ref = ref(x[mask].unsqueeze(0))

    assert_close_state(vq, ref)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(q[mask], q_ref[0])
    assert torch.equal(idx[mask], idx_ref[0])
    assert (idx[~mask] == -1).all()
    assert (q[~mask] == 0).all()
    # padded positions get no gradient (neither through the output nor the loss)
    (q.sum() + loss).backward()
    assert (xp.grad[~mask] == 0).all() and torch.isfinite(xp.grad).all()
    for pname, param in vq.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), pname

    # eval: same indices / outputs on valid positions, -1 and zeros elsewhere
    vq.eval(), ref.eval()
    q, idx, loss = vq(x, mask=mask)
    q_ref, idx_ref, _ = ref(x[mask].unsqueeze(0))
    assert torch.equal(idx[mask], idx_ref[0]) and (idx[~mask] == -1).all()
    torch.testing.assert_close(q[mask], q_ref[0])
    assert (q[~mask] == 0).all() and loss.item() == 0


@pytest.mark.parametrize("name", ["plain", "projection", "heads_separate"])
def test_masked_padding_returns_input_when_asked(name):
    vq = VectorQuantize(**MASK_CONFIGS[name], return_zeros_for_masked_padding=False)
    x, mask = _padded_batch(MASK_CONFIGS[name]["dim"])
    for training in (True, False):
        vq.train(training)
        q, idx, _ = vq(x, mask=mask)
        torch.testing.assert_close(q[~mask], x[~mask], rtol=0, atol=0, equal_nan=True)
        assert (idx[~mask] == -1).all()


def test_lens_is_the_same_as_the_mask():
    vq = VectorQuantize(dim=4, codebook_size=6, heads=2, threshold_ema_dead_code=0.9)
    twin = copy.deepcopy(vq)
    x, mask = _padded_batch(4)
    torch.manual_seed(3)
    a = vq(x, mask=mask)
    torch.manual_seed(3)
    b = twin(x, lens=torch.tensor(LENGTHS))
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized, b.quantized)
    assert torch.equal(a.loss, b.loss)
    assert_same_state(twin, snapshot(vq))


def test_image_mask_shaped_like_indices_equals_unmasked_tokens():
    vq = VectorQuantize(dim=4, codebook_size=5, accept_image_fmap=True, heads=2)
    seq = VectorQuantize(dim=4, codebook_size=5, heads=2)
    seq.load_state_dict(vq.state_dict())
    x = torch.randn(2, 4, 3, 3)
    mask = torch.rand(2, 3, 3) > 0.4
    q, idx, loss = vq(x, mask=mask)
    assert idx.shape == (2, 3, 3, 2)
    tokens = x.permute(0, 2, 3, 1)[mask].unsqueeze(0)
    q_ref, idx_ref, loss_ref = seq(tokens)
    assert torch.equal(idx[mask], idx_ref[0]) and (idx[~mask] == -1).all()
    torch.testing.assert_close(q.permute(0, 2, 3, 1)[mask], q_ref[0])
    assert (q.permute(0, 2, 3, 1)[~mask] == 0).all()
    torch.testing.assert_close(loss, loss_ref)
    assert_close_state(vq, seq)


# -- encode / decode / eval forward ------------------------------------------------------------

LAYOUTS = {
    "sequence": (dict(dim=8, codebook_size=16), (2, 5, 8), (2, 5)),
    "single_token": (dict(dim=8, codebook_size=16), (3, 8), (3,)),
    "single_token_heads": (dict(dim=8, codebook_size=16, heads=4), (3, 8), (3, 4)),
    "channel_first": (dict(dim=8, codebook_size=16, channel_last=False), (2, 8, 5), (2, 5)),
    "image": (dict(dim=8, codebook_size=16, accept_image_fmap=True), (2, 8, 3, 4), (2, 3, 4)),
    "video": (dict(dim=8, codebook_size=16, accept_3d_fmap=True), (2, 8, 2, 3, 2), (2, 2, 3, 2)),
    "heads_shared": (dict(dim=8, codebook_size=16, heads=2), (2, 5, 8), (2, 5, 2)),
    "heads_separate_image": (
        dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, accept_image_fmap=True),
        (2, 8, 3, 4),
        (2, 3, 4, 2),
    ),
    "cosine_video": (
        dict(dim=8, codebook_size=16, use_cosine_sim=True, accept_3d_fmap=True),
        (1, 8, 2, 2, 3),
        (1, 2, 2, 3),
    ),
    "projection_heads": (dict(dim=8, codebook_size=16, codebook_dim=3, heads=2), (2, 5, 8), (2, 5, 2)),
    "projection_channel_first_cosine": (
        dict(dim=8, codebook_size=16, codebook_dim=4, channel_last=False, use_cosine_sim=True),
        (2, 8, 5),
        (2, 5),
    ),
    "projection_separate_video": (
        dict(
            dim=8,
            codebook_size=16,
            codebook_dim=3,
            heads=3,
            separate_codebook_per_head=True,
            accept_3d_fmap=True,
        ),
        (1, 8, 2, 2, 2),
        (1, 2, 2, 2, 3),
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_decode_encode_equals_eval_forward_and_touches_no_state(name):
    cfg, shape, index_shape = LAYOUTS[name]
    vq = VectorQuantize(**cfg)
    for _ in range(2):  # move the codebook away from its init
        vq(torch.randn(shape))
    x = torch.randn(shape)
    before = snapshot(vq)
    # encode/decode never touch state, whatever the mode
    idx_train = vq.encode(x)
    vq.decode(idx_train)
    assert_same_state(vq, before)

    vq.eval()
    idx = vq.encode(x)
    out = vq(x)
    assert idx.shape == index_shape and idx.dtype == torch.int64
    assert torch.equal(idx, idx_train)
    assert torch.equal(out.indices, idx)
    assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
    assert torch.equal(vq.decode(idx), out.quantized)
    assert torch.equal(vq.get_output_from_indices(idx), out.quantized)
    assert out.loss.shape == () and out.loss.item() == 0
    assert_same_state(vq, before)


@pytest.mark.parametrize(
    "name", ["sequence", "heads_shared", "heads_separate_image", "projection_heads", "single_token_heads"]
)
def test_get_codes_from_indices_are_codebook_vectors(name):
    cfg, shape, index_shape = LAYOUTS[name]
    vq = VectorQuantize(**cfg).eval()
    x = torch.randn(shape)
    idx = vq.encode(x)
    codes = vq.get_codes_from_indices(idx)
    heads, cd = vq.heads, vq.codebook_dim
    channel_first = vq.layout.channel_first
    tokens = codes.movedim(1, -1) if channel_first else codes
    assert tokens.shape == (*index_shape[: idx.ndim - (1 if heads > 1 else 0)], heads * cd)
    flat_idx = idx.reshape(-1, heads)
    flat_codes = tokens.reshape(-1, heads, cd)
    for h in range(heads):
        book = vq.codebook[h] if vq.separate_codebook_per_head else vq.codebook
        assert torch.equal(flat_codes[:, h], book[flat_idx[:, h]])
    # the output is project_out(codes), in the input layout
    with torch.no_grad():
        out = vq.project_out(tokens)
    out = out.movedim(-1, 1) if channel_first else out
    torch.testing.assert_close(vq.get_output_from_indices(idx), out)


def test_decode_minus_one_is_zero():
    vq = VectorQuantize(dim=4, codebook_size=3, codebook_dim=2).eval()
    out = vq.decode(torch.tensor([[-1, 2]]))
    assert (out[0, 0] == 0).all() and (out[0, 1] != 0).any()
    codes = vq.get_codes_from_indices(torch.tensor([[-1, 2]]))
    assert (codes[0, 0] == 0).all() and torch.equal(codes[0, 1], vq.codebook[2])


# -- state_dict ----------------------------------------------------------------------------------


def test_state_dict_round_trip():
    cfg = dict(
        dim=8,
        codebook_size=12,
        codebook_dim=3,
        heads=2,
        separate_codebook_per_head=True,
        kmeans_init=True,
        threshold_ema_dead_code=0.5,
        use_cosine_sim=True,
    )
    vq = VectorQuantize(**cfg)
    for _ in range(3):
        vq(torch.randn(2, 6, 8))
    sd = vq.state_dict()
    for key in ("_codebook.embed", "_codebook.cluster_size", "_codebook.embed_avg", "_codebook.initted"):
        assert key in sd
    assert sd["_codebook.embed"].shape == (2, 12, 3) and sd["_codebook.cluster_size"].shape == (2, 12)
    torch.manual_seed(123)
    fresh = VectorQuantize(**cfg)
    fresh.load_state_dict(sd)
    assert bool(fresh.codebook_module.initted)
    x = torch.randn(3, 7, 8)
    vq.eval(), fresh.eval()
    a, b = vq(x), fresh(x)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    # training continues identically (no second k-means in the reloaded module)
    vq.train(), fresh.train()
    torch.manual_seed(5)
    vq(x)
    torch.manual_seed(5)
    fresh(x)
    assert_same_state(fresh, snapshot(vq))


# -- stochastic sampling -------------------------------------------------------------------------


def _stochastic(temp):
    vq = VectorQuantize(
        dim=4, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=temp, freeze_codebook=True
    )
    return vq


def test_stochastic_temperature_zero_is_nearest_and_eval_is_deterministic():
    vq = _stochastic(0.0)
    x = torch.randn(2, 50, 4)
    nearest = vq.encode(x)
    assert torch.equal(vq(x).indices, nearest)
    hot = _stochastic(5.0)
    hot.load_state_dict(vq.state_dict())
    assert torch.equal(hot(x, sample_codebook_temp=0.0).indices, nearest)  # per-call override
    hot.eval()
    assert torch.equal(hot(x).indices, nearest) and torch.equal(hot(x).indices, nearest)


def test_stochastic_low_temperature_mostly_nearest_high_temperature_samples():
    vq = _stochastic(1e-3)
    x = torch.randn(2, 200, 4)
    nearest = vq.encode(x)
    assert (vq(x).indices == nearest).float().mean() > 0.97
    assert (vq(x, sample_codebook_temp=100.0).indices != nearest).float().mean() > 0.5


# -- freezing and grad mode ----------------------------------------------------------------------


def test_freeze_codebook_constructor_and_forward_argument():
    x = torch.randn(2, 8, 4)
    frozen = VectorQuantize(dim=4, codebook_size=6, freeze_codebook=True, threshold_ema_dead_code=5.0)
    before = snapshot(frozen)
    _, _, loss = frozen(x)
    assert loss.item() > 0
    assert_same_state(frozen, before)
    frozen(x, freeze_codebook=False)  # the forward argument overrides the constructor
    assert not torch.equal(frozen.codebook_module.cluster_size, before["_codebook.cluster_size"])

    live = VectorQuantize(dim=4, codebook_size=6)
    before = snapshot(live)
    live(x, freeze_codebook=True)
    assert_same_state(live, before)
    no_ema = VectorQuantize(dim=4, codebook_size=6, ema_update=False)
    before = snapshot(no_ema)
    no_ema(x)
    assert_same_state(no_ema, before)


def test_training_under_no_grad_still_updates_ema():
    vq = VectorQuantize(dim=4, codebook_size=6, codebook_dim=2)
    twin = copy.deepcopy(vq)
    before = snapshot(vq)
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        vq(x)
    twin(x)
    assert not torch.equal(vq.codebook_module.cluster_size, before["_codebook.cluster_size"])
    assert_same_state(vq, snapshot(twin))


@pytest.mark.parametrize(
    "cfg", [dict(), dict(codebook_dim=2), dict(codebook_dim=2, orthogonal_reg_weight=1.0)]
)
def test_low_precision_input_keeps_float32_statistics(cfg):
    x = torch.randn(2, 5, 4).to(torch.bfloat16)
    vq = VectorQuantize(dim=4, codebook_size=6, **cfg)
    q, idx, loss = vq(x)  # a float32 module fed bf16
    assert q.dtype == torch.bfloat16 and idx.dtype == torch.int64
    # .half() casts the projections, never the codebook state (statistics stay float32)
    half = VectorQuantize(dim=4, codebook_size=6, **cfg).half()
    for name in ("embed", "cluster_size", "embed_avg"):
        assert getattr(half.codebook_module, name).dtype == torch.float32
    if half.has_projections:
        assert half.project_in.weight.dtype == torch.float16
    xh = x.half()
    q, idx, loss = half(xh)
    assert q.dtype == torch.float16 and torch.isfinite(loss)
    for name in ("embed", "cluster_size", "embed_avg"):
        assert getattr(half.codebook_module, name).dtype == torch.float32
    half.eval()
    out = half(xh)
    # decode cannot know the caller's dtype: it returns the projection's dtype (float32 codes without one)
    assert torch.equal(half.decode(half.encode(xh)).to(out.quantized.dtype), out.quantized)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(dim=10, codebook_size=4, heads=3), ValueError, r"dim \(10\) must be divisible by heads \(3\)"),
        (dict(dim=8, codebook_size=0), ValueError, "codebook_size must be >= 1, got 0"),
        (dict(dim=8, codebook_size=-3), ValueError, "codebook_size must be >= 1, got -3"),
        (dict(dim=8, codebook_size=2.5), TypeError, "codebook_size must be an int"),
        (dict(dim=8, codebook_size=4, heads=0), ValueError, "heads must be >= 1"),
        (
            dict(dim=8, codebook_size=4, accept_image_fmap=True, accept_3d_fmap=True),
            ValueError,
            "cannot both be True",
        ),
        (
            dict(
                dim=8,
                codebook_size=4,
                heads=2,
                separate_codebook_per_head=True,
                orthogonal_reg_active_codes_only=True,
            ),
            ValueError,
            "orthogonal_reg_active_codes_only is not supported with separate_codebook_per_head",
        ),
        (dict(dim=8, codebook_size=4, decay=1.5), ValueError, "decay must be in"),
        (
            dict(dim=8, codebook_size=4, sample_codebook_temp=-1.0),
            ValueError,
            "sample_codebook_temp must be >= 0",
        ),
        (
            dict(dim=8, codebook_size=4, accept_image_fmap=True, channel_last=False),
            ValueError,
            "channel_last=False",
        ),
        (
            dict(dim=8, codebook_size=4, orthogonal_reg_max_codes=0),
            ValueError,
            "orthogonal_reg_max_codes must be >= 1",
        ),
    ],
)
def test_constructor_rejects_bad_options(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        VectorQuantize(**kwargs)


def test_codebook_dim_makes_any_heads_count_valid():
    vq = VectorQuantize(dim=10, codebook_size=4, heads=3, codebook_dim=2)
    q, idx, _ = vq(torch.randn(1, 2, 10))
    assert q.shape == (1, 2, 10) and idx.shape == (1, 2, 3)


SEQ = dict(dim=8, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=1.0)
BAD_FORWARDS = {
    "feature_dim": (
        SEQ,
        lambda: (torch.randn(2, 5, 7),),
        {},
        ValueError,
        r"must have 8 features on its last axis.*\(2, 5, 7\)",
    ),
    "rank": (SEQ, lambda: (torch.randn(2, 5, 8, 1),), {}, ValueError, r"\(batch, seq, dim\).*\(2, 5, 8, 1\)"),
    "rank_image": (
        dict(SEQ, accept_image_fmap=True),
        lambda: (torch.randn(2, 8, 5),),
        {},
        ValueError,
        r"\(batch, dim, height, width\)",
    ),
    "rank_video": (
        dict(SEQ, accept_3d_fmap=True),
        lambda: (torch.randn(2, 8, 3, 4),),
        {},
        ValueError,
        r"\(batch, dim, time, height, width\)",
    ),
    "channel_first_dim": (
        dict(SEQ, channel_last=False),
        lambda: (torch.randn(2, 5, 8),),
        {},
        ValueError,
        "second \\(channel-first\\) axis",
    ),
    "integer_input": (
        SEQ,
        lambda: (torch.randint(0, 3, (2, 5, 8)),),
        {},
        TypeError,
        "floating point tensor, got dtype torch.int64",
    ),
    "not_a_tensor": (SEQ, lambda: ([[0.0] * 8],), {}, TypeError, "must be a torch.Tensor, got list"),
    "mask_shape": (
        SEQ,
        lambda: (torch.randn(2, 5, 8),),
        dict(mask=torch.ones(2, 4, dtype=torch.bool)),
        ValueError,
        r"mask must have shape \(2, 5\).*\(2, 4\)",
    ),
    "mask_dtype": (
        SEQ,
        lambda: (torch.randn(2, 5, 8),),
        dict(mask=torch.ones(2, 5)),
        TypeError,
        "mask must be a bool tensor, got dtype torch.float32",
    ),
    "mask_and_lens": (
        SEQ,
        lambda: (torch.randn(2, 5, 8),),
        dict(mask=torch.ones(2, 5, dtype=torch.bool), lens=torch.tensor([5, 5])),
        ValueError,
        "either mask or lens",
    ),
    "lens_shape": (
        SEQ,
        lambda: (torch.randn(2, 5, 8),),
        dict(lens=torch.tensor([5, 5, 5])),
        ValueError,
        r"lens must be an integer tensor of shape \(2,\)",
    ),
    "lens_image": (
        dict(SEQ, accept_image_fmap=True),
        lambda: (torch.randn(2, 8, 3, 3),),
        dict(lens=torch.tensor([3, 3])),
        ValueError,
        "lens is for",
    ),
    "image_mask_shape": (
        dict(SEQ, accept_image_fmap=True),
        lambda: (torch.randn(2, 8, 3, 3),),
        dict(mask=torch.ones(2, 9, dtype=torch.bool)),
        ValueError,
        r"mask must have shape \(2, 3, 3\)",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FORWARDS))
def test_bad_forward_raises_and_leaves_state_unchanged(name):
    cfg, args, kwargs, exc, msg = BAD_FORWARDS[name]
    vq = VectorQuantize(**cfg)
    before = snapshot(vq)
    with pytest.raises(exc, match=msg):
        vq(*args(), **kwargs)
    assert_same_state(vq, before)
    if not kwargs:  # encode validates the input the same way
        with pytest.raises(exc, match=msg):
            vq.encode(*args())
        assert_same_state(vq, before)
    assert not bool(vq.codebook_module.initted)


BAD_DECODES = {
    "too_large": (
        dict(dim=8, codebook_size=16),
        torch.tensor([[0, 16]]),
        ValueError,
        r"indices must be in \[0, 16\).*\[0, 16\]",
    ),
    "negative": (
        dict(dim=8, codebook_size=16),
        torch.tensor([[-2, 3]]),
        ValueError,
        r"-1 \(dropped\); got values in \[-2, 3\]",
    ),
    "float": (
        dict(dim=8, codebook_size=16),
        torch.tensor([[1.0, 2.0]]),
        TypeError,
        "indices must be an integer tensor, got dtype torch.float32",
    ),
    "bool": (dict(dim=8, codebook_size=16), torch.tensor([[True]]), TypeError, "integer tensor"),
    "rank": (
        dict(dim=8, codebook_size=16),
        torch.zeros(2, 3, 4, dtype=torch.long),
        ValueError,
        r"indices must have 2 or 1 dims.*\(2, 3, 4\)",
    ),
    "image_rank": (
        dict(dim=8, codebook_size=16, accept_image_fmap=True),
        torch.zeros(2, 3, dtype=torch.long),
        ValueError,
        r"indices must have 3 dims",
    ),
    "heads_axis": (
        dict(dim=8, codebook_size=16, heads=2),
        torch.zeros(2, 5, 3, dtype=torch.long),
        ValueError,
        r"heads",
    ),
    "heads_missing": (
        dict(dim=8, codebook_size=16, heads=2),
        torch.zeros(2, 5, dtype=torch.long),
        ValueError,
        r"heads",
    ),
}


@pytest.mark.parametrize("name", list(BAD_DECODES))
def test_bad_decode_indices(name):
    cfg, indices, exc, msg = BAD_DECODES[name]
    vq = VectorQuantize(**cfg).eval()
    before = snapshot(vq)
    with pytest.raises(exc, match=msg):
        vq.decode(indices)
    with pytest.raises(exc, match=msg):
        vq.get_codes_from_indices(indices)
    assert_same_state(vq, before)


def test_codebook_setter_checks_shape():
    vq = VectorQuantize(dim=4, codebook_size=3)
    with pytest.raises(ValueError, match=r"codebook must have shape \(3, 4\), got \(3, 5\)"):
        vq.codebook = torch.zeros(3, 5)


# -- gradient-trained codebooks (learnable_codebook) ---------------------------------------------------


def test_learnable_codebook_gets_the_codebook_loss_gradient_and_no_ema_step():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=6, learnable_codebook=True, commitment_weight=0.5)
    book = vq.codebook_module
    assert isinstance(book.embed, nn.Parameter) and book.trained_by_gradient and not book.ema
    x = torch.randn(2, 5, 4, requires_grad=True)
    before = snapshot(vq)
    _, indices, loss = vq(x)
    assert_same_state(vq, before)  # no EMA step, no statistics (expiry is off)
    loss.backward()
    # loss = 0.5 * mean_{n,j} (x_nj - c_{i(n) j})^2 over N * d entries;
    # d/dc_k = -(1/(N d)) sum_{i(n)=k} (x_n - c_k)
    flat, idx = x.detach().reshape(-1, 4), indices.reshape(-1)
    codes = book.embed.detach()[0]
    want = torch.zeros(6, 4)
    for n in range(flat.shape[0]):
        want[idx[n]] -= (flat[n] - codes[idx[n]]) / flat.numel()
    torch.testing.assert_close(book.embed.grad[0], want)
    # the encoder's side of the same term: +(1/(N d)) (x_n - c_i(n)), plus 1 per element for quantized.sum()
    torch.testing.assert_close(x.grad.reshape(-1, 4), (flat - codes[idx]) / flat.numel())


def test_learnable_codebook_trains_by_gradient_and_freezes_on_request():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=4, learnable_codebook=True)
    centres = torch.randn(4, 8) * 3
    data = (centres[torch.randint(4, (512,))] + 0.1 * torch.randn(512, 8)).unsqueeze(0)
    optimizer = torch.optim.Adam(vq.parameters(), lr=0.1)

    def error():
        with torch.no_grad():
            return (vq.eval()(data).quantized - data).pow(2).mean().item()

    start = error()
    for _ in range(60):
        vq.train()
        _, _, loss = vq(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert error() < 0.25 * start
    # freeze_codebook: the commitment term is the encoder's only (no path to the codes)
    vq.train()
    _, _, loss = vq(data, freeze_codebook=True)
    assert loss.item() > 0 and not loss.requires_grad
    _, _, loss = vq(data.requires_grad_())
    (grad,) = torch.autograd.grad(loss, vq.codebook_module.embed)
    assert grad.abs().sum() > 0


def test_learnable_codebook_expiry_counts_usage_without_ema():
    torch.manual_seed(0)
    vq = VectorQuantize(
        dim=4, codebook_size=8, learnable_codebook=True, threshold_ema_dead_code=0.5, decay=0.5
    )
    book = vq.codebook_module
    embed_avg = book.embed_avg.clone()
    x = torch.randn(1, 64, 4) * 0.01  # tiny inputs: a few codes take everything, the others go unused
    _, indices, _ = vq(x)
    counts = torch.bincount(indices.reshape(-1), minlength=8).float()
    sizes = torch.ones(8).lerp(counts, 0.5)  # usage EMA from the initial 1.0, decay 0.5
    dead = sizes < 0.5
    assert torch.equal(book.embed_avg[0, ~dead], embed_avg[0, ~dead])  # no EMA of the codes themselves
    assert torch.allclose(book.cluster_size[0, ~dead], sizes[~dead])
    # with codes that go unused for two steps their usage falls to 0.25 and they are replaced from the batch
    before = book.embed.detach().clone()
    _, indices, _ = vq(x)
    counts2 = torch.bincount(indices.reshape(-1), minlength=8).float()
    sizes2 = sizes.lerp(counts2, 0.5)
    dead2 = sizes2 < 0.5
    assert dead2.any()
    replaced = book.embed.detach()[0, dead2]
    assert all((replaced[i] == x[0]).all(-1).any() for i in range(replaced.shape[0]))  # batch vectors
    assert torch.equal(book.embed.detach()[0, ~dead2], before[0, ~dead2])
    assert torch.allclose(book.cluster_size[0, dead2], torch.full((int(dead2.sum()),), 0.5))


def test_learnable_codebook_invalid_combinations():
    with pytest.raises(ValueError, match="cannot also take EMA steps"):
        VectorQuantize(dim=4, codebook_size=6, learnable_codebook=True, ema_update=True)
    with pytest.raises(ValueError, match="not supported with use_cosine_sim"):
        VectorQuantize(dim=4, codebook_size=6, learnable_codebook=True, use_cosine_sim=True)


# -- per-code EMA weights and accumulated EMA steps -----------------------------------------------------


def test_ema_update_weight_scales_each_codes_step_and_zero_freezes():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=6, decay=0.8, threshold_ema_dead_code=5.0)
    book = vq.codebook_module
    x = torch.randn(2, 30, 4)
    before = snapshot(vq)
    indices = book.nearest(x.reshape(1, -1, 4))
    counts = torch.bincount(indices.reshape(-1), minlength=6).float()
    weight = torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    vq(x, ema_update_weight=weight)
    step = 0.2 * weight
    want_sizes = before["_codebook.cluster_size"][0].lerp(counts, step)
    # codes below the threshold (5.0) are replaced (their size becomes the threshold), but code 0, frozen by
    # its zero weight, is protected from expiry: it stays exactly as it was although its size (1.0) is below
    expired = (want_sizes < 5.0) & (weight > 0)
    assert expired.any()
    for name in ("embed", "embed_avg", "cluster_size"):
        assert torch.equal(getattr(book, name)[0, 0], before[f"_codebook.{name}"][0, 0]), name
    torch.testing.assert_close(book.cluster_size[0, ~expired], want_sizes[~expired])
    assert torch.equal(book.cluster_size[0, expired], torch.full((int(expired.sum()),), 5.0))

    with pytest.raises(ValueError, match=r"ema_update_weight must have shape"):
        vq(x, ema_update_weight=torch.ones(5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        vq(x, ema_update_weight=-torch.ones(6))


def test_ema_update_weight_callable_sees_the_batch_statistics():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=16)
    x = torch.randn(1, 6, 4)  # fewer tokens than codes: most codes go unused
    before = snapshot(vq)
    seen = {}

    def only_used_codes(sums, counts):
        seen["shapes"] = (tuple(sums.shape), tuple(counts.shape))
        return (counts > 0).float()  # unused codes keep their statistics instead of decaying

    _, indices, _ = vq(x, ema_update_weight=only_used_codes)
    assert seen["shapes"] == ((1, 16, 4), (1, 16))
    unused = torch.bincount(indices.reshape(-1), minlength=16) == 0
    assert unused.sum() >= 10
    for name in ("cluster_size", "embed_avg", "embed"):
        assert torch.equal(
            getattr(vq.codebook_module, name)[0, unused], before[f"_codebook.{name}"][0, unused]
        )
        assert not torch.equal(
            getattr(vq.codebook_module, name)[0, ~unused], before[f"_codebook.{name}"][0, ~unused]
        )


def test_accum_ema_update_takes_one_step_for_all_micro_batches():
    torch.manual_seed(0)
    parts = [torch.randn(2, 10, 4) for _ in range(3)]
    expiring = VectorQuantize(dim=4, codebook_size=8, threshold_ema_dead_code=100.0)
    before = snapshot(expiring)
    expiring(parts[0], accum_ema_update=True)
    assert_same_state(expiring, before)  # only pending statistics: no step, and no expiry either
    vq = VectorQuantize(dim=4, codebook_size=8, decay=0.7)
    twin = copy.deepcopy(vq)
    vq(parts[0], accum_ema_update=True)
    vq(parts[1], accum_ema_update=True)
    vq(parts[2])
    twin(torch.cat(parts, 1))  # the same tokens in one batch: one step
    for name, t in snapshot(twin).items():
        torch.testing.assert_close(snapshot(vq)[name], t, msg=name)
    assert not vq.codebook_module.pending_counts.any()  # folded in and cleared
