"""ResidualVQ and GroupedResidualVQ: seed examples, the residual chain and shared-codebook EMA against
hand computations, quantize dropout, masks, layouts, the encode/decode contract, conformance, errors."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers import brute_nearest, snapshot

import vqcore
from vqcore import GroupedResidualVQ, ResidualVQ
from vqcore.book_layout import BookAxis, BookLayout
from vqcore.module import QuantizerModule
from vqcore.testing import check_quantizer

# -- helpers -------------------------------------------------------------------------------------


def hand_chain(rvq, tokens, books=None):
    """Greedy residual chain by hand on tokens (N, dim): returns indices (N, Q), codes list,
    residuals list.
    """
    books = books or [layer.codebook.detach().clone() for layer in rvq.layers]
    with torch.no_grad():
        r = rvq.project_in(tokens).float()
    idx, codes, residuals = [], [], []
    for layer, book in zip(rvq.layers, books):
        residuals.append(r)
        i = brute_nearest(r, book, cosine=layer.use_cosine_sim)
        c = book[i]
        idx.append(i)
        codes.append(c)
        r = r - c
    return torch.stack(idx, -1), codes, residuals


# -- seed README examples (only the import changed; losses (Q,) and (G, Q)) ------------------------


def test_seed_examples():
    torch.manual_seed(0)
    residual_vq = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = residual_vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, 1024, 256), (1, 1024, 8), (8,))
    quantized, indices, commit_loss, all_codes = residual_vq(x, return_all_codes=True)
    assert all_codes.shape == (8, 1, 1024, 256)

    residual_vq = ResidualVQ(
        dim=256,
        num_quantizers=8,
        codebook_size=1024,
        stochastic_sample_codes=True,
        sample_codebook_temp=0.1,
        shared_codebook=True,
    )
    quantized, indices, commit_loss = residual_vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, 1024, 256), (1, 1024, 8), (8,))

    residual_vq = GroupedResidualVQ(dim=256, num_quantizers=8, groups=2, codebook_size=1024)
    quantized, indices, commit_loss = residual_vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, 1024, 256), (2, 1, 1024, 8), (2, 8))

    residual_vq = ResidualVQ(dim=256, codebook_size=256, num_quantizers=4, kmeans_init=True, kmeans_iters=10)
    quantized, indices, commit_loss = residual_vq(x)
    assert (quantized.shape, indices.shape, commit_loss.shape) == ((1, 1024, 256), (1, 1024, 4), (4,))
    assert all(bool(layer.codebook_module.initted) for layer in residual_vq.layers)


# -- the residual chain ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(codebook_dim=6, use_cosine_sim=True),
        dict(codebook_size=(3, 8, 5)),
    ],
)
def test_residual_chain_eval_equals_hand_computation(cfg):
    torch.manual_seed(1)
    kwargs = dict(dim=12, num_quantizers=3, codebook_size=8) | cfg
    if isinstance(kwargs["codebook_size"], tuple):
        kwargs.pop("num_quantizers")
    rvq = ResidualVQ(**kwargs).eval()
    x = torch.randn(2, 10, 12)
    quantized, indices, losses = rvq(x)
    idx, codes, _ = hand_chain(rvq, x.reshape(-1, 12))
    assert torch.equal(indices.reshape(-1, 3), idx)
    with torch.no_grad():
        want = rvq.project_out(sum(codes)).reshape(2, 10, 12)
    torch.testing.assert_close(quantized, want)
    assert torch.equal(losses, torch.zeros(3))


def test_residual_chain_training_each_layer_quantizes_previous_residual():
    torch.manual_seed(2)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=6, decay=0.5, commitment_weight=0.25).train()
    books = [layer.codebook.detach().clone() for layer in rvq.layers]  # codes are chosen before each EMA step
    x = torch.randn(1, 20, 8, requires_grad=True)
    quantized, indices, losses, all_codes = rvq(x, return_all_codes=True)
    idx, codes, residuals = hand_chain(rvq, x.detach().reshape(-1, 8), books)
    assert torch.equal(indices.reshape(-1, 3), idx)
    torch.testing.assert_close(quantized.detach().reshape(-1, 8), sum(codes))  # output = sum of layer outputs
    for q in range(3):
        torch.testing.assert_close(all_codes[q].detach().reshape(-1, 8), codes[q])
        torch.testing.assert_close(losses[q], 0.25 * (residuals[q] - codes[q]).pow(2).mean())
    # each (non-shared) layer took one EMA step on its own residual
    for q, layer in enumerate(rvq.layers):
        assert not torch.equal(layer.codebook, books[q])
    # straight-through through a detached chain: d(sum quantized)/dx = Q for every element (plus the losses)
    quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_ema_steps_match_a_single_vq_on_the_same_residual():
    torch.manual_seed(3)
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=5, decay=0.7).train()
    before = copy.deepcopy(rvq)
    x = torch.randn(1, 30, 4)
    rvq(x)
    _, _, residuals = hand_chain(before, x.reshape(-1, 4))
    for q in range(2):
        layer = before.layers[q]
        layer(residuals[q].reshape(1, -1, 4))  # the same VectorQuantize step, by itself
        torch.testing.assert_close(rvq.layers[q].codebook_module.embed, layer.codebook_module.embed)
        torch.testing.assert_close(
            rvq.layers[q].codebook_module.cluster_size, layer.codebook_module.cluster_size
        )


# -- shared codebook -----------------------------------------------------------------------------


def test_shared_codebook_is_one_object_given_to_every_layer(tmp_path):
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16, shared_codebook=True)
    book = rvq.layers[0].codebook_module
    assert all(layer.codebook_module is book for layer in rvq.layers)
    assert len(list(rvq.parameters())) == 0 and len({id(t) for t in rvq.buffers()}) == 4  # registered once
    state = rvq.state_dict()  # as vector-quantize-pytorch: under every layer, the same tensors
    names = ("embed", "cluster_size", "embed_avg", "initted")
    assert sorted(state) == sorted(f"layers.{q}._codebook.{k}" for q in range(4) for k in names)
    embed = state["layers.0._codebook.embed"]
    assert all(state[f"layers.{q}._codebook.embed"].data_ptr() == embed.data_ptr() for q in range(4))
    assert torch.equal(rvq.codebooks[0], rvq.codebooks[3])
    clone = copy.deepcopy(rvq)
    assert all(layer.codebook_module is clone.layers[0].codebook_module for layer in clone.layers)
    # vqcore.save stores the shared tensors once; load rebuilds the sharing
    path = tmp_path / "rvq.safetensors"
    vqcore.save(vqcore.create("rvq", dim=8, num_quantizers=4, codebook_size=16, shared_codebook=True), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert len([k for k in f.keys() if k.endswith("embed")]) == 1
    loaded = vqcore.load(path)
    assert all(layer.codebook_module is loaded.layers[0].codebook_module for layer in loaded.layers)


def test_shared_codebook_loads_checkpoints_that_hold_it_once():
    """State dicts written before the codebook object was passed to every layer hold it once, as
    ``_shared_codebook.*``."""
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True)
    old = {
        f"_shared_codebook.{k[len('layers.0._codebook.') :]}": v.clone() + 1
        for k, v in rvq.state_dict().items()
        if k.startswith("layers.0.")
    }
    fresh = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.layers[2].codebook_module.embed, old["_shared_codebook.embed"])


@pytest.mark.parametrize("masked", [False, True])
def test_shared_codebook_ema_decay_applied_once(masked):
    torch.manual_seed(4)
    decay, eps, k, d, q = 0.6, 1e-5, 5, 3, 3
    rvq = ResidualVQ(
        dim=d, num_quantizers=q, codebook_size=k, shared_codebook=True, decay=decay, eps=eps
    ).train()
    book = rvq.layers[0].codebook_module
    cs, ea = book.cluster_size[0].clone(), book.embed_avg[0].clone()
    codes = book.embed[0].clone()
    x = torch.randn(1, 12, d)
    mask = torch.ones(1, 12, dtype=torch.bool)
    if masked:
        mask[0, 7:] = False
        x[0, 9] = float("nan")  # padding can hold anything
    rvq(x, mask=mask)
    valid = mask.reshape(-1)
    idx, _, residuals = hand_chain(rvq, x.reshape(-1, d).nan_to_num(), [codes] * q)
    counts, sums = torch.zeros(k), torch.zeros(k, d)
    for layer in range(q):
        for t in range(12):
            if valid[t]:
                counts[idx[t, layer]] += 1
                sums[idx[t, layer]] += residuals[layer][t]
    cs_want = decay * cs + (1 - decay) * counts  # decay once, with every layer's statistics
    ea_want = decay * ea + (1 - decay) * sums
    n = cs_want.sum()
    embed_want = ea_want / ((cs_want + eps) / (n + k * eps) * n).unsqueeze(-1)
    torch.testing.assert_close(book.cluster_size[0], cs_want)
    torch.testing.assert_close(book.embed_avg[0], ea_want)
    torch.testing.assert_close(book.embed[0], embed_want)
    # the reference's behaviour (one decay per layer) would give something else
    twice = decay * cs_want + (1 - decay) * counts
    assert not torch.allclose(book.cluster_size[0], twice)


# -- quantize dropout ----------------------------------------------------------------------------


def test_quantize_dropout_cutoff_and_multiple_of_over_many_draws():
    torch.manual_seed(5)
    rvq = ResidualVQ(
        dim=6,
        num_quantizers=6,
        codebook_size=8,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=2,
        quantize_dropout_multiple_of=2,
        commitment_weight=1.0,
    ).train()
    x = torch.randn(2, 5, 6)
    seen = set()
    for seed in range(60):
        _, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed)
        dropped = (indices == -1).all(0).all(0)
        kept = int((~dropped).sum())
        assert torch.equal(dropped, torch.arange(6) >= kept), "dropped layers are exactly the last ones"
        assert not (indices[..., :kept] == -1).any()
        assert torch.equal(losses[kept:], torch.zeros(6 - kept))
        assert (losses[:kept] > 0).all()
        seen.add(kept)
    assert seen == {4, 6}  # last in [2, 5] -> kept in {3..6}, rounded up to a multiple of 2
    # the draw follows the seed
    assert rvq.kept_layers(7) == rvq.kept_layers(7)


def test_quantize_dropout_only_in_training_and_coarse_indices_decode():
    torch.manual_seed(6)
    rvq = ResidualVQ(dim=6, num_quantizers=5, codebook_size=8, codebook_dim=4, quantize_dropout=True)
    x = torch.randn(2, 7, 6)
    rvq.train()
    seed = next(s for s in range(100) if rvq.kept_layers(s) < 5)
    kept = rvq.kept_layers(seed)
    _, indices, _ = rvq(x, rand_quantize_dropout_fixed_seed=seed)
    assert (indices[..., kept:] == -1).all()
    rvq.eval()
    coarse = rvq.decode(indices)
    assert torch.equal(coarse, rvq.decode(indices[..., :kept]))  # fewer trailing entries == dropped layers
    with torch.no_grad():
        want = rvq.project_out(sum(rvq.layers[q].codebook[indices[..., q]] for q in range(kept)))
    torch.testing.assert_close(coarse, want)
    codes = rvq.get_codes_from_indices(indices[..., :kept])
    assert codes.shape == (5, 2, 7, 4) and (codes[kept:] == 0).all()
    _, eval_indices, _ = rvq(x)
    assert (eval_indices >= 0).all()  # eval forwards never drop


def test_grouped_dropout_drawn_once_for_all_groups():
    torch.manual_seed(7)
    g = GroupedResidualVQ(dim=8, groups=4, num_quantizers=4, codebook_size=4, quantize_dropout=True).train()
    x = torch.randn(1, 3, 8)
    for seed in range(10):
        _, indices, losses = g(x, rand_quantize_dropout_fixed_seed=seed)
        pattern = indices == -1
        assert all(torch.equal(pattern[0], pattern[i]) for i in range(4))
        assert all(torch.equal(losses[0] == 0, losses[i] == 0) for i in range(4))


# -- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_mask_gives_minus_one_zero_output_and_no_ema_from_padding(shared):
    torch.manual_seed(8)
    rvq = ResidualVQ(dim=6, num_quantizers=3, codebook_size=8, shared_codebook=shared, decay=0.5).train()
    ref = copy.deepcopy(rvq)
    x = torch.randn(1, 9, 6)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    padded = x.clone()
    padded[0, 6:] = float("nan")
    quantized, indices, _ = rvq(padded, mask=mask)
    q_ref, i_ref, _ = ref(x[:, :6])
    assert (indices[0, 6:] == -1).all() and torch.equal(indices[:, :6], i_ref)
    assert torch.equal(quantized[0, 6:], torch.zeros(3, 6))
    torch.testing.assert_close(quantized[:, :6], q_ref)
    a, b = rvq.state_dict(), ref.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    rvq.eval()
    q_eval, i_eval, _ = rvq(padded, mask=mask)
    assert torch.equal(q_eval, rvq.decode(i_eval)) and torch.equal(q_eval[0, 6:], torch.zeros(3, 6))


# -- encode / decode contract --------------------------------------------------------------------

CONFIGS = {
    "plain": (dict(dim=16, num_quantizers=3, codebook_size=8), (2, 10, 16)),
    "projection": (dict(dim=16, num_quantizers=3, codebook_size=8, codebook_dim=5), (2, 10, 16)),
    "cosine": (dict(dim=16, num_quantizers=3, codebook_size=8, use_cosine_sim=True), (2, 10, 16)),
    "shared": (dict(dim=16, num_quantizers=4, codebook_size=8, shared_codebook=True), (2, 10, 16)),
    "per_layer_sizes": (dict(dim=16, codebook_size=[5, 16, 7]), (2, 10, 16)),
    "learnable": (
        dict(dim=16, num_quantizers=3, codebook_size=8, learnable_codebook=True, shared_codebook=True),
        (2, 10, 16),
    ),
    "image": (
        dict(dim=16, num_quantizers=3, codebook_size=8, accept_image_fmap=True, codebook_dim=6),
        (2, 16, 3, 4),
    ),
    "image_cosine_shared": (
        dict(
            dim=16,
            num_quantizers=3,
            codebook_size=8,
            accept_image_fmap=True,
            use_cosine_sim=True,
            shared_codebook=True,
        ),
        (2, 16, 3, 4),
    ),
    "video": (dict(dim=8, num_quantizers=2, codebook_size=8, accept_3d_fmap=True), (2, 8, 2, 3, 2)),
    "channel_first": (dict(dim=8, num_quantizers=2, codebook_size=8, channel_last=False), (2, 8, 5)),
    "rotation_stochastic": (
        dict(dim=8, num_quantizers=2, codebook_size=8, rotation_trick=True, stochastic_sample_codes=True),
        (2, 5, 8),
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_encode_equals_eval_forward(name):
    kwargs, shape = CONFIGS[name]
    torch.manual_seed(9)
    rvq = ResidualVQ(**kwargs)
    x = torch.randn(*shape)
    rvq.train()
    rvq(x)
    rvq(x)
    rvq.eval()
    state = snapshot(rvq)
    with torch.no_grad():
        quantized, indices, losses, all_codes = rvq(x, return_all_codes=True)
        encoded = rvq.encode(x)
        decoded = rvq.decode(encoded)
    q = rvq.num_quantizers
    positions = shape[2:] if rvq.layout.channel_first else shape[1:-1]
    assert indices.shape == (shape[0], *positions, q) and indices.dtype == torch.int64
    assert torch.equal(encoded, indices) and torch.equal(decoded, quantized)
    assert torch.equal(rvq.get_output_from_indices(indices), quantized)
    assert all_codes.shape == (q, shape[0], *positions, rvq.codebook_dim)
    assert torch.equal(all_codes, rvq.get_codes_from_indices(indices))
    assert torch.equal(losses, torch.zeros(q))
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize(
    "name", ["plain", "image_cosine_shared", "per_layer_sizes", "projection", "learnable"]
)
def test_check_quantizer(name):
    kwargs, shape = CONFIGS[name]
    check_quantizer(ResidualVQ, torch.randn(*shape), **kwargs)


def test_image_fmap_indices_layout_matches_tokens():
    torch.manual_seed(10)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, accept_image_fmap=True).eval()
    seq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=8)
    seq.load_state_dict(rvq.state_dict())
    seq.eval()
    x = torch.randn(2, 8, 3, 5)
    quantized, indices, _ = rvq(x)
    tokens = x.flatten(2).transpose(1, 2)
    q_seq, i_seq, _ = seq(tokens)
    assert indices.shape == (2, 3, 5, 2)
    assert torch.equal(indices.reshape(2, 15, 2), i_seq)
    assert torch.equal(quantized, q_seq.transpose(1, 2).reshape(2, 8, 3, 5))


def test_registry_and_save_load(tmp_path):
    rvq = vqcore.create(
        "rvq", dim=8, num_quantizers=2, codebook_size=[4, 8], codebook_dim=4, shared_codebook=False
    )
    rvq.train()
    x = torch.randn(2, 5, 8)
    rvq(x)
    vqcore.save(rvq, tmp_path / "rvq.safetensors")
    loaded = vqcore.load(tmp_path / "rvq.safetensors").eval()
    rvq.eval()
    assert torch.equal(loaded(x)[0], rvq(x)[0])
    g = vqcore.create("grouped_rvq", dim=8, groups=2, num_quantizers=2, codebook_size=4, shared_codebook=True)
    vqcore.save(g, tmp_path / "g.safetensors")
    g2 = vqcore.load(tmp_path / "g.safetensors").eval()
    assert torch.equal(g2.encode(x), g.eval().encode(x))


def test_training_state_untouched_by_eval_and_kmeans_only_in_training():
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, kmeans_init=True).eval()
    x = torch.randn(2, 6, 8)
    rvq(x)
    assert not any(bool(layer.codebook_module.initted) for layer in rvq.layers)
    rvq.train()
    rvq(x)
    assert all(bool(layer.codebook_module.initted) for layer in rvq.layers)


# -- grouped -------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", [False, True])
def test_grouped_groups_are_independent_rvqs_and_decode(image):
    torch.manual_seed(11)
    g = GroupedResidualVQ(dim=12, groups=3, num_quantizers=2, codebook_size=8, accept_image_fmap=image)
    x = torch.randn(2, 12, 2, 3) if image else torch.randn(2, 5, 12)
    g.train()
    g(x)
    g.eval()
    quantized, indices, losses, codes = g(x, return_all_codes=True)
    positions = (2, 3) if image else (5,)
    assert indices.shape == (3, 2, *positions, 2) and losses.shape == (3, 2)
    assert isinstance(codes, tuple) and len(codes) == 3 and codes[0].shape == (2, 2, *positions, 4)
    assert torch.equal(g.encode(x), indices) and torch.equal(g.decode(indices), quantized)
    assert torch.equal(g.get_codes_from_indices(indices), torch.stack(codes))
    chunks = x.chunk(3, dim=1 if image else -1)
    for i, rvq in enumerate(g.rvqs):
        tokens = chunks[i].flatten(2).transpose(1, 2) if image else chunks[i]
        q_i, idx_i, _ = rvq(tokens)
        assert torch.equal(idx_i.reshape(indices[i].shape), indices[i])
    assert torch.equal(
        g.decode(indices[..., :1]),
        g.decode(torch.cat([indices[..., :1], -torch.ones_like(indices[..., 1:])], -1)),
    )


class BatchFirstGrouped(QuantizerModule):
    """GroupedResidualVQ with indices moved to (b, n, groups, Q), so check_quantizer's batch-first
    rules apply.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.inner = GroupedResidualVQ(**kwargs)
        self.dim, self.codebook_size, self.num_codebooks = (
            self.inner.dim,
            self.inner.codebook_size,
            self.inner.num_codebooks,
        )

    def forward(self, x):
        out = self.inner(x)
        return out.quantized, out.indices.movedim(0, -2), out.losses

    def encode(self, x):
        return self.inner.encode(x).movedim(0, -2)

    def decode(self, indices):
        return self.inner.decode(indices.movedim(-2, 0))

    def book_layout(self):
        inner = self.inner.book_layout()  # (groups, b, ..., Q) -> (b, ..., groups, Q)
        axes = (BookAxis("group", -2, self.inner.groups), BookAxis("layer", -1, self.inner.num_quantizers))
        return BookLayout(axes, inner.sizes, "layer")


