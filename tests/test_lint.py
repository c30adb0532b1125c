"""ruff, including the banned-api rule: `import plugins` / `import export` (the bare folder names)
are bugs; and ruff format: unformatted code fails the suite.
"""

import importlib.util
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


# -- mypy over vqcore, vqcore.plugins and vqcore.export (tools/typecheck.py, also run by `make lint`) --------

TYPECHECK = ROOT / "tools" / "typecheck.py"
needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed (test extra)"
)


def _typecheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TYPECHECK), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@needs_mypy
def test_typecheck_passes():
    result = _typecheck()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found"), result.stdout


@needs_mypy
def test_typecheck_sees_plugins_and_export_as_installed(tmp_path):
    # a repository of its own: plugins/ imports vqcore.export (resolved only through the installed layout)
    # and misuses its value; the error is reported at the file's path in the repository
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    files = {
        "vqcore/__init__.py": "",
        "export/__init__.py": "",
        "export/names.py": 'GRAPH = "encode"\n',
        "plugins/__init__.py": "",
        "plugins/method.py": "from vqcore.export.names import GRAPH\n\nlayers: int = GRAPH\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    result = _typecheck("--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        'plugins/method.py:3: error: Incompatible types in assignment (expression has type "str", '
        'variable has type "int")  [assignment]'
    )
    assert result.stdout.splitlines()[-1] == "Found 1 error in 1 file (checked 5 source files)"
    links = tmp_path / "build" / "typecheck" / "vqcore"
    assert sorted(p.name for p in links.iterdir()) == ["__init__.py", "export", "plugins"]
    assert (links / "plugins").resolve() == (tmp_path / "plugins").resolve()
