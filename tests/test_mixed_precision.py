"""Mixed precision for every built-in method: bf16 / fp16 autocast on CPU and modules cast
with ``.half()`` / ``.bfloat16()``, in training and eval mode.

The contract checked against a float32 twin fed the same low-precision input cast to float32:
- quantization runs in float32: identical indices, outputs equal to the twin's rounded to the input's
  dtype, equal losses and EMA statistics (bit for bit where the only low-precision op is the input
  rounding: no Linear projection, or one that runs with autocast off);
- outputs come back in the input's dtype, indices are int64 and in range, losses are finite float32;
- every floating buffer (EMA statistics, constants, frozen tables) stays float32 under ``.half()`` /
  ``.bfloat16()``; parameters follow the cast, except an EMA codebook's (always float32);
- ``decode(encode(x))`` equals the eval forward in the same precision context;
- every FSQ code is the index of some bf16 input.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from helpers import assert_same_state, builtin_methods, snapshot

import vqcore
from vqcore import (
    FSP,
    FSQ,
    LFQ,
    BinaryMapper,
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    LatentQuantize,
    RandomProjectionQuantizer,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    ResidualVQ,
    SimVQ,
    VectorQuantize,
)
from vqcore.blocks.codebooks import EMACodebook


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    dim: int
    projections: bool = False  # Linear project_in / project_out around the quantizer

    def exact(self, precision: Precision) -> bool:
        """Only the input rounding differs from the float32 twin (so everything else must be bit-equal):
        no projection, or autocast (projections run with autocast off, vqcore.blocks.projection); a module
        cast to low precision runs its projections in that precision."""
        return not self.projections or precision.autocast


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype
    autocast: bool  # True: float32 module under torch.autocast; False: module cast to dtype

    def context(self):
        return torch.autocast("cpu", dtype=self.dtype) if self.autocast else contextlib.nullcontext()


# small dims: the whole file runs in a few seconds
CASES = [
    Case("vq", lambda: VectorQuantize(dim=8, codebook_size=16), 8),
    Case(
        "vq_cosine_kmeans_expiry",
        lambda: VectorQuantize(
            dim=8, codebook_size=16, use_cosine_sim=True, kmeans_init=True, threshold_ema_dead_code=2
        ),
        8,
    ),
    Case(
        "vq_heads_orthogonal",  # learnable codebook (an nn.Parameter): still float32 after .half()
        lambda: VectorQuantize(
            dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, orthogonal_reg_weight=0.5
        ),
        8,
    ),
    Case(
        "vq_projection",
        lambda: VectorQuantize(dim=8, codebook_size=16, codebook_dim=4),
        8,
        projections=True,
    ),
    Case(
        "vq_layernorm",  # the LayerNorm after project_in runs in float32 with the codebook
        lambda: VectorQuantize(dim=8, codebook_size=16, layernorm_after_project_in=True),
        8,
    ),
    Case(
        "vq_projection_layernorm",
        lambda: VectorQuantize(dim=8, codebook_size=16, codebook_dim=4, layernorm_after_project_in=True),
        8,
        projections=True,
    ),
    Case(
        "rvq_kmeans_expiry",
        lambda: ResidualVQ(
            dim=8, num_quantizers=3, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=1
        ),
        8,
    ),
    Case(
        "rvq_shared",
        lambda: ResidualVQ(
            dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True, threshold_ema_dead_code=1
        ),
        8,
    ),
    Case(
        "rvq_projection",
        lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, codebook_dim=4),
        8,
        projections=True,
    ),
    Case(
        "grouped_rvq",
        lambda: GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16, kmeans_init=True),
        8,
    ),
    Case(
        "rpq",
        lambda: RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4, num_codebooks=2, seed=0),
        8,
    ),
    Case("fsq", lambda: FSQ([8, 5, 5, 3]), 4),
    Case("fsq_symmetric", lambda: FSQ([7, 4, 2], preserve_symmetry=True), 3),
    Case("fsq_projection", lambda: FSQ([8, 5, 5], dim=8, num_codebooks=1), 8, projections=True),
    Case("residual_fsq", lambda: ResidualFSQ([8, 5, 5], num_quantizers=3), 3),
    Case(
        "residual_fsq_projection",
        lambda: ResidualFSQ([5, 5, 3], num_quantizers=2, dim=8),
        8,
        projections=True,
    ),
    Case(
        "grouped_residual_fsq",
        lambda: GroupedResidualFSQ(dim=6, groups=2, levels=[8, 5, 5], num_quantizers=2),
        6,
    ),
    Case("lfq", lambda: LFQ(codebook_size=16, num_codebooks=2, commitment_loss_weight=0.25), 8),
    Case("lfq_projection", lambda: LFQ(codebook_size=16, dim=8), 8, projections=True),
    Case("residual_lfq", lambda: ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3), 4),
    Case(
        "residual_lfq_projection",
        lambda: ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2),
        8,
        projections=True,
    ),
    Case(
        "lfq_spherical_rotation",
        lambda: LFQ(
            codebook_size=16, dim=8, spherical=True, orthogonal_rotation=True, soft_clamp_input_value=2.0
        ),
        8,
        projections=True,
    ),
    Case("lfq_cosine", lambda: LFQ(codebook_size=16, dim=8, cosine_sim_project_in=True), 8, projections=True),
    Case(
        "grouped_residual_lfq",
        lambda: GroupedResidualLFQ(dim=8, groups=2, codebook_size=16, num_quantizers=2, spherical=True),
        8,
    ),
    Case("latent", lambda: LatentQuantize([5, 5, 8]), 3),
    Case("latent_projection", lambda: LatentQuantize([5, 4], dim=8, num_codebooks=2), 8, projections=True),
    Case("sim_vq", lambda: SimVQ(dim=8, codebook_size=16), 8, projections=True),  # the transform's dtype
    Case(
        "residual_sim_vq",
        lambda: ResidualSimVQ(dim=8, num_quantizers=2, codebook_size=16),
        8,
        projections=True,
    ),
]

PRECISIONS = [
    Precision("autocast_bf16", torch.bfloat16, autocast=True),
    Precision("autocast_fp16", torch.float16, autocast=True),
    Precision("half", torch.float16, autocast=False),
    Precision("bfloat16", torch.bfloat16, autocast=False),
]

BUILTIN_CLASSES = {
    VectorQuantize,
    ResidualVQ,
    GroupedResidualFSQ,
    GroupedResidualVQ,
    RandomProjectionQuantizer,
    FSQ,
    ResidualFSQ,
    GroupedResidualFSQ,
    LFQ,
    ResidualLFQ,
    GroupedResidualLFQ,
    LatentQuantize,
    SimVQ,
    ResidualSimVQ,
}
# int32 forward indices (FSP, as the reference) and one-hot outputs (BinaryMapper) do not fit this matrix;
# their own test files check the same precision rules
OWN_PRECISION_TESTS = {FSP, BinaryMapper, vqcore.HierarchicalVQ}  # HierarchicalVQ: a tuple of index maps


def test_the_matrix_covers_every_builtin_method():
    builtin = builtin_methods()
    assert builtin == BUILTIN_CLASSES | OWN_PRECISION_TESTS
    assert {type(case.build()) for case in CASES} == BUILTIN_CLASSES


# -- helpers -----------------------------------------------------------------------------------------


def unpack(out):
    """-> (quantized or None, indices, losses or None) for every method's output."""
    if isinstance(out, torch.Tensor):  # RandomProjectionQuantizer: the indices
        return None, out, None
    return out[0], out[1], out[2] if len(out) > 2 else None


