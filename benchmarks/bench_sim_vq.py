"""SimVQ and ResidualSimVQ benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_sim_vq.py            # full
    .venv/bin/python benchmarks/bench_sim_vq.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_sim_vq.py --only sim_train,rsim_memory

Cases (vqcore and the reference interleaved in one process, built with the same state; targets: vqcore
no slower, ratio >= 0.9 with 10% tolerance for timer noise):

- ``sim_train``: a training step (forward, backward of ``quantized.sum() + loss``) of SimVQ(dim=256,
  codebook_size=1024) on (4, 1024, 256): 4096 tokens;
- ``sim_eval``: an eval forward under no_grad on the same input; ``sim_encode``: vqcore's ``encode``
  against the reference's eval forward (it has no encode);
- ``rsim_train`` / ``rsim_eval``: the same for ResidualSimVQ with 8 layers;
- ``sim_memory`` / ``rsim_memory``: peak memory of one training step, each implementation in a fresh
  subprocess; target: vqcore's peak <= the reference's (+ 10%).

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, side_by_side, train_call

TOKENS = (4, 1024, 256)
SIM = dict(dim=256, codebook_size=1024)
RSIM = dict(dim=256, codebook_size=1024, num_quantizers=8)
CLASSES = {"sim": ("SimVQ", SIM), "rsim": ("ResidualSimVQ", RSIM)}


def pair(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vqcore module, reference module) of ``kind`` with the same frozen codebooks and transforms."""
    cls, kwargs = CLASSES[kind]
    torch.manual_seed(0)
    ref = build("reference", cls, **kwargs)
    ours = build("vqcore", cls, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _train(kind: str, cfg: Config) -> list[Row]:
    ours, ref = pair(kind)
    x = torch.randn(*TOKENS)
    return side_by_side(
        f"{kind}_train", [Impl("vqcore", train_call(ours, x)), Impl("reference", train_call(ref, x))], cfg
    )


def _eval(kind: str, cfg: Config) -> list[Row]:
    ours, ref = pair(kind)
    x = torch.randn(*TOKENS)
    return side_by_side(
        f"{kind}_eval", [Impl("vqcore", eval_call(ours, x)), Impl("reference", eval_call(ref, x))], cfg
    )


def case_sim_encode(cfg: Config) -> list[Row]:
    ours, ref = pair("sim")
    ours.eval()
    x = torch.randn(*TOKENS)
    rows = side_by_side(
        "sim_encode", [Impl("vqcore", lambda: ours.encode(x)), Impl("reference", eval_call(ref, x))], cfg
    )
    rows[1].note = "the reference has no encode: its eval forward under no_grad"
    return rows


def child(name: str) -> None:
    """One training step of ``name`` ("<lib>:<kind>"), in this fresh process."""
    lib, kind = name.split(":")
    harness.child_setup()
    cls, kwargs = CLASSES[kind]
    module = build(lib, cls, **kwargs)
    train_call(module, torch.randn(1, 2, 256))()  # warm-up on a tiny input
    print(json.dumps(harness.measure_peak(train_call(module, torch.randn(*TOKENS)))))


def _memory(kind: str, cfg: Config) -> list[Row]:
    results = harness.child_results(__file__, [f"vqcore:{kind}", f"reference:{kind}"], timeout=600)
    ours, ref = results[f"vqcore:{kind}"], results[f"reference:{kind}"]
    rows = [
        Row(f"{kind}_memory", "vqcore", ours["ms"], [ours["ms"]], ratio=1.0),
        Row(f"{kind}_memory", "reference", ref["ms"], [ref["ms"]], ratio=ref["ms"] / ours["ms"]),
    ]
    for row, info in zip(rows, (ours, ref), strict=True):
        row.peak_mib = info["peak_above_baseline_mib"]
    rows[1].target = "vqcore peak <= reference peak (+10%)"
    rows[1].passed = ours["peak_above_baseline_mib"] <= 1.1 * ref["peak_above_baseline_mib"] + 0.5
    rows[0].note = f"one step per fresh process ({ours['method']})"
    return rows


CASES = {
    "sim_train": lambda cfg: _train("sim", cfg),
    "sim_eval": lambda cfg: _eval("sim", cfg),
    "sim_encode": case_sim_encode,
    "rsim_train": lambda cfg: _train("rsim", cfg),
    "rsim_eval": lambda cfg: _eval("rsim", cfg),
    "sim_memory": lambda cfg: _memory("sim", cfg),
    "rsim_memory": lambda cfg: _memory("rsim", cfg),
}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="sim_vq_latest", default_wait_s=30.0, child=child
        )
    )
