"""Converters from vector-quantize-pytorch 1.32.0 VectorQuantize, ResidualVQ and GroupedResidualVQ.

Each follows :class:`vqcore.protocols.ReferenceConverter` and is registered under the reference's class
name (``vqcore.compat.from_reference`` finds it there). The options are read from the reference module's
public attributes, its codebook's through ``ref.get_submodule("_codebook")``; the state is mapped key by
key, so the vqcore modules are only built (by the driver) and never inspected beyond their ``state_dict``.

Mapping rules (the module docstring of :mod:`vqcore.compat` lists the user-visible ones):

- the reference's codebook lives at ``_codebook.*`` (``embed``, ``cluster_size``, ``embed_avg``,
  ``initted``), vqcore's too; a residual stack's layer ``q`` at ``layers.{q}._codebook.*``, also with a
  shared codebook (one codebook listed under every layer, in the reference and in vqcore alike), and a
  grouped stack's under ``rvqs.{g}.``;
- Gumbel straight-through (``straight_through=True``): the reference's codebook returns the soft
  assignment's output, but its ``VectorQuantize.forward`` then replaces it by ``x + sg(q - x)`` before
  returning, so the gradient that reaches its input is the identity: it converts to vqcore's default
  straight-through estimator (vqcore's ``straight_through=True`` would pass the soft assignment's
  gradient on, which the reference never does);
- the reference's default estimator is the rotation trick (``rotation_trick`` is read back as it is).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.blocks.conversion import (
    TRAINING_ONLY,
    ReferenceModule,
    UnsupportedOptions,
    linear_of,
    list_entries,
    map_projections,
    raise_unsupported,
)
from vqcore.hookspecs import hookimpl

# Reference options that vqcore does not implement.
VQ_UNSUPPORTED = UnsupportedOptions()
# The reference's estimator and loss options, carried as they are (where not at these defaults).
VQ_ESTIMATOR_AND_LOSS_OPTIONS = (
    ("commitment_use_cross_entropy_loss", False),
    ("codebook_diversity_loss_weight", 0.0),
    ("codebook_diversity_temperature", 100.0),
    ("directional_reparam", False),
    ("directional_reparam_variance", 5e-3),
    ("route_gradients_to_input", True),
    ("sync_update_v", 0.0),
)
CODEBOOK_UNSUPPORTED = UnsupportedOptions()
RVQ_UNSUPPORTED = UnsupportedOptions()

CODEBOOK_KEYS = ("embed", "cluster_size", "embed_avg", "initted")
AFFINE_KEYS = (
    "batch_mean",
    "batch_variance",
    "codebook_mean",
    "codebook_variance",
    "codebook_mean_needs_init",
    "codebook_variance_needs_init",
)


def codebook_training_kwargs(ref: ReferenceModule, shared_codebook: bool) -> dict[str, Any]:
    """The codebook-training options of a reference VectorQuantize: ``vq_bridge`` (a copy of the reference's
    module; its weights come with the state), the affine re-parameterisation, ``manual_ema_update`` (not for
    a shared RVQ codebook, where the reference sets it on its layers and vqcore steps once anyway) and the
    in-place optimizer, rebuilt as a factory of the reference optimizer's class and defaults (its state, as
    in the reference, is not part of any state_dict)."""
    book: ReferenceModule = ref.get_submodule("_codebook")
    out: dict[str, Any] = {}
    bridge = getattr(book, "vq_bridge", None)
    if bridge is not None:
        out["vq_bridge"] = copy.deepcopy(bridge)
    if bool(getattr(book, "affine_param", False)):
        out.update(
            affine_param=True,
            sync_affine_param=bool(book.sync_affine_param),
            affine_param_batch_decay=float(book.affine_param_batch_decay),
            affine_param_codebook_decay=float(book.affine_param_codebook_decay),
        )
    if bool(getattr(book, "manual_ema_update", False)) and not shared_codebook:
        out["manual_ema_update"] = True
    optimizer = getattr(ref, "in_place_codebook_optimizer", None)
    if isinstance(optimizer, torch.optim.Optimizer) and not shared_codebook:
        out["in_place_codebook_optimizer"] = functools.partial(type(optimizer), **optimizer.defaults)
        out["manual_in_place_optimizer_update"] = bool(ref.manual_in_place_optimizer_update)
    return out


def _gumbel_keywords(book: ReferenceModule) -> dict[str, Any]:
    """The options the reference bound into its codebook's ``gumbel_sample`` (a ``functools.partial``)."""
    fn = getattr(book, "gumbel_sample", None)
    return dict(getattr(fn, "keywords", None) or {})


