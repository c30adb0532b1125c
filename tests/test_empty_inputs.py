"""Empty inputs: a zero-length sequence, an empty batch and zero-size spatial axes give correctly shaped
empty outputs in training and in eval, through forward, encode and decode, and leave the training state
untouched (streaming codecs call a quantizer with zero new frames; padded loaders produce empty items)."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot

import vqcore

D = 8
BUILDERS = {
    "vq": lambda: vqcore.VectorQuantize(dim=D, codebook_size=16),
    "vq_kmeans_heads": lambda: vqcore.VectorQuantize(dim=D, codebook_size=16, heads=2, kmeans_init=True),
    "vq_expiry_gumbel": lambda: vqcore.VectorQuantize(
        dim=D, codebook_size=16, threshold_ema_dead_code=2, stochastic_sample_codes=True
    ),
    "rvq": lambda: vqcore.ResidualVQ(dim=D, codebook_size=16, num_quantizers=3),
    "rvq_kmeans_dropout": lambda: vqcore.ResidualVQ(
        dim=D, codebook_size=16, num_quantizers=3, kmeans_init=True, quantize_dropout=True
    ),
    "rvq_shared": lambda: vqcore.ResidualVQ(dim=D, codebook_size=16, num_quantizers=3, shared_codebook=True),
    "rvq_beam": lambda: vqcore.ResidualVQ(dim=D, codebook_size=16, num_quantizers=3, beam_size=2),
    "rvq_qinco": lambda: vqcore.ResidualVQ(
        dim=D, codebook_size=16, num_quantizers=2, implicit_neural_codebook=True
    ),
    "grouped_rvq": lambda: vqcore.GroupedResidualVQ(dim=D, codebook_size=16, num_quantizers=3, groups=2),
    "sim_vq": lambda: vqcore.SimVQ(dim=D, codebook_size=16),
    "residual_sim_vq": lambda: vqcore.ResidualSimVQ(dim=D, codebook_size=16, num_quantizers=2),
    "fsq": lambda: vqcore.FSQ(levels=[4, 4], dim=D),
    "residual_fsq": lambda: vqcore.ResidualFSQ(levels=[4, 4], dim=D, num_quantizers=2),
    "grouped_residual_fsq": lambda: vqcore.GroupedResidualFSQ(
        levels=[4, 4], dim=D, num_quantizers=2, groups=2
    ),
    "lfq": lambda: vqcore.LFQ(dim=D, codebook_size=256),
    "residual_lfq": lambda: vqcore.ResidualLFQ(dim=D, codebook_size=256, num_quantizers=2),
    "grouped_residual_lfq": lambda: vqcore.GroupedResidualLFQ(
        dim=D, codebook_size=256, num_quantizers=2, groups=2
    ),
    "latent": lambda: vqcore.LatentQuantize(levels=[4, 4], dim=D, codebook_dim=2),
    "fsp": lambda: vqcore.FSP(levels=[4, 4], dim=D),
    "rpq": lambda: vqcore.RandomProjectionQuantizer(dim=D, codebook_size=16, codebook_dim=4, num_codebooks=2),
}
SHAPES = {"zero_length": (2, 0, D), "empty_batch": (0, 5, D)}


def outputs(out):
    """(quantized or None, indices) of any method's forward."""
    if isinstance(out, torch.Tensor):  # RandomProjectionQuantizer: the indices
        return None, out
    return out[0], out[1]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", BUILDERS)
def test_empty_input_gives_empty_outputs_and_leaves_the_state(name, shape, mode):
    torch.manual_seed(0)
    quantizer = BUILDERS[name]().train(mode == "train")
    before = snapshot(quantizer)
    x = torch.randn(*shape, requires_grad=mode == "train")
    out = quantizer(x)
    quantized, indices = outputs(out)
    if quantized is not None:
        assert quantized.shape == x.shape and quantized.dtype == x.dtype
    losses = out[2] if isinstance(out, tuple) and len(out) > 2 else None
    if isinstance(losses, torch.Tensor):  # no token, no loss: 0, not the NaN of a mean over nothing
        assert torch.equal(losses, torch.zeros_like(losses)), losses
    assert indices.numel() == 0
    assert not indices.is_floating_point()
    if mode == "train" and quantized is not None:
        quantized.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
    after = snapshot(quantizer)
    assert after.keys() == before.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == [], f"an empty batch changed {changed}"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", [n for n in BUILDERS if n not in ("rpq", "fsp")])
def test_encode_and_decode_of_an_empty_input(name, shape):
    torch.manual_seed(0)
    quantizer = BUILDERS[name]().eval()
    x = torch.randn(*shape)
    indices = quantizer.encode(x)
    assert indices.numel() == 0
    decoded = quantizer.decode(indices)
    assert decoded.shape == x.shape
    quantized, _ = outputs(quantizer(x))
    assert torch.equal(decoded, quantized)


def test_empty_feature_maps_and_the_hierarchical_exception():
    vq = vqcore.VectorQuantize(dim=D, codebook_size=16, accept_image_fmap=True).train()
    quantized, indices, _ = vq(torch.randn(2, D, 0, 4))
    assert quantized.shape == (2, D, 0, 4) and indices.shape == (2, 0, 4)
    mapper = vqcore.BinaryMapper(bits=4).train()
    assert mapper(torch.randn(2, 0, 4))[0].shape == (2, 0, 16)
    hierarchical = vqcore.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), kmeans_init=False)
    assert hierarchical(torch.randn(0, 4, 8))[0].shape == (0, 4, 8)
    with pytest.raises(
        ValueError, match=r"at least one position on each spatial axis .* got shape \(2, 4, 0\)"
    ):
        hierarchical(torch.randn(2, 4, 0))
