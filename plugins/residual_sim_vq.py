"""ResidualSimVQ: x (b, n, d) -> quantized (b, n, d), indices (b, n, Q), losses (Q,).

Residual quantization (SoundStream, arXiv 2107.03312) with a :class:`~vqcore.plugins.sim_vq.SimVQ` per
layer: layer ``q`` quantizes the residual ``r_q`` and ``r_{q+1} = r_q - sg(q_q)``; the output is the sum
of the layers' outputs. Every keyword argument the stack does not take itself goes to every layer
(``codebook_transform``, ``frozen_codebook_dim``, the loss weights, ...; one ``codebook_transform`` module
is shared by every layer, as in the reference). Each layer's implicit codebook is computed once per
forward. Quantize dropout (Encodec's structured ``multiple_of`` variant included) keeps the first
``L`` layers of a training-mode forward; the rest give index -1, zero loss and a zero code, and coarse
indices decode on their own.

Layouts as SimVQ: ``(b, *positions, dim)``, or ``(b, dim, *positions)`` with ``channel_first``; indices
``(b, *positions, Q)`` int64 in both; ``all_codes`` and ``get_codes_from_indices`` give
``(Q, b, *positions, dim)``, or ``(Q, b, dim, *positions)`` channel-first.

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- the layers' search, lookups, losses and estimators are SimVQ's (see its differences); with the
  straight-through estimator (``rotation_trick=False``) the stack's output is ``Σ codes + kept · (x - sg x)``,
  the same values and gradient without one estimator graph per layer;
- the quantize-dropout draw follows the module's training mode only (not grad mode), as every vqcore
  residual stack; under torch.distributed rank 0's draw is broadcast;
- indices with fewer than Q trailing entries decode with the missing layers as dropped, whether or not
  quantize dropout is on (the reference asserts that it is);
- ``codebook_dim`` is ``dim`` (the reference's property raises AttributeError); the eval losses are fresh
  zeros; ``quantize_dropout_cutoff_index`` must be below ``num_quantizers``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from vqcore.blocks.conversion import ReferenceModule
from vqcore.blocks.distance import is_tie
from vqcore.blocks.precision import float32_region
from vqcore.blocks.residual import QuantizeDropout, pad_layers, sum_layers
from vqcore.blocks.validation import check_positive_int
from vqcore.book_layout import BookLayout
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.plugins.sim_vq import FeatureLayout, SimVQ, reference_layer_kwargs, same_keys
from vqcore.protocols import DROPPED_INDEX


class ResidualSimVQOutput(NamedTuple):
    """indices (b, *positions, Q) int64, -1 for dropped layers; losses (Q,), zero for dropped layers."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor


class ResidualSimVQOutputWithCodes(NamedTuple):
    """``return_all_codes=True``: ``all_codes`` (Q, b, *positions, dim), channel-first
    (Q, b, dim, *positions); zeros for dropped layers."""

    quantized: Tensor
    indices: Tensor
    losses: Tensor
    all_codes: Tensor


