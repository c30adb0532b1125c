"""Exported encode of VectorQuantize(dim=256, codebook_size=1024) on (8, 1024, 256) in each runtime
(onnxruntime: int64, int32 and float16 graphs and the fused quantize graph; frozen TorchScript;
ExecuTorch with XNNPACK when executorch is installed) against vqcore's eager eval encode and the
reference's (vector-quantize-pytorch) eager eval forward.

Interleaved runs (one of each implementation per round, order rotated; harness.py), median per
implementation.
Target: onnxruntime encode >= 4x faster than the reference's eager forward.

    .venv/bin/python benchmarks/bench_export.py [--reps 25] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch
from harness import Impl, interleaved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch and onnxruntime intra-op threads (0: defaults)"
    )
    parser.add_argument("--shape", default="8,1024,256")
    parser.add_argument("--codebook-size", type=int, default=1024)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    import vqcore
    from vqcore.export import to_onnx, to_torchscript

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    dim = shape[-1]
    torch.manual_seed(0)
    q = vqcore.create("vq", dim=dim, codebook_size=args.codebook_size).eval()
    x = torch.randn(shape)
    impls = {}
    results = {}
    tmp = tempfile.mkdtemp()
    example = torch.randn(2, 16, dim)
    options = ort.SessionOptions()
    # several sessions share the cores in one process: idle intra-op threads must not spin (by default
    # they do, and a session's spinning threads slow the next session's run)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if args.threads:
        options.intra_op_num_threads = args.threads
    variants = {
        "onnxruntime encode": dict(graph="encode"),
        "onnxruntime encode, int32 indices": dict(graph="encode", index_dtype=torch.int32),
        "onnxruntime encode, float16": dict(graph="encode", float_dtype=torch.float16),
        "onnxruntime quantize (vectors and indices)": dict(graph="quantize"),
    }
    for label, kwargs in variants.items():
        path = os.path.join(tmp, f"{len(results)}.onnx")
        results[label] = to_onnx(q, path, example=example, **kwargs)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        dtype = "float16" if kwargs.get("float_dtype") == torch.float16 else "float32"
        feed = {session.get_inputs()[0].name: x.numpy().astype(dtype)}
        pick = 1 if kwargs["graph"] == "quantize" else 0  # the indices (every output is computed)
        impls[label] = lambda session=session, feed=feed, pick=pick: session.run(None, feed)[pick]
    path = os.path.join(tmp, "encode.pt")
    results["torchscript (frozen) encode"] = to_torchscript(q, path, graph="encode", example=example)
    scripted = torch.jit.load(path)
    impls["torchscript (frozen) encode"] = lambda: scripted(x)
    try:
        from vqcore.export import to_executorch
        from vqcore.export.writers import executorch_runner

        path = os.path.join(tmp, "encode.pte")
        results["executorch (xnnpack) encode"] = to_executorch(
            q, path, graph="encode", example=example, max_sizes={"batch": shape[0], "seq": shape[1]}
        )
        run_pte = executorch_runner(path)
        impls["executorch (xnnpack) encode"] = lambda: run_pte(x)[0]
    except ImportError:
        print("executorch not installed: no ExecuTorch row", file=sys.stderr)

    def eager():
        with torch.no_grad():
            return q.encode(x)

    impls["vqcore eager encode"] = eager
    try:
        from vector_quantize_pytorch import VectorQuantize

        ref = VectorQuantize(dim=dim, codebook_size=args.codebook_size).eval()

        def reference():
            with torch.no_grad():
                return ref(x)

        impls["reference eager forward"] = reference
    except ImportError:
        print("vector-quantize-pytorch not installed: no reference column", file=sys.stderr)

    want = eager()
    agree = {
        k: int((torch.as_tensor(call()).long() != want).sum()) for k, call in impls.items() if k in results
    }
    timing = interleaved([Impl(k, call) for k, call in impls.items()], args.reps, args.warmup)
    med = {k: statistics.median(v) for k, v in timing.times.items()}
    base = med["onnxruntime encode"]
    print(
        f"VectorQuantize(dim={dim}, codebook_size={args.codebook_size}) encode on {shape}, "
        f"median of {args.reps} interleaved runs, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"index mismatches against vqcore eager on these {x.numel() // dim} tokens: {agree}")
    print("export-time parity ok: " + ", ".join(f"{k}: {r.parity.ok}" for k, r in results.items()))
    print("| implementation | median ms | vs onnxruntime encode | reference / this |")
    print("|---|---:|---:|---:|")
    ref_ms = med.get("reference eager forward")
    for k, v in med.items():
        print(
            f"| {k} | {v:.1f} | {v / base:.2f}x | {ref_ms / v:.2f}x |"
            if ref_ms
            else f"| {k} | {v:.1f} | {v / base:.2f}x | |"
        )
    ok = med.get("reference eager forward", 4 * base) >= 4 * base
    print("targets met" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
