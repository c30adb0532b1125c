"""ResidualLFQ: a residual stack of LFQ layers with code scales 2^-q; GroupedResidualLFQ: independent
stacks on equal chunks of the features (see the class docstrings).

Differences from vector-quantize-pytorch 1.32.0, on purpose (besides LFQ's, :mod:`vqcore.plugins.lfq`):
- ResidualLFQ accepts images/video (detected, channel-first) and ``(b, n)`` masks, and indices decode
  from a coarse prefix whether or not quantize dropout is on;
- quantize dropout runs in training mode whatever the grad mode, draws from torch's generator without a
  seed, and dropped layers give index -1 and loss 0;
- ``codebooks``, ``get_codes_from_indices`` and ``return_all_codes`` give the codes as decoded (spherical
  normalisation and each layer's rotation applied); the reference's ``codebooks`` lists the raw
  ``±2^-q`` corners;
- ResidualLFQ's ``return_all_codes`` codes are in the input's layout and carry the straight-through
  gradient in training; GroupedResidualLFQ's are channel-last ``(Q, b, *positions, d)`` per group, as the
  reference;
- ``forward`` takes ``inv_temperature`` (last) like LFQ; both return NamedTuples (:class:`LFQOutput`,
  :class:`LFQOutputWithCodes`, :class:`GroupedLFQOutputWithCodes`) that unpack as the reference's tuples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from vqcore.blocks.grid import BinaryCodebook
from vqcore.blocks.layout import (
    TokenLayout,
    auto_layout,
    token_mask,
    zero_padding,
)
from vqcore.blocks.precision import float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.residual import (
    GroupedStacks,
    GroupStep,
    QuantizeDropout,
    decode_layers,
    detected_layer_tokens,
    sum_layers,
    zero_dropped,
)
from vqcore.blocks.rotation import unrotate
from vqcore.blocks.validation import check_positive_int
from vqcore.book_layout import BookLayout
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.plugins.lfq import (
    LFQ,
    LFQOutput,
    LFQOutputWithCodes,
    check_codebook_size,
    check_soft_clamp,
)
from vqcore.protocols import DROPPED_INDEX


class GroupedLFQOutputWithCodes(NamedTuple):
    """``GroupedResidualLFQ(..., return_all_codes=True)``: ``all_codes`` holds one ``(Q, b, *positions, d)``
    tensor per group (a tuple, as the reference)."""

    quantized: Tensor
    indices: Tensor
    entropy_aux_loss: Tensor
    all_codes: tuple[Tensor, ...]


class ResidualLFQ(QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n, Q) int64, aux losses (Q,); images/video too.

    Layer q is an LFQ with code scale ``2^-q`` on the residual of the layers before it (detached);
    one projection pair wraps the stack. Quantize dropout (SoundStream, arXiv 2107.03312) runs in
    training mode (whatever the grad mode); dropped layers give index -1 and loss 0 and decode to
    nothing. Extra keyword arguments go to every layer (``entropy_loss_weight``, ``diversity_gamma``,
    ``spherical``, ``orthogonal_rotation`` (one rotation per layer), ``frac_per_sample_entropy``,
    ``straight_through_activation``, ``extra_losses``, ...); ``soft_clamp_input_value`` (>= 1) clamps the
    input of layer q at ``soft_clamp_input_value 2^-q``. The layers are used through their public API
    only (``quantizer_books``, ``output_tokens``, ``straight_through``, ``codebook_module``,
    ``book_losses``, ``weighted_loss``): in training, every kept layer's losses are computed in one call,
    the layers being the books of :attr:`layer_codebooks` (each layer's code scale).
    ``return_all_codes=True`` returns :class:`LFQOutputWithCodes`.

    Token-level API (what :class:`GroupedResidualLFQ` composes): :meth:`kept_layers`,
    :meth:`quantize_tokens`, :meth:`encode_tokens`, :meth:`decode_tokens`, :meth:`layer_codes`.
    """

    layers: Sequence[LFQ]  # an nn.ModuleList (whose items torch types as plain Modules)

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_quantizers: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool | None = None,
        projection_has_bias: bool = True,
        sync_quantize_dropout: bool | None = None,
        soft_clamp_input_value: float | None = None,
        **lfq_kwargs,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_codebook_size(codebook_size)
        self.dropout = QuantizeDropout(
            num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of
        )
        for key in ("dim", "codebook_scale", "num_codebooks", "channel_first", "has_projections"):
            if key in lfq_kwargs:
                raise TypeError(f"ResidualLFQ sets {key} of its layers itself; do not pass it")
        clamp = check_soft_clamp(soft_clamp_input_value, 1.0)
        self.dim = dim
        self.codebook_dim = codebook_size.bit_length() - 1
        self.num_quantizers = num_quantizers
        self.quantize_dropout = self.dropout.enabled
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.sync_quantize_dropout = sync_quantize_dropout
        self.soft_clamp_input_value = clamp
        self.channel_first = channel_first
        self.has_projections = dim != self.codebook_dim
        self.project_in, self.project_out = projection_pair(
            dim, self.codebook_dim, enabled=self.has_projections, bias=projection_has_bias
        )
        scales = [2.0**-q for q in range(num_quantizers)]
        self.layers = cast(
            "Sequence[LFQ]",
            nn.ModuleList(
                LFQ(
                    codebook_size=codebook_size,
                    codebook_scale=scale,
                    soft_clamp_input_value=None if clamp is None else clamp * scale,
                    **lfq_kwargs,
                )
                for scale in scales
            ),
        )
        # every layer's codes as books of one codebook (spherical layers: their normalised code scale)
        self.layer_codebooks = BinaryCodebook(
            self.codebook_dim, [layer.codebook_module.scale_values[0] for layer in self.layers]
        )
        self.rotated = any(layer.orthogonal_rot is not None for layer in self.layers)

    @property
    def codebook_size(self) -> int:
        return self.layer_codebooks.size

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """Every layer's codebook size (all alike)."""
        return (self.codebook_size,) * self.num_quantizers

    @property
    def num_codebooks(self) -> int:
        return 1

    def book_layout(self) -> BookLayout:
        """The books of the indices ``(..., layers)``: one per layer (vqcore.book_layout)."""
        return BookLayout.residual_stack(self.codebook_sizes)

    @property
    def codebooks(self) -> Tensor:
        """(Q, codebook_size, codebook_dim): every layer's codes as decoded (up to 2^20 codes)."""
        return torch.stack([layer.codebook for layer in self.layers])

    # -- token level ----------------------------------------------------------------------------------
    def kept_layers(self, seed: int | None = None, device: torch.device | str = "cpu") -> int:
        """How many leading layers run in this forward (quantize dropout; all of them in eval)."""
        return self.dropout.kept_layers(self.training, seed, sync=self.sync_quantize_dropout, device=device)

    def _run(
        self, z: Tensor, kept: int, inv_temperature: float, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Codebook space z (b, n, bits) -> (summed outputs (b, n, bits), indices (b, n, Q), losses (Q,),
        per-layer outputs: Q of (b, n, bits), straight-through in training, zeros for dropped layers)."""
        b, n = z.shape[0], z.shape[1]
        residual, outputs, layer_codes, layer_indices = z, [], [], []
        inputs: list[Tensor] = []  # each kept layer's books (1, b * n, bits)
        for layer in self.layers:
            if len(inputs) == kept:
                break
            books = layer.quantizer_books(residual)  # (1, b * n, bits)
            idx, codes = layer.codebook_module.quantize(books)
            inputs.append(books)
            layer_indices.append(idx)
            layer_codes.append(codes)
            out = layer.straight_through(books, codes) if self.training and books.requires_grad else codes
            outputs.append(layer.output_tokens(out, b, n))
            residual = residual - layer.output_tokens(codes, b, n)
        losses = z.new_zeros(self.num_quantizers)
        if self.training:  # every kept layer's losses at once: layers are the books
            first = self.layers[0]
            book_valid = None if valid is None else valid.reshape(1, -1).expand(kept, -1)
            terms, extra_total = first.book_losses(
                torch.cat(inputs),
                torch.cat(layer_codes),
                torch.cat(layer_indices),
                book_valid,
                inv_temperature=inv_temperature,
                codebook=self.layer_codebooks.leading(kept),
            )
            losses = torch.cat((first.weighted_loss(terms, extra_total), losses[kept:]))
        indices = torch.cat(layer_indices).transpose(0, 1).reshape(b, n, kept)
        if kept < self.num_quantizers:
            indices = torch.cat(
                (indices, indices.new_full((b, n, self.num_quantizers - kept), DROPPED_INDEX)), -1
            )
        dropped = [torch.zeros_like(z)] * (self.num_quantizers - kept)
        return sum_layers(outputs), indices, losses, outputs + dropped

    def quantize_tokens(
        self,
        tokens: Tensor,
        valid: Tensor | None,
        kept: int,
        inv_temperature: float = 100.0,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Tokens (b, n, dim), valid (b, n) or None, ``kept`` leading layers -> (quantized (b, n, dim)
        float32, indices (b, n, Q), losses (Q,), per-layer codes: Q of (b, n, bits)); padding (not valid)
        gives zeros and index -1."""
        tokens = zero_padding(tokens, valid)
        with float32_region(tokens.device.type):
            total, indices, losses, layer_codes = self._run(
                project_into(self.project_in, tokens), kept, inv_temperature, valid
            )
            out = project_from(self.project_out, total)
            if valid is not None:
                out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
                indices = indices.masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
        return out, indices, losses, layer_codes

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (b, n, dim) -> indices (b, n, Q)."""
        b, n = tokens.shape[0], tokens.shape[1]
        with float32_region(tokens.device.type):
            residual, layer_indices = project_into(self.project_in, tokens), []
            for layer in self.layers:
                idx, codes = layer.codebook_module.quantize(layer.quantizer_books(residual))
                layer_indices.append(idx)
                residual = residual - layer.output_tokens(codes, b, n)
            return torch.cat(layer_indices).transpose(0, 1).reshape(b, n, self.num_quantizers)

    def layer_codes(self, tokens: Tensor) -> list[Tensor]:
        """Indices (b, n, Q) int64, -1 allowed -> Q codes as decoded (b, n, bits) float32 (autocast off);
        -1 gives zeros."""
        b, n = tokens.shape[0], tokens.shape[1]
        books = tokens.reshape(-1, self.num_quantizers).transpose(0, 1)  # (Q, b * n): layers are the books
        with float32_region(tokens.device.type):
            codes = self.layer_codebooks.lookup(books.clamp(min=0))
            codes = codes.reshape(self.num_quantizers, b, n, codes.shape[-1])
            if self.rotated:
                codes = torch.stack(
                    [unrotate(c, layer.orthogonal_rot) for c, layer in zip(codes, self.layers)]
                )
            return [zero_dropped(codes[q], tokens[..., q]) for q in range(self.num_quantizers)]

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Indices (b, n, Q) int64, -1 allowed -> quantized (b, n, dim) float32."""
        with float32_region(tokens.device.type):
            return decode_layers(self.layer_codes(tokens), tokens, self.project_out)

    # -- the module paths -------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        return layout.indices_from_tokens(self.encode_tokens(tokens), spatial)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
        inv_temperature: float = 100.0,
    ):
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        valid = token_mask(layout, b, n, spatial, mask, per_sample=True)
        kept = self.kept_layers(rand_quantize_dropout_fixed_seed, x.device)
        out, indices, losses, layer_codes = self.quantize_tokens(tokens, valid, kept, inv_temperature)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = layout.indices_from_tokens(indices, spatial)
        if return_all_codes:
            codes = torch.stack([layout.from_tokens(c, spatial) for c in layer_codes])
            return LFQOutputWithCodes(quantized, indices, losses, codes)
        return LFQOutput(quantized, indices, losses)

    def _layer_tokens(self, indices: Tensor) -> tuple[Tensor, tuple, TokenLayout]:
        return detected_layer_tokens(
            indices, self.codebook_sizes, dim=self.dim, channel_first=self.channel_first
        )

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q), q <= Q -> per-layer codes as decoded (Q, b, *positions, bits) before
        project_out; -1 and missing layers give zeros (channel-last for every layout)."""
        tokens, spatial, _ = self._layer_tokens(indices)
        codes = torch.stack(self.layer_codes(tokens))
        return codes.reshape(codes.shape[0], codes.shape[1], *spatial, codes.shape[-1])

    def decode(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q) with q <= Q -> quantized in the input layout; -1 adds nothing, and a
        token whose layers are all -1 decodes to zero (after project_out too)."""
        tokens, spatial, layout = self._layer_tokens(indices)
        return layout.from_tokens(self.decode_tokens(tokens), spatial)

    get_output_from_indices = decode

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts, next to the generic dim, codebook_size and
        num_codebooks (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.codebook_dim,
            "num_quantizers": self.num_quantizers,
            "channel_first": self.channel_first,
        }

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, num_quantizers={self.num_quantizers}"


