"""Migration from vector-quantize-pytorch 1.32.0 ("the reference"): rebuild a trained module in vqcore.

``from_reference(ref)`` reads the constructor options back from a reference module's attributes, builds
the matching vqcore module and loads the reference's trained state into it (EMA codebooks, projections,
latent value tables); eval outputs and indices then agree with the reference. ``load_reference_state_dict``
maps a reference ``state_dict`` onto an existing vqcore module (build it with the same options; note that
vqcore's ``VectorQuantize`` defaults ``codebook_dim`` to ``dim // heads`` where the reference uses ``dim``
per head, so pass ``codebook_dim`` explicitly when converting a module with heads).

Supported: ``VectorQuantize``, ``ResidualVQ``, ``GroupedResidualVQ``, ``FSQ``, ``LFQ``,
``LatentQuantize``. Reference options that vqcore does not implement raise a ``ValueError`` naming
them. Options that only change training (losses, gradient routing, the precision of the quantization
step) raise too unless ``allow_training_differences=True``: the converted module then gives the
reference's eval outputs (for float32 inputs), while training follows vqcore's semantics. vqcore's own
training semantics differ on purpose in places (straight-through is the default estimator, the shared
RVQ codebook is updated once per step, ...): see the docstrings of the plugin modules.

Layouts. ``ResidualVQ`` / ``GroupedResidualVQ`` take ``accept_image_fmap`` themselves and pass
``accept_3d_fmap`` / ``channel_last`` on to their layers (through ``**vq_kwargs``); the reference's
residual bookkeeping assumes channel-last tensors, so its forward fails on such inputs (a grouped module
with image fmaps works only when the per-group dim happens to equal the fmap's height and width). The
converted module implements what the options mean: every position of the map is a token, the shared
projection and the group split act on the channel axis, indices are ``(b, *positions, Q)``. That equals
the reference run on the ``(b, n, d)`` token sequence of the same map.

Conversions that keep vqcore's semantics where the reference's are a bug:

- a k-means reference that has not seen a batch yet (``initted`` False) holds zero placeholder codes;
  they are not copied: the vqcore module keeps its own random placeholders and runs k-means on its first
  training batch (the reference would also run it in eval, on whatever batch comes first);
- ``sync_codebook``: the reference decides it at construction (``is_distributed()`` then), so a module
  built outside a process group reads ``False``; that converts to vqcore's per-call default (``None``),
  ``True`` stays ``True``;
- FSQ ``scale`` is stored but never used by the reference: it is accepted and ignored.

The reference package is needed only by :func:`from_reference`'s caller (it passes a reference module
in); this module never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["from_reference", "load_reference_state_dict", "reference_kwargs"]

_EVAL = "changes eval outputs"
_TRAIN = "training only"
_PRECISION = (
    "quantizes in low precision; vqcore always quantizes in float32 (same outputs for float32 inputs)"
)

# (attribute, default) pairs: a reference module whose attribute differs from the default uses a feature
# that vqcore lacks. "eval": it changes eval outputs / indices (always an error); "train": training only.
_VQ_UNSUPPORTED = {
    "eval": [("directional_reparam", False)],
    "train": [
        ("commitment_use_cross_entropy_loss", False),
        ("codebook_diversity_loss_weight", 0.0),
        ("in_place_codebook_optimizer", None),
        ("sync_update_v", 0.0),
        ("route_gradients_to_input", True),
    ],
}
# (``manual_ema_update`` is checked separately: the reference's shared RVQ codebook sets it on its layers)
_CODEBOOK_UNSUPPORTED = {"eval": [("affine_param", False), ("vq_bridge", None)], "train": []}
_RVQ_UNSUPPORTED = {
    "eval": [
        ("implicit_neural_codebook", False),
        ("diveq", False),
        ("beam_size", None),
        ("eval_beam_size", None),
    ],
    "train": [("quant_grad_frac", 0.0)],
}
_FSQ_UNSUPPORTED = {"eval": [("orthogonal_rotation", False)], "train": [("noise_dropout", 0.0)]}
_LFQ_UNSUPPORTED = {
    "eval": [("spherical", False), ("orthogonal_rotation", False), ("soft_clamp_input_value", None)],
    # (``entropy_loss_offset`` only acts together with the softplus entropy loss, which is reported)
    "train": [("frac_per_sample_entropy", 1.0), ("experimental_softplus_entropy_loss", False)],
}
_LQ_UNSUPPORTED = {"eval": [], "train": [("in_place_codebook_optimizer", None)]}


def _differs(value, default) -> bool:
    if isinstance(value, Tensor):
        value = value.item()
    if value is None or default is None:
        return (value is None) != (default is None)
    return value != default


def _table_findings(ref: nn.Module, table: dict) -> list[tuple[str, str]]:
    """(kind, "attr=value") for every attribute of ``table`` that differs from its default."""
    found = []
    for kind in ("eval", "train"):
        for attr, default in table[kind]:
            if hasattr(ref, attr) and _differs(getattr(ref, attr), default):
                value = getattr(ref, attr)
                value = value.item() if isinstance(value, Tensor) else value
                found.append((_EVAL if kind == "eval" else _TRAIN, f"{attr}={value!r}"))
    return found


def _raise_unsupported(findings: list[tuple[str, str]], allow_training_differences: bool, what: str) -> None:
    """Raise a ValueError naming every unsupported option; training-only ones pass under the opt-in."""
    bad = [(kind, text) for kind, text in findings if kind == _EVAL or not allow_training_differences]
    if not bad:
        return
    hint = (  # only where the opt-in would let the conversion through
        ""
        if any(kind == _EVAL for kind, _ in bad)
        else "; pass allow_training_differences=True to convert anyway (eval outputs agree, training differs)"
    )
    listed = ", ".join(f"{text} ({kind})" for kind, text in bad)
    raise ValueError(f"vqcore.compat: reference {what} uses options vqcore does not support: {listed}{hint}")


def _check_unsupported(ref: nn.Module, table: dict, allow_training_differences: bool, what: str) -> None:
    _raise_unsupported(_table_findings(ref, table), allow_training_differences, what)


def _gumbel_keywords(book: nn.Module) -> dict:
    fn = getattr(book, "gumbel_sample", None)
    return dict(getattr(fn, "keywords", None) or {})


def _sync_options(book: nn.Module) -> dict:
    """``sync_codebook`` / ``sync_kmeans`` from the reference codebook's resolved DDP functions."""
    if not bool(getattr(book, "use_ddp", False)):
        # resolved at construction: False also when the module was merely built outside a process group.
        # vqcore's None decides at every call (and sync_kmeans is unobservable here: keep the default)
        return dict(sync_codebook=None)
    sample_fn = getattr(book, "sample_fn", None)
    return dict(
        sync_codebook=True, sync_kmeans=getattr(sample_fn, "__name__", "") == "sample_vectors_distributed"
    )


