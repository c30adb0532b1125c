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

Grouped residual quantization (HiFi-Codec, arXiv 2305.02765): :class:`GroupedStacks` splits the feature
axis into equal chunks, each quantized by an independent residual stack through the stack's public token
API (:class:`ResidualStack`), with one quantize-dropout draw for all groups.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar, cast

import torch
from torch import Tensor, nn

from vqcore.blocks.distributed import broadcast_, should_sync
from vqcore.blocks.layout import TokenLayout, auto_index_layout, token_mask
from vqcore.blocks.projection import project_from
from vqcore.blocks.validation import check_indices, check_positive_int, check_tensor
from vqcore.book_layout import BookLayout
from vqcore.errors import ConfigurationError
from vqcore.module import QuantizerModule
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
            raise ConfigurationError(
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
    indices: Tensor, sizes: Sequence[int], *, dim: int, channel_first: bool | None, name: str = "indices"
) -> tuple[Tensor, tuple, TokenLayout]:
    """Indices ``(b, *positions, q)`` of a residual stack that detects its input's layout
    (:func:`~vqcore.blocks.layout.auto_layout`) -> ``(tokens (b, n, Q) int64 padded by`` :func:`pad_layers`
    ``, spatial, layout)``; errors name the indices ``name``."""
    check_tensor(indices, name)
    layout = auto_index_layout(indices.ndim, 1, dim, channel_first, name)
    tokens, spatial = layout.indices_to_tokens(indices, 1, name)
    return pad_layers(tokens, sizes, name), spatial, layout


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


# -- grouped stacks ----------------------------------------------------------------------------------


class ResidualStack(Protocol):
    """The public token API of a residual stack that :class:`GroupedStacks` composes (ResidualVQ,
    ResidualLFQ, ResidualFSQ): tokens ``(b, n, d)`` and token indices ``(b, n, Q)`` int64, -1 allowed."""

    @property
    def codebook_size(self) -> int: ...

    @property
    def codebook_sizes(self) -> Sequence[int]:
        """Every layer's codebook size (what its indices must be below)."""
        ...

    @property
    def num_quantizers(self) -> int: ...

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]: ...

    def kept_layers(self, seed: int | None = None, device: torch.device | str = "cpu", /) -> int: ...

    def encode_tokens(self, tokens: Tensor, /) -> Tensor: ...

    def decode_tokens(self, tokens: Tensor, /) -> Tensor: ...

    def layer_codes(self, tokens: Tensor, /) -> list[Tensor]: ...

    def book_layout(self) -> BookLayout: ...


Stack = TypeVar("Stack", bound=ResidualStack)


class GroupStep(NamedTuple):
    """One group's stack on its chunk of tokens in a forward: quantized tokens ``(b, n, d / groups)``,
    indices ``(b, n, Q)``, losses ``(Q,)`` (None for a stack without losses), codes ``(Q, b, n, cd)``
    (None unless asked for)."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor | None
    codes: Tensor | None


class GroupedStep(NamedTuple):
    """A grouped forward: quantized in the input's layout and dtype, indices ``(groups, *one group's
    indices)``, losses ``(groups, Q)`` or None, codes: one ``(Q, b, *positions, cd)`` per group when asked
    for (else empty)."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor | None
    codes: tuple[Tensor, ...]


