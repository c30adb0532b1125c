"""Property tests (hypothesis) over shapes and options for every built-in method.

For each draw: ``decode(encode(x))`` equals the eval forward's ``quantized`` bit for bit, the indices
are int64 and in range, a gradient reaches the input in training mode, and a state_dict round trip into
a freshly built module gives identical eval outputs.
"""

from __future__ import annotations

import torch
from helpers import generator
from hypothesis import given, settings
from hypothesis import strategies as st

import vqcore

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def _index_range(module, indices, allow_dropped=False):
    """int64 in [0, codebook_size); in training, quantize dropout may mark layers -1 (DROPPED_INDEX)."""
    assert indices.dtype == torch.int64
    assert int(indices.min()) >= (-1 if allow_dropped else 0)
    assert int(indices.max()) < module.codebook_size


def _check(build, x, seed):
    """The four properties for ``build()`` on ``x``; returns the trained module."""
    torch.manual_seed(seed)
    module = build()
    module.train()
    for _ in range(2):  # a few training steps, so that stateful methods leave their initial state
        xt = x.clone().requires_grad_(True)
        out = module(xt)
        (out[0].square().sum() + sum(o.sum() for o in out[2:] if isinstance(o, torch.Tensor))).backward()
        assert (
            xt.grad is not None and torch.isfinite(xt.grad).all()
        )  # connected (bounded methods may saturate)
        assert out[0].shape == x.shape and out[0].dtype == x.dtype
        _index_range(module, out[1], allow_dropped=True)

    small = (x * 0.1).requires_grad_(True)  # inside every bound: the gradient is non-zero
    module(small)[0].sum().backward()
    assert small.grad.abs().sum() > 0

    module.eval()
    with torch.no_grad():
        out = module(x)
        indices = module.encode(x)
        assert torch.equal(indices, out[1])
        _index_range(module, indices)
        assert torch.equal(module.decode(indices), out[0])

        fresh = build()
        fresh.load_state_dict(module.state_dict())
        fresh.eval()
        again = fresh(x)
        assert torch.equal(again[0], out[0])
        assert torch.equal(again[1], out[1])
    return module


shapes = st.tuples(st.integers(1, 3), st.integers(1, 9))
seeds = st.integers(0, 2**16)


@SETTINGS
@given(
    shape=shapes,
    heads=st.sampled_from([1, 2]),
    separate=st.booleans(),
    cosine=st.booleans(),
    codebook_size=st.sampled_from([1, 3, 16]),
    codebook_dim=st.sampled_from([None, 3]),
    kmeans=st.booleans(),
    dead=st.sampled_from([0.0, 1.0]),
    seed=seeds,
)
def test_vector_quantize(shape, heads, separate, cosine, codebook_size, codebook_dim, kmeans, dead, seed):
    dim = 4
    x = torch.randn(*shape, dim, generator=generator(seed))

    def build():
        return vqcore.VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            heads=heads,
            separate_codebook_per_head=separate,
            use_cosine_sim=cosine,
            kmeans_init=kmeans,
            kmeans_iters=2,
            threshold_ema_dead_code=dead,
        )

    _check(build, x, seed)


@SETTINGS
@given(
    shape=shapes,
    num_quantizers=st.integers(1, 3),
    codebook_size=st.sampled_from([2, 8]),
    codebook_dim=st.sampled_from([None, 3]),
    shared=st.booleans(),
    dropout=st.booleans(),
    cosine=st.booleans(),
    seed=seeds,
)
def test_residual_vq(shape, num_quantizers, codebook_size, codebook_dim, shared, dropout, cosine, seed):
    dim = 4
    x = torch.randn(*shape, dim, generator=generator(seed))

    def build():
        return vqcore.ResidualVQ(
            dim=dim,
            num_quantizers=num_quantizers,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            shared_codebook=shared,
            quantize_dropout=dropout,
            use_cosine_sim=cosine,
        )

    _check(build, x, seed)


