"""Train a tiny autoencoder with a vqcore quantizer under DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/train_ddp.py --backend gloo            # CPU
    torchrun --nproc_per_node 2 examples/train_ddp.py --backend nccl            # one GPU per process

Every rank trains on its own shard of random clustered data. The quantizer syncs its training state by
itself (EMA counts and sums, k-means, dead-code replacements, dropout draws, LFQ batch entropy): at the
end the script gathers every rank's quantizer state and checks that it is identical, then runs a
validation pass in eval mode on rank 0 alone (eval runs no collective, so it cannot hang).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def build_quantizer(name: str, dim: int) -> nn.Module:
    from vqcore import LFQ, ResidualVQ, VectorQuantize

    if name == "vq":
        return VectorQuantize(dim=dim, codebook_size=64, kmeans_init=True, threshold_ema_dead_code=1.0)
    if name == "rvq":
        return ResidualVQ(
            dim=dim, num_quantizers=3, codebook_size=32, quantize_dropout=True, kmeans_init=True
        )
    if name == "lfq":
        return LFQ(dim=dim, codebook_size=64, entropy_loss_weight=0.1)
    raise ValueError(f"unknown quantizer {name!r}")


class AutoEncoder(nn.Module):
    def __init__(self, features: int, dim: int, quantizer: str):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, 64), nn.GELU(), nn.Linear(64, dim))
        self.quantizer = build_quantizer(quantizer, dim)
        self.decoder = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, features))

    def forward(self, x):
        out = self.quantizer(self.encoder(x))
        loss = out[2].sum()  # commitment / entropy losses (one per layer for residual quantizers)
        return self.decoder(out[0]), loss


def shard_batch(step: int, rank: int, batch: int, features: int, device) -> torch.Tensor:
    """This rank's batch of clustered data (different on every rank and step)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    centres = torch.randn(16, features, generator=torch.Generator().manual_seed(0)) * 3
    x = centres[torch.randint(16, (batch, 8), generator=g)] + 0.3 * torch.randn(
        batch, 8, features, generator=g
    )
    return x.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", default="nccl" if torch.cuda.is_available() else "gloo", choices=["gloo", "nccl"]
    )
    parser.add_argument("--quantizer", default="vq", choices=["vq", "rvq", "lfq"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank and micro-batch")
    parser.add_argument(
        "--accumulate", type=int, default=2, help="micro-batches per optimizer step (no_sync)"
    )
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    extra = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(args.backend, timeout=timedelta(seconds=60), **extra)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them from rank 0)
    features, dim = 16, 8
    model = AutoEncoder(features, dim, args.quantizer).to(device)
    # broadcast_buffers=True (the default) is fine: the codebook buffers are identical on every rank anyway
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=True)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)

    ddp.train()
    for step in range(args.steps):
        for micro in range(args.accumulate):
            x = shard_batch(step * args.accumulate + micro, rank, args.batch, features, device)
            last = micro == args.accumulate - 1
            # no_sync skips the gradient all-reduce only; the quantizer still syncs its EMA state in forward
            with ddp.no_sync() if not last else torch.enable_grad():
                recon, aux = ddp(x)
                loss = (recon - x).pow(2).mean() + aux
                (loss / args.accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)

    # every rank must hold the same quantizer state: gather it and compare
    flat = torch.cat(
        [t.detach().float().reshape(-1) for t in model.quantizer.state_dict().values()] or [torch.zeros(1)]
    )
    flat = flat.to(device)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], g) for g in gathered[1:])
    assert identical, "quantizer state differs across ranks"

    # validation on rank 0 alone, in eval mode: no collective runs, nothing hangs
    if rank == 0:
        model.eval()
        with torch.no_grad():
            x = shard_batch(10**6, 0, args.batch, features, device)
            val = (model(x)[0] - x).pow(2).mean().item()
        print(
            f"ok: {world} ranks ({args.backend}, {device.type}), quantizer={args.quantizer}, "
            f"steps={args.steps}, "
            f"codebook state identical across ranks ({flat.numel()} values), validation mse {val:.4f}",
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