def test_check_quantizer_grouped_through_batch_first_adapter():
    check_quantizer(
        BatchFirstGrouped,
        torch.randn(2, 6, 16),
        dim=16,
        groups=2,
        num_quantizers=2,
        codebook_size=8,
        codebook_dim=4,
    )


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(dim=8, num_quantizers=2, codebook_size=[4, 4, 4]), ValueError, "3 per-layer sizes"),
        (dict(dim=8, codebook_size=4), TypeError, "num_quantizers is required"),
        (
            dict(
                dim=8,
                num_quantizers=3,
                codebook_size=4,
                quantize_dropout=True,
                quantize_dropout_cutoff_index=3,
            ),
            ValueError,
            r"quantize_dropout_cutoff_index must be in \[0, 3\)",
        ),
        (
            dict(dim=8, num_quantizers=3, codebook_size=4, quantize_dropout_cutoff_index=-1),
            ValueError,
            "cutoff_index",
        ),
        (
            dict(dim=8, num_quantizers=3, codebook_size=4, quantize_dropout_multiple_of=0),
            ValueError,
            "multiple_of",
        ),
        (
            dict(dim=8, codebook_size=[4, 8], shared_codebook=True),
            ValueError,
            "shared_codebook needs one codebook size",
        ),
        (dict(dim=8, num_quantizers=2, codebook_size=4, heads=2), ValueError, "heads must be 1"),
    ],
)
def test_constructor_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        ResidualVQ(**kwargs)


