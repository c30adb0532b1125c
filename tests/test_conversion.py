"""The pieces of reference converters (vqcore.blocks.conversion): option tables and their one error,
the Linear inside a reference projection, module-list entries and projection keys."""

from __future__ import annotations

import pytest
import torch

from vqcore.blocks.conversion import (
    CHANGES_EVAL,
    TRAINING_ONLY,
    UnsupportedOptions,
    linear_of,
    list_entries,
    map_projections,
    raise_unsupported,
)


def test_unsupported_options_findings_and_error():
    table = UnsupportedOptions(eval=(("spherical", False),), train=(("noise", 0.0), ("absent", None)))
    ref = torch.nn.Module()
    ref.spherical, ref.noise = False, torch.tensor(0.5)
    assert table.findings(ref) == [(TRAINING_ONLY, "noise=0.5")]  # a 0-dim tensor reads as its number
    with pytest.raises(ValueError) as err:
        raise_unsupported(table.findings(ref), False, "Thing")
    assert str(err.value) == (
        "vqcore.compat: reference Thing uses options vqcore does not support: noise=0.5 (training only); "
        "pass allow_training_differences=True to convert anyway (eval outputs agree, training differs)"
    )
    raise_unsupported(table.findings(ref), True, "Thing")  # the opt-in lets training-only options through
    ref.spherical = True
    findings = table.findings(ref)
    assert findings == [(CHANGES_EVAL, "spherical=True"), (TRAINING_ONLY, "noise=0.5")]
    with pytest.raises(ValueError) as err:
        raise_unsupported(findings, True, "Thing")
    assert str(err.value) == (  # no opt-in hint where the opt-in would not help
        "vqcore.compat: reference Thing uses options vqcore does not support: spherical=True (changes eval "
        "outputs)"
    )


def test_linear_of_and_list_entries():
    linear = torch.nn.Linear(2, 3)
    assert linear_of(linear) is linear
    assert linear_of(torch.nn.Sequential(linear, torch.nn.LayerNorm(3))) is linear
    assert linear_of(torch.nn.Identity()) is None
    state = dict.fromkeys(["layers.0.a", "layers.10.b", "layers.2.c", "layers.2.d", "norm.weight"])
    assert list_entries(state, "layers.") == [0, 2, 10]


def test_map_projections_keys():
    ref_sd = {
        name: torch.full((1,), float(i))
        for i, name in enumerate(
            [
                "g.project_in.0.weight",
                "g.project_in.0.bias",
                "g.project_in.1.weight",
                "g.project_in.1.bias",
                "g.project_out.weight",
                "g._codebook.embed",
            ]
        )
    }
    own = dict.fromkeys(["h.project_in.weight", "h.project_in.bias", "h.project_out.weight"])
    out = {}
    map_projections(own, ref_sd, out, "g.", "h.", layernorm_to="h.norm_in.")
    assert out == {
        "h.project_in.weight": ref_sd["g.project_in.0.weight"],
        "h.project_in.bias": ref_sd["g.project_in.0.bias"],
        "h.norm_in.weight": ref_sd["g.project_in.1.weight"],
        "h.norm_in.bias": ref_sd["g.project_in.1.bias"],
        "h.project_out.weight": ref_sd["g.project_out.weight"],
    }
    with pytest.raises(ValueError, match="unexpected key 'g.project_in.1.weight'"):
        map_projections(own, ref_sd, {}, "g.", "h.")  # a LayerNorm where the method has none
    with pytest.raises(ValueError, match="has project_out weights but the vqcore module has no project_out"):
        map_projections({"h.project_in.weight": None}, ref_sd, {}, "g.", "h.", layernorm_to="h.norm_in.")