def floating_state(module):
    """Every floating tensor (parameters and buffers, non-persistent ones too), by name."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return {k: v.detach() for k, v in tensors.items() if v.is_floating_point()}


def buffer_names(module):
    return {k for k, v in module.named_buffers() if v.is_floating_point()}


def ema_codebook_names(module):
    """Names of the tensors (parameters and buffers) that belong to an EMA codebook of ``module``."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        if isinstance(sub, EMACodebook)
        for name, _ in [*sub.named_parameters(), *sub.named_buffers()]
    }


def check_dtypes(module, precision):
    """Buffers stay float32; parameters follow a module cast, except an EMA codebook's."""
    buffers, codebooks = buffer_names(module), ema_codebook_names(module)
    for name, t in floating_state(module).items():
        keeps_float32 = precision.autocast or name in buffers or name in codebooks
        want = torch.float32 if keeps_float32 else precision.dtype
        assert t.dtype == want, f"{name} is {t.dtype}, expected {want}"


def index_bound(module):
    return module.codebook_size


# -- the matrix ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_low_precision_matches_a_float32_twin(case, precision, training):
    torch.manual_seed(0)
    module = case.build().train(training)
    if not precision.autocast:
        module = module.to(precision.dtype)
    twin = copy.deepcopy(module).float()  # float32 twin holding the same (rounded) weights
    check_dtypes(module, precision)
    exact = case.exact(precision)

    for step in range(2):  # step 0 runs k-means where enabled; step 1 is a plain EMA step from that state
        x = torch.randn(2, 6, case.dim).to(precision.dtype).requires_grad_(training)
        x32 = x.detach().float().requires_grad_(training)
        torch.manual_seed(100 + step)  # k-means seeding, dead-code draws
        with precision.context():
            out = module(x)
        torch.manual_seed(100 + step)
        ref = twin(x32)
        quantized, indices, losses = unpack(out)
        ref_quantized, ref_indices, ref_losses = unpack(ref)

        assert indices.dtype == torch.int64
        assert indices.min() >= 0 and indices.max() < index_bound(module)
        if quantized is not None:
            assert quantized.dtype == precision.dtype and quantized.shape == x.shape
            assert torch.isfinite(quantized).all()
        if losses is not None:
            assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
        if exact:
            assert torch.equal(indices, ref_indices)
            if quantized is not None:
                assert torch.equal(quantized, ref_quantized.to(precision.dtype))
            if losses is not None:
                torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=1e-7)
        else:  # low-precision projections: a near tie may flip, most tokens may not
            assert (indices == ref_indices).float().mean() >= 0.5

        if training and quantized is not None:
            total = quantized.float().sum() + (0 if losses is None else losses.sum())
            total.backward()
            assert x.grad.dtype == precision.dtype and torch.isfinite(x.grad).all()
            if exact:
                (ref_quantized.sum() + (0 if ref_losses is None else ref_losses.sum())).backward()
                torch.testing.assert_close(x.grad, x32.grad.to(precision.dtype), rtol=0, atol=0)

        # state: dtypes as cast, and (exact cases) EMA statistics equal to the float32 twin's
        check_dtypes(module, precision)
        state, ref_state = floating_state(module), floating_state(twin)
        assert state.keys() == ref_state.keys()
        codebooks = ema_codebook_names(module)
        for name, t in state.items():
            assert torch.isfinite(t).all(), name
            # forward changes only the EMA codebooks; with low-precision projections their input differs
            if exact or name not in codebooks:
                torch.testing.assert_close(t.float(), ref_state[name], rtol=0, atol=0, msg=name)

    if not training and quantized is not None:
        # the inference paths agree with the eval forward in the same precision context
        with precision.context():
            encoded = module.encode(x)
            decoded = module.decode(encoded)
        assert torch.equal(encoded, indices)
        assert torch.equal(decoded.to(quantized.dtype), quantized)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_input_under_autocast_gives_float32_outputs(case, dtype):
    torch.manual_seed(0)
    module = case.build()
    twin = copy.deepcopy(module)
    x = torch.randn(2, 6, case.dim)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=dtype):
        quantized, indices, losses = unpack(module(x))
    torch.manual_seed(1)
    ref_quantized, ref_indices, _ = unpack(twin(x))
    if quantized is not None:
        assert quantized.dtype == torch.float32
    if losses is not None:
        assert losses.dtype == torch.float32
    assert torch.equal(indices, ref_indices)  # projections included: autocast never reaches a quantizer
    if quantized is not None:
        assert torch.equal(quantized, ref_quantized)