def _vq_layer_kwargs(ref: nn.Module, allow_training_differences: bool, shared_codebook: bool = False) -> dict:
    """Options shared by the reference VectorQuantize and the layers of its ResidualVQ."""
    book = ref._codebook
    what = type(ref).__name__
    findings = _table_findings(ref, _VQ_UNSUPPORTED) + _table_findings(book, _CODEBOOK_UNSUPPORTED)
    orthogonal = float(ref.orthogonal_reg_weight)
    # the reference's codebook is learnable with orthogonal regularisation too (vqcore's is, internally);
    # a user's learnable_codebook=True is a gradient-trained codebook, without EMA (the reference skips it)
    learnable = bool(ref.learnable_codebook) and orthogonal <= 0
    gumbel = _gumbel_keywords(book)
    if gumbel.get("straight_through", False):
        findings.append((_TRAIN, "straight_through=True (Gumbel straight-through)"))
    if bool(getattr(book, "manual_ema_update", False)) and not shared_codebook:
        findings.append((_TRAIN, "manual_ema_update=True"))
    _raise_unsupported(findings, allow_training_differences, what)
    kwargs = dict(
        decay=float(book.decay),
        eps=float(book.eps),
        kmeans_init=not bool(book.initted),
        kmeans_iters=int(book.kmeans_iters),
        use_cosine_sim=bool(ref.use_cosine_sim),
        threshold_ema_dead_code=float(book.threshold_ema_dead_code),
        commitment_weight=float(ref.commitment_weight),
        orthogonal_reg_weight=orthogonal,
        orthogonal_reg_active_codes_only=bool(ref.orthogonal_reg_active_codes_only),
        orthogonal_reg_max_codes=ref.orthogonal_reg_max_codes,
        stochastic_sample_codes=bool(gumbel.get("stochastic", False)),
        sample_codebook_temp=float(book.sample_codebook_temp),
        rotation_trick=bool(ref.rotation_trick),
        ema_update=bool(book.ema_update) and not learnable,
        learnable_codebook=learnable,
        freeze_codebook=bool(ref.freeze_codebook),
        return_zeros_for_masked_padding=bool(ref.return_zeros_for_masked_padding),
        **_sync_options(book),
    )
    return kwargs