@SETTINGS
@given(
    shape=shapes,
    levels=st.lists(st.integers(3, 8), min_size=1, max_size=3),
    num_codebooks=st.integers(1, 2),
    project=st.booleans(),
    symmetric=st.booleans(),
    seed=seeds,
)
def test_fsq(shape, levels, num_codebooks, project, symmetric, seed):
    dim = 5 if project else len(levels) * num_codebooks
    x = torch.randn(*shape, dim, generator=generator(seed)) * 2

    def build():
        return vqcore.FSQ(levels=levels, dim=dim, num_codebooks=num_codebooks, preserve_symmetry=symmetric)

    _check(build, x, seed)


@SETTINGS
@given(
    shape=shapes,
    bits=st.integers(1, 5),
    num_codebooks=st.integers(1, 2),
    project=st.booleans(),
    scale=st.sampled_from([1.0, 0.5]),
    seed=seeds,
)
def test_lfq(shape, bits, num_codebooks, project, scale, seed):
    dim = 6 if project else bits * num_codebooks
    x = torch.randn(*shape, dim, generator=generator(seed))

    def build():
        return vqcore.LFQ(
            dim=dim,
            codebook_size=2**bits,
            num_codebooks=num_codebooks,
            codebook_scale=scale,
            commitment_loss_weight=0.1,
        )

    _check(build, x, seed)


@SETTINGS
@given(
    shape=shapes,
    levels=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    num_codebooks=st.integers(1, 2),
    project=st.booleans(),
    seed=seeds,
)
def test_latent_quantize(shape, levels, num_codebooks, project, seed):
    dim = 5 if project else len(levels) * num_codebooks
    x = torch.randn(*shape, dim, generator=generator(seed))

    def build():
        return vqcore.LatentQuantize(levels=levels, dim=dim, num_codebooks=num_codebooks)

    _check(build, x, seed)


@SETTINGS
@given(batch=st.integers(1, 2), h=st.integers(1, 4), w=st.integers(1, 4), seed=seeds)
def test_vector_quantize_image_fmap(batch, h, w, seed):
    x = torch.randn(batch, 4, h, w, generator=generator(seed))
    _check(lambda: vqcore.VectorQuantize(dim=4, codebook_size=8, accept_image_fmap=True), x, seed)


@SETTINGS
@given(
    shape=shapes,
    groups=st.sampled_from([1, 2]),
    num_quantizers=st.integers(1, 2),
    codebook_size=st.sampled_from([2, 8]),
    shared=st.booleans(),
    seed=seeds,
)
def test_grouped_residual_vq(shape, groups, num_quantizers, codebook_size, shared, seed):
    x = torch.randn(*shape, 4, generator=generator(seed))

    def build():
        return vqcore.GroupedResidualVQ(
            dim=4,
            groups=groups,
            num_quantizers=num_quantizers,
            codebook_size=codebook_size,
            shared_codebook=shared,
        )

    _check(build, x, seed)


@SETTINGS
@given(
    shape=shapes,
    levels=st.lists(st.integers(3, 6), min_size=1, max_size=3),
    num_quantizers=st.integers(1, 3),
    project=st.booleans(),
    dropout=st.booleans(),
    seed=seeds,
)
def test_residual_fsq(shape, levels, num_quantizers, project, dropout, seed):
    dim = 5 if project else len(levels)
    x = torch.randn(*shape, dim, generator=generator(seed))

    def build():
        return vqcore.ResidualFSQ(
            levels=levels, num_quantizers=num_quantizers, dim=dim, quantize_dropout=dropout
        )

    _check(build, x, seed)


@SETTINGS
@given(
    shape=shapes,
    bits=st.integers(1, 4),
    num_quantizers=st.integers(1, 3),
    project=st.booleans(),
    dropout=st.booleans(),
    seed=seeds,
)
def test_residual_lfq(shape, bits, num_quantizers, project, dropout, seed):
    dim = 5 if project else bits
    x = torch.randn(*shape, dim, generator=generator(seed))

    def build():
        return vqcore.ResidualLFQ(
            dim=dim, codebook_size=2**bits, num_quantizers=num_quantizers, quantize_dropout=dropout
        )

    _check(build, x, seed)
