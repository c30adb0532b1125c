"""ResidualFSQ: a residual stack of symmetric FSQ grids (see the class docstring)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vqcore.blocks.grid import check_levels
from vqcore.blocks.layout import TokenLayout, auto_layout
from vqcore.blocks.precision import Float32State, float32_region
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
from vqcore.plugins.fsq import FSQGrid, FSQOutput, FSQOutputWithCodes
from vqcore.protocols import DROPPED_INDEX, INDEX_DTYPE


class ResidualFSQ(Float32State, QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n, Q) int64; images/video (detected) too.

    Layer q quantizes ``residual / scale_q`` with the symmetric FSQ grid (hard clamp) and adds back
    ``code * scale_q``, ``scale_q = L_i^(-q)`` per dimension (as the reference); the input is first
    soft-clamped with ``tanh(x / c) c``, ``c = 1 + 1 / (L - 1)``. Quantize dropout (SoundStream,
    arXiv 2107.03312) keeps the first layers only, in training mode (whatever the grad mode); dropped
    layers give index -1, which decodes to nothing, and indices with fewer than Q layers (a coarse
    prefix) decode too. ``return_all_codes=True`` returns :class:`FSQOutputWithCodes`.
    """

    # non-persistent buffers
    scales: Tensor  # (Q, D): L_i^(-q)
    soft_clamp: Tensor  # (D,): 1 + 1 / (L - 1)

    def __init__(
        self,
        levels,
        num_quantizers: int,
        dim: int | None = None,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool | None = None,
        projection_has_bias: bool = True,
        sync_quantize_dropout: bool | None = None,
    ):
        super().__init__()
        levels = check_levels(levels, allow_two=True)
        self.dropout = QuantizeDropout(
            num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of
        )
        self.levels = levels
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else check_positive_int(dim, "dim")
        self.num_quantizers = num_quantizers
        self.quantize_dropout = self.dropout.enabled
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.sync_quantize_dropout = sync_quantize_dropout
        self.channel_first = channel_first
        self.grid = FSQGrid(levels, preserve_symmetry=True, hard_clamp=True)
        lv = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("scales", torch.stack([lv**-q for q in range(num_quantizers)]), persistent=False)
        self.register_buffer("soft_clamp", 1 + 1 / (lv - 1), persistent=False)
        self.has_projections = self.dim != self.codebook_dim
        self.project_in, self.project_out = projection_pair(
            self.dim, self.codebook_dim, enabled=self.has_projections, bias=projection_has_bias
        )

    @property
    def codebook_size(self) -> int:
        return self.grid.size

    @property
    def num_codebooks(self) -> int:
        return 1

    @property
    def codebooks(self) -> Tensor:
        """(Q, codebook_size, len(levels)): every layer's codes, unscaled (all layers share the grid)."""
        return self.grid.all_codes().unsqueeze(0).expand(self.num_quantizers, -1, -1)

    def _run(self, x: Tensor, kept: int) -> tuple[Tensor, Tensor, list[Tensor], TokenLayout, tuple]:
        """x -> (summed scaled codes (b, n, D) float32, indices (b, n, Q), per-layer codes (Q of
        (b, n, D), zeros for dropped layers), layout, spatial)."""
        layout = auto_layout(x.ndim, self.dim, self.channel_first)
        tokens, spatial = layout.to_tokens(x)
        with float32_region(x.device.type):
            z = project_into(self.project_in, tokens)
            z = (z / self.soft_clamp).tanh() * self.soft_clamp
            residual, layer_codes, indices = z, [], []
            for q in range(kept):
                scale = self.scales[q]
                codes, digits = self.grid.quantize(residual / scale)
                scaled = codes * scale
                residual = residual - scaled.detach()
                indices.append(self.grid.digits_to_indices(digits))
                layer_codes.append(scaled)
            total = sum_layers(layer_codes)
            for _ in range(kept, self.num_quantizers):
                indices.append(torch.full(z.shape[:-1], DROPPED_INDEX, dtype=INDEX_DTYPE, device=z.device))
                layer_codes.append(torch.zeros_like(z))
        return total, torch.stack(indices, -1), layer_codes, layout, spatial

    def encode(self, x: Tensor) -> Tensor:
        _, indices, _, layout, spatial = self._run(x, self.num_quantizers)
        return layout.indices_from_tokens(indices, spatial)

    def forward(
        self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None
    ):
        kept = self.dropout.kept_layers(
            self.training,
            rand_quantize_dropout_fixed_seed,
            sync=self.sync_quantize_dropout,
            device=x.device,
        )
        total, indices, layer_codes, layout, spatial = self._run(x, kept)
        with float32_region(x.device.type):
            out = project_from(self.project_out, total)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = layout.indices_from_tokens(indices, spatial)
        if return_all_codes:
            codes = torch.stack([layout.from_tokens(c, spatial) for c in layer_codes])
            return FSQOutputWithCodes(quantized, indices, codes)
        return FSQOutput(quantized, indices)

    def _layer_tokens(self, indices: Tensor) -> tuple[Tensor, tuple, TokenLayout]:
        return detected_layer_tokens(
            indices,
            [self.codebook_size] * self.num_quantizers,
            dim=self.dim,
            channel_first=self.channel_first,
        )

    def _layer_codes(self, tokens: Tensor) -> list[Tensor]:
        """Tokens (b, n, Q), -1 allowed -> Q scaled codes (b, n, len(levels)); -1 gives zeros."""
        digits = self.grid.indices_to_digits(tokens.clamp(min=0))
        return [
            zero_dropped(self.grid.digits_to_codes(digits[..., q, :]) * self.scales[q], tokens[..., q])
            for q in range(self.num_quantizers)
        ]

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q), q <= Q -> scaled per-layer codes (Q, b, *positions, len(levels))
        before project_out; -1 and missing layers give zeros (channel-last for every layout)."""
        tokens, spatial, _ = self._layer_tokens(indices)
        with float32_region(tokens.device.type):
            codes = torch.stack(self._layer_codes(tokens))
        return codes.reshape(codes.shape[0], codes.shape[1], *spatial, codes.shape[-1])

    def decode(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q) with q <= Q (a coarse prefix decodes too) -> quantized;
        -1 adds nothing, and a token whose layers are all -1 decodes to zero (after project_out too).
        """
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
            "levels": list(self.levels),
            "scales": self.scales.tolist(),
            "channel_first": self.channel_first,
        }

    def extra_repr(self) -> str:
        return f"levels={self.levels}, num_quantizers={self.num_quantizers}, dim={self.dim}"


@hookimpl
def register_quantizers(register):
    register(
        "residual_fsq",
        ResidualFSQ,
        aliases=("ResidualFSQ", "rfsq"),
        summary="residual stack of symmetric FSQ layers with per-layer scales L^-q",
    )