class ResidualSimVQ(QuantizerModule):
    """x -> quantized, indices (b, *positions, Q) int64, losses (Q,) — see the module docstring."""

    layers: Sequence[SimVQ]  # an nn.ModuleList (whose items torch types as plain Modules)

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool = False,
        rotation_trick: bool = True,
        **sim_vq_kwargs: Any,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(num_quantizers, "num_quantizers")
        if heads != 1:
            raise ConfigurationError(
                f"ResidualSimVQ has one head per layer: heads must be 1, got heads={heads} "
                "(residual quantization is not compatible with multi-headed codes)"
            )
        self.dropout = QuantizeDropout(
            num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of
        )
        self.dim, self.num_quantizers = dim, num_quantizers
        self.quantize_dropout = self.dropout.enabled
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.channel_first = bool(channel_first)
        self.rotation_trick = bool(rotation_trick)
        self.layout = FeatureLayout(dim, channel_first)
        self.layers = cast(
            "Sequence[SimVQ]",
            nn.ModuleList(
                SimVQ(
                    dim=dim,
                    codebook_size=codebook_size,
                    rotation_trick=rotation_trick,
                    channel_first=channel_first,
                    **sim_vq_kwargs,
                )
                for _ in range(num_quantizers)
            ),
        )

    # -- properties --------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.num_quantizers

    @property
    def codebook_dim(self) -> int:
        return self.dim

    @property
    def num_codebooks(self) -> int:
        return self.num_quantizers

    def book_layout(self) -> BookLayout:
        """The books of the indices ``(..., layers)``: one per layer (vqcore.book_layout)."""
        return BookLayout.residual_stack(self.codebook_sizes)

    @property
    def codebooks(self) -> Tensor:
        """Every layer's implicit codebook (Q, K, dim) float32, differentiable with respect to the
        transforms."""
        return torch.stack(self.tables())

    def tables(self, count: int | None = None) -> list[Tensor]:
        """The implicit codebooks of the first ``count`` layers (default all): one transform call each."""
        return [
            layer.implicit_codebook()
            for layer in self.layers[: self.num_quantizers if count is None else count]
        ]

    # -- token paths -----------------------------------------------------------------------------------
    def encode_tokens(self, z: Tensor, tables: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Tokens z (N, dim) float32 -> (indices (N, Q), the sum of the chosen codes added in layer order,
        as :meth:`decode_tokens` adds them)."""
        residual, indices, codes = z, [], []
        for layer, table in zip(self.layers, tables):
            idx = layer.nearest_tokens(residual, table)
            code = table[idx]
            residual = residual - code
            indices.append(idx)
            codes.append(code)
        return torch.stack(indices, -1), sum_layers(codes)

    def layer_codes(self, indices: Tensor, tables: Sequence[Tensor]) -> list[Tensor]:
        """Checked int64 indices (..., Q), -1 allowed -> Q code tensors (..., dim), zeros where -1."""
        return [
            layer.lookup_tokens(indices[..., q], table)
            for q, (layer, table) in enumerate(zip(self.layers, tables))
        ]

    def index_tokens(self, indices: Tensor) -> tuple[Tensor, tuple]:
        """Indices (b, *positions, q), q <= Q -> checked tokens (b, n, Q) int64 (missing layers: -1)."""
        tokens, spatial = self.layout.indices_to_tokens(indices, 1)
        return pad_layers(tokens, self.codebook_sizes), spatial

    # -- inference paths (export-safe) --------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices (b, *positions, Q) int64."""
        tokens, spatial = self.layout.to_tokens(x)
        with float32_region(x.device.type):
            indices, _ = self.encode_tokens(tokens.float().reshape(-1, self.dim), self.tables())
        return self.layout.indices_from_tokens(
            indices.reshape(tokens.shape[0], tokens.shape[1], self.num_quantizers), spatial
        )

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q), q <= Q, -1 allowed -> the sum of the codes in the input layout."""
        tokens, spatial = self.index_tokens(indices)
        with float32_region(tokens.device.type):
            total = sum_layers(self.layer_codes(tokens, self.tables()))
        return self.layout.from_tokens(total, spatial)

    decode = get_output_from_indices

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q), q <= Q -> every layer's codes (Q, b, *positions, dim), channel-first
        (Q, b, dim, *positions); -1 and missing layers give zeros."""
        tokens, spatial = self.index_tokens(indices)
        with float32_region(tokens.device.type):
            codes = torch.stack(self.layer_codes(tokens, self.tables()))
        return self.layout.codes_out(codes, spatial)

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        """Quantize x through the kept layers (quantize dropout in training mode): see the module
        docstring."""
        tokens, spatial = self.layout.to_tokens(x)
        b = tokens.shape[0]
        z = tokens.float().reshape(-1, self.dim)
        kept = self.dropout.kept_layers(self.training, rand_quantize_dropout_fixed_seed, None, x.device)
        with float32_region(x.device.type):
            if not self.training and not z.requires_grad:  # inference: no loss, no estimator
                tables = self.tables()
                indices, total = self.encode_tokens(z, tables)
                losses = z.new_zeros(self.num_quantizers)
                codes = torch.stack(self.layer_codes(indices, tables)) if return_all_codes else None
            else:
                total, indices, losses, codes = self._run_layers(z, kept, return_all_codes)
        n = math.prod(spatial)
        quantized = self.layout.from_tokens(total.to(x.dtype).reshape(b, n, self.dim), spatial)
        indices = self.layout.indices_from_tokens(indices.reshape(b, n, self.num_quantizers), spatial)
        if codes is None:
            return ResidualSimVQOutput(quantized, indices, losses)
        codes = self.layout.codes_out(codes.reshape(self.num_quantizers, b, -1, self.dim), spatial)
        return ResidualSimVQOutputWithCodes(quantized, indices, losses, codes)

    def _run_layers(
        self, z: Tensor, kept: int, want_codes: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The kept layers on tokens z (N, dim) with their estimators (and losses in training mode) ->
        (output (N, dim), indices (N, Q), losses (Q,), codes (Q, N, dim) or None)."""
        n = z.shape[0]
        # straight-through: Σ (c_q + (r_q - sg r_q)) == Σ c_q + kept * (z - sg z), values and gradient alike
        fused = not self.rotation_trick
        residual, outs, indices, losses, codes = z, [], [], [], []
        for layer, table in zip(self.layers, self.tables(kept)):
            step = layer.quantize_tokens(residual, table, with_terms=self.training, estimate=not fused)
            residual = residual - step.codes.detach()
            outs.append(step.out)
            indices.append(step.indices)
            losses.append(layer.weighted_loss(step.terms) if step.terms is not None else z.new_zeros(()))
            if want_codes:
                codes.append(step.codes)
        for _ in range(kept, self.num_quantizers):  # quantize dropout: index -1, zero loss, zero code
            indices.append(z.new_full((n,), DROPPED_INDEX, dtype=torch.long))
            losses.append(z.new_zeros(()))
            if want_codes:
                codes.append(z.new_zeros(n, self.dim))
        total = sum_layers(outs)
        if fused and z.requires_grad:
            total = total + kept * (z - z.detach())
        return (
            total,
            torch.stack(indices, -1),
            torch.stack(losses),
            torch.stack(codes) if want_codes else None,
        )

    # -- export ------------------------------------------------------------------------------------
    def export_tie_check(self, x: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor:
        """See vqcore.protocols.SupportsExportTieCheck: per token, the layers before the first differing one
        agree and that layer's two codes are genuinely tied (float64 distances within ``tolerance``); the
        layers after it legitimately follow another residual."""
        tokens, _ = self.layout.to_tokens(x)
        z = tokens.double().reshape(-1, self.dim)
        q = self.num_quantizers
        ta, tb = a.reshape(-1, q).long(), b.reshape(-1, q).long()
        tables = [t.detach().double() for t in self.tables()]
        ok = torch.ones_like(ta, dtype=torch.bool)
        for t in (ta != tb).any(-1).nonzero().flatten().tolist():
            residual = z[t]
            for layer in range(q):
                ia, ib = int(ta[t, layer]), int(tb[t, layer])
                if ia == ib:
                    residual = residual - tables[layer][ia]
                    continue
                tied = is_tie(
                    residual, tables[layer][ia], tables[layer][ib], cosine=False, tolerance=tolerance
                )
                ok[t, layer:] = tied
                break
        return ok.reshape(a.shape)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters embedded in exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_size": self.codebook_size,
            "num_quantizers": self.num_quantizers,
            "channel_first": self.channel_first,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_size}, "
            f"channel_first={self.channel_first}, quantize_dropout={self.quantize_dropout}"
        )


class ResidualSimVQConverter:
    """Reference ``ResidualSimVQ`` -> vqcore ``ResidualSimVQ``: the layers' options (one set, as the
    reference passes one ``**sim_vq_kwargs`` to every layer), quantize dropout, the same state_dict keys."""

    quantizer = "ResidualSimVQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        layers = list(ref.layers)
        options = reference_layer_kwargs(layers[0])
        transforms = {id(layer.code_transform) for layer in layers}
        if options["codebook_transform"] is not None and len(transforms) > 1:
            raise ValueError(
                "vqcore.compat: reference ResidualSimVQ layers with different codebook_transform modules are "
                "not supported (vqcore's layers share the one codebook_transform they are given)"
            )
        return dict(
            num_quantizers=len(layers),
            quantize_dropout=bool(ref.quantize_dropout),
            quantize_dropout_cutoff_index=int(ref.quantize_dropout_cutoff_index),
            quantize_dropout_multiple_of=int(ref.quantize_dropout_multiple_of),
            **options,
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Any) -> dict[str, Tensor]:
        return same_keys(module, ref_state_dict)


@hookimpl
def register_quantizers(register):
    register(
        "residual_sim_vq",
        ResidualSimVQ,
        aliases=("ResidualSimVQ",),
        summary="residual SimVQ: a SimVQ per layer, quantize dropout, coarse decoding",
    )


@hookimpl
def register_converters(register):
    register(
        "ResidualSimVQ",
        ResidualSimVQConverter,
        summary="every layer's frozen codebook and transform, dropout",
    )
