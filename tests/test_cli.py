"""The `vqcore` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqcore
from vqcore.cli import main


def test_list_shows_builtin_quantizers(capsys, fresh_registry):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "plugin", "aliases", "summary"]
    row = next(line for line in out if line.startswith("vq "))
    assert "vqcore.plugins.vq" in row and "VectorQuantize" in row


def test_list_all_and_patterns(capsys, fresh_registry):
    assert main(["list", "--all"]) == 0
    out = capsys.readouterr().out
    lines = [line.split()[:3] for line in out.splitlines()]
    for kind, name, plugin in (
        ("codebook", "cosine", "vqcore.plugins.blocks"),
        ("loss", "commitment", "vqcore.plugins.blocks"),
        ("estimator", "rotation_trick", "vqcore.plugins.blocks"),
        ("converter", "VectorQuantize", "vqcore.plugins.reference_vq"),
    ):
        assert [kind, name, plugin] in lines
    assert main(["list", "zzz*"]) == 1
    assert "no quantizers match 'zzz*'" in capsys.readouterr().out


def test_plugins_shows_hooks_and_registrations(capsys, fresh_registry):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "vqcore.plugins.vq" in out and "[builtin]  ok" in out
    assert "hooks: register_quantizers" in out and "quantizers: vq" in out
    assert "codebooks: euclidean, cosine" in out


def test_python_dash_m_and_console_script():
    script = Path(sys.executable).with_name("vqcore")
    for cmd in ([sys.executable, "-m", "vqcore", "list"], [str(script), "list"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "vq " in result.stdout


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2


class NeedsSizes(torch.nn.Module):
    """A plugin quantizer with required arguments the demo has no preset for."""

    def __init__(self, dim: int, codebook_size: int, levels: list, scale: float = 1.0):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks = dim, codebook_size, 1

    def encode(self, x):
        return x.argmax(-1)

    def decode(self, indices):
        return indices.float()


class NeedsSizesPlugin:
    @vqcore.hookimpl
    def register_quantizers(self, register):
        register("needs_sizes", NeedsSizes)


@pytest.mark.parametrize(
    "given, needed",
    [
        ([], "--set codebook_size=VALUE --set levels=VALUE"),
        (["--set", "codebook_size=8"], "--set levels=VALUE"),
    ],
)
def test_demo_reports_missing_quantizer_arguments_as_set_options(
    capsys, fresh_registry, tmp_path, given, needed
):
    fresh_registry.register_plugin(NeedsSizesPlugin(), name="needs-sizes")
    out = tmp_path / "demo"
    argv = ["demo", "--quantizer", "needs_sizes", *given, "--steps", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"vqcore demo: quantizer 'needs_sizes' needs arguments the demo does not give: {needed}\n")
    assert not out.exists()  # nothing written
