"""torch.compile (issue 9, item 1): the eval / encode / decode paths of every built-in method, and the
training forward of FSQ, LFQ and LatentQuantize, trace as one graph (torch._dynamo.explain: no breaks)."""

from __future__ import annotations

import pytest
import torch

import vqcore

CASES = {
    "vq": lambda: vqcore.VectorQuantize(dim=8, codebook_size=16),
    "vq_heads_cosine_projection": lambda: vqcore.VectorQuantize(
        dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, use_cosine_sim=True, codebook_dim=3
    ),
    "rvq": lambda: vqcore.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, codebook_dim=4),
    "rvq_shared": lambda: vqcore.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, shared_codebook=True),
    "grvq": lambda: vqcore.GroupedResidualVQ(dim=8, groups=2, codebook_size=16, num_quantizers=2),
    "rpq": lambda: vqcore.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4),
    "fsq": lambda: vqcore.FSQ(levels=[5, 3], dim=8),
    "residual_fsq": lambda: vqcore.ResidualFSQ(levels=[5, 3], num_quantizers=2, dim=8),
    "lfq": lambda: vqcore.LFQ(dim=8, codebook_size=16),
    "residual_lfq": lambda: vqcore.ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2),
    "latent": lambda: vqcore.LatentQuantize(levels=[5, 3], dim=8),
}


def _breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [str(r.reason) for r in explanation.break_reasons]


@pytest.mark.parametrize("name", list(CASES))
def test_inference_paths_have_no_graph_breaks(name):
    torch.manual_seed(0)
    module = CASES[name]().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        indices = module.encode(x)
        for path, args in (("encode", (x,)), ("decode", (indices,)), ("forward", (x,))):
            fn = module if path == "forward" else getattr(module, path)
            count, reasons = _breaks(fn, *args)
            assert count == 0, (path, reasons)


@pytest.mark.parametrize("name", ["fsq", "lfq", "latent"])
def test_training_forward_has_no_graph_breaks(name):
    torch.manual_seed(0)
    module = CASES[name]().train()
    x = torch.randn(2, 5, 8, requires_grad=True)
    count, reasons = _breaks(module, x)
    assert count == 0, reasons


def test_compiled_encode_decode_match_eager():
    torch.manual_seed(0)
    module = CASES["vq"]().eval()
    x = torch.randn(2, 5, 8)
    torch._dynamo.reset()
    encode = torch.compile(module.encode, fullgraph=True, backend="eager")
    decode = torch.compile(module.decode, fullgraph=True, backend="eager")
    with torch.no_grad():
        indices = encode(x)
        assert torch.equal(indices, module.encode(x))
        assert torch.equal(decode(indices), module.decode(indices))
