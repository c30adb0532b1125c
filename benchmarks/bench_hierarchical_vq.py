"""HierarchicalVQ benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_hierarchical_vq.py            # full
    .venv/bin/python benchmarks/bench_hierarchical_vq.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_hierarchical_vq.py --only hvq_train,hvq_eval

Cases (vqcore and the reference interleaved in one process; targets: vqcore no slower, ratio >= 0.9
with 10% tolerance for timer noise), all on HierarchicalVQ(dim=256, codebook_size=4096,
scales=(1, 2, 4, 8, 16), accept_image_fmap=True) with the reference's defaults otherwise (shared
codebook, k-means init, dead-code expiry at 2, one shared phi conv) and an image fmap (8, 256, 16, 16):

- ``hvq_train``: a training step (forward, backward of ``quantized.sum() + commit_loss``), after a
  warm-up that runs the k-means init;
- ``hvq_eval``: an eval forward under no_grad;
- ``hvq_memory``: peak memory of one ``hvq_train`` step, each implementation in a fresh subprocess;
  target: vqcore's peak <= the reference's (+ 10%).

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, side_by_side, train_call

FMAP = (8, 256, 16, 16)
HVQ = dict(dim=256, codebook_size=4096, scales=(1, 2, 4, 8, 16), accept_image_fmap=True)


def _trained(lib: str, x: torch.Tensor):
    """The module after one training step (its k-means init done), as a user's would be."""
    torch.manual_seed(0)
    module = build(lib, "HierarchicalVQ", **HVQ)
    train_call(module, x)()
    return module


def case_hvq_train(cfg: Config) -> list[Row]:
    x = torch.randn(*FMAP)
    return side_by_side(
        "hvq_train",
        [
            Impl("vqcore", train_call(_trained("vqcore", x), x)),
            Impl("reference", train_call(_trained("reference", x), x)),
        ],
        cfg,
    )


def case_hvq_eval(cfg: Config) -> list[Row]:
    x = torch.randn(*FMAP)
    return side_by_side(
        "hvq_eval",
        [
            Impl("vqcore", eval_call(_trained("vqcore", x), x)),
            Impl("reference", eval_call(_trained("reference", x), x)),
        ],
        cfg,
    )


def child(lib: str) -> None:
    """One ``hvq_train`` step of ``lib`` ("vqcore" or "reference"), in this fresh process."""
    harness.child_setup()
    x = torch.randn(*FMAP)
    module = _trained(lib, x)  # the k-means init and a first step, before the measured one
    print(json.dumps(harness.measure_peak(train_call(module, x))))


def case_hvq_memory(cfg: Config) -> list[Row]:
    return harness.peak_memory_rows("hvq_memory", __file__)


CASES = {"hvq_train": case_hvq_train, "hvq_eval": case_hvq_eval, "hvq_memory": case_hvq_memory}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0],
            CASES,
            results_name="hierarchical_vq_latest",
            default_wait_s=30.0,
            child=child,
        )
    )
