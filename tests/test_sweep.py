"""A property-based sweep over every built-in method (hypothesis, 200 draws per method): random
valid options and inputs, zero sizes, batch 1, odd lengths, channel-first maps (HierarchicalVQ), masks
with every or no position valid, float16 / bfloat16 / float64 inputs. For each draw:

- the eval forward's output has the input's shape and dtype, its indices are integers within
  ``[-1, codebook_size)`` (-1 only at masked positions);
- ``encode(x)`` equals the forward's indices and ``decode(encode(x))`` its output, cast to the input's dtype;
- eval forward, encode and decode leave the state (every buffer and parameter) unchanged;
- a training forward gives the same shapes and finite losses.

tests/test_properties.py checks deeper properties (gradients, state round trips) on fewer draws.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import builtin_methods, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vqcore

SWEEP = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DIM = 8


def vq_options(draw):
    heads = draw(st.sampled_from([1, 2]))
    return dict(
        dim=DIM,
        codebook_size=draw(st.integers(1, 24)),
        heads=heads,
        separate_codebook_per_head=heads > 1 and draw(st.booleans()),
        use_cosine_sim=draw(st.booleans()),
        codebook_dim=draw(st.sampled_from([None, 3])),
        kmeans_init=draw(st.booleans()),
        threshold_ema_dead_code=draw(st.sampled_from([0.0, 1.0])),
        rotation_trick=draw(st.booleans()),
    )


def rvq_options(draw, grouped=False):
    options = dict(
        dim=DIM,
        codebook_size=draw(st.integers(1, 24)),
        num_quantizers=draw(st.integers(1, 3)),
        shared_codebook=draw(st.booleans()),
        use_cosine_sim=draw(st.booleans()),
        kmeans_init=draw(st.booleans()),
        quantize_dropout=draw(st.booleans()),
    )
    if grouped:
        options["groups"] = draw(st.sampled_from([1, 2]))
    return options


def levels(draw):
    return draw(st.lists(st.integers(2, 6), min_size=1, max_size=3))


METHODS = {
    "vq": (vqcore.VectorQuantize, vq_options),
    "rvq": (vqcore.ResidualVQ, rvq_options),
    "grouped_rvq": (vqcore.GroupedResidualVQ, lambda draw: rvq_options(draw, grouped=True)),
    "sim_vq": (vqcore.SimVQ, lambda draw: dict(dim=DIM, codebook_size=draw(st.integers(1, 24)))),
    "residual_sim_vq": (
        vqcore.ResidualSimVQ,
        lambda draw: dict(
            dim=DIM, codebook_size=draw(st.integers(1, 24)), num_quantizers=draw(st.integers(1, 3))
        ),
    ),
    "fsq": (
        vqcore.FSQ,
        lambda draw: dict(levels=levels(draw), dim=DIM, num_codebooks=draw(st.sampled_from([1, 2]))),
    ),
    "residual_fsq": (
        vqcore.ResidualFSQ,
        lambda draw: dict(levels=levels(draw), dim=DIM, num_quantizers=draw(st.integers(1, 3))),
    ),
    "grouped_residual_fsq": (
        vqcore.GroupedResidualFSQ,
        lambda draw: dict(levels=levels(draw), dim=DIM, num_quantizers=draw(st.integers(1, 2)), groups=2),
    ),
    "lfq": (
        vqcore.LFQ,
        lambda draw: dict(
            dim=DIM, codebook_size=2 ** draw(st.integers(1, 8)), num_codebooks=draw(st.sampled_from([1, 2]))
        ),
    ),
    "residual_lfq": (
        vqcore.ResidualLFQ,
        lambda draw: dict(
            dim=DIM, codebook_size=2 ** draw(st.integers(1, 6)), num_quantizers=draw(st.integers(1, 3))
        ),
    ),
    "grouped_residual_lfq": (
        vqcore.GroupedResidualLFQ,
        lambda draw: dict(dim=DIM, codebook_size=2 ** draw(st.integers(1, 6)), num_quantizers=2, groups=2),
    ),
    "latent": (vqcore.LatentQuantize, lambda draw: dict(levels=levels(draw), dim=DIM)),
    "fsp": (vqcore.FSP, lambda draw: dict(levels=levels(draw), dim=DIM)),
}


def takes_mask(cls) -> bool:
    return "mask" in inspect.signature(cls.forward).parameters


@st.composite
def cases(draw, name):
    cls, options = METHODS[name]
    kwargs = options(draw)
    batch = draw(st.sampled_from([0, 1, 2, 3]))
    length = draw(st.sampled_from([0, 1, 2, 5, 7]))
    dtype = draw(st.sampled_from(DTYPES))
    mask = None
    if takes_mask(cls) and draw(st.booleans()):
        mask = draw(st.sampled_from(["all", "none", "some"]))
    return cls, kwargs, (batch, length, DIM), dtype, mask, draw(st.integers(0, 2**16))


def build(cls, kwargs):
    try:
        return cls(**kwargs)
    except vqcore.ConfigurationError:
        return None  # an option combination the method refuses (with a message): not this sweep's subject


def parts(out):
    losses = out[2] if len(out) > 2 and isinstance(out[2], torch.Tensor) else None
    return out[0], out[1], losses


def check(cls, kwargs, shape, dtype, mask_kind, seed):
    torch.manual_seed(seed)
    quantizer = build(cls, kwargs)
    if quantizer is None:
        return
    x = torch.randn(*shape).to(dtype)
    mask = None
    if mask_kind is not None:
        mask = {
            "all": torch.ones(shape[:2], dtype=torch.bool),
            "none": torch.zeros(shape[:2], dtype=torch.bool),
            "some": torch.rand(shape[:2]) > 0.5,
        }[mask_kind]
    call = {} if mask is None else {"mask": mask}
    quantizer.train()
    quantized, indices, losses = parts(quantizer(x.clone(), **call))  # the first batch may initialise
    assert quantized.shape == x.shape and quantized.dtype == x.dtype
    assert not indices.is_floating_point()
    if losses is not None:
        assert torch.isfinite(losses).all(), losses

    quantizer.eval()
    before = snapshot(quantizer)
    with torch.no_grad():
        quantized, indices, _ = parts(quantizer(x, **call))
        assert quantized.shape == x.shape and quantized.dtype == x.dtype
        if indices.numel():
            assert int(indices.min()) >= (-1 if mask is not None else 0)
            assert int(indices.max()) < quantizer.codebook_size
        if mask is None:
            encoded = quantizer.encode(x)
            assert torch.equal(encoded, indices)
            assert torch.equal(quantizer.decode(encoded).to(x.dtype), quantized)
    after = snapshot(quantizer)
    assert all(torch.equal(before[key], after[key]) for key in before), "eval changed the state"


@pytest.mark.parametrize("name", METHODS)
def test_sweep(name):
    @SWEEP
    @given(case=cases(name))
    def run(case):
        check(*case)

    run()


@SWEEP
@given(
    batch=st.sampled_from([0, 1, 3]),
    length=st.sampled_from([0, 1, 5]),
    dtype=st.sampled_from(DTYPES),
    books=st.integers(1, 3),
    size=st.integers(1, 24),
)
def test_sweep_random_projection(batch, length, dtype, books, size):
    rpq = vqcore.RandomProjectionQuantizer(dim=DIM, codebook_size=size, codebook_dim=4, num_codebooks=books)
    x = torch.randn(batch, length, DIM).to(dtype)
    before = snapshot(rpq)
    indices = rpq(x)
    # one codebook: (b, n) indices, as the reference returns them; several: (b, n, books)
    assert indices.shape == ((batch, length) if books == 1 else (batch, length, books))
    assert not indices.is_floating_point()
    if indices.numel():
        assert 0 <= int(indices.min()) and int(indices.max()) < size
    assert torch.equal(rpq.encode(x), indices)
    after = snapshot(rpq)
    assert all(torch.equal(before[key], after[key]) for key in before)


@SWEEP
@given(
    batch=st.sampled_from([0, 1, 3]),
    length=st.sampled_from([0, 1, 5]),
    dtype=st.sampled_from(DTYPES),
    bits=st.integers(1, 6),
)
def test_sweep_binary_mapper(batch, length, dtype, bits):
    mapper = vqcore.BinaryMapper(bits=bits, deterministic_on_eval=True).eval()
    logits = torch.randn(batch, length, bits).to(dtype)
    out = mapper(logits)
    assert out[0].shape == (batch, length, 2**bits)
    indices = mapper.encode(logits)
    assert indices.shape == (batch, length) and not indices.is_floating_point()
    if indices.numel():
        assert 0 <= int(indices.min()) and int(indices.max()) < 2**bits
    assert torch.equal(mapper.decode(indices).to(out[0].dtype), out[0])


@SWEEP
@given(
    batch=st.sampled_from([0, 1, 2]),
    length=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    scales=st.lists(st.integers(1, 6), min_size=1, max_size=3, unique=True).map(sorted),
    size=st.integers(2, 16),
)
def test_sweep_hierarchical(batch, length, dtype, scales, size):
    """HierarchicalVQ: decode gives the last level's length, so the check is the forward's shapes, each
    level's index map in range, and eval leaving the state as it was."""
    hvq = vqcore.HierarchicalVQ(dim=4, codebook_size=size, scales=scales, kmeans_init=False).eval()
    x = torch.randn(batch, 4, length).to(dtype)
    before = snapshot(hvq)
    with torch.no_grad():
        out = hvq(x)
        assert out[0].shape == x.shape and out[0].dtype == x.dtype
        assert [tuple(level.shape) for level in out[1]] == [(batch, scale) for scale in scales]
        for level in out[1]:
            if level.numel():
                assert 0 <= int(level.min()) and int(level.max()) < size
        hvq.encode(x)
    after = snapshot(hvq)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_the_sweep_covers_every_builtin_method():
    builtin = builtin_methods()
    # RandomProjectionQuantizer returns indices only, BinaryMapper takes logits, HierarchicalVQ gives
    # multi-scale maps: their sweeps are the three tests above
    others = {vqcore.RandomProjectionQuantizer, vqcore.BinaryMapper, vqcore.HierarchicalVQ}
    assert builtin == {cls for cls, _ in METHODS.values()} | others
