"""VectorQuantize benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference") vs the GEMM floor.

Run from the repository root::

    .venv/bin/python benchmarks/bench_vq.py            # full suite (~3-6 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_vq.py --quick    # smoke mode: same shapes, 2 reps
    .venv/bin/python benchmarks/bench_vq.py --only train8192,kmeans

Every timed case runs all its implementations in this one process, interleaved: each repetition calls
every implementation once (round-robin, the order rotated by one per repetition), after warm-up calls.
The table reports medians and ``ratio = impl median / vqcore median`` (> 1: vqcore is faster).
Absolute times are noise on shared machines (DESIGN.md §5); the ratios are the result.

The memory case (mem65536) measures each implementation in its own fresh subprocess: the RSS high-water
mark of one eval forward above a baseline taken after the setup (imports, model, input, one warm-up
forward on a tiny input).

See benchmarks/README.md for what each case and the "floor" compute.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

THREADS = 2
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 2**20


# ---------------------------------------------------------------------------------------------------
# implementations
# ---------------------------------------------------------------------------------------------------
def build(lib: str, cls: str, **kwargs):
    """``cls(**kwargs)`` from vqcore (``lib == "vqcore"``) or from the reference package
    (any other ``lib``).
    """
    if lib == "vqcore":
        import vqcore as package
    else:
        import vector_quantize_pytorch as package
    return getattr(package, cls)(**kwargs)


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
    with torch.no_grad():
        q = codes[floor_indices(x, codes)]
    out = x + (q - x).detach()
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


def _codes_of(vq) -> torch.Tensor:
    return vq.codebook.detach().reshape(-1, vq.codebook.shape[-1]).clone()


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
@dataclass
class Impl:
    name: str
    call: Callable[[], object]
    before: Callable[[], None] | None = None  # untimed, before every call (e.g. clear x.grad)


@dataclass
class Row:
    case: str
    impl: str
    median_ms: float
    times_ms: list[float] = field(default_factory=list)
    ratio: float | None = None  # impl median / vqcore median
    paired_ratio: float | None = None  # median over rounds of impl / vqcore in the same round
    target: str = ""
    passed: bool | None = None
    peak_mib: float | None = None
    note: str = ""


def _busy_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all cores; steal counts as busy)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


class Noise:
    """CPU time used by *other* processes (and the hypervisor), to detect disturbed measurements.

    The machine has 2 cores and our timed calls use both (torch.set_num_threads(2)): any other busy
    process makes the OpenMP threads wait on each other and slows GEMM-heavy code several-fold, more
    than memory-bound code, so ratios measured under foreign load are biased, not just noisy.
    """

    def __init__(self, wait_budget_s: float):
        self.wait_budget_s = wait_budget_s
        self.waited_s = 0.0

    @staticmethod
    def start() -> tuple[float, float, float]:
        return time.perf_counter(), _busy_s(), _own_s()

    @staticmethod
    def foreign_s(mark: tuple[float, float, float]) -> tuple[float, float]:
        """(wall seconds, foreign CPU seconds) since mark."""
        wall = time.perf_counter() - mark[0]
        return wall, max(0.0, (_busy_s() - mark[1]) - (_own_s() - mark[2]))

    @staticmethod
    def disturbed(wall: float, foreign: float) -> bool:
        # /proc/stat ticks are 10 ms per core: allow 30 ms of slack, then 10% of a core
        return foreign > 0.03 + 0.10 * wall

    def wait_idle(self, window_s: float = 0.25) -> None:
        """Sleep until other processes use < 10% of a core over a window, within the wait budget."""
        while self.waited_s < self.wait_budget_s:
            mark = self.start()
            time.sleep(window_s)
            wall, foreign = self.foreign_s(mark)
            self.waited_s += wall
            if foreign <= 0.10 * wall + 0.01:
                return


@dataclass
class Timing:
    times: dict[str, list[float]]
    rounds: int = 0  # rounds kept
    discarded: int = 0  # disturbed rounds re-run
    kept_disturbed: int = 0  # disturbed rounds kept because the retry budget ran out
    waited_s: float = 0.0


def interleaved(impls: list[Impl], reps: int, warmup: int, noise: Noise | None = None) -> Timing:
    """Round-robin timing; the starting implementation rotates every round.

    A round during which other processes used CPU (see :class:`Noise`) is discarded and re-run, up to
    ``reps + 2`` extra rounds per case and the noise object's wait budget; then disturbed rounds are kept
    and counted.
    """
    for _ in range(warmup):
        for impl in impls:
            if impl.before:
                impl.before()
            impl.call()
    timing = Timing({impl.name: [] for impl in impls})
    retries_left = reps + 2
    attempt = 0
    gc.collect()
    gc.disable()
    try:
        while timing.rounds < reps:
            if noise is not None:
                noise.wait_idle()
            shift = attempt % len(impls)
            attempt += 1
            mark = Noise.start()
            this_round = {}
            for impl in impls[shift:] + impls[:shift]:
                if impl.before:
                    impl.before()
                start = time.perf_counter()
                impl.call()
                this_round[impl.name] = (time.perf_counter() - start) * 1e3
            wall, foreign = Noise.foreign_s(mark)
            if noise is not None and Noise.disturbed(wall, foreign):
                budget_left = noise.waited_s < noise.wait_budget_s
                if retries_left > 0 and budget_left:
                    retries_left -= 1
                    timing.discarded += 1
                    continue
                timing.kept_disturbed += 1
            for name, ms in this_round.items():
                timing.times[name].append(ms)
            timing.rounds += 1
    finally:
        gc.enable()
    if noise is not None:
        timing.waited_s = noise.waited_s
    return timing


def rows_from_timing(case: str, timing: Timing, base: str = "vqcore") -> list[Row]:
    times = timing.times
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, ts in times.items():
        paired = statistics.median([t / b for t, b in zip(ts, times[base])])
        rows.append(
            Row(case, name, medians[name], ts, ratio=medians[name] / medians[base], paired_ratio=paired)
        )
    rows[0].note = (
        f"{timing.rounds} rounds kept, {timing.discarded} disturbed rounds re-run, "
        f"{timing.kept_disturbed} disturbed rounds kept, {timing.waited_s:.0f} s waited for idle CPUs"
    )
    return rows


def run_case(
    case: str, impls: list[Impl], cfg, reps: int, warmup: int, quick: tuple[int, int] = (2, 1)
) -> list[Row]:
    """Time ``impls`` interleaved: ``reps`` rounds after ``warmup`` rounds
    (``quick`` = both under --quick).
    """
    reps, warmup = quick if cfg.quick else (reps, warmup)
    timing = interleaved(impls, reps, warmup, Noise(cfg.wait_budget_s))
    return rows_from_timing(case, timing)


def target_faster(row: Row, factor: float) -> None:
    """Reference rows: vqcore must be >= factor times faster."""
    row.target = f"vqcore >= {factor:g}x faster"
    row.passed = row.ratio >= factor


def target_floor(row: Row, factor: float) -> None:
    """Floor rows: vqcore must be within factor of the floor (vqcore / floor <= factor)."""
    row.target = f"vqcore <= {factor:g}x floor"
    row.passed = (1.0 / row.ratio) <= factor


# ---------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------
def _train_impls(dim: int, size: int, shape: tuple[int, ...], with_rotation_row: bool) -> list[Impl]:
    torch.manual_seed(0)
    x = torch.randn(*shape).requires_grad_()

    def clear():
        x.grad = None

    def train_step(module):
        module.train()

        def call():
            quantized, _, loss = module(x)
            (quantized.sum() + loss).backward()

        return call

    ours = make_vqcore(dim, size)
    impls = [Impl("vqcore", train_step(ours), clear)]
    if with_rotation_row:
        impls.append(
            Impl(
                "vqcore (rotation_trick=True)", train_step(make_vqcore(dim, size, rotation_trick=True)), clear
            )
        )
    impls += [
        Impl("reference (defaults: rotation_trick=True)", train_step(make_reference(dim, size)), clear),
        Impl(
            "reference (rotation_trick=False)",
            train_step(make_reference(dim, size, rotation_trick=False)),
            clear,
        ),
    ]
    codes = _codes_of(ours)
    impls.append(Impl("floor (GEMM+argmin+gather+STE backward)", lambda: floor_train(x, codes), clear))
    return impls


def _eval_impls(dim: int, size: int, shape: tuple[int, ...]) -> list[Impl]:
    torch.manual_seed(0)
    x = torch.randn(*shape)

    def eval_step(module):
        module.eval()

        def call():
            with torch.no_grad():
                return module(x)

        return call

    ours = make_vqcore(dim, size)
    codes = _codes_of(ours)
    return [
        Impl("vqcore", eval_step(ours)),
        Impl("reference (defaults: rotation_trick=True)", eval_step(make_reference(dim, size))),
        Impl("reference (rotation_trick=False)", eval_step(make_reference(dim, size, rotation_trick=False))),
        Impl("floor (GEMM+argmin+gather)", lambda: floor_eval(x, codes)),
    ]


def _mark(rows: list[Row], ref: float | None, floor: float | None) -> list[Row]:
    for row in rows:
        if row.impl.startswith("reference") and ref is not None:
            target_faster(row, ref)
        elif row.impl.startswith("floor") and floor is not None:
            target_floor(row, floor)
    return rows


def case_train1024(cfg) -> list[Row]:
    impls = _train_impls(256, 1024, (8, 1024, 256), with_rotation_row=True)
    rows = run_case("a. train dim=256 K=1024 x(8,1024,256)", impls, cfg, reps=15, warmup=2)
    return _mark(rows, ref=3.0, floor=2.0)


def case_eval1024(cfg) -> list[Row]:
    impls = _eval_impls(256, 1024, (8, 1024, 256))
    rows = run_case("a. eval dim=256 K=1024 x(8,1024,256)", impls, cfg, reps=15, warmup=2)
    return _mark(rows, ref=3.0, floor=1.3)


def case_train8192(cfg) -> list[Row]:
    impls = _train_impls(256, 8192, (8, 1024, 256), with_rotation_row=False)
    rows = run_case("b. train dim=256 K=8192 x(8,1024,256)", impls, cfg, reps=7, warmup=1)
    return _mark(rows, ref=3.0, floor=None)


MEM_SHAPE = (8, 1024, 64)
MEM_DIM, MEM_SIZE = 64, 65536
MEM_IMPLS = ["vqcore", "reference (defaults: rotation_trick=True)", "floor (GEMM+argmin+gather)"]


def case_mem65536(cfg) -> list[Row]:
    """Peak memory in fresh subprocesses, then interleaved timing in this process."""
    peaks = {}
    for name in MEM_IMPLS:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_mem-child", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory child for {name!r} failed:\n{out.stderr[-4000:]}")
        peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])

    torch.manual_seed(0)
    x = torch.randn(*MEM_SHAPE)
    ours = make_vqcore(MEM_DIM, MEM_SIZE).eval()
    ref = make_reference(MEM_DIM, MEM_SIZE).eval()
    codes = _codes_of(ours)

    def ev(module):
        def call():
            with torch.no_grad():
                module(x)

        return call

    impls = [
        Impl(MEM_IMPLS[0], ev(ours)),
        Impl(MEM_IMPLS[1], ev(ref)),
        Impl(MEM_IMPLS[2], lambda: floor_eval(x, codes)),
    ]
    rows = run_case("c. eval dim=64 K=65536 x(8,1024,64)", impls, cfg, reps=3, warmup=1, quick=(1, 0))
    del ours, ref, impls
    gc.collect()
    for row in rows:
        info = peaks[row.impl]
        row.peak_mib = info["peak_above_baseline_mib"]
        row.note = "; ".join(
            filter(
                None,
                [
                    row.note,
                    f"peak: baseline RSS {info['baseline_mib']:.0f} MiB ({info['method']}), "
                    f"first forward {info['first_forward_ms']:.0f} ms in its fresh process",
                ],
            )
        )
        if row.impl == "vqcore":
            row.target = "peak <= 64 MiB"
            row.passed = row.peak_mib <= 64
    return rows


def case_kmeans(cfg) -> list[Row]:
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
    return _mark(rows, ref=3.0, floor=None)


CASES: dict[str, Callable] = {
    "train1024": case_train1024,
    "eval1024": case_eval1024,
    "train8192": case_train8192,
    "mem65536": case_mem65536,
    "kmeans": case_kmeans,
}


# ---------------------------------------------------------------------------------------------------
# memory child
# ---------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_child(name: str) -> None:
    torch.set_num_threads(THREADS)
    import vector_quantize_pytorch  # noqa: F401  (same imports in every child)

    import vqcore  # noqa: F401

    torch.manual_seed(0)
    if name == "vqcore":
        module = make_vqcore(MEM_DIM, MEM_SIZE).eval()
    elif name.startswith("reference"):
        module = make_reference(MEM_DIM, MEM_SIZE).eval()
    else:
        codes = _codes_of(make_vqcore(MEM_DIM, MEM_SIZE))
        module = lambda t: floor_eval(t, codes)
    x = torch.randn(*MEM_SHAPE)
    with torch.no_grad():
        module(torch.randn(1, 8, MEM_DIM))  # warm-up on a tiny input: lazy inits, kernels, thread pool
    gc.collect()
    if _reset_hwm():
        method, baseline = "VmHWM reset after setup", _status_kib("VmRSS")
    else:
        method, baseline = "VmHWM after setup", _status_kib("VmHWM")
    start = time.perf_counter()
    with torch.no_grad():
        out = module(x)
    elapsed = (time.perf_counter() - start) * 1e3
    peak = _status_kib("VmHWM")
    del out
    print(
        json.dumps(
            {
                "impl": name,
                "baseline_mib": baseline / 1024,
                "peak_mib": peak / 1024,
                "peak_above_baseline_mib": (peak - baseline) / 1024,
                "first_forward_ms": elapsed,
                "method": method,
            }
        )
    )


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def _fmt_ms(v: float) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| case | impl | median ms | ratio vs vqcore | paired | peak MiB above input | target | pass/fail |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        peak = "" if r.peak_mib is None else f"{r.peak_mib:.1f}"
        ratio = "1.00" if r.impl == "vqcore" else f"{r.ratio:.2f}"
        paired = "" if r.impl == "vqcore" or r.paired_ratio is None else f"{r.paired_ratio:.2f}"
        verdict = "" if r.passed is None else ("PASS" if r.passed else "FAIL")
        lines.append(
            f"| {r.case} | {r.impl} | {_fmt_ms(r.median_ms)} | {ratio} | {paired} | {peak} "
            f"| {r.target} | {verdict} |"
        )
    return "\n".join(lines)


def header(load_before, load_after, wall_s, quick) -> str:
    from importlib.metadata import version

    import vector_quantize_pytorch  # noqa: F401

    return "\n".join(
        [
            f"- date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            f"- machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; "
            f"torch.set_num_threads({THREADS})",
            f"- torch {torch.__version__}, vector-quantize-pytorch {version('vector-quantize-pytorch')}, "
            f"vqcore {version('vqcore')}, python {platform.python_version()}",
            f"- load average before/after: {load_before:.2f} / {load_after:.2f}; rounds during which other "
            "processes used CPU are re-run (see the notes under the table)",
            f"- mode: {'quick (smoke)' if quick else 'full'}; wall time {wall_s:.0f} s",
            "- ratio = impl median / vqcore median (> 1: vqcore faster); floor rows pass when "
            "vqcore / floor <= the factor; `paired` = median over rounds of impl / vqcore "
            "within the same round",
        ]
    )


@dataclass
class Config:
    quick: bool
    wait_budget_s: float  # per case: how long to wait for other processes to go quiet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 reps, 1 warm-up")
    parser.add_argument("--only", default=None, help=f"comma-separated cases among {', '.join(CASES)}")
    parser.add_argument(
        "--wait",
        type=float,
        default=None,
        help="seconds per case to wait for other processes to leave the CPUs (default 60; 5 with --quick)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    parser.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.mem_child:
        mem_child(args.mem_child)
        return 0

    torch.set_num_threads(THREADS)
    names = list(CASES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose among {list(CASES)}")
    cfg = Config(args.quick, args.wait if args.wait is not None else (5.0 if args.quick else 60.0))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows: list[Row] = []
    for name in names:
        t0 = time.perf_counter()
        case_rows = CASES[name](cfg)
        rows += case_rows
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        print(table(case_rows), file=sys.stderr, flush=True)
        gc.collect()
    wall = time.perf_counter() - start
    report = header(load_before, os.getloadavg()[0], wall, args.quick) + "\n\n" + table(rows) + "\n"
    notes = [f"- {r.case} / {r.impl}: {r.note}" for r in rows if r.note]
    if notes:
        report += "\n" + "\n".join(notes) + "\n"
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latest.md").write_text(report)
        (RESULTS / "latest.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    failed = [r for r in rows if r.passed is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
