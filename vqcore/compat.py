"""Migration from vector-quantize-pytorch 1.32.0 ("the reference"): rebuild a trained module in vqcore.

``from_reference(ref)`` reads the constructor options back from a reference module's attributes, builds
the matching vqcore module and loads the reference's trained state into it (EMA codebooks, projections,
latent value tables); eval outputs and indices then agree with the reference. ``load_reference_state_dict``
maps a reference ``state_dict`` onto an existing vqcore module (build it with the same options; note that
vqcore's ``VectorQuantize`` defaults ``codebook_dim`` to ``dim // heads`` where the reference uses ``dim``
per head, so pass ``codebook_dim`` explicitly when converting a module with heads).

Supported: ``VectorQuantize``, ``ResidualVQ``, ``GroupedResidualVQ``, ``FSQ``, ``LFQ``,
``LatentQuantize``. Reference options that vqcore does not implement raise a ``ValueError`` naming
them. Options that only change training (losses, gradient routing) raise too unless
``allow_training_differences=True``: the converted module then gives the reference's eval outputs,
while training follows vqcore's semantics. vqcore's own training semantics differ on purpose in places
(straight-through is the default estimator, the shared RVQ codebook is updated once per step, ...):
see the docstrings of the plugin modules.

The reference package is needed only by :func:`from_reference`'s caller (it passes a reference module
in); this module never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["from_reference", "load_reference_state_dict", "reference_kwargs"]


# (attribute, default) pairs: a reference module whose attribute differs from the default uses a feature
# that vqcore lacks. "eval": it changes eval outputs / indices (always an error); "train": training only.
_VQ_UNSUPPORTED = {
    "eval": [("directional_reparam", False)],
    "train": [
        ("learnable_codebook", None),  # checked separately (orthogonal regularisation makes it learnable)
        ("commitment_use_cross_entropy_loss", False),
        ("codebook_diversity_loss_weight", 0.0),
        ("in_place_codebook_optimizer", None),
        ("sync_update_v", 0.0),
        ("route_gradients_to_input", True),
    ],
}
# (the reference's shared RVQ codebook sets ``manual_ema_update`` on its layers: not a user option)
_CODEBOOK_UNSUPPORTED = {"eval": [("affine_param", False), ("vq_bridge", None)], "train": []}
_RVQ_UNSUPPORTED = {
    "eval": [("implicit_neural_codebook", False), ("diveq", False), ("beam_size", None), ("eval_beam_size", None)],
    "train": [("quant_grad_frac", 0.0)],
}
_FSQ_UNSUPPORTED = {"eval": [("orthogonal_rotation", False), ("scale", None)], "train": [("noise_dropout", 0.0)]}
_LFQ_UNSUPPORTED = {
    "eval": [("spherical", False), ("orthogonal_rotation", False), ("soft_clamp_input_value", None)],
    "train": [
        ("frac_per_sample_entropy", 1.0),
        ("experimental_softplus_entropy_loss", False),
        ("entropy_loss_offset", 5.0),
    ],
}
_LQ_UNSUPPORTED = {"eval": [], "train": [("in_place_codebook_optimizer", None)]}


def _check_unsupported(ref: nn.Module, table: dict, allow_training_differences: bool, what: str) -> None:
    bad = []
    for kind in ("eval", "train"):
        if kind == "train" and allow_training_differences:
            continue
        for attr, default in table[kind]:
            if attr == "learnable_codebook":
                continue
            if not hasattr(ref, attr):
                continue
            value = getattr(ref, attr)
            if isinstance(value, Tensor):
                value = value.item()
            if value is None and default is None:
                continue
            if (value is None) != (default is None) or (default is not None and value != default):
                bad.append(f"{attr}={value!r} ({'changes eval outputs' if kind == 'eval' else 'training only'})")
    if bad:
        hint = (
            ""
            if all("eval outputs" in b for b in bad)
            else "; pass allow_training_differences=True to convert anyway (eval outputs agree, training differs)"
        )
        raise ValueError(f"vqcore.compat: reference {what} uses options vqcore does not support: {', '.join(bad)}{hint}")


def _stochastic(book: nn.Module) -> bool:
    fn = getattr(book, "gumbel_sample", None)
    return bool(getattr(fn, "keywords", {}).get("stochastic", False))


def _vq_layer_kwargs(ref: nn.Module, allow_training_differences: bool) -> dict:
    """Options shared by the reference VectorQuantize and the layers of its ResidualVQ."""
    _check_unsupported(ref, _VQ_UNSUPPORTED, allow_training_differences, type(ref).__name__)
    book = ref._codebook
    _check_unsupported(book, _CODEBOOK_UNSUPPORTED, allow_training_differences, "codebook")
    orthogonal = float(ref.orthogonal_reg_weight)
    if ref.learnable_codebook and orthogonal <= 0 and not allow_training_differences:
        raise ValueError(
            "vqcore.compat: reference VectorQuantize uses learnable_codebook=True without orthogonal "
            "regularisation, which vqcore does not support; pass allow_training_differences=True to convert anyway"
        )
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
        stochastic_sample_codes=_stochastic(book),
        sample_codebook_temp=float(book.sample_codebook_temp),
        rotation_trick=bool(ref.rotation_trick),
        ema_update=bool(book.ema_update),
        freeze_codebook=bool(ref.freeze_codebook),
        return_zeros_for_masked_padding=bool(ref.return_zeros_for_masked_padding),
    )
    return kwargs


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
            channel_last=bool(ref.channel_last),
            accept_image_fmap=bool(ref.accept_image_fmap),
            accept_3d_fmap=bool(ref.accept_3d_fmap),
            **_vq_layer_kwargs(ref, allow_training_differences),
        )
        return kind, kwargs
    if kind == "ResidualVQ":
        _check_unsupported(ref, _RVQ_UNSUPPORTED, allow_training_differences, kind)
        layer = ref.layers[0]
        if bool(getattr(layer, "has_projections", False)):
            raise ValueError("vqcore.compat: reference ResidualVQ layers with their own projections are not supported")
        sizes = tuple(int(s) for s in ref.codebook_sizes)
        layer_kwargs = _vq_layer_kwargs(layer, allow_training_differences)
        dim = _linear(ref.project_in).in_features if ref.has_projections else int(ref.codebook_dim)
        kwargs = dict(
            dim=dim,
            num_quantizers=int(ref.num_quantizers),
            codebook_size=sizes[0] if len(set(sizes)) == 1 else sizes,
            codebook_dim=int(ref.codebook_dim),
            shared_codebook=bool(ref.shared_codebook),
            quantize_dropout=bool(ref.quantize_dropout),
            quantize_dropout_cutoff_index=int(ref.quantize_dropout_cutoff_index),
            quantize_dropout_multiple_of=int(ref.quantize_dropout_multiple_of),
            accept_image_fmap=bool(ref.accept_image_fmap),
            **layer_kwargs,
        )
        return kind, kwargs
    if kind == "GroupedResidualVQ":
        _, rvq_kwargs = reference_kwargs(ref.rvqs[0], allow_training_differences)
        rvq_kwargs.pop("dim")
        rvq_kwargs.pop("accept_image_fmap")
        return kind, dict(dim=int(ref.dim), groups=int(ref.groups), accept_image_fmap=bool(ref.accept_image_fmap), **rvq_kwargs)
    if kind == "FSQ":
        _check_unsupported(ref, _FSQ_UNSUPPORTED, allow_training_differences, kind)
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
        _check_unsupported(ref, _LFQ_UNSUPPORTED, allow_training_differences, kind)
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
        _check_unsupported(ref, _LQ_UNSUPPORTED, allow_training_differences, kind)
        proj = _linear(ref.project_in)
        kwargs = dict(
            levels=[int(v) for v in ref._levels.tolist()],
            dim=int(ref.dim),
            commitment_loss_weight=float(ref.commitment_loss_weight),
            quantization_loss_weight=float(ref.quantization_loss_weight),
            num_codebooks=int(ref.num_codebooks),
            keep_num_codebooks_dim=bool(ref.keep_num_codebooks_dim),
            optimize_values=bool(ref.values_per_latent[0].requires_grad),
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


def _vq_map(module, sd: Mapping[str, Tensor], src: str, dst: str, out: dict) -> None:
    for name in _CODEBOOK_KEYS:
        out[f"{dst}_codebook.{name}"] = sd[f"{src}_codebook.{name}"]
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


def _rvq_map(module, sd, src: str, dst: str, out: dict) -> None:
    _projection_map(module, sd, src, dst, out)
    if module.shared_codebook:
        for name in _CODEBOOK_KEYS:
            out[f"{dst}_shared_codebook.{name}"] = sd[f"{src}layers.0._codebook.{name}"]
        return
    for i in range(module.num_quantizers):
        for name in _CODEBOOK_KEYS:
            out[f"{dst}layers.{i}._codebook.{name}"] = sd[f"{src}layers.{i}._codebook.{name}"]


def load_reference_state_dict(module: nn.Module, ref_state_dict: Mapping[str, Tensor], strict: bool = True):
    """Load a vector-quantize-pytorch 1.32.0 ``state_dict`` into the matching vqcore ``module``.

    Returns ``module.load_state_dict``'s result. Shapes must match (build the module with the reference's
    options, e.g. through :func:`reference_kwargs`); a mismatch raises ``RuntimeError`` from
    ``load_state_dict``.
    """
    kind = type(module).__name__
    sd = dict(ref_state_dict)
    out: dict[str, Tensor] = {}
    try:
        if kind == "VectorQuantize":
            _vq_map(module, sd, "", "", out)
        elif kind == "ResidualVQ":
            _rvq_map(module, sd, "", "", out)
        elif kind == "GroupedResidualVQ":
            for g, rvq in enumerate(module.rvqs):
                _rvq_map(rvq, sd, f"rvqs.{g}.", f"rvqs.{g}.", out)
        elif kind in ("FSQ", "LFQ"):  # the reference LFQ's ``mask`` buffer holds bit weights: not state
            _projection_map(module, sd, "", "", out)
        elif kind == "LatentQuantize":
            _projection_map(module, sd, "", "", out)
            for i in range(len(module.values_per_latent)):
                out[f"values_per_latent.{i}"] = sd[f"values_per_latent.{i}"]
        else:
            raise ValueError(f"vqcore.compat: no reference mapping for vqcore class {kind!r}")
    except KeyError as err:
        raise ValueError(f"vqcore.compat: the reference state_dict has no key {err.args[0]!r} needed by {kind}") from None
    with torch.no_grad():
        return module.load_state_dict(out, strict=strict)
