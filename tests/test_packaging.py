"""The wheel carries plugins/ and export/ as vqcore.plugins / vqcore.export, and nothing top-level
besides vqcore.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("src")
    # build from a copy so that build/ and *.egg-info never land in the working tree
    for name in ("pyproject.toml", "README.md", "vqcore", "plugins", "export"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, build / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, build / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(build),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("vqcore-*.whl")
    return found


def test_every_plugin_and_export_module_is_in_the_wheel_under_vqcore(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("plugins", "export", "vqcore"):
        for module in (ROOT / folder).glob("*.py"):
            target = f"vqcore/{module.name}" if folder == "vqcore" else f"vqcore/{folder}/{module.name}"
            assert target in names, f"{folder}/{module.name} is missing from the wheel ({target})"
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"vqcore"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vqcore = vqcore.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_plugin_and_export_folders_are_flat():
    """Nested packages would need listing in pyproject's packages; keep both folders flat."""
    for folder in ("plugins", "export"):
        nested = [p for p in (ROOT / folder).iterdir() if p.is_dir() and p.name != "__pycache__"]
        assert nested == [], f"{folder}/ must stay flat, found {nested}"


def test_installed_wheel_imports_without_the_repo_and_adds_no_top_level_names(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert installed - {"bin"} == {"vqcore"}  # bin/ holds the console script
    code = (
        "import importlib.util, vqcore, vqcore.plugins.vq, vqcore.export;"
        "print(vqcore.__file__);"
        "print(importlib.util.find_spec('plugins'), importlib.util.find_spec('export'));"
        "print(vqcore.list_quantizers())"
    )
    # -I: isolated mode, so neither the cwd nor the editable install shadows the wheel
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(target))
    assert lines[1] == "None None"
    assert "'vq'" in lines[2]