# -- module casts keep the state float32 -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
def test_module_cast_keeps_ema_statistics_float32_and_unrounded(dtype):
    vq = VectorQuantize(dim=4, codebook_size=8)
    vq.train()(torch.randn(2, 16, 4))  # statistics that bf16 cannot hold exactly
    before = snapshot(vq.codebook_module)
    cast = vq.half() if dtype == torch.float16 else vq.bfloat16()
    for name, value in cast.codebook_module.state_dict().items():
        assert value.dtype == before[name].dtype, name
    assert_same_state(cast.codebook_module, before, "rounded by the cast: ")
    cast.float()  # and back: nothing was lost
    assert_same_state(cast.codebook_module, before, "after casting back: ")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_module_cast_keeps_every_buffer_float32(case):
    module = case.build()
    before = {k: v.clone() for k, v in module.named_buffers() if v.is_floating_point()}
    for cast in (torch.nn.Module.half, torch.nn.Module.bfloat16, lambda m: m.to(torch.float16)):
        cast(module)
        now = {k: v for k, v in module.named_buffers() if v.is_floating_point()}
        assert now.keys() == before.keys()
        for name, value in now.items():
            assert value.dtype == torch.float32, f"{name}: {value.dtype}"
            assert torch.equal(value, before[name]), f"{name} was rounded"


