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
  still tracked; a learnable codebook with cosine similarity is refused (the reference's is broken: its
  issue #197);
- ``learnable_codebook=True`` alone turns EMA off (the reference asserts unless ``ema_update=False`` is
  passed too); the defaults are otherwise the reference's (``vq_bridge`` / ``directional_reparam``: learnable,
  no EMA);
- ``vq_bridge``: the bridged codes are computed once per forward; ``decode``, ``get_codes_from_indices``,
  ``codebook`` and the orthogonal loss use them too (the reference's ``get_codes_from_indices`` and
  ``codebook`` give the raw codes); ``vqcore.save`` needs JSON arguments, so a quantizer with a bridge (or an
  in-place optimizer factory) is kept as a state_dict (the bridge's weights are ``_codebook.vq_bridge.*``);
- ``affine_param``: the statistics change only in training-mode forwards (the reference also updates the
  batch statistics in eval, so its eval changes state); until the first training step the transform is the
  identity; dead codes are replaced by inverse-transformed batch vectors (the reference writes the raw
  vectors into the untransformed codebook); with ``vq_bridge`` too, the codebook statistics are those of the
  bridged codes (the transform's input; the reference's are of the raw codes);
- ``manual_ema_update``: training steps accumulate this batch's EMA statistics (the ``accum_ema_update``
  machinery) and ``update_ema()`` takes ONE EMA step from all of them, as for their concatenated batches
  (the reference decays at every forward and only defers recomputing the codes); dead codes still expire
  at every step; pending statistics are not saved;
