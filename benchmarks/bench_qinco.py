"""QINCo (ResidualVQ(implicit_neural_codebook=True)) benchmarks: vqcore vs vector-quantize-pytorch 1.32.0.

Run from the repository root::

    .venv/bin/python benchmarks/bench_qinco.py            # full (tens of minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_qinco.py --quick    # smoke mode: 2 reps, small token counts
    .venv/bin/python benchmarks/bench_qinco.py --only qinco_eval,qinco_memory_eval

The configuration: dim 256, 1024 codes, 4 layers (3 MLPs of depth 4, hidden 256), as one sequence of
tokens (1, n, 256). Both implementations hold the same weights (the reference's state_dict loaded into
vqcore). Every pair (token, code) goes through the MLP in both: the work is tokens x codes x 1 MFLOP per
MLP layer, so on 2 CPU cores the token counts are small.

Cases:

- ``qinco_eval``: an eval forward under no_grad of ``TIME_TOKENS`` tokens, interleaved;
- ``qinco_train``: a training step (forward, backward of ``quantized.sum() + losses.sum()``) of
  ``TIME_TOKENS`` tokens, interleaved; target for both: vqcore no slower (ratio >= 0.9);
- ``qinco_memory_eval`` / ``qinco_memory_train``: the RSS high-water mark of one eval forward / one
  training step above the RSS after setup, each in a fresh subprocess: vqcore at ``LARGE_TOKENS``
  (4096) and at the reference's count, the reference at the largest count that fits comfortably in
  the machine's memory (``REF_EVAL_TOKENS`` / ``REF_TRAIN_TOKENS``: its tensors are tokens x codes x dim,
  linear in tokens). Target: vqcore's peak at ``LARGE_TOKENS`` <= 1/10 of the reference's peak
  extrapolated linearly to ``LARGE_TOKENS`` (the note gives the measured figures and the token counts).

``--quick`` divides every token count (timing 8, large 256, reference 32 / 8). ratio = reference time /
vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the command line come from
harness.py.
"""

from __future__ import annotations

import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, run_case, train_call

QINCO = dict(dim=256, num_quantizers=4, codebook_size=1024, implicit_neural_codebook=True)
DIM = 256
TIME_TOKENS = {False: 64, True: 8}  # by --quick
LARGE_TOKENS = {False: 4096, True: 256}
# the reference's peaks grow linearly with the tokens (a training step keeps every MLP activation of
# every pair for the backward): counts that stay well inside a 24 GiB machine shared with other processes
REF_EVAL_TOKENS = {False: 1024, True: 32}
REF_TRAIN_TOKENS = {False: 128, True: 8}


def _pair():
    """The reference and vqcore ResidualVQ with the same weights."""
    torch.manual_seed(0)
    ref = build("reference", "ResidualVQ", **QINCO)
    ours = build("vqcore", "ResidualVQ", **QINCO)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _no_slower(rows: list[Row]) -> list[Row]:
    rows[1].target = "vqcore no slower (ratio >= 0.9)"
    rows[1].passed = rows[1].ratio >= 0.9
    return rows


def case_qinco_eval(cfg: Config) -> list[Row]:
    ours, ref = _pair()
    x = torch.randn(1, TIME_TOKENS[cfg.quick], DIM)
    rows = run_case(
        "qinco_eval",
        [Impl("vqcore", eval_call(ours, x), 1), Impl("reference", eval_call(ref, x), 1)],
        cfg,
        5,
        1,
    )
    rows[0].note = f"{TIME_TOKENS[cfg.quick]} tokens, one call per round"
    return _no_slower(rows)


def case_qinco_train(cfg: Config) -> list[Row]:
    ours, ref = _pair()
    x = torch.randn(1, TIME_TOKENS[cfg.quick], DIM)
    rows = run_case(
        "qinco_train",
        [Impl("vqcore", train_call(ours, x), 1), Impl("reference", train_call(ref, x), 1)],
        cfg,
        5,
        1,
    )
    rows[0].note = f"{TIME_TOKENS[cfg.quick]} tokens, one call per round"
    return _no_slower(rows)


def child(name: str) -> None:
    """``lib:mode:tokens`` (e.g. ``vqcore:eval:4096``): one call of ``lib`` in this fresh process."""
    lib, mode, tokens = name.split(":")
    harness.child_setup()
    module = build(lib, "ResidualVQ", **QINCO)
    make = eval_call if mode == "eval" else train_call
    make(module, torch.randn(1, 2, DIM))()  # warm-up on a tiny input
    print(json.dumps(harness.measure_peak(make(module, torch.randn(1, int(tokens), DIM)))))


def _memory_case(case: str, mode: str, ref_tokens: int, cfg: Config) -> list[Row]:
    large = LARGE_TOKENS[cfg.quick]
    names = [f"vqcore:{mode}:{large}", f"vqcore:{mode}:{ref_tokens}", f"reference:{mode}:{ref_tokens}"]
    results = harness.child_results(__file__, names, timeout=3600)
    rows = []
    for name in names:
        info = results[name]
        lib, _, tokens = name.split(":")
        row = Row(case, lib if lib == "reference" else f"vqcore @ {tokens} tokens", info["ms"], [info["ms"]])
        row.peak_mib = info["peak_above_baseline_mib"]
        row.note = (
            f"{tokens} tokens, {info['ms'] / 1e3:.1f} s, peak {row.peak_mib:.1f} MiB ({info['method']})"
        )
        rows.append(row)
    ours_large, ours_small, ref = rows
    ours_small.ratio = 1.0
    ref.ratio = ref.median_ms / ours_small.median_ms  # time at the same token count
    ref_at_large = ref.peak_mib * large / ref_tokens
    ours_large.ratio = 1.0
    ref.note += f"; linear extrapolation to {large} tokens: {ref_at_large:.0f} MiB"
    ref.target = f"vqcore peak @ {large} <= 1/10 of the reference's extrapolated to {large}"
    ref.passed = ours_large.peak_mib <= ref_at_large / 10
    return rows


def case_qinco_memory_eval(cfg: Config) -> list[Row]:
    return _memory_case("qinco_memory_eval", "eval", REF_EVAL_TOKENS[cfg.quick], cfg)


def case_qinco_memory_train(cfg: Config) -> list[Row]:
    return _memory_case("qinco_memory_train", "train", REF_TRAIN_TOKENS[cfg.quick], cfg)


CASES = {
    "qinco_eval": case_qinco_eval,
    "qinco_train": case_qinco_train,
    "qinco_memory_eval": case_qinco_memory_eval,
    "qinco_memory_train": case_qinco_memory_train,
}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="qinco_latest", default_wait_s=30.0, child=child
        )
    )
