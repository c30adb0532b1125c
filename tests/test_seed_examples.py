"""Every python example of the seed feature list runs with only the import changed to vqcore.

The seed README lives in the shared reference folder beside the checkout (../shared/reference); the
test is skipped where that folder is absent. Its last LatentQuantize example uses the names `dim` and
`num_codebooks` without defining them; they are given the values the example's comments imply.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

SEED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "seed-README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def seed_blocks():
    if not SEED.exists():
        return [pytest.param("", marks=pytest.mark.skip(reason=f"{SEED} not present"), id="absent")]
    text = SEED.read_text()
    return [
        pytest.param(m.group(1), id=f"line{text[: m.start()].count(chr(10)) + 1}")
        for m in BLOCK.finditer(text)
    ]


@pytest.mark.parametrize("code", seed_blocks())
def test_seed_example_runs_with_only_the_import_changed(code):
    assert "vector_quantize_pytorch" in code
    code = code.replace("from vector_quantize_pytorch import", "from vqcore import")
    namespace = {"__name__": "__seed__", "dim": 9, "num_codebooks": 3}
    torch.manual_seed(0)
    exec(compile(code, str(SEED), "exec"), namespace)
    # every quantized output the example names keeps the input's shape
    for out_name, in_name in (("quantized", "x"), ("xhat", "x"), ("output_tensor", "input_tensor")):
        if out_name in namespace and in_name in namespace and isinstance(namespace[out_name], torch.Tensor):
            assert namespace[out_name].shape == namespace[in_name].shape
