"""Codebook monitor overhead: vqcore with and without a ``vqcore.metrics.CodebookMonitor`` attached, next
to vector-quantize-pytorch 1.32.0 ("the reference", which has no monitor).

Run from the repository root::

    .venv/bin/python benchmarks/bench_monitor.py            # full
    .venv/bin/python benchmarks/bench_monitor.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_monitor.py --only vq_train

Cases (each interleaved in one process; the two vqcore modules start from the same state):

- ``vq_train``: a training step (forward, backward of ``quantized.sum() + loss``) of
  VectorQuantize(dim=256, codebook_size=1024) on (8, 1024, 256): 8192 tokens. ``vqcore+monitor`` counts
  every code and sums the quantization error in the forward hook (the defaults); ``vqcore+counts`` only
  counts (``track_error=False``). Target: the monitor at most 3% slower than no monitor (paired ratio
  <= 1.03);
- ``vq_eval``: the eval forward under no_grad (no target: the error sums read the input and the output
  once more, which an eval forward feels more than a training step);
- ``vq_encode``: ``encode`` (counted through the wrapped encode; no error sums there);
- ``rvq_train``: ResidualVQ with 8 layers of 1024 codes, same input, same target as vq_train;
- ``lfq_train``: LFQ(dim=18, codebook_size=2^18): a 2^18-code table per book (exact counting), same
  target (no reference row: its LFQ builds a tokens x 2^18 matrix, more memory than this machine has).

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


def variants(cls: str, with_reference: bool, **kwargs) -> dict[str, torch.nn.Module]:
    """vqcore without a monitor, with one (the defaults), with one counting codes only
    (``track_error=False``), and the reference where asked; all with the same initial state."""
    torch.manual_seed(0)
    plain = build("vqcore", cls, **kwargs)
    modules = {"vqcore": plain}
    for name, track_error in (("vqcore+monitor", True), ("vqcore+counts", False)):
        module = build("vqcore", cls, **kwargs)
        module.load_state_dict(plain.state_dict())
        CodebookMonitor(module, track_error=track_error)
        modules[name] = module
    if with_reference:
        modules["reference"] = build("reference", cls, **kwargs)
        modules["reference"].load_state_dict(plain.state_dict(), strict=False)
    return modules


def target_overhead(rows: list[Row]) -> list[Row]:
    """The monitored row (``rows[1]``): at most ``MAX_OVERHEAD`` times the unmonitored step, paired."""
    row = rows[1]
    row.target = f"monitor overhead <= {100 * (MAX_OVERHEAD - 1):.0f}% (paired ratio <= {MAX_OVERHEAD})"
    row.passed = row.paired_ratio is not None and row.paired_ratio <= MAX_OVERHEAD
    return rows


def compare(case: str, cls: str, make_call, cfg: Config, x: torch.Tensor, **kwargs) -> list[Row]:
    """The variants' same call, interleaved; the reference where it has the call (not encode) and affords
    it (its LFQ holds a tokens x 2^18 matrix: several GiB here). Training steps carry the target."""
    with_reference = make_call is not encode_call and cls != "LFQ"
    modules = variants(cls, with_reference, **kwargs)
    impls = [Impl(name, make_call(module, x)) for name, module in modules.items()]
    rows = run_case(case, impls, cfg, reps=41, warmup=3)
    return target_overhead(rows) if make_call is train_call else rows


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
