"""ResidualVQ / GroupedResidualVQ / RandomProjectionQuantizer: vqcore vs vector-quantize-pytorch 1.32.0.

Run from the repository root::

    .venv/bin/python benchmarks/bench_rvq.py            # full (~2-4 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_rvq.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_rvq.py --only rvq_train,rpq

Timing, noise handling and the table come from bench_vq.py (interleaved round-robin, medians,
``ratio = impl median / vqcore median``, rounds disturbed by other processes re-run). RPQ's peak
memory is measured per implementation in a fresh subprocess: the RSS high-water mark of one forward
above the RSS after setup (model built, input made, one warm-up forward on a tiny input), plus the
process's whole peak RSS (which includes the reference's 268M-parameter Linear).

Targets (issue 3): RVQ(256, Q=8, K=1024) on (4, 1024, 256) train fwd+bwd >= 3x and eval >= 2x faster;
GroupedRVQ(256, Q=8, groups=2, K=1024) train >= 3x; RPQ(512, 16 books, cd=256, K=1024) on (1, 1024, 512)
>= 20x faster and <= 1/10 of the reference's peak memory.
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
from bench_vq import Config, Impl, build, header, run_case, table, target_faster  # noqa: E402

RVQ = dict(dim=256, num_quantizers=8, codebook_size=1024)
GRVQ = dict(dim=256, num_quantizers=8, groups=2, codebook_size=1024)
RPQ = dict(dim=512, num_codebooks=16, codebook_dim=256, codebook_size=1024)
RVQ_SHAPE, RPQ_SHAPE = (4, 1024, 256), (1, 1024, 512)
RESULTS = Path(__file__).resolve().parent / "results"


def _train_call(module, x):
    module.train()

    def call():
        xx = x.detach().requires_grad_(True)
        out = module(xx)
        (out[0].sum() + out[2].sum()).backward()

    return call


def _eval_call(module, x):
    module.eval()

    def call():
        with torch.no_grad():
            return module(x)

    return call


def _pair(cls, kwargs, shape, make_call, ref_kwargs=None):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    ours = build("vqcore", cls, **kwargs)
    impls = [Impl("vqcore", make_call(ours, x))]
    impls.append(Impl("reference (defaults: rotation_trick=True)", make_call(build("ref", cls, **kwargs), x)))
    impls.append(
        Impl(
            "reference (rotation_trick=False)",
            make_call(build("ref", cls, rotation_trick=False, **kwargs), x),
        )
    )
    return impls


def _floor_eval_call(module, x):
    """The exact greedy residual search alone: per layer one GEMM + argmin + gather + subtraction
    (vqcore's codebooks), then the sum of the codes. No checks, no projections, no decode path."""
    books = [layer.codebook.detach().clone() for layer in module.layers]
    norms = [b.pow(2).sum(-1) for b in books]
    flat = x.reshape(-1, x.shape[-1])

    def call():
        with torch.no_grad():
            r, total = flat, 0
            for book, sq in zip(books, norms):
                code = book[torch.addmm(sq, r, book.T, alpha=-2).argmin(-1)]
                r = r - code
                total = total + code
            return total

    return call


def _with_floor(impls, x_shape, make_call):
    torch.manual_seed(0)
    x = torch.randn(*x_shape)
    ours = build("vqcore", "ResidualVQ", **RVQ)
    impls.append(Impl("floor (8 x GEMM+argmin+gather+sub)", make_call(ours, x)))
    return impls


def _mark(rows, factor):
    for row in rows:
        if row.impl.startswith("reference"):
            target_faster(row, factor)
    return rows


def case_rvq_train(cfg):
    rows = run_case(
        "rvq train Q=8 K=1024 x(4,1024,256)", _pair("ResidualVQ", RVQ, RVQ_SHAPE, _train_call), cfg, 9, 2
    )
    return _mark(rows, 3.0)


def case_rvq_eval(cfg):
    impls = _with_floor(_pair("ResidualVQ", RVQ, RVQ_SHAPE, _eval_call), RVQ_SHAPE, _floor_eval_call)
    rows = run_case("rvq eval Q=8 K=1024 x(4,1024,256)", impls, cfg, 9, 2)
    return _mark(rows, 2.0)


def case_grvq_train(cfg):
    impls = _pair("GroupedResidualVQ", GRVQ, RVQ_SHAPE, _train_call)
    rows = run_case("grouped rvq train G=2 Q=8 K=1024 x(4,1024,256)", impls, cfg, 9, 2)
    return _mark(rows, 3.0)


def _rpq_calls():
    torch.manual_seed(0)
    x = torch.randn(*RPQ_SHAPE)
    ours = build("vqcore", "RandomProjectionQuantizer", **RPQ)
    ref = build("ref", "RandomProjectionQuantizer", **RPQ)

    def ev(module):
        def call():
            with torch.no_grad():
                return module(x)

        return call

    return [Impl("vqcore", ev(ours)), Impl("reference", ev(ref))]


def rpq_mem_child(name: str) -> None:
    torch.set_num_threads(bench_vq.THREADS)
    import vector_quantize_pytorch  # noqa: F401

    import vqcore  # noqa: F401

    torch.manual_seed(0)
    module = build("vqcore" if name == "vqcore" else "ref", "RandomProjectionQuantizer", **RPQ)
    x = torch.randn(*RPQ_SHAPE)
    with torch.no_grad():
        module(torch.randn(1, 8, RPQ["dim"]))
    gc.collect()
    if bench_vq._reset_hwm():
        method, baseline = "VmHWM reset after setup", bench_vq._status_kib("VmRSS")
    else:
        method, baseline = "VmHWM after setup", bench_vq._status_kib("VmHWM")
    with torch.no_grad():
        out = module(x)
    peak = bench_vq._status_kib("VmHWM")
    del out
    params = sum(t.numel() for t in list(module.parameters()) + list(module.buffers()))
    print(
        json.dumps(
            {
                "impl": name,
                "baseline_mib": baseline / 1024,
                "peak_mib": peak / 1024,
                "peak_above_baseline_mib": (peak - baseline) / 1024,
                "method": method,
                "tensor_numel": params,
            }
        )
    )


def case_rpq(cfg):
    peaks = {}
    for name in ("vqcore", "reference"):
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_mem-child", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory child for {name!r} failed:\n{out.stderr[-4000:]}")
        peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = run_case("rpq eval H=16 cd=256 K=1024 x(1,1024,512)", _rpq_calls(), cfg, 5, 1, quick=(1, 0))
    for row in rows:
        info = peaks[row.impl]
        row.peak_mib = info["peak_above_baseline_mib"]
        row.note = "; ".join(
            filter(
                None,
                [
                    row.note,
                    f"peak: forward {info['peak_above_baseline_mib']:.1f} MiB above setup RSS "
                    f"{info['baseline_mib']:.0f} MiB "
                    f"({info['method']}); whole-process peak RSS {info['peak_mib']:.0f} MiB; "
                    f"parameters+buffers {info['tensor_numel'] / 1e6:.1f}M values",
                ],
            )
        )
        if row.impl == "reference":
            ours, ref = peaks["vqcore"], peaks["reference"]
            mem_ok = ours["peak_above_baseline_mib"] <= ref["peak_above_baseline_mib"] / 10
            row.target = "vqcore >= 20x faster, forward peak <= 1/10"
            row.passed = row.ratio >= 20 and mem_ok
    return rows


