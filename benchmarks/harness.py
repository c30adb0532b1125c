"""The timing harness every CPU benchmark script shares (imported as ``harness``: a script run as
``python benchmarks/bench_x.py`` has this folder on sys.path).

- implementations: :func:`build` (vqcore or the reference by class name), :func:`train_call`,
  :func:`eval_call`;
- timing: :func:`interleaved` (round-robin, rotated, rounds disturbed by other processes re-run; see
  :class:`Noise`), :func:`rows_from_timing`, :func:`run_case`, targets;
- peak memory in fresh subprocesses: :func:`measure_peak` (in the child), :func:`child_results` and
  :func:`attach_peaks` (in the parent);
- the report and the command line: :func:`table`, :func:`header`, :func:`main`.

benchmarks/README.md describes the method.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results"
CHILD_FLAG = "--_child"

# -- implementations ---------------------------------------------------------------------------------


def build(lib: str, cls: str, **kwargs):
    """``cls(**kwargs)`` from vqcore (``lib == "vqcore"``), or from the reference for any other ``lib``."""
    if lib == "vqcore":
        import vqcore as package
    else:
        import vector_quantize_pytorch as package
    return getattr(package, cls)(**kwargs)


def train_call(module, x: torch.Tensor) -> Callable[[], None]:
    """A training step of ``module`` on a fresh leaf copy of ``x``: forward, then the backward of
    ``quantized.sum()`` plus the losses (``out[2]``) where the method returns them."""
    module.train()

    def call():
        leaf = x.detach().requires_grad_(True)
        out = module(leaf)
        loss = out[0].sum()
        if len(out) > 2:
            loss = loss + out[2].sum()
        loss.backward()

    return call


def eval_call(module, x: torch.Tensor) -> Callable[[], object]:
    """An eval forward of ``module`` on ``x`` under ``no_grad``."""
    module.eval()

    def call():
        with torch.no_grad():
            return module(x)

    return call


# -- timing ------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One round times ``repeat`` back-to-back calls of ``call`` and records their mean. ``repeat=None``
    (the default) picks it after the warm-up so that a round of this implementation lasts at least
    ``MIN_ROUND_MS``: a single call of a millisecond step measures the thread pool's wake-up after the idle
    wait (and whichever implementation runs first in a round pays it) rather than the step."""

    name: str
    call: Callable[[], object]
    repeat: int | None = None


MIN_ROUND_MS = 20.0


def _auto_repeat(impl: Impl) -> int:
    if impl.repeat is not None:
        return impl.repeat
    start = time.perf_counter()
    impl.call()
    once_ms = (time.perf_counter() - start) * 1e3
    return max(1, min(50, math.ceil(MIN_ROUND_MS / max(once_ms, 1e-3))))


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


@dataclass
class Config:
    quick: bool
    wait_budget_s: float  # per case: how long to wait for other processes to go quiet


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
    times: dict[str, list[float]]  # ms per kept round, by implementation
    rounds: int = 0  # rounds kept
    discarded: int = 0  # disturbed rounds re-run
    kept_disturbed: int = 0  # disturbed rounds kept because the retry budget ran out
    waited_s: float = 0.0


def interleaved(impls: Sequence[Impl], reps: int, warmup: int, noise: Noise | None = None) -> Timing:
    """Round-robin timing; the starting implementation rotates every round.

    With ``noise``, a round during which other processes used CPU (see :class:`Noise`) is discarded and
    re-run, up to ``reps + 2`` extra rounds per case and the noise object's wait budget; then disturbed
    rounds are kept and counted.
    """
    impls = list(impls)
    for _ in range(warmup):
        for impl in impls:
            impl.call()
    repeats = {impl.name: _auto_repeat(impl) for impl in impls}
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
                start = time.perf_counter()
                for _ in range(repeats[impl.name]):
                    impl.call()
                this_round[impl.name] = (time.perf_counter() - start) * 1e3 / repeats[impl.name]
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
    """One row per implementation: median, ratio and paired ratio against ``base``."""
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
    case: str, impls: Sequence[Impl], cfg: Config, reps: int, warmup: int, quick: tuple[int, int] = (2, 1)
) -> list[Row]:
    """Time ``impls`` interleaved: ``reps`` rounds after ``warmup`` rounds (``quick`` = both under
    --quick)."""
    reps, warmup = quick if cfg.quick else (reps, warmup)
    return rows_from_timing(case, interleaved(impls, reps, warmup, Noise(cfg.wait_budget_s)))


