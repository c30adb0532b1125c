"""LatentQuantize: x (b, n, d) -> quantized (b, n, d), indices (b, n), loss ().

Latent quantization (Hsu et al., "Disentanglement via Latent Quantization", arXiv 2305.18378): every
latent dimension i has its own learnable scalar value table ``v_i`` (``L_i`` values) and is quantized
to the nearest value, ``zhat_i = v_i[argmin_k |z_i - v_i[k]|]``, against the CURRENT tables. The index
is the mixed-radix number of the argmin digits, first dimension least significant (as FSQ), so
``indices_to_codes`` stays consistent after the tables have learned.

Gradients, as the paper intends (the reference's tables never receive one):
- the output is ``zhat + (z - sg(z))``: its value is exactly the chosen table entries, the decoder's
  gradient reaches the encoder (straight-through) AND the chosen values;
- ``commitment = mse(z, sg(zhat))`` trains the encoder only, ``quantization = mse(sg(z), zhat)`` the
  values only; ``loss = commitment_loss_weight commitment + quantization_loss_weight quantization``,
  both in latent (codebook) space, 0 in eval. They are the shared Loss objects
  (:class:`~vqcore.blocks.losses.CommitmentLoss`, :class:`~vqcore.blocks.losses.CodebookLoss`) on one
  book of ``b * n * num_codebooks`` tokens; ``extra_losses`` are added weighted (over finite tokens,
  with the quantizer's codebook ``None``) and reported in the breakdown's ``extra``;
- non-finite tokens (NaN/Inf anywhere in one codebook group of a token) never reach the tables: they are
  left out of ``quantization`` and of the straight-through path to the chosen values, as the EMA
  codebooks leave them out of their statistics; ``commitment`` and the input's gradient still show them.

Initial tables: odd L: ``linspace(-0.5, 0.5, L)``; even L: ``arange(L) / L - 0.5``. With
``optimize_values=False`` they are frozen (parameters without gradient: they follow ``.to()`` /
``.double()`` and are saved in the state_dict).

``in_place_codebook_optimizer`` (a factory ``params -> torch.optim.Optimizer``, e.g.
``functools.partial(torch.optim.SGD, lr=0.05)``; needs ``optimize_values=True``): built once over the
value tables; every training forward (grad mode on) first steps it on the weighted quantization term of
the batch, ``quantization_loss_weight * mse(sg(z), zhat)`` (the only term that reaches the tables),
taken on detached latents so the encoder's graph is left alone, then quantizes again with the updated
tables; the returned output, indices and loss come from the updated tables. The step consumes its own
gradient only: what the tables' ``.grad`` held before the forward is put back. Eval forwards, forwards
under ``torch.no_grad()`` and ``quantization_loss_weight=0`` do not step.

State dict: the reference 1.32.0 keeps frozen tables (``optimize_values=False``) in a plain list, outside
its state_dict; vqcore saves them (state_dict version 2), and a version-1 state without any table
(a reference checkpoint, frozen) loads strictly: its tables are the initial grid, which the module then
holds. A learnable module, or a version-2 state, still needs every table.

Differences from vector-quantize-pytorch 1.32.0, on purpose:

- 3-D inputs are sequences ``(b, n, dim)``, as the reference's README says; its code reads them as
  ``(b, dim, n)``, which vqcore reads with ``channel_first=True`` (the reference converter sets it);
  images/video are detected and channel-first; ``indices_to_codes`` answers in the same layout;
- int64 indices from the argmin against the current tables (``codes_to_indices`` included; the
  reference computes them from the initial grid, as int32);
- the losses are taken in latent space, and the tables learn: from the quantization term and from the
  output (straight-through to the encoder, the chosen values get the decoder's gradient); the
  reference's tables never receive a gradient;
- the in-place optimizer's step is weighted by ``quantization_loss_weight`` (the reference's code sums
  the unweighted terms and never reaches its step: it reads an attribute it does not set);
- frozen tables are saved in the state_dict (above);
- ``keep_num_codebooks_dim=False`` with ``num_codebooks > 1`` keeps the codebook axis (as the
  reference does), rather than raising.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqcore.blocks.grid import check_levels, digits_to_indices, indices_to_digits, mixed_radix_basis
from vqcore.blocks.layout import CodebookAxis, TokenLayout, auto_layout, index_tokens
from vqcore.blocks.losses import CodebookLoss, CommitmentLoss, LossSpec, WeightedLosses, extra_loss_pairs
from vqcore.blocks.precision import float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.validation import check_float, check_positive_int
from vqcore.errors import ConfigurationError, ConfigurationRuntimeError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import INDEX_DTYPE


class LatentLossBreakdown(NamedTuple):
    """Unweighted latent-quantization terms (0-dim): commitment (trains the encoder), quantization
    (trains the values); ``extra``: the terms of ``extra_losses`` by name."""

    commitment: Tensor
    quantization: Tensor
    extra: dict[str, Tensor]


class LatentQuantizeOutput(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor


class LatentQuantizeOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: LatentLossBreakdown


@contextmanager
def configuration_errors() -> Iterator[None]:
    """A constructor check's ValueError as :class:`~vqcore.errors.ConfigurationError` (same message)."""
    try:
        yield
    except ConfigurationError:
        raise
    except ValueError as err:
        raise ConfigurationError(str(err)) from None


