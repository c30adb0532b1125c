"""LatentQuantize and EvoLFQ benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_latent.py            # full (~1-2 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_latent.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_latent.py --only latent_train,evo_step

Cases (vqcore and the reference interleaved in one process; targets: vqcore no slower, ratio >= 0.9
with 10% tolerance for timer noise):

- ``latent_train``: a training step (forward, backward of ``quantized.sum() + loss``) of
  LatentQuantize([5, 5, 8], dim=16) on an image fmap (4, 16, 32, 32);
- ``latent_seq``: the same on a (4, 16, 1024) sequence read channel-first (the reference reads 3-D input
  as (b, dim, n); vqcore is built with ``channel_first=True``);
- ``latent_eval``: an eval forward under no_grad on the image fmap;
- ``latent_memory``: peak memory of one ``latent_train`` step, each implementation in a fresh
  subprocess; target: vqcore's peak <= the reference's (+ 10%);
- ``latent_in_place``: vqcore's training step with ``in_place_codebook_optimizer`` (SGD) against its
  step without one (the reference's training forward with the optimizer raises, so it has no row): the
  cost of the in-place step; no target;
- ``evo_encode``: EvoLFQ.encode (identity encoder, LFQ(dim=16, codebook_size=65536)) of (64, 256, 16);
- ``evo_step``: one generation of the genetic search (decode a population of 512 genes of 16 bits,
  score, select, cross over, mutate), identity encoder/decoder.

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import functools
import json
import sys

import harness
import torch
from harness import Config, Impl, Row, build, eval_call, run_case, side_by_side, train_call
from torch import nn

IMAGE = (4, 16, 32, 32)
SEQUENCE = (4, 16, 1024)
LATENT = dict(levels=[5, 5, 8], dim=16)
EVO_LFQ = dict(dim=16, codebook_size=65536)


def case_latent_train(cfg: Config) -> list[Row]:
    x = torch.randn(*IMAGE)
    return side_by_side(
        "latent_train",
        [
            Impl("vqcore", train_call(build("vqcore", "LatentQuantize", **LATENT), x)),
            Impl("reference", train_call(build("reference", "LatentQuantize", **LATENT), x)),
        ],
        cfg,
    )


def case_latent_seq(cfg: Config) -> list[Row]:
    x = torch.randn(*SEQUENCE)
    ours = build("vqcore", "LatentQuantize", channel_first=True, **LATENT)
    return side_by_side(
        "latent_seq",
        [
            Impl("vqcore", train_call(ours, x)),
            Impl("reference", train_call(build("reference", "LatentQuantize", **LATENT), x)),
        ],
        cfg,
    )


def case_latent_eval(cfg: Config) -> list[Row]:
    x = torch.randn(*IMAGE)
    return side_by_side(
        "latent_eval",
        [
            Impl("vqcore", eval_call(build("vqcore", "LatentQuantize", **LATENT), x)),
            Impl("reference", eval_call(build("reference", "LatentQuantize", **LATENT), x)),
        ],
        cfg,
    )


def child(lib: str) -> None:
    """One ``latent_train`` step of ``lib`` ("vqcore" or "reference"), in this fresh process."""
    harness.child_setup()
    module = build(lib, "LatentQuantize", **LATENT)
    train_call(module, torch.randn(1, 16, 2, 2))()  # warm-up on a tiny input
    print(json.dumps(harness.measure_peak(train_call(module, torch.randn(*IMAGE)))))


def case_latent_memory(cfg: Config) -> list[Row]:
    return harness.peak_memory_rows("latent_memory", __file__)


def case_latent_in_place(cfg: Config) -> list[Row]:
    x = torch.randn(*IMAGE)
    optimizer = functools.partial(torch.optim.SGD, lr=0.01)
    rows = run_case(
        "latent_in_place",
        [
            Impl("vqcore", train_call(build("vqcore", "LatentQuantize", **LATENT), x)),
            Impl(
                "vqcore in_place_codebook_optimizer",
                train_call(
                    build("vqcore", "LatentQuantize", in_place_codebook_optimizer=optimizer, **LATENT), x
                ),
            ),
        ],
        cfg,
        9,
        2,
    )
    rows[1].note = "the reference's training forward with the optimizer raises AttributeError: no row"
    return rows


def _evo(lib: str):
    lfq = build(lib, "LFQ", **EVO_LFQ)
    return build(lib, "EvoLFQ", encoder=nn.Identity(), decoder=nn.Identity(), lfq=lfq, pop_size=512)


def case_evo_encode(cfg: Config) -> list[Row]:
    x = torch.randn(64, 256, 16)
    ours, ref = _evo("vqcore"), _evo("reference")
    return side_by_side(
        "evo_encode", [Impl("vqcore", lambda: ours.encode(x)), Impl("reference", lambda: ref.encode(x))], cfg
    )


def case_evo_step(cfg: Config) -> list[Row]:
    ours, ref = _evo("vqcore"), _evo("reference")
    population = ours.init_random_population()
    target = torch.randn(16)

    def fitness(decoded, genes):
        return -(decoded - target).square().sum(-1)

    return side_by_side(
        "evo_step",
        [
            Impl("vqcore", lambda: ours.step(population, fitness)),
            Impl("reference", lambda: ref.step(population, fitness)),
        ],
        cfg,
    )


CASES = {
    "latent_train": case_latent_train,
    "latent_seq": case_latent_seq,
    "latent_eval": case_latent_eval,
    "latent_memory": case_latent_memory,
    "latent_in_place": case_latent_in_place,
    "evo_encode": case_evo_encode,
    "evo_step": case_evo_step,
}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="latent_latest", default_wait_s=30.0, child=child
        )
    )
