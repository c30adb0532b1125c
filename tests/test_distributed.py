"""torch.distributed: every rank holds the same codebook, equal to one process on the concatenated batch.

Two worker processes on the gloo backend (CPU) run every scenario once (this file, run as a script); the
tests compare their saved results with each other and with a single process here. A hang fails instead
of blocking CI: the workers run under a subprocess timeout and a 30 s process-group timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import assert_same_state, generator, snapshot

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 4
TIMEOUT_S = 90


# -- scenarios: each runs on a shard (rank, world) or, with world == 1, on the concatenated batch ---------


def shard(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n]


def data(seed, steps, shape, centres=None):
    g = generator(seed)
    xs = torch.randn(steps, *shape, generator=g)
    if centres is not None:  # clustered data: k-means seeds are far from ties
        c = torch.randn(centres, shape[-1], generator=g) * 4
        xs = xs * 0.3 + c[torch.randint(centres, shape[:-1], generator=g)]
    return xs


def scenario_ema(rank, world, vq=None):
    from vqcore import VectorQuantize

    if vq is None:
        torch.manual_seed(0)
        vq = VectorQuantize(dim=8, codebook_size=16, decay=0.8)
    vq.train()
    for x in data(1, STEPS, (8, 10, 8)):
        vq(shard(x, rank, world))
    return snapshot(vq)


def scenario_kmeans_expire(rank, world):
    """Separate codebooks per head, k-means init and dead-code expiry; rank 0 sees no valid token at first."""
    from vqcore import VectorQuantize

    torch.manual_seed(1)
    vq = VectorQuantize(
        dim=8,
        codebook_size=32,
        heads=2,
        separate_codebook_per_head=True,
        kmeans_init=True,
        threshold_ema_dead_code=2.0,
        decay=0.8,
    ).train()
    xs = data(2, STEPS, (8, 12, 8), centres=6)
    g = generator(3)
    masks = torch.rand(STEPS, 8, 12, generator=g) > 0.3
    masks[0, :4] = False  # the first step: no valid token on rank 0's shard
    for x, m in zip(xs, masks):
        vq(shard(x, rank, world), mask=shard(m, rank, world))
    return snapshot(vq)


def scenario_rvq_dropout(rank, world):
    from vqcore import GroupedResidualVQ, ResidualVQ

    torch.manual_seed(2)
    rvq = ResidualVQ(
        dim=8, num_quantizers=4, codebook_size=16, quantize_dropout=True, threshold_ema_dead_code=1.0
    )
    grvq = GroupedResidualVQ(
        dim=8,
        groups=2,
        num_quantizers=3,
        codebook_size=8,
        quantize_dropout=True,
        shared_codebook=True,
        kmeans_init=True,
    )
    torch.manual_seed(100 + rank)  # different on every rank: only the broadcast makes the draws agree
    rvq.train()
    grvq.train()
    kept = []
    for x in data(4, STEPS, (8, 10, 8)):
        _, idx, _ = rvq(shard(x, rank, world))
        _, gidx, _ = grvq(shard(x, rank, world))
        kept.append(((idx[0, 0] >= 0).sum().item(), (gidx[0, 0, 0] >= 0).sum().item()))
    return {"rvq": snapshot(rvq), "grvq": snapshot(grvq), "kept": kept}


def scenario_lfq(rank, world):
    from vqcore import LFQ

    torch.manual_seed(3)
    lfq = LFQ(dim=6, codebook_size=64, entropy_loss_weight=0.1, commitment_loss_weight=0.25).train()
    x = shard(data(5, 1, (8, 10, 6))[0], rank, world).clone().requires_grad_(True)
    out = lfq(x, return_loss_breakdown=True)
    (out.quantized.sum() * 0 + out.entropy_aux_loss).backward()
    b = out.breakdown
    return {
        "loss": out.entropy_aux_loss.detach(),
        "per_sample": b.per_sample_entropy.detach(),
        "batch": b.batch_entropy.detach(),
        "grad": x.grad.clone(),
    }


def scenario_ddp(rank, world):
    """DDP with broadcast_buffers=True and no_sync gradient accumulation (two micro-batches per step)."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vqcore import VectorQuantize

    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(8, 8), VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=1.0)
    )
    ddp = DDP(model, broadcast_buffers=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for x in data(6, STEPS, (2, 8, 10, 8)):
        with ddp.no_sync():
            out = ddp(shard(x[0], rank, world))
            (out.quantized.pow(2).mean() + out.loss).backward()
        out = ddp(shard(x[1], rank, world))
        (out.quantized.pow(2).mean() + out.loss).backward()
        opt.step()
        opt.zero_grad()
    return snapshot(model)


def scenario_monitor(rank, world):
    """Codebook monitor on a training ResidualVQ (per-layer errors in the hooks) and an eval encode: the
    report is read on every rank (the counts are summed over ranks when read)."""
    from vqcore import ResidualVQ
    from vqcore.metrics import CodebookMonitor

    torch.manual_seed(5)
    rvq = ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, decay=0.8).train()
    monitor = CodebookMonitor(rvq, layer_errors=True, name="rvq")
    xs = data(7, STEPS, (8, 10, 8))
    for x in xs:
        rvq(shard(x, rank, world))
    rvq.eval()
    rvq.encode(shard(xs[0], rank, world))
    return {"report": monitor.report(), "counts": monitor.counts()}


