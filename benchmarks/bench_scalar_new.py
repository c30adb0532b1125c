"""FSP and BinaryMapper benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_scalar_new.py            # full (~1-2 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_scalar_new.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_scalar_new.py --only fsp_train,bm_train

Cases (interleaved; target for each: vqcore no slower, ratio >= 0.9 for timer noise):

- ``fsp_train`` / ``fsp_eval``: FSP([8, 5, 5, 5], dim=256) on (4, 1024, 256): a training step (perturbation
  at quantize_rate 0, forward + backward of ``quantized.sum() + norm_loss``) / an eval forward;
- ``fsp_small``: FSP([8, 5, 5, 5]) without projections on (16, 1024, 4), training step;
- ``bm_train`` / ``bm_eval``: BinaryMapper(bits=8) on logits (16, 256, 8): a training step (sampling,
  straight-through, forward + backward of ``one_hot.sum() + aux_kl_loss``) / a deterministic eval forward;
- ``bm_memory``: one BinaryMapper(bits=12) training step on (4, 256, 12) per implementation, each in a
  fresh subprocess: the RSS high-water mark above the post-setup baseline; target: vqcore's peak <= the
  reference's.

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, run_case, train_call

FSP_KWARGS = dict(levels=[8, 5, 5, 5], dim=256)
BM_MEMORY = dict(bits=12)
BM_MEMORY_SHAPE = (4, 256, 12)


def bm_train_call(module, logits: torch.Tensor) -> Callable[[], None]:
    """A BinaryMapper training step: forward, then the backward of ``one_hot.sum() + aux_kl_loss``."""
    module.train()

    def call():
        leaf = logits.detach().requires_grad_(True)
        one_hot, aux_kl_loss = module(leaf)
        (one_hot.sum() + aux_kl_loss).backward()

    return call


def bm_eval_call(module, logits: torch.Tensor) -> Callable[[], object]:
    module.eval()

    def call():
        with torch.no_grad():
            return module(logits, deterministic=True)

    return call


def side_by_side(
    case: str, cls: str, kwargs: dict, shape: tuple, make_call, cfg: Config, reps: int = 9
) -> list[Row]:
    """vqcore's and the reference's ``cls(**kwargs)``, interleaved; target: vqcore no slower."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    impls = [
        Impl("vqcore", make_call(build("vqcore", cls, **kwargs), x)),
        Impl("reference", make_call(build("reference", cls, **kwargs), x)),
    ]
    rows = run_case(case, impls, cfg, reps, 2)
    for row in rows:
        row.impl = f"{row.impl} {cls}"
    rows[1].target = "vqcore no slower (ratio >= 0.9)"
    rows[1].passed = rows[1].ratio >= 0.9
    return rows


def case_fsp_train(cfg: Config) -> list[Row]:
    return side_by_side("fsp_train", "FSP", FSP_KWARGS, (4, 1024, 256), train_call, cfg)


def case_fsp_eval(cfg: Config) -> list[Row]:
    return side_by_side("fsp_eval", "FSP", FSP_KWARGS, (4, 1024, 256), eval_call, cfg)


def case_fsp_small(cfg: Config) -> list[Row]:
    return side_by_side("fsp_small", "FSP", dict(levels=[8, 5, 5, 5]), (16, 1024, 4), train_call, cfg)


def case_bm_train(cfg: Config) -> list[Row]:
    return side_by_side("bm_train", "BinaryMapper", dict(bits=8), (16, 256, 8), bm_train_call, cfg)


def case_bm_eval(cfg: Config) -> list[Row]:
    return side_by_side("bm_eval", "BinaryMapper", dict(bits=8), (16, 256, 8), bm_eval_call, cfg)


# -- bm_memory: one call per fresh subprocess ---------------------------------------------------------
def child(lib: str) -> None:
    """One BinaryMapper(bits=12) training step of ``lib`` ("vqcore" or "reference") in this process."""
    harness.child_setup()
    module = build(lib, "BinaryMapper", **BM_MEMORY)
    bm_train_call(module, torch.randn(1, 2, 12))()  # warm-up on a tiny input
    print(json.dumps(harness.measure_peak(bm_train_call(module, torch.randn(*BM_MEMORY_SHAPE)))))


def case_bm_memory(cfg: Config) -> list[Row]:
    results = harness.child_results(__file__, ["vqcore", "reference"], timeout=600)
    rows = []
    for lib in ("vqcore", "reference"):
        info = results[lib]
        row = Row("bm_memory", f"{lib} BinaryMapper (one call, own process)", info["ms"], [info["ms"]])
        row.peak_mib = info["peak_above_baseline_mib"]
        rows.append(row)
    rows[0].ratio = 1.0
    rows[1].ratio = rows[1].median_ms / rows[0].median_ms
    rows[1].target = "vqcore peak <= reference peak"
    rows[1].passed = rows[0].peak_mib <= rows[1].peak_mib
    rows[1].note = f"{results['vqcore']['method']}; single calls: times are indicative only"
    return rows


CASES = {
    "fsp_train": case_fsp_train,
    "fsp_eval": case_fsp_eval,
    "fsp_small": case_fsp_small,
    "bm_train": case_bm_train,
    "bm_eval": case_bm_eval,
    "bm_memory": case_bm_memory,
}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="scalar_new_latest", default_wait_s=30.0, child=child
        )
    )
