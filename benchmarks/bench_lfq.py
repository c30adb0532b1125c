"""Scalar-quantizer benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_lfq.py            # full (~2-3 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_lfq.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_lfq.py --only lfq65536,rlfq

Cases (all training mode, forward + backward of ``quantized.sum() + losses``):

- ``lfq65536``: LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1) on (4, 16, 32, 32). The
  reference materialises the (4096 tokens x 65536 codes) softmax (~15 s, ~7 GiB), so each
  implementation runs ONCE at full size in its own fresh subprocess (after a warm-up on a tiny input):
  wall time of that first call and the RSS high-water mark above the post-setup baseline. vqcore is
  also timed in this process (median of interleaved reps), reported as a second row.
  Targets: >= 20x faster, <= 1/50 of the reference's peak memory.
- ``rlfq``: ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8) on (4, 1024, 256), interleaved;
  target >= 5x faster.
- ``fsq``, ``rfsq``, ``latent``: FSQ([8, 5, 5, 5], dim=256), ResidualFSQ([8, 5, 5, 3], 8 layers,
  dim=256), LatentQuantize([5, 5, 8], dim=16) on sequences; target: no slower (ratio >= 1, with 10%
  tolerance for timer noise).

ratio = reference time / vqcore time (> 1: vqcore faster). Uses the timing helpers of bench_vq.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vq  # noqa: E402
from bench_vq import Impl, Noise, Row, build, interleaved, rows_from_timing, table, target_faster  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LFQ_SHAPE = (4, 16, 32, 32)


def _train_call(module, x):
    module.train()

    def call():
        out = module(x)
        loss = out[0].sum()
        if len(out) > 2:
            loss = loss + out[2].sum()
        loss.backward()

    return call


def _interleaved_case(
    case: str, name: str, kwargs: dict, shape: tuple, cfg, reps: int, warmup: int
) -> list[Row]:
    torch.manual_seed(0)
    x = torch.randn(*shape).requires_grad_()

    def clear():
        x.grad = None

    impls = [
        Impl("vqcore", _train_call(build("vqcore", name, **kwargs), x), clear),
        Impl("reference", _train_call(build("reference", name, **kwargs), x), clear),
    ]
    reps, warmup = (2, 1) if cfg.quick else (reps, warmup)
    rows = rows_from_timing(case, interleaved(impls, reps, warmup, Noise(cfg.wait_budget_s)))
    for row in rows:
        row.impl = f"{row.impl} {name}"
    return rows


# -- lfq65536: one full-size call per fresh subprocess ------------------------------------------------
def child(lib: str) -> None:
    torch.set_num_threads(bench_vq.THREADS)
    import vector_quantize_pytorch  # noqa: F401  (same imports in every child)

    import vqcore  # noqa: F401

    torch.manual_seed(0)
    module = build(lib, "LFQ", codebook_size=65536, dim=16, entropy_loss_weight=0.1).train()
    small = torch.randn(1, 16, 2, 2, requires_grad=True)
    _train_call(module, small)()  # warm-up: kernels, thread pool
    x = torch.randn(*LFQ_SHAPE, requires_grad=True)
    gc.collect()
    if bench_vq._reset_hwm():
        method, baseline = "VmHWM reset after setup", bench_vq._status_kib("VmRSS")
    else:
        method, baseline = "VmHWM after setup", bench_vq._status_kib("VmHWM")
    start = time.perf_counter()
    _train_call(module, x)()
    elapsed = (time.perf_counter() - start) * 1e3
    peak = bench_vq._status_kib("VmHWM")
    print(json.dumps({"ms": elapsed, "peak_above_baseline_mib": (peak - baseline) / 1024, "method": method}))


def _run_child(lib: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", lib], capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def case_lfq65536(cfg) -> list[Row]:
    ours, ref = _run_child("vqcore"), _run_child("reference")
    rows = [
        Row(
            "lfq65536",
            "vqcore LFQ (first call, own process)",
            ours["ms"],
            [ours["ms"]],
            peak_mib=ours["peak_above_baseline_mib"],
        ),
        Row(
            "lfq65536",
            "reference LFQ (first call, own process)",
            ref["ms"],
            [ref["ms"]],
            peak_mib=ref["peak_above_baseline_mib"],
        ),
    ]
    rows[0].ratio = 1.0
    rows[1].ratio = ref["ms"] / ours["ms"]
    mem_ratio = ref["peak_above_baseline_mib"] / max(ours["peak_above_baseline_mib"], 1e-3)
    rows[1].target = "vqcore >= 20x faster and <= 1/50 of the peak"
    rows[1].passed = rows[1].ratio >= 20 and mem_ratio >= 50
    rows[1].note = f"peak memory ratio reference / vqcore = {mem_ratio:.0f}x ({ours['method']})"
    # steady-state vqcore time in this process, against the reference's single call
    torch.manual_seed(0)
    x = torch.randn(*LFQ_SHAPE, requires_grad=True)
    call = _train_call(build("vqcore", "LFQ", codebook_size=65536, dim=16, entropy_loss_weight=0.1), x)
    impl = Impl("vqcore", call, lambda: setattr(x, "grad", None))
    timing = interleaved([impl], 2 if cfg.quick else 10, 2, Noise(cfg.wait_budget_s))
    steady = sorted(timing.times["vqcore"])[len(timing.times["vqcore"]) // 2]
    row = Row(
        "lfq65536",
        "vqcore LFQ (steady state, median)",
        steady,
        timing.times["vqcore"],
        ratio=ref["ms"] / steady,
    )
    row.note = "ratio here = reference first call / vqcore steady-state median"
    rows.append(row)
    return rows


def case_rlfq(cfg) -> list[Row]:
    rows = _interleaved_case(
        "rlfq", "ResidualLFQ", dict(dim=256, codebook_size=256, num_quantizers=8), (4, 1024, 256), cfg, 7, 2
    )
    target_faster(rows[1], 5)
    return rows


def _no_slower(rows):
    rows[1].target = "vqcore no slower (ratio >= 0.9)"
    rows[1].passed = rows[1].ratio >= 0.9
    return rows


def case_fsq(cfg) -> list[Row]:
    return _no_slower(
        _interleaved_case("fsq", "FSQ", dict(levels=[8, 5, 5, 5], dim=256), (4, 1024, 256), cfg, 9, 2)
    )


def case_rfsq(cfg) -> list[Row]:
    kwargs = dict(levels=[8, 5, 5, 3], num_quantizers=8, dim=256)
    return _no_slower(_interleaved_case("rfsq", "ResidualFSQ", kwargs, (4, 1024, 256), cfg, 9, 2))


def case_latent(cfg) -> list[Row]:
    # the reference treats 3-D input as channel-first (b, dim, n), so both get an image fmap
    kwargs = dict(levels=[5, 5, 8], dim=16)
    return _no_slower(_interleaved_case("latent", "LatentQuantize", kwargs, (4, 16, 32, 32), cfg, 9, 2))


CASES = {
    "lfq65536": case_lfq65536,
    "rlfq": case_rlfq,
    "fsq": case_fsq,
    "rfsq": case_rfsq,
    "latent": case_latent,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None, help=f"comma-separated cases among {', '.join(CASES)}")
    parser.add_argument(
        "--wait",
        type=float,
        default=None,
        help="seconds per case to wait for idle CPUs (default 30; 5 with --quick)",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    torch.set_num_threads(bench_vq.THREADS)
    names = list(CASES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose among {list(CASES)}")
    cfg = bench_vq.Config(args.quick, args.wait if args.wait is not None else (5.0 if args.quick else 30.0))
    load_before, start, rows = os.getloadavg()[0], time.perf_counter(), []
    for name in names:
        case_rows = CASES[name](cfg)
        print(table(case_rows), file=sys.stderr, flush=True)
        rows += case_rows
        gc.collect()
    report = bench_vq.header(load_before, os.getloadavg()[0], time.perf_counter() - start, args.quick)
    report += "\n- ratio = reference / vqcore time (> 1: vqcore faster)\n\n" + table(rows) + "\n"
    notes = [f"- {r.case} / {r.impl}: {r.note}" for r in rows if r.note]
    if notes:
        report += "\n" + "\n".join(notes) + "\n"
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "lfq_latest.md").write_text(report)
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
