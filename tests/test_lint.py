"""ruff, including the banned-api rule: `import plugins` / `import export` (the bare folder names)
are bugs; and ruff format: unformatted code fails the suite.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff():
    exe = Path(sys.executable).with_name("ruff")
    return str(exe) if exe.exists() else shutil.which("ruff")


@pytest.mark.skipif(_ruff() is None, reason="ruff is not installed (test extra)")
def test_ruff_passes():
    result = subprocess.run([_ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(_ruff() is None, reason="ruff is not installed (test extra)")
def test_ruff_format_passes():
    result = subprocess.run(
        [_ruff(), "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(_ruff() is None, reason="ruff is not installed (test extra)")
def test_bare_folder_imports_are_banned(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import plugins\nfrom export import something\n")
    result = subprocess.run(
        [_ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stdout.count("TID251") == 2 and "import vqcore.plugins" in result.stdout
