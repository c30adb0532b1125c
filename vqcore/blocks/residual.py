"""Quantize dropout for residual stacks (SoundStream, arXiv 2107.03312; Encodec's structured variant).

While training, a residual quantizer keeps only its first ``L`` layers for the whole batch; the rest
give index -1 and zero loss, so that the coarse prefixes of the codes decode on their own (bitrate
scalability). Every rank must agree on ``L``: under ``sync`` rank 0 draws it and broadcasts it.
"""

from __future__ import annotations

import random

import torch

from vqcore.blocks.distributed import broadcast_


def kept_layers(
    num_quantizers: int,
    *,
    cutoff_index: int = 0,
    multiple_of: int = 1,
    rng: random.Random | None = None,
    sync: bool = False,
    device: torch.device | str = "cpu",
) -> int:
    """How many leading layers run this step: ``last + 1`` with ``last`` uniform in
    ``[cutoff_index, num_quantizers - 1]``, then ``last + 1`` rounded up to a multiple of ``multiple_of``
    (capped at ``num_quantizers``)."""
    if not 0 <= cutoff_index < num_quantizers:
        raise ValueError(
            f"quantize_dropout_cutoff_index must be in [0, {num_quantizers}), got {cutoff_index}"
        )
    if multiple_of < 1:
        raise ValueError(f"quantize_dropout_multiple_of must be >= 1, got {multiple_of}")
    if rng is None:  # torch's generator: follows torch.manual_seed, leaves Python's `random` alone
        last = cutoff_index + int(torch.randint(num_quantizers - cutoff_index, ()))
    else:
        last = rng.randrange(cutoff_index, num_quantizers)
    kept = min(num_quantizers, -(-(last + 1) // multiple_of) * multiple_of)
    if sync:
        shared = broadcast_(torch.tensor([kept], device=device), sync)
        kept = int(shared.item())
    return kept
