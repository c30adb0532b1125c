"""Host synchronisation points (vqcore.testing.record_host_syncs): the recorder catches each kind of sync, and
the training forward of VectorQuantize (every option), ResidualVQ and GroupedResidualVQ has none once the
codebooks are initialised, and k-means has a fixed few per call, none per seeding round or Lloyd iteration.

The CPU stands in for the GPU here: the fused oneDNN search is switched off so that the search runs the
device-independent ops a CUDA device runs."""

from __future__ import annotations

import pytest
import torch

from vqcore import GroupedResidualVQ, ResidualVQ, VectorQuantize
from vqcore.blocks import distance
from vqcore.blocks.kmeans import kmeans
from vqcore.testing import record_host_syncs


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(distance, "_FUSED_LINEAR", None)


def test_the_recorder_catches_each_kind_of_sync_and_names_the_line():
    x = torch.tensor([1.0, -2.0, 3.0])
    with record_host_syncs() as syncs:
        x.sum().item()
        bool(x[0] > 0)
        x[x > 0]  # a boolean mask: the output's size is the mask's sum
        x.nonzero()
        x.tolist()
        torch.bincount(torch.tensor([0, 2]))
        torch.unique(x)
    kinds = [record.split()[0] for record in syncs]
    assert kinds == [
        "aten._local_scalar_dense.default",
        "aten._local_scalar_dense.default",
        "aten.index.Tensor",
        "aten.nonzero.default",
        "Tensor.tolist",
        "aten.bincount.default",
        "aten._unique2.default",
    ]
    assert all("test_host_syncs.py:" in record for record in syncs)
    with record_host_syncs() as syncs:  # none of these reads device data on the host
        y = x * 2 + x.argmax()
        y[torch.tensor([0, 2])] = 0.0
        torch.where(y > 0, y, -y).topk(2)
    assert syncs == []
    assert torch.Tensor.tolist is not None and x.tolist() == [1.0, -2.0, 3.0]  # the methods are restored


OPTIONS = {
    "defaults": {},
    "kmeans_init": {"kmeans_init": True},
    "cosine": {"use_cosine_sim": True},
    "codebook_dim": {"codebook_dim": 8},
    "heads_shared": {"heads": 4},
    "heads_separate": {"heads": 4, "separate_codebook_per_head": True},
    "learnable": {"learnable_codebook": True, "ema_update": False},
    "rotation_trick": {"rotation_trick": True},
    "gumbel": {"stochastic_sample_codes": True, "sample_codebook_temp": 0.5},
    "orthogonal_loss": {"orthogonal_reg_weight": 0.1},
}


@pytest.mark.parametrize("masked", [False, True], ids=["all", "mask"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_vector_quantize_training_forward_has_no_host_sync(options, masked, device_path):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=32, codebook_size=64, **options).train()
    x = torch.randn(2, 50, 32, requires_grad=True)
    mask = torch.rand(2, 50) > 0.3 if masked else None
    vq(x, mask=mask)  # initialises (k-means) on the first batch
    with record_host_syncs() as syncs:
        quantized, _, loss = vq(x, mask=mask)
        (quantized.sum() + loss.sum()).backward()
    assert syncs == []


@pytest.mark.parametrize(
    "build",
    [
        lambda: ResidualVQ(dim=32, codebook_size=64, num_quantizers=4, kmeans_init=True),
        lambda: ResidualVQ(dim=32, codebook_size=64, num_quantizers=4, shared_codebook=True),
        lambda: GroupedResidualVQ(dim=32, codebook_size=64, num_quantizers=3, groups=2),
    ],
    ids=["rvq_kmeans", "rvq_shared", "grouped"],
)
def test_residual_training_forward_has_no_host_sync(build, device_path):
    torch.manual_seed(0)
    rvq = build().train()
    x = torch.randn(2, 50, 32, requires_grad=True)
    rvq(x)
    with record_host_syncs() as syncs:
        quantized, _, loss = rvq(x)
        (quantized.sum() + loss.sum()).backward()
    assert syncs == []


def test_dead_code_expiry_is_the_one_sync_of_a_training_step(device_path):
    """Expiry reads whether any code expired (every rank must agree before the replacement's collectives)."""
    vq = VectorQuantize(dim=32, codebook_size=64, threshold_ema_dead_code=2).train()
    x = torch.randn(2, 50, 32)
    vq(x)
    with record_host_syncs() as syncs:
        vq(x)
    assert syncs and all("codebooks.py" in s or "distributed.py" in s for s in syncs)


@pytest.mark.parametrize("masked", [False, True])
def test_kmeans_syncs_a_fixed_few_times_per_call_not_per_round_or_iteration(masked, device_path):
    """k-means reads the valid-token counts once (a book with fewer valid tokens than codes is seeded
    otherwise) and sizes its Gumbel noise once; its 8 seeding rounds and its Lloyd iterations read nothing."""
    torch.manual_seed(0)
    x = torch.randn(2, 600, 8)
    valid = torch.rand(2, 600) > 0.2 if masked else None
    counts = []
    for iters in (1, 10):
        with record_host_syncs() as syncs:
            kmeans(x, 64, iters, valid=valid)  # 64 codes: 8 rounds of 8 seeds
        counts.append(len(syncs))
    assert counts == [3, 3]
