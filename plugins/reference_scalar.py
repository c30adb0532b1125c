"""Converters from vector-quantize-pytorch 1.32.0 FSQ, ResidualFSQ, GroupedResidualFSQ, FSP, LFQ, ResidualLFQ,
GroupedResidualLFQ, BinaryMapper and LatentQuantize.

Each follows :class:`vqcore.protocols.ReferenceConverter` and is registered under the reference's class
name. The options are read from the reference module's public attributes (its levels through
``ref.get_buffer("_levels")``); the state is mapped from the vqcore module's ``state_dict`` keys only.

Mapping rules (the module docstring of :mod:`vqcore.compat` lists the user-visible ones):

- the trained state is the projections (``project_in`` / ``project_out``) and, for LatentQuantize, the
  value tables ``values_per_latent.{i}``; the reference LFQ's ``mask`` buffer holds bit weights, not state;
- FSQ ``scale`` is stored but never used by the reference: it is accepted and ignored;
- the FSQ family's state_dict keys are the reference's (projections, ``orthogonal_rot`` per FSQ,
  ``layers.{q}`` and ``rvqs.{g}`` prefixes): the state is the reference's entry under each key;
- the reference LatentQuantize reads every input channel-first, ``(b, dim, n)`` included: it converts to
  ``channel_first=True``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.blocks.conversion import (
    CHANGES_EVAL,
    TRAINING_ONLY,
    ReferenceModule,
    UnsupportedOptions,
    linear_of,
    list_entries,
    map_projections,
    raise_unsupported,
)
from vqcore.hookspecs import hookimpl
from vqcore.plugins.fsp import VECTOR_NORM_PRESETS, VectorNorm

# Reference options that vqcore does not implement.
FSQ_UNSUPPORTED = UnsupportedOptions()
LFQ_UNSUPPORTED = UnsupportedOptions()
LATENT_UNSUPPORTED = UnsupportedOptions()


def _levels(ref: ReferenceModule) -> list[int]:
    return [int(v) for v in ref.get_buffer("_levels").tolist()]


def _projection_has_bias(ref: ReferenceModule) -> bool:
    """Whether the reference's ``project_in`` has a bias (True without projections: vqcore's default)."""
    proj = linear_of(ref.project_in)
    return proj is None or proj.bias is not None


def _map_projections(own: Mapping[str, Tensor], ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    map_projections(own, ref_state_dict, out)
    return out


def _fsq_options(ref: ReferenceModule) -> dict[str, Any]:
    """The options of a reference FSQ that its residual stacks forward to their layers too."""
    return dict(
        scale=ref.scale,
        allowed_dtypes=[str(d).removeprefix("torch.") for d in ref.allowed_dtypes],
        force_quantization_f32=bool(ref.force_quantization_f32),
        noise_dropout=float(ref.noise_dropout),
        orthogonal_rotation=bool(ref.orthogonal_rotation),
    )


def _fsq_findings(ref: ReferenceModule) -> list:
    """The reference's noise mask has probability 0.5 whatever ``noise_dropout`` (vqcore's: the value)."""
    noise = float(ref.noise_dropout)
    if noise in (0.0, 0.5):
        return []
    return [(TRAINING_ONLY, f"noise_dropout={noise} (the reference adds noise with probability 0.5)")]


def _reference_entries(module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The reference's entry under each of ``module``'s state_dict keys: the FSQ and LFQ families keep the
    reference's keys (projections, ``orthogonal_rot``, activation parameters, ``layers.{q}`` and
    ``rvqs.{g}`` prefixes). A missing key raises KeyError; a reference entry the module lacks raises
    ValueError, but the reference LFQ's ``mask`` buffers (bit weights, not state)."""
    own = module.state_dict()
    for key in ref_state_dict:
        if key not in own and key.rsplit(".", 1)[-1] != "mask":
            raise ValueError(
                f"vqcore.compat: the reference state has {key!r} but the vqcore module has no such entry "
                "(build it with the same dim / codebook_size / options)"
            )
    return {key: ref_state_dict[key] for key in own}