def initial_values(level: int) -> Tensor:
    if level % 2:
        return torch.linspace(-0.5, 0.5, level)
    return torch.arange(level, dtype=torch.float32) / level - 0.5


class LatentQuantize(QuantizerModule):
    """x (b, n, dim) -> quantized (b, n, dim), indices (b, n) int64, loss () — see the module docstring.

    ``levels``: a list (one table per latent dimension), or an int repeated ``codebook_dim`` times.
    ``dim`` defaults to ``len(levels) * num_codebooks``; otherwise Linear projections in and out.
    The ``num_codebooks`` groups share the value tables; indices gain a trailing codebook axis.
    ``extra_losses``: ``{"name": weight}`` or ``[(name or Loss, weight), ...]``.
    ``in_place_codebook_optimizer``: ``params -> Optimizer``, stepped on the tables by every training
    forward (module docstring); the built optimizer is the attribute of the same name.
    Layouts (detected): ``(b, n, dim)``, ``(b, dim)``, ``(b, dim, n)`` with ``channel_first=True``,
    images ``(b, dim, h, w)``, video ``(b, dim, t, h, w)``.
    """

    # non-persistent buffers, (D,) int64 each
    basis: Tensor
    levels_tensor: Tensor
    value_offset: Tensor  # where each dimension's table starts in the concatenated tables

    # state_dict version 2: frozen tables are saved (see the module docstring)
    _version = 2

    def __init__(
        self,
        levels,
        dim: int | None = None,
        commitment_loss_weight: float = 0.1,
        quantization_loss_weight: float = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int | None = None,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool = True,
        in_place_codebook_optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer] | None = None,
        channel_first: bool | None = None,
        projection_has_bias: bool = True,
        extra_losses: LossSpec = None,
    ):
        super().__init__()
        if codebook_dim == -1:  # the reference's "not given"
            codebook_dim = None
        if isinstance(levels, int) and not isinstance(levels, bool):
            if codebook_dim is None:
                # the reference fails here with torch's RuntimeError (repeating by -1)
                raise ConfigurationRuntimeError(
                    f"levels is an int ({levels}): give codebook_dim (the number of latent dimensions) too, "
                    "or pass levels as a list"
                )
            with configuration_errors():
                levels = [levels] * check_positive_int(codebook_dim, "codebook_dim")
        with configuration_errors():
            levels = check_levels(levels, allow_two=True)
        if codebook_dim is not None and codebook_dim != len(levels):
            raise ConfigurationError(f"codebook_dim ({codebook_dim}) must equal len(levels) ({len(levels)})")
        if commitment_loss_weight < 0 or quantization_loss_weight < 0:
            raise ConfigurationError(
                "commitment_loss_weight and quantization_loss_weight must be >= 0, got "
                f"{commitment_loss_weight} and {quantization_loss_weight}"
            )
        if in_place_codebook_optimizer is not None:
            if not callable(in_place_codebook_optimizer):
                raise TypeError(
                    "in_place_codebook_optimizer must be a callable params -> torch.optim.Optimizer "
                    f"(e.g. functools.partial(torch.optim.SGD, lr=0.05)), got "
                    f"{type(in_place_codebook_optimizer).__name__}"
                )
            if not optimize_values:
                raise ConfigurationError(
                    "in_place_codebook_optimizer steps the value tables, which optimize_values=False "
                    "freezes: pass optimize_values=True, or no optimizer"
                )
        # the reference keeps the codebook axis whenever num_codebooks > 1, even with keep=False
        with configuration_errors():
            self.codebook_axis = CodebookAxis(num_codebooks, len(levels), keep_num_codebooks_dim or None)
        self.commitment = CommitmentLoss()
        self.quantization = CodebookLoss()
        reserved = (CommitmentLoss.name, CodebookLoss.name)
        with configuration_errors():
            self.extra_losses = WeightedLosses(extra_loss_pairs(extra_losses, reserved=reserved))
        self.levels = levels
        self.codebook_dim = len(levels)
        inner = self.codebook_dim * num_codebooks
        with configuration_errors():
            self.dim = inner if dim is None else check_positive_int(dim, "dim")
        self.channel_first = channel_first
        self.commitment_loss_weight = float(commitment_loss_weight)
        self.quantization_loss_weight = float(quantization_loss_weight)
        self.optimize_values = optimize_values
        self._codebook_size = math.prod(levels)
        self.max_level = max(levels)
        self.values_per_latent = nn.ParameterList(
            nn.Parameter(initial_values(level), requires_grad=optimize_values) for level in levels
        )
        self.register_buffer(
            "basis", torch.tensor(mixed_radix_basis(levels), dtype=INDEX_DTYPE), persistent=False
        )
        self.register_buffer("levels_tensor", torch.tensor(levels, dtype=INDEX_DTYPE), persistent=False)
        self.register_buffer(
            "value_offset",
            torch.tensor([0, *itertools.accumulate(levels[:-1])], dtype=INDEX_DTYPE),
            persistent=False,
        )
        self.has_projections = self.dim != inner
        self.project_in, self.project_out = projection_pair(
            self.dim, inner, enabled=self.has_projections, bias=projection_has_bias
        )
        # the reference's attribute: the optimizer built over the tables, or None
        self.in_place_codebook_optimizer: torch.optim.Optimizer | None = (
            None
            if in_place_codebook_optimizer is None
            else in_place_codebook_optimizer(self.values_per_latent.parameters())
        )
        self.register_load_state_dict_pre_hook(_initial_tables_for_legacy_frozen_state)

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    @property
    def num_codebooks(self) -> int:
        return self.codebook_axis.num_codebooks

    @property
    def keep_num_codebooks_dim(self) -> bool:
        return self.codebook_axis.keep

    def value_table(self) -> Tensor:
        """(len(levels), max(levels)) float32, rows padded with +inf (never the nearest value)."""
        return torch.stack(
            [
                F.pad(v.float(), (0, self.max_level - v.shape[0]), value=math.inf)
                for v in self.values_per_latent
            ]
        )

    def flat_values(self) -> Tensor:
        """(sum(levels),) float32: the tables one after the other (dimension i from ``value_offset[i]``)."""
        return torch.cat(list(self.values_per_latent)).float()

    @property
    def implicit_codebook(self) -> Tensor:
        """All codes (codebook_size, len(levels)) in index order, from the current tables."""
        every = torch.arange(self._codebook_size, device=self.basis.device)
        return self._lookup(
            self.flat_values().detach(), indices_to_digits(every, self.basis, self.levels_tensor)
        )

    # -- layout -----------------------------------------------------------------------------------------
    def _layout(self, x: Tensor, name: str) -> TokenLayout:
        """The input's layout; a (b, dim, n) sequence without ``channel_first=True`` (what the reference's
        code reads) is refused with a hint."""
        if x.ndim == 3 and not self.channel_first and x.shape[-1] != self.dim and x.shape[1] == self.dim:
            raise ValueError(
                f"{name} must be a (batch, seq, dim) sequence with {self.dim} features on its last axis, got "
                f"shape {tuple(x.shape)}; for (batch, dim, seq) build the module with channel_first=True"
            )
        return auto_layout(x.ndim, self.dim, self.channel_first, name=name)

    # -- pieces -----------------------------------------------------------------------------------------

    def _nearest(self, z: Tensor) -> Tensor:
        """z (..., D) float32 -> digits (..., D) int64 of the nearest value of each dimension's current
        table (the first on ties). One search per dimension over its own table, as the reference does:
        for the few dimensions latent quantization uses this beats one search over the padded
        (D, max(levels)) table (benchmarks/bench_latent.py). Coordinates are first clamped to their
        table's range, which keeps every nearest value and makes +-inf choose the largest / smallest
        value (not the first, as |inf - v| = inf for every v would); a NaN gives digit 0."""
        z = z.detach()
        digits = []
        for i, values in enumerate(self.values_per_latent):
            values = values.detach().float()
            coordinate = z[..., i, None].clamp(values.min(), values.max())
            digits.append((coordinate - values).abs_().argmin(-1))
        return torch.stack(digits, dim=-1)

    def _lookup(self, flat: Tensor, digits: Tensor) -> Tensor:
        """digits (..., D) -> values (..., D) of the tables ``flat`` (:meth:`flat_values`), differentiable
        w.r.t. them. index_select, not advanced indexing: the same values without the indexing kernel's
        parallel region."""
        return flat.index_select(0, (digits + self.value_offset).flatten()).view(digits.shape)

    # -- inference paths --------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        layout = self._layout(x, "x")
        tokens, spatial = layout.to_tokens(x)
        axis = self.codebook_axis
        with float32_region(x.device.type):
            digits = self._nearest(axis.split(project_into(self.project_in, tokens)))
            indices = digits_to_indices(digits, self.basis)
        return layout.indices_from_tokens(axis.indices_out(indices), spatial)

    def decode(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices -> codes from the current tables (after project_out unless ``project_out=False``),
        input layout.
        """
        tokens, spatial, layout = index_tokens(
            indices,
            dim=self.dim,
            channel_first=self.channel_first,
            size=self._codebook_size,
            trailing=self.codebook_axis.trailing,
            allow_dropped=False,
        )
        with float32_region(tokens.device.type):
            digits = indices_to_digits(tokens, self.basis, self.levels_tensor)
            codes = self._lookup(self.flat_values(), digits).flatten(-2)
            out = project_from(self.project_out, codes) if project_out else codes
        return layout.from_tokens(out, spatial)

    indices_to_codes = decode

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Latent codes ``zhat`` (..., len(levels)) -> indices (...) of the nearest grid point (current
        tables)."""
        check_float(zhat, "zhat")
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"zhat must have {self.codebook_dim} features on the last axis, got shape {tuple(zhat.shape)}"
            )
        return digits_to_indices(self._nearest(zhat.float()), self.basis)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, z: Tensor, return_loss_breakdown: bool = False):
        """``z``: the input (the reference's name), any layout of the class docstring."""
        layout = self._layout(z, "z")
        tokens, spatial = layout.to_tokens(z, "z")
        axis = self.codebook_axis
        with float32_region(z.device.type):
            latents = axis.split(project_into(self.project_in, tokens))
            table = self.flat_values()
            digits = self._nearest(latents)
            zhat = self._lookup(table, digits)
            indices = digits_to_indices(digits, self.basis)
            zero = latents.new_zeros(())
            commitment = quantization = extra_total = zero
            extra = dict.fromkeys(self.extra_losses.names, zero)
            if self.training:
                # the value tables learn from finite tokens only (per token and codebook group, as the EMA
                # codebooks): a NaN/Inf token reaches them neither through the quantization loss nor through
                # the straight-through output, so one bad token cannot turn the tables NaN at the next step.
                # The encoder side still sees it (commitment and the input's gradient are non-finite).
                finite = torch.isfinite(latents.sum(-1))  # any NaN/Inf (or an overflowing sum) in the group
                d = latents.shape[-1]  # one book of every token and codebook group
                valid = finite.reshape(1, -1)
                if self._steps_in_place():
                    self._step_tables_in_place(
                        latents.detach().reshape(1, -1, d),
                        zhat.reshape(1, -1, d),
                        indices.reshape(1, -1),
                        valid,
                    )
                    table = self.flat_values()  # quantize again with the updated tables
                    digits = self._nearest(latents)
                    zhat = self._lookup(table, digits)
                    indices = digits_to_indices(digits, self.basis)
                out = torch.where(finite.unsqueeze(-1), zhat, zhat.detach())
                out = out + (latents - latents.detach()) if latents.requires_grad else out
                bz, bq, bi = latents.reshape(1, -1, d), zhat.reshape(1, -1, d), indices.reshape(1, -1)
                commitment = self.commitment(bz, bq, bi, None, None)[0]  # every token, non-finite ones too
                quantization = self.quantization(bz, bq, bi, None, valid)[0]  # finite tokens only
                if self.extra_losses.pairs:
                    extra_total, extra = self.extra_losses(bz, bq, bi, None, valid)
                    extra_total, extra = extra_total[0], {k: t[0] for k, t in extra.items()}
            else:
                # straight-through in eval too (as the reference): a frozen quantizer passes gradients
                out = zhat + (latents - latents.detach()) if latents.requires_grad else zhat
            out = project_from(self.project_out, out.flatten(-2))
        loss = self.commitment_loss_weight * commitment + self.quantization_loss_weight * quantization
        if self.extra_losses.pairs:
            loss = loss + extra_total
        quantized = layout.from_tokens(out, spatial).to(z.dtype)
        indices = layout.indices_from_tokens(axis.indices_out(indices), spatial)
        if return_loss_breakdown:
            return LatentQuantizeOutputWithBreakdown(
                quantized, indices, loss, LatentLossBreakdown(commitment, quantization, extra)
            )
        return LatentQuantizeOutput(quantized, indices, loss)

    # -- the in-place codebook optimizer ------------------------------------------------------------
    def _steps_in_place(self) -> bool:
        """Whether this (training) forward steps the in-place optimizer first."""
        return (
            self.in_place_codebook_optimizer is not None
            and self.quantization_loss_weight > 0
            and torch.is_grad_enabled()
        )

    def _step_tables_in_place(self, latents: Tensor, zhat: Tensor, indices: Tensor, valid: Tensor) -> None:
        """One step of the in-place optimizer on ``quantization_loss_weight * mse(sg(z), zhat)`` over the
        finite tokens of one book: ``latents`` / ``zhat`` (1, N, D) (``latents`` detached, ``zhat``
        differentiable w.r.t. the tables), ``indices`` / ``valid`` (1, N). Only the tables' gradient is
        computed; their ``.grad`` is put back as it was after the step."""
        optimizer = self.in_place_codebook_optimizer
        assert optimizer is not None
        tables = list(self.values_per_latent)
        term = self.quantization(latents, zhat, indices, None, valid)[0]
        grads = torch.autograd.grad(self.quantization_loss_weight * term, tables, allow_unused=True)
        held = [table.grad for table in tables]
        for table, grad in zip(tables, grads, strict=True):
            table.grad = grad
        optimizer.step()
        for table, grad in zip(tables, held, strict=True):
            table.grad = grad

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts, next to the generic dim, codebook_size and
        num_codebooks (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.codebook_dim,
            "levels": list(self.levels),
            "channel_first": self.channel_first,
        }

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
            f"optimize_values={self.optimize_values}"
        )


def _initial_tables_for_legacy_frozen_state(
    module: LatentQuantize,
    state_dict,
    prefix,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
) -> None:
    """Load pre-hook: a frozen module given a version-1 state without any value table (a reference 1.32.0
    checkpoint keeps frozen tables out of its state_dict) gets the initial tables, which are what such a
    checkpoint was trained with. Learnable modules and version-2 states keep the strict key check."""
    version = local_metadata.get("version")
    if module.optimize_values or (version is not None and version >= 2):
        return
    keys = [f"{prefix}values_per_latent.{i}" for i in range(len(module.levels))]
    if any(key in state_dict for key in keys):
        return
    for key, level, table in zip(keys, module.levels, module.values_per_latent, strict=True):
        state_dict[key] = initial_values(level).to(device=table.device, dtype=table.dtype)


@hookimpl
def register_quantizers(register):
    register(
        "latent",
        LatentQuantize,
        aliases=("LatentQuantize", "latent_quantize"),
        summary="latent quantization: learnable per-dimension scalar value tables",
    )