def _sync_options(book: ReferenceModule) -> dict[str, Any]:
    """``sync_codebook`` / ``sync_kmeans`` from the reference codebook's resolved DDP functions."""
    if not bool(getattr(book, "use_ddp", False)):
        # resolved at construction: False also when the module was merely built outside a process group.
        # vqcore's None decides at every call (and sync_kmeans is unobservable here: keep the default)
        return dict(sync_codebook=None)
    sample_fn = getattr(book, "sample_fn", None)
    return dict(
        sync_codebook=True, sync_kmeans=getattr(sample_fn, "__name__", "") == "sample_vectors_distributed"
    )


def _initted(layer: ReferenceModule) -> bool:
    """Whether a reference VectorQuantize's codebook has run k-means (or never needed it)."""
    return bool(layer.get_submodule("_codebook").get_buffer("initted"))


def _estimator_and_loss_options(ref: ReferenceModule) -> dict[str, Any]:
    """:data:`VQ_ESTIMATOR_AND_LOSS_OPTIONS` that a reference VectorQuantize sets, by name."""
    return {
        name: getattr(ref, name)
        for name, default in VQ_ESTIMATOR_AND_LOSS_OPTIONS
        if hasattr(ref, name) and getattr(ref, name) != default
    }


def layer_kwargs(
    ref: ReferenceModule,
    allow_training_differences: bool,
    shared_codebook: bool = False,
    set_by_stack: tuple[str, ...] = (),
) -> dict:
    """The options a reference VectorQuantize shares with the layers of its ResidualVQ; ``set_by_stack``:
    layer options the residual stack sets itself (DiVeQ's), not reported as unsupported."""
    book: ReferenceModule = ref.get_submodule("_codebook")
    findings = VQ_UNSUPPORTED.findings(ref) + CODEBOOK_UNSUPPORTED.findings(book)
    findings = [(kind, text) for kind, text in findings if text.split("=", 1)[0] not in set_by_stack]
    if getattr(ref, "in_place_codebook_optimizer", None) is not None and shared_codebook:
        findings.append((TRAINING_ONLY, "in_place_codebook_optimizer with shared_codebook=True"))
    raise_unsupported(findings, allow_training_differences, type(ref).__name__)
    orthogonal = float(ref.orthogonal_reg_weight)
    # the reference's codebook is learnable with orthogonal regularisation too (vqcore's is, internally);
    # a user's learnable_codebook=True is a gradient-trained codebook, without EMA (the reference skips it)
    learnable = bool(ref.learnable_codebook) and orthogonal <= 0
    gumbel = _gumbel_keywords(book)
    return dict(
        decay=float(book.decay),
        eps=float(book.eps),
        kmeans_init=not _initted(ref),
        kmeans_iters=int(book.kmeans_iters),
        use_cosine_sim=bool(ref.use_cosine_sim),
        threshold_ema_dead_code=float(book.threshold_ema_dead_code),
        commitment_weight=float(ref.commitment_weight),
        orthogonal_reg_weight=orthogonal,
        orthogonal_reg_active_codes_only=bool(ref.orthogonal_reg_active_codes_only),
        orthogonal_reg_max_codes=ref.orthogonal_reg_max_codes,
        stochastic_sample_codes=bool(gumbel.get("stochastic", False)),
        sample_codebook_temp=float(book.sample_codebook_temp),
        # straight_through=True (Gumbel) leaves rotation_trick False: vqcore's straight-through default
        rotation_trick=bool(ref.rotation_trick),
        ema_update=bool(book.ema_update) and not learnable,
        learnable_codebook=learnable,
        freeze_codebook=bool(ref.freeze_codebook),
        return_zeros_for_masked_padding=bool(ref.return_zeros_for_masked_padding),
        **_sync_options(book),
        **codebook_training_kwargs(ref, shared_codebook),
        **_estimator_and_loss_options(ref),
    )


def layout_kwargs(image: bool, video: bool, channel_last: bool) -> dict:
    """vqcore's layout options for the reference's flags: the reference ignores ``channel_last`` for
    image / video fmaps (always channel-first), where vqcore rejects the pair."""
    return dict(accept_image_fmap=image, accept_3d_fmap=video, channel_last=channel_last or image or video)


def map_codebook(
    own: Mapping[str, Tensor], ref_state_dict: Mapping[str, Tensor], src: str, dst: str, out: dict
) -> None:
    """One EMA codebook: reference keys ``{src}{name}`` -> ``out[{dst}{name}]``.

    A reference k-means codebook that never saw a batch (``initted`` False) holds zeros as placeholder codes
    (and cluster sizes of 1): that is no trained state. The vqcore module keeps its own placeholders (random
    codes, never zeros) and loads ``initted = False``, so k-means runs on its first training batch.
    """
    initted = bool(ref_state_dict[f"{src}initted"])
    for name in CODEBOOK_KEYS:
        if name != "initted" and not initted and f"{dst}{name}" in own:
            out[f"{dst}{name}"] = own[f"{dst}{name}"]
        else:
            out[f"{dst}{name}"] = ref_state_dict[f"{src}{name}"]
    map_codebook_extras(own, ref_state_dict, src, dst, out)


