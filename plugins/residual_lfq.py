"""ResidualLFQ: a residual stack of LFQ layers with code scales 2^-q (see the class docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from vqcore.blocks.estimators import straight_through
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
    QuantizeDropout,
    decode_layers,
    detected_layer_tokens,
    sum_layers,
    zero_dropped,
)
from vqcore.blocks.validation import check_positive_int
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.plugins.lfq import (
    LFQ,
    LFQOutput,
    LFQOutputWithCodes,
    check_codebook_size,
)
from vqcore.protocols import DROPPED_INDEX


class ResidualLFQ(QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n, Q) int64, aux losses (Q,); images/video too.

    Layer q is an LFQ with code scale ``2^-q`` on the residual of the layers before it (detached);
    one projection pair wraps the stack. Quantize dropout (SoundStream, arXiv 2107.03312) runs in
    training mode (whatever the grad mode); dropped layers give index -1 and loss 0 and decode to
    nothing. Extra keyword arguments go to every layer (``entropy_loss_weight``, ``diversity_gamma``,
    ``extra_losses``, ...). The layers are used through their public API only (``to_books``,
    ``from_books``, ``codebook_module``, ``book_losses``, ``weighted_loss``): in training, every kept
    layer's losses are computed in one call, the layers being the books of :attr:`layer_codebooks`
    (scales ``2^-q``).
    ``return_all_codes=True`` returns :class:`LFQOutputWithCodes`.
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
        self.dim = dim
        self.codebook_dim = codebook_size.bit_length() - 1
        self.num_quantizers = num_quantizers
        self.quantize_dropout = self.dropout.enabled
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.sync_quantize_dropout = sync_quantize_dropout
        self.channel_first = channel_first
        self.has_projections = dim != self.codebook_dim
        self.project_in, self.project_out = projection_pair(
            dim, self.codebook_dim, enabled=self.has_projections, bias=projection_has_bias
        )
        scales = [2.0**-q for q in range(num_quantizers)]
        self.layers = cast(
            "Sequence[LFQ]",
            nn.ModuleList(
                LFQ(codebook_size=codebook_size, codebook_scale=scale, **lfq_kwargs) for scale in scales
            ),
        )
        self.layer_codebooks = BinaryCodebook(self.codebook_dim, scales)

    @property
    def codebook_size(self) -> int:
        return self.layer_codebooks.size

    @property
    def num_codebooks(self) -> int:
        return 1

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
            books = layer.to_books(residual)  # (1, b * n, bits)
            idx, codes = layer.codebook_module.quantize(books)
            inputs.append(books)
            layer_indices.append(idx)
            layer_codes.append(codes)
            out = straight_through(books, codes) if self.training and books.requires_grad else codes
            outputs.append(layer.from_books(out, b, n))
            residual = residual - layer.from_books(codes, b, n)
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

    def encode(self, x: Tensor) -> Tensor:
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        with float32_region(x.device.type):
            residual, layer_indices = project_into(self.project_in, tokens), []
            for layer in self.layers:
                idx, codes = layer.codebook_module.quantize(layer.to_books(residual))
                layer_indices.append(idx)
                residual = residual - layer.from_books(codes, b, n)
            indices = torch.cat(layer_indices).transpose(0, 1).reshape(b, n, self.num_quantizers)
        return layout.indices_from_tokens(indices, spatial)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        inv_temperature: float = 100.0,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        valid = token_mask(layout, b, n, spatial, mask, per_sample=True)
        tokens = zero_padding(tokens, valid)
        kept = self.dropout.kept_layers(
            self.training,
            rand_quantize_dropout_fixed_seed,
            sync=self.sync_quantize_dropout,
            device=x.device,
        )
        with float32_region(x.device.type):
            total, indices, losses, layer_codes = self._run(
                project_into(self.project_in, tokens), kept, inv_temperature, valid
            )
            out = project_from(self.project_out, total)
            if valid is not None:
                out = out.masked_fill(~valid.unsqueeze(-1), 0.0)
                indices = indices.masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = layout.indices_from_tokens(indices, spatial)
        if return_all_codes:
            codes = torch.stack([layout.from_tokens(c, spatial) for c in layer_codes])
            return LFQOutputWithCodes(quantized, indices, losses, codes)
        return LFQOutput(quantized, indices, losses)

    def _layer_tokens(self, indices: Tensor) -> tuple[Tensor, tuple, TokenLayout]:
        return detected_layer_tokens(
            indices,
            [self.codebook_size] * self.num_quantizers,
            dim=self.dim,
            channel_first=self.channel_first,
        )

    def _layer_codes(self, tokens: Tensor) -> list[Tensor]:
        """Tokens (b, n, Q), -1 allowed -> Q scaled codes (b, n, bits); -1 gives zeros."""
        b, n = tokens.shape[0], tokens.shape[1]
        books = tokens.reshape(-1, self.num_quantizers).transpose(0, 1)  # (Q, b * n): layers are the books
        codes = self.layer_codebooks.lookup(books.clamp(min=0)).reshape(self.num_quantizers, b, n, -1)
        return [zero_dropped(codes[q], tokens[..., q]) for q in range(self.num_quantizers)]

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q), q <= Q -> per-layer scaled codes (Q, b, *positions, bits) before
        project_out; -1 and missing layers give zeros (channel-last for every layout)."""
        tokens, spatial, _ = self._layer_tokens(indices)
        with float32_region(tokens.device.type):
            codes = torch.stack(self._layer_codes(tokens))
        return codes.reshape(codes.shape[0], codes.shape[1], *spatial, codes.shape[-1])

    def decode(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q) with q <= Q -> quantized in the input layout; -1 adds nothing, and a
        token whose layers are all -1 decodes to zero (after project_out too)."""
        tokens, spatial, layout = self._layer_tokens(indices)
        with float32_region(tokens.device.type):
            out = decode_layers(self._layer_codes(tokens), tokens, self.project_out)
        return layout.from_tokens(out, spatial)

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


@hookimpl
def register_quantizers(register):
    register(
        "residual_lfq",
        ResidualLFQ,
        aliases=("ResidualLFQ", "rlfq"),
        summary="residual stack of LFQ layers with code scales 2^-q",
    )
