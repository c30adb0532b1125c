"""VectorQuantize benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference") vs the GEMM floor.

Run from the repository root::

    .venv/bin/python benchmarks/bench_vq.py            # full suite (~3-6 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_vq.py --quick    # smoke mode: same shapes, 2 reps
    .venv/bin/python benchmarks/bench_vq.py --only train8192,kmeans

Every timed case runs all its implementations in this one process, interleaved: each repetition calls
every implementation once (round-robin, the order rotated by one per repetition), after warm-up calls.
The table reports medians and ``ratio = impl median / vqcore median`` (> 1: vqcore is faster).
Absolute times are noise on shared machines; the ratios are the result.

The memory case (mem65536) measures each implementation in its own fresh subprocess: the RSS high-water
mark of one eval forward above a baseline taken after the setup (imports, model, input, one warm-up
forward on a tiny input).

Timing, noise handling, the table and the command line come from harness.py; benchmarks/README.md
describes what each case and the "floor" compute.
"""

from __future__ import annotations

import gc
import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, mark_targets, run_case, train_call

MEM_SHAPE = (8, 1024, 64)
MEM_DIM, MEM_SIZE = 64, 65536
MEM_IMPLS = ["vqcore", "reference (defaults: rotation_trick=True)", "floor (GEMM+argmin+gather)"]


# -- implementations ---------------------------------------------------------------------------------


def make_vqcore(dim: int, size: int, **kwargs):
    return build("vqcore", "VectorQuantize", dim=dim, codebook_size=size, **kwargs)


def make_reference(dim: int, size: int, **kwargs):
    return build("reference", "VectorQuantize", dim=dim, codebook_size=size, **kwargs)


def floor_indices(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The GEMM floor's code choice, exactly: one GEMM + one argmin, no chunking, no buffer reuse."""
    return (codes.pow(2).sum(-1) - 2 * x @ codes.T).argmin(-1)


def floor_eval(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Floor, eval: code choice + gather of the chosen codes."""
    with torch.no_grad():
        return codes[floor_indices(x, codes)]


def floor_train(x: torch.Tensor, codes: torch.Tensor) -> None:
    """Floor, train: code choice (no grad) + gather + straight-through estimator + backward of out.sum().

    No loss, no EMA update, no statistics: only what any VQ training step must do.
    """
    leaf = x.detach().requires_grad_(True)
    with torch.no_grad():
        q = codes[floor_indices(leaf, codes)]
    out = leaf + (q - leaf).detach()
    out.sum().backward()


def floor_kmeans(x: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Floor for k-means: ``iters`` x (floor assignment, bincount, index_add_ sums, mean),
    first k points as seeds.
    """
    means = x[:k].clone()
    for _ in range(iters):
        idx = floor_indices(x, means)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        sums = torch.zeros_like(means).index_add_(0, idx, x)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], means)
    return means


def codes_of(vq) -> torch.Tensor:
    """A (K, d) copy of a VectorQuantize's codes, for the floors."""
    return vq.codebook.detach().reshape(-1, vq.codebook.shape[-1]).clone()


# -- cases -------------------------------------------------------------------------------------------


def train_impls(dim: int, size: int, shape: tuple[int, ...], with_rotation_row: bool) -> list[Impl]:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    ours = make_vqcore(dim, size)
    impls = [Impl("vqcore", train_call(ours, x))]
    if with_rotation_row:
        rotation = make_vqcore(dim, size, rotation_trick=True)
        impls.append(Impl("vqcore (rotation_trick=True)", train_call(rotation, x)))
    impls += [
        Impl("reference (defaults: rotation_trick=True)", train_call(make_reference(dim, size), x)),
        Impl(
            "reference (rotation_trick=False)", train_call(make_reference(dim, size, rotation_trick=False), x)
        ),
    ]
    codes = codes_of(ours)
    impls.append(Impl("floor (GEMM+argmin+gather+STE backward)", lambda: floor_train(x, codes)))
    return impls


def eval_impls(dim: int, size: int, shape: tuple[int, ...]) -> list[Impl]:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    ours = make_vqcore(dim, size)
    codes = codes_of(ours)
    return [
        Impl("vqcore", eval_call(ours, x)),
        Impl("reference (defaults: rotation_trick=True)", eval_call(make_reference(dim, size), x)),
        Impl(
            "reference (rotation_trick=False)", eval_call(make_reference(dim, size, rotation_trick=False), x)
        ),
        Impl("floor (GEMM+argmin+gather)", lambda: floor_eval(x, codes)),
    ]


