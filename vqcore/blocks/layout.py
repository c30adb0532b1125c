"""Shape packing: sequences, single tokens, channel-first sequences, image and video feature maps.

Every quantizer works on tokens ``(b, n, d)``; a :class:`TokenLayout` moves inputs there and back,
and moves indices between ``(b, n, *extra)`` and the input's spatial layout ``(b, *spatial, *extra)``.
Only reshapes with symbolic sizes and ``movedim`` are used, so the same code exports with dynamic
batch and spatial axes.

| kind            | input                 | tokens            | indices                 |
| --------------- | --------------------- | ----------------- | ----------------------- |
| ``sequence``    | (b, n, d) or (b, d)   | (b, n, d)         | (b, n) or (b,)          |
| ``channel_first``| (b, d, n)            | (b, n, d)         | (b, n)                  |
| ``image``       | (b, d, h, w)          | (b, h*w, d)       | (b, h, w)               |
| ``video``       | (b, d, t, h, w)       | (b, t*h*w, d)     | (b, t, h, w)            |
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vqcore.blocks.validation import check_float, check_indices, check_positive_int, check_tensor

_SPATIAL_RANK = {"sequence": 1, "channel_first": 1, "image": 2, "video": 3}
_DESCRIBE = {
    "sequence": "(batch, seq, dim) or (batch, dim)",
    "channel_first": "(batch, dim, seq)",
    "image": "(batch, dim, height, width)",
    "video": "(batch, dim, time, height, width)",
}


class TokenLayout:
    """Maps ``x`` to tokens ``(b, n, d)`` and back for one input layout."""

    def __init__(self, kind: str, dim: int):
        if kind not in _SPATIAL_RANK:
            raise ValueError(f"layout must be one of {sorted(_SPATIAL_RANK)}, got {kind!r}")
        self.kind, self.dim = kind, dim
        self.spatial_rank = _SPATIAL_RANK[kind]

    @classmethod
    def from_flags(
        cls,
        dim: int,
        *,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        channel_last: bool = True,
    ) -> TokenLayout:
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
        if (accept_image_fmap or accept_3d_fmap) and not channel_last:
            raise ValueError(
                "channel_last=False is for (batch, dim, seq) sequences; "
                "image/video fmaps are always channel-first"
            )
        kind = (
            "image"
            if accept_image_fmap
            else "video"
            if accept_3d_fmap
            else "sequence"
            if channel_last
            else "channel_first"
        )
        return cls(kind, dim)

    @property
    def channel_first(self) -> bool:
        return self.kind != "sequence"

    def describe(self) -> str:
        return _DESCRIBE[self.kind]

    # -- features ----------------------------------------------------------------------------------
    def to_tokens(self, x: Tensor, name: str = "x") -> tuple[Tensor, tuple]:
        """``x -> (tokens (b, n, d), spatial)``; ``spatial`` restores the layout later."""
        check_float(x, name)
        ranks = (2 + self.spatial_rank,) + ((2,) if self.kind == "sequence" else ())
        if x.ndim not in ranks:
            raise ValueError(f"{name} must be {self.describe()} for this module, got shape {tuple(x.shape)}")
        feature_axis = -1 if self.kind == "sequence" else 1
        if x.shape[feature_axis] != self.dim:
            where = "last" if feature_axis == -1 else "second (channel-first)"
            raise ValueError(
                f"{name} must have {self.dim} features on its {where} axis ({self.describe()}), "
                f"got shape {tuple(x.shape)}"
            )
        if self.kind == "sequence":
            if x.ndim == 2:
                return x.unsqueeze(1), ()
            return x, (x.shape[1],)
        spatial = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), spatial

    def from_tokens(self, tokens: Tensor, spatial: tuple) -> Tensor:
        """Inverse of :meth:`to_tokens` for ``tokens (b, n, d')``."""
        if self.kind == "sequence":
            return tokens.squeeze(1) if len(spatial) == 0 else tokens
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *spatial)

    # -- indices and masks -------------------------------------------------------------------------
    def indices_from_tokens(self, indices: Tensor, spatial: tuple) -> Tensor:
        """``(b, n, *extra) -> (b, *spatial, *extra)``."""
        return indices.reshape(indices.shape[0], *spatial, *indices.shape[2:])

    def indices_to_tokens(
        self, indices: Tensor, extra_dims: int, name: str = "indices"
    ) -> tuple[Tensor, tuple]:
        """``(b, *spatial, *extra) -> ((b, n, *extra), spatial)`` with ``extra_dims`` trailing axes."""
        check_tensor(indices, name)
        ranks = (1 + self.spatial_rank + extra_dims,) + ((1 + extra_dims,) if self.kind == "sequence" else ())
        if indices.ndim not in ranks:
            extra = " + (heads,)" if extra_dims else ""
            spatial_desc = self.describe().replace("dim, ", "").replace(", dim", "")
            raise ValueError(
                f"{name} must have {' or '.join(map(str, ranks))} dims ({spatial_desc}{extra}), "
                f"got shape {tuple(indices.shape)}"
            )
        spatial = tuple(indices.shape[1 : indices.ndim - extra_dims])
        tail = tuple(indices.shape[indices.ndim - extra_dims :])
        return indices.reshape(indices.shape[0], math.prod(spatial), *tail), spatial

    def mask_to_tokens(self, mask: Tensor, batch: int, spatial: tuple) -> Tensor:
        """A bool mask shaped like the indices without extra axes ``(b, *spatial)`` -> ``(b, n)``."""
        check_tensor(mask, "mask")
        expected = (batch, *spatial)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected} (batch, *positions), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        return mask.reshape(batch, math.prod(spatial))


