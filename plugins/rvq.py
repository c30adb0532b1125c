"""ResidualVQ: x (b, n, d) -> quantized (b, n, d), indices (b, n, Q), losses (Q,); GroupedResidualVQ.

Residual vector quantization (SoundStream, arXiv 2107.03312): ``r_0 = project_in(x)``, layer ``q``
quantizes ``r_q`` and ``r_{q+1} = r_q - sg(q_q)``; the output is ``project_out(Σ_q q_q)``. Every layer is
a :class:`~vqcore.plugins.vq.VectorQuantize` in codebook space (the layers never project), so all of its
keyword arguments (decay, k-means, dead-code expiry, cosine, rotation trick, stochastic sampling, ...)
are forwarded. RQ-VAE's shared codebook (arXiv 2203.01941), quantize dropout with Encodec's structured
``multiple_of`` variant, and grouped residual VQ (HiFi-Codec, arXiv 2305.02765) are built in.

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- ``shared_codebook=True`` holds ONE codebook: the EMA step runs once per training step on the residuals
  and indices of all (kept) layers together (the reference decays Q times), dead codes expire once, and
  the state_dict holds the codebook once (``_shared_codebook.*``);
- ``accept_image_fmap`` / ``accept_3d_fmap`` work (broken in the reference): indices ``(b, h, w, Q)``;
- decode accepts indices with fewer than Q trailing entries (coarse codes): missing layers count as
  dropped, whether or not quantize dropout is on; -1 decodes to a zero contribution, and a token whose
  layers are all -1 (masked) decodes to zero, also after ``project_out``;
- the losses are ``(Q,)`` (``(G, Q)`` grouped), fresh zeros in eval; no ``indices=`` cross-entropy path.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from vqcore.blocks.distributed import should_sync
from vqcore.blocks.estimators import rotation_trick as rotation_trick_estimator
from vqcore.blocks.estimators import straight_through
from vqcore.blocks.layout import TokenLayout
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.residual import kept_layers
from vqcore.blocks.validation import check_indices, check_positive_int, check_tensor
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.plugins.vq import VectorQuantize, resolve_ema_update
from vqcore.protocols import DROPPED_INDEX, ResidualVQOutput, ResidualVQOutputWithCodes


def _layer_sizes(codebook_size, num_quantizers) -> tuple[int, ...]:
    if codebook_size is None:
        raise TypeError("codebook_size is required (an int, or one int per layer)")
    if isinstance(codebook_size, (list, tuple)):
        sizes = tuple(codebook_size)
        if not sizes:
            raise ValueError("codebook_size must not be an empty sequence")
        for s in sizes:
            check_positive_int(s, "codebook_size entries")
        if num_quantizers is not None and num_quantizers != len(sizes):
            raise ValueError(
                f"codebook_size has {len(sizes)} per-layer sizes {sizes} "
                f"but num_quantizers is {num_quantizers}"
            )
        return sizes
    check_positive_int(codebook_size, "codebook_size")
    if num_quantizers is None:
        raise TypeError("num_quantizers is required when codebook_size is a single int")
    check_positive_int(num_quantizers, "num_quantizers")
    return (codebook_size,) * num_quantizers


class ResidualVQ(QuantizerModule):
    """x (b, n, d) -> quantized (b, n, d), indices (b, n, Q) int64, losses (Q,) — see the module docstring.

    Layouts as :class:`VectorQuantize`: ``(b, n, dim)`` / ``(b, dim)``, ``(b, dim, n)`` with
    ``channel_last=False``, ``(b, dim, h, w)`` with ``accept_image_fmap``, ``(b, dim, t, h, w)`` with
    ``accept_3d_fmap``; the indices keep the positions and gain a trailing Q axis.
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size: int | tuple[int, ...] | list[int] | None = None,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        channel_last: bool = True,
        **vq_kwargs,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        sizes = _layer_sizes(codebook_size, num_quantizers)
        q = len(sizes)
        if vq_kwargs.pop("heads", 1) != 1:
            raise ValueError("ResidualVQ layers have one head; heads must be 1")
        vq_kwargs.pop("separate_codebook_per_head", None)
        codebook_dim = dim if codebook_dim is None else codebook_dim
        check_positive_int(codebook_dim, "codebook_dim")
        if shared_codebook and len(set(sizes)) > 1:
            raise ValueError(f"shared_codebook needs one codebook size for every layer, got {sizes}")
        check_positive_int(quantize_dropout_cutoff_index, "quantize_dropout_cutoff_index", minimum=0)
        if quantize_dropout_cutoff_index >= q:
            raise ValueError(
                f"quantize_dropout_cutoff_index must be in [0, {q}) (num_quantizers={q}), "
                f"got {quantize_dropout_cutoff_index}"
            )
        check_positive_int(quantize_dropout_multiple_of, "quantize_dropout_multiple_of")

        self.dim, self.codebook_dim, self.num_quantizers = dim, codebook_dim, q
        self.codebook_sizes = sizes
        self.shared_codebook = shared_codebook
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.sync_codebook = vq_kwargs.get("sync_codebook")
        self.layout = TokenLayout.from_flags(
            dim, accept_image_fmap=accept_image_fmap, accept_3d_fmap=accept_3d_fmap, channel_last=channel_last
        )
        self.has_projections = codebook_dim != dim
        self.project_in, self.project_out = projection_pair(dim, codebook_dim, enabled=self.has_projections)
        self.ema_update = resolve_ema_update(
            vq_kwargs.pop("ema_update", None),
            vq_kwargs.get("learnable_codebook", False),
            vq_kwargs.get("use_cosine_sim", False),
        )
        self.return_zeros_for_masked_padding = vq_kwargs.pop("return_zeros_for_masked_padding", True)
        self.layers = nn.ModuleList(
            VectorQuantize(codebook_dim, size, ema_update=self.ema_update, **vq_kwargs) for size in sizes
        )
        for layer in self.layers:  # the shared codebook takes one step per batch, here (_shared_ema_step)
            layer.steps_codebook = not shared_codebook
        if shared_codebook:
            # one codebook object, registered once (here): the layers reference it without owning it, so
            # the state_dict holds each tensor once and .to()/.half() move it once
            self._shared_codebook = self.layers[0]._codebook
            for layer in self.layers:
                del layer._modules["_codebook"]
                object.__setattr__(layer, "_codebook", self._shared_codebook)

    # -- properties --------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """The largest layer's size (every index is below it); per layer: ``codebook_sizes``."""
        return max(self.codebook_sizes)

    @property
    def num_codebooks(self) -> int:
        return self.num_quantizers

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(Q, K, codebook_dim), or a tuple of (K_q, codebook_dim) when the sizes differ."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if len(set(self.codebook_sizes)) == 1 else books

    # -- shared pieces of every path -------------------------------------------------------------------

    def _encode_tokens(self, z: Tensor, with_total: bool = False):
        """Codebook-space tokens (b, n, cd) float32 -> indices (b, n, Q): greedy nearest code per residual.

        ``with_total``: also the sum of the chosen codes, added in layer order exactly as
        :meth:`_decode_tokens` adds them (so ``project_out(total)`` is bit for bit the decode of indices
        without -1), which saves eval the second lookup of every code.
        """
        b, n = z.shape[0], z.shape[1]
        residual, indices, total = z, [], None
        for layer in self.layers:
            book = layer._codebook
            idx = book.nearest(layer._to_codebook_space(residual))
            indices.append(idx.reshape(b, n))
            code = book.lookup(idx).reshape(b, n, -1)
            residual = residual - code
            if with_total:
                total = code if total is None else total + code
        indices = torch.stack(indices, -1)
        return (indices, total) if with_total else indices

    def _layer_codes(self, indices: Tensor) -> list[Tensor]:
        """(b, n, Q) indices, -1 allowed -> Q codebook-space tensors (b, n, cd); -1 gives zeros."""
        b, n = indices.shape[0], indices.shape[1]
        codes = []
        for q, layer in enumerate(self.layers):
            idx = indices[..., q]
            code = layer._codebook.lookup(idx.clamp(min=0).reshape(1, -1)).reshape(b, n, -1)
            codes.append(code.masked_fill((idx < 0).unsqueeze(-1), 0.0))
        return codes

    def _decode_tokens(self, indices: Tensor) -> Tensor:
        """(b, n, Q) indices -> (b, n, dim); the one decode path of eval forward and ``decode``."""
        codes = self._layer_codes(indices)
        total = codes[0]
        for code in codes[1:]:
            total = total + code
        out = project_from(self.project_out, total)
        return out.masked_fill((indices < 0).all(-1).unsqueeze(-1), 0.0)

    def _index_tokens(self, indices: Tensor, name: str = "indices") -> tuple[Tensor, tuple]:
        """Indices (b, *positions, q) with q <= Q -> checked tokens (b, n, Q) (missing layers: -1)."""
        check_tensor(indices, name)
        tokens, spatial = self.layout.indices_to_tokens(indices, 1, name)
        tokens = self._pad_layers(tokens, name)
        return tokens, spatial

    def _pad_layers(self, tokens: Tensor, name: str = "indices") -> Tensor:
        given, q = tokens.shape[-1], self.num_quantizers
        if given > q or given < 1:
            raise ValueError(
                f"{name} must end with a quantizer axis of 1..{q} entries (num_quantizers={q}), "
                f"got shape {tuple(tokens.shape)}"
            )
        if len(set(self.codebook_sizes)) == 1:
            check_indices(tokens, self.codebook_sizes[0], name)
        else:
            for i in range(given):
                check_indices(tokens[..., i], self.codebook_sizes[i], f"{name}[..., {i}]")
        tokens = tokens.long()
        if given < q:  # coarse codes: the missing (finer) layers count as dropped
            pad = tokens.new_full((*tokens.shape[:-1], q - given), DROPPED_INDEX)
            tokens = torch.cat((tokens, pad), -1)
        return tokens

    # -- inference paths (export-safe) --------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices (b, *positions, Q) int64; no training state is touched."""
        tokens, spatial = self.layout.to_tokens(x)
        return self.layout.indices_from_tokens(
            self._encode_tokens(project_into(self.project_in, tokens)), spatial
        )

    def decode(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q), q <= Q, -1 allowed -> quantized in the input layout
        (after project_out).
        """
        tokens, spatial = self._index_tokens(indices)
        return self.layout.from_tokens(self._decode_tokens(tokens), spatial)

    get_output_from_indices = decode

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, *positions, q) -> per-layer codes (Q, b, *positions, codebook_dim), before project_out;
        -1 and missing layers give zero vectors (channel-last for every layout)."""
        tokens, spatial = self._index_tokens(indices)
        codes = torch.stack(self._layer_codes(tokens))
        return codes.reshape(codes.shape[0], codes.shape[1], *spatial, codes.shape[-1])

    # -- forward -----------------------------------------------------------------------------------
    def draw_kept_layers(self, seed: int | None = None, device=None) -> int:
        """How many leading layers run this training step (quantize dropout), synced over ranks."""
        rng = None if seed is None else random.Random(seed)
        return kept_layers(
            self.num_quantizers,
            cutoff_index=self.quantize_dropout_cutoff_index,
            multiple_of=self.quantize_dropout_multiple_of,
            rng=rng,
            sync=should_sync(self.sync_codebook),
            device=device or "cpu",
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        accum_ema_update: bool = False,
    ):
        """``accum_ema_update``: only accumulate this batch's EMA statistics (every codebook); the next call
        without it takes one step from all of them, as for one large batch (gradient accumulation)."""
        tokens, spatial = self.layout.to_tokens(x)
        b = tokens.shape[0]
        valid = None if mask is None else self.layout.mask_to_tokens(mask, b, spatial)
        kept = self.num_quantizers
        if self.training and self.quantize_dropout:
            kept = self.draw_kept_layers(rand_quantize_dropout_fixed_seed, x.device)
        out, indices, losses, codes = self._forward_tokens(
            tokens, valid, kept, return_all_codes, sample_codebook_temp, freeze_codebook, accum_ema_update
        )
        quantized = self.layout.from_tokens(out.to(x.dtype), spatial)
        indices = self.layout.indices_from_tokens(indices, spatial)
        if not return_all_codes:
            return ResidualVQOutput(quantized, indices, losses)
        codes = codes.reshape(codes.shape[0], b, *spatial, codes.shape[-1])
        return ResidualVQOutputWithCodes(quantized, indices, losses, codes)

    def _forward_tokens(self, tokens, valid, kept, want_codes, temperature, freeze, accumulate=False):
        """tokens (b, n, dim) -> (out (b, n, dim), indices (b, n, Q), losses (Q,),
        codes (Q, b, n, cd) or None).
        """
        raw = tokens
        if (
            valid is not None
        ):  # padding may hold anything (NaN too); it must reach neither values nor gradients
            tokens = torch.where(valid.unsqueeze(-1), tokens, tokens.new_zeros(()))
        z = project_into(self.project_in, tokens)
        if not self.training:
            if valid is None:  # no -1 anywhere: the decode of the indices is project_out(sum of the codes)
                indices, total = self._encode_tokens(z, with_total=True)
                out = project_from(self.project_out, total)
            else:
                indices = self._encode_tokens(z).masked_fill(~valid.unsqueeze(-1), DROPPED_INDEX)
                out = self._decode_tokens(indices)
            codes = torch.stack(self._layer_codes(indices)) if want_codes else None
            result = out, indices, z.new_zeros(self.num_quantizers), codes
        else:
            result = self._train_tokens(z, valid, kept, want_codes, temperature, freeze, accumulate)
        if valid is not None and not self.return_zeros_for_masked_padding:  # padding passes through unchanged
            result = (torch.where(valid.unsqueeze(-1), result[0], raw.to(result[0].dtype)), *result[1:])
        return result

    def _train_tokens(self, z, valid, kept, want_codes, temperature, freeze, accumulate=False):
        """Training step over the kept layers. Each layer's code choice, losses, k-means and (own-codebook)
        EMA step are the layer's own ``VectorQuantize._train_step``; the estimator is applied here."""
        b, n = z.shape[0], z.shape[1]
        first = self.layers[0]
        # with the straight-through estimator and no normalisation, the sum of the layer outputs of a detached
        # chain is sum(codes) + kept * (z - sg(z)): the same values and gradient, without Q estimator graphs
        fused = not (first.rotation_trick or first.use_cosine_sim)
        estimator = rotation_trick_estimator if first.rotation_trick else straight_through
        book_valid = None if valid is None else valid.reshape(1, -1)
        residual, total = z, None
        indices, losses, codes, seen = [], [], [], []
        for q, layer in enumerate(self.layers):
            if q >= kept:  # quantize dropout: index -1, zero loss, zero code
                indices.append(z.new_full((b, n), DROPPED_INDEX, dtype=torch.long))
                losses.append(z.new_zeros(()))
                if want_codes:
                    codes.append(z.new_zeros(b, n, self.codebook_dim))
                continue
            zq = layer._to_codebook_space(residual)  # (1, b*n, cd); l2-normalised for cosine codebooks
            idx, code, commitment, orthogonal = layer._train_step(
                zq, book_valid, temperature, freeze, accumulate=accumulate
            )
            if self.shared_codebook:
                seen.append((zq.detach(), idx))
            if book_valid is not None:
                idx = idx.masked_fill(~book_valid, DROPPED_INDEX)
            code = code.reshape(b, n, -1)
            if valid is not None:  # padding: no code, residual unchanged
                code = code.masked_fill(~valid.unsqueeze(-1), 0.0)
            out = (
                code
                if fused or not zq.requires_grad
                else estimator(zq, code.reshape(zq.shape)).reshape(b, n, -1)
            )
            total = out if total is None else total + out
            residual = residual - code
            indices.append(idx.reshape(b, n))
            losses.append(layer.commitment_weight * commitment + layer.orthogonal_reg_weight * orthogonal)
            if want_codes:
                codes.append(out)
        if self.shared_codebook:
            self._shared_ema_step(seen, book_valid, freeze, accumulate)
        if fused and z.requires_grad:
            total = total + min(kept, self.num_quantizers) * (z - z.detach())
            if want_codes:  # each layer's output carries the straight-through gradient of its residual
                codes = [c + (z - z.detach()) if q < kept else c for q, c in enumerate(codes)]
        out = project_from(self.project_out, total)
        if valid is not None:
            out = torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))
        return out, torch.stack(indices, -1), torch.stack(losses), torch.stack(codes) if want_codes else None

    @torch.no_grad()
    def _shared_ema_step(self, seen, valid, freeze, accumulate=False) -> None:
        """One EMA step (decay applied once) and one expiry pass over every kept layer's residuals."""
        frozen = self.layers[0].freeze_codebook if freeze is None else freeze
        book = self._shared_codebook
        if frozen or not (self.ema_update or book.threshold_ema_dead_code > 0):
            return
        z = torch.cat([zq for zq, _ in seen], 1)  # (1, kept * b * n, cd)
        idx = torch.cat([i for _, i in seen], 1)
        ok = None if valid is None else valid.repeat(1, len(seen))
        book.train_step_(
            z, idx, ok, sync=should_sync(self.sync_codebook), ema=self.ema_update, accumulate=accumulate
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_sizes={self.codebook_sizes}, "
            f"codebook_dim={self.codebook_dim}, shared_codebook={self.shared_codebook}, "
            f"layout={self.layout.kind}"
        )


