"""ResidualVQ / GroupedResidualVQ / RandomProjectionQuantizer: vqcore vs vector-quantize-pytorch 1.32.0.

Run from the repository root::

    .venv/bin/python benchmarks/bench_rvq.py            # full (~2-4 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_rvq.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_rvq.py --only rvq_train,rpq

Timing, noise handling, the table and the command line come from harness.py (interleaved round-robin,
medians, ``ratio = impl median / vqcore median``, rounds disturbed by other processes re-run). RPQ's peak
memory is measured per implementation in a fresh subprocess: the RSS high-water mark of one forward
above the RSS after setup (model built, input made, one warm-up forward on a tiny input), plus the
process's whole peak RSS (which includes the reference's 268M-parameter Linear).

Targets: RVQ(256, Q=8, K=1024) on (4, 1024, 256) train fwd+bwd >= 3x and eval >= 2x faster;
GroupedRVQ(256, Q=8, groups=2, K=1024) train >= 3x; RPQ(512, 16 books, cd=256, K=1024) on (1, 1024, 512)
>= 20x faster and <= 1/10 of the reference's peak memory.
"""

from __future__ import annotations

import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, mark_targets, run_case, train_call

RVQ = dict(dim=256, num_quantizers=8, codebook_size=1024)
GRVQ = dict(dim=256, num_quantizers=8, groups=2, codebook_size=1024)
RPQ = dict(dim=512, num_codebooks=16, codebook_dim=256, codebook_size=1024)
RVQ_SHAPE, RPQ_SHAPE = (4, 1024, 256), (1, 1024, 512)


def vqcore_and_references(cls: str, kwargs: dict, x: torch.Tensor, make_call, ours=None) -> list[Impl]:
    """vqcore's ``cls(**kwargs)`` (or ``ours``) and the reference's, with its defaults and with
    rotation_trick=False."""
    ours = build("vqcore", cls, **kwargs) if ours is None else ours
    return [
        Impl("vqcore", make_call(ours, x)),
        Impl("reference (defaults: rotation_trick=True)", make_call(build("reference", cls, **kwargs), x)),
        Impl(
            "reference (rotation_trick=False)",
            make_call(build("reference", cls, rotation_trick=False, **kwargs), x),
        ),
    ]


def floor_eval_call(module, x: torch.Tensor):
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


def rvq_input() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(*RVQ_SHAPE)


def case_rvq_train(cfg: Config) -> list[Row]:
    impls = vqcore_and_references("ResidualVQ", RVQ, rvq_input(), train_call)
    rows = run_case("rvq train Q=8 K=1024 x(4,1024,256)", impls, cfg, 9, 2)
    return mark_targets(rows, ref=3.0)


def case_rvq_eval(cfg: Config) -> list[Row]:
    x = rvq_input()
    ours = build("vqcore", "ResidualVQ", **RVQ)
    impls = vqcore_and_references("ResidualVQ", RVQ, x, eval_call, ours)
    impls.append(Impl("floor (8 x GEMM+argmin+gather+sub)", floor_eval_call(ours, x)))
    rows = run_case("rvq eval Q=8 K=1024 x(4,1024,256)", impls, cfg, 9, 2)
    return mark_targets(rows, ref=2.0)


def case_grvq_train(cfg: Config) -> list[Row]:
    impls = vqcore_and_references("GroupedResidualVQ", GRVQ, rvq_input(), train_call)
    rows = run_case("grouped rvq train G=2 Q=8 K=1024 x(4,1024,256)", impls, cfg, 9, 2)
    return mark_targets(rows, ref=3.0)


def build_rpq(name: str):
    return build("vqcore" if name == "vqcore" else "reference", "RandomProjectionQuantizer", **RPQ)


def case_rpq(cfg: Config) -> list[Row]:
    peaks = harness.child_results(__file__, ["vqcore", "reference"])
    torch.manual_seed(0)
    x = torch.randn(*RPQ_SHAPE)
    impls = [Impl(name, eval_call(build_rpq(name), x)) for name in ("vqcore", "reference")]
    rows = run_case("rpq eval H=16 cd=256 K=1024 x(1,1024,512)", impls, cfg, 5, 1, quick=(1, 0))
    harness.attach_peaks(
        rows,
        peaks,
        lambda info: (
            f"peak: forward {info['peak_above_baseline_mib']:.1f} MiB above setup RSS "
            f"{info['baseline_mib']:.0f} MiB ({info['method']}); "
            f"whole-process peak RSS {info['peak_mib']:.0f} MiB; "
            f"parameters+buffers {info['tensor_numel'] / 1e6:.1f}M values"
        ),
    )
    for row in rows:
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


def rpq_mem_child(name: str) -> None:
    """One RPQ eval forward of ``name`` ("vqcore" or "reference") at full size, in this fresh process."""
    harness.child_setup()
    module = build_rpq(name)
    x = torch.randn(*RPQ_SHAPE)
    with torch.no_grad():
        module(torch.randn(1, 8, RPQ["dim"]))  # warm-up on a tiny input
        result = harness.measure_peak(lambda: module(x))
    numel = sum(t.numel() for t in [*module.parameters(), *module.buffers()])
    print(json.dumps({"impl": name, **result, "tensor_numel": numel}))


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="rvq_latest", default_wait_s=30.0, child=rpq_mem_child
        )
    )
