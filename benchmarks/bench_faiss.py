"""Exact nearest-code search against faiss: vqcore vs faiss-cpu (IndexFlatL2, faiss.Kmeans) vs
vector-quantize-pytorch 1.32.0 ("the reference"), from 2^10 to 2^18 codes.

Run from the repository root::

    .venv/bin/python benchmarks/bench_faiss.py                  # every case (~15 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_faiss.py --only eval1024,kmeans
    .venv/bin/python benchmarks/bench_faiss.py --only scaling   # also writes benchmarks/scaling.png

Cases (dim 256; faiss and torch both on 2 threads; the same codes and tokens for every implementation):

- ``eval1024``: VectorQuantize(256, 1024) eval forward on (8, 1024, 256) (vectors, indices, loss) and its
  ``encode`` (indices only), against faiss ``IndexFlatL2.search(x, 1)`` on the 8192 tokens, the reference's
  eval forward and the GEMM floor. Target: the eval forward at most 0.9x faiss's time, with identical indices.
- ``kmeans``: 10 Lloyd iterations, 8192 x 256 -> 1024 codes: ``vqcore.blocks.kmeans.kmeans`` (k-means++
  seeds) against ``faiss.Kmeans(256, 1024, niter=10)`` (random seeds) and the reference's k-means. Target:
  at most 0.9x faiss's time.
- ``eval65536`` / ``eval262144``: the eval forward with 2^16 / 2^18 codes on (8, 1024, 256) against faiss;
  and the peak memory of an eval call and of a training step (each in a fresh process; the codebook alone is
  64 / 256 MiB). Targets at 2^18: at most 1.1x faiss's time; peaks at most 320 MiB. The reference builds
  tokens x codes matrices (8 GiB at 2^18) and runs only at 2^16.
- ``scaling``: eval on (1, 1024, 256) from 2^10 to 2^18 codes, time (interleaved) and peak memory (fresh
  processes) of vqcore, the reference and faiss; the figure goes to ``benchmarks/scaling.png``.

Timing, noise handling, the table and the command line come from harness.py; benchmarks/README.md
describes the method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import faiss
import harness
import numpy as np
import torch
from harness import Config, Impl, Row, build, eval_call, run_case, train_call

DIM = 256
SHAPE = (8, 1024, DIM)
SCALING_SHAPE = (1, 1024, DIM)
SCALING_SIZES = [2**p for p in range(10, 19)]
PEAK_TARGET_MIB = 320.0
FIGURE = Path(__file__).resolve().parent / "scaling.png"


def quantizer(lib: str, size: int, **kwargs):
    torch.manual_seed(0)
    return build(lib, "VectorQuantize", dim=DIM, codebook_size=size, **kwargs)


def codes_of(vq) -> torch.Tensor:
    return vq.codebook.detach().reshape(-1, DIM).clone()


def flat_index(codes: torch.Tensor) -> faiss.IndexFlatL2:
    index = faiss.IndexFlatL2(codes.shape[-1])
    index.add(np.ascontiguousarray(codes.numpy()))
    return index


def faiss_search(index: faiss.IndexFlatL2, x: torch.Tensor):
    tokens = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).numpy())
    return lambda: index.search(tokens, 1)


def floor_eval(x: torch.Tensor, codes: torch.Tensor):
    """One GEMM over all tokens, argmin, gather (benchmarks/README.md, "The floor")."""

    def call():
        with torch.no_grad():
            flat = x.reshape(-1, x.shape[-1])
            return codes[(codes.pow(2).sum(-1) - 2 * flat @ codes.T).argmin(-1)]

    return call


def index_agreement(
    ours: torch.Tensor, index: faiss.IndexFlatL2, x: torch.Tensor, codes: torch.Tensor
) -> str:
    """How many of vqcore's indices differ from faiss's, and whether each difference is a float64 tie."""
    _, theirs = index.search(np.ascontiguousarray(x.reshape(-1, x.shape[-1]).numpy()), 1)
    theirs = torch.from_numpy(theirs[:, 0])
    ours = ours.reshape(-1)
    differ = (ours != theirs).nonzero().flatten()
    ties = 0
    for i in differ.tolist():
        z = x.reshape(-1, x.shape[-1])[i].double()
        a, b = codes[ours[i]].double(), codes[theirs[i]].double()
        ties += bool(((z - a).pow(2).sum() - (z - b).pow(2).sum()).abs() <= 1e-5 * z.pow(2).sum())
    return f"indices vs faiss: {len(differ)} of {ours.numel()} differ ({ties} of them float64 near-ties)"


def case_eval1024(cfg: Config) -> list[Row]:
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    ours = quantizer("vqcore", 1024).eval()
    codes = codes_of(ours)
    index = flat_index(codes)
    impls = [
        Impl("vqcore", eval_call(ours, x)),
        Impl("vqcore encode (indices only)", lambda: ours.encode(x)),
        Impl("faiss IndexFlatL2.search", faiss_search(index, x)),
        Impl("reference (defaults)", eval_call(quantizer("reference", 1024), x)),
        Impl("floor (GEMM+argmin+gather)", floor_eval(x, codes)),
    ]
    rows = run_case("eval1024 dim=256 K=1024 x(8,1024,256)", impls, cfg, reps=15, warmup=2)
    with torch.no_grad():
        _, indices, _ = ours(x)
    rows[0].note += "; " + index_agreement(indices, index, x, codes)
    faiss_row = rows[2]
    faiss_row.target, faiss_row.passed = "vqcore <= 0.9x faiss", 1 / faiss_row.ratio <= 0.9
    return rows


def case_kmeans(cfg: Config) -> list[Row]:
    from vector_quantize_pytorch.vector_quantize_pytorch import kmeans as reference_kmeans

    from vqcore.blocks.kmeans import kmeans

    x = torch.randn(8192, DIM, generator=torch.Generator().manual_seed(2))
    data = np.ascontiguousarray(x.numpy())

    def run_faiss():
        km = faiss.Kmeans(DIM, 1024, niter=10, seed=1, verbose=False)
        km.train(data)
        return km

    impls = [
        Impl("vqcore", lambda: kmeans(x[None], 1024, 10)),
        Impl("faiss.Kmeans", run_faiss),
        Impl("reference", lambda: reference_kmeans(x[None], 1024, 10)),
    ]
    rows = run_case("kmeans 10 iters, 8192 x 256 -> 1024", impls, cfg, reps=7, warmup=1)

    def inertia(means: torch.Tensor) -> float:
        return float(torch.cdist(x, means).amin(-1).pow(2).mean())

    ours = inertia(kmeans(x[None], 1024, 10, generator=torch.Generator().manual_seed(0))[0][0])
    theirs = inertia(torch.from_numpy(run_faiss().centroids))
    rows[0].note += f"; mean squared distance to the nearest mean: vqcore {ours:.2f}, faiss {theirs:.2f}"
    rows[1].target, rows[1].passed = "vqcore <= 0.9x faiss", 1 / rows[1].ratio <= 0.9
    return rows


def large(size: int):
    def run(cfg: Config) -> list[Row]:
        x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3))
        ours = quantizer("vqcore", size).eval()
        codes = codes_of(ours)
        index = flat_index(codes)
        impls = [Impl("vqcore", eval_call(ours, x)), Impl("faiss IndexFlatL2.search", faiss_search(index, x))]
        with_reference = size <= 2**16
        if with_reference:
            impls.append(Impl("reference (defaults)", eval_call(quantizer("reference", size), x)))
        rows = run_case(
            f"eval{size} dim=256 K={size} x(8,1024,256)", impls, cfg, reps=3, warmup=1, quick=(1, 0)
        )
        with torch.no_grad():
            _, indices, _ = ours(x)
        rows[0].note += "; " + index_agreement(indices, index, x, codes)
        if not with_reference:
            rows[0].note += "; the reference is not run: its tokens x codes matrices take 8 GiB each here"
        if size == 2**18:
            rows[1].target, rows[1].passed = "vqcore <= 1.1x faiss", 1 / rows[1].ratio <= 1.1
        names = [f"eval:{size}", f"train:{size}", f"faiss:{size}"]
        peaks = harness.child_results(__file__, names, timeout=1800)
        for name in names:
            info = peaks[name]
            what = {"eval": "vqcore eval call", "train": "vqcore training step", "faiss": "faiss search"}
            row = Row(rows[0].case, f"peak: {what[name.split(':')[0]]}", info["ms"], [info["ms"]])
            row.peak_mib = info["peak_above_baseline_mib"]
            if name.startswith(("eval", "train")):
                row.target = f"peak <= {PEAK_TARGET_MIB:g} MiB"
                row.passed = row.peak_mib <= PEAK_TARGET_MIB
            row.ratio = info["ms"] / rows[0].median_ms
            rows.append(row)
        return rows

    return run


def case_scaling(cfg: Config) -> list[Row]:
    rows: list[Row] = []
    results = []
    for size in SCALING_SIZES:
        x = torch.randn(*SCALING_SHAPE, generator=torch.Generator().manual_seed(4))
        ours = quantizer("vqcore", size).eval()
        index = flat_index(codes_of(ours))
        impls = [
            Impl("vqcore", eval_call(ours, x)),
            Impl("faiss IndexFlatL2.search", faiss_search(index, x)),
            Impl("reference (defaults)", eval_call(quantizer("reference", size), x)),
        ]
        part = run_case(f"scaling K={size} x(1,1024,256)", impls, cfg, reps=3, warmup=1, quick=(1, 0))
        del impls, ours, index
        names = [f"scale-{lib}:{size}" for lib in ("vqcore", "faiss", "reference")]
        peaks = harness.child_results(__file__, names, timeout=1800)
        for row, name in zip(part, names, strict=True):
            row.peak_mib = peaks[name]["peak_above_baseline_mib"]
        rows += part
        results.append({"size": size, **{r.impl: {"ms": r.median_ms, "peak_mib": r.peak_mib} for r in part}})
        print(f"scaling: {size} codes done", file=sys.stderr, flush=True)
    if not cfg.quick:
        plot(results)
        rows[0].note += f"; figure: {FIGURE.name}"
    return rows


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, style in (
        ("vqcore", "o-"),
        ("faiss IndexFlatL2.search", "s--"),
        ("reference (defaults)", "^:"),
    ):
        left.plot(sizes, [r[impl]["ms"] for r in results], style, label=impl)
        right.plot(sizes, [max(r[impl]["peak_mib"], 0.1) for r in results], style, label=impl)
    for ax, label in ((left, "time per call (ms)"), (right, "peak memory above setup (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size (codes of 256 features)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    left.legend()
    fig.suptitle("Exact nearest-code search, 1024 tokens, 2 CPU threads (eval forward; faiss: search)")
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)


def child(name: str) -> None:
    """``eval:K`` / ``train:K`` (vqcore), ``faiss:K``, ``scale-LIB:K``: one call in this fresh process."""
    harness.child_setup()
    faiss.omp_set_num_threads(harness.THREADS)
    kind, size = name.split(":")
    size = int(size)
    shape = SCALING_SHAPE if kind.startswith("scale") else SHAPE
    x = torch.randn(*shape)
    lib = kind.split("-")[1] if kind.startswith("scale") else ("faiss" if kind == "faiss" else "vqcore")
    if lib == "faiss":
        index = flat_index(codes_of(quantizer("vqcore", size)))
        index.search(np.ascontiguousarray(x[0, :4].numpy()), 1)
        call = faiss_search(index, x)
    else:
        module = quantizer(lib, size)
        make = train_call if kind == "train" else eval_call
        make(module, x[:, :4])()  # warm-up on a tiny input
        call = make(module, x)
    print(json.dumps(harness.measure_peak(call)))


CASES = {
    "eval1024": case_eval1024,
    "kmeans": case_kmeans,
    "eval65536": large(2**16),
    "eval262144": large(2**18),
    "scaling": case_scaling,
}


if __name__ == "__main__":
    faiss.omp_set_num_threads(harness.THREADS)
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="faiss_latest", default_wait_s=30.0, child=child
        )
    )
