"""onnxruntime encode of VectorQuantize(dim=256, codebook_size=1024) on (8, 1024, 256) against vqcore's
eager eval encode and the reference's (vector-quantize-pytorch) eager eval forward.

Interleaved runs (one of each implementation per round, order rotated; harness.py), median per
implementation.
Target: onnxruntime no slower than vqcore eager, and >= 3x faster than the reference.

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
    from vqcore.export import to_onnx

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    dim = shape[-1]
    torch.manual_seed(0)
    q = vqcore.create("vq", dim=dim, codebook_size=args.codebook_size).eval()
    x = torch.randn(shape)
    impls = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vq_encode.onnx")
        result = to_onnx(q, path, graph="encode", example=torch.randn(2, 16, dim))
        options = ort.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    xn = x.numpy()
    impls["onnxruntime encode"] = lambda: session.run(None, {name: xn})[0]

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

    same = (torch.from_numpy(impls["onnxruntime encode"]()) != eager()).sum().item()
    timing = interleaved([Impl(k, call) for k, call in impls.items()], args.reps, args.warmup)
    med = {k: statistics.median(v) for k, v in timing.times.items()}
    base = med["onnxruntime encode"]
    print(
        f"VectorQuantize(dim={dim}, codebook_size={args.codebook_size}) encode on {shape}, "
        f"median of {args.reps} interleaved runs, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"export-time parity: {result.parity.summary()['ok']}; "
        f"ORT vs eager index mismatches here: {same} of {x.numel() // dim}"
    )
    print("| implementation | median ms | vs onnxruntime |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / base:.2f}x |")
    ok = med["vqcore eager encode"] >= base and med.get("reference eager forward", 3 * base) >= 3 * base
    print("targets met" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