class GroupedResidualVQ(QuantizerModule):
    """x (b, n, d) -> quantized (b, n, d), indices (groups, b, n, Q), losses (groups, Q).

    The feature axis is split into ``groups`` equal chunks, each quantized by an independent
    :class:`ResidualVQ` (``dim // groups`` features, every other keyword argument forwarded). Quantize
    dropout is drawn once per step for all groups. ``return_all_codes`` adds a tuple (one entry per
    group, as the reference) of ``(Q, b, *positions, codebook_dim)`` codes.
    """

    def __init__(
        self,
        dim: int,
        groups: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        channel_last: bool = True,
        **rvq_kwargs,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(groups, "groups")
        if dim % groups:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.groups = dim, groups
        self.layout = TokenLayout.from_flags(
            dim, accept_image_fmap=accept_image_fmap, accept_3d_fmap=accept_3d_fmap, channel_last=channel_last
        )
        self.rvqs = nn.ModuleList(ResidualVQ(dim // groups, **rvq_kwargs) for _ in range(groups))

    @property
    def codebook_size(self) -> int:
        return self.rvqs[0].codebook_size

    @property
    def num_quantizers(self) -> int:
        return self.rvqs[0].num_quantizers

    @property
    def num_codebooks(self) -> int:
        return self.groups * self.num_quantizers

    @property
    def codebooks(self):
        """(groups, Q, K, codebook_dim), or a tuple per group when the layer sizes differ."""
        books = tuple(rvq.codebooks for rvq in self.rvqs)
        return torch.stack(books) if isinstance(books[0], Tensor) else books

    def _chunks(self, tokens: Tensor) -> tuple[Tensor, ...]:
        return tokens.chunk(self.groups, dim=-1)

    def encode(self, x: Tensor) -> Tensor:
        """x -> indices (groups, b, *positions, Q) int64."""
        tokens, spatial = self.layout.to_tokens(x)
        per_group = [
            rvq._encode_tokens(project_into(rvq.project_in, t))
            for rvq, t in zip(self.rvqs, self._chunks(tokens))
        ]
        return torch.stack([self.layout.indices_from_tokens(i, spatial) for i in per_group])

    def _index_tokens(self, indices: Tensor) -> tuple[list[Tensor], tuple]:
        check_tensor(indices, "indices")
        if indices.ndim < 1 or indices.shape[0] != self.groups:
            raise ValueError(
                f"indices must have the groups axis first with {self.groups} entries "
                f"(groups, batch, *positions, quantizers), got shape {tuple(indices.shape)}"
            )
        tokens = []
        for g, rvq in enumerate(self.rvqs):
            t, spatial = self.layout.indices_to_tokens(indices[g], 1, f"indices[{g}]")
            tokens.append(rvq._pad_layers(t, f"indices[{g}]"))
        return tokens, spatial

    def decode(self, indices: Tensor) -> Tensor:
        """indices (groups, b, *positions, q), q <= Q -> quantized in the input layout."""
        tokens, spatial = self._index_tokens(indices)
        out = torch.cat([rvq._decode_tokens(t) for rvq, t in zip(self.rvqs, tokens)], -1)
        return self.layout.from_tokens(out, spatial)

    get_output_from_indices = decode

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (groups, b, *positions, q) -> codes (groups, Q, b, *positions, codebook_dim)."""
        tokens, spatial = self._index_tokens(indices)
        codes = [torch.stack(rvq._layer_codes(t)) for rvq, t in zip(self.rvqs, tokens)]
        return torch.stack([c.reshape(c.shape[0], c.shape[1], *spatial, c.shape[-1]) for c in codes])

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        accum_ema_update: bool = False,
    ):
        """``accum_ema_update``: only accumulate this batch's EMA statistics (every codebook); the next call
        without it takes one step from all of them, as for one large batch (gradient accumulation)."""
        tokens, spatial = self.layout.to_tokens(x)
        b = tokens.shape[0]
        valid = None if mask is None else self.layout.mask_to_tokens(mask, b, spatial)
        first = self.rvqs[0]
        kept = first.num_quantizers
        if self.training and first.quantize_dropout:  # one draw for every group
            kept = first.draw_kept_layers(rand_quantize_dropout_fixed_seed, x.device)
        outs, indices, losses, codes = [], [], [], []
        for rvq, chunk in zip(self.rvqs, self._chunks(tokens)):
            out, idx, loss, code = rvq._forward_tokens(
                chunk, valid, kept, return_all_codes, sample_codebook_temp, freeze_codebook, accum_ema_update
            )
            outs.append(out)
            indices.append(self.layout.indices_from_tokens(idx, spatial))
            losses.append(loss)
            if return_all_codes:
                codes.append(code.reshape(code.shape[0], b, *spatial, code.shape[-1]))
        quantized = self.layout.from_tokens(torch.cat(outs, -1).to(x.dtype), spatial)
        result = (quantized, torch.stack(indices), torch.stack(losses))
        if return_all_codes:
            return ResidualVQOutputWithCodes(*result, tuple(codes))
        return ResidualVQOutput(*result)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, layout={self.layout.kind}"


@hookimpl
def register_quantizers(register):
    register(
        "rvq",
        ResidualVQ,
        aliases=("residual_vq", "ResidualVQ"),
        summary="residual VQ: shared codebook, quantize dropout, image fmaps, coarse decoding",
    )
    register(
        "grouped_rvq",
        GroupedResidualVQ,
        aliases=("grouped_residual_vq", "GroupedResidualVQ"),
        summary="grouped residual VQ: the feature dim split into independent residual stacks",
    )