def map_codebook_extras(
    own: Mapping[str, Tensor], ref_state_dict: Mapping[str, Tensor], src: str, dst: str, out: dict
) -> None:
    """The ``vq_bridge.*`` weights and the affine statistics, same names in both. The reference registers its
    batch statistics on its first forward only: a module that never ran one has none (vqcore's then stay
    the placeholders it starts with, unused until its statistics are initialised)."""
    for key in own:
        if not key.startswith(dst):
            continue
        name = key[len(dst) :]
        if name.startswith("vq_bridge.") or (name in AFFINE_KEYS and name.startswith("codebook_")):
            out[key] = ref_state_dict[f"{src}{name}"]
        elif name in AFFINE_KEYS:
            out[key] = ref_state_dict.get(f"{src}{name}", own[key])


def map_residual(
    own: Mapping[str, Tensor], ref_state_dict: Mapping[str, Tensor], prefix: str, out: dict[str, Tensor]
) -> None:
    """A ResidualVQ at ``prefix``: its projections and every layer's codebook (the same keys in both)."""
    map_projections(own, ref_state_dict, out, prefix, prefix)
    for q in list_entries(own, f"{prefix}layers."):
        codebook = f"{prefix}layers.{q}._codebook."
        map_codebook(own, ref_state_dict, codebook, codebook, out)
    map_implicit_mlps(own, ref_state_dict, prefix, out)


# -- implicit neural codebook (QINCo) ------------------------------------------------------------------


def implicit_codebook_kwargs(ref: ReferenceModule) -> dict[str, Any]:
    """``implicit_neural_codebook`` / ``mlp_kwargs`` of a reference ResidualVQ, read from its MLPs."""
    if not bool(getattr(ref, "implicit_neural_codebook", False)):
        return {}
    mlps = [m for m in ref.mlps if m is not None]
    if not mlps:  # one layer: no MLP to read the options from (and none to build)
        return dict(implicit_neural_codebook=True)
    blocks = list(mlps[0].layers)
    mlp_kwargs: dict[str, Any] = {"depth": len(blocks)}
    if blocks:
        mlp_kwargs["dim_hidden"] = int(blocks[0][0].out_features)
    return dict(implicit_neural_codebook=True, mlp_kwargs=mlp_kwargs)


def map_implicit_mlps(
    own: Mapping[str, Tensor], ref_state_dict: Mapping[str, Tensor], prefix: str, out: dict[str, Tensor]
) -> None:
    """The MLPs of an implicit neural codebook: ``{prefix}mlps.*``, the same keys in both."""
    for key in own:
        if key.startswith(f"{prefix}mlps."):
            out[key] = ref_state_dict[key]


