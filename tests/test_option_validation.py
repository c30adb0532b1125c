"""Float options: every float constructor argument of every built-in method is refused when it is not
finite (NaN, inf), with a ConfigurationError naming the argument, before anything is built."""

from __future__ import annotations

import inspect
import math

import pytest
from helpers import builtin_methods

import vqcore
from vqcore.errors import ConfigurationError

REQUIRED = {  # the fewest arguments that build each method
    vqcore.VectorQuantize: dict(dim=8, codebook_size=16),
    vqcore.ResidualVQ: dict(dim=8, codebook_size=16, num_quantizers=2),
    vqcore.GroupedResidualVQ: dict(dim=8, codebook_size=16, num_quantizers=2, groups=2),
    vqcore.SimVQ: dict(dim=8, codebook_size=16),
    vqcore.ResidualSimVQ: dict(dim=8, codebook_size=16, num_quantizers=2),
    vqcore.HierarchicalVQ: dict(dim=4, codebook_size=8, scales=(1, 2)),
    vqcore.RandomProjectionQuantizer: dict(dim=8, codebook_size=16, codebook_dim=4),
    vqcore.FSQ: dict(levels=[4, 4]),
    vqcore.ResidualFSQ: dict(levels=[4, 4], dim=8, num_quantizers=2),
    vqcore.GroupedResidualFSQ: dict(levels=[4, 4], dim=8, num_quantizers=2, groups=2),
    vqcore.LFQ: dict(dim=8, codebook_size=256),
    vqcore.ResidualLFQ: dict(dim=8, codebook_size=256, num_quantizers=2),
    vqcore.GroupedResidualLFQ: dict(dim=8, codebook_size=256, num_quantizers=2, groups=2),
    vqcore.LatentQuantize: dict(levels=[4, 4], dim=8),
    vqcore.FSP: dict(levels=[4, 4], dim=8),
    vqcore.BinaryMapper: dict(bits=4),
}


def float_options(cls):
    return [
        name
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if isinstance(param.default, float)
    ]


def test_every_builtin_method_is_covered():
    builtin = builtin_methods()
    assert builtin == set(REQUIRED)


CASES = [(cls, name) for cls in REQUIRED for name in float_options(cls)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
def test_a_non_finite_float_option_is_refused_with_its_name(cls, name, bad):
    cls(**REQUIRED[cls])  # the required arguments alone build it
    with pytest.raises(ConfigurationError, match=rf"{cls.__name__}: {name} must be a finite number, got "):
        cls(**REQUIRED[cls], **{name: bad})


def test_the_issue_cases_and_floats_in_lists():
    with pytest.raises(ConfigurationError, match="commitment_weight must be a finite number, got nan"):
        vqcore.VectorQuantize(dim=8, codebook_size=16, commitment_weight=float("nan"))
    with pytest.raises(
        ConfigurationError, match=r"beam_score_quantizer_weights must be a finite number, got \[1.0, nan\]"
    ):
        vqcore.ResidualVQ(
            dim=8, codebook_size=16, num_quantizers=2, beam_score_quantizer_weights=[1.0, math.nan]
        )
    assert len(CASES) > 25  # the discovery found the float options (31 when this was written)