def _layout_kwargs(image: bool, video: bool, channel_last: bool) -> dict:
    # the reference ignores channel_last for image / video fmaps (always channel-first);
    # vqcore rejects the pair
    return dict(accept_image_fmap=image, accept_3d_fmap=video, channel_last=channel_last or image or video)


def _linear(module) -> nn.Module | None:
    if isinstance(module, nn.Sequential):
        module = module[0]
    return module if isinstance(module, nn.Linear) else None


def reference_kwargs(ref: nn.Module, allow_training_differences: bool = False) -> tuple[str, dict]:
    """``(vqcore class name, constructor kwargs)`` equivalent to the reference module ``ref``."""
    kind = type(ref).__name__
    if kind == "VectorQuantize":
        embed = ref._codebook.embed
        kwargs = dict(
            dim=int(ref.dim),
            codebook_size=int(ref.codebook_size),
            codebook_dim=int(embed.shape[-1]),
            heads=int(ref.heads),
            separate_codebook_per_head=bool(ref.separate_codebook_per_head),
            layernorm_after_project_in=isinstance(ref.project_in, nn.Sequential),
            **_layout_kwargs(bool(ref.accept_image_fmap), bool(ref.accept_3d_fmap), bool(ref.channel_last)),
            **_vq_layer_kwargs(ref, allow_training_differences),
        )
        return kind, kwargs
    if kind == "ResidualVQ":
        _check_unsupported(ref, _RVQ_UNSUPPORTED, allow_training_differences, kind)
        layers = list(ref.layers)
        layer = layers[0]
        if any(bool(getattr(lay, "has_projections", False)) for lay in layers):
            raise ValueError(
                "vqcore.compat: reference ResidualVQ layers with their own projections are not supported"
            )
        sizes = tuple(int(s) for s in ref.codebook_sizes)
        shared = bool(ref.shared_codebook)
        # the layers share every option (one **vq_kwargs), but not their k-means state: quantize dropout (or a
        # layer called on its own) can leave later layers un-initialised while the first one has run k-means
        layer_kwargs = _vq_layer_kwargs(layer, allow_training_differences, shared_codebook=shared)
        layer_kwargs["kmeans_init"] = not all(bool(lay._codebook.initted) for lay in layers)
        dim = _linear(ref.project_in).in_features if ref.has_projections else int(ref.codebook_dim)
        # the layout: accept_image_fmap is the RVQ's own option, accept_3d_fmap / channel_last reach the
        # layers through **vq_kwargs. The reference's residual bookkeeping is channel-last only, so its
        # forward breaks on these layouts (see the module docstring); vqcore quantizes every position as
        # a token, as meant.
        layout = _layout_kwargs(
            bool(ref.accept_image_fmap) or bool(layer.accept_image_fmap),
            bool(layer.accept_3d_fmap),
            bool(layer.channel_last),
        )
        kwargs = dict(
            dim=dim,
            num_quantizers=int(ref.num_quantizers),
            codebook_size=sizes[0] if len(set(sizes)) == 1 else sizes,
            codebook_dim=int(ref.codebook_dim),
            shared_codebook=shared,
            quantize_dropout=bool(ref.quantize_dropout),
            quantize_dropout_cutoff_index=int(ref.quantize_dropout_cutoff_index),
            quantize_dropout_multiple_of=int(ref.quantize_dropout_multiple_of),
            **layout,
            **layer_kwargs,
        )
        return kind, kwargs
    if kind == "GroupedResidualVQ":
        _, rvq_kwargs = reference_kwargs(ref.rvqs[0], allow_training_differences)
        for key in ("dim", "accept_image_fmap", "accept_3d_fmap", "channel_last"):
            rvq_kwargs.pop(key)
        rvq_kwargs["kmeans_init"] = not all(
            bool(lay._codebook.initted) for rvq in ref.rvqs for lay in rvq.layers
        )
        layer = ref.rvqs[0].layers[0]
        # the reference splits the groups on axis 1 for image fmaps and on the last axis otherwise, also for
        # video / channel-first inputs (where that axis is a position, not the channels: its forward breaks);
        # vqcore always splits the channel axis, which is what the grouping means
        layout = _layout_kwargs(
            bool(ref.accept_image_fmap), bool(layer.accept_3d_fmap), bool(layer.channel_last)
        )
        return kind, dict(dim=int(ref.dim), groups=int(ref.groups), **layout, **rvq_kwargs)
    if kind == "FSQ":
        findings = _table_findings(ref, _FSQ_UNSUPPORTED)
        low = [d for d in getattr(ref, "allowed_dtypes", ()) if d not in (torch.float32, torch.float64)]
        if not bool(getattr(ref, "force_quantization_f32", True)):
            findings.append((_PRECISION, "force_quantization_f32=False"))
        elif low:
            findings.append((_PRECISION, f"allowed_dtypes includes {', '.join(map(str, low))}"))
        _raise_unsupported(findings, allow_training_differences, kind)
        proj = _linear(ref.project_in)
        kwargs = dict(
            levels=[int(v) for v in ref._levels.tolist()],
            dim=int(ref.dim),
            num_codebooks=int(ref.num_codebooks),
            keep_num_codebooks_dim=bool(ref.keep_num_codebooks_dim),
            return_indices=bool(ref.return_indices),
            preserve_symmetry=bool(ref.preserve_symmetry),
            channel_first=bool(ref.channel_first) or None,
            projection_has_bias=proj is None or proj.bias is not None,
            bound_hard_clamp=bool(ref.bound_hard_clamp),
        )
        return kind, kwargs
    if kind == "LFQ":
        findings = _table_findings(ref, _LFQ_UNSUPPORTED)
        if ref.has_projections and _linear(ref.project_in) is None:  # CosineSimLinear
            findings.append(
                (_EVAL, f"cosine_sim_project_in=True ({type(ref.project_in).__name__} project_in)")
            )
        activation = getattr(ref, "activation", None)
        if activation is not None and not isinstance(activation, nn.Identity):
            findings.append((_TRAIN, f"straight_through_activation={type(activation).__name__}"))
        if not bool(
            getattr(ref, "force_quantization_f32", True)
        ):  # the signs, hence the codes, do not change
            findings.append((_TRAIN, "force_quantization_f32=False"))
        _raise_unsupported(findings, allow_training_differences, kind)
        proj = _linear(ref.project_in)
        kwargs = dict(
            dim=int(ref.dim),
            codebook_size=int(ref.codebook_size),
            entropy_loss_weight=float(ref.entropy_loss_weight),
            commitment_loss_weight=float(ref.commitment_loss_weight),
            diversity_gamma=float(ref.diversity_gamma),
            num_codebooks=int(ref.num_codebooks),
            keep_num_codebooks_dim=bool(ref.keep_num_codebooks_dim),
            codebook_scale=float(ref.codebook_scale),
            channel_first=ref.channel_first,
            projection_has_bias=proj is None or proj.bias is not None,
            has_projections=bool(ref.has_projections),
        )
        return kind, kwargs
    if kind == "LatentQuantize":
        findings = _table_findings(ref, _LQ_UNSUPPORTED)
        levels = [int(v) for v in ref._levels.tolist()]
        if int(ref.codebook_dim) != len(levels):
            findings.append((_EVAL, f"codebook_dim={int(ref.codebook_dim)} with {len(levels)} levels"))
        _raise_unsupported(findings, allow_training_differences, kind)
        proj = _linear(ref.project_in)
        kwargs = dict(
            levels=levels,
            dim=int(ref.dim),
            commitment_loss_weight=float(ref.commitment_loss_weight),
            quantization_loss_weight=float(ref.quantization_loss_weight),
            num_codebooks=int(ref.num_codebooks),
            keep_num_codebooks_dim=bool(ref.keep_num_codebooks_dim),
            optimize_values=bool(ref.values_per_latent[0].requires_grad),
            # the reference reads every input channel-first, (b, dim, n) included; vqcore's default
            # (channel_first=None) would read a 3-D input as (b, n, dim)
            channel_first=True,
            projection_has_bias=proj is None or proj.bias is not None,
        )
        return kind, kwargs
    raise ValueError(
        f"vqcore.compat: no conversion for reference class {kind!r}; supported: VectorQuantize, ResidualVQ, "
        "GroupedResidualVQ, FSQ, LFQ, LatentQuantize"
    )


