"""Training memory of the scalar family, deterministic: the bytes each training step keeps for backward.

The peak-RSS rows of the other scripts cannot resolve differences of a few MiB (the allocator's arenas move
the high-water mark by that much from run to run). What a training step holds until its backward is what
autograd saves: this script records every tensor saved for backward during one training forward (unique
storages, through ``torch.autograd.graph.saved_tensors_hooks``) for vqcore and vector-quantize-pytorch
1.32.0 built with the same arguments and seed, and prints both in KiB.

    .venv/bin/python benchmarks/bench_saved.py
"""

from __future__ import annotations

import torch
import vector_quantize_pytorch as vqp
from torch.autograd.graph import saved_tensors_hooks

import vqcore

# name -> (class, kwargs, input shape): the training cases of bench_fsq.py, bench_scalar_new.py,
# bench_latent.py and bench_lfq.py
CASES = {
    "fsq": ("FSQ", dict(levels=[8, 5, 5, 5]), (8, 1024, 4)),
    "fsq_rotation": ("FSQ", dict(levels=[5, 5, 5, 5], orthogonal_rotation=True), (8, 1024, 4)),
    "rfsq": ("ResidualFSQ", dict(levels=[8, 5, 5, 3], num_quantizers=8), (8, 1024, 4)),
    "rfsq_dim256": ("ResidualFSQ", dict(levels=[8, 5, 5, 3], num_quantizers=8, dim=256), (4, 1024, 256)),
    "grfsq": (
        "GroupedResidualFSQ",
        dict(levels=[8, 5, 5, 3], num_quantizers=8, dim=8, groups=2),
        (8, 1024, 8),
    ),
    "fsp_train": ("FSP", dict(levels=[8, 5, 5, 5], dim=256), (4, 1024, 256)),
    "latent_train": ("LatentQuantize", dict(levels=[5, 5, 8], dim=16), (4, 16, 32, 32)),
    "lfq_spherical": ("LFQ", dict(codebook_size=1024, dim=16, spherical=True), (4, 16, 32, 32)),
    "lfq_soft_clamp": ("LFQ", dict(codebook_size=1024, dim=16, soft_clamp_input_value=2.0), (4, 16, 32, 32)),
    "rlfq": ("ResidualLFQ", dict(dim=256, codebook_size=256, num_quantizers=8), (4, 1024, 256)),
}


def saved_kib(module: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """KiB of the unique storages autograd saves for backward in one training forward."""
    module.train()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(*shape, requires_grad=True)
    with saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values()) / 2**10


def main() -> None:
    print("| case | vqcore KiB | reference KiB | vqcore / reference |")
    print("|---|---:|---:|---:|")
    for case, (cls, kwargs, shape) in CASES.items():
        torch.manual_seed(0)
        ours = saved_kib(getattr(vqcore, cls)(**kwargs), shape)
        torch.manual_seed(0)
        ref = saved_kib(getattr(vqp, cls)(**kwargs), shape)
        print(f"| {case} | {ours:.0f} | {ref:.0f} | {ours / ref:.2f} |")


if __name__ == "__main__":
    main()
