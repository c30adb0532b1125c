"""FSQ-family benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference"), interleaved.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fsq.py            # full
    .venv/bin/python benchmarks/bench_fsq.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_fsq.py --only fsq,rfsq

Cases (training mode, forward + backward of ``quantized.sum()``, on a fresh leaf each step):

- ``fsq``: FSQ([8, 5, 5, 5]) on (8, 1024, 4); target >= 1.2x faster, and no more peak memory (each
  implementation's step in a fresh subprocess: the RSS high-water mark above the post-setup baseline,
  which moves by a few MiB from run to run with the allocator's state);
- ``rfsq``: ResidualFSQ([8, 5, 5, 3], 8 layers) on (8, 1024, 4); target >= 1.2x faster, no more peak memory;
- ``rfsq_dim256``: the same stack with dim=256 projections on (4, 1024, 256) (the README's); the shared
  Linear layers and their 4 MiB gradients take most of the time in both libraries; target >= 1.2x faster,
  no more peak memory;
- ``grfsq``: GroupedResidualFSQ(dim=8, groups=2, [8, 5, 5, 3], 8 layers) on (8, 1024, 8); target >= 1.2x,
  no more peak memory;
- options, each target no slower (ratio >= 1): ``fsq_symmetric_noise`` (preserve_symmetry with
  noise_dropout=0.5), ``fsq_rotation`` (orthogonal_rotation), ``fsq_hard_clamp`` (bound_hard_clamp),
  ``rfsq_rotation`` (ResidualFSQ with orthogonal_rotation), ``rfsq_soft_clamp`` (bound_hard_clamp=False,
  soft_clamp_input_value=2.0).

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, run_case, target_faster, train_call

FSQ_LEVELS = [8, 5, 5, 5]
RFSQ = dict(levels=[8, 5, 5, 3], num_quantizers=8)

# name -> (class, kwargs, input shape); the memory children build the same
SETUPS = {
    "fsq": ("FSQ", dict(levels=FSQ_LEVELS), (8, 1024, 4)),
    "rfsq": ("ResidualFSQ", RFSQ, (8, 1024, 4)),
    "rfsq_dim256": ("ResidualFSQ", dict(RFSQ, dim=256), (4, 1024, 256)),
    "grfsq": ("GroupedResidualFSQ", dict(RFSQ, dim=8, groups=2), (8, 1024, 8)),
    "fsq_symmetric_noise": (
        "FSQ",
        dict(levels=FSQ_LEVELS, preserve_symmetry=True, noise_dropout=0.5),
        (8, 1024, 4),
    ),
    "fsq_rotation": ("FSQ", dict(levels=[5, 5, 5, 5], orthogonal_rotation=True), (8, 1024, 4)),
    "fsq_hard_clamp": ("FSQ", dict(levels=FSQ_LEVELS, bound_hard_clamp=True), (8, 1024, 4)),
    "rfsq_rotation": (
        "ResidualFSQ",
        dict(levels=[5, 5, 5, 5], num_quantizers=8, orthogonal_rotation=True),
        (8, 1024, 4),
    ),
    "rfsq_soft_clamp": (
        "ResidualFSQ",
        dict(RFSQ, bound_hard_clamp=False, soft_clamp_input_value=2.0),
        (8, 1024, 4),
    ),
}
MEMORY_CASES = ("fsq", "rfsq", "rfsq_dim256", "grfsq")


def side_by_side(case: str, cfg: Config, reps: int = 15, warmup: int = 3) -> list[Row]:
    """Training steps of vqcore and the reference, interleaved (the same seed builds both, so the
    rotations are the same draws)."""
    cls, kwargs, shape = SETUPS[case]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    impls = []
    for lib in ("vqcore", "reference"):
        torch.manual_seed(0)
        impls.append(Impl(lib, train_call(build(lib, cls, **kwargs), x)))
    rows = run_case(case, impls, cfg, reps, warmup)
    for row in rows:
        row.impl = f"{row.impl} {cls}"
    return rows


# -- peak memory: one training step per fresh subprocess --------------------------------------------------
def child(name: str) -> None:
    """``name`` = "CASE:LIB": one training step of that case in this fresh process (after a warm-up step)."""
    case, lib = name.split(":")
    harness.child_setup()
    cls, kwargs, shape = SETUPS[case]
    step = train_call(build(lib, cls, **kwargs), torch.randn(*shape))
    step()  # warm-up: kernels, thread pool, allocator
    print(json.dumps(harness.measure_peak(step)))


def with_memory(case: str, rows: list[Row]) -> list[Row]:
    """Peaks of both implementations; the reference row's target also asks for no more peak memory."""
    peaks = harness.child_results(__file__, [f"{case}:vqcore", f"{case}:reference"], timeout=300)
    ours, ref = peaks[f"{case}:vqcore"], peaks[f"{case}:reference"]
    rows[0].peak_mib, rows[1].peak_mib = ours["peak_above_baseline_mib"], ref["peak_above_baseline_mib"]
    rows[1].target += " and <= the reference's peak"
    rows[1].passed = (
        bool(rows[1].passed) and ours["peak_above_baseline_mib"] <= ref["peak_above_baseline_mib"]
    )
    rows[1].note = f"peak: {ours['method']}"
    return rows


def faster(case: str, factor: float, cfg: Config) -> list[Row]:
    rows = side_by_side(case, cfg)
    target_faster(rows[1], factor)
    return with_memory(case, rows) if case in MEMORY_CASES else rows


def no_slower(case: str, cfg: Config) -> list[Row]:
    rows = side_by_side(case, cfg)
    target_faster(rows[1], 1.0)
    return rows


CASES = {
    "fsq": lambda cfg: faster("fsq", 1.2, cfg),
    "rfsq": lambda cfg: faster("rfsq", 1.2, cfg),
    "rfsq_dim256": lambda cfg: faster("rfsq_dim256", 1.2, cfg),
    "grfsq": lambda cfg: faster("grfsq", 1.2, cfg),
    **{
        name: (lambda cfg, name=name: no_slower(name, cfg))
        for name in (
            "fsq_symmetric_noise",
            "fsq_rotation",
            "fsq_hard_clamp",
            "rfsq_rotation",
            "rfsq_soft_clamp",
        )
    },
}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="fsq_latest", default_wait_s=30.0, child=child
        )
    )