- forward ``ema_update=False``: only the usage counts (for dead-code expiry) take the step (the reference
  also folds the batch's sums into ``embed_avg`` without recomputing the codes);
- ``update_indices`` ignores -1 indices (the reference counts them as code 0 unless masked) and, like
  ``expire_codes_``, acts in either mode (the reference's expiry acts in training mode only);
- ``in_place_codebook_optimizer``: its step runs inside ``quantize_books``, so ResidualVQ layers take it
  too, and the usage counts come from the codes chosen after the step (the reference counts the first
  choice); refused with a codebook object (ResidualVQ's ``shared_codebook=True``: the reference never steps
  it there); its loss is not added to the returned loss (as the reference), only reported.
- ``codebook_diversity_loss_weight``: the mean code distribution is taken per codebook over all valid
  tokens (the reference averages over the batch axis only, per sequence position, so with batch 1 it is
  the per-token entropy), masked tokens excluded, with the exact entropy (no 1e-5 clamp); tokens x codes
  blocks are chunked (recomputed in the backward pass) instead of one block;
- ``forward(x, indices=...)`` changes no state (the reference takes an EMA step and runs k-means on the
  side) and returns ``quantized`` (of the nearest codes, never sampled) in the input's layout after
  ``project_out`` (the reference's is in codebook space, heads unmerged); masked tokens are ignored in
  the cross-entropy; an all-ignored batch gives 0, not NaN;
- ``topk``: the candidates are always the k nearest codes (no Gumbel sampling), k-means runs only in
  training; with ``commitment_weight=0`` the per-candidate loss is the unweighted MSE in training too (the
  reference's is a scalar 0 there);
- ``codebook_transform_fn`` is refused with shared-codebook heads (``heads > 1`` without
  ``separate_codebook_per_head``), and in training with ``codebook_diversity_loss_weight`` or
  ``commitment_use_cross_entropy_loss`` (those terms use the codebook's own codes); the codes are the
  nearest (no Gumbel sampling);
- with a gradient-trained codebook and ``freeze_codebook``, no gradient reaches the codes through the
  output (DiVeQ, ``route_gradients_to_input=False``), as through the losses.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vqcore.blocks.codebooks import StepWeight, build_codebook, codes_held
from vqcore.blocks.distance import is_tie, l2norm, nearest_k
from vqcore.blocks.distributed import all_reduce_mean_, should_sync
from vqcore.blocks.estimators import GumbelStraightThrough, directional_reparam, resolve_estimator
from vqcore.blocks.layout import TokenLayout, token_mask, zero_padding
from vqcore.blocks.losses import (
    CodebookDiversityLoss,
    CommitmentLoss,
    CrossEntropyCommitmentLoss,
    LossSpec,
    OrthogonalLoss,
    WeightedLosses,
    code_cross_entropy,
    extra_loss_pairs,
    masked_mse,
    orthogonal_error,
)
from vqcore.blocks.precision import float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.validation import check_indices, check_positive_int, check_tensor
from vqcore.book_layout import BookLayout
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import DROPPED_INDEX, Codebook, Estimator


class _VQLossTerms(NamedTuple):
    commitment: Tensor
    codebook_diversity: Tensor
    orthogonal_reg: Tensor
    inplace_optimize: Tensor


class VQLossBreakdown(_VQLossTerms):
    """Unweighted terms of a VectorQuantize loss (0-dim tensors; ``commitment`` is per token and candidate
    with ``topk``): unpacks as vector-quantize-pytorch's ``LossBreakdown(commitment, codebook_diversity,
    orthogonal_reg, inplace_optimize)``. ``extra``: the terms of ``extra_losses`` by name, each also
    readable as an attribute (``breakdown.<name>``); :meth:`of` builds one with them."""

    @classmethod
    def of(
        cls,
        commitment: Tensor,
        codebook_diversity: Tensor,
        orthogonal_reg: Tensor,
        inplace_optimize: Tensor,
        extra: dict[str, Tensor] | None = None,
    ) -> VQLossBreakdown:
        """The breakdown of the four terms and the ``extra`` ones."""
        out = cls(commitment, codebook_diversity, orthogonal_reg, inplace_optimize)
        out.__dict__["extra"] = dict(extra or {})
        return out

    def _replace(self, /, **changes: Any) -> VQLossBreakdown:
        extra = changes.pop("extra", self.extra)
        return self.of(*super()._replace(**changes), extra=extra)

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the extra terms
        extra = self.__dict__.get("extra", {})
        if name == "extra":  # built by the tuple constructor (``_make``): no extra terms
            return extra
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no term {name!r} (extra terms: {sorted(extra)})")

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, extra={self.extra!r})"


LossBreakdown = VQLossBreakdown  # vector-quantize-pytorch's name


class VQOutput(NamedTuple):
    """``quantized`` has the input's shape and dtype; ``indices`` int64; ``loss`` 0-dim."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class VQOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: VQLossBreakdown


class VQCrossEntropyOutput(NamedTuple):
    """``forward(x, indices=...)``: ``quantized`` as in :class:`VQOutput`; ``loss`` 0-dim, the cross-entropy
    of the given indices under the distance logits."""

    quantized: Tensor
    loss: Tensor


class BookStep(NamedTuple):
    """One training-mode quantization of codebook-space books (:meth:`VectorQuantize.quantize_books`).

    ``indices`` (B, N); ``codes`` (B, N, codebook_dim) the chosen codes before the codebook's step,
    detached; ``loss`` 0-dim, weighted; ``terms``: every unweighted term (0-dim) by name.
    """

    indices: Tensor
    codes: Tensor
    loss: Tensor
    terms: dict[str, Tensor]


# The keyword arguments of VectorQuantize that configure the built-in codebooks (``codebook=None``);
# their defaults are the constructor's (see _codebook_option_defaults).
CODEBOOK_OPTIONS = (
    "decay",
    "eps",
    "kmeans_init",
    "kmeans_iters",
    "sync_kmeans",
    "threshold_ema_dead_code",
    "use_cosine_sim",
    "ema_update",
    "learnable_codebook",
    "manual_ema_update",
    "vq_bridge",
    "affine_param",
    "sync_affine_param",
    "affine_param_batch_decay",
    "affine_param_codebook_decay",
)

# the in-place optimizer's loss in the loss terms (the reference's LossBreakdown field)
INPLACE_OPTIMIZE = "inplace_optimize"


def resolve_codebook_training(
    learnable_codebook: bool | None,
    ema_update: bool | None,
    use_cosine_sim: bool,
    *,
    vq_bridge: nn.Module | None = None,
    directional_reparam: bool = False,
) -> tuple[bool, bool]:
    """``(learnable_codebook, ema_update)``: a codebook is trained by EMA or by gradient.

    ``learnable_codebook`` defaults to ``directional_reparam or vq_bridge is not None``, ``ema_update`` to
    ``not learnable_codebook``."""
    if learnable_codebook is None:
        learnable_codebook = directional_reparam or vq_bridge is not None
    learnable = bool(learnable_codebook)
    if vq_bridge is not None and (ema_update or not learnable):
        return learnable, bool(ema_update)  # the codebook's own check names vq_bridge and the option
    if learnable and ema_update:
        raise ConfigurationError(
            "learnable_codebook=True trains the codebook by gradient (the commitment term is its codebook "
            "loss); it cannot also take EMA steps: leave ema_update unset or pass ema_update=False"
        )
    if learnable and use_cosine_sim:
        raise ConfigurationError(
            "learnable_codebook=True is not supported with use_cosine_sim=True (gradient steps would move "
            "the codes off the unit sphere the cosine search assumes); use the EMA codebook"
        )
    return learnable, not learnable if ema_update is None else bool(ema_update)


def codebook_from_options(
    codebook: str | Codebook | None,
    codebook_kwargs: dict[str, Any] | None,
    *,
    size: int,
    dim: int,
    books: int,
    parameter: bool = False,
    directional_reparam: bool = False,
    **options: Any,
) -> Codebook:
    """The codebook that VectorQuantize's arguments ask for.

    ``codebook=None``: a registered built-in chosen by the seed ``options`` (:data:`CODEBOOK_OPTIONS`):
    ``learnable`` (``learnable_codebook``), ``cosine`` (``use_cosine_sim``) or ``euclidean``, whose codes
    are an ``nn.Parameter`` when ``parameter`` (for the orthogonal loss); ``directional_reparam`` makes the
    codes learnable by default (see :func:`resolve_codebook_training`). Otherwise a registered name
    (built with ``codebook_kwargs``) or a :class:`~vqcore.protocols.Codebook` object; the seed options
    must then be left at their defaults (they configure the built-in codebooks only).
    """
    defaults = _codebook_option_defaults()
    options = {**defaults, **options}
    if codebook is not None:
        given = [k for k, v in options.items() if v != defaults[k]]
        if given:
            raise ConfigurationError(
                f"{', '.join(given)} configure the built-in codebooks (codebook=None); with "
                f"codebook={codebook!r} pass the codebook's own options in codebook_kwargs"
            )
        return build_codebook(codebook, size=size, dim=dim, books=books, **(codebook_kwargs or {}))
    if codebook_kwargs:
        raise ConfigurationError(
            "codebook_kwargs are the options of a codebook given by name: pass codebook=<name> too"
        )
    bridge = options["vq_bridge"]
    learnable, ema = resolve_codebook_training(
        options["learnable_codebook"],
        options["ema_update"],
        options["use_cosine_sim"],
        vq_bridge=bridge,
        directional_reparam=directional_reparam,
    )
    kwargs = {k: options[k] for k in ("decay", "eps", "kmeans_init", "kmeans_iters", "sync_kmeans")}
    kwargs["threshold_ema_dead_code"] = options["threshold_ema_dead_code"]
    if options["sync_affine_param"] and not options["affine_param"]:
        raise ConfigurationError(
            "sync_affine_param=True all-reduces the statistics of affine_param: pass affine_param=True too"
        )
    kwargs.update(
        manual_ema=options["manual_ema_update"],
        vq_bridge=bridge,
        affine=options["affine_param"],
        affine_batch_decay=options["affine_param_batch_decay"],
        affine_codebook_decay=options["affine_param_codebook_decay"],
        sync_affine=options["sync_affine_param"],
    )
    if learnable:
        name = "learnable"
        kwargs["ema"] = ema  # False, but for a vq_bridge with ema_update=True, which the codebook refuses
    else:
        name = "cosine" if options["use_cosine_sim"] else "euclidean"
        kwargs.update(ema=ema, learnable=parameter)
    return build_codebook(name, size=size, dim=dim, books=books, **kwargs)


def _check_estimator_options(
    *,
    directional_reparam: bool,
    directional_reparam_variance: float,
    threshold_ema_dead_code: float,
    rotation_trick: bool,
    straight_through: bool,
    estimator: object,
    sync_update_v: float,
) -> None:
    """The constructor's checks of DiVeQ (``directional_reparam``) and ``sync_update_v``."""
    if directional_reparam:
        others = [
            name
            for name, given in (
                ("rotation_trick=True", rotation_trick),
                ("straight_through=True", straight_through),
                (f"estimator={estimator!r}", estimator is not None),
            )
            if given
        ]
        if others:
            raise ConfigurationError(
                f"directional_reparam=True is the gradient path itself; it excludes {', '.join(others)}: "
                "pass one of them"
            )
        if not threshold_ema_dead_code > 0:
            raise ConfigurationError(
                "directional_reparam=True needs dead-code expiry to revive unused codes: set "
                f"threshold_ema_dead_code > 0, got threshold_ema_dead_code={threshold_ema_dead_code}"
            )
        if not directional_reparam_variance >= 0:
            raise ConfigurationError(
                f"directional_reparam_variance must be >= 0, got {directional_reparam_variance}"
            )
    if not 0 <= sync_update_v <= 1:
        raise ConfigurationError(f"sync_update_v must be between 0 and 1, got {sync_update_v}")


@functools.cache
def _codebook_option_defaults() -> dict[str, Any]:
    """The defaults of :data:`CODEBOOK_OPTIONS`, read from VectorQuantize's signature (their one home)."""
    parameters = inspect.signature(VectorQuantize.__init__).parameters
    return {name: parameters[name].default for name in CODEBOOK_OPTIONS}


class VectorQuantize(QuantizerModule):
    """x (b, n, d) -> quantized (b, n, d), indices (b, n) int64, loss () — see the module docstring.

    Layouts: ``(b, n, dim)`` (or ``(b, dim)``, one token), ``(b, dim, n)`` with ``channel_last=False``,
    ``(b, dim, h, w)`` with ``accept_image_fmap``, ``(b, dim, t, h, w)`` with ``accept_3d_fmap``.
    With ``heads > 1`` the indices gain a trailing ``heads`` axis.

    Parts (extension points, each a registered name or an object):

    - ``codebook``: a :class:`~vqcore.protocols.Codebook` (default: the EMA ``euclidean`` / ``cosine`` or
      the gradient-trained ``learnable`` codebook, configured by the seed arguments); ``codebook_kwargs``
      are the options of a codebook given by name. :attr:`codebook_module` is the codebook object.
    - ``estimator``: the gradient estimator (default ``straight_through``; ``rotation_trick=True`` and
      ``straight_through=True`` (Gumbel straight-through) select the others). ``directional_reparam=True``
      (DiVeQ) takes its place; it is not a registered :class:`~vqcore.protocols.Estimator`, whose value
      must be the code exactly (DiVeQ's is moved by noise).
    - ``extra_losses``: ``{"name": weight}`` or ``[(name or Loss, weight), ...]``, added to the loss and
      reported in the breakdown's ``extra``.
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
        straight_through: bool = False,
        rotation_trick: bool = False,
        sync_codebook: bool | None = None,
        ema_update: bool | None = None,
        learnable_codebook: bool | None = None,
        return_zeros_for_masked_padding: bool = True,
        commitment_use_cross_entropy_loss: bool = False,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        route_gradients_to_input: bool = True,
        sync_update_v: float = 0.0,
        vq_bridge: nn.Module | None = None,
        manual_ema_update: bool = False,
        in_place_codebook_optimizer: Any = None,
        manual_in_place_optimizer_update: bool = False,
        affine_param: bool = False,
        sync_affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        codebook: str | Codebook | None = None,
        codebook_kwargs: dict[str, Any] | None = None,
        estimator: str | Estimator | None = None,
        extra_losses: LossSpec = None,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(codebook_size, "codebook_size")
        check_positive_int(heads, "heads")
        if codebook_dim is None:
            if dim % heads:
                raise ConfigurationError(
                    f"dim ({dim}) must be divisible by heads ({heads}) when codebook_dim is not given"
                )
            codebook_dim = dim // heads
        check_positive_int(codebook_dim, "codebook_dim")
        if commitment_weight < 0 or orthogonal_reg_weight < 0:
            raise ConfigurationError("commitment_weight and orthogonal_reg_weight must be >= 0")
        if sample_codebook_temp < 0:
            raise ConfigurationError(f"sample_codebook_temp must be >= 0, got {sample_codebook_temp}")
        separate = separate_codebook_per_head and heads > 1
        if orthogonal_reg_active_codes_only and separate:
            raise ConfigurationError(
                "orthogonal_reg_active_codes_only is not supported with separate_codebook_per_head"
            )
        if orthogonal_reg_max_codes is not None:
            check_positive_int(orthogonal_reg_max_codes, "orthogonal_reg_max_codes")
        _check_estimator_options(
            directional_reparam=directional_reparam,
            directional_reparam_variance=directional_reparam_variance,
            # a codebook object (a residual stack's shared one) carries its own dead-code threshold
            threshold_ema_dead_code=getattr(codebook, "threshold_ema_dead_code", threshold_ema_dead_code),
            rotation_trick=rotation_trick,
            straight_through=straight_through,
            estimator=estimator,
            sync_update_v=sync_update_v,
        )
        if codebook_diversity_loss_weight < 0:
            raise ConfigurationError(
                f"codebook_diversity_loss_weight must be >= 0, got {codebook_diversity_loss_weight}"
            )
        if codebook_diversity_loss_weight > 0 and not codebook_diversity_temperature > 0:
            raise ConfigurationError(
                "codebook_diversity_loss_weight > 0 needs codebook_diversity_temperature > 0, "
                f"got {codebook_diversity_temperature}"
            )

        self.dim, self.heads, self.codebook_dim = dim, heads, codebook_dim
        self.separate_codebook_per_head = separate
        self.freeze_codebook = freeze_codebook
        self.sync_codebook = sync_codebook
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = float(sample_codebook_temp)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.layout = TokenLayout.from_flags(
            dim, accept_image_fmap=accept_image_fmap, accept_3d_fmap=accept_3d_fmap, channel_last=channel_last
        )
        inner = codebook_dim * heads
        self.has_projections = inner != dim
        self.project_in, self.project_out = projection_pair(dim, inner)
        self.norm_in = nn.LayerNorm(inner) if layernorm_after_project_in else nn.Identity()
        # registered as ``_codebook``: vector-quantize-pytorch's state_dict keys (``_codebook.embed``, ...)
        self._codebook = codebook_from_options(
            codebook,
            codebook_kwargs,
            size=codebook_size,
            dim=codebook_dim,
            books=heads if separate else 1,
            parameter=orthogonal_reg_weight > 0,
            decay=decay,
            eps=eps,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            sync_kmeans=sync_kmeans,
            threshold_ema_dead_code=threshold_ema_dead_code,
            use_cosine_sim=use_cosine_sim,
            ema_update=ema_update,
            learnable_codebook=learnable_codebook,
            manual_ema_update=manual_ema_update,
            vq_bridge=vq_bridge,
            affine_param=affine_param,
            sync_affine_param=sync_affine_param,
            affine_param_batch_decay=affine_param_batch_decay,
            affine_param_codebook_decay=affine_param_codebook_decay,
            directional_reparam=directional_reparam,
        )
        self.in_place_codebook_optimizer = self._in_place_optimizer(
            in_place_codebook_optimizer, manual_in_place_optimizer_update, codebook
        )
        self.manual_in_place_optimizer_update = bool(manual_in_place_optimizer_update)
        if sync_update_v > 0 and not self._codebook.trained_by_gradient:
            raise ConfigurationError(
                f"sync_update_v={sync_update_v} scales the codebook's gradient through the output: it needs "
                "a codebook trained by gradient (learnable_codebook=True), got learnable_codebook=False"
            )
        self.estimator = self._estimator(estimator, rotation_trick, straight_through)
        self.directional_reparam = bool(directional_reparam)
        self.directional_reparam_variance = float(directional_reparam_variance)
        self.route_gradients_to_input = bool(route_gradients_to_input)
        self.sync_update_v = float(sync_update_v)
        self.commitment_weight = float(commitment_weight)
        self.orthogonal_reg_weight = float(orthogonal_reg_weight)
        self.codebook_diversity_loss_weight = float(codebook_diversity_loss_weight)
        self.commitment_use_cross_entropy_loss = bool(commitment_use_cross_entropy_loss)
        # DiVeQ learns the codes through the output: no commitment term
        self.has_commitment_loss = commitment_weight > 0 and not directional_reparam
        commitment: CommitmentLoss | CrossEntropyCommitmentLoss = (
            CrossEntropyCommitmentLoss()
            if commitment_use_cross_entropy_loss
            else CommitmentLoss(train_codes=self._codebook.trained_by_gradient)
        )
        self.commitment_loss_name = commitment.name
        own = [
            (commitment, commitment_weight if self.has_commitment_loss else 0.0),
            (CodebookDiversityLoss(float(codebook_diversity_temperature)), codebook_diversity_loss_weight),
            (
                OrthogonalLoss(orthogonal_reg_active_codes_only, orthogonal_reg_max_codes),
                orthogonal_reg_weight,
            ),
        ]
        reserved = [loss.name for loss, _ in own]
        self.losses = WeightedLosses([*own, *extra_loss_pairs(extra_losses, reserved=reserved)])

    def _estimator(
        self, estimator: str | Estimator | None, rotation_trick: bool, straight_through: bool
    ) -> Estimator:
        if estimator is not None:
            if rotation_trick or straight_through:
                raise ConfigurationError(
                    "pass either estimator or rotation_trick / straight_through, not both"
                )
            return resolve_estimator(estimator)
        if rotation_trick and straight_through:
            raise ConfigurationError(
                "rotation_trick and straight_through (Gumbel straight-through) exclude each other"
            )
        if rotation_trick:
            return resolve_estimator("rotation_trick")
        if straight_through and self.sample_codebook_temp > 0:
            return GumbelStraightThrough(temperature=self.sample_codebook_temp)
        return resolve_estimator("straight_through")

    # -- properties --------------------------------------------------------------------------------
    @property
    def ema_update(self) -> bool:
        """Whether training steps move the codes by EMA (False for codebooks trained by gradient and for
        codebooks that are not EMA codebooks)."""
        return bool(getattr(self._codebook, "ema", False))

    @property
    def codebook_module(self) -> Codebook:
        """The :class:`~vqcore.protocols.Codebook` object: its ``parameters()`` are the trainable
        codebook parameters (for the built-ins, ``codes`` is the ``(books, K, codebook_dim)`` tensor whose
        ``.grad`` a gradient-trained codebook fills)."""
        return self._codebook

    def codebook_parameters(self) -> Iterator[nn.Parameter]:
        """The codebook's trainable parameters (the codes of a learnable codebook, the ``vq_bridge``)."""
        book = self._codebook
        return book.parameters() if isinstance(book, nn.Module) else iter(())

    @property
    def codebook_size(self) -> int:
        return self._codebook.size

    @property
    def num_codebooks(self) -> int:
        return self._codebook.books

    def book_layout(self) -> BookLayout:
        """The books of the indices: one, or a trailing axis of ``heads`` (a shared codebook is counted
        per head)."""
        return BookLayout.trailing("head", self.heads, self.codebook_size)

    @property
    def use_cosine_sim(self) -> bool:
        return bool(self._codebook.cosine)

    @property
    def codebook(self) -> Tensor:
        """Codes (K, codebook_dim), or (heads, K, codebook_dim) with separate codebooks per head."""
        codes = self._codebook.codes
        return codes if self.separate_codebook_per_head else codes[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        expected = tuple(self.codebook.shape)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codebook must have shape {expected}, got {tuple(codes.shape)}")
        set_codes = getattr(self._codebook, "set_codes_", None)
        if set_codes is None:
            raise TypeError(
                f"{type(self._codebook).__name__} does not support assigning its codes (set_codes_)"
            )
        set_codes(codes.reshape(self._codebook.codes.shape))

    # -- books: (b, n, heads * cd) <-> codebook books (B, N, cd) --------------------------------------
    def to_books(self, tokens: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Features (b, n, dim) -> codebook space (B, N, codebook_dim) in ``dtype`` (float32): ``project_in``,
        the LayerNorm (``layernorm_after_project_in``, in ``dtype``), heads split into books (B = heads with
        separate codebooks, else 1 book of b * n * heads tokens), l2-normalised for cosine codebooks."""
        z = project_into(self.project_in, tokens, dtype)
        if isinstance(self.norm_in, nn.LayerNorm):  # in dtype like the quantization, whatever the module's
            norm = self.norm_in
            weight, bias = norm.weight.to(dtype), norm.bias.to(dtype)
            z = nn.functional.layer_norm(z, norm.normalized_shape, weight, bias, norm.eps)
        return self._split_books(z)

    def _split_books(self, z: Tensor) -> Tensor:
        """Codebook-space features (..., heads * codebook_dim) -> books (B, N, codebook_dim), l2-normalised
        for cosine codebooks."""
        h, cd = self.heads, self.codebook_dim
        z = z.reshape(-1, h, cd).transpose(0, 1) if self.separate_codebook_per_head else z.reshape(1, -1, cd)
        return nn.functional.normalize(z, dim=-1, eps=1e-12) if self.use_cosine_sim else z

    def from_books(self, q: Tensor, b: int, n: int) -> Tensor:
        """Codes (B, N, codebook_dim) -> output tokens (b, n, dim): heads merged, ``project_out``."""
        if self.separate_codebook_per_head:
            q = q.transpose(0, 1)
        return project_from(self.project_out, q.reshape(b, n, self.heads * self.codebook_dim))

    def token_indices(self, indices: Tensor, b: int, n: int) -> Tensor:
        """Book indices (B, N) -> (b, n), or (b, n, heads)."""
        if self.separate_codebook_per_head:
            indices = indices.transpose(0, 1)
        return indices.reshape(b, n, self.heads) if self.heads > 1 else indices.reshape(b, n)

    def book_indices(self, indices: Tensor) -> Tensor:
        """(b, n[, heads]) -> book indices (B, N)."""
        flat = indices.reshape(-1, self.heads)
        return flat.transpose(0, 1) if self.separate_codebook_per_head else flat.reshape(1, -1)

    def book_mask(self, valid: Tensor) -> Tensor:
        """Token mask (b, n) -> book mask (B, N)."""
        flat = valid.reshape(-1, 1).expand(-1, self.heads)
        return flat.transpose(0, 1) if self.separate_codebook_per_head else flat.reshape(1, -1)

    def _decode_books(self, indices: Tensor, b: int, n: int) -> Tensor:
        """Book indices (B, N), -1 allowed -> output tokens (b, n, dim); -1 tokens decode to zero."""
        dropped = indices < 0
        q = self._codebook.lookup(indices.clamp(min=0)).masked_fill(dropped.unsqueeze(-1), 0.0)
        out = self.from_books(q, b, n)
        token_dropped = self.token_indices(dropped, b, n)
        if self.heads > 1:
            token_dropped = token_dropped.all(-1)
        return out.masked_fill(token_dropped.unsqueeze(-1), 0.0)

    # -- inference paths (export-safe) --------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> indices (int64), in the input's layout; no training state is touched."""
        tokens, spatial = self.layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        indices = self._codebook.nearest(self.to_books(tokens))
        return self.layout.indices_from_tokens(self.token_indices(indices, b, n), spatial)

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
        out = self._decode_books(self.book_indices(tokens.long()), b, n)
        return self.layout.from_tokens(out, spatial)

    get_output_from_indices = decode

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices -> codebook-space vectors (before project_out), heads concatenated:
        (..., heads * codebook_dim).
        """
        tokens, spatial = self._index_tokens(indices)
        b, n = tokens.shape[0], tokens.shape[1]
        books = self.book_indices(tokens.long())
        q = self._codebook.lookup(books.clamp(min=0)).masked_fill((books < 0).unsqueeze(-1), 0.0)
        if self.separate_codebook_per_head:
            q = q.transpose(0, 1)
        return self.layout.from_tokens(q.reshape(b, n, self.heads * self.codebook_dim), spatial)

    # -- training step on books (used by forward and by the residual stacks) -------------------------
    def quantize_books(
        self,
        z: Tensor,
        valid: Tensor | None = None,
        *,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        indices: Tensor | None = None,
        token_codes: Tensor | None = None,
    ) -> BookStep:
        """Training-mode quantization of books z (B, N, codebook_dim): the codebook's ``prepare_``
        (k-means), the code choice (nearest, or Gumbel-sampled with ``stochastic_sample_codes``), the
        lookup and the losses over ``valid`` (B, N) tokens. ``indices`` (B, N): codes chosen elsewhere (a
        residual stack's beam search), used instead of this layer's own choice. ``token_codes`` (B, N, K,
        codebook_dim): each token's own codebook (``codebook_transform_fn``) to take the nearest code from
        instead. The codebook's own step is :meth:`step_codebook_`; the estimator is :meth:`estimate`."""
        if token_codes is not None:
            self._check_token_codes_losses()
        book = self._codebook
        zd = z.detach()
        book.prepare_(zd, valid, sync=should_sync(self.sync_codebook))
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        frozen = self._frozen(freeze_codebook)
        in_place = None
        if self.in_place_codebook_optimizer is not None:
            in_place = zd.new_zeros(()) if frozen else self._in_place_step(zd, valid, temperature)
        with codes_held(book):  # the codes in use (vq_bridge, affine_param) computed once
            if token_codes is not None:
                if indices is None:
                    indices = _nearest_token_codes(zd, token_codes, cosine=self.use_cosine_sim)
                q = _gather_token_codes(token_codes, indices)
            else:
                if indices is None:  # codes chosen elsewhere (a beam search) are kept
                    indices = self._choose_codes(zd, temperature)
                q = book.lookup(indices)
            train_codes = self._trains_codes(freeze_codebook)
            total, terms = self.losses(z, q if train_codes else q.detach(), indices, book, valid)
        terms = {name: t.mean() for name, t in terms.items()}
        if in_place is not None:
            terms[INPLACE_OPTIMIZE] = in_place
        return BookStep(indices, q.detach(), total.mean(), terms)

    def _choose_codes(self, zd: Tensor, temperature: float) -> Tensor:
        """The code choice of a training step: nearest, or Gumbel-sampled with ``stochastic_sample_codes``."""
        if self.stochastic_sample_codes and temperature > 0:
            return self._codebook.sample(zd, temperature)  # type: ignore[attr-defined]
        return self._codebook.nearest(zd)

    def _in_place_step(self, zd: Tensor, valid: Tensor | None, temperature: float) -> Tensor:
        """The in-place codebook step of a training forward: ``mean ||lookup(choice) - sg(z)||^2`` over the
        valid tokens (the codebook's gradient only, accumulated into its parameters' ``.grad``), then the
        optimizer's step unless ``manual_in_place_optimizer_update``; returns the loss (0-dim, detached)."""
        book = self._codebook
        with codes_held(book), torch.enable_grad():
            q = book.lookup(self._choose_codes(zd, temperature))
            loss = masked_mse(zd, q, valid).mean()
            loss.backward()
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer()
        return loss.detach()

    def update_in_place_optimizer(self) -> None:
        """The in-place optimizer's step from the codebook gradients accumulated so far (averaged over ranks
        under torch.distributed with ``sync_codebook``), then its ``zero_grad``. Forwards call it unless
        ``manual_in_place_optimizer_update``; without an in-place optimizer it does nothing."""
        optimizer = self.in_place_codebook_optimizer
        if optimizer is None:
            return
        sync = should_sync(self.sync_codebook)
        if sync:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        all_reduce_mean_(param.grad, sync)
        optimizer.step()
        optimizer.zero_grad()

    def _in_place_optimizer(
        self, factory: Any, manual: bool, codebook: str | Codebook | None
    ) -> torch.optim.Optimizer | None:
        """``in_place_codebook_optimizer(codebook parameters)``, checked: it needs a codebook trained by
        gradient that this quantizer owns."""
        if factory is None:
            if manual:
                raise ConfigurationError(
                    "manual_in_place_optimizer_update defers the step of in_place_codebook_optimizer: pass "
                    "in_place_codebook_optimizer too, or leave manual_in_place_optimizer_update=False"
                )
            return None
        if not callable(factory):
            raise TypeError(
                "in_place_codebook_optimizer must be a callable params -> torch.optim.Optimizer (e.g. "
                f"functools.partial(torch.optim.SGD, lr=0.1)), got {type(factory).__name__}"
            )
        if codebook is not None and not isinstance(codebook, str):
            raise ConfigurationError(
                "in_place_codebook_optimizer steps the codebook this quantizer builds: with a codebook "
                "object (codebook=..., as ResidualVQ's shared_codebook=True passes to every layer) it is not "
                "supported; train a shared codebook by the losses with your own optimizer"
            )
        if not self._codebook.trained_by_gradient:
            raise ConfigurationError(
                "in_place_codebook_optimizer steps a codebook trained by gradient; the EMA codebook "
                "(ema_update=True, learnable_codebook=False) has none: pass learnable_codebook=True"
            )
        optimizer = factory(self.codebook_parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "in_place_codebook_optimizer must build a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        return optimizer

    def step_codebook_(
        self,
        z: Tensor,
        indices: Tensor,
        valid: Tensor | None = None,
        *,
        freeze_codebook: bool | None = None,
        ema_update_weight: StepWeight | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ) -> None:
        """The codebook's training step for books z (B, N, codebook_dim) that chose ``indices``, unless
        frozen (``freeze_codebook``, default: the module's). ``ema_update_weight``, ``accum_ema_update`` and
        ``ema_update`` (None: the codebook's) are passed on as the EMA codebooks' ``step_weight``,
        ``accumulate`` and ``ema`` (see :meth:`forward`)."""
        if self._frozen(freeze_codebook):
            return
        options: dict[str, Any] = {}
        if ema_update_weight is not None:
            options["step_weight"] = self._ema_weight(ema_update_weight)
        if accum_ema_update:
            options["accumulate"] = True
        if ema_update is not None:
            options["ema"] = bool(ema_update)
        self._codebook.train_step_(
            z.detach(), indices, valid, sync=should_sync(self.sync_codebook), **options
        )

    def estimate(
        self, z: Tensor, codes: Tensor, indices: Tensor, sample_codebook_temp: float | None = None
    ) -> Tensor:
        """The training output for books z and their chosen codes: the estimator's (equal to the codes,
        with the estimator's gradient to z), DiVeQ's ``directional_reparam(z, codes)``
        (``directional_reparam=True``), or the codes themselves when z carries no gradient or
        ``route_gradients_to_input=False``; then, with ``sync_update_v = v > 0``, the synchronized update
        ``out + v * (out - sg(out))``. The codes reach the output's gradient only where they carry one
        (the caller passes them detached otherwise)."""
        if not z.requires_grad or not self.route_gradients_to_input:
            out = codes
        elif self.directional_reparam:
            out = directional_reparam(z, codes, self.directional_reparam_variance)
        else:
            estimator = self.estimator
            if sample_codebook_temp is not None and isinstance(estimator, GumbelStraightThrough):
                if sample_codebook_temp <= 0:  # no soft assignment at temperature 0: straight-through
                    estimator = resolve_estimator("straight_through")
                else:
                    estimator = dataclasses.replace(estimator, temperature=sample_codebook_temp)
            out = estimator(z, codes, indices, self._codebook)
        if self.sync_update_v > 0:
            out = out + self.sync_update_v * (out - out.detach())
        return out

    def _frozen(self, freeze_codebook: bool | None) -> bool:
        return self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)

    def _trains_codes(self, freeze_codebook: bool | None) -> bool:
        """Whether this call's losses and output may carry a gradient to the codes."""
        return self._codebook.trained_by_gradient and not self._frozen(freeze_codebook)

    @property
    def straight_through_output(self) -> bool:
        """Whether a training output is the chosen codes with the identity gradient to the input (the
        straight-through estimator, without DiVeQ, ``route_gradients_to_input=False`` or ``sync_update_v``):
        residual stacks then add the codes of all layers and one straight-through term."""
        identity = bool(getattr(self.estimator, "identity_gradient", False))
        return (
            identity
            and self.route_gradients_to_input
            and not self.directional_reparam
            and not self.sync_update_v
        )

    def output_codes(
        self, z: Tensor, codes: Tensor, indices: Tensor, freeze_codebook: bool | None = None
    ) -> Tensor:
        """The codes a training output of books z is built from (the input of :meth:`estimate`): ``codes``
        (detached, as :meth:`quantize_books` gives them), or their lookup with the codebook's gradient where
        the output's gradient reaches the codes themselves (no estimator runs, or DiVeQ's) and the codebook
        is trained by gradient."""
        if self._output_takes_codes(z) and self._trains_codes(freeze_codebook):
            return self._codebook.lookup(indices)
        return codes

    def _output_takes_codes(self, z: Tensor) -> bool:
        """Whether the training output's gradient reaches the chosen codes themselves: no estimator runs
        (z without gradient, ``route_gradients_to_input=False``) or DiVeQ's reparameterisation does."""
        return not z.requires_grad or not self.route_gradients_to_input or self.directional_reparam

    def _check_token_codes_losses(self) -> None:
        given = [
            name
            for name, on in (
                ("codebook_diversity_loss_weight > 0", self.codebook_diversity_loss_weight > 0),
                ("commitment_use_cross_entropy_loss=True", self.commitment_use_cross_entropy_loss),
            )
            if on
        ]
        if given:
            raise ValueError(
                f"codebook_transform_fn is not supported in training with {' or '.join(given)} (those terms "
                "are taken over the codebook's own codes); leave them off or call in eval mode"
            )

    def _token_codes(self, transform: Any, z: Tensor, freeze_codebook: bool | None) -> Tensor:
        """``codebook_transform_fn(codes (B, K, d))`` -> per-token codebooks (B, N, K, d), l2-normalised
        for cosine codebooks. The codes it sees carry their gradient when the codebook is trained by
        gradient (a copy: the codebook's step rewrites them in place)."""
        codes = self._codebook.codes
        codes = codes.clone() if self._trains_codes(freeze_codebook) else codes.detach().clone()
        out = transform(codes)
        if not isinstance(out, Tensor):
            raise TypeError(f"codebook_transform_fn must return a tensor, got {type(out).__name__}")
        books, tokens, dim = z.shape
        size = codes.shape[1]
        if (
            out.ndim < 4
            or out.shape[0] != books
            or tuple(out.shape[-2:]) != (size, dim)
            or (out.numel() != books * tokens * size * dim)
        ):
            raise ValueError(
                f"codebook_transform_fn must map the codes {tuple(codes.shape)} to per-token codebooks "
                f"({books}, batch, seq, {size}, {dim}) for {tokens} tokens, got shape {tuple(out.shape)}"
            )
        out = out.reshape(books, tokens, size, dim).to(z.dtype)
        return l2norm(out) if self.use_cosine_sim else out

    def _check_forward_options(
        self, indices: Tensor | None, topk: int | None, codebook_transform_fn: Any
    ) -> int | None:
        """Checks of forward's ``indices`` / ``topk`` / ``codebook_transform_fn`` (before any state
        changes); returns topk's k, clamped to the codebook size, or None."""
        if codebook_transform_fn is not None:
            if not callable(codebook_transform_fn):
                raise TypeError(
                    f"codebook_transform_fn must be callable, got {type(codebook_transform_fn).__name__}"
                )
            if self.heads > 1 and not self.separate_codebook_per_head:
                raise ConfigurationError(
                    f"codebook_transform_fn with heads={self.heads} needs separate_codebook_per_head=True "
                    "(per-token codebooks of one shared codebook over heads are not supported)"
                )
            if self.training and indices is None:
                self._check_token_codes_losses()
        if topk is None:
            return None
        if indices is not None:
            raise ValueError("pass either indices (the cross-entropy of given codes) or topk, not both")
        if isinstance(topk, bool) or int(topk) != topk or int(topk) <= 0:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        if self.heads > 1:
            raise ConfigurationError(
                f"topk is supported with heads=1 only, got topk={topk} with heads={self.heads}"
            )
        if self.training and self.commitment_use_cross_entropy_loss:
            raise ConfigurationError(
                "topk is not supported in training with commitment_use_cross_entropy_loss=True "
                "(the per-candidate loss is the commitment MSE): call it in eval mode or turn the option off"
            )
        if self.training and getattr(self, "in_place_codebook_optimizer", None) is not None:
            raise ConfigurationError(
                "topk is not supported in training with in_place_codebook_optimizer (the optimizer "
                "step re-quantizes one code per token): call it in eval mode"
            )
        return min(int(topk), self.codebook_size)

    def _target_books(self, indices: Tensor, b: int, n: int, book_valid: Tensor | None) -> Tensor:
        """forward's ``indices`` (the output's index layout, -1 ignored) -> book targets (B, N), masked
        tokens -1."""
        target, _ = self._index_tokens(indices)
        if tuple(target.shape[:2]) != (b, n):
            raise ValueError(
                f"indices must give one index per token of x ({b} x {n} tokens), "
                f"got shape {tuple(indices.shape)}"
            )
        books = self.book_indices(target.long())
        return books if book_valid is None else books.masked_fill(~book_valid, DROPPED_INDEX)

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        ema_update_weight: StepWeight | None = None,
        accum_ema_update: bool = False,
        indices: Tensor | None = None,
        topk: int | None = None,
        codebook_transform_fn: Any = None,
        ema_update: bool | None = None,
    ):
        """Quantize x; in training mode also take the codebook's step (see the module docstring).

        ``ema_update_weight``: per-code scale of this step's EMA, ``(codebook_size,)`` or ``(heads,
        codebook_size)`` with separate codebooks, or a callable ``(sums (B, K, d), counts (B, K)) -> weight``
        (sums None where only the usage counts step: a gradient-trained codebook with dead-code expiry);
        0 freezes a code (its vector stays exactly as it is and it never expires). ``accum_ema_update``:
        only accumulate this batch's EMA statistics; the next call without it takes one step from all of
        them (gradient accumulation). ``ema_update``: None, the module's; False, no EMA step this call (the
        usage counts of dead-code expiry still step); True, an EMA step also where ``ema_update=False`` was
        built (not for a codebook trained by gradient).

        ``indices`` (shaped like the returned indices, -1 ignored): returns ``(quantized, loss)``, the
        output of the nearest codes and the cross-entropy of the given indices under the distance logits;
        no state changes. ``topk=k`` (heads=1): the k nearest codes per token, nearest first: quantized
        ``(b, n, k, dim)``, indices ``(b, n, k)`` and loss ``(b, n, k)``, the per-candidate commitment MSE
        (times commitment_weight when > 0; 0 at masked tokens; plus the other weighted terms in training);
        no codebook step. ``codebook_transform_fn``: codes ``(books, K, cd)`` -> per-token codebooks
        ``(books, b, n, K, cd)`` to quantize with (an implicit neural codebook).
        """
        step_weight = self._ema_weight(ema_update_weight)  # checked before any state changes
        self._check_ema_call(ema_update, step_weight)
        k = self._check_forward_options(indices, topk, codebook_transform_fn)
        tokens, spatial = self.layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        valid = token_mask(self.layout, b, n, spatial, mask, lens)
        book_valid = None if valid is None else self.book_mask(valid)
        target = None if indices is None else self._target_books(indices, b, n, book_valid)
        z = self.to_books(zero_padding(tokens, valid))
        token_codes = None
        if codebook_transform_fn is not None:
            if self.training and target is None:  # k-means first: the transform sees this batch's codes
                self._codebook.prepare_(z.detach(), book_valid, sync=should_sync(self.sync_codebook))
            token_codes = self._token_codes(codebook_transform_fn, z, freeze_codebook)
        if target is not None:
            return self._cross_entropy_forward(
                x, tokens, spatial, valid, z, target, token_codes, freeze_codebook, sample_codebook_temp
            )
        if k is not None:
            return self._topk_forward(
                x,
                tokens,
                spatial,
                valid,
                z,
                k,
                token_codes,
                freeze_codebook,
                sample_codebook_temp,
                return_loss_breakdown,
            )

        if self.training:
            step = self.quantize_books(
                z,
                book_valid,
                sample_codebook_temp=sample_codebook_temp,
                freeze_codebook=freeze_codebook,
                token_codes=token_codes,
            )
            if token_codes is not None and self._output_takes_codes(z):
                codes = _gather_token_codes(token_codes, step.indices)
            else:
                codes = self.output_codes(z, step.codes, step.indices, freeze_codebook)
            q = self.estimate(z, codes, step.indices, sample_codebook_temp)
            self.step_codebook_(
                z,
                step.indices,
                book_valid,
                freeze_codebook=freeze_codebook,
                ema_update_weight=step_weight,
                accum_ema_update=accum_ema_update,
                ema_update=ema_update,
            )
            indices = step.indices
            if book_valid is not None:
                indices = indices.masked_fill(~book_valid, DROPPED_INDEX)
            out = self.from_books(q, b, n)
            loss, terms = step.loss, step.terms
        else:
            if token_codes is not None:
                indices = _nearest_token_codes(z.detach(), token_codes, cosine=self.use_cosine_sim)
                out = self.from_books(_gather_token_codes(token_codes, indices), b, n)
                if book_valid is not None:
                    indices = indices.masked_fill(~book_valid, DROPPED_INDEX)
            else:
                with codes_held(self._codebook):  # the codes in use (vq_bridge, affine_param) computed once
                    indices = self._codebook.nearest(z)
                    if book_valid is not None:
                        indices = indices.masked_fill(~book_valid, DROPPED_INDEX)
                        out = self._decode_books(indices, b, n)
                    else:  # no -1 to handle: skip decode's two masked copies (same values)
                        out = self.from_books(self._codebook.lookup(indices), b, n)
            loss = torch.zeros((), device=x.device)
            terms = dict.fromkeys(self.losses.names, loss)
            if self.in_place_codebook_optimizer is not None:
                terms[INPLACE_OPTIMIZE] = loss

        quantized = self._output(out, tokens, valid, spatial, x.dtype)
        indices = self.layout.indices_from_tokens(self.token_indices(indices, b, n), spatial)
        if return_loss_breakdown:
            return VQOutputWithBreakdown(quantized, indices, loss, self._breakdown(terms))
        return VQOutput(quantized, indices, loss)

    def _output(
        self, out: Tensor, tokens: Tensor, valid: Tensor | None, spatial: tuple, dtype: torch.dtype
    ) -> Tensor:
        """Output tokens (b, n, dim), or candidates (b, n, k, dim) -> the input's layout (candidates on
        the axis after the positions, channel-first layouts: ``(b, dim, *spatial, k)``); masked tokens
        zero or the input (``return_zeros_for_masked_padding``)."""
        candidates = out.ndim == 4
        if valid is not None:
            keep = valid.unsqueeze(-1)
            if candidates:
                keep, tokens = keep.unsqueeze(-1), tokens.unsqueeze(2)
            fill = (
                torch.zeros((), dtype=out.dtype, device=out.device)
                if self.return_zeros_for_masked_padding
                else tokens
            )
            out = torch.where(keep, out, fill)
        out = out.to(dtype)
        if candidates and self.layout.channel_first:
            return out.permute(0, 3, 1, 2).reshape(out.shape[0], out.shape[-1], *spatial, out.shape[2])
        return self.layout.from_tokens(out, spatial)

    def _breakdown(self, terms: dict[str, Tensor]) -> VQLossBreakdown:
        """The loss terms by name -> the breakdown (its four fields, ``inplace_optimize`` zero unless given;
        the rest are ``extra``)."""
        terms = dict(terms)
        commitment = terms.pop(self.commitment_loss_name)
        inplace = terms.pop("inplace_optimize", None)
        return VQLossBreakdown.of(
            commitment,
            terms.pop(CodebookDiversityLoss.name),
            terms.pop(OrthogonalLoss.name),
            commitment.new_zeros(()) if inplace is None else inplace,
            terms,
        )

    def _cross_entropy_forward(
        self,
        x: Tensor,
        tokens: Tensor,
        spatial: tuple,
        valid: Tensor | None,
        z: Tensor,
        target: Tensor,
        token_codes: Tensor | None,
        freeze_codebook: bool | None,
        sample_codebook_temp: float | None,
    ) -> VQCrossEntropyOutput:
        """``forward(x, indices=...)``: the nearest codes' output (through the estimator in training) and
        the cross-entropy of ``target`` (B, N); no k-means, no codebook step."""
        b, n = tokens.shape[0], tokens.shape[1]
        book, cosine = self._codebook, self.use_cosine_sim
        train_codes = self._trains_codes(freeze_codebook)
        with float32_region(z.device.type):
            if token_codes is not None:
                chosen = _nearest_token_codes(z.detach(), token_codes, cosine=cosine)
                codes = _gather_token_codes(token_codes, chosen)
                logits = _token_similarity(z, token_codes, cosine=cosine)
                per_token = nn.functional.cross_entropy(
                    logits.transpose(1, 2), target, ignore_index=DROPPED_INDEX, reduction="none"
                )
                loss = per_token.sum() / (target >= 0).sum().clamp(min=1)
            else:
                chosen = book.nearest(z.detach())
                codes = book.lookup(chosen)
                table = book.codes if train_codes else book.codes.detach()
                loss = code_cross_entropy(z, table, target, cosine=cosine)
        if self.training:
            if not (self._output_takes_codes(z) and (train_codes or token_codes is not None)):
                codes = codes.detach()
            codes = self.estimate(z, codes, chosen, sample_codebook_temp)
        quantized = self._output(self.from_books(codes, b, n), tokens, valid, spatial, x.dtype)
        return VQCrossEntropyOutput(quantized, loss)

    def _topk_forward(
        self,
        x: Tensor,
        tokens: Tensor,
        spatial: tuple,
        valid: Tensor | None,
        z: Tensor,
        k: int,
        token_codes: Tensor | None,
        freeze_codebook: bool | None,
        sample_codebook_temp: float | None,
        return_loss_breakdown: bool,
    ):
        """``forward(x, topk=k)`` (one head: books (1, b*n, cd)): the k nearest codes of every token, their
        outputs (the estimator applied to each candidate in training), indices and per-candidate commitment
        MSE; k-means in training, no codebook step (replay the chosen indices with the codebook's update)."""
        b, n = tokens.shape[0], tokens.shape[1]
        book = self._codebook
        zd = z.detach()
        book_valid = None if valid is None else self.book_mask(valid)
        if token_codes is None:
            if self.training:
                book.prepare_(zd, book_valid, sync=should_sync(self.sync_codebook))
            candidates, _ = nearest_k(zd, book.codes.detach(), k, cosine=self.use_cosine_sim)
            codes = book.lookup(candidates.reshape(1, -1)).reshape(*candidates.shape, -1)
        else:
            candidates = _nearest_token_codes(zd, token_codes, cosine=self.use_cosine_sim, k=k)
            codes = _gather_token_codes(token_codes, candidates)
        train_codes = self._trains_codes(freeze_codebook)
        z_candidates = z.unsqueeze(2).expand_as(codes)
        per_candidate = (z_candidates - (codes if train_codes else codes.detach())).pow(2).mean(-1)
        if book_valid is not None:
            per_candidate = per_candidate.masked_fill(~book_valid.unsqueeze(-1), 0.0)
        weight = self.commitment_weight if self.has_commitment_loss else 1.0
        loss = per_candidate * weight
        zero = torch.zeros((), device=x.device)
        terms = dict.fromkeys(self.losses.names, zero)
        if self.training:
            gradient = self._output_takes_codes(z) and (train_codes or token_codes is not None)
            flat = candidates.reshape(1, -1)
            q = self.estimate(
                z_candidates.reshape(1, -1, z.shape[-1]),
                (codes if gradient else codes.detach()).reshape(1, -1, z.shape[-1]),
                flat,
                sample_codebook_temp,
            )
            nearest_codes = codes[:, :, 0]
            others, parts = self.losses(
                z,
                nearest_codes if train_codes else nearest_codes.detach(),
                candidates[:, :, 0],
                book,
                book_valid,
                skip=(self.commitment_loss_name,),
            )
            loss = loss + others.mean()  # the scalar terms on every candidate, as the reference
            terms = {name: part.mean() for name, part in parts.items()}
        else:
            q = codes
        if book_valid is not None:
            candidates = candidates.masked_fill(~book_valid.unsqueeze(-1), DROPPED_INDEX)
        out = self.from_books(q.reshape(1, -1, q.shape[-1]), b, n * k).reshape(b, n, k, -1)
        quantized = self._output(out, tokens, valid, spatial, x.dtype)

        def layout(t: Tensor) -> Tensor:
            return self.layout.indices_from_tokens(t.reshape(b, n, k), spatial)

        indices, loss = layout(candidates), layout(loss)
        if return_loss_breakdown:
            terms[self.commitment_loss_name] = layout(per_candidate)
            return VQOutputWithBreakdown(quantized, indices, loss, self._breakdown(terms))
        return VQOutput(quantized, indices, loss)

    def _ema_weight(self, weight: StepWeight | None) -> StepWeight | None:
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

    def _check_ema_call(self, ema_update: bool | None, step_weight: StepWeight | None) -> None:
        """A forward's ``ema_update`` / ``ema_update_weight`` against the codebook (before any state
        change)."""
        book = self._codebook
        if ema_update and book.trained_by_gradient:
            raise ValueError(
                "ema_update=True: this codebook is trained by gradient (learnable_codebook=True), it takes "
                "no EMA steps; leave ema_update unset"
            )
        if step_weight is not None and getattr(book, "manual_ema", False):
            raise ValueError(
                "ema_update_weight weighs an EMA step, which manual_ema_update=True defers to update_ema(): "
                "pass it there (vq.update_ema(ema_update_weight=...))"
            )

    # -- explicit codebook steps (beam search replays, manual EMA, manual expiry) -----------------------
    def update_ema(self, ema_update_weight: StepWeight | None = None) -> None:
        """The EMA step from the statistics the training steps accumulated (``manual_ema_update=True``, or
        forwards with ``accum_ema_update``), as one step on their concatenated batches, then the codes
        recomputed; collectives under torch.distributed with ``sync_codebook`` (every rank calls it). The
        reference's ``vq._codebook.update_ema()`` is the same step."""
        update = getattr(self._codebook, "update_ema", None)
        if update is None:
            raise TypeError(f"{type(self._codebook).__name__} has no deferred EMA step (update_ema)")
        update(sync=should_sync(self.sync_codebook), step_weight=self._ema_weight(ema_update_weight))

    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """The codebook's training step (EMA, usage counts, dead-code expiry) for x in the forward's layout
        whose codes are ``indices`` (shaped like the forward's; -1 and masked tokens are left out): what a
        training forward would do to the codebook had it chosen them (beam search replays its winners with
        it). Acts in either mode (an explicit request); nothing with ``freeze_codebook``."""
        check_tensor(x, "x")
        tokens, spatial = self.layout.to_tokens(x)
        b, n = tokens.shape[0], tokens.shape[1]
        valid = token_mask(self.layout, b, n, spatial, mask, None)
        index_tokens, _ = self._index_tokens(indices)
        if tuple(index_tokens.shape[:2]) != (b, n):
            raise ValueError(
                f"indices must be shaped like the forward's indices for x ({b} x {n} tokens), got shape "
                f"{tuple(indices.shape)}"
            )
        books = self.book_indices(index_tokens.long())
        book_valid = books >= 0
        if valid is not None:
            book_valid = book_valid & self.book_mask(valid)
        with torch.no_grad():
            z = self.to_books(zero_padding(tokens, valid))
        self.step_codebook_(z, books.clamp(min=0), book_valid)

    update_ema_indices = update_indices

    def expire_codes_(self, x: Tensor) -> None:
        """Dead-code expiry from codebook-space vectors x (..., heads * codebook_dim) (after ``project_in``,
        as the reference's ``expire_codes_``): codes whose usage fell below ``threshold_ema_dead_code`` are
        replaced by vectors of x. Acts in either mode (an explicit request)."""
        check_tensor(x, "x")
        width = self.heads * self.codebook_dim
        if x.shape[-1] != width:
            raise ValueError(
                f"x must end with heads * codebook_dim = {width} codebook-space features, got shape "
                f"{tuple(x.shape)}"
            )
        expire = getattr(self._codebook, "expire_", None)
        if expire is None:
            raise TypeError(f"{type(self._codebook).__name__} has no dead-code expiry (expire_)")
        z = self._split_books(x.detach().reshape(-1, width).float())
        expire(self._codebook.untransform(z), sync=should_sync(self.sync_codebook))  # type: ignore[attr-defined]

    # -- export ------------------------------------------------------------------------------------
    def export_tie_check(self, x: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor:
        """Where the indices ``a`` and ``b`` of ``x`` are equal or genuinely tied codes (float64 distances
        within ``tolerance``): the export layer's parity check (see vqcore.protocols)."""
        tokens, spatial = self.layout.to_tokens(x)
        bsz, n = tokens.shape[0], tokens.shape[1]
        z = self.to_books(tokens, torch.float64)
        extra = 1 if self.heads > 1 else 0
        ba, bb = (self.book_indices(self.layout.indices_to_tokens(i, extra)[0].long()) for i in (a, b))
        codes = self._codebook.codes.detach().double()
        ok = ba == bb
        for book, t in (~ok).nonzero().tolist():
            ca, cb = codes[book, ba[book, t]], codes[book, bb[book, t]]
            ok[book, t] = is_tie(z[book, t], ca, cb, cosine=self.use_cosine_sim, tolerance=tolerance)
        return self.layout.indices_from_tokens(self.token_indices(ok, bsz, n), spatial).reshape(a.shape)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters embedded in exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.codebook_dim,
            "heads": self.heads,
            "separate_codebook_per_head": self.separate_codebook_per_head,
            "use_cosine_sim": self.use_cosine_sim,
            "layout": self.layout.kind,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"heads={self.heads}, layout={self.layout.kind}, estimator={self.estimator.name}"
        )


def _token_scores(z: Tensor, token_codes: Tensor, *, cosine: bool) -> Tensor:
    """Scores (B, N, K), lower is nearer, of books z (B, N, d) against per-token codebooks (B, N, K, d):
    squared distances, or ``-z . c`` for cosine codebooks."""
    if cosine:
        return -torch.einsum("bnd,bnkd->bnk", z, token_codes)
    return (token_codes - z.unsqueeze(2)).pow(2).sum(-1)


def _token_similarity(z: Tensor, token_codes: Tensor, *, cosine: bool) -> Tensor:
    """Differentiable similarities (B, N, K) to per-token codebooks: ``-||z - c||`` or ``z . c``."""
    scores = _token_scores(z, token_codes, cosine=cosine)
    return -scores if cosine else -scores.clamp(min=1e-12).sqrt()


def _nearest_token_codes(z: Tensor, token_codes: Tensor, *, cosine: bool, k: int | None = None) -> Tensor:
    """The nearest code of every token in its own codebook: (B, N); with ``k``, the k nearest, nearest
    first: (B, N, k)."""
    with torch.no_grad():
        scores = _token_scores(z.detach(), token_codes.detach(), cosine=cosine)
        if k is None:
            return scores.argmin(-1)
        return scores.topk(k, -1, largest=False, sorted=True).indices


def _gather_token_codes(token_codes: Tensor, indices: Tensor) -> Tensor:
    """Per-token codebooks (B, N, K, d) at indices (B, N) -> (B, N, d), or (B, N, k) -> (B, N, k, d)."""
    single = indices.ndim == 2
    where = indices.unsqueeze(-1) if single else indices
    out = token_codes.gather(2, where.unsqueeze(-1).expand(*where.shape, token_codes.shape[-1]))
    return out.squeeze(2) if single else out


def orthogonal_loss_fn(t: Tensor) -> Tensor:
    """The orthogonal regulariser of codes ``t`` (books, n, d), 0-dim: the mean over books of
    :func:`vqcore.blocks.losses.orthogonal_error` (vector-quantize-pytorch's helper of the same name)."""
    return orthogonal_error(t).mean()


@hookimpl
def register_quantizers(register):
    register(
        "vq",
        VectorQuantize,
        aliases=("vector_quantize", "VectorQuantize"),
        summary="EMA vector quantizer: k-means init, dead-code expiry, cosine, heads, fmaps",
    )