def eval_on_rank0_only(rank):
    """Eval forwards, encode and decode on rank 0 alone, with sync forced: no collective may run."""
    from vqcore import LFQ, ResidualVQ, VectorQuantize

    if rank != 0:
        return
    x = torch.randn(2, 5, 8)
    vq = VectorQuantize(
        dim=8, codebook_size=16, sync_codebook=True, kmeans_init=True, threshold_ema_dead_code=2
    ).eval()
    before = snapshot(vq)
    vq(x)
    vq.decode(vq.encode(x))
    rvq = ResidualVQ(
        dim=8, num_quantizers=3, codebook_size=16, quantize_dropout=True, sync_codebook=True
    ).eval()
    rvq(x)
    rvq.decode(rvq.encode(x))
    LFQ(dim=8, codebook_size=16, sync_entropy=True).eval()(x)
    assert_same_state(vq, before, "an eval forward touched the codebook: ")


SCENARIOS = {
    "ema": scenario_ema,
    "kmeans_expire": scenario_kmeans_expire,
    "rvq_dropout": scenario_rvq_dropout,
    "lfq": scenario_lfq,
    "ddp": scenario_ddp,
    "monitor": scenario_monitor,
}


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from vqcore import VectorQuantize

    torch.set_num_threads(1)
    torch.manual_seed(0)
    early = VectorQuantize(
        dim=8, codebook_size=16, decay=0.8
    )  # built BEFORE the process group: sync decided at call time
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    results = {"ema_early": scenario_ema(rank, world, early)}
    for name, run in SCENARIOS.items():
        results[name] = run(rank, world)
    eval_on_rank0_only(rank)
    dist.barrier()
    results["eval_rank0_done"] = True
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


# -- tests ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = free_port()
    # the workers import vqcore as installed and `helpers` from this folder (sys.path[0] of a script); the
    # repository root stays off sys.path, where plugins/ and export/ would shadow vqcore.plugins / .export
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(WORLD), str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed workers hung (> {TIMEOUT_S} s)")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_states(a, b, exact=True, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_ranks_identical_after_steps_on_different_shards(ranks):
    for name in ("ema", "ema_early", "kmeans_expire", "ddp"):
        assert_states(ranks[0][name], ranks[1][name])


def test_ema_equals_one_process_on_the_concatenated_batch(ranks):
    single = scenario_ema(0, 1)
    assert_states(ranks[0]["ema"], single, exact=False)
    assert_states(ranks[0]["ema_early"], single, exact=False)  # built before init_process_group: still synced


def test_kmeans_init_and_expiry_identical_and_global(ranks):
    single = scenario_kmeans_expire(0, 1)
    assert bool(ranks[0]["kmeans_expire"]["_codebook.initted"])
    assert_states(ranks[0]["kmeans_expire"], single, exact=False, atol=1e-4)


def test_residual_quantize_dropout_agreed(ranks):
    r0, r1 = ranks[0]["rvq_dropout"], ranks[1]["rvq_dropout"]
    assert r0["kept"] == r1["kept"]
    assert len({k for k, _ in r0["kept"]}) > 1 or len({k for _, k in r0["kept"]}) > 1  # dropout really varied
    assert_states(r0["rvq"], r1["rvq"])
    assert_states(r0["grvq"], r1["grvq"])


def test_lfq_entropy_over_the_global_batch(ranks):
    single = scenario_lfq(0, 1)
    for r in ranks:
        torch.testing.assert_close(r["lfq"]["batch"], single["batch"])
    per_sample = sum(r["lfq"]["per_sample"] for r in ranks) / WORLD
    torch.testing.assert_close(per_sample, single["per_sample"])
    # autograd-aware all-reduce: each rank's gradient, averaged by DDP (/ world), is the single-process one
    grad = torch.cat([r["lfq"]["grad"] for r in ranks]) / WORLD
    torch.testing.assert_close(grad, single["grad"], rtol=1e-4, atol=1e-7)
    assert single["grad"].abs().sum() > 0


def test_codebook_monitor_report_equals_one_process_on_the_concatenated_data(ranks):
    single = scenario_monitor(0, 1)
    for r in ranks:
        got, want = r["monitor"]["report"], single["report"]
        assert got.keys() == want.keys() and "rvq/layer1/energy_share" in want
        for key in want:  # counts (tokens, used codes, perplexity, ...) exactly; error sums to rounding
            exact = not key.endswith(("mse", "error", "energy_share"))
            assert got[key] == want[key] if exact else got[key] == pytest.approx(want[key], rel=1e-6), key
        for book, counts in single["counts"].items():
            assert torch.equal(r["monitor"]["counts"][book], counts), book
    assert single["report"]["rvq/layer0/tokens"] == (STEPS + 1) * 80


def test_eval_on_rank0_alone_does_not_hang(ranks):
    assert all(r["eval_rank0_done"] for r in ranks)


def test_sync_is_off_without_a_process_group():
    from vqcore.blocks.distributed import should_sync

    assert not should_sync(None) and not should_sync(True)


def test_train_ddp_example_with_torchrun():
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this interpreter")
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "examples" / "train_ddp.py"),
        "--backend",
        "gloo",
        "--steps",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun examples/train_ddp.py hung (> {TIMEOUT_S} s)")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "codebook state identical across ranks" in result.stdout


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