def target_no_slower(rows: list[Row]) -> list[Row]:
    """The reference's row (``rows[1]``) of a vqcore-against-reference pair gets the target "vqcore no
    slower" (ratio >= 0.9, the noise margin of these runs)."""
    rows[1].target = "vqcore no slower (ratio >= 0.9)"
    rows[1].passed = rows[1].ratio >= 0.9
    return rows


def side_by_side(case: str, impls: Sequence[Impl], cfg: Config, reps: int = 9, warmup: int = 2) -> list[Row]:
    """vqcore's and the reference's calls (``impls``, vqcore first) timed interleaved after seeding torch,
    with the target "vqcore no slower" (:func:`target_no_slower`)."""
    torch.manual_seed(0)
    return target_no_slower(run_case(case, impls, cfg, reps, warmup))


def target_faster(row: Row, factor: float) -> None:
    """Reference rows: vqcore must be >= factor times faster."""
    row.target = f"vqcore >= {factor:g}x faster"
    row.passed = row.ratio >= factor


def target_floor(row: Row, factor: float) -> None:
    """Floor rows: vqcore must be within factor of the floor (vqcore / floor <= factor)."""
    row.target = f"vqcore <= {factor:g}x floor"
    row.passed = (1.0 / row.ratio) <= factor


def mark_targets(rows: list[Row], ref: float | None, floor: float | None = None) -> list[Row]:
    """``target_faster(ref)`` on every reference row, ``target_floor(floor)`` on every floor row."""
    for row in rows:
        if row.impl.startswith("reference") and ref is not None:
            target_faster(row, ref)
        elif row.impl.startswith("floor") and floor is not None:
            target_floor(row, floor)
    return rows


# -- peak memory, one implementation per fresh subprocess ---------------------------------------------


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


def child_setup() -> None:
    """What every memory child does first, so that their baselines compare: the same threads, the same
    imports (torch, vqcore and the reference), the same seed."""
    torch.set_num_threads(THREADS)
    import vector_quantize_pytorch  # noqa: F401

    import vqcore  # noqa: F401

    torch.manual_seed(0)


def measure_peak(call: Callable[[], object]) -> dict:
    """Run ``call`` once (setup and warm-up done before): its wall time and the RSS high-water mark it
    adds above the RSS after setup (VmHWM reset to the current RSS; where that is refused, the baseline
    is the high-water mark after setup)."""
    gc.collect()
    if _reset_hwm():
        method, baseline = "VmHWM reset after setup", _status_kib("VmRSS")
    else:
        method, baseline = "VmHWM after setup", _status_kib("VmHWM")
    start = time.perf_counter()
    out = call()
    elapsed = (time.perf_counter() - start) * 1e3
    peak = _status_kib("VmHWM")
    del out
    return {
        "ms": elapsed,
        "baseline_mib": baseline / 1024,
        "peak_mib": peak / 1024,
        "peak_above_baseline_mib": (peak - baseline) / 1024,
        "method": method,
    }


