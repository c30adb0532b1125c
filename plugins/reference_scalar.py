"""Converters from vector-quantize-pytorch 1.32.0 ``FSQ``, ``LFQ`` and ``LatentQuantize``.

Each follows :class:`vqcore.protocols.ReferenceConverter` and is registered under the reference's class
name. The options are read from the reference module's public attributes (its levels through
``ref.get_buffer("_levels")``); the state is mapped from the vqcore module's ``state_dict`` keys only.

Mapping rules (the module docstring of :mod:`vqcore.compat` lists the user-visible ones):

- the trained state is the projections (``project_in`` / ``project_out``) and, for LatentQuantize, the
  value tables ``values_per_latent.{i}``; the reference LFQ's ``mask`` buffer holds bit weights, not state;
- FSQ ``scale`` is stored but never used by the reference: it is accepted and ignored;
- the reference LatentQuantize reads every input channel-first, ``(b, dim, n)`` included: it converts to
  ``channel_first=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.blocks.conversion import (
    CHANGES_EVAL,
    LOW_PRECISION,
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
FSQ_UNSUPPORTED = UnsupportedOptions(eval=(("orthogonal_rotation", False),), train=(("noise_dropout", 0.0),))
LFQ_UNSUPPORTED = UnsupportedOptions(
    eval=(("spherical", False), ("orthogonal_rotation", False), ("soft_clamp_input_value", None)),
    # (``entropy_loss_offset`` only acts together with the softplus entropy loss, which is reported)
    train=(("frac_per_sample_entropy", 1.0), ("experimental_softplus_entropy_loss", False)),
)
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


class FSQConverter:
    """Reference ``FSQ`` -> vqcore ``FSQ``: the projections are the whole state."""

    quantizer = "FSQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        findings = FSQ_UNSUPPORTED.findings(ref)
        low = [d for d in getattr(ref, "allowed_dtypes", ()) if d not in (torch.float32, torch.float64)]
        if not bool(getattr(ref, "force_quantization_f32", True)):
            findings.append((LOW_PRECISION, "force_quantization_f32=False"))
        elif low:
            findings.append((LOW_PRECISION, f"allowed_dtypes includes {', '.join(map(str, low))}"))
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
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _map_projections(module.state_dict(), ref_state_dict)


class LFQConverter:
    """Reference ``LFQ`` -> vqcore ``LFQ``: the projections are the whole state."""

    quantizer = "LFQ"

    def kwargs(self, ref: ReferenceModule, allow_training_differences: bool = False) -> dict[str, Any]:
        findings = LFQ_UNSUPPORTED.findings(ref)
        if ref.has_projections and linear_of(ref.project_in) is None:  # CosineSimLinear
            findings.append(
                (CHANGES_EVAL, f"cosine_sim_project_in=True ({type(ref.project_in).__name__} project_in)")
            )
        activation = getattr(ref, "activation", None)
        if activation is not None and not isinstance(activation, nn.Identity):
            findings.append((TRAINING_ONLY, f"straight_through_activation={type(activation).__name__}"))
        if not bool(getattr(ref, "force_quantization_f32", True)):  # the signs, hence the codes, stay
            findings.append((TRAINING_ONLY, "force_quantization_f32=False"))
        raise_unsupported(findings, allow_training_differences, type(ref).__name__)
        return dict(
            dim=int(ref.dim),
            codebook_size=int(ref.codebook_size),
            entropy_loss_weight=float(ref.entropy_loss_weight),
            commitment_loss_weight=float(ref.commitment_loss_weight),
            diversity_gamma=float(ref.diversity_gamma),
            num_codebooks=int(ref.num_codebooks),
            keep_num_codebooks_dim=bool(ref.keep_num_codebooks_dim),
            codebook_scale=float(ref.codebook_scale),
            channel_first=ref.channel_first,
            projection_has_bias=_projection_has_bias(ref),
            has_projections=bool(ref.has_projections),
        )

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _map_projections(module.state_dict(), ref_state_dict)


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


@hookimpl
def register_converters(register):
    register("FSQ", FSQConverter, summary="levels, codebooks, projections, symmetry and clamping options")
    register("LFQ", LFQConverter, summary="entropy / commitment weights, codebooks, projections")
    register(
        "LatentQuantize", LatentQuantizeConverter, summary="value tables (learned or frozen), projections"
    )
