"""The CUDA path (skipped without a GPU; CI has none). Run on a GPU machine with
`pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch

from vqcore import VectorQuantize
from vqcore.testing import check_quantizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tie_aware_equal(x, codes, got, want, rel=1e-5):
    """Indices agree, or the two picked codes are equally near in float64 (a genuine fp32 tie)."""
    differ = got != want
    if not bool(differ.any()):
        return True
    xs = x.double()[differ]
    d_got = (xs - codes.double()[got[differ]]).pow(2).sum(-1)
    d_want = (xs - codes.double()[want[differ]]).pow(2).sum(-1)
    return bool(((d_got - d_want).abs() <= rel * d_want.abs().clamp(min=1e-12)).all())


def test_cuda_eval_matches_cpu():
    torch.manual_seed(0)
    cpu = VectorQuantize(dim=64, codebook_size=1024).eval()
    gpu = VectorQuantize(dim=64, codebook_size=1024).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(8, 512, 64)
    want = cpu.encode(x)
    got = gpu.encode(x.cuda()).cpu()
    assert tie_aware_equal(x.reshape(-1, 64), cpu.codebook, got.reshape(-1), want.reshape(-1))
    assert torch.allclose(gpu.decode(want.cuda()).cpu(), cpu.decode(want), atol=1e-6)


def test_cuda_training_matches_cpu_statistics():
    torch.manual_seed(0)
    kwargs = dict(dim=32, codebook_size=64, kmeans_init=True, threshold_ema_dead_code=1.0)
    cpu = VectorQuantize(**kwargs)
    gpu = VectorQuantize(**kwargs)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(4, 256, 32)
    torch.manual_seed(1)
    _, idx_cpu, loss_cpu = cpu(x)
    torch.manual_seed(1)
    _, idx_gpu, loss_gpu = gpu(x.cuda())
    assert (idx_gpu.cpu() == idx_cpu).float().mean() > 0.99
    assert torch.isfinite(gpu.codebook).all() and (gpu.codebook.norm(dim=-1) > 0).all()
    assert gpu.codebook_module.cluster_size.dtype == torch.float32


def test_cuda_bf16_autocast_keeps_quantization_and_statistics_in_float32():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=32, codebook_size=64).cuda()
    x = torch.randn(4, 100, 32, device="cuda")
    vq.eval()
    want = vq.encode(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = vq.encode(x)
        quantized, _, _ = vq(x.bfloat16())
    assert torch.equal(got, want)
    assert quantized.dtype == torch.bfloat16
    vq.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vq(x)
    assert (
        vq.codebook_module.embed_avg.dtype == torch.float32
        and torch.isfinite(vq.codebook_module.embed_avg).all()
    )


def test_cuda_large_codebook_memory_is_bounded():
    vq = VectorQuantize(dim=64, codebook_size=65536).cuda().eval()
    x = torch.randn(8, 1024, 64, device="cuda")
    with torch.no_grad():
        vq(x[:1, :8])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        vq(x)
        torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    print(f"peak above input and model: {extra:.1f} MiB")
    assert extra <= 64


def test_cuda_conformance():
    check_quantizer(
        lambda **kw: VectorQuantize(**kw).cuda(),
        torch.randn(2, 16, 32, device="cuda"),
        dim=32,
        codebook_size=64,
        kmeans_init=True,
        heads=2,
        separate_codebook_per_head=True,
    )


def test_cuda_quantizer_exports_with_parity(tmp_path):
    from vqcore import FSQ
    from vqcore.export import to_pt2, to_torchscript

    vq = VectorQuantize(dim=32, codebook_size=64).cuda().eval()
    x = torch.randn(2, 16, 32, device="cuda")
    assert to_pt2(vq, tmp_path / "vq.pt2", graph="encode", example=x).parity is not None
    fsq = FSQ(levels=[8, 5, 5, 5], dim=32).cuda().eval()
    assert to_torchscript(fsq, tmp_path / "fsq.pt", graph="decode", example=fsq.encode(x)).parity is not None


def test_cuda_training_forward_has_no_host_sync_after_initialisation():
    """torch.cuda.set_sync_debug_mode("error") over a training step of VectorQuantize and ResidualVQ with
    k-means initialisation done on the first batch (the CPU recorder of tests/test_host_syncs.py stands in
    for this where there is no GPU)."""
    from vqcore import ResidualVQ

    for module in (
        VectorQuantize(dim=64, codebook_size=1024, kmeans_init=True),
        ResidualVQ(dim=64, codebook_size=1024, num_quantizers=4, kmeans_init=True),
    ):
        module = module.cuda().train()
        x = torch.randn(4, 256, 64, device="cuda", requires_grad=True)
        module(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            quantized, _, loss = module(x)
            (quantized.sum() + loss.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_certified_bf16_search_gives_the_float32_indices():
    """A codebook with ``search_dtype=torch.bfloat16`` searches with the certified bfloat16 GEMM: the same
    indices as the float32 search on 2^20 tokens."""
    torch.manual_seed(0)
    vq = VectorQuantize(dim=256, codebook_size=8192).cuda().eval()
    x = torch.randn(16, 65536, 256, device="cuda")
    want = vq.encode(x)
    vq.codebook_module.search_dtype = torch.bfloat16
    assert torch.equal(vq.encode(x), want)