class GroupedResidualLFQ(GroupedStacks[ResidualLFQ]):
    """x (b, n, dim) -> quantized (b, n, dim), indices (groups, b, n, Q), losses (groups, Q).

    The feature axis is split into ``groups`` equal chunks, each quantized by an independent
    :class:`ResidualLFQ` (``dim // groups`` features, every other keyword argument forwarded) through its
    token-level API (:class:`~vqcore.blocks.residual.GroupedStacks`). ``accept_image_fmap=True``: images
    ``(b, dim, h, w)`` (channel-first, split on axis 1), indices ``(groups, b, h, w, Q)``. Quantize dropout
    is drawn once per forward for all groups. ``return_all_codes=True`` returns
    :class:`GroupedLFQOutputWithCodes`.
    """

    def __init__(self, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs: Any):
        super().__init__(dim, groups, lambda group_dim: ResidualLFQ(group_dim, **kwargs))
        self.accept_image_fmap = bool(accept_image_fmap)
        self.layout = TokenLayout.from_flags(dim, accept_image_fmap=self.accept_image_fmap)

    @property
    def split_dim(self) -> int:
        """The input's feature axis (the reference's name)."""
        return 1 if self.accept_image_fmap else -1

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
        inv_temperature: float = 100.0,
    ):
        def run(rvq: ResidualLFQ, chunk: Tensor, valid: Tensor | None, kept: int) -> GroupStep:
            out, indices, losses, layer_codes = rvq.quantize_tokens(chunk, valid, kept, inv_temperature)
            return GroupStep(out, indices, losses, torch.stack(layer_codes) if return_all_codes else None)

        step = self.quantize_groups(
            x,
            run,
            mask=mask,
            per_sample_mask=True,
            seed=rand_quantize_dropout_fixed_seed,
            want_codes=return_all_codes,
        )
        assert step.losses is not None  # every ResidualLFQ gives its losses
        if return_all_codes:
            return GroupedLFQOutputWithCodes(step.quantized, step.indices, step.losses, step.codes)
        return LFQOutput(step.quantized, step.indices, step.losses)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.rvqs[0].codebook_dim,
            "num_quantizers": self.num_quantizers,
            "groups": self.groups,
            "layout": self.layout.kind,
        }

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, layout={self.layout.kind}"


@hookimpl
def register_quantizers(register):
    register(
        "residual_lfq",
        ResidualLFQ,
        aliases=("ResidualLFQ", "rlfq"),
        summary="residual stack of LFQ layers with code scales 2^-q",
    )
    register(
        "grouped_residual_lfq",
        GroupedResidualLFQ,
        aliases=("GroupedResidualLFQ", "grouped_rlfq"),
        summary="grouped residual LFQ: the feature dim split into independent residual LFQ stacks",
    )
