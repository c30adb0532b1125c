"""CUDA timings: vqcore vs vector-quantize-pytorch 1.32.0 on one GPU, interleaved, CUDA-event medians.

Run on a GPU machine: `python benchmarks/bench_cuda.py` (needs the reference installed for its rows).
Prints a markdown table; absolute numbers are for the card it ran on, ratios are the result.
"""

from __future__ import annotations

import statistics
import sys

import torch

import vqcore


def cuda_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def interleaved(impls: dict, reps: int = 20, warmup: int = 3) -> dict[str, float]:
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            samples[name] += cuda_ms(fn, 1)
    return {name: statistics.median(v) for name, v in samples.items()}


def train_step(module, x):
    def run():
        module.train()
        xx = x.detach().requires_grad_(True)
        out = module(xx)
        loss = out[0].float().pow(2).mean() + out[2].float().sum()
        loss.backward()

    return run


def eval_step(module, x):
    def run():
        module.eval()
        with torch.no_grad():
            module(x)

    return run


def ort_cuda_parity() -> None:
    """Export-time parity of a VectorQuantize encode/decode run by onnxruntime's CUDA provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime: not installed")
        return
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}: providers {available}")
    if "CUDAExecutionProvider" not in available:
        print("onnxruntime CUDA parity: not checked (this onnxruntime build has no CUDAExecutionProvider)")
        return
    import tempfile
    from pathlib import Path

    from vqcore.export import to_onnx

    q = vqcore.VectorQuantize(dim=256, codebook_size=1024).eval()
    x = torch.randn(2, 64, 256)
    with tempfile.TemporaryDirectory() as tmp:
        for graph, example in (("encode", x), ("decode", q.encode(x))):
            result = to_onnx(
                q,
                Path(tmp) / f"{graph}.onnx",
                graph=graph,
                example=example,
                providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            )
            print(f"onnxruntime CUDA parity, {graph}: {result.parity}")


def main() -> int:
    try:
        import vector_quantize_pytorch as ref
    except ImportError:
        ref = None
    device = "cuda"
    rows = []

    def case(name, make_ours, make_ref, x, kind):
        ours = make_ours().to(device)
        impls = {"vqcore": (train_step if kind == "train" else eval_step)(ours, x)}
        if ref is not None and make_ref is not None:
            theirs = make_ref().to(device)
            impls["reference"] = (train_step if kind == "train" else eval_step)(theirs, x)
        medians = interleaved(impls)
        for impl, ms in medians.items():
            rows.append((name, kind, impl, ms, ms / medians["vqcore"]))

    x = torch.randn(8, 1024, 256, device=device)
    for kind in ("train", "eval"):
        case(
            "VectorQuantize(256, 1024) x(8,1024,256)",
            lambda: vqcore.VectorQuantize(dim=256, codebook_size=1024),
            ref and (lambda: ref.VectorQuantize(dim=256, codebook_size=1024)),
            x,
            kind,
        )
    case(
        "VectorQuantize(256, 8192) x(8,1024,256)",
        lambda: vqcore.VectorQuantize(dim=256, codebook_size=8192),
        ref and (lambda: ref.VectorQuantize(dim=256, codebook_size=8192)),
        x,
        "train",
    )
    # the GPU target: training under bfloat16 autocast at 8192 and 65536 codes; vqcore's search stays
    # float32 (or, with search_dtype, a certified bfloat16 GEMM)
    for size in (8192, 65536):

        def autocast_step(module):
            step = train_step(module, x)

            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    step()

            return run

        ours = vqcore.VectorQuantize(dim=256, codebook_size=size).to(device)
        certified = vqcore.VectorQuantize(dim=256, codebook_size=size).to(device)
        certified.codebook_module.search_dtype = torch.bfloat16
        impls = {"vqcore": autocast_step(ours), "vqcore (search_dtype=bfloat16)": autocast_step(certified)}
        if ref is not None:
            impls["reference"] = autocast_step(ref.VectorQuantize(dim=256, codebook_size=size).to(device))
        medians = interleaved(impls, reps=10)
        for impl, ms in medians.items():
            name = f"VectorQuantize(256, {size}) x(8,1024,256), bf16 autocast"
            rows.append((name, "train", impl, ms, ms / medians["vqcore"]))

    x4 = torch.randn(4, 1024, 256, device=device)
    for kind in ("train", "eval"):
        case(
            "ResidualVQ(256, Q=8, K=1024) x(4,1024,256)",
            lambda: vqcore.ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024),
            ref and (lambda: ref.ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024)),
            x4,
            kind,
        )
    img = torch.randn(4, 16, 32, 32, device=device)
    case(
        "LFQ(65536, dim=16) x(4,16,32,32)",
        lambda: vqcore.LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1),
        ref and (lambda: ref.LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1)),
        img,
        "train",
    )

    from vqcore.blocks.kmeans import kmeans

    data = torch.randn(1, 8192, 256, device=device)
    impls = {"vqcore": lambda: kmeans(data, 1024, 10)}
    if ref is not None:
        from vector_quantize_pytorch.vector_quantize_pytorch import kmeans as ref_kmeans

        impls["reference"] = lambda: ref_kmeans(data, 1024, 10)
    medians = interleaved(impls, reps=5, warmup=1)
    for impl, ms in medians.items():
        rows.append(("k-means 10 iters, 8192 x 256 -> 1024", "init", impl, ms, ms / medians["vqcore"]))

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ort_cuda_parity()
    print("| case | mode | impl | median ms | time / vqcore time |")
    print("|---|---|---|---:|---:|")
    for name, kind, impl, ms, ratio in rows:
        print(f"| {name} | {kind} | {impl} | {ms:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
