"""The out-of-tree example plugin (examples/vqcore-plugin-example), through real entry-point discovery.

`make test` installs it editable into .venv; by hand:
``.venv/bin/pip install -e examples/vqcore-plugin-example --no-deps``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import vqcore

DIST = "vqcore-plugin-example"
PLUGIN = "vqcore-plugin-example"  # the entry point's name: what `vqcore list` / `vqcore plugins` show
EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "vqcore-plugin-example"


def _installed() -> bool:
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return False
    return any(ep.group == "vqcore" and ep.name == PLUGIN for ep in dist.entry_points)


pytestmark = pytest.mark.skipif(
    not _installed(),
    reason=f"the example plugin {DIST} is not installed (with its entry point): run `make test`, or "
    "`.venv/bin/pip install -e examples/vqcore-plugin-example --no-deps`",
)

SCRIPT = Path(sys.executable).with_name("vqcore")


def _vqcore(*args, env_extra=None, cwd=None):
    """Run the installed console script in a fresh process (so discovery is real, not this
    process's registry).
    """
    env = {key: value for key, value in os.environ.items() if key != "VQCORE_STRICT_PLUGINS"}
    env.update(env_extra or {})
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vqcore"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_the_installed_plugin_is_the_example_in_this_repo():
    import vqcore_plugin_example

    assert Path(vqcore_plugin_example.__file__).resolve().is_relative_to(EXAMPLE_DIR)


def test_vqcore_list_shows_the_quantizer_with_the_plugin_name():
    result = _vqcore("list")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("gain_shape_vq "))
    assert row.split()[:3] == ["gain_shape_vq", PLUGIN, "GainShapeVQ"]
    assert "gain-shape VQ" in row
    all_rows = [line.split()[:3] for line in _vqcore("list", "--all").stdout.splitlines()]
    assert ["codebook", "unit_direction", PLUGIN] in all_rows
    assert ["loss", "direction_commitment", PLUGIN] in all_rows


def test_vqcore_plugins_shows_name_version_hooks_and_registrations():
    result = _vqcore("plugins", "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{PLUGIN} "))
    assert lines[start].split()[:2] == [PLUGIN, metadata.version(DIST)] and lines[start].endswith("ok")
    block = "\n".join(lines[start + 1 : start + 5])
    assert "hooks: register_quantizers, register_codebooks, register_losses" in block
    assert "quantizers: gain_shape_vq" in block and "codebooks: unit_direction" in block
    assert "losses: direction_commitment" in block


def test_create_builds_it_from_the_entry_point(fresh_registry):
    from vqcore_plugin_example import GainShapeVQ

    entry = vqcore.get_entry("GainShapeVQ")  # alias
    assert entry.name == "gain_shape_vq" and entry.plugin == PLUGIN
    q = vqcore.create("gain_shape_vq", dim=16, codebook_size=32, gain_levels=4)
    assert isinstance(q, GainShapeVQ) and (q.dim, q.codebook_size, q.num_codebooks) == (16, 128, 1)
    assert q.config == {
        "name": "gain_shape_vq",
        "version": 1,
        "kwargs": {
            "dim": 16,
            "codebook_size": 32,
            "gain_levels": 4,
            "gain_min": 0.1,
            "gain_max": 10.0,
            "decay": 0.9,
            "commitment_weight": 1.0,
            "direction_weight": 0.1,
        },
    }
    quantized, indices, loss = q(torch.randn(2, 8, 16))
    assert quantized.shape == (2, 8, 16) and indices.dtype == torch.int64 and loss.shape == ()
    assert "gain_shape_vq" in vqcore.list_quantizers("gain*")


def test_it_passes_the_conformance_kit(fresh_registry):
    from vqcore.testing import check_quantizer

    report = check_quantizer("gain_shape_vq", torch.randn(2, 12, 16), dim=16, codebook_size=32)
    assert report.checks[-1].startswith("torch.export")


def test_save_and_load_round_trip(fresh_registry, tmp_path):
    q = vqcore.create("gain_shape_vq", dim=16, codebook_size=32)
    q.train()
    q(torch.randn(4, 8, 16))  # one EMA step: the directions moved
    vqcore.save(q, tmp_path / "gain_shape.safetensors")
    loaded = vqcore.load(tmp_path / "gain_shape.safetensors")
    assert type(loaded) is type(q) and loaded.config == q.config
    for key, value in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(3, 5, 16)
    q.eval(), loaded.eval()
    assert torch.equal(loaded.encode(x), q.encode(x)) and torch.equal(loaded(x).quantized, q(x).quantized)


def test_vqcore_export_cli_writes_onnx(fresh_registry, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    q = vqcore.create("gain_shape_vq", dim=16, codebook_size=32).eval()
    checkpoint = tmp_path / "gain_shape.safetensors"
    vqcore.save(q, checkpoint)
    artifact = tmp_path / "gain_shape_encode.onnx"
    result = _vqcore("export", str(checkpoint), "--format", "onnx", "--graph", "encode", "-o", str(artifact))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gain_shape_vq encode (onnx)" in result.stdout and "parity ok" in result.stdout
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 7, 16)  # another batch and sequence length than the export example
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.equal(torch.from_numpy(got), q.encode(x))


def _broken_plugin(tmp_path) -> Path:
    """A real installed distribution (dist-info on PYTHONPATH) whose plugin module fails to import."""
    (tmp_path / "vqcore_broken_example.py").write_text("import vqcore_no_such_dependency  # noqa\n")
    info = tmp_path / "vqcore_broken_example-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vqcore_broken_example\nVersion: 9.9.9\n")
    (info / "entry_points.txt").write_text("[vqcore]\nbroken-example = vqcore_broken_example\n")
    return tmp_path


def test_a_broken_plugin_is_reported_and_the_others_keep_working(tmp_path):
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(_broken_plugin(tmp_path)), os.environ.get("PYTHONPATH")])
        )
    }
    result = _vqcore("plugins", env_extra=env)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = next(line for line in result.stdout.splitlines() if line.startswith("broken-example "))
    assert (
        "9.9.9" in broken
        and "failed: ModuleNotFoundError" in broken
        and "vqcore_no_such_dependency" in broken
    )
    assert "PluginLoadWarning" in result.stderr and "broken-example" in result.stderr
    assert "VQCORE_STRICT_PLUGINS=1" in result.stderr
    example = next(line for line in result.stdout.splitlines() if line.startswith(f"{PLUGIN} "))
    assert example.endswith("ok")
    assert "[builtin]  ok" in result.stdout

    assert _vqcore("plugins", "--strict", env_extra=env).returncode == 1
    listing = _vqcore("list", env_extra=env)
    assert listing.returncode == 0 and any(
        line.startswith("gain_shape_vq ") for line in listing.stdout.splitlines()
    )
    assert any(line.startswith("vq ") for line in listing.stdout.splitlines())

    strict = _vqcore("list", env_extra={**env, "VQCORE_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0 and "broken-example" in strict.stderr and "PluginError" in strict.stderr


def test_the_example_is_not_part_of_the_main_package():
    files = metadata.files("vqcore") or []
    assert not any("vqcore_plugin_example" in str(f) for f in files)
    assert (EXAMPLE_DIR / "pyproject.toml").read_text().count("[project.entry-points.vqcore]") == 1
