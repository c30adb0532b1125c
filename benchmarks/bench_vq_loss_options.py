"""VectorQuantize's estimator, loss and forward options: vqcore vs vector-quantize-pytorch 1.32.0 ("the
reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_vq_loss_options.py            # full
    .venv/bin/python benchmarks/bench_vq_loss_options.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_vq_loss_options.py --only diversity_train,topk_eval

Cases (vqcore and the reference interleaved in one process; VectorQuantize(dim=64, codebook_size=512) on
x (4, 1024, 64), rotation_trick=False on both sides; targets: vqcore no slower, ratio >= 0.9 with 10%
tolerance for timer noise):

- ``diversity_train`` / ``diversity_eval``: ``codebook_diversity_loss_weight=0.1``: a training step
  (forward, backward of ``quantized.sum() + loss``) / an eval forward under no_grad;
- ``ce_commitment_train`` / ``ce_commitment_eval``: ``commitment_use_cross_entropy_loss=True``;
- ``diveq_train`` / ``diveq_eval``: ``directional_reparam=True`` (learnable codebook,
  ``threshold_ema_dead_code=2``);
- ``topk_train`` / ``topk_eval``: ``forward(x, topk=4)`` (backward of ``quantized.sum() + loss.sum()``);
- ``diversity_memory``: peak memory of one ``diversity_train`` step on x (4, 4096, 64) with
  codebook_size=2048, each implementation in a fresh subprocess; target: vqcore's peak <= the
  reference's (+ 10%).

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import harness
import torch
from harness import Config, Impl, Row, build, side_by_side

SHAPE = (4, 1024, 64)
BASE = dict(dim=64, codebook_size=512, rotation_trick=False)
OPTIONS = {
    "diversity": dict(codebook_diversity_loss_weight=0.1),
    "ce_commitment": dict(commitment_use_cross_entropy_loss=True),
    "diveq": dict(directional_reparam=True, threshold_ema_dead_code=2, learnable_codebook=True),
    "topk": {},
}
FORWARD = {"topk": dict(topk=4)}
MEMORY_SHAPE = (4, 4096, 64)
MEMORY_OPTIONS = dict(dim=64, codebook_size=2048, rotation_trick=False, codebook_diversity_loss_weight=0.1)


def train_step(module, x: torch.Tensor, **forward: object) -> Callable[[], None]:
    """A training step: forward on a fresh leaf copy of x, backward of ``quantized.sum() + loss.sum()``."""
    module.train()

    def call():
        leaf = x.detach().requires_grad_(True)
        out = module(leaf, **forward)
        (out[0].sum() + out[2].sum()).backward()

    return call


def eval_forward(module, x: torch.Tensor, **forward: object) -> Callable[[], object]:
    module.eval()

    def call():
        with torch.no_grad():
            return module(x, **forward)

    return call


def make_case(option: str, mode: str) -> Callable[[Config], list[Row]]:
    def case(cfg: Config) -> list[Row]:
        x = torch.randn(*SHAPE)
        call = train_step if mode == "train" else eval_forward
        forward = FORWARD.get(option, {})
        impls = [
            Impl(lib, call(build(lib, "VectorQuantize", **BASE, **OPTIONS[option]), x, **forward))
            for lib in ("vqcore", "reference")
        ]
        return side_by_side(f"{option}_{mode}", impls, cfg)

    return case


def child(lib: str) -> None:
    """One ``diversity_memory`` step of ``lib`` ("vqcore" or "reference"), in this fresh process."""
    harness.child_setup()
    module = build(lib, "VectorQuantize", **MEMORY_OPTIONS)
    train_step(module, torch.randn(1, 4, 64))()  # warm-up on a tiny input
    print(json.dumps(harness.measure_peak(train_step(module, torch.randn(*MEMORY_SHAPE)))))


def case_diversity_memory(cfg: Config) -> list[Row]:
    return harness.peak_memory_rows("diversity_memory", __file__)


CASES = {f"{option}_{mode}": make_case(option, mode) for option in OPTIONS for mode in ("train", "eval")}
CASES["diversity_memory"] = case_diversity_memory


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0],
            CASES,
            results_name="vq_loss_options_latest",
            default_wait_s=30.0,
            child=child,
        )
    )
