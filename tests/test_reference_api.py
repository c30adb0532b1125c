"""Drop-in API: vqcore accepts every constructor, forward and public-method argument of
vector-quantize-pytorch 1.32.0 by the same name, with the same defaults except where it differs on purpose
(listed here with the reason), and the reference's configuration errors stay catchable as the reference's
exception types.

The reference's API is kept in this repository (``tests/reference_api.json``, written from the installed
reference by ``tools/reference_api.py``), so these checks run without the reference installed; one test
(skipped without it) checks that the file matches the installed reference.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vqcore
from vqcore.errors import ConfigurationError, ConfigurationRuntimeError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_API = json.loads((ROOT / "tests" / "reference_api.json").read_text())
REQUIRED = object()

# the reference's module-level helpers -> where vqcore has them
HELPERS = {
    "vector_quantize_pytorch.vector_quantize_pytorch:orthogonal_loss_fn": (
        "vqcore.plugins.vq:orthogonal_loss_fn"
    )
}

# (class, method, argument) -> why vqcore's default differs
DIFFERENT_DEFAULTS = {
    ("FSQ", "__init__", "allowed_dtypes"): "dtypes are recorded by name so that the config saves as JSON",
    (
        "FSQ",
        "__init__",
        "channel_first",
    ): "None detects the layout from the input's rank, as FSQ's docstring says",
    (
        "LFQ",
        "__init__",
        "straight_through_activation",
    ): "None is the identity; an nn.Identity default would be one module object shared by every instance",
    ("LatentQuantize", "__init__", "codebook_dim"): "None means len(levels) (the reference's -1)",
    ("LatentQuantize", "__init__", "dim"): "optional: None means len(levels) * num_codebooks (no projection)",
    (
        "FSP",
        "indices_to_codes",
        "eps",
    ): "None uses the forward's epsilon, so that decoding equals the forward",
    ("VectorQuantize", "__init__", "rotation_trick"): "vqcore's default estimator is straight-through; "
    "rotation_trick=True opts in (plugins/vq.py)",
    ("HierarchicalVQ", "sample_nested_cutoff", "device"): "optional: the draw is made on the CPU unless told",
    ("SimVQ", "__init__", "init_fn"): "None means the identity (a config records no function)",
    (
        "ResidualVQ",
        "__init__",
        "codebook_size",
    ): "positional after num_quantizers (vqcore's arguments are not "
    "keyword-only); leaving it out raises TypeError as a required argument does",
    ("ResidualVQ", "__init__", "mlp_kwargs"): "None means no options (a mutable {} default would be shared)",
    ("ResidualVQ", "forward", "freeze_codebook"): "None means the layers' own freeze_codebook setting",
    ("GroupedResidualVQ", "forward", "freeze_codebook"): "None means the layers' own freeze_codebook setting",
}

# (class, method) -> why vqcore has no such public method
OMITTED_METHODS = {
    ("FSQ", "bound"): "a step of the reference's forward; FSQ's grid (vqcore.blocks.grid) owns the bound",
    ("FSQ", "symmetry_preserving_bound"): "a step of the reference's forward, owned by FSQ's grid",
    ("FSQ", "maybe_apply_noise"): "a step of the reference's training forward (noise_dropout)",
    ("LatentQuantize", "quantize"): "a step of the reference's forward; codes_to_indices / indices_to_codes "
    "and the forward are the public paths",
    ("LatentQuantize", "quantize_and_project"): "a step of the reference's forward",
    ("LatentQuantize", "commitment_loss"): "reported by the forward's loss breakdown instead",
    ("LatentQuantize", "quantization_loss"): "reported by the forward's loss breakdown instead",
    ("VectorQuantize", "maybe_split_heads_from_input"): "an internal reshape; to_books is vqcore's public "
    "features -> codebook-space step",
}


def _parse(entry: str) -> tuple[str, object]:
    """``name`` / ``name=default`` / ``*name`` -> (name, default text or REQUIRED)."""
    name, _, default = entry.lstrip("*").partition("=")
    return name, (default if "=" in entry else REQUIRED)


def _ours(function) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from reference_api import parameters
    finally:
        sys.path.pop(0)
    return dict(_parse(p) for p in parameters(function) if not p.startswith("*"))


CASES = [
    (cls, method)
    for cls, entry in REFERENCE_API["classes"].items()
    for method in entry.get("methods", {})
    if (cls, method) not in OMITTED_METHODS
]


def test_the_reference_api_file_is_the_reference_1_32_0():
    assert REFERENCE_API["version"] == "1.32.0"
    assert {"VectorQuantize", "ResidualVQ", "SimVQ", "HierarchicalVQ", "FSQ", "LFQ"} <= set(
        REFERENCE_API["classes"]
    )


def test_the_reference_api_file_matches_the_installed_reference():
    pytest.importorskip("vector_quantize_pytorch")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "reference_api.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(REFERENCE_API["classes"]))
def test_every_reference_class_is_importable_from_vqcore(name):
    assert inspect.isclass(getattr(vqcore, name)) or callable(getattr(vqcore, name))


@pytest.mark.parametrize(("name", "method"), CASES)
def test_every_reference_argument_is_accepted_with_the_reference_default(name, method):
    ours = getattr(getattr(vqcore, name), method, None)
    assert ours is not None, f"vqcore.{name} has no method {method}"
    reference = dict(
        _parse(p) for p in REFERENCE_API["classes"][name]["methods"][method] if not p.startswith("*")
    )
    accepted = _ours(ours)
    missing = sorted(set(reference) - set(accepted))
    assert not missing, f"vqcore.{name}.{method} lacks the reference's arguments {missing}"
    for argument, default in reference.items():
        if (name, method, argument) in DIFFERENT_DEFAULTS:
            assert accepted[argument] != default, f"{name}.{method}({argument}) now matches: drop its entry"
            continue
        shown = "required" if default is REQUIRED else default
        assert accepted[argument] == default, (
            f"vqcore.{name}.{method}({argument}) default {accepted[argument]!r}, the reference's {shown}"
        )


@pytest.mark.parametrize("name", sorted(REFERENCE_API["classes"]))
def test_every_reference_property_exists(name):
    for prop in REFERENCE_API["classes"][name].get("properties", []):
        assert hasattr(getattr(vqcore, name), prop), f"vqcore.{name} lacks the property {prop}"


@pytest.mark.parametrize("spec", sorted(REFERENCE_API["helpers"]))
def test_the_reference_helpers_exist_with_their_arguments(spec):
    module, _, attribute = HELPERS[spec].partition(":")
    helper = getattr(importlib.import_module(module), attribute)
    reference = [_parse(p)[0] for p in REFERENCE_API["helpers"][spec]]
    assert list(_ours(helper)) == reference


def test_configuration_errors_are_also_the_reference_types():
    assert issubclass(ConfigurationError, ValueError) and issubclass(ConfigurationError, AssertionError)
    assert issubclass(ConfigurationRuntimeError, ConfigurationError)
    assert issubclass(ConfigurationRuntimeError, RuntimeError)
    # the reference asserts: code written for it catches AssertionError
    with pytest.raises(AssertionError, match="power of 2"):
        vqcore.LFQ(codebook_size=100)
    with pytest.raises(AssertionError, match="preserve_symmetry"):
        vqcore.FSQ(levels=[2, 5])