CASES = {
    "rvq_train": case_rvq_train,
    "rvq_eval": case_rvq_eval,
    "grvq_train": case_grvq_train,
    "rpq": case_rpq,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None, help=f"comma-separated among {', '.join(CASES)}")
    parser.add_argument("--wait", type=float, default=None, help="seconds per case to wait for idle CPUs")
    parser.add_argument("--threads", type=int, default=bench_vq.THREADS, help="torch threads (default 2)")
    parser.add_argument(
        "--no-write", action="store_true", help="do not write benchmarks/results/rvq_latest.md"
    )
    parser.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mem_child:
        rpq_mem_child(args.mem_child)
        return 0
    torch.set_num_threads(args.threads)
    names = list(CASES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose among {list(CASES)}")
    cfg = Config(args.quick, args.wait if args.wait is not None else (5.0 if args.quick else 30.0))
    load_before, start, rows = os.getloadavg()[0], time.perf_counter(), []
    for name in names:
        case_rows = CASES[name](cfg)
        rows += case_rows
        print(table(case_rows), file=sys.stderr, flush=True)
        gc.collect()
    report = header(load_before, os.getloadavg()[0], time.perf_counter() - start, args.quick)
    report = report.replace(
        f"torch.set_num_threads({bench_vq.THREADS})", f"torch.set_num_threads({args.threads})"
    )
    report += "\n\n" + table(rows) + "\n"
    notes = [f"- {r.case} / {r.impl}: {r.note}" for r in rows if r.note]
    if notes:
        report += "\n" + "\n".join(notes) + "\n"
    print(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.threads == bench_vq.THREADS else f"_threads{args.threads}"
        (RESULTS / f"rvq_latest{suffix}.md").write_text(report)
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