def test_grouped_constructor_and_decode_errors():
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by groups \(3\)"):
        GroupedResidualVQ(dim=10, groups=3, num_quantizers=2, codebook_size=4)
    g = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=4)
    with pytest.raises(ValueError, match="groups axis first with 2 entries"):
        g.decode(torch.zeros(3, 1, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="quantizer axis of 1..2 entries"):
        g.decode(torch.zeros(2, 1, 5, 3, dtype=torch.long))


def test_decode_errors():
    rvq = ResidualVQ(dim=8, codebook_size=[4, 6])
    with pytest.raises(ValueError, match=r"quantizer axis of 1..2 entries \(num_quantizers=2\)"):
        rvq.decode(torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices\[..., 0\] must be in \[0, 4\)"):
        rvq.decode(torch.tensor([[[4, 0]]]))
    assert rvq.decode(torch.tensor([[[3, 5]]])).shape == (1, 1, 8)
    with pytest.raises(TypeError, match="integer tensor"):
        rvq.decode(torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match="must have 8 features"):
        rvq(torch.randn(1, 5, 7))


def test_random_draws_use_private_rng():
    rvq = ResidualVQ(dim=4, num_quantizers=4, codebook_size=4, quantize_dropout=True)
    random.seed(0)
    state = random.getstate()
    rvq.train()(torch.randn(1, 3, 4))
    assert random.getstate() == state


def test_masked_padding_can_pass_through_and_codes_of_padding_are_zero():
    torch.manual_seed(12)
    rvq = ResidualVQ(dim=6, num_quantizers=2, codebook_size=4, return_zeros_for_masked_padding=False)
    x = torch.randn(1, 5, 6)
    mask = torch.tensor([[True, True, False, True, False]])
    for mode in (rvq.train, rvq.eval):
        mode()
        quantized, indices, _, codes = rvq(x, mask=mask, return_all_codes=True)
        assert torch.equal(quantized[0, 2], x[0, 2]) and torch.equal(quantized[0, 4], x[0, 4])
        assert (indices[0, 2] == -1).all() and (codes[:, 0, 2] == 0).all()


@pytest.mark.parametrize("cfg", [dict(), dict(rotation_trick=True), dict(use_cosine_sim=True)])
def test_gradient_of_fused_path_equals_per_layer_straight_through(cfg):
    torch.manual_seed(13)
    rvq = ResidualVQ(
        dim=6, num_quantizers=3, codebook_size=8, commitment_weight=0.0, freeze_codebook=True, **cfg
    )
    x = torch.randn(2, 4, 6, requires_grad=True)
    weights = torch.randn(2, 4, 6)
    quantized, _, _, codes = rvq(x, return_all_codes=True)
    (quantized * weights).sum().backward()
    got = x.grad.clone()
    # per layer, by hand: each layer's output is the layer's estimator on its (detached-chain) residual
    x.grad = None
    residual, total = x, 0
    for q, layer in enumerate(rvq.layers):
        out = layer(residual)
        total = total + out.quantized
        residual = residual - out.quantized.detach()
        torch.testing.assert_close(codes[q], out.quantized)
    (total * weights).sum().backward()
    torch.testing.assert_close(got, x.grad)


@pytest.mark.parametrize("shared", [False, True])
def test_learnable_codebooks_get_each_layers_codebook_loss(shared):
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=4,
        num_quantizers=3,
        codebook_size=8,
        learnable_codebook=True,
        shared_codebook=shared,
        threshold_ema_dead_code=0.5 if shared else 0.0,
    )
    assert all(layer.codebook_module.trained_by_gradient for layer in rvq.layers)
    books = [layer.codebook_module for layer in rvq.layers[: 1 if shared else None]]
    before = {name: t.clone() for name, t in rvq.state_dict().items()}
    x = torch.randn(2, 16, 4)
    _, indices, losses = rvq(x)
    for name, t in rvq.state_dict().items():  # no EMA step: only the usage counts of expiry may move
        if not name.endswith("cluster_size") and not name.endswith("embed"):
            assert torch.equal(t, before[name]), name
    losses.sum().backward()
    # layer q's term: mean ||r_q - c||^2 over its residuals, gradient -(2/(N d)) sum (r_q - c_k) at its codes
    residual, want = x.reshape(-1, 4), [torch.zeros(8, 4) for _ in books]
    for q, layer in enumerate(rvq.layers):
        codes = layer.codebook_module.embed.detach()[0]
        idx = indices[..., q].reshape(-1)
        g = want[0 if shared else q]
        for n in range(residual.shape[0]):
            g[idx[n]] -= 2 * (residual[n] - codes[idx[n]]) / residual.numel()
        residual = residual - codes[idx]
    for book, g in zip(books, want):
        torch.testing.assert_close(book.embed.grad[0], g)


@pytest.mark.parametrize("cls", ["rvq", "rvq_shared", "grvq"])
def test_accum_ema_update_takes_one_step_for_all_micro_batches(cls):
    torch.manual_seed(0)
    kw = dict(dim=8, num_quantizers=2, codebook_size=16, decay=0.7)
    build = {
        "rvq": lambda: ResidualVQ(**kw),
        "rvq_shared": lambda: ResidualVQ(shared_codebook=True, **kw),
        "grvq": lambda: GroupedResidualVQ(groups=2, **kw),
    }[cls]
    rvq = build()
    twin = copy.deepcopy(rvq)
    parts = [torch.randn(2, 12, 8) for _ in range(3)]
    before = {k: v.clone() for k, v in rvq.state_dict().items()}
    rvq(parts[0], accum_ema_update=True)
    rvq(parts[1], accum_ema_update=True)
    for k, v in rvq.state_dict().items():  # only pending statistics so far
        assert torch.equal(v, before[k]), k
    rvq(parts[2])
    twin(torch.cat(parts, 1))  # every layer picks the same codes: the codebooks have not moved in between
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(rvq.state_dict()[k], v, msg=k)
