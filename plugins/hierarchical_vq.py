"""HierarchicalVQ: multi-scale residual VQ on feature maps (VAR, arXiv 2404.02905).

x ``(b, dim, *spatial)`` (channel-first, the default) or ``(b, *spatial, dim)`` -> reconstruction of the
same shape, one index map per level, and the mean commitment loss. ``spatial`` is 1-D by default, 2-D with
``accept_image_fmap``, 3-D with ``accept_3d_fmap``.

Level ``l`` (shape ``scales[l]``, non-decreasing per axis) quantizes the current residual ``r_l`` (``r_0 =
x``) at its own resolution::

    pooled_l = adaptive_avg_pool(r_l, scales[l])            # masked: pool(r * m) / pool(m)
    q_l      = VQ_l(pooled_l)                               # a VectorQuantize, one token per cell
    up_l     = interpolate(q_l, spatial)                    # linear / bilinear / trilinear, if needed
    c_l      = phi_l(up_l) = up_l.lerp(conv(up_l), |quant_resi|)   # 3-wide conv, dim -> dim
    r_{l+1}  = r_l - c_l;     reconstruction = sum_l c_l

The residual chain is not detached (the gradient of a level's commitment term reaches the earlier levels'
``phi`` convs and the input, as in the reference). ``shared_codebook=True`` (the default) quantizes every
level with one :class:`~vqcore.plugins.vq.VectorQuantize` (``vq``; its EMA steps once per level), otherwise
level ``l`` has its own (``vqs[l]``; ``codebook_size`` may then be one size per level). ``share_quant_resi``:
``1`` one shared ``phi`` (``phi_shared``), ``k > 1`` ``min(k, levels)`` convs (``phi_levels``) that the
levels pick evenly (level ``l`` uses ``round(l / (levels - 1) * (k - 1))``), ``<= 0`` one per level.
``quant_resi == 0`` (``|quant_resi| <= 1e-8``) turns ``phi`` into the identity (its conv is still built).

Training-mode ``nested_dropout = p``: with probability ``p`` the forward returns the reconstruction of the
levels ``0..cutoff`` only, ``cutoff`` uniform in ``[nested_dropout_min_levels - 1, levels - 2]``, and the
loss is the mean over those levels (every level is still quantized, and its codebook trained). The
draw is agreed by every rank (rank 0's seed is broadcast under torch.distributed) and follows
``torch.manual_seed``; ``return_cutoff=True`` adds it to the output (None: all levels kept).

Masks: ``mask`` (b, *spatial) bool (True = keep), or ``lens`` (b,) for 1-D maps. A level's cell counts
when any position of its pooling window does; its pooled value is the mean over the valid positions only,
its VQ sees its valid cells only (index -1 elsewhere), and the reconstruction is zero on padding.

The forward returns ``HierarchicalVQOutput(quantized, indices, commit_loss)`` as the reference, with
``indices`` the tuple of the levels' ``(b, *scales[l])`` int64 maps (``+ cutoff`` with ``return_cutoff``).

``encode`` / ``decode`` (export-safe; inference): ``encode(x)`` gives ONE int64 tensor ``(b, S)``, ``S =
sum_l prod(scales[l])``: the levels' index maps, each flattened row-major, concatenated in level order
(:meth:`HierarchicalVQ.pack_indices` / :meth:`HierarchicalVQ.unpack_indices` convert between the two
forms). ``decode`` (and ``get_output_from_indices``, which also takes the tuple) reconstructs at the
LAST level's shape unless ``full_shape`` is given (the reference's rule): ``decode(encode(x))`` equals
the eval forward's reconstruction bit for bit when ``x``'s spatial shape is the last scale.

Differences from vector-quantize-pytorch 1.32.0, on purpose:

- an index -1 (a masked cell, or a level left out for a coarse reconstruction) contributes nothing:
  its cell's code is zero before upsampling (as the reference) and the level's ``phi`` output is zero
  at the positions whose nearest cell is -1 (the reference adds ``phi``'s conv bias there): decoding
  levels ``0..k`` with the finer levels all -1 gives exactly the nested-dropout reconstruction of
  cutoff ``k``, and indices all -1 decode to zeros. Decoding a masked forward's indices gives its
  reconstruction at the valid positions; padding that a coarser level's valid cell covers is not zero
  there (the indices cannot tell it at full resolution): multiply by the mask;
- padding (even NaN) reaches neither the outputs nor any gradient: it is set to zero before pooling;
- the coarsest level's masked mean is ``pool(r * m) / pool(m)`` like every other level (the reference
  takes ``sum(r * m) / sum(m)`` there: equal up to float rounding);
- the residual pyramid runs in float32 with autocast off (the ``phi`` convs in their own dtype), and the
  reconstruction comes back in the input's dtype;
- ``forward(indices=...)`` raises a ValueError pointing to ``get_output_from_indices`` (the reference
  asserts); bad inputs raise ValueError/TypeError naming what was expected, bad options
  :class:`~vqcore.errors.ConfigurationError`;
- the levels' VectorQuantize are vqcore's (see :mod:`vqcore.plugins.vq` for how they differ: k-means++
  seeding, k-means in training-mode forwards only, ...).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqcore.blocks.distributed import broadcast_, should_sync
from vqcore.blocks.layout import TokenLayout, token_mask
from vqcore.blocks.precision import float32_region
from vqcore.blocks.validation import check_float, check_indices, check_positive_int, check_tensor
from vqcore.book_layout import BookAxis, BookLayout
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.plugins.reference_vq import layer_kwargs, map_codebook
from vqcore.plugins.vq import VectorQuantize

SPATIAL_NAMES = {1: ("seq",), 2: ("height", "width"), 3: ("time", "height", "width")}
PHI_OFF = 1e-8  # |quant_resi| at or below this: phi is the identity
NESTED_SEED_RANGE = 10_000  # the nested-dropout seed is drawn in [0, NESTED_SEED_RANGE)


class HierarchicalVQOutput(NamedTuple):
    """``quantized``: the reconstruction, in the input's shape and dtype; ``indices``: one int64
    ``(b, *scales[l])`` map per level; ``commit_loss``: 0-dim, the mean over the (kept) levels."""

    quantized: Tensor
    indices: tuple[Tensor, ...]
    commit_loss: Tensor


class HierarchicalVQOutputWithCutoff(NamedTuple):
    """``return_cutoff=True``: ``cutoff`` is the last level kept by nested dropout (None: all levels)."""

    quantized: Tensor
    indices: tuple[Tensor, ...]
    commit_loss: Tensor
    cutoff: int | None


def level_shape_of(scale: object, spatial_dims: int, what: str = "each entry of scales") -> tuple[int, ...]:
    """A scale (an int for every axis, or one int per axis) -> the level's shape, checked; errors name
    ``what`` was given (a :class:`~vqcore.errors.ConfigurationError`, a ValueError)."""
    if isinstance(scale, int) and not isinstance(scale, bool):
        shape: tuple = (scale,) * spatial_dims
    elif isinstance(scale, Sequence) and not isinstance(scale, str):
        shape = tuple(scale)
    else:
        shape = ()
    if len(shape) != spatial_dims:
        raise ConfigurationError(
            f"{what} must be an int or {spatial_dims} ints (one per spatial axis), got {scale!r}"
        )
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(f"{what} must hold positive ints, got {scale!r}")
    return shape


@dataclass(frozen=True)
class LevelBookLayout(BookLayout):
    """The levels of :class:`HierarchicalVQ` as books: the indices are the tuple of the levels' maps or
    their packed ``(b, S)`` form, whose last axis holds ``level_cells[l]`` cells of each level in turn."""

    level_cells: tuple[int, ...] = ()

    def check(self, indices: Any, what: str = "indices") -> None:
        for level in self._levels(indices, what):
            if level.is_floating_point() or level.dtype == torch.bool:
                raise TypeError(f"{what} must be integer tensors, got {level.dtype}")

    def books_first(self, indices: Any) -> Tensor:
        levels = [level.reshape(-1).long() for level in self._levels(indices, "indices")]
        longest = max(level.numel() for level in levels)
        return torch.stack([F.pad(level, (0, longest - level.numel()), value=-1) for level in levels])

    def _levels(self, indices: Any, what: str) -> tuple[Tensor, ...]:
        if isinstance(indices, Tensor):
            total = sum(self.level_cells)
            if indices.ndim != 2 or indices.shape[1] != total:
                raise ValueError(
                    f"packed {what} must be (batch, {total}): the levels' {list(self.level_cells)} cells; "
                    f"got shape {tuple(indices.shape)}"
                )
            return tuple(indices.split(self.level_cells, dim=1))
        if not isinstance(indices, (tuple, list)) or len(indices) != len(self.level_cells):
            raise ValueError(f"{what} must hold one index map per level ({len(self.level_cells)})")
        return tuple(indices)


class Phi(nn.Module):
    """The residual conv after upsampling (VAR's phi): ``x.lerp(conv(x), ratio)``, a 3-wide
    ``dim -> dim`` conv of the map's rank; the identity when ``ratio <= 1e-8``. The conv runs in its own
    dtype (a module cast with ``.half()`` runs it in half), the mix in the input's."""

    def __init__(self, dim: int, spatial_dims: int, resi_ratio: float):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv(dim, dim, 3, padding=1)
        self.resi_ratio = float(abs(resi_ratio))

    def forward(self, x: Tensor) -> Tensor:
        if self.resi_ratio <= PHI_OFF:
            return x
        weight = self.conv.weight
        return x.lerp(self.conv(x.to(weight.dtype)).to(x.dtype), self.resi_ratio)


class HierarchicalVQ(QuantizerModule):
    """Multi-scale residual VQ of feature maps — see the module docstring."""

    vqs: Sequence[VectorQuantize] | None  # an nn.ModuleList (whose items torch types as plain Modules)
    phi_levels: Sequence[Phi] | None

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int | Sequence[int],
        scales: Sequence[int | Sequence[int]],
        shared_codebook: bool = True,
        channel_first: bool = True,
        sync_codebook: bool | None = None,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        rotation_trick: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 0.1,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_max_codes: int | None = 128,
        orthogonal_reg_active_codes_only: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 1,
        nested_dropout: float = 0.0,
        nested_dropout_min_levels: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        if accept_image_fmap and accept_3d_fmap:
            raise ConfigurationError(
                "accept_image_fmap and accept_3d_fmap cannot both be True: choose at most one "
                "(image maps (b, dim, h, w) or video maps (b, dim, t, h, w))"
            )
        if not 0.0 <= nested_dropout <= 1.0:
            raise ConfigurationError(f"nested_dropout must be a probability in [0, 1], got {nested_dropout}")
        check_positive_int(nested_dropout_min_levels, "nested_dropout_min_levels")
        if isinstance(share_quant_resi, bool) or not isinstance(share_quant_resi, int):
            raise TypeError(f"share_quant_resi must be an int, got {share_quant_resi!r}")
        spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        if isinstance(scales, (str, int)) or not isinstance(scales, Sequence) or not scales:
            raise ConfigurationError(f"scales must be a non-empty sequence of level scales, got {scales!r}")
        level_shapes = tuple(level_shape_of(scale, spatial_dims) for scale in scales)
        for prev, curr in zip(level_shapes, level_shapes[1:]):
            if any(a > b for a, b in zip(prev, curr)):
                raise ConfigurationError(
                    f"scales must be non-decreasing on every axis, got {prev} before {curr} "
                    f"(scales={scales!r})"
                )
        num_levels = len(level_shapes)
        if isinstance(codebook_size, Sequence):
            sizes = tuple(codebook_size)
            if len(sizes) != num_levels:
                raise ConfigurationError(
                    f"codebook_size has {len(sizes)} sizes but scales has {num_levels} levels: give one size "
                    "per level, or one int"
                )
        else:
            sizes = (codebook_size,) * num_levels
        for size in sizes:
            check_positive_int(size, "codebook_size")
        if shared_codebook and len(set(sizes)) > 1:
            raise ConfigurationError(
                f"shared_codebook=True needs one codebook size for every level, got codebook_size={sizes}: "
                "pass one int, or shared_codebook=False"
            )

        self.dim, self.spatial_dims, self.channel_first = dim, spatial_dims, bool(channel_first)
        self.scales = tuple(scales)
        self.level_shapes = level_shapes
        self.level_sizes = tuple(math.prod(shape) for shape in level_shapes)
        self.num_levels = num_levels
        self.codebook_sizes = sizes
        self.shared_codebook = bool(shared_codebook)
        self.sync_codebook = sync_codebook
        self.nested_dropout = float(nested_dropout)
        self.nested_dropout_min_levels = nested_dropout_min_levels
        # the mask rules (shape, dtype, lens only for 1-D maps) are the token layouts'
        kind = ("channel_first" if self.channel_first else "sequence", "image", "video")[spatial_dims - 1]
        self.mask_layout = TokenLayout(kind, dim)

        vq_kwargs: dict[str, Any] = dict(
            dim=dim,
            decay=decay,
            commitment_weight=commitment_weight,
            rotation_trick=rotation_trick,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            stochastic_sample_codes=stochastic_sample_codes,
            sample_codebook_temp=sample_codebook_temp,
            orthogonal_reg_weight=orthogonal_reg_weight,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes,
            orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
            sync_codebook=sync_codebook,
        )
        # the reference's attribute names (state_dict keys vq.* / vqs.{l}.*, phi_shared.* / phi_levels.{i}.*)
        self.vq: VectorQuantize | None = None
        self.vqs = None
        if shared_codebook:
            self.vq = VectorQuantize(codebook_size=sizes[0], **vq_kwargs)
        else:
            self.vqs = cast(
                "Sequence[VectorQuantize]",
                nn.ModuleList(VectorQuantize(codebook_size=size, **vq_kwargs) for size in sizes),
            )
        self.phi_shared: Phi | None = None
        self.phi_levels = None
        if share_quant_resi == 1:
            self.phi_shared = Phi(dim, spatial_dims, quant_resi)
        else:
            count = num_levels if share_quant_resi <= 0 else min(num_levels, share_quant_resi)
            self.phi_levels = cast(
                "Sequence[Phi]", nn.ModuleList(Phi(dim, spatial_dims, quant_resi) for _ in range(count))
            )

    # -- properties --------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """The largest level's size (every index is below it); per level: ``codebook_sizes``."""
        return max(self.codebook_sizes)

    @property
    def num_codebooks(self) -> int:
        """How many codebooks the levels use: 1 when shared, else one per level."""
        return 1 if self.shared_codebook else self.num_levels

    def book_layout(self) -> LevelBookLayout:
        """One book per level (a shared codebook is counted per level): the forward's tuple of the
        levels' maps or encode's packed ``(b, S)`` (vqcore.book_layout)."""
        return LevelBookLayout(
            (BookAxis("level", -1, self.num_levels),), self.codebook_sizes, None, self.level_sizes
        )

    # -- the levels' parts ---------------------------------------------------------------------------
    def get_vq(self, level_index: int) -> VectorQuantize:
        """The VectorQuantize of level ``level_index``."""
        if self.vq is not None:
            return self.vq
        assert self.vqs is not None  # one of the two is built
        return self.vqs[level_index]

    def choose_phi(self, level_index: int) -> Phi:
        """The ``phi`` of level ``level_index`` (see the module docstring)."""
        if self.phi_shared is not None:
            return self.phi_shared
        assert self.phi_levels is not None  # one of the two is built
        count = len(self.phi_levels)
        if count == 1:
            return self.phi_levels[0]
        position = level_index / max(self.num_levels - 1, 1)
        return self.phi_levels[round(position * (count - 1))]

    def pool_residual(
        self, t: Tensor, level_shape: Sequence[int], mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``t`` (b, dim, *spatial) averaged to ``level_shape`` -> (pooled, the level's mask (b, *level_shape)
        or None). With ``mask`` (b, *spatial) bool, the mean is over valid positions only, and a cell is
        valid when its window holds one."""
        pool: Any = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[
            self.spatial_dims - 1
        ]
        size = tuple(level_shape)
        if mask is None:
            return pool(t, size), None
        weight = mask.unsqueeze(1).to(t.dtype)
        pooled_weight = pool(weight, size)
        pooled = pool(t * weight, size) / pooled_weight.clamp(min=1e-6)
        return pooled, pooled_weight.squeeze(1) > 0

    def upsample_to_full(self, q: Tensor, full_shape: Sequence[int], level_index: int) -> Tensor:
        """A level's codes (b, dim, *level_shape) -> its contribution at ``full_shape``: interpolated
        (linear / bilinear / trilinear, ``align_corners=False``) when the shapes differ, then ``phi``."""
        full_shape = tuple(full_shape)
        if tuple(q.shape[2:]) != full_shape:
            mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
            q = F.interpolate(q, size=full_shape, mode=mode, align_corners=False)
        return self.choose_phi(level_index)(q)

    def sample_nested_cutoff(self, device: torch.device | str = "cpu") -> int | None:
        """The last level this training forward keeps (nested dropout), or None for all of them; every
        rank agrees (rank 0's seed is broadcast). Eval, ``nested_dropout=0`` and fewer levels than
        ``nested_dropout_min_levels + 1`` never drop."""
        levels, min_levels = self.num_levels, self.nested_dropout_min_levels
        if not self.training or self.nested_dropout <= 0 or levels <= 1 or min_levels >= levels:
            return None
        seed = int(torch.randint(NESTED_SEED_RANGE, ()))  # torch's generator: follows torch.manual_seed
        if should_sync(None):  # always agreed: the ranks' graphs must match whatever sync_codebook says
            seed = int(broadcast_(torch.tensor([seed], device=device), True).item())
        draw = random.Random(seed)
        if draw.random() >= self.nested_dropout:
            return None
        return draw.randrange(min_levels - 1, levels - 1)

    # -- layouts -------------------------------------------------------------------------------------
    def describe(self) -> str:
        axes = ", ".join(SPATIAL_NAMES[self.spatial_dims])
        return f"(batch, dim, {axes})" if self.channel_first else f"(batch, {axes}, dim)"

    def to_fmap(self, x: Tensor, name: str = "x") -> Tensor:
        """The input -> (b, dim, *spatial), checked."""
        check_float(x, name)
        if x.ndim != 2 + self.spatial_dims:
            raise ValueError(
                f"{name} must be {self.describe()} ({self.spatial_dims} spatial axes), "
                f"got shape {tuple(x.shape)}"
            )
        axis = 1 if self.channel_first else -1
        if x.shape[axis] != self.dim:
            raise ValueError(
                f"{name} must have {self.dim} features on its {'second' if self.channel_first else 'last'} "
                f"axis {self.describe()}, got shape {tuple(x.shape)}"
            )
        fmap = x if self.channel_first else x.movedim(-1, 1)
        if 0 in fmap.shape[2:]:  # every level's token map is pooled from these axes
            raise ValueError(
                f"{name} must have at least one position on each spatial axis {self.describe()}: every "
                f"level's token map is pooled from them, got shape {tuple(x.shape)}"
            )
        return fmap

    def from_fmap(self, fmap: Tensor) -> Tensor:
        return fmap if self.channel_first else fmap.movedim(1, -1)

    def full_mask(
        self, batch: int, spatial: tuple[int, ...], mask: Tensor | None, lens: Tensor | None
    ) -> Tensor | None:
        """``mask`` (b, *spatial) bool or ``lens`` (b,) (1-D maps) -> the (b, *spatial) mask, or None."""
        n = math.prod(spatial)
        valid = token_mask(self.mask_layout, batch, n, spatial, mask, lens)
        return None if valid is None else valid.reshape(batch, *spatial)

    # -- indices: the tuple of the levels' maps <-> one (b, S) tensor ------------------------------------
    def pack_indices(self, indices: Sequence[Tensor]) -> Tensor:
        """The levels' index maps ``(b, *scales[l])`` -> ``(b, S)``: each flattened, concatenated in level
        order (what :meth:`encode` returns)."""
        return torch.cat([level.reshape(level.shape[0], -1) for level in indices], 1)

    def unpack_indices(self, indices: Tensor) -> tuple[Tensor, ...]:
        """``(b, S)`` (the :meth:`encode` layout) -> the levels' index maps ``(b, *scales[l])``."""
        check_tensor(indices, "indices")
        total = sum(self.level_sizes)
        if indices.ndim != 2 or indices.shape[1] != total:
            raise ValueError(
                f"packed indices must be (batch, {total}): the levels' index maps {self.level_shapes} "
                f"flattened and concatenated; got shape {tuple(indices.shape)}"
            )
        parts = indices.split(self.level_sizes, dim=1)
        return tuple(p.reshape(p.shape[0], *shape) for p, shape in zip(parts, self.level_shapes))

    def level_indices(self, indices: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Packed ``(b, S)`` indices or the levels' maps -> the checked int64 maps (values in
        ``[0, codebook_sizes[l])`` or -1)."""
        if isinstance(indices, Tensor):
            levels = self.unpack_indices(indices)
        elif isinstance(indices, (tuple, list)):
            levels = tuple(indices)
            if len(levels) != self.num_levels:
                raise ValueError(
                    f"indices must hold one index map per level ({self.num_levels}), got {len(levels)}"
                )
        else:
            raise TypeError(
                "indices must be a tensor (batch, S) or a tuple of the levels' maps, "
                f"got {type(indices).__name__}"
            )
        batch = None
        for level, (level_map, shape) in enumerate(zip(levels, self.level_shapes)):
            name = f"indices[{level}]"
            check_indices(level_map, self.codebook_sizes[level], name)
            if tuple(level_map.shape[1:]) != shape or (batch is not None and level_map.shape[0] != batch):
                raise ValueError(
                    f"{name} must have shape (batch, {', '.join(map(str, shape))}) (level {level}'s scale), "
                    f"got {tuple(level_map.shape)}"
                )
            batch = level_map.shape[0]
        return tuple(level.long() for level in levels)

    # -- the residual pyramid -------------------------------------------------------------------------
    def _run_levels(
        self,
        fmap: Tensor,
        valid: Tensor | None,
        quantize: Any,
        keep_level: int | None = None,
        last_output: bool = True,
    ) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
        """fmap (b, dim, *spatial) float32 -> (the reconstruction of levels ``0..keep_level`` (all levels
        when None; None when ``last_output`` is False and only the indices are wanted), the levels'
        (b, n_l) indices, their losses). ``quantize(level, tokens (b, n_l, dim), token_valid)`` ->
        (codes (b, n_l, dim), indices (b, n_l), loss or None)."""
        b, full_shape = fmap.shape[0], tuple(fmap.shape[2:])
        keep = self.num_levels - 1 if keep_level is None else keep_level
        residual, total, kept = fmap, None, None
        indices, losses = [], []
        for level, shape in enumerate(self.level_shapes):
            pooled, level_valid = self.pool_residual(residual, shape, valid)
            tokens = pooled.flatten(2).transpose(1, 2)
            token_valid = None if level_valid is None else level_valid.reshape(b, -1)
            codes, level_indices, loss = quantize(level, tokens, token_valid)
            indices.append(level_indices)
            if loss is not None:
                losses.append(loss)
            if level == self.num_levels - 1 and not last_output:
                break
            q = codes.transpose(1, 2).reshape(b, self.dim, *shape)
            contribution = self.upsample_to_full(q, full_shape, level)
            total = contribution if total is None else total + contribution
            if level == keep:
                kept = total
            residual = residual - contribution
        return kept, indices, losses

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        indices: Any = None,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        sample_codebook_temp: float | None = None,
        return_cutoff: bool = False,
    ):
        """``x`` -> ``HierarchicalVQOutput(quantized, indices (one map per level), commit_loss)``; in
        training mode the levels' codebooks take their steps (see the module docstring)."""
        if indices is not None:
            raise ValueError(
                "HierarchicalVQ.forward does not reconstruct from indices: "
                "use get_output_from_indices(indices)"
            )
        fmap = self.to_fmap(x)
        b, full_shape = fmap.shape[0], tuple(fmap.shape[2:])
        valid = self.full_mask(b, full_shape, mask, lens)
        cutoff = self.sample_nested_cutoff(x.device)
        options = {} if sample_codebook_temp is None else dict(sample_codebook_temp=sample_codebook_temp)

        def quantize(level: int, tokens: Tensor, token_valid: Tensor | None):
            out = self.get_vq(level)(tokens, mask=token_valid, **options)
            return out.quantized, out.indices, out.loss

        with float32_region(x.device.type):
            fmap = fmap.float()
            if valid is not None:  # padding (NaN too) reaches neither values nor gradients
                fmap = torch.where(valid.unsqueeze(1), fmap, fmap.new_zeros(()))
            reconstruction, flat, losses = self._run_levels(fmap, valid, quantize, keep_level=cutoff)
            assert reconstruction is not None  # every level's output was asked for
            kept_losses = losses if cutoff is None else losses[: cutoff + 1]
            commit_loss = torch.stack(kept_losses).mean()
            if valid is not None:
                reconstruction = torch.where(valid.unsqueeze(1), reconstruction, reconstruction.new_zeros(()))
        quantized = self.from_fmap(reconstruction).to(x.dtype)
        level_maps = tuple(i.reshape(b, *shape) for i, shape in zip(flat, self.level_shapes))
        if return_cutoff:
            return HierarchicalVQOutputWithCutoff(quantized, level_maps, commit_loss, cutoff)
        return HierarchicalVQOutput(quantized, level_maps, commit_loss)

    # -- inference paths (export-safe) ----------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> packed int64 indices ``(b, S)`` (see the module docstring); no training state is touched."""
        fmap = self.to_fmap(x)

        def quantize(level: int, tokens: Tensor, token_valid: Tensor | None):
            vq = self.get_vq(level)
            level_indices = vq.encode(tokens)
            return vq.decode(level_indices), level_indices, None

        with float32_region(x.device.type):
            _, flat, _ = self._run_levels(fmap.float(), None, quantize, last_output=False)
        return torch.cat(flat, 1)

    def get_output_from_indices(
        self, indices: Tensor | Sequence[Tensor], full_shape: int | Sequence[int] | None = None
    ) -> Tensor:
        """The levels' index maps (a tuple, as the forward returns them) or packed ``(b, S)`` indices ->
        the reconstruction at ``full_shape`` (default: the last level's shape), in the input layout; -1
        contributes nothing (see the module docstring)."""
        levels = self.level_indices(indices)
        if full_shape is None:
            shape = self.level_shapes[-1]
        else:
            shape = level_shape_of(full_shape, self.spatial_dims, "full_shape")
        total = None
        with float32_region(levels[0].device.type):
            for level, level_map in enumerate(levels):
                b = level_map.shape[0]
                codes = self.get_vq(level).decode(level_map.reshape(b, -1))  # -1 -> zero codes
                q = codes.transpose(1, 2).reshape(b, self.dim, *self.level_shapes[level])
                contribution = self.upsample_to_full(q, shape, level)
                contribution = contribution.masked_fill(self.dropped_positions(level_map, shape), 0.0)
                total = contribution if total is None else total + contribution
        assert total is not None  # at least one level
        return self.from_fmap(total)

    def decode(self, indices: Tensor | Sequence[Tensor]) -> Tensor:
        """Packed ``(b, S)`` indices (what :meth:`encode` returns; or the levels' maps) -> the
        reconstruction at the last level's shape; -1 contributes nothing."""
        return self.get_output_from_indices(indices)

    def dropped_positions(self, level_map: Tensor, full_shape: Sequence[int]) -> Tensor:
        """(b, 1, *full_shape) bool: the positions whose nearest cell of ``level_map`` (b, *level_shape)
        is -1 (cell ``p * n_level // n_full`` on each axis, whose pooling window always holds ``p``)."""
        dropped = level_map < 0
        for axis, (n_level, n_full) in enumerate(zip(level_map.shape[1:], full_shape)):
            if n_level != n_full:
                cells = torch.arange(n_full, device=level_map.device) * n_level // n_full
                dropped = dropped.index_select(axis + 1, cells)
        return dropped.unsqueeze(1)

    # -- export ------------------------------------------------------------------------------------
    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters embedded in exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        meta: dict[str, Any] = {
            "level_shapes": [list(shape) for shape in self.level_shapes],
            "codebook_sizes": list(self.codebook_sizes),
            "packed_indices": "the levels' index maps flattened row-major, in level order: (batch, S)",
            "channel_first": self.channel_first,
        }
        if self.channel_first or self.spatial_dims == 1:
            meta["layout"] = self.mask_layout.kind
        return meta

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, level_shapes={self.level_shapes}, codebook_sizes={self.codebook_sizes}, "
            f"shared_codebook={self.shared_codebook}, channel_first={self.channel_first}"
        )


# -- reference converter -------------------------------------------------------------------------------

# The VectorQuantize options the reference's HierarchicalVQ fixes for its levels (a reference module whose
# levels differ was edited after construction: it does not convert).
FIXED_LEVEL_OPTIONS = dict(
    eps=1e-5,
    use_cosine_sim=False,
    ema_update=True,
    learnable_codebook=False,
    freeze_codebook=False,
    return_zeros_for_masked_padding=True,
)
LEVEL_OPTIONS = (
    "decay",
    "commitment_weight",
    "rotation_trick",
    "kmeans_init",
    "kmeans_iters",
    "threshold_ema_dead_code",
    "stochastic_sample_codes",
    "sample_codebook_temp",
    "orthogonal_reg_weight",
    "orthogonal_reg_max_codes",
    "orthogonal_reg_active_codes_only",
    "sync_codebook",
)


class HierarchicalVQConverter:
    """Reference ``HierarchicalVQ`` -> vqcore ``HierarchicalVQ``, a
    :class:`vqcore.protocols.ReferenceConverter`: the options from the module's attributes and its levels'
    (read as :mod:`vqcore.plugins.reference_vq` reads a VectorQuantize), the state key by key (the same
    keys in both)."""

    quantizer = "HierarchicalVQ"

    def kwargs(self, ref: Any, allow_training_differences: bool = False) -> dict[str, Any]:
        shared = ref.vq is not None
        levels = [ref.vq] if shared else list(ref.vqs)
        options = layer_kwargs(levels[0], allow_training_differences)
        fixed = [f"{k}={options[k]!r}" for k, v in FIXED_LEVEL_OPTIONS.items() if options[k] != v]
        if fixed:
            raise ValueError(
                f"vqcore.compat: reference HierarchicalVQ levels use options its constructor never sets: "
                f"{', '.join(fixed)}"
            )
        options["kmeans_init"] = not all(
            bool(v.get_submodule("_codebook").get_buffer("initted")) for v in levels
        )
        spatial_dims = int(ref.spatial_dims)
        if ref.phi_shared is not None:
            phis, share_quant_resi = [ref.phi_shared], 1
        else:
            phis = list(ref.phi_levels)
            share_quant_resi = len(phis) if len(phis) > 1 else 2  # one conv in a list: any k > 1 builds it
        return dict(
            dim=int(ref.dim),
            codebook_size=[int(s) for s in ref.codebook_sizes],
            scales=[list(shape) for shape in ref.level_shapes],
            shared_codebook=shared,
            channel_first=bool(ref.channel_first),
            quant_resi=float(phis[0].resi_ratio),
            share_quant_resi=share_quant_resi,
            nested_dropout=float(ref.nested_dropout),
            nested_dropout_min_levels=int(ref.nested_dropout_min_levels),
            accept_image_fmap=spatial_dims == 2,
            accept_3d_fmap=spatial_dims == 3,
            **{k: options[k] for k in LEVEL_OPTIONS},
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        own = module.state_dict()
        out: dict[str, Tensor] = {}
        for key in own:
            if key.endswith("._codebook.initted"):
                prefix = key[: -len("initted")]
                map_codebook(own, ref_state_dict, prefix, prefix, out)
            elif ".conv." in key:
                out[key] = ref_state_dict[key]
        return out


@hookimpl
def register_quantizers(register):
    register(
        "hierarchical_vq",
        HierarchicalVQ,
        aliases=("HierarchicalVQ",),
        summary="multi-scale residual VQ of feature maps (VAR): pooled levels, phi convs, nested dropout",
    )


@hookimpl
def register_converters(register):
    register(
        "HierarchicalVQ",
        HierarchicalVQConverter,
        summary="shared or per-level codebooks, phi convs, nested dropout, 1-D / image / video maps",
    )