def auto_layout(ndim: int, dim: int, channel_first: bool | None = None, name: str = "x") -> TokenLayout:
    """Layout of an input of rank ``ndim`` for modules that detect it (FSQ, LFQ, latent quantization).

    4-D is an image ``(b, d, h, w)`` and 5-D a video ``(b, d, t, h, w)`` (always channel-first);
    3-D is a sequence ``(b, n, d)``, or ``(b, d, n)`` when ``channel_first`` is True; 2-D is ``(b, d)``.
    """
    if ndim == 4:
        return TokenLayout("image", dim)
    if ndim == 5:
        return TokenLayout("video", dim)
    if ndim in (2, 3):
        return TokenLayout("channel_first" if channel_first and ndim == 3 else "sequence", dim)
    raise ValueError(
        f"{name} must be (batch, seq, dim), (batch, dim), (batch, dim, height, width) or "
        f"(batch, dim, time, height, width); got {ndim} dims"
    )


def auto_index_layout(
    ndim: int, extra_dims: int, dim: int, channel_first: bool | None = None, name: str = "indices"
) -> TokenLayout:
    """The :func:`auto_layout` of the input that gave indices of rank ``ndim`` with ``extra_dims``
    trailing axes.
    """
    spatial = ndim - 1 - extra_dims
    if spatial == 2:
        return TokenLayout("image", dim)
    if spatial == 3:
        return TokenLayout("video", dim)
    if spatial in (0, 1):
        return TokenLayout("channel_first" if channel_first and spatial == 1 else "sequence", dim)
    extra = f" + {extra_dims} trailing axes" if extra_dims else ""
    raise ValueError(
        f"{name} must be (batch,), (batch, seq), (batch, height, width) or "
        f"(batch, time, height, width){extra}; "
        f"got shape with {ndim} dims"
    )


def index_tokens(
    indices: Tensor,
    *,
    dim: int,
    channel_first: bool | None,
    size: int,
    trailing: int | None,
    axis: str = "codebook",
    at_most: bool = False,
    allow_dropped: bool = True,
) -> tuple[Tensor, tuple, TokenLayout]:
    """Checked int64 indices ``(b, *positions[, trailing])`` -> ``(tokens (b, n, t), spatial, layout)``.

    ``trailing`` is the size of the last axis (codebooks, quantizers), or None when the indices have no
    such axis (the tokens then get one of size 1). ``at_most``: the axis may be shorter (coarse residual
    indices). Values must be in ``[0, size)``, or -1 where ``allow_dropped``.
    """
    check_tensor(indices, "indices")
    extra = 0 if trailing is None else 1
    layout = auto_index_layout(indices.ndim, extra, dim, channel_first)
    tokens, spatial = layout.indices_to_tokens(indices, extra)
    if trailing is not None and (tokens.shape[-1] > trailing if at_most else tokens.shape[-1] != trailing):
        bound = "<= " if at_most else ""
        raise ValueError(
            f"indices must end with a {axis} axis of size {bound}{trailing}, got shape {tuple(indices.shape)}"
        )
    check_indices(tokens, size, allow_dropped=allow_dropped)
    if not extra:
        tokens = tokens.unsqueeze(-1)
    return tokens.long(), spatial, layout