def case_train1024(cfg: Config) -> list[Row]:
    impls = train_impls(256, 1024, (8, 1024, 256), with_rotation_row=True)
    rows = run_case("a. train dim=256 K=1024 x(8,1024,256)", impls, cfg, reps=15, warmup=2)
    return mark_targets(rows, ref=3.0, floor=2.0)


def case_eval1024(cfg: Config) -> list[Row]:
    impls = eval_impls(256, 1024, (8, 1024, 256))
    rows = run_case("a. eval dim=256 K=1024 x(8,1024,256)", impls, cfg, reps=15, warmup=2)
    return mark_targets(rows, ref=3.0, floor=1.3)


def case_train8192(cfg: Config) -> list[Row]:
    impls = train_impls(256, 8192, (8, 1024, 256), with_rotation_row=False)
    rows = run_case("b. train dim=256 K=8192 x(8,1024,256)", impls, cfg, reps=7, warmup=1)
    return mark_targets(rows, ref=3.0)


def case_mem65536(cfg: Config) -> list[Row]:
    """Peak memory in fresh subprocesses, then interleaved timing in this process."""
    peaks = harness.child_results(__file__, MEM_IMPLS)
    torch.manual_seed(0)
    x = torch.randn(*MEM_SHAPE)
    ours = make_vqcore(MEM_DIM, MEM_SIZE)
    ref = make_reference(MEM_DIM, MEM_SIZE)
    codes = codes_of(ours)
    impls = [
        Impl(MEM_IMPLS[0], eval_call(ours, x)),
        Impl(MEM_IMPLS[1], eval_call(ref, x)),
        Impl(MEM_IMPLS[2], lambda: floor_eval(x, codes)),
    ]
    rows = run_case("c. eval dim=64 K=65536 x(8,1024,64)", impls, cfg, reps=3, warmup=1, quick=(1, 0))
    del ours, ref, impls
    gc.collect()
    harness.attach_peaks(
        rows,
        peaks,
        lambda info: (
            f"peak: baseline RSS {info['baseline_mib']:.0f} MiB ({info['method']}), "
            f"first forward {info['ms']:.0f} ms in its fresh process"
        ),
    )
    for row in rows:
        if row.impl == "vqcore":
            row.target = "peak <= 64 MiB"
            row.passed = row.peak_mib <= 64
    return rows


def case_kmeans(cfg: Config) -> list[Row]:
    from vector_quantize_pytorch.vector_quantize_pytorch import kmeans as reference_kmeans

    import vqcore.blocks.kmeans as vqk

    torch.manual_seed(0)
    x = torch.randn(8192, 256)
    seed_means = vqk.seed_means

    def random_seeds(x, k, valid=None, generator=None):  # the reference's seeding: k distinct random tokens
        return x[:, torch.randperm(x.shape[1], generator=generator)[:k]].clone()

    def lloyd_only():
        vqk.seed_means = random_seeds
        try:
            vqk.kmeans(x[None], 1024, 10)
        finally:
            vqk.seed_means = seed_means

    impls = [
        Impl("vqcore", lambda: vqk.kmeans(x[None], 1024, 10)),
        Impl("reference", lambda: reference_kmeans(x[None], 1024, 10)),
        Impl("floor (10 x GEMM+argmin, bincount, index_add_)", lambda: floor_kmeans(x, 1024, 10)),
        Impl(
            "info: vqcore seeding only (vqcore.blocks.kmeans.seed_means)", lambda: seed_means(x[None], 1024)
        ),
        Impl("info: vqcore with random seeds (Lloyd iterations only)", lloyd_only),
    ]
    rows = run_case("d. k-means 10 iters, 8192 x 256 -> 1024", impls, cfg, reps=7, warmup=1)
    return mark_targets(rows, ref=3.0)


CASES = {
    "train1024": case_train1024,
    "eval1024": case_eval1024,
    "train8192": case_train8192,
    "mem65536": case_mem65536,
    "kmeans": case_kmeans,
}


def mem_child(name: str) -> None:
    """One eval forward of ``name`` (one of MEM_IMPLS) at full size, in this fresh process."""
    harness.child_setup()
    if name == "vqcore":
        module = make_vqcore(MEM_DIM, MEM_SIZE).eval()
    elif name.startswith("reference"):
        module = make_reference(MEM_DIM, MEM_SIZE).eval()
    else:
        codes = codes_of(make_vqcore(MEM_DIM, MEM_SIZE))
        module = lambda t: floor_eval(t, codes)
    x = torch.randn(*MEM_SHAPE)
    with torch.no_grad():
        module(torch.randn(1, 8, MEM_DIM))  # warm-up on a tiny input: lazy inits, kernels, thread pool
        result = harness.measure_peak(lambda: module(x))
    print(json.dumps({"impl": name, **result}))


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="latest", default_wait_s=60.0, child=mem_child
        )
    )
