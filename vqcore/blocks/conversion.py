"""Pieces every reference converter needs (see :class:`vqcore.protocols.ReferenceConverter`).

A converter rebuilds a vector-quantize-pytorch 1.32.0 module ("the reference") as a vqcore quantizer:
it reads the reference's options back from its attributes and maps its ``state_dict``. This module holds
what does not depend on the method:

- ``ReferenceModule``: the type of a reference module whose options a converter reads;
- :class:`UnsupportedOptions`: a table of ``(attribute, default)`` pairs of reference options vqcore
  lacks, whose findings :func:`raise_unsupported` reports in one ``ValueError``;
- :func:`linear_of`: the ``nn.Linear`` of a reference projection;
- :func:`map_projections`: ``project_in`` / ``project_out`` keys of a reference ``state_dict`` (the
  reference's ``Sequential(Linear, LayerNorm)`` included) onto a vqcore module's keys;
  :func:`list_entries`: the entries of a module list, read from ``state_dict`` keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

# What a finding's option does to a converted module; every finding is a ``(kind, "option=value")`` pair.
CHANGES_EVAL = "changes eval outputs"
TRAINING_ONLY = "training only"
LOW_PRECISION = (
    "quantizes in low precision; vqcore always quantizes in float32 (same outputs for float32 inputs)"
)

Finding = tuple[str, str]

# A reference module as converters read it: an ``nn.Module`` whose options are plain attributes set by its
# constructor (ints, floats, bools, submodules), which the ``nn.Module`` type does not describe.
ReferenceModule = Any


def differs(value: Any, default: Any) -> bool:
    """Whether a reference attribute's ``value`` (a 0-dim tensor read as a number) is not ``default``."""
    if isinstance(value, Tensor):
        value = value.item()
    if value is None or default is None:
        return (value is None) != (default is None)
    return value != default


@dataclass(frozen=True)
class UnsupportedOptions:
    """Reference options vqcore lacks, as ``(attribute, default)`` pairs: a reference module whose
    attribute differs from the default uses the option. ``eval``: the option changes eval outputs or
    indices (always an error); ``train``: it changes training only (converted on opt-in)."""

    eval: tuple[tuple[str, Any], ...] = ()
    train: tuple[tuple[str, Any], ...] = ()

    def findings(self, ref: nn.Module) -> list[Finding]:
        """``(kind, "attr=value")`` for every attribute of the table that ``ref`` has and sets to a
        value other than its default (an attribute ``ref`` lacks is not set)."""
        found = []
        for kind, pairs in ((CHANGES_EVAL, self.eval), (TRAINING_ONLY, self.train)):
            for attr, default in pairs:
                if hasattr(ref, attr) and differs(getattr(ref, attr), default):
                    value = getattr(ref, attr)
                    value = value.item() if isinstance(value, Tensor) else value
                    found.append((kind, f"{attr}={value!r}"))
        return found


def raise_unsupported(findings: list[Finding], allow_training_differences: bool, what: str) -> None:
    """Raise one ValueError naming every finding that blocks the conversion of a reference ``what``.

    Findings that change eval outputs always block; training-only and low-precision ones block unless
    ``allow_training_differences`` (the converted module then gives the reference's eval outputs for
    float32 inputs and trains with vqcore's semantics).
    """
    bad = [(kind, text) for kind, text in findings if kind == CHANGES_EVAL or not allow_training_differences]
    if not bad:
        return
    hint = (  # only where the opt-in would let the conversion through
        ""
        if any(kind == CHANGES_EVAL for kind, _ in bad)
        else "; pass allow_training_differences=True to convert anyway (eval outputs agree, training differs)"
    )
    listed = ", ".join(f"{text} ({kind})" for kind, text in bad)
    raise ValueError(f"vqcore.compat: reference {what} uses options vqcore does not support: {listed}{hint}")


def linear_of(projection: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` of a reference projection: the module itself, or the first module of a
    ``Sequential`` (the reference's ``Linear`` + ``LayerNorm``); None for ``nn.Identity`` and for any
    other module (a cosine-similarity projection, say)."""
    if isinstance(projection, nn.Sequential):
        projection = projection[0]
    return projection if isinstance(projection, nn.Linear) else None


def list_entries(state_dict: Mapping[str, Tensor], prefix: str) -> list[int]:
    """The indices ``i`` of the ``{prefix}{i}.*`` keys of a state_dict, sorted: the entries of the
    ``nn.ModuleList`` / ``nn.ParameterList`` at ``prefix`` (``"layers."``)."""
    return sorted({int(key[len(prefix) :].split(".", 1)[0]) for key in state_dict if key.startswith(prefix)})


def map_projections(
    own: Mapping[str, Tensor],
    ref_state_dict: Mapping[str, Tensor],
    out: dict[str, Tensor],
    src: str = "",
    dst: str = "",
    layernorm_to: str | None = None,
) -> None:
    """Reference keys ``{src}project_in.*`` / ``{src}project_out.*`` -> ``out[{dst}project_in.*]`` ...

    ``own`` is the vqcore module's ``state_dict``: a side the reference state has but ``own`` lacks
    (no ``{dst}{side}.weight``) raises a ValueError, as the module was built with other sizes. The
    reference's ``Sequential(Linear, LayerNorm)`` keys ``project_in.0.*`` map to ``project_in.*`` and
    ``project_in.1.*`` to ``{layernorm_to}*`` (a ValueError where the method has no such LayerNorm).
    """
    for side in ("project_in", "project_out"):
        keys = [k for k in ref_state_dict if k.startswith(f"{src}{side}.")]
        if not keys:
            continue
        if f"{dst}{side}.weight" not in own:
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
                out[layernorm_to + rest[2:]] = ref_state_dict[key]
                continue
            out[f"{dst}{side}.{rest}"] = ref_state_dict[key]
