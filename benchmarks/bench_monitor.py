"""Codebook monitor overhead: vqcore with and without a ``vqcore.metrics.CodebookMonitor`` attached, next
to vector-quantize-pytorch 1.32.0 ("the reference", which has no monitor).

Run from the repository root::

    .venv/bin/python benchmarks/bench_monitor.py            # full
    .venv/bin/python benchmarks/bench_monitor.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_monitor.py --only vq_train

Cases (each interleaved in one process; the two vqcore modules start from the same state):

- ``vq_train``: a training step (forward, backward of ``quantized.sum() + loss``) of
  VectorQuantize(dim=256, codebook_size=1024) on (8, 1024, 256): 8192 tokens; ``vqcore+monitor`` counts
  every code and sums the quantization error in the forward hook (the defaults). Target: at most 3%
  slower than without the monitor (paired ratio <= 1.03);
- ``vq_eval``: the eval forward under no_grad, same target;
- ``vq_encode``: ``encode`` (counted through the wrapped encode; no error sums there), same target;
- ``rvq_train``: ResidualVQ with 8 layers of 1024 codes, same input, same target;
- ``lfq_train``: LFQ(dim=18, codebook_size=2^18): a 2^18-code table per book (exact counting), same target.

ratio = impl time / vqcore time (> 1: slower than vqcore without a monitor). Timing, noise handling, the
table and the command line come from harness.py.
"""

from __future__ import annotations

import sys

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, run_case, train_call

from vqcore.metrics import CodebookMonitor

TOKENS = (8, 1024, 256)
MAX_OVERHEAD = 1.03


def trio(cls: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]:
    """(vqcore, vqcore with a monitor, the reference or None) with the same initial state."""
    torch.manual_seed(0)
    plain = build("vqcore", cls, **kwargs)
    monitored = build("vqcore", cls, **kwargs)
    monitored.load_state_dict(plain.state_dict())
    CodebookMonitor(monitored)
    try:
        ref = build("reference", cls, **kwargs)
        ref.load_state_dict(plain.state_dict(), strict=False)
    except (TypeError, RuntimeError):
        ref = None
    return plain, monitored, ref


def target_overhead(rows: list[Row]) -> list[Row]:
    """The monitored row (``rows[1]``): at most ``MAX_OVERHEAD`` times the unmonitored step, paired."""
    row = rows[1]
    row.target = f"monitor overhead <= {100 * (MAX_OVERHEAD - 1):.0f}% (paired ratio <= {MAX_OVERHEAD})"
    row.passed = row.paired_ratio is not None and row.paired_ratio <= MAX_OVERHEAD
    return rows


def compare(case: str, cls: str, make_call, cfg: Config, x: torch.Tensor, **kwargs) -> list[Row]:
    plain, monitored, ref = trio(cls, **kwargs)
    impls = [Impl("vqcore", make_call(plain, x)), Impl("vqcore+monitor", make_call(monitored, x))]
    if ref is not None and make_call is not encode_call:
        impls.append(Impl("reference", make_call(ref, x)))
    return target_overhead(run_case(case, impls, cfg, reps=15, warmup=3))


def encode_call(module, x):
    module.eval()

    def call():
        with torch.no_grad():
            return module.encode(x)

    return call


VQ = dict(dim=256, codebook_size=1024)
RVQ = dict(dim=256, codebook_size=1024, num_quantizers=8)
LFQ = dict(dim=18, codebook_size=2**18)

CASES = {
    "vq_train": lambda cfg: compare(
        "vq_train", "VectorQuantize", train_call, cfg, torch.randn(*TOKENS), **VQ
    ),
    "vq_eval": lambda cfg: compare("vq_eval", "VectorQuantize", eval_call, cfg, torch.randn(*TOKENS), **VQ),
    "vq_encode": lambda cfg: compare(
        "vq_encode", "VectorQuantize", encode_call, cfg, torch.randn(*TOKENS), **VQ
    ),
    "rvq_train": lambda cfg: compare("rvq_train", "ResidualVQ", train_call, cfg, torch.randn(*TOKENS), **RVQ),
    "lfq_train": lambda cfg: compare("lfq_train", "LFQ", train_call, cfg, torch.randn(8, 1024, 18), **LFQ),
}


if __name__ == "__main__":
    sys.exit(harness.main(__doc__.split("\n")[0], CASES, results_name="monitor_latest", default_wait_s=30.0))
