"""ResidualVQ beam search benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_beam.py            # full (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_beam.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_beam.py --only beam_encode

Cases (vqcore and the reference interleaved in one process), all on ResidualVQ(dim=256,
num_quantizers=8, codebook_size=1024) and (1, 4096, 256) inputs:

- ``beam_encode``: eval encoding with a beam of 4 (vqcore's ``encode``; the reference has none, so its
  eval forward under no_grad, which returns the same indices); target: vqcore >= 2x faster;
- ``beam_train``: a training step with a beam of 4 (forward, backward of ``quantized.sum() + losses``),
  straight-through estimator on both sides; target: vqcore no slower (ratio >= 0.9);
- ``beam_memory``: peak memory of one ``beam_encode`` call, each implementation in a fresh subprocess;
  target: vqcore's peak <= the reference's (+ 10%).

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, run_case, train_call

TOKENS = (1, 4096, 256)
OPTIONS = dict(dim=256, num_quantizers=8, codebook_size=1024, rotation_trick=False)
BEAM = 4


def _rvq(lib: str):
    torch.manual_seed(0)
    return build(lib, "ResidualVQ", beam_size=BEAM, **OPTIONS)


def encode_call(lib: str, module, x: torch.Tensor):
    """vqcore's ``encode``; the reference's eval forward (its only way to the indices)."""
    module.eval()

    def call():
        with torch.no_grad():
            return module.encode(x) if lib == "vqcore" else module(x)[1]

    return call


def case_beam_encode(cfg: Config) -> list[Row]:
    x = torch.randn(*TOKENS)
    rows = run_case(
        "beam_encode",
        [
            Impl("vqcore", encode_call("vqcore", _rvq("vqcore"), x)),
            Impl("reference", encode_call("reference", _rvq("reference"), x)),
        ],
        cfg,
        5,
        1,
    )
    return harness.mark_targets(rows, 2.0)


def case_beam_train(cfg: Config) -> list[Row]:
    x = torch.randn(*TOKENS)
    rows = run_case(
        "beam_train",
        [
            Impl("vqcore", train_call(_rvq("vqcore"), x)),
            Impl("reference", train_call(_rvq("reference"), x)),
        ],
        cfg,
        5,
        1,
    )
    rows[1].target = "vqcore no slower (ratio >= 0.9)"
    rows[1].passed = rows[1].ratio >= 0.9
    return rows


def child(lib: str) -> None:
    """One ``beam_encode`` call of ``lib`` ("vqcore" or "reference"), in this fresh process."""
    harness.child_setup()
    module = _rvq(lib)
    encode_call(lib, module, torch.randn(1, 4, 256))()  # warm-up on a tiny input
    print(json.dumps(harness.measure_peak(encode_call(lib, module, torch.randn(*TOKENS)))))


def case_beam_memory(cfg: Config) -> list[Row]:
    results = harness.child_results(__file__, ["vqcore", "reference"], timeout=900)
    ours, ref = results["vqcore"], results["reference"]
    rows = [
        Row("beam_memory", "vqcore", ours["ms"], [ours["ms"]], ratio=1.0),
        Row("beam_memory", "reference", ref["ms"], [ref["ms"]], ratio=ref["ms"] / ours["ms"]),
    ]
    for row, info in zip(rows, (ours, ref), strict=True):
        row.peak_mib = info["peak_above_baseline_mib"]
    rows[1].target = "vqcore peak <= reference peak (+10%)"
    rows[1].passed = ours["peak_above_baseline_mib"] <= 1.1 * ref["peak_above_baseline_mib"] + 0.5
    rows[0].note = f"one encode per fresh process ({ours['method']})"
    return rows


CASES = {"beam_encode": case_beam_encode, "beam_train": case_beam_train, "beam_memory": case_beam_memory}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="beam_latest", default_wait_s=30.0, child=child
        )
    )