class FSQConverter:
    """Reference ``FSQ`` -> vqcore ``FSQ``: the projections and the rotation are the whole state."""

    quantizer = "FSQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        findings = FSQ_UNSUPPORTED.findings(ref) + _fsq_findings(ref)
        raise_unsupported(findings, allow_training_differences, type(ref).__name__)
        return dict(
            levels=_levels(ref),
            dim=int(ref.dim),
            num_codebooks=int(ref.num_codebooks),
            keep_num_codebooks_dim=bool(ref.keep_num_codebooks_dim),
            return_indices=bool(ref.return_indices),
            preserve_symmetry=bool(ref.preserve_symmetry),
            channel_first=bool(ref.channel_first) or None,
            projection_has_bias=_projection_has_bias(ref),
            bound_hard_clamp=bool(ref.bound_hard_clamp),
            **_fsq_options(ref),
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _reference_entries(module, ref_state_dict)


def _residual_fsq_options(ref: ReferenceModule) -> dict[str, Any]:
    """A reference ResidualFSQ's options, but its ``dim``."""
    layer = ref.layers[0]
    clamp = getattr(ref, "soft_clamp_input_value", None)  # a buffer, None without soft clamping
    hard = bool(layer.bound_hard_clamp)
    return dict(
        levels=[int(v) for v in ref.levels],
        num_quantizers=int(ref.num_quantizers),
        is_channel_first=bool(ref.is_channel_first),
        quantize_dropout=bool(ref.quantize_dropout),
        quantize_dropout_cutoff_index=int(ref.quantize_dropout_cutoff_index),
        quantize_dropout_multiple_of=int(ref.quantize_dropout_multiple_of),
        bound_hard_clamp=hard,
        soft_clamp_input_value=None if hard or clamp is None else clamp.tolist(),
        **_fsq_options(layer),
    )


def _residual_fsq_dim(ref: ReferenceModule) -> int:
    proj = linear_of(ref.project_in)
    return len(ref.levels) if proj is None else int(proj.in_features)


class ResidualFSQConverter:
    """Reference ``ResidualFSQ`` -> vqcore ``ResidualFSQ``: projections and the layers' rotations."""

    quantizer = "ResidualFSQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        raise_unsupported(_fsq_findings(ref.layers[0]), allow_training_differences, type(ref).__name__)
        return dict(dim=_residual_fsq_dim(ref), **_residual_fsq_options(ref))

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _reference_entries(module, ref_state_dict)


class GroupedResidualFSQConverter:
    """Reference ``GroupedResidualFSQ`` -> vqcore ``GroupedResidualFSQ``: every group's stack."""

    quantizer = "GroupedResidualFSQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        layer = ref.rvqs[0].layers[0]
        raise_unsupported(_fsq_findings(layer), allow_training_differences, type(ref).__name__)
        return dict(
            dim=int(ref.dim),
            groups=int(ref.groups),
            accept_image_fmap=bool(ref.accept_image_fmap),
            **_residual_fsq_options(ref.rvqs[0]),
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _reference_entries(module, ref_state_dict)


def _lfq_layer_kwargs(ref: ReferenceModule) -> tuple[list[Any], dict[str, Any]]:
    """(findings, vqcore LFQ kwargs) of the options of a reference LFQ (or of a residual stack's layer)
    that are not about its size, scale, codebooks or projections."""
    findings = LFQ_UNSUPPORTED.findings(ref)
    if not bool(getattr(ref, "force_quantization_f32", True)):  # the signs, hence the codes, stay
        findings.append((TRAINING_ONLY, "force_quantization_f32=False"))
    activation = getattr(ref, "activation", None)
    kwargs = dict(
        entropy_loss_weight=float(ref.entropy_loss_weight),
        commitment_loss_weight=float(ref.commitment_loss_weight),
        diversity_gamma=float(ref.diversity_gamma),
        frac_per_sample_entropy=float(ref.frac_per_sample_entropy),
        experimental_softplus_entropy_loss=bool(ref.experimental_softplus_entropy_loss),
        entropy_loss_offset=float(ref.entropy_loss_offset),
        spherical=bool(ref.spherical),
        orthogonal_rotation=bool(ref.orthogonal_rotation),
        # a copy: the converted module must not share (and train) the reference's activation module
        straight_through_activation=(
            None if activation is None or isinstance(activation, nn.Identity) else copy.deepcopy(activation)
        ),
    )
    return findings, kwargs


class LFQConverter:
    """Reference ``LFQ`` -> vqcore ``LFQ``: projections (a cosine-similarity ``project_in`` included),
    the rotation and the activation's parameters are the state."""

    quantizer = "LFQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        findings, options = _lfq_layer_kwargs(ref)
        raise_unsupported(findings, allow_training_differences, type(ref).__name__)
        cosine = bool(ref.has_projections) and linear_of(ref.project_in) is None  # CosineSimLinear
        out_proj = linear_of(ref.project_out)
        return dict(
            dim=int(ref.dim),
            codebook_size=int(ref.codebook_size),
            num_codebooks=int(ref.num_codebooks),
            keep_num_codebooks_dim=bool(ref.keep_num_codebooks_dim),
            codebook_scale=float(ref.codebook_scale),
            channel_first=ref.channel_first,
            projection_has_bias=out_proj is None or out_proj.bias is not None,
            has_projections=bool(ref.has_projections),
            soft_clamp_input_value=ref.soft_clamp_input_value,
            cosine_sim_project_in=cosine,
            cosine_sim_project_in_scale=float(ref.project_in.scale) if cosine else None,
            **options,
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _reference_entries(module, ref_state_dict)


def _residual_lfq_kwargs(ref: ReferenceModule, allow_training_differences: bool) -> dict[str, Any]:
    first = ref.layers[0]
    findings, options = _lfq_layer_kwargs(first)
    raise_unsupported(findings, allow_training_differences, type(ref).__name__)
    proj = linear_of(ref.project_in)
    codebook_dim = int(first.codebook_dim)
    return dict(
        dim=codebook_dim if proj is None else int(proj.in_features),
        codebook_size=int(first.codebook_size),
        num_quantizers=int(ref.num_quantizers),
        quantize_dropout=bool(ref.quantize_dropout),
        quantize_dropout_cutoff_index=int(ref.quantize_dropout_cutoff_index),
        quantize_dropout_multiple_of=int(ref.quantize_dropout_multiple_of),
        soft_clamp_input_value=first.soft_clamp_input_value,
        **options,
    )


class ResidualLFQConverter:
    """Reference ``ResidualLFQ`` -> vqcore ``ResidualLFQ``: the options of its first layer (every layer
    gets the same ones), the projections and each layer's rotation and activation parameters."""

    quantizer = "ResidualLFQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        return _residual_lfq_kwargs(ref, allow_training_differences)

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _reference_entries(module, ref_state_dict)


class GroupedResidualLFQConverter:
    """Reference ``GroupedResidualLFQ`` -> vqcore ``GroupedResidualLFQ``: the groups' ResidualLFQ options
    (read from the first group) and every group's state under the reference's keys."""

    quantizer = "GroupedResidualLFQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        options = _residual_lfq_kwargs(ref.rvqs[0], allow_training_differences)
        options.pop("dim")
        return dict(
            dim=int(ref.dim), groups=int(ref.groups), accept_image_fmap=bool(ref.accept_image_fmap), **options
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _reference_entries(module, ref_state_dict)


def in_place_optimizer_factory(ref: ReferenceModule) -> Callable[..., torch.optim.Optimizer] | None:
    """The reference LatentQuantize's in-place optimizer as a factory for the converted tables: the same
    optimizer class with the hyper-parameters its (single) group holds now. Its state is not carried: the
    reference never steps it. None without one, and for a frozen reference, which keeps the factory
    unbuilt (it has no tables to step)."""
    optimizer = getattr(ref, "in_place_codebook_optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    group = optimizer.param_groups[0]
    return functools.partial(type(optimizer), **{k: group[k] for k in optimizer.defaults if k in group})


class LatentQuantizeConverter:
    """Reference ``LatentQuantize`` -> vqcore ``LatentQuantize``: projections and value tables."""

    quantizer = "LatentQuantize"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        findings = LATENT_UNSUPPORTED.findings(ref)
        levels = _levels(ref)
        if int(ref.codebook_dim) != len(levels):
            findings.append((CHANGES_EVAL, f"codebook_dim={int(ref.codebook_dim)} with {len(levels)} levels"))
        raise_unsupported(findings, allow_training_differences, type(ref).__name__)
        return dict(
            levels=levels,
            dim=int(ref.dim),
            commitment_loss_weight=float(ref.commitment_loss_weight),
            quantization_loss_weight=float(ref.quantization_loss_weight),
            num_codebooks=int(ref.num_codebooks),
            keep_num_codebooks_dim=bool(ref.keep_num_codebooks_dim),
            optimize_values=bool(ref.values_per_latent[0].requires_grad),
            in_place_codebook_optimizer=in_place_optimizer_factory(ref),
            # the reference reads every input channel-first, (b, dim, n) included; vqcore's default
            # (channel_first=None) would read a 3-D input as (b, n, dim)
            channel_first=True,
            projection_has_bias=_projection_has_bias(ref),
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        own = module.state_dict(keep_vars=True)  # keep_vars: a table's requires_grad is optimize_values
        out = _map_projections(own, ref_state_dict)
        for i in list_entries(own, "values_per_latent."):
            key = f"values_per_latent.{i}"
            # with optimize_values=False the reference keeps its tables in a plain list: not in its
            # state_dict, and always the initial grid, which a fresh frozen vqcore table holds too
            out[key] = (
                ref_state_dict[key] if key in ref_state_dict or own[key].requires_grad else own[key].detach()
            )
        return out


# -- FSP and BinaryMapper -------------------------------------------------------------------------------


VECTOR_NORM_TERMS = tuple(f"l{k}_{part}" for k in range(1, 5) for part in ("target", "weight"))


def _vector_norm_preset(ref: ReferenceModule) -> str | None:
    """The preset whose targets and weights the reference FSP's ``vector_norm`` holds (None: no preset:
    the reference's constructor takes a preset name only, so only a module edited after construction)."""
    held = [getattr(ref.vector_norm, term) for term in VECTOR_NORM_TERMS]
    for name in VECTOR_NORM_PRESETS:
        preset = VectorNorm.build(name)
        if held == [getattr(preset, term) for term in VECTOR_NORM_TERMS]:
            return name
    return None


class FSPConverter:
    """Reference ``FSP`` -> vqcore ``FSP``: the projections are the whole state."""

    quantizer = "FSP"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        preset = _vector_norm_preset(ref)
        findings = (
            [] if preset is not None else [(TRAINING_ONLY, "vector_norm with targets/weights of no preset")]
        )
        raise_unsupported(findings, allow_training_differences, type(ref).__name__)
        return dict(
            levels=_levels(ref),
            dim=int(ref.dim),
            channel_first=bool(ref.channel_first),
            projection_has_bias=_projection_has_bias(ref),
            act_name=str(ref.act_name),
            quantize_rate=float(ref.quantize_rate),
            need_inv_act=bool(ref.need_inv_act),
            vector_norm=preset or "none",
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _map_projections(module.state_dict(), ref_state_dict)


class BinaryMapperConverter:
    """Reference ``BinaryMapper`` -> vqcore ``BinaryMapper``: options only (it has no state)."""

    quantizer = "BinaryMapper"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        return dict(
            bits=int(ref.bits),
            kl_loss_threshold=float(ref.kl_loss_threshold),
            deterministic_on_eval=bool(ref.deterministic_on_eval),
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {}


@hookimpl
def register_converters(register):
    register("FSQ", FSQConverter, summary="levels, codebooks, projections, symmetry and clamping options")
    register("ResidualFSQ", ResidualFSQConverter, summary="levels, layers, dropout, clamping, rotations")
    register("GroupedResidualFSQ", GroupedResidualFSQConverter, summary="groups of residual FSQ stacks")
    register("LFQ", LFQConverter, summary="entropy / commitment weights, codebooks, projections")
    register("ResidualLFQ", ResidualLFQConverter, summary="layers' LFQ options, dropout, projections")
    register("GroupedResidualLFQ", GroupedResidualLFQConverter, summary="groups of ResidualLFQ stacks")
    register(
        "LatentQuantize", LatentQuantizeConverter, summary="value tables (learned or frozen), projections"
    )
    register(
        "FSP", FSPConverter, summary="levels, activation, perturbation rate, vector_norm preset, projections"
    )
    register("BinaryMapper", BinaryMapperConverter, summary="bits, KL threshold, eval sampling (no state)")