def from_reference(ref: nn.Module, allow_training_differences: bool = False) -> nn.Module:
    """Build the vqcore module equivalent to the reference module ``ref`` and load its state into it.

    The result is in the same train/eval mode as ``ref`` and on its device.
    """
    import vqcore

    kind, kwargs = reference_kwargs(ref, allow_training_differences)
    module = getattr(vqcore, kind)(**kwargs)
    load_reference_state_dict(module, ref.state_dict())
    device = next((t.device for t in ref.state_dict().values()), None)
    if device is not None:
        module.to(device)
    return module.train(ref.training)


# -- state_dict mapping -------------------------------------------------------------------------------
_CODEBOOK_KEYS = ("embed", "cluster_size", "embed_avg", "initted")


def _codebook_map(own: Mapping[str, Tensor], sd: Mapping[str, Tensor], src: str, dst: str, out: dict) -> None:
    """One EMA codebook ``{src}{name}`` -> ``{dst}{name}``.

    A reference k-means codebook that never saw a batch (``initted`` False) holds zeros as placeholder codes
    (and cluster sizes of 1): that is no trained state. The vqcore module keeps its own placeholders (random
    codes, never zeros) and loads ``initted = False``, so k-means runs on its first training batch.
    """
    initted = sd[f"{src}initted"]
    for name in _CODEBOOK_KEYS:
        if name != "initted" and not bool(initted) and f"{dst}{name}" in own:
            out[f"{dst}{name}"] = own[f"{dst}{name}"]
        else:
            out[f"{dst}{name}"] = sd[f"{src}{name}"]


