"""Drop-in API: the scalar family accepts every constructor and forward argument of
vector-quantize-pytorch 1.32.0 by the same name, and the reference's configuration errors stay
catchable as the reference's exception types."""

from __future__ import annotations

import inspect

import pytest

vqp = pytest.importorskip("vector_quantize_pytorch")

import vqcore  # noqa: E402
from vqcore.errors import ConfigurationError, ConfigurationRuntimeError  # noqa: E402

SCALAR_FAMILY = (
    "FSQ",
    "ResidualFSQ",
    "GroupedResidualFSQ",
    "FSP",
    "LFQ",
    "ResidualLFQ",
    "GroupedResidualLFQ",
    "EvoLFQ",
    "BinaryMapper",
    "LatentQuantize",
    "Sequential",
)


def _named_parameters(function) -> dict[str, inspect.Parameter]:
    return {
        name: p
        for name, p in inspect.signature(function).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


@pytest.mark.parametrize("name", SCALAR_FAMILY)
@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_every_reference_argument_is_accepted_by_name(name, method):
    reference = _named_parameters(getattr(getattr(vqp, name), method))
    ours = inspect.signature(getattr(getattr(vqcore, name), method)).parameters
    missing = sorted(set(reference) - set(ours))
    assert not missing, f"vqcore.{name}.{method} lacks the reference's arguments {missing}"


def test_configuration_errors_are_also_the_reference_types():
    assert issubclass(ConfigurationError, ValueError) and issubclass(ConfigurationError, AssertionError)
    assert issubclass(ConfigurationRuntimeError, ConfigurationError)
    assert issubclass(ConfigurationRuntimeError, RuntimeError)
    # the reference asserts: code written for it catches AssertionError
    with pytest.raises(AssertionError, match="power of 2"):
        vqcore.LFQ(codebook_size=100)
    with pytest.raises(AssertionError, match="preserve_symmetry"):
        vqcore.FSQ(levels=[2, 5])