def test_fsq_constants_survive_bfloat16_cast():
    # before: .bfloat16() rounded the grid's float32 constants (half_l 3.5035 -> 3.5 for L=8), which moved
    # decision boundaries: ~0.4% of FSQ's indices and ~1/6 of ResidualFSQ's (scales 5^-q) changed
    torch.manual_seed(0)
    x = (torch.randn(1, 4000, 3) * 2).bfloat16()
    for module in (FSQ([8, 5, 5]), ResidualFSQ([8, 5, 5], num_quantizers=3)):
        want = module(x.float()).indices
        got = copy.deepcopy(module).bfloat16()(x).indices
        assert torch.equal(got, want)


def test_rpq_targets_are_float32_under_autocast_and_after_half():
    # before: autocast ran the projection GEMM in bf16 (other targets for some tokens) and .half() failed
    # with "expected scalar type Float but found Half"
    rpq = RandomProjectionQuantizer(dim=16, codebook_size=64, codebook_dim=8, num_codebooks=2, seed=0)
    x = torch.randn(4, 200, 16)
    want = rpq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rpq(x), want)
        logits = rpq.logits(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, rpq.logits(x), rtol=0, atol=0)
    half = copy.deepcopy(rpq).half()
    assert torch.equal(half(x.half()), rpq(x.half().float()))
    assert torch.equal(half.rand_projs, rpq.rand_projs) and torch.equal(half.codebooks, rpq.codebooks)
    targets = rpq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rpq(x, indices=targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, rpq(x, indices=targets), rtol=0, atol=0)


def test_orthogonal_loss_is_float32_under_autocast():
    # before: the codes' Gram matrix ran in bf16 under autocast (a bf16 loss, off by ~0.2%)
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=16, orthogonal_reg_weight=1.0)
    twin = copy.deepcopy(vq)
    x = torch.randn(2, 6, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(x, return_loss_breakdown=True)
    ref = twin(x.float(), return_loss_breakdown=True)
    orthogonal = out.breakdown.orthogonal_reg
    assert orthogonal.dtype == torch.float32
    torch.testing.assert_close(orthogonal, ref.breakdown.orthogonal_reg, rtol=0, atol=0)


# -- every FSQ code is reachable in bf16 --------------------------------------------------------------------


def all_bf16_values(low: float, high: float) -> torch.Tensor:
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    return values[torch.isfinite(values) & (values >= low) & (values <= high)]


@pytest.mark.parametrize(
    "levels, kwargs",
    [([8, 5, 5, 3], {}), ([16, 16, 16], {}), ([7, 4, 2], {"preserve_symmetry": True})],
    ids=["8-5-5-3", "16-16-16", "symmetric"],
)
@pytest.mark.parametrize("mode", ["autocast", "bfloat16_module"])
def test_every_fsq_code_is_the_index_of_some_bf16_input(levels, kwargs, mode):
    fsq = FSQ(levels, **kwargs)
    sweep = all_bf16_values(-8.0, 8.0)  # every bf16 number in range
    d = len(levels)
    digits = fsq.indices_to_level_indices(fsq(sweep.float().reshape(1, -1, 1).expand(1, -1, d)).indices[0])
    witnesses = []
    for i, level in enumerate(levels):  # one bf16 witness per digit of every dimension
        found = [
            sweep[(digits[:, i] == k).nonzero()[0, 0]] for k in range(level) if (digits[:, i] == k).any()
        ]
        assert len(found) == level, f"dimension {i}: only {len(found)} of {level} levels reachable"
        witnesses.append(torch.stack(found))
    # dimensions are independent: the product of the witnesses holds one bf16 input per code
    x = torch.cartesian_prod(*witnesses).reshape(1, -1, d)
    assert x.dtype == torch.bfloat16
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fsq(x)
    else:
        out = copy.deepcopy(fsq).bfloat16()(x)
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.indices.sort().values[0], torch.arange(fsq.codebook_size))
    assert torch.equal(out.indices, fsq(x.float()).indices)