def token_mask(
    layout: TokenLayout,
    batch: int,
    n: int,
    spatial: tuple,
    mask: Tensor | None = None,
    lens: Tensor | None = None,
    *,
    per_sample: bool = False,
) -> Tensor | None:
    """The (batch, n) bool mask of the tokens that count, or None when all do.

    ``mask``: bool, shaped like the indices without trailing axes ``(batch, *positions)`` (True = keep),
    or ``(batch,)`` where ``per_sample``; ``lens``: int ``(batch,)`` lengths of (batch, seq, dim) sequences.
    """
    if mask is not None and lens is not None:
        raise ValueError("pass either mask or lens, not both")
    if lens is not None:
        check_tensor(lens, "lens")
        if layout.kind in ("image", "video") or len(spatial) != 1:
            raise ValueError("lens is for (batch, seq, dim) sequences; use mask for other layouts")
        if lens.shape != (batch,) or lens.is_floating_point():
            raise ValueError(
                f"lens must be an integer tensor of shape ({batch},), got {tuple(lens.shape)} {lens.dtype}"
            )
        return torch.arange(n, device=lens.device) < lens.unsqueeze(1)
    if mask is None:
        return None
    if per_sample and isinstance(mask, Tensor) and mask.ndim == 1:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.shape[0] != batch:
            raise ValueError(f"a per-sample mask must have shape ({batch},), got {tuple(mask.shape)}")
        return mask.unsqueeze(1).expand(batch, n)
    return layout.mask_to_tokens(mask, batch, spatial)


class CodebookAxis:
    """The codebook groups of the scalar quantizers (FSQ, LFQ, latent quantization): ``num_codebooks``
    groups of ``codebook_dim`` features, each quantized on its own.

    Features ``(..., C * d) <-> (..., C, d)`` (:meth:`split`); indices ``(..., C)`` keep their trailing
    codebook axis only with ``keep`` (default ``C > 1``; ``keep=False`` needs ``C == 1``), see
    :meth:`indices_out`; :attr:`trailing` is that axis for :func:`index_tokens`.
    """

    def __init__(self, num_codebooks: int, codebook_dim: int, keep: bool | None = None):
        check_positive_int(num_codebooks, "num_codebooks")
        check_positive_int(codebook_dim, "codebook_dim")
        if keep is None:
            keep = num_codebooks > 1
        if num_codebooks > 1 and not keep:
            raise ValueError(
                f"keep_num_codebooks_dim=False needs num_codebooks == 1, got num_codebooks={num_codebooks}"
            )
        self.num_codebooks, self.codebook_dim, self.keep = num_codebooks, codebook_dim, bool(keep)

    @property
    def trailing(self) -> int | None:
        return self.num_codebooks if self.keep else None

    def split(self, z: Tensor) -> Tensor:
        """``(..., C * d) -> (..., C, d)``."""
        return z.reshape(*z.shape[:-1], self.num_codebooks, self.codebook_dim)

    def indices_out(self, indices: Tensor) -> Tensor:
        """``(..., C)`` -> ``(..., C)``, or ``(...)`` without the codebook axis."""
        return indices if self.keep else indices.squeeze(-1)

    def __repr__(self) -> str:
        return (
            f"CodebookAxis(num_codebooks={self.num_codebooks}, codebook_dim={self.codebook_dim}, "
            f"keep={self.keep})"
        )


def zero_padding(tokens: Tensor, valid: Tensor | None) -> Tensor:
    """Tokens (b, n, d) with the positions outside ``valid`` (b, n) set to zero: padding may hold anything
    (NaN too), and must reach neither values nor gradients."""
    if valid is None:
        return tokens
    return torch.where(valid.unsqueeze(-1), tokens, tokens.new_zeros(()))