def child_results(script: str, names: Sequence[str], timeout: float | None = None) -> dict[str, dict]:
    """Run ``python script --_child NAME`` for each name in a fresh process; -> the JSON object each
    printed last, by name."""
    results = {}
    for name in names:
        out = subprocess.run(
            [sys.executable, str(Path(script).resolve()), CHILD_FLAG, name],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory child for {name!r} failed:\n{out.stderr[-4000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def peak_memory_rows(case: str, script: str, timeout: float = 600) -> list[Row]:
    """The side-by-side peak-memory case of ``script``: its ``child("vqcore")`` and ``child("reference")``
    each run one step in a fresh process (:func:`child_results`); two rows with their wall times and peak
    RSS above baseline, the reference's row carrying the target "vqcore peak <= reference peak (+10%)"."""
    results = child_results(script, ["vqcore", "reference"], timeout=timeout)
    ours, ref = results["vqcore"], results["reference"]
    rows = [
        Row(case, "vqcore", ours["ms"], [ours["ms"]], ratio=1.0),
        Row(case, "reference", ref["ms"], [ref["ms"]], ratio=ref["ms"] / ours["ms"]),
    ]
    for row, info in zip(rows, (ours, ref), strict=True):
        row.peak_mib = info["peak_above_baseline_mib"]
    rows[1].target = "vqcore peak <= reference peak (+10%)"
    rows[1].passed = ours["peak_above_baseline_mib"] <= 1.1 * ref["peak_above_baseline_mib"] + 0.5
    rows[0].note = f"one step per fresh process ({ours['method']})"
    return rows


def attach_peaks(rows: list[Row], peaks: dict[str, dict], describe: Callable[[dict], str]) -> list[Row]:
    """Give each row its implementation's peak from :func:`child_results` (``peak_above_baseline_mib``),
    and ``describe(that child's result)`` after the row's note."""
    for row in rows:
        info = peaks[row.impl]
        row.peak_mib = info["peak_above_baseline_mib"]
        row.note = "; ".join(filter(None, [row.note, describe(info)]))
    return rows


# -- report and command line ---------------------------------------------------------------------------


def _fmt_ms(v: float) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def table(rows: Sequence[Row]) -> str:
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


def header(load_before: float, load_after: float, wall_s: float, quick: bool, threads: int = THREADS) -> str:
    from importlib.metadata import version

    return "\n".join(
        [
            f"- date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            f"- machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; "
            f"torch.set_num_threads({threads})",
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


def main(
    description: str,
    cases: dict[str, Callable[[Config], list[Row]]],
    *,
    results_name: str,
    default_wait_s: float,
    child: Callable[[str], None] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """The command line of a benchmark script: run the chosen ``cases``, print each case's table to
    stderr as it ends and the whole report to stdout, write it to ``results/{results_name}.md`` (and the
    rows to ``.json``); the exit status is 1 if a target fails. ``child(name)`` is what the script does
    when started as a memory child (``--_child NAME``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 rounds, 1 warm-up")
    parser.add_argument("--only", default=None, help=f"comma-separated cases among {', '.join(cases)}")
    parser.add_argument(
        "--wait",
        type=float,
        default=None,
        help=f"seconds per case to wait for other processes to leave the CPUs "
        f"(default {default_wait_s:g}; 5 with --quick)",
    )
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    parser.add_argument(CHILD_FLAG, dest="child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if child is None:
            parser.error("this script has no memory child")
        child(args.child)
        return 0

    torch.set_num_threads(args.threads)
    names = list(cases) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose among {list(cases)}")
    cfg = Config(args.quick, args.wait if args.wait is not None else (5.0 if args.quick else default_wait_s))
    load_before, start = os.getloadavg()[0], time.perf_counter()
    rows: list[Row] = []
    for name in names:
        case_start = time.perf_counter()
        case_rows = cases[name](cfg)
        rows += case_rows
        print(f"[{name}: {time.perf_counter() - case_start:.0f} s]", file=sys.stderr, flush=True)
        print(table(case_rows), file=sys.stderr, flush=True)
        gc.collect()
    wall = time.perf_counter() - start
    report = header(load_before, os.getloadavg()[0], wall, args.quick, args.threads)
    report += "\n\n" + table(rows) + "\n"
    notes = [f"- {r.case} / {r.impl}: {r.note}" for r in rows if r.note]
    if notes:
        report += "\n" + "\n".join(notes) + "\n"
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = results_name if args.threads == THREADS else f"{results_name}_threads{args.threads}"
        (RESULTS / f"{stem}.md").write_text(report)
        (RESULTS / f"{stem}.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 1 if any(r.passed is False for r in rows) else 0
