"""Residual stacks: quantize dropout, coarse indices and the residual decode, for every residual method.

Quantize dropout (SoundStream, arXiv 2107.03312; Encodec's structured ``multiple_of`` variant): in a
training-mode forward, a residual quantizer keeps only its first ``L`` layers for the whole batch; the
rest give index -1 and zero loss, so that the coarse prefixes of the codes decode on their own (bitrate
scalability). Like every training-state rule in vqcore (k-means, EMA, expiry), it depends on the
module's training mode only, not on grad mode. Every rank must agree on ``L``: under ``sync`` rank 0
draws it and broadcasts it.

Indices decode from a coarse prefix: ``(..., q)`` with ``q <= Q`` is padded with -1 (dropped) layers,
and -1 contributes nothing to the sum; a token whose every layer is -1 decodes to zero, also after
``project_out`` (whose bias would otherwise leak through).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vqcore.blocks.distributed import broadcast_, should_sync
from vqcore.blocks.layout import TokenLayout, auto_index_layout
from vqcore.blocks.projection import project_from
from vqcore.blocks.validation import check_indices, check_positive_int, check_tensor
from vqcore.protocols import DROPPED_INDEX


class QuantizeDropout:
    """The quantize-dropout options of a residual stack of ``num_quantizers`` layers, checked once.

    ``kept_layers(training, seed=None, sync=False, device=...)`` is how many leading layers run in this
    forward: all of them unless ``training`` and dropout is on; otherwise ``last + 1`` with ``last`` uniform
    in ``[cutoff_index, num_quantizers - 1]`` (torch's generator, or ``random.Random(seed)``), rounded up to
    a multiple of ``multiple_of`` and capped at ``num_quantizers``.
    """

    def __init__(
        self, num_quantizers: int, enabled: bool = False, cutoff_index: int = 0, multiple_of: int = 1
    ):
        check_positive_int(num_quantizers, "num_quantizers")
        check_positive_int(cutoff_index, "quantize_dropout_cutoff_index", minimum=0)
        if cutoff_index >= num_quantizers:
            raise ValueError(
                f"quantize_dropout_cutoff_index must be in [0, {num_quantizers}) "
                f"(num_quantizers={num_quantizers}), got {cutoff_index}"
            )
        check_positive_int(multiple_of, "quantize_dropout_multiple_of")
        self.num_quantizers, self.enabled = num_quantizers, bool(enabled) and num_quantizers > 1
        self.cutoff_index, self.multiple_of = cutoff_index, multiple_of

    def kept_layers(
        self,
        training: bool,
        seed: int | None = None,
        sync: bool | None = False,
        device: torch.device | str = "cpu",
    ) -> int:
        """``sync``: the stack's sync option (True, False, or None: whenever torch.distributed runs with
        more than one rank); when it applies, rank 0's draw is broadcast (only when a draw happens)."""
        if not (training and self.enabled):
            return self.num_quantizers
        q = self.num_quantizers
        if seed is None:  # torch's generator: follows torch.manual_seed, leaves Python's `random` alone
            last = self.cutoff_index + int(torch.randint(q - self.cutoff_index, ()))
        else:
            last = random.Random(seed).randrange(self.cutoff_index, q)
        kept = min(q, -(-(last + 1) // self.multiple_of) * self.multiple_of)
        if should_sync(sync):
            kept = int(broadcast_(torch.tensor([kept], device=device), True).item())
        return kept

    def __repr__(self) -> str:
        return (
            f"QuantizeDropout(num_quantizers={self.num_quantizers}, enabled={self.enabled}, "
            f"cutoff_index={self.cutoff_index}, multiple_of={self.multiple_of})"
        )


def pad_layers(tokens: Tensor, sizes: Sequence[int], name: str = "indices") -> Tensor:
    """Checked indices ``(..., q)`` with ``1 <= q <= Q = len(sizes)`` -> int64 ``(..., Q)``.

    Entry ``i`` must be in ``[0, sizes[i])`` or -1; the missing (finer) layers are -1 (dropped).
    """
    given, q = tokens.shape[-1], len(sizes)
    if given > q or given < 1:
        raise ValueError(
            f"{name} must end with a quantizer axis of 1..{q} entries (num_quantizers={q}), "
            f"got shape {tuple(tokens.shape)}"
        )
    if len(set(sizes)) == 1:
        check_indices(tokens, sizes[0], name)
    else:
        for i in range(given):
            check_indices(tokens[..., i], sizes[i], f"{name}[..., {i}]")
    tokens = tokens.long()
    if given < q:
        pad = tokens.new_full((*tokens.shape[:-1], q - given), DROPPED_INDEX)
        tokens = torch.cat((tokens, pad), -1)
    return tokens


def detected_layer_tokens(
    indices: Tensor, sizes: Sequence[int], *, dim: int, channel_first: bool | None
) -> tuple[Tensor, tuple, TokenLayout]:
    """Indices ``(b, *positions, q)`` of a residual stack that detects its input's layout
    (:func:`~vqcore.blocks.layout.auto_layout`) -> ``(tokens (b, n, Q) int64 padded by`` :func:`pad_layers`
    ``, spatial, layout)``."""
    check_tensor(indices, "indices")
    layout = auto_index_layout(indices.ndim, 1, dim, channel_first)
    tokens, spatial = layout.indices_to_tokens(indices, 1)
    return pad_layers(tokens, sizes), spatial, layout


def zero_dropped(code: Tensor, indices: Tensor) -> Tensor:
    """One layer's codes ``(..., d)`` with zeros where its indices ``(...)`` are -1."""
    return code.masked_fill((indices < 0).unsqueeze(-1), 0.0)


def sum_layers(codes: Sequence[Tensor]) -> Tensor:
    """The layers' codes added in layer order (every residual path adds them in this order, so that
    training, eval and decode agree bit for bit)."""
    total = codes[0]
    for code in codes[1:]:
        total = total + code
    return total


def decode_layers(codes: Sequence[Tensor], indices: Tensor, project_out: nn.Module) -> Tensor:
    """Per-layer codes (zero where dropped) -> ``project_out(Σ codes)`` ``(..., dim)``; a token whose
    indices ``(..., Q)`` are all -1 decodes to zero."""
    out = project_from(project_out, sum_layers(codes))
    return out.masked_fill((indices < 0).all(-1, keepdim=True), 0.0)
