"""CUDA timings: float32 nearest-code search against the certified bfloat16 search, same indices.

Run on a GPU machine: `python benchmarks/bench_cuda_search.py` (options: `--help`). For each codebook size
(1024, 8192, 65536, 262144 codes of dim 256) it searches 10^6 random tokens with
`vqcore.blocks.distance.nearest` (float32 GEMM) and `vqcore.blocks.certified.nearest_certified_with_stats`
(bfloat16 tensor-core GEMM, certified and re-ranked in float32), checks that the indices are identical (a
difference is reported, and fails the run unless it is a float32 tie by `vqcore.blocks.distance.is_tie`),
and prints a markdown table of CUDA-event medians. Absolute numbers are for the card it ran on, ratios are
the result. TF32 is switched off: with it, `nearest` is not a float32 search.

Without a CUDA device it says so and exits with status 0. `--cpu-smoke` runs the same code on the CPU
(the certified search emulating its GEMM, small sizes, wall-clock times) to check the script itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from vqcore.blocks.certified import nearest_certified_with_stats
from vqcore.blocks.distance import is_tie, nearest

SIZES = (1024, 8192, 65536, 262144)
DIM = 256
TOKENS = 10**6


def median_ms(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def count_differences(x, codes, got, expected, *, cosine: bool, limit: int = 1000) -> tuple[int, int]:
    """(tokens whose indices differ, how many of the first ``limit`` of them are not float32 ties)."""
    differ = (got != expected).nonzero()
    not_ties = 0
    for book, token in differ[:limit].tolist():
        z = x[book, token].double()
        a, b = codes[book, got[book, token]].double(), codes[book, expected[book, token]].double()
        not_ties += not is_tie(z, a, b, cosine=cosine, tolerance=4 * x.shape[-1] * 2.0**-24)
    return differ.shape[0], not_ties


def measure(size: int, args: argparse.Namespace, device: torch.device) -> tuple[list[str], bool]:
    """The table's rows for one codebook size, and whether an index differed beyond a float32 tie."""
    chunk_bytes = args.chunk_mib * 2**20
    g = torch.Generator(device=device).manual_seed(size)
    codes = torch.randn(1, size, args.dim, generator=g, device=device)
    x = torch.randn(1, args.tokens, args.dim, generator=g, device=device)
    if args.cosine:
        codes, x = torch.nn.functional.normalize(codes, dim=-1), torch.nn.functional.normalize(x, dim=-1)

    def float32_search():
        return nearest(x, codes, cosine=args.cosine, chunk_bytes=chunk_bytes)

    expected = float32_search()
    float32_ms = median_ms(float32_search, args.reps, device)
    rows, failed = [], False
    for candidates in args.candidates:

        def certified(candidates=candidates):
            return nearest_certified_with_stats(
                x, codes, cosine=args.cosine, candidates=candidates, chunk_bytes=chunk_bytes
            )

        got, stats = certified()
        differ, not_ties = count_differences(x, codes, got, expected, cosine=args.cosine)
        failed |= not_ties > 0
        verdict = "identical" if differ == 0 else f"{differ} differ, {not_ties} not float32 ties"
        certified_ms = median_ms(certified, args.reps, device)
        speed_up = float32_ms / certified_ms
        rows.append(
            f"| {size} | {candidates} | {float32_ms:.2f} | {certified_ms:.2f} | {speed_up:.2f}x "
            f"| {stats.fallback_tokens} | {verdict} |"
        )
    return rows, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help=f"codebook sizes (default {SIZES})")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--tokens", type=int, help=f"tokens searched (default {TOKENS})")
    parser.add_argument("--candidates", type=int, nargs="+", default=[16], help="candidates per token")
    parser.add_argument("--chunk-mib", type=int, default=1024, help="score block budget of both searches")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cosine", action="store_true", help="unit vectors and -x.c scores")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (emulated), small sizes")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        args.sizes, args.tokens = args.sizes or [300, 1024], args.tokens or 20000
        args.reps = min(args.reps, 2)
    elif not torch.cuda.is_available():
        print("bench_cuda_search: no CUDA device here, nothing measured (run it on a GPU machine)")
        return 0
    else:
        device = torch.device("cuda")
        args.sizes, args.tokens = args.sizes or list(SIZES), args.tokens or TOKENS
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")

    kind = "cosine" if args.cosine else "Euclidean"
    print(f"\n{args.tokens} tokens of dim {args.dim}, {kind}, score blocks up to {args.chunk_mib} MiB\n")
    print(
        "| codes | candidates | float32 nearest (ms) | certified bf16 (ms) | speed-up | fallback tokens |",
        end="",
    )
    print(" indices |\n|---:|---:|---:|---:|---:|---:|---|")
    failed = False
    for size in args.sizes:
        rows, size_failed = measure(size, args, device)
        print("\n".join(rows), flush=True)
        failed |= size_failed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