class VectorQuantizeConverter:
    """Reference ``VectorQuantize`` -> vqcore ``VectorQuantize`` (see the module docstring)."""

    quantizer = "VectorQuantize"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        embed = ref.get_submodule("_codebook").embed  # a buffer, or a Parameter when learnable
        return dict(
            dim=int(ref.dim),
            codebook_size=int(ref.codebook_size),
            codebook_dim=int(embed.shape[-1]),
            heads=int(ref.heads),
            separate_codebook_per_head=bool(ref.separate_codebook_per_head),
            layernorm_after_project_in=isinstance(ref.project_in, nn.Sequential),  # (Linear, LayerNorm)
            **layout_kwargs(bool(ref.accept_image_fmap), bool(ref.accept_3d_fmap), bool(ref.channel_last)),
            **layer_kwargs(ref, allow_training_differences),
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        own = module.state_dict()
        out: dict[str, Tensor] = {}
        map_codebook(own, ref_state_dict, "_codebook.", "_codebook.", out)
        map_projections(own, ref_state_dict, out, layernorm_to="norm_in.")
        return out


class ResidualVQConverter:
    """Reference ``ResidualVQ`` -> vqcore ``ResidualVQ``: the layers share every option (the reference
    passes one ``**vq_kwargs`` to all of them), not their k-means state."""

    quantizer = "ResidualVQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        what = type(ref).__name__
        layers = list(ref.layers)
        layer = layers[0]
        findings = RVQ_UNSUPPORTED.findings(ref)
        raise_unsupported(findings, allow_training_differences, what)
        if any(bool(getattr(lay, "has_projections", False)) for lay in layers):
            raise ValueError(
                "vqcore.compat: reference ResidualVQ layers with their own projections are not supported"
            )
        sizes = tuple(int(s) for s in ref.codebook_sizes)
        shared = bool(ref.shared_codebook)
        diveq = bool(getattr(ref, "diveq", False))
        options = layer_kwargs(
            layer,
            allow_training_differences,
            shared_codebook=shared,
            set_by_stack=DIVEQ_SETS if diveq else (),
        )
        search = search_kwargs(ref, options)  # takes DiVeQ's layer options out of ``options``
        # quantize dropout (or a layer called on its own) can leave later layers un-initialised while the
        # first one has run k-means
        options["kmeans_init"] = not all(_initted(lay) for lay in layers)
        dim = int(ref.codebook_dim)
        if ref.has_projections:
            projection = linear_of(ref.project_in)
            if projection is None:
                raise ValueError(
                    "vqcore.compat: reference ResidualVQ project_in must be a Linear, "
                    f"got {type(ref.project_in).__name__}"
                )
            dim = projection.in_features
        # the layout: accept_image_fmap is the RVQ's own option, accept_3d_fmap / channel_last reach the
        # layers through **vq_kwargs. The reference's residual bookkeeping is channel-last only, so its
        # forward breaks on these layouts; vqcore quantizes every position as a token, as meant.
        layout = layout_kwargs(
            bool(ref.accept_image_fmap) or bool(layer.accept_image_fmap),
            bool(layer.accept_3d_fmap),
            bool(layer.channel_last),
        )
        return dict(
            dim=dim,
            num_quantizers=int(ref.num_quantizers),
            codebook_size=sizes[0] if len(set(sizes)) == 1 else sizes,
            codebook_dim=int(ref.codebook_dim),
            shared_codebook=shared,
            quantize_dropout=bool(ref.quantize_dropout),
            quantize_dropout_cutoff_index=int(ref.quantize_dropout_cutoff_index),
            quantize_dropout_multiple_of=int(ref.quantize_dropout_multiple_of),
            **layout,
            **options,
            **search,
            **implicit_codebook_kwargs(ref),
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        map_residual(module.state_dict(), ref_state_dict, "", out)
        return out


# -- beam search, DiVeQ and quant_grad_frac ----------------------------------------------------------------

# the layer options a reference ResidualVQ with diveq=True sets itself (vqcore's diveq sets its own)
DIVEQ_SETS = ("route_gradients_to_input", "learnable_codebook", "ema_update", "commitment_weight")


def search_kwargs(ref: ReferenceModule, options: dict[str, Any]) -> dict[str, Any]:
    """A reference ResidualVQ's beam search, DiVeQ and residual-gradient options; with DiVeQ the layer
    options it implies leave ``options`` (the layers' gradient estimator included: DiVeQ has none)."""
    diveq = bool(getattr(ref, "diveq", False))
    if diveq:
        for name in (*DIVEQ_SETS, "rotation_trick"):
            options.pop(name, None)
    weights = getattr(ref, "beam_score_weights", None)
    return dict(
        diveq=diveq,
        beam_size=getattr(ref, "beam_size", None),
        eval_beam_size=getattr(ref, "eval_beam_size", None),
        beam_score_quantizer_weights=None if weights is None else [float(w) for w in weights],
        quant_grad_frac=float(getattr(ref, "quant_grad_frac", 0.0)),
    )


class GroupedResidualVQConverter:
    """Reference ``GroupedResidualVQ`` -> vqcore ``GroupedResidualVQ``: one ResidualVQ per group."""

    quantizer = "GroupedResidualVQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        rvqs = list(ref.rvqs)
        options = ResidualVQConverter().kwargs(rvqs[0], allow_training_differences)
        for key in ("dim", "accept_image_fmap", "accept_3d_fmap", "channel_last"):
            options.pop(key)
        options["kmeans_init"] = not all(_initted(lay) for rvq in rvqs for lay in rvq.layers)
        layer = rvqs[0].layers[0]
        # the reference splits the groups on axis 1 for image fmaps and on the last axis otherwise, also for
        # video / channel-first inputs (where that axis is a position, not the channels: its forward breaks);
        # vqcore always splits the channel axis, which is what the grouping means
        layout = layout_kwargs(
            bool(ref.accept_image_fmap), bool(layer.accept_3d_fmap), bool(layer.channel_last)
        )
        return dict(dim=int(ref.dim), groups=int(ref.groups), **layout, **options)

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        own = module.state_dict()
        out: dict[str, Tensor] = {}
        for g in list_entries(own, "rvqs."):
            map_residual(own, ref_state_dict, f"rvqs.{g}.", out)
        return out


@hookimpl
def register_converters(register):
    register(
        "VectorQuantize",
        VectorQuantizeConverter,
        summary="EMA / learnable codebooks, k-means state, heads, projections, layouts",
    )
    register(
        "ResidualVQ",
        ResidualVQConverter,
        summary="per-layer codebooks (shared too), quantize dropout, projections, layouts",
    )
    register(
        "GroupedResidualVQ",
        GroupedResidualVQConverter,
        summary="one residual stack per group of channels",
    )