def _vq_map(module, own, sd: Mapping[str, Tensor], src: str, dst: str, out: dict) -> None:
    _codebook_map(own, sd, f"{src}_codebook.", f"{dst}_codebook.", out)
    _projection_map(module, sd, src, dst, out, layernorm_to=f"{dst}norm_in.")


def _projection_map(module, sd, src: str, dst: str, out: dict, layernorm_to: str | None = None) -> None:
    for side in ("project_in", "project_out"):
        keys = [k for k in sd if k.startswith(f"{src}{side}.")]
        if not keys:
            continue
        if not isinstance(getattr(module, side), nn.Linear):
            raise ValueError(
                f"vqcore.compat: the reference state has {side} weights but the vqcore module has no {side} "
                "(build it with the same dim / codebook_dim)"
            )
        for key in keys:
            rest = key[len(src) + len(side) + 1 :]
            if rest.startswith("0."):  # Sequential(Linear, LayerNorm) with layernorm_after_project_in
                rest = rest[2:]
            elif rest.startswith("1."):
                if layernorm_to is None:
                    raise ValueError(f"vqcore.compat: unexpected key {key!r}")
                out[layernorm_to + rest[2:]] = sd[key]
                continue
            out[f"{dst}{side}.{rest}"] = sd[key]


def _rvq_map(module, own, sd, src: str, dst: str, out: dict) -> None:
    _projection_map(module, sd, src, dst, out)
    if module.shared_codebook:  # the reference repeats the one codebook under every layer's keys
        _codebook_map(own, sd, f"{src}layers.0._codebook.", f"{dst}_shared_codebook.", out)
        return
    for i in range(module.num_quantizers):
        _codebook_map(own, sd, f"{src}layers.{i}._codebook.", f"{dst}layers.{i}._codebook.", out)


def load_reference_state_dict(module: nn.Module, ref_state_dict: Mapping[str, Tensor], strict: bool = True):
    """Load a vector-quantize-pytorch 1.32.0 ``state_dict`` into the matching vqcore ``module``.

    Returns ``module.load_state_dict``'s result. Shapes must match (build the module with the reference's
    options, e.g. through :func:`reference_kwargs`); a mismatch raises ``RuntimeError`` from
    ``load_state_dict``. The module's layout options (image / video fmaps, channel-first) are not part of
    the state: build it with the ones the reference module was given.
    """
    kind = type(module).__name__
    sd = dict(ref_state_dict)
    own = module.state_dict()
    out: dict[str, Tensor] = {}
    try:
        if kind == "VectorQuantize":
            _vq_map(module, own, sd, "", "", out)
        elif kind == "ResidualVQ":
            _rvq_map(module, own, sd, "", "", out)
        elif kind == "GroupedResidualVQ":
            for g, rvq in enumerate(module.rvqs):
                _rvq_map(rvq, own, sd, f"rvqs.{g}.", f"rvqs.{g}.", out)
        elif kind in ("FSQ", "LFQ"):  # the reference LFQ's ``mask`` buffer holds bit weights: not state
            _projection_map(module, sd, "", "", out)
        elif kind == "LatentQuantize":
            _projection_map(module, sd, "", "", out)
            for i in range(len(module.values_per_latent)):
                key = f"values_per_latent.{i}"
                # with optimize_values=False the reference keeps its tables in a plain list: not in its
                # state_dict, and always the initial grid, which a fresh vqcore module holds too
                out[key] = sd[key] if key in sd or module.optimize_values else own[key]
        else:
            raise ValueError(f"vqcore.compat: no reference mapping for vqcore class {kind!r}")
    except KeyError as err:
        raise ValueError(
            f"vqcore.compat: the reference state_dict has no key {err.args[0]!r} needed by {kind}"
        ) from None
    with torch.no_grad():
        return module.load_state_dict(out, strict=strict)