class GroupedStacks(QuantizerModule, Generic[Stack]):
    """``groups`` independent residual stacks ``rvqs`` (the reference's name), each on an equal chunk of
    the feature axis, used through their public token API (:class:`ResidualStack`).

    The input layout is ``layout`` (fixed by the subclass's flags); a subclass whose stacks detect their
    layout from the input's rank overrides the three layout hooks :meth:`input_layout`,
    :meth:`group_indices` and :meth:`group_index_tokens`. The forward (:meth:`quantize_groups`) draws
    quantize dropout once (the first stack's draw) and gives every group the same kept layers.
    """

    rvqs: Sequence[Stack]  # an nn.ModuleList (whose items torch types as plain Modules)
    layout: TokenLayout

    def __init__(self, dim: int, groups: int, build_stack: Callable[[int], Stack]):
        """``build_stack(group_dim)`` builds one group's stack of ``dim // groups`` features."""
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(groups, "groups")
        if dim % groups:
            raise ConfigurationError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.groups = dim, groups
        # the stacks are Modules (what the protocol cannot say)
        stacks = [cast(nn.Module, build_stack(dim // groups)) for _ in range(groups)]
        self.rvqs = cast("Sequence[Stack]", nn.ModuleList(stacks))

    # -- properties --------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.rvqs[0].codebook_size

    @property
    def num_quantizers(self) -> int:
        return self.rvqs[0].num_quantizers

    @property
    def num_codebooks(self) -> int:
        return self.groups * self.num_quantizers

    def book_layout(self) -> BookLayout:
        """The books of the indices ``(groups, ..., layers)``: one per group and layer
        (vqcore.book_layout)."""
        return self.rvqs[0].book_layout().grouped(self.groups)

    @property
    def codebooks(self) -> Tensor | tuple[Tensor | tuple[Tensor, ...], ...]:
        """(groups, *one stack's codebooks), or a tuple per group when a stack's are a tuple (layer sizes
        that differ)."""
        books = tuple(stack.codebooks for stack in self.rvqs)
        stacked = [book for book in books if isinstance(book, Tensor)]  # every group alike: all or none
        return torch.stack(stacked) if len(stacked) == len(books) else books

    # -- layout hooks --------------------------------------------------------------------------------
    def input_layout(self, x: Tensor) -> TokenLayout:
        """The layout of the input ``x`` (of all ``dim`` features)."""
        return self.layout

    def group_indices(self, indices: Tensor, layout: TokenLayout, spatial: tuple) -> Tensor:
        """One group's token indices ``(b, n, Q)`` -> its indices as the module returns them."""
        return layout.indices_from_tokens(indices, spatial)

    def group_index_tokens(self, group: int, indices: Tensor) -> tuple[Tensor, tuple, TokenLayout]:
        """Group ``group``'s indices as the module returns them, ``q <= Q`` layers -> (checked tokens
        ``(b, n, Q)`` int64 padded with -1, spatial, layout)."""
        name = f"indices[{group}]"
        tokens, spatial = self.layout.indices_to_tokens(indices, 1, name)
        return pad_layers(tokens, self.rvqs[group].codebook_sizes, name), spatial, self.layout

    # -- token paths ---------------------------------------------------------------------------------
    def _chunks(self, tokens: Tensor) -> tuple[Tensor, ...]:
        return tokens.chunk(self.groups, dim=-1)

    def index_tokens(self, indices: Tensor) -> tuple[list[Tensor], tuple, TokenLayout]:
        """Indices ``(groups, *one group's indices)`` -> (every group's checked tokens ``(b, n, Q)``,
        spatial, layout)."""
        check_tensor(indices, "indices")
        if indices.ndim < 1 or indices.shape[0] != self.groups:
            raise ValueError(
                f"indices must have the groups axis first with {self.groups} entries "
                f"(groups, then one group's indices), got shape {tuple(indices.shape)}"
            )
        per_group = [self.group_index_tokens(g, indices[g]) for g in range(self.groups)]
        _, spatial, layout = per_group[0]
        return [tokens for tokens, _, _ in per_group], spatial, layout

    # -- the module's paths --------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices (groups, *one group's indices) int64."""
        layout = self.input_layout(x)
        tokens, spatial = layout.to_tokens(x)
        return torch.stack(
            [
                self.group_indices(stack.encode_tokens(chunk), layout, spatial)
                for stack, chunk in zip(self.rvqs, self._chunks(tokens))
            ]
        )

    def decode(self, indices: Tensor) -> Tensor:
        """indices (groups, *one group's indices) with q <= Q layers (a coarse prefix) -> quantized in the
        input's layout; -1 adds nothing."""
        tokens, spatial, layout = self.index_tokens(indices)
        out = torch.cat([stack.decode_tokens(t) for stack, t in zip(self.rvqs, tokens)], -1)
        return layout.from_tokens(out, spatial)

    get_output_from_indices = decode

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (groups, *one group's indices) -> every layer's codes before project_out
        (groups, Q, b, *positions, cd) (channel-last for every layout); -1 and missing layers give zeros."""
        tokens, spatial, _ = self.index_tokens(indices)
        codes = [torch.stack(stack.layer_codes(t)) for stack, t in zip(self.rvqs, tokens)]
        return torch.stack([c.reshape(c.shape[0], c.shape[1], *spatial, c.shape[-1]) for c in codes])

    def quantize_groups(
        self,
        x: Tensor,
        run: Callable[[Stack, Tensor, Tensor | None, int], GroupStep],
        *,
        mask: Tensor | None = None,
        per_sample_mask: bool = False,
        seed: int | None = None,
        want_codes: bool = False,
    ) -> GroupedStep:
        """The forward: ``run(stack, chunk, valid, kept)`` quantizes one group's chunk of tokens
        ``(b, n, d / groups)`` (``valid`` (b, n) or None: the :func:`~vqcore.blocks.layout.token_mask` of
        ``mask``) with the ``kept`` leading layers of quantize dropout, drawn once for every group
        (``seed``: ``rand_quantize_dropout_fixed_seed``)."""
        layout = self.input_layout(x)
        tokens, spatial = layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        valid = token_mask(layout, b, n, spatial, mask, per_sample=per_sample_mask)
        kept = self.rvqs[0].kept_layers(seed, x.device)  # one draw for every group
        outs, indices, losses, codes = [], [], [], []
        for stack, chunk in zip(self.rvqs, self._chunks(tokens)):
            step = run(stack, chunk, valid, kept)
            outs.append(step.quantized)
            indices.append(self.group_indices(step.indices, layout, spatial))
            losses.append(step.losses)
            if want_codes:
                assert step.codes is not None  # asked for
                codes.append(step.codes.reshape(step.codes.shape[0], b, *spatial, step.codes.shape[-1]))
        quantized = layout.from_tokens(torch.cat(outs, -1).to(x.dtype), spatial)
        stacked = [loss for loss in losses if loss is not None]  # every stack alike: all or none
        return GroupedStep(
            quantized, torch.stack(indices), torch.stack(stacked) if stacked else None, tuple(codes)
        )
