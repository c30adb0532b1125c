"""VectorQuantize: x (b, n, d) -> quantized (b, n, d), indices (b, n), loss ().

An EMA-trained codebook (VQ-VAE, arXiv 1711.00937; VQ-VAE-2) with the tricks of the seed feature list:
codebook_dim projections and cosine similarity (improved VQGAN, https://openreview.net/forum?id=pfNyExj7z2),
k-means init and dead-code expiry (SoundStream, arXiv 2107.03312), orthogonal regularisation
(arXiv 2112.00384), heads, image/video fmaps, Gumbel sampling (RQ-VAE, arXiv 2203.01941), masks and the
rotation trick (arXiv 2410.06424). ``learnable_codebook=True`` trains the codes by gradient instead:
the commitment term ``mean ||z - q||^2`` then reaches the codes too (VQ-VAE's codebook loss), without
EMA steps; dead-code expiry keeps working from usage counts.

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- the straight-through estimator is the default; ``rotation_trick=True`` opts in;
- ``codebook_dim`` defaults to ``dim // heads`` (no projection to ``heads * dim``), so ``dim`` must be
  divisible by ``heads`` unless ``codebook_dim`` is given;
- k-means runs only in training-mode forwards and is seeded by k-means++; before it runs, the codebook
  holds random codes (never zeros), and empty k-means clusters keep a data point, never a zero vector;
- the orthogonal loss is computed on the codebook that quantized this batch (before the EMA step);
- masks work with projections, heads and cosine similarity (the commitment loss is taken in
  codebook space over valid tokens), image/video masks are shaped like the indices, and padding
  (even NaN) reaches neither the outputs nor any gradient;
- the eval loss is a fresh zero, and tokens with non-finite values never reach the EMA statistics
  (a batch without any valid token leaves the codebook as it was);
- ``.half()`` / ``.to(bfloat16)`` cast the projections only; the codebook state stays float32;
- ``sync_codebook=None`` is decided at every call, not at construction;
- dead-code expiry also works without EMA (``ema_update=False``, learnable codebooks): usage counts are
  still tracked; a learnable codebook with cosine similarity is refused (the reference's is broken, #197).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from vqcore.blocks.codebooks import EMACodebook
from vqcore.blocks.distributed import should_sync
from vqcore.blocks.estimators import rotation_trick as rotation_trick_estimator
from vqcore.blocks.estimators import straight_through
from vqcore.blocks.layout import TokenLayout
from vqcore.blocks.losses import commitment_loss, orthogonal_loss
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.validation import check_indices, check_positive_int, check_tensor
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import DROPPED_INDEX, VQLossBreakdown, VQOutput, VQOutputWithBreakdown


def resolve_ema_update(ema_update: bool | None, learnable_codebook: bool, use_cosine_sim: bool) -> bool:
    """``ema_update`` defaults to ``not learnable_codebook``; a codebook is trained by EMA or by gradient."""
    if learnable_codebook and ema_update:
        raise ValueError(
            "learnable_codebook=True trains the codebook by gradient (the commitment term is its codebook "
            "loss); it cannot also take EMA steps: leave ema_update unset or pass ema_update=False"
        )
    if learnable_codebook and use_cosine_sim:
        raise ValueError(
            "learnable_codebook=True is not supported with use_cosine_sim=True (gradient steps would move "
            "the codes off the unit sphere the cosine search assumes); use the EMA codebook"
        )
    return not learnable_codebook if ema_update is None else bool(ema_update)


class VectorQuantize(QuantizerModule):
    """x (b, n, d) -> quantized (b, n, d), indices (b, n) int64, loss () — see the module docstring.

    Layouts: ``(b, n, dim)`` (or ``(b, dim)``, one token), ``(b, dim, n)`` with ``channel_last=False``,
    ``(b, dim, h, w)`` with ``accept_image_fmap``, ``(b, dim, t, h, w)`` with ``accept_3d_fmap``.
    With ``heads > 1`` the indices gain a trailing ``heads`` axis.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        rotation_trick: bool = False,
        sync_codebook: bool | None = None,
        ema_update: bool | None = None,
        learnable_codebook: bool = False,
        return_zeros_for_masked_padding: bool = True,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(codebook_size, "codebook_size")
        check_positive_int(heads, "heads")
        if codebook_dim is None:
            if dim % heads:
                raise ValueError(
                    f"dim ({dim}) must be divisible by heads ({heads}) when codebook_dim is not given"
                )
            codebook_dim = dim // heads
        check_positive_int(codebook_dim, "codebook_dim")
        if commitment_weight < 0 or orthogonal_reg_weight < 0:
            raise ValueError("commitment_weight and orthogonal_reg_weight must be >= 0")
        if sample_codebook_temp < 0:
            raise ValueError(f"sample_codebook_temp must be >= 0, got {sample_codebook_temp}")
        separate = separate_codebook_per_head and heads > 1
        if orthogonal_reg_active_codes_only and separate:
            raise ValueError(
                "orthogonal_reg_active_codes_only is not supported with separate_codebook_per_head"
            )
        if orthogonal_reg_max_codes is not None:
            check_positive_int(orthogonal_reg_max_codes, "orthogonal_reg_max_codes")
        ema_update = resolve_ema_update(ema_update, learnable_codebook, use_cosine_sim)

        self.dim, self.heads, self.codebook_dim = dim, heads, codebook_dim
        self.separate_codebook_per_head = separate
        self.use_cosine_sim = use_cosine_sim
        self.freeze_codebook = freeze_codebook
        self.sync_kmeans, self.sync_codebook = sync_kmeans, sync_codebook
        self.commitment_weight = float(commitment_weight)
        self.orthogonal_reg_weight = float(orthogonal_reg_weight)
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = float(sample_codebook_temp)
        self.rotation_trick = rotation_trick
        self.ema_update, self.learnable_codebook = ema_update, learnable_codebook
        # False for the layers of a shared-codebook ResidualVQ, which takes one step for all of them
        self.steps_codebook = True
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.layout = TokenLayout.from_flags(
            dim, accept_image_fmap=accept_image_fmap, accept_3d_fmap=accept_3d_fmap, channel_last=channel_last
        )

        inner = codebook_dim * heads
        self.has_projections = inner != dim
        self.project_in, self.project_out = projection_pair(dim, inner)
        self.norm_in = nn.LayerNorm(inner) if layernorm_after_project_in else nn.Identity()
        self._codebook = EMACodebook(
            codebook_size,
            codebook_dim,
            books=heads if separate else 1,
            cosine=use_cosine_sim,
            decay=decay,
            eps=eps,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            learnable=learnable_codebook or orthogonal_reg_weight > 0,
        )

    # -- properties --------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self._codebook.size

    @property
    def num_codebooks(self) -> int:
        return self._codebook.books

    @property
    def codebook(self) -> Tensor:
        """Codes (K, codebook_dim), or (heads, K, codebook_dim) with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        expected = tuple(self.codebook.shape)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codebook must have shape {expected}, got {tuple(codes.shape)}")
        book = self._codebook
        with torch.no_grad():
            book.embed.copy_(codes.reshape(book.embed.shape))
            book.embed_avg.copy_(book.embed * book.cluster_size.unsqueeze(-1))
            book.initted.fill_(True)

    # -- head bookkeeping: (b, n, heads * cd) <-> codebook books (B, N, cd) ---------------------------
    def _split_heads(self, z: Tensor) -> Tensor:
        h, cd = self.heads, self.codebook_dim
        if self.separate_codebook_per_head:
            return z.reshape(-1, h, cd).transpose(0, 1)
        return z.reshape(1, -1, cd)

    def _merge_heads(self, q: Tensor, b, n) -> Tensor:
        if self.separate_codebook_per_head:
            q = q.transpose(0, 1)
        return q.reshape(b, n, self.heads * self.codebook_dim)

    def _token_indices(self, indices: Tensor, b, n) -> Tensor:
        """Book indices (B, N) -> (b, n) or (b, n, heads)."""
        if self.separate_codebook_per_head:
            indices = indices.transpose(0, 1)
        return indices.reshape(b, n, self.heads) if self.heads > 1 else indices.reshape(b, n)

    def _book_indices(self, indices: Tensor) -> Tensor:
        """(b, n[, heads]) -> book indices (B, N)."""
        flat = indices.reshape(-1, self.heads)
        return flat.transpose(0, 1) if self.separate_codebook_per_head else flat.reshape(1, -1)

    def _book_mask(self, valid: Tensor) -> Tensor:
        """Token mask (b, n) -> book mask (B, N)."""
        flat = valid.reshape(-1, 1).expand(-1, self.heads)
        return flat.transpose(0, 1) if self.separate_codebook_per_head else flat.reshape(1, -1)

    def _to_codebook_space(self, tokens: Tensor) -> Tensor:
        z = project_into(self.project_in, tokens)
        if isinstance(
            self.norm_in, nn.LayerNorm
        ):  # in float32 like the quantization, whatever the module's dtype
            norm = self.norm_in
            z = nn.functional.layer_norm(
                z, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
            )
        z = self._split_heads(z)
        return nn.functional.normalize(z, dim=-1, eps=1e-12) if self.use_cosine_sim else z

    def _output(self, q: Tensor, b, n) -> Tensor:
        q = self._merge_heads(q, b, n)
        return project_from(self.project_out, q)

    def _decode_books(self, indices: Tensor, b, n) -> Tensor:
        """Book indices (B, N), -1 allowed -> output tokens (b, n, dim); -1 tokens decode to zero."""
        dropped = indices < 0
        q = self._codebook.lookup(indices.clamp(min=0)).masked_fill(dropped.unsqueeze(-1), 0.0)
        out = self._output(q, b, n)
        token_dropped = self._token_indices(dropped, b, n)
        if self.heads > 1:
            token_dropped = token_dropped.all(-1)
        return out.masked_fill(token_dropped.unsqueeze(-1), 0.0)

    # -- inference paths (export-safe) --------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices (int64), in the input's layout; no training state is touched."""
        tokens, spatial = self.layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        indices = self._codebook.nearest(self._to_codebook_space(tokens))
        return self.layout.indices_from_tokens(self._token_indices(indices, b, n), spatial)

    def _index_tokens(self, indices: Tensor) -> tuple[Tensor, tuple]:
        """Checked indices (b, *spatial[, heads]) -> tokens (b, n[, heads]) and the spatial shape."""
        extra = 1 if self.heads > 1 else 0
        tokens, spatial = self.layout.indices_to_tokens(indices, extra)
        if extra and tokens.shape[-1] != self.heads:
            raise ValueError(
                f"indices must end with a heads axis of size {self.heads}, got shape {tuple(indices.shape)}"
            )
        check_indices(tokens, self.codebook_size)
        return tokens, spatial

    def decode(self, indices: Tensor) -> Tensor:
        """indices -> quantized vectors (after project_out), in the input layout; -1 decodes to zero."""
        tokens, spatial = self._index_tokens(indices)
        b, n = tokens.shape[0], tokens.shape[1]
        out = self._decode_books(self._book_indices(tokens.long()), b, n)
        return self.layout.from_tokens(out, spatial)

    get_output_from_indices = decode

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices -> codebook-space vectors (before project_out), heads concatenated:
        (..., heads * codebook_dim).
        """
        tokens, spatial = self._index_tokens(indices)
        b, n = tokens.shape[0], tokens.shape[1]
        books = self._book_indices(tokens.long())
        q = self._codebook.lookup(books.clamp(min=0)).masked_fill((books < 0).unsqueeze(-1), 0.0)
        return self.layout.from_tokens(self._merge_heads(q, b, n), spatial)

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        ema_update_weight: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None,
        accum_ema_update: bool = False,
    ):
        """Quantize x; in training mode also take the codebook's step (see the module docstring).

        ``ema_update_weight``: per-code scale of this step's EMA, ``(codebook_size,)`` or ``(heads,
        codebook_size)`` with separate codebooks, or a callable ``(sums (B, K, d), counts (B, K)) -> weight``;
        0 freezes a code (its vector stays exactly as it is and it never expires). ``accum_ema_update``:
        only accumulate this batch's EMA statistics; the next call without it takes one step from all of
        them (gradient accumulation).
        """
        step_weight = self._ema_weight(ema_update_weight)
        tokens, spatial = self.layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        valid = self._token_mask(mask, lens, b, n, spatial)
        book_valid = None if valid is None else self._book_mask(valid)
        if (
            valid is not None
        ):  # padding may hold anything (NaN too); it must reach neither values nor gradients
            z = self._to_codebook_space(torch.where(valid.unsqueeze(-1), tokens, tokens.new_zeros(())))
        else:
            z = self._to_codebook_space(tokens)

        zero = torch.zeros((), device=x.device)
        commitment, orthogonal = zero, zero
        if self.training:
            indices, q, commitment, orthogonal = self._train_step(
                z, book_valid, sample_codebook_temp, freeze_codebook, step_weight, accum_ema_update
            )
            estimator = rotation_trick_estimator if self.rotation_trick else straight_through
            if z.requires_grad:
                q = estimator(z, q)
            if book_valid is not None:
                indices = indices.masked_fill(~book_valid, DROPPED_INDEX)
            out = self._output(q, b, n)
        else:
            indices = self._codebook.nearest(z)
            if book_valid is not None:
                indices = indices.masked_fill(~book_valid, DROPPED_INDEX)
                out = self._decode_books(indices, b, n)
            else:  # no -1 to handle: skip decode's two masked copies (same values, ~12% faster eval)
                out = self._output(self._codebook.lookup(indices), b, n)

        if valid is not None:
            fill = (
                torch.zeros((), dtype=out.dtype, device=out.device)
                if self.return_zeros_for_masked_padding
                else tokens
            )
            out = torch.where(valid.unsqueeze(-1), out, fill)
        quantized = self.layout.from_tokens(out.to(x.dtype), spatial)
        indices = self.layout.indices_from_tokens(self._token_indices(indices, b, n), spatial)
        loss = self.commitment_weight * commitment + self.orthogonal_reg_weight * orthogonal
        if return_loss_breakdown:
            return VQOutputWithBreakdown(quantized, indices, loss, VQLossBreakdown(commitment, orthogonal))
        return VQOutput(quantized, indices, loss)

    def _ema_weight(self, weight):
        """ema_update_weight -> (books, K) float32 tensor, a callable, or None; bad shapes raise."""
        if weight is None or callable(weight):
            return weight
        check_tensor(weight, "ema_update_weight")
        book = self._codebook
        allowed = {(book.size,), (book.books, book.size)}
        if tuple(weight.shape) not in allowed:
            raise ValueError(
                f"ema_update_weight must have shape {' or '.join(str(a) for a in sorted(allowed))} "
                f"(codebook_size per codebook), got {tuple(weight.shape)}"
            )
        if not torch.isfinite(weight).all() or (weight < 0).any():
            raise ValueError("ema_update_weight must be finite and >= 0")
        return weight.float().reshape(-1, book.size).expand(book.books, book.size)

    def _train_step(
        self, z, valid, sample_codebook_temp, freeze_codebook, step_weight=None, accumulate=False
    ):
        """Training-mode quantization: k-means init, code choice, losses, then the EMA update and expiry.

        The codes returned (and the losses) come from the codebook before this step's update.
        """
        book = self._codebook
        sync = should_sync(self.sync_codebook)
        zd = z.detach()
        if book.kmeans_init and book.needs_init():
            book.init_(zd, valid, sync=sync, sync_kmeans=self.sync_kmeans)
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        if self.stochastic_sample_codes and temperature > 0:
            indices = book.sample(zd, temperature)
        else:
            indices = book.nearest(zd)
        q = book.lookup(indices)
        frozen = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        train_codes = self.learnable_codebook and not frozen  # the commitment term is the codebook loss too
        commitment = (
            commitment_loss(z, q, valid, train_codes) if self.commitment_weight > 0 else z.new_zeros(())
        )
        orthogonal = (
            self._orthogonal_loss(indices, valid) if self.orthogonal_reg_weight > 0 else z.new_zeros(())
        )
        if self.steps_codebook and not frozen:
            book.train_step_(
                zd,
                indices,
                valid,
                sync=sync,
                ema=self.ema_update,
                step_weight=step_weight,
                accumulate=accumulate,
            )
        return indices, q.detach(), commitment, orthogonal

    def _orthogonal_loss(self, indices: Tensor, valid: Tensor | None) -> Tensor:
        codes = self._codebook.embed
        if self.orthogonal_reg_active_codes_only:
            used = indices if valid is None else indices[valid]
            codes = codes[:, torch.unique(used)]
        else:
            codes = codes.clone()  # the EMA step rewrites embed in place; keep the loss's view of it
        if self.orthogonal_reg_max_codes is not None and codes.shape[1] > self.orthogonal_reg_max_codes:
            pick = torch.randperm(codes.shape[1], device=codes.device)[: self.orthogonal_reg_max_codes]
            codes = codes[:, pick]
        return orthogonal_loss(codes)

    def _token_mask(self, mask, lens, b, n, spatial) -> Tensor | None:
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        if lens is not None:
            check_tensor(lens, "lens")
            if self.layout.kind == "image" or self.layout.kind == "video" or len(spatial) != 1:
                raise ValueError("lens is for (batch, seq, dim) sequences; use mask for other layouts")
            if lens.shape != (b,) or lens.is_floating_point():
                raise ValueError(
                    f"lens must be an integer tensor of shape ({b},), got {tuple(lens.shape)} {lens.dtype}"
                )
            return torch.arange(n, device=lens.device) < lens.unsqueeze(1)
        if mask is None:
            return None
        return self.layout.mask_to_tokens(mask, b, spatial)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"heads={self.heads}, layout={self.layout.kind}"
        )


@hookimpl
def register_quantizers(register):
    register(
        "vq",
        VectorQuantize,
        aliases=("vector_quantize", "VectorQuantize"),
        summary="EMA vector quantizer: k-means init, dead-code expiry, cosine, heads, fmaps",
    )
