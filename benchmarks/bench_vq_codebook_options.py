"""VectorQuantize codebook-training options: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_vq_codebook_options.py            # full
    .venv/bin/python benchmarks/bench_vq_codebook_options.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_vq_codebook_options.py --only affine_train,bridge_eval

Cases (vqcore and the reference interleaved in one process, both with the straight-through estimator
(``rotation_trick=False``); VectorQuantize(dim=256, codebook_size=1024) on (8, 512, 256) tokens; targets:
vqcore no slower, ratio >= 0.9 with 10% tolerance for timer noise):

- ``affine_train`` / ``affine_eval``: ``affine_param=True`` (EMA codebook), a training step (forward,
  backward of ``quantized.sum() + loss``) / an eval forward under no_grad;
- ``bridge_train`` / ``bridge_eval``: ``vq_bridge=nn.Linear(256, 256)`` (learnable codes, no EMA);
- ``in_place_train``: ``learnable_codebook=True, in_place_codebook_optimizer=SGD(lr=0.01)`` (the reference
  also needs ``ema_update=False``), a training step, the in-place step and the second quantization included;
- ``affine_memory``: peak memory of one ``affine_train`` step, each implementation in a fresh subprocess;
  target: vqcore's peak <= the reference's (+ 10%).

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import functools
import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, side_by_side, train_call
from torch import nn

SHAPE = (8, 512, 256)
BASE = dict(dim=256, codebook_size=1024, rotation_trick=False)
SGD = functools.partial(torch.optim.SGD, lr=0.01)


def options(lib: str, case: str) -> dict:
    """The quantizer's keyword arguments for ``case`` (a fresh bridge, seeded alike for both libraries)."""
    if case == "affine":
        return dict(BASE, affine_param=True)
    if case == "bridge":
        torch.manual_seed(1)
        return dict(BASE, vq_bridge=nn.Linear(256, 256))
    extra = dict(ema_update=False) if lib == "reference" else {}
    return dict(BASE, learnable_codebook=True, in_place_codebook_optimizer=SGD, **extra)


def quantizer(lib: str, case: str):
    torch.manual_seed(0)
    return build(lib, "VectorQuantize", **options(lib, case))


def training(case: str):
    def run(cfg: Config) -> list[Row]:
        x = torch.randn(*SHAPE)
        impls = [Impl(lib, train_call(quantizer(lib, case), x)) for lib in ("vqcore", "reference")]
        return side_by_side(f"{case}_train", impls, cfg)

    return run


def evaluation(case: str):
    def run(cfg: Config) -> list[Row]:
        x = torch.randn(*SHAPE)
        impls = []
        for lib in ("vqcore", "reference"):
            module = quantizer(lib, case)
            train_call(module, x)()  # one training step: the statistics (affine) exist
            impls.append(Impl(lib, eval_call(module, x)))
        return side_by_side(f"{case}_eval", impls, cfg)

    return run


def child(lib: str) -> None:
    """One ``affine_train`` step of ``lib`` ("vqcore" or "reference"), in this fresh process."""
    harness.child_setup()
    module = quantizer(lib, "affine")
    train_call(module, torch.randn(1, 4, 256))()  # warm-up on a tiny input
    print(json.dumps(harness.measure_peak(train_call(module, torch.randn(*SHAPE)))))


def case_affine_memory(cfg: Config) -> list[Row]:
    return harness.peak_memory_rows("affine_memory", __file__)


CASES = {
    "affine_train": training("affine"),
    "affine_eval": evaluation("affine"),
    "bridge_train": training("bridge"),
    "bridge_eval": evaluation("bridge"),
    "in_place_train": training("in_place"),
    "affine_memory": case_affine_memory,
}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0],
            CASES,
            results_name="vq_codebook_options_latest",
            default_wait_s=30.0,
            child=child,
        )
    )
