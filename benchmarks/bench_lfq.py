"""Scalar-quantizer benchmarks: vqcore vs vector-quantize-pytorch 1.32.0 ("the reference").

Run from the repository root::

    .venv/bin/python benchmarks/bench_lfq.py            # full
    .venv/bin/python benchmarks/bench_lfq.py --quick    # smoke mode: 2 reps
    .venv/bin/python benchmarks/bench_lfq.py --only lfq65536,rlfq

Cases (all training mode, forward + backward of ``quantized.sum() + losses``):

- ``lfq65536``: LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1) on (4, 16, 32, 32). The
  reference materialises (4096 tokens x 65536 codes) float32 tensors (1 GiB each), so each
  implementation runs ONCE at full size in its own fresh subprocess (after a warm-up on a tiny input):
  wall time of that first call and the RSS high-water mark above the post-setup baseline. vqcore is
  also timed in this process (median of interleaved reps), reported as a second row.
  Targets: >= 20x faster, <= 1/50 of the reference's peak memory.
- ``rlfq``: ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8) on (4, 1024, 256), interleaved;
  target >= 5x faster.
- ``lfq_options``: each option the reference's LFQ shares with vqcore's (``spherical``,
  ``orthogonal_rotation``, ``soft_clamp_input_value``, ``cosine_sim_project_in``,
  ``experimental_softplus_entropy_loss``, ``frac_per_sample_entropy=0.5``,
  ``straight_through_activation=Tanh``) on
  LFQ(codebook_size=1024, dim=16, ...) with (4, 16, 32, 32) inputs: interleaved times, and each
  implementation's peak in its own fresh subprocess. Target: vqcore no slower (ratio >= 0.9) and no more
  peak memory than the reference.
- ``bsq18``: spherical LFQ with 2^18 codes (codebook_size=2**18, dim=18, spherical=True) on (4, 18, 32, 32),
  one training step in a fresh subprocess. Target: at most 64 MiB above the input. The reference would
  materialise (4096 tokens x 2^18 codes) float32 tensors (4 GiB each: distances, probabilities, entropy
  terms and their gradients), more than this machine holds, so it is not run: the row notes that size.
- ``fsq``, ``rfsq``, ``latent``: FSQ([8, 5, 5, 5], dim=256), ResidualFSQ([8, 5, 5, 3], 8 layers,
  dim=256), LatentQuantize([5, 5, 8], dim=16) on sequences; target: no slower (ratio >= 1, with 10%
  tolerance for timer noise).

ratio = reference time / vqcore time (> 1: vqcore faster). Timing, noise handling, the table and the
command line come from harness.py.
"""

from __future__ import annotations

import json
import sys

import harness
import torch
from harness import (
    Config,
    Impl,
    Row,
    build,
    interleaved,
    run_case,
    target_faster,
    target_no_slower,
    train_call,
)

LFQ_SHAPE = (4, 16, 32, 32)
LFQ65536 = dict(codebook_size=65536, dim=16, entropy_loss_weight=0.1)


