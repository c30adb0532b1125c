"""ResidualFSQ and GroupedResidualFSQ: residual stacks of symmetric FSQ grids (see the class docstrings).

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- indices are int64; quantization runs in float32 (float64 inputs in float64) with autocast off;
- inputs of any layout are detected (images and video channel-first), not only with ``is_channel_first``;
- quantize dropout depends on the training mode only (the reference also needs grad mode);
- indices decode from a coarse prefix of the layers whether or not quantize dropout is on, and with
  ``orthogonal_rotation`` they decode to the rotated codes the forward outputs (the reference decodes
  the unrotated grid);
- ``return_all_codes`` codes carry no gradient and are channel-last ``(Q, b, *positions, len(levels))``
  for every layout, as ``get_codes_from_indices`` returns them;
- ``projection_has_bias`` applies to the stack's own projections (the reference forwards it to its
  layers, which never project, and always gives its projections a bias);
- FSQ options that make no sense per layer are refused: ``num_codebooks != 1`` (the reference fails its
  own assertion), ``keep_num_codebooks_dim=True`` and ``return_indices=False`` (the reference fails in
  forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from vqcore.blocks.grid import check_levels, with_slope
from vqcore.blocks.layout import TokenLayout, auto_layout
from vqcore.blocks.precision import Float32State
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
from vqcore.blocks.validation import check_positive_int, check_tensor
from vqcore.book_layout import BookLayout
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.plugins.fsq import (
    FSQ,
    FSQGrid,
    FSQOutput,
    FSQOutputWithCodes,
    projected_dtype,
)
from vqcore.protocols import DROPPED_INDEX, INDEX_DTYPE

# FSQ options a residual layer cannot take: (name, the only value accepted, why)
_LAYER_FIXED = (
    ("num_codebooks", 1, "each layer quantizes the whole residual with one grid"),
    ("keep_num_codebooks_dim", None, "the indices' trailing axis is the layer axis"),
    ("return_indices", True, "every layer's indices are returned"),
)


class GroupedFSQOutputWithCodes(NamedTuple):
    """``GroupedResidualFSQ(..., return_all_codes=True)``: ``all_codes`` is a tuple, one entry per group,
    of ``(Q, b, *positions, len(levels))`` codes."""

    quantized: Tensor
    indices: Tensor
    all_codes: tuple[Tensor, ...]


class ResidualFSQ(Float32State, QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n, Q) int64; images/video (detected) too.

    The input is first soft-clamped with ``tanh(x / c) c`` (``bound_hard_clamp=True``, the default:
    ``c = 1 + 1 / (L - 1)`` per dimension; otherwise ``soft_clamp_input_value``, or none). Layer q
    quantizes ``residual / scale_q`` with the symmetric FSQ grid and adds back ``code * scale_q``,
    ``scale_q = L_i^(-q)`` per dimension (as the reference). Quantize dropout (SoundStream,
    arXiv 2107.03312) keeps the first layers only, in training mode (whatever the grad mode); dropped
    layers give index -1, which decodes to nothing, and indices with fewer than Q layers (a coarse
    prefix) decode too. ``return_all_codes=True`` returns :class:`FSQOutputWithCodes`.

    ``is_channel_first=True`` (the reference's option): the input is ``(b, dim, *positions)`` and the
    indices ``(b, Q, *positions)``, which ``decode`` / ``get_output_from_indices`` take back (``(b, q,
    *positions)`` with q <= Q). Without it, 4-D / 5-D inputs are still read channel-first, with indices
    ``(b, *positions, Q)``; ``channel_first=True`` reads 3-D inputs as ``(b, dim, n)`` the same way.

    Every other keyword argument goes to the :class:`~vqcore.plugins.fsq.FSQ` layers (``layers``, as the
    reference): ``noise_dropout``, ``orthogonal_rotation`` (one rotation per layer, state_dict keys
    ``layers.{q}.orthogonal_rot``), ``allowed_dtypes``, ``force_quantization_f32``, ``scale``.
    """

    layers: Sequence[FSQ]  # an nn.ModuleList
    # non-persistent buffers
    scales: Tensor  # (Q, D): L_i^(-q)
    soft_clamp_input_value: Tensor | None  # (D,) or a scalar: tanh(x / c) c before the layers

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
        is_channel_first: bool = False,
        soft_clamp_input_value: float | list[float] | Tensor | None = None,
        bound_hard_clamp: bool = True,
        **fsq_kwargs: Any,
    ):
        super().__init__()
        levels = check_levels(levels, allow_two=True)
        for name, only, why in _LAYER_FIXED:
            if name in fsq_kwargs and fsq_kwargs[name] != only:
                raise ConfigurationError(
                    f"ResidualFSQ needs {name}={only!r} ({why}), got {fsq_kwargs[name]!r}"
                )
        if "preserve_symmetry" in fsq_kwargs:
            raise TypeError("ResidualFSQ layers always use preserve_symmetry=True; do not pass it")
        if is_channel_first and channel_first is False:
            raise ConfigurationError(
                "is_channel_first=True reads the input channel-first; got channel_first=False"
            )
        if bound_hard_clamp and soft_clamp_input_value is not None:
            raise ConfigurationError(
                "soft_clamp_input_value is set by bound_hard_clamp=True (1 + 1 / (L - 1)); pass "
                f"bound_hard_clamp=False to choose it, got soft_clamp_input_value={soft_clamp_input_value!r}"
            )
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
        self.is_channel_first = bool(is_channel_first)
        self.channel_first = True if is_channel_first else channel_first
        self.bound_hard_clamp = bool(bound_hard_clamp)
        self.layers = cast(
            "Sequence[FSQ]",
            nn.ModuleList(
                FSQ(
                    levels,
                    self.codebook_dim,
                    preserve_symmetry=True,
                    bound_hard_clamp=bound_hard_clamp,
                    **fsq_kwargs,
                )
                for _ in range(num_quantizers)
            ),
        )
        lv = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("scales", torch.stack([lv**-q for q in range(num_quantizers)]), persistent=False)
        clamp = 1 + 1 / (lv - 1) if bound_hard_clamp else _soft_clamp_value(soft_clamp_input_value, levels)
        self.register_buffer("soft_clamp_input_value", clamp, persistent=False)
        self.has_projections = self.dim != self.codebook_dim
        self.project_in, self.project_out = projection_pair(
            self.dim, self.codebook_dim, enabled=self.has_projections, bias=projection_has_bias
        )
        # the fused path: no per-layer rotation or noise (those run layer by layer through FSQ)
        first = self.layers[0]
        self.layerwise = first.orthogonal_rotation or first.noise_dropout > 0

    @property
    def grid(self) -> FSQGrid:
        """The symmetric grid every layer shares (constants only)."""
        return self.layers[0].grid

    @property
    def codebook_size(self) -> int:
        return self.grid.size

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """Every layer's codebook size (all alike)."""
        return (self.codebook_size,) * self.num_quantizers

    @property
    def num_codebooks(self) -> int:
        return 1

    def book_layout(self) -> BookLayout:
        """The books of the indices ``(..., layers)``, or ``(b, layers, ...)`` with ``is_channel_first``: one
        per layer (vqcore.book_layout)."""
        return BookLayout.residual_stack(self.codebook_sizes, 1 if self.is_channel_first else -1)

    @property
    def codebooks(self) -> Tensor:
        """(Q, codebook_size, len(levels)): every layer's grid codes, unscaled and unrotated."""
        return self.grid.all_codes().unsqueeze(0).expand(self.num_quantizers, -1, -1)

    # -- layouts ----------------------------------------------------------------------------------------
    def layout_of(self, ndim: int) -> TokenLayout:
        """The layout of an input of rank ``ndim``."""
        return auto_layout(ndim, self.dim, self.channel_first)

    def indices_out(self, indices: Tensor, layout: TokenLayout, spatial: tuple) -> Tensor:
        """Token indices (b, n, Q) -> (b, *positions, Q), or (b, Q, *positions) with ``is_channel_first``."""
        indices = layout.indices_from_tokens(indices, spatial)
        return indices.movedim(-1, 1) if self.is_channel_first else indices

    def index_tokens(self, indices: Tensor, name: str = "indices") -> tuple[Tensor, tuple, TokenLayout]:
        """Indices as the forward returns them, q <= Q layers -> (tokens (b, n, Q) int64 padded with -1,
        spatial, layout); errors name the indices ``name``."""
        check_tensor(indices, name)
        if self.is_channel_first and indices.ndim >= 2:
            indices = indices.movedim(1, -1)
        return detected_layer_tokens(
            indices, self.codebook_sizes, dim=self.dim, channel_first=self.channel_first, name=name
        )

    # -- the token path -----------------------------------------------------------------------------------
    def kept_layers(self, seed: int | None = None, device: torch.device | str = "cpu") -> int:
        """How many leading layers this forward runs (quantize dropout in training mode)."""
        return self.dropout.kept_layers(self.training, seed, sync=self.sync_quantize_dropout, device=device)

    def quantize_tokens(
        self, tokens: Tensor, kept: int, want_codes: bool = False, project_out: bool = True
    ) -> tuple[Tensor, Tensor, list]:
        """Tokens (b, n, dim) -> (quantized tokens (b, n, dim), indices (b, n, Q) with -1 for the layers
        past ``kept``, per-layer scaled codes (Q of (b, n, D), zeros past ``kept``) when ``want_codes``).
        ``project_out=False`` (encode) returns the summed codes before ``project_out``."""
        first = self.layers[0]
        dtype = first.quantization_dtype(projected_dtype(self.project_in, tokens))
        with first.quantization_region(tokens.device.type):
            z = project_into(self.project_in, tokens, dtype)
            if self.layerwise or z.dtype not in (torch.float32, torch.float64):
                total, indices, codes = self._layerwise(z, kept, want_codes)
            else:
                total, indices, codes = self._fused(z, kept, want_codes)
            for _ in range(kept, self.num_quantizers):
                indices.append(torch.full(z.shape[:-1], DROPPED_INDEX, dtype=INDEX_DTYPE, device=z.device))
                if want_codes:
                    codes.append(torch.zeros_like(z))
            out = project_from(self.project_out, total) if project_out else total
        return out, torch.stack(indices, -1), codes

    def _fused(self, z: Tensor, kept: int, want_codes: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Every layer in place on scratch tensors; the gradient to z is one node whose slope is the sum
        of the layers' bound derivatives (the residual is detached between layers) times the soft clamp's."""
        grad = z.requires_grad and torch.is_grad_enabled()
        grid, clamp = self.grid, self.soft_clamp_input_value
        indices, codes = [], []
        z_detached = z.detach()  # no autograd below (torch.no_grad cannot nest in an export)
        outer = None
        if clamp is None:
            residual = z_detached.clone()
        else:
            squashed = (z_detached / clamp).tanh_()
            residual = squashed * clamp
            if grad:
                outer = torch.mul(squashed, squashed).neg_().add_(1.0)  # d tanh(z / c) c / dz
        total = slope = None
        for q in range(kept):
            scale = self.scales[q]
            code, index, layer_slope = grid.quantize_detached(residual / scale, slope=grad, overwrite=True)
            scaled = code.mul_(scale)
            if q + 1 < kept:
                residual.sub_(scaled)
            assert index is not None  # asked for
            indices.append(index)
            if want_codes:
                codes.append(scaled)
            total = scaled if total is None else total + scaled if q == 1 else total.add_(scaled)
            if layer_slope is not None:
                slope = layer_slope.to(z.dtype) if slope is None else slope.add_(layer_slope)
        if slope is not None and outer is not None:
            slope.mul_(outer)
        assert total is not None  # kept >= 1
        if grad and slope is not None:
            total = with_slope(z, total, slope)
        return total, indices, codes

    def _layerwise(self, z: Tensor, kept: int, want_codes: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Layer by layer through each FSQ layer's token path (rotation, noise, low-precision dtypes)."""
        clamp = self.soft_clamp_input_value
        residual = z if clamp is None else (z / clamp).tanh() * clamp
        layer_codes, indices = [], []
        for q in range(kept):
            scale = self.scales[q]
            code, index = self.layers[q].quantize_tokens(
                (residual / scale).unsqueeze(-2), training=self.training
            )
            scaled = code.squeeze(-2) * scale
            residual = residual - scaled.detach()
            assert index is not None
            indices.append(index.squeeze(-1))
            layer_codes.append(scaled)
        return sum_layers(layer_codes), indices, [c.detach() for c in layer_codes] if want_codes else []

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (b, n, dim) -> indices (b, n, Q) int64 (every layer)."""
        return self.quantize_tokens(tokens, self.num_quantizers, project_out=False)[1]

    def layer_codes(self, tokens: Tensor) -> list[Tensor]:
        """Tokens (b, n, Q), -1 allowed -> Q scaled codes (b, n, len(levels)), in the layers' quantization
        region (autocast off unless ``force_quantization_f32=False``); -1 gives zeros."""
        safe = tokens.clamp(min=0).unsqueeze(-1)
        with self.layers[0].quantization_region(tokens.device.type):
            return [
                zero_dropped(layer.lookup(safe[..., q, :]).squeeze(-2) * self.scales[q], tokens[..., q])
                for q, layer in enumerate(self.layers)
            ]

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (b, n, Q), -1 allowed -> (b, n, dim); a token whose layers are all -1 decodes to zero."""
        with self.layers[0].quantization_region(tokens.device.type):
            return decode_layers(self.layer_codes(tokens), tokens, self.project_out)

    # -- the module's paths ----------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        layout = self.layout_of(x.ndim)
        tokens, spatial = layout.to_tokens(x)
        return self.indices_out(self.encode_tokens(tokens), layout, spatial)

    def forward_layers(self, x: Tensor, kept: int, return_all_codes: bool = False):
        """The forward with a given number of kept layers (quantize dropout drawn by the caller)."""
        layout = self.layout_of(x.ndim)
        tokens, spatial = layout.to_tokens(x)
        out, indices, codes = self.quantize_tokens(tokens, kept, return_all_codes)
        quantized = layout.from_tokens(out, spatial).to(x.dtype)
        indices = self.indices_out(indices, layout, spatial)
        if return_all_codes:
            b = tokens.shape[0]
            stacked = torch.stack(codes)
            return FSQOutputWithCodes(
                quantized, indices, stacked.reshape(stacked.shape[0], b, *spatial, stacked.shape[-1])
            )
        return FSQOutput(quantized, indices)

    def forward(
        self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None
    ):
        kept = self.kept_layers(rand_quantize_dropout_fixed_seed, x.device)
        return self.forward_layers(x, kept, return_all_codes)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices as the forward returns them, q <= Q layers -> scaled per-layer codes
        (Q, b, *positions, len(levels)) before project_out; -1 and missing layers give zeros
        (channel-last for every layout)."""
        tokens, spatial, _ = self.index_tokens(indices)
        codes = torch.stack(self.layer_codes(tokens))
        return codes.reshape(codes.shape[0], codes.shape[1], *spatial, codes.shape[-1])

    def decode(self, indices: Tensor) -> Tensor:
        """indices as the forward returns them, q <= Q layers (a coarse prefix decodes too) -> quantized;
        -1 adds nothing, and a token whose layers are all -1 decodes to zero (after project_out too)."""
        tokens, spatial, layout = self.index_tokens(indices)
        return layout.from_tokens(self.decode_tokens(tokens), spatial)

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


def _soft_clamp_value(value: object, levels: list[int]) -> Tensor | None:
    """``soft_clamp_input_value``: None, a number, or one per dimension (list or tensor), all > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple, Tensor)):
        raise TypeError(
            "soft_clamp_input_value must be a number, a list of numbers or a tensor, "
            f"got {type(value).__name__}"
        )
    tensor = torch.as_tensor(value, dtype=torch.float32)
    if tensor.ndim > 1 or (tensor.ndim == 1 and tensor.shape[0] not in (1, len(levels))):
        raise ConfigurationError(
            f"soft_clamp_input_value must be one value or one per dimension ({len(levels)}), "
            f"got shape {tuple(tensor.shape)}"
        )
    if not (torch.isfinite(tensor).all() and (tensor > 0).all()):
        raise ConfigurationError(f"soft_clamp_input_value must be finite and > 0, got {value!r}")
    return tensor


