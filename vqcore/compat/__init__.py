"""Migration from vector-quantize-pytorch 1.32.0 ("the reference"): rebuild a trained module in vqcore.

``from_reference(ref)`` reads the constructor options back from a reference module's attributes, builds
the matching vqcore module and loads the reference's trained state into it (EMA codebooks, projections,
latent value tables); eval outputs and indices then agree with the reference. ``load_reference_state_dict``
maps a reference ``state_dict`` onto an existing vqcore module (build it with the same options; note that
vqcore's ``VectorQuantize`` defaults ``codebook_dim`` to ``dim // heads`` where the reference uses ``dim``
per head, so pass ``codebook_dim`` explicitly when converting a module with heads).

Supported: ``VectorQuantize``, ``ResidualVQ``, ``GroupedResidualVQ``, ``FSQ``, ``ResidualFSQ``,
``GroupedResidualFSQ``, ``FSP``, ``LFQ``, ``ResidualLFQ``, ``GroupedResidualLFQ``, ``BinaryMapper``,
``LatentQuantize``, ``SimVQ``, ``ResidualSimVQ``, ``HierarchicalVQ``, and any reference class a plugin
registers a converter for (``vqcore list --all`` shows them). An ``EvoLFQ`` holds the user's encoder
and decoder: convert its ``lfq``. Reference options that vqcore does not implement raise a ``ValueError``
naming them. Options that only change training (losses,
gradient routing, the precision of the quantization step) raise too unless
``allow_training_differences=True``: the converted module then gives the reference's eval outputs (for
float32 inputs), while training follows vqcore's semantics. vqcore's own training semantics differ on
purpose in places (straight-through is the default estimator, the shared RVQ codebook is updated once per
step, ...): see the docstrings of the plugin modules.

Converters. This module is a driver: the conversions are plugins. A converter
(:class:`vqcore.protocols.ReferenceConverter`) is registered by the hook ``register_converters`` under
the reference's class name; :func:`from_reference` looks it up by ``type(ref).__name__``, builds
``vqcore.create(converter.quantizer, **converter.kwargs(ref))`` and loads ``converter.state_dict``. The
built-in converters live in ``vqcore.plugins.reference_vq`` and ``vqcore.plugins.reference_scalar``.

Layouts. ``ResidualVQ`` / ``GroupedResidualVQ`` take ``accept_image_fmap`` themselves and pass
``accept_3d_fmap`` / ``channel_last`` on to their layers (through ``**vq_kwargs``); the reference's
residual bookkeeping assumes channel-last tensors, so its forward fails on such inputs (a grouped module
with image fmaps works only when the per-group dim happens to equal the fmap's height and width). The
converted module implements what the options mean: every position of the map is a token, the shared
projection and the group split act on the channel axis, indices are ``(b, *positions, Q)``. That equals
the reference run on the ``(b, n, d)`` token sequence of the same map.

Gumbel straight-through (``straight_through=True``) converts to vqcore's straight-through estimator
(the default): the reference's forward replaces the soft assignment's output by ``x + sg(q - x)``
before returning it, so the gradient that reaches its input is the identity, exactly as vqcore's
straight-through estimator gives (vqcore's ``straight_through=True`` would route the soft assignment's
gradient to the input, which the reference never does).

Conversions that keep vqcore's semantics where the reference's are a bug:

- a k-means reference that has not seen a batch yet (``initted`` False) holds zero placeholder codes;
  they are not copied: the vqcore module keeps its own random placeholders and runs k-means on its first
  training batch (the reference would also run it in eval, on whatever batch comes first);
- ``sync_codebook``: the reference decides it at construction (``is_distributed()`` then), so a module
  built outside a process group reads ``False``; that converts to vqcore's per-call default (``None``),
  ``True`` stays ``True``;
- FSQ ``scale`` is stored but never used by the reference: it is accepted and ignored;
- FSQ ``noise_dropout``: the reference draws its noise mask with probability 0.5 whatever the value;
  vqcore uses the value, so a value other than 0 or 0.5 converts only with
  ``allow_training_differences=True``;
- the reference LFQ's ``mask`` buffer holds the bit weights, not state: it is checked and left out;
- FSP: the ``vector_norm`` preset is recovered by name; a norm edited after construction converts only
  with ``allow_training_differences=True``.

The reference package is needed only by :func:`from_reference`'s caller (it passes a reference module
in); this module never imports it, nor any built-in plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.api import create
from vqcore.errors import UnknownNameError
from vqcore.module import get_config
from vqcore.protocols import ReferenceConverter
from vqcore.registry import get_registry

__all__ = ["from_reference", "load_reference_state_dict", "reference_kwargs", "converter_for"]


def _build(entry) -> ReferenceConverter:
    converter = entry.create()
    if not isinstance(converter, ReferenceConverter):
        missing = [m for m in ("quantizer", "kwargs", "state_dict") if not hasattr(converter, m)]
        raise TypeError(
            f"converter {entry.name!r} (plugin {entry.plugin!r}) built {type(converter).__name__}, which "
            f"does not follow vqcore.protocols.ReferenceConverter: missing {', '.join(missing)}"
        )
    return converter


def converter_for(reference_class: str) -> ReferenceConverter:
    """The converter registered for the reference class named ``reference_class`` (``"ResidualVQ"``).

    An unregistered name raises a ValueError listing the supported reference classes.
    """
    registry = get_registry()
    try:
        entry = registry.get_entry(reference_class, "converter")
    except UnknownNameError:
        supported = ", ".join(entry.name for entry in registry.entries("converter"))
        raise ValueError(
            f"vqcore.compat: no conversion for reference class {reference_class!r}; supported: {supported}"
        ) from None
    return _build(entry)


def reference_kwargs(ref: nn.Module, allow_training_differences: bool = False) -> tuple[str, dict[str, Any]]:
    """``(vqcore registry name, constructor kwargs)`` equivalent to the reference module ``ref``:
    ``vqcore.create(name, **kwargs)`` builds it. The built-in converters give the class names
    (``"ResidualVQ"``), registered as aliases of the canonical names."""
    converter = converter_for(type(ref).__name__)
    return converter.quantizer, converter.kwargs(ref, allow_training_differences)


def from_reference(ref: nn.Module, allow_training_differences: bool = False) -> nn.Module:
    """Build the vqcore module equivalent to the reference module ``ref`` and load its state into it.

    The result is in the same train/eval mode as ``ref`` and on its device.
    """
    converter = converter_for(type(ref).__name__)
    module = create(converter.quantizer, **converter.kwargs(ref, allow_training_differences))
    state = ref.state_dict()
    _load(converter, module, state, strict=True)
    device = next((t.device for t in state.values()), None)
    if device is not None:
        module.to(device)
    return module.train(ref.training)


def _quantizer_name(name: str) -> str | None:
    """The canonical registry name of a quantizer name or alias, None when nothing registers it."""
    try:
        return get_registry().get_entry(name, "quantizer").name
    except UnknownNameError:
        return None


def _converter_for_module(module: nn.Module, reference: str | None) -> ReferenceConverter:
    """The converter that builds ``module``'s quantizer (its registry name: the config's, or the one its
    class is registered under); ``reference`` (a reference class name) picks one among several."""
    config = get_config(module)
    registry = get_registry()
    name = (config or {}).get("name") or registry.name_of(type(module))
    kind = type(module).__name__
    if name is None:
        raise ValueError(f"vqcore.compat: no reference mapping for vqcore class {kind!r}")
    if reference is not None:
        converter = converter_for(reference)
        if _quantizer_name(converter.quantizer) != name:
            raise ValueError(
                f"vqcore.compat: the converter for reference {reference!r} builds {converter.quantizer!r}, "
                f"not {name!r} ({kind})"
            )
        return converter
    matches = {}
    for entry in registry.entries("converter"):
        converter = _build(entry)
        if _quantizer_name(converter.quantizer) == name:
            matches[entry.name] = converter
    if not matches:
        raise ValueError(f"vqcore.compat: no reference mapping for vqcore class {kind!r}")
    if len(matches) > 1:
        raise ValueError(
            f"vqcore.compat: several reference classes convert to {name!r} ({', '.join(matches)}): "
            "pass reference=<reference class name>"
        )
    return next(iter(matches.values()))


def _load(
    converter: ReferenceConverter, module: nn.Module, ref_state_dict: Mapping[str, Tensor], strict: bool
):
    try:
        state = converter.state_dict(module, ref_state_dict)
    except KeyError as err:
        raise ValueError(
            f"vqcore.compat: the reference state_dict has no key {err.args[0]!r} needed by "
            f"{type(module).__name__}"
        ) from None
    with torch.no_grad():
        return module.load_state_dict(state, strict=strict)


def load_reference_state_dict(
    module: nn.Module,
    ref_state_dict: Mapping[str, Tensor],
    strict: bool = True,
    reference: str | None = None,
):
    """Load a vector-quantize-pytorch 1.32.0 ``state_dict`` into the matching vqcore ``module``.

    Returns ``module.load_state_dict``'s result. Shapes must match (build the module with the reference's
    options, e.g. through :func:`reference_kwargs`); a mismatch raises ``RuntimeError`` from
    ``load_state_dict``. The module's layout options (image / video fmaps, channel-first) are not part of
    the state: build it with the ones the reference module was given.

    The converter is the one that builds ``module``'s quantizer; where several reference classes convert
    to the same quantizer, ``reference`` names the reference class the state comes from.
    """
    return _load(_converter_for_module(module, reference), module, dict(ref_state_dict), strict)