def vqcore_against_reference(
    case: str, name: str, kwargs: dict, shape: tuple, cfg: Config, reps: int, warmup: int
) -> list[Row]:
    """Training steps of vqcore's ``name(**kwargs)`` and the reference's, interleaved."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    impls = [
        Impl("vqcore", train_call(build("vqcore", name, **kwargs), x)),
        Impl("reference", train_call(build("reference", name, **kwargs), x)),
    ]
    rows = run_case(case, impls, cfg, reps, warmup)
    for row in rows:
        row.impl = f"{row.impl} {name}"
    return rows


OPTIONS_BASE = dict(codebook_size=1024, dim=16, entropy_loss_weight=0.1)
OPTIONS = {
    "spherical": dict(spherical=True),
    "orthogonal_rotation": dict(orthogonal_rotation=True),
    "soft_clamp": dict(soft_clamp_input_value=2.0),
    "cosine_project_in": dict(codebook_size=256, cosine_sim_project_in=True),  # projections: dim 16 -> 8
    "softplus_loss": dict(experimental_softplus_entropy_loss=True),
    "frac_per_sample_entropy": dict(frac_per_sample_entropy=0.5),
    "activation": dict(straight_through_activation=torch.nn.Tanh()),
}
BSQ18 = dict(codebook_size=2**18, dim=18, spherical=True)
BSQ18_SHAPE = (4, 18, 32, 32)


# -- memory children: one training step per fresh subprocess ------------------------------------------
def child(name: str) -> None:
    """One training step in this fresh process: ``name`` is "vqcore" / "reference" (lfq65536),
    "option:<option>:<lib>" (lfq_options) or "bsq18" (vqcore)."""
    harness.child_setup()
    if name.startswith("option:"):
        _, option, lib = name.split(":")
        module, shape = build(lib, "LFQ", **{**OPTIONS_BASE, **OPTIONS[option]}), LFQ_SHAPE
    elif name == "bsq18":
        module, shape = build("vqcore", "LFQ", **BSQ18), BSQ18_SHAPE
    else:
        module, shape = build(name, "LFQ", **LFQ65536), LFQ_SHAPE
    train_call(module, torch.randn(1, shape[1], 2, 2))()  # warm-up on a tiny input: kernels, thread pool
    step = train_call(module, torch.randn(*shape))
    print(json.dumps(harness.measure_peak(step)))


def case_lfq65536(cfg: Config) -> list[Row]:
    results = harness.child_results(__file__, ["vqcore", "reference"], timeout=600)
    ours, ref = results["vqcore"], results["reference"]
    rows = [
        Row(
            "lfq65536",
            "vqcore LFQ (first call, own process)",
            ours["ms"],
            [ours["ms"]],
            peak_mib=ours["peak_above_baseline_mib"],
        ),
        Row(
            "lfq65536",
            "reference LFQ (first call, own process)",
            ref["ms"],
            [ref["ms"]],
            peak_mib=ref["peak_above_baseline_mib"],
        ),
    ]
    rows[0].ratio = 1.0
    rows[1].ratio = ref["ms"] / ours["ms"]
    mem_ratio = ref["peak_above_baseline_mib"] / max(ours["peak_above_baseline_mib"], 1e-3)
    rows[1].target = "vqcore >= 20x faster and <= 1/50 of the peak"
    rows[1].passed = rows[1].ratio >= 20 and mem_ratio >= 50
    rows[1].note = f"peak memory ratio reference / vqcore = {mem_ratio:.0f}x ({ours['method']})"
    # steady-state vqcore time in this process, against the reference's single call
    torch.manual_seed(0)
    x = torch.randn(*LFQ_SHAPE)
    impl = Impl("vqcore", train_call(build("vqcore", "LFQ", **LFQ65536), x))
    times = interleaved([impl], 2 if cfg.quick else 10, 2, harness.Noise(cfg.wait_budget_s)).times["vqcore"]
    steady = sorted(times)[len(times) // 2]
    row = Row("lfq65536", "vqcore LFQ (steady state, median)", steady, times, ratio=ref["ms"] / steady)
    row.note = "ratio here = reference first call / vqcore steady-state median"
    rows.append(row)
    return rows


def case_rlfq(cfg: Config) -> list[Row]:
    kwargs = dict(dim=256, codebook_size=256, num_quantizers=8)
    rows = vqcore_against_reference("rlfq", "ResidualLFQ", kwargs, (4, 1024, 256), cfg, 7, 2)
    target_faster(rows[1], 5)
    return rows


def case_lfq_options(cfg: Config) -> list[Row]:
    rows: list[Row] = []
    for option, extra in OPTIONS.items():
        kwargs = {**OPTIONS_BASE, **extra}
        case = f"lfq_{option}"
        pair = vqcore_against_reference(case, "LFQ", kwargs, LFQ_SHAPE, cfg, 7, 2)
        peaks = harness.child_results(__file__, [f"option:{option}:{lib}" for lib in ("vqcore", "reference")])
        ours, ref = (
            peaks[f"option:{option}:{lib}"]["peak_above_baseline_mib"] for lib in ("vqcore", "reference")
        )
        pair[0].peak_mib, pair[1].peak_mib = ours, ref
        pair[1].target = "vqcore no slower (ratio >= 0.9), peak <= the reference's"
        pair[1].passed = pair[1].ratio >= 0.9 and ours <= ref
        rows += pair
    return rows


def case_bsq18(cfg: Config) -> list[Row]:
    ours = harness.child_results(__file__, ["bsq18"], timeout=600)["bsq18"]
    row = Row("bsq18", "vqcore LFQ spherical 2^18 (first call, own process)", ours["ms"], [ours["ms"]])
    row.peak_mib, row.ratio = ours["peak_above_baseline_mib"], 1.0
    row.target = "<= 64 MiB above the input"
    row.passed = row.peak_mib <= 64
    tokens = BSQ18_SHAPE[0] * BSQ18_SHAPE[2] * BSQ18_SHAPE[3]
    gib = tokens * 2**18 * 4 / 2**30
    row.note = (
        f"the reference needs {tokens} x 2^18 float32 tensors ({gib:.0f} GiB each; distances, "
        f"probabilities, entropy terms and gradients): not run ({ours['method']})"
    )
    return [row]


def case_fsq(cfg: Config) -> list[Row]:
    kwargs = dict(levels=[8, 5, 5, 5], dim=256)
    return target_no_slower(vqcore_against_reference("fsq", "FSQ", kwargs, (4, 1024, 256), cfg, 9, 2))


def case_rfsq(cfg: Config) -> list[Row]:
    kwargs = dict(levels=[8, 5, 5, 3], num_quantizers=8, dim=256)
    return target_no_slower(
        vqcore_against_reference("rfsq", "ResidualFSQ", kwargs, (4, 1024, 256), cfg, 9, 2)
    )


def case_latent(cfg: Config) -> list[Row]:
    # the reference treats 3-D input as channel-first (b, dim, n), so both get an image fmap
    kwargs = dict(levels=[5, 5, 8], dim=16)
    return target_no_slower(
        vqcore_against_reference("latent", "LatentQuantize", kwargs, (4, 16, 32, 32), cfg, 9, 2)
    )


CASES = {
    "lfq65536": case_lfq65536,
    "rlfq": case_rlfq,
    "lfq_options": case_lfq_options,
    "bsq18": case_bsq18,
    "fsq": case_fsq,
    "rfsq": case_rfsq,
    "latent": case_latent,
}


if __name__ == "__main__":
    sys.exit(
        harness.main(
            __doc__.split("\n")[0], CASES, results_name="lfq_latest", default_wait_s=30.0, child=child
        )
    )