class GroupedResidualFSQ(GroupedStacks[ResidualFSQ]):
    """x (b, n, dim) -> quantized, indices (groups, *the stack's index layout), as the reference.

    The feature axis (the last one, or axis 1 for channel-first inputs: images, video, ``is_channel_first``
    or ``accept_image_fmap=True``) is split into ``groups`` equal chunks, each quantized by an independent
    :class:`ResidualFSQ` (``dim // groups`` features, every other keyword argument forwarded) through its
    token-level API (:class:`~vqcore.blocks.residual.GroupedStacks`); the input's layout is detected as
    the stacks detect theirs. Quantize dropout keeps the same layers in every group. ``return_all_codes``
    adds a tuple, one entry per group, of ``(Q, b, *positions, len(levels))`` codes.
    """

    def __init__(self, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs: Any):
        if accept_image_fmap and kwargs.get("channel_first") is None:
            kwargs["channel_first"] = True  # the chunks are channel-first for every rank
        super().__init__(dim, groups, lambda group_dim: ResidualFSQ(dim=group_dim, **kwargs))
        self.accept_image_fmap = bool(accept_image_fmap)

    def split_dim(self, ndim: int) -> int:
        """The feature axis of an input of rank ``ndim``: 1 when the stacks read it channel-first, else -1."""
        return 1 if self.rvqs[0].layout_of(ndim).channel_first else -1

    # -- the layout hooks: the stacks detect the layout, and move the indices with is_channel_first ---------
    def input_layout(self, x: Tensor) -> TokenLayout:
        check_tensor(x, "x")
        return auto_layout(x.ndim, self.dim, self.rvqs[0].channel_first)

    def group_indices(self, indices: Tensor, layout: TokenLayout, spatial: tuple) -> Tensor:
        return self.rvqs[0].indices_out(indices, layout, spatial)

    def group_index_tokens(self, group: int, indices: Tensor) -> tuple[Tensor, tuple, TokenLayout]:
        return self.rvqs[group].index_tokens(indices, f"indices[{group}]")

    def forward(
        self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None
    ):
        def run(rvq: ResidualFSQ, chunk: Tensor, valid: Tensor | None, kept: int) -> GroupStep:
            out, indices, codes = rvq.quantize_tokens(chunk, kept, return_all_codes)
            return GroupStep(out, indices, None, torch.stack(codes) if return_all_codes else None)

        step = self.quantize_groups(
            x, run, seed=rand_quantize_dropout_fixed_seed, want_codes=return_all_codes
        )
        if return_all_codes:
            return GroupedFSQOutputWithCodes(step.quantized, step.indices, step.codes)
        return FSQOutput(step.quantized, step.indices)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters embedded in exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        rvq = self.rvqs[0]
        return {"num_quantizers": rvq.num_quantizers, "groups": self.groups, "levels": list(rvq.levels)}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, accept_image_fmap={self.accept_image_fmap}"


@hookimpl
def register_quantizers(register):
    register(
        "residual_fsq",
        ResidualFSQ,
        aliases=("ResidualFSQ", "rfsq"),
        summary="residual stack of symmetric FSQ layers with per-layer scales L^-q",
    )
    register(
        "grouped_residual_fsq",
        GroupedResidualFSQ,
        aliases=("GroupedResidualFSQ", "grouped_rfsq"),
        summary="grouped residual FSQ: the feature dim split into independent residual FSQ stacks",
    )
