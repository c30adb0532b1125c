"""Type-check vqcore, vqcore.plugins and vqcore.export with mypy.

Usage: ``python tools/typecheck.py [--root DIR] [mypy options]``.

plugins/ and export/ install as vqcore.plugins and vqcore.export (setuptools package-dir), a mapping
mypy cannot read. This script lays out the installed package as symbolic links under
``<root>/build/typecheck/vqcore/`` (one link per entry of vqcore/, plus ``plugins`` -> plugins/ and
``export`` -> export/), runs ``mypy -p vqcore`` there with the configuration in ``<root>/pyproject.toml``
([tool.mypy]), and prints mypy's report with the paths where the files live in the repository
(``plugins/vq.py``, not ``vqcore/plugins/vq.py``). The exit status is mypy's: 0 when the check is clean.

`make lint` and tests/test_lint.py both run it; ``--root`` (default: this repository) lets the test
check the layout on a tree of its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
# top-level folders that install inside the vqcore package (the package-dir mapping in pyproject.toml)
MAPPED = ("plugins", "export")


def build_link_tree(root: Path) -> Path:
    """(Re)create ``root/build/typecheck/vqcore`` as links to the sources; returns its parent folder."""
    tree = root / "build" / "typecheck"
    package = tree / "vqcore"
    package.mkdir(parents=True, exist_ok=True)
    targets = {entry.name: entry for entry in (root / "vqcore").iterdir() if entry.name != "__pycache__"}
    targets.update({name: root / name for name in MAPPED})
    for link in package.iterdir():
        if not link.is_symlink():
            raise RuntimeError(f"{link} is not a symbolic link; remove {tree} and run again")
        link.unlink()
    for name, target in targets.items():
        (package / name).symlink_to(os.path.relpath(target, package))
    return tree


def repository_paths(report: str) -> str:
    """mypy's report with the linked paths rewritten to where the files live in the repository."""
    for name in MAPPED:
        report = report.replace(f"vqcore/{name}/", f"{name}/")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPOSITORY, help="the repository (default: this one)")
    args, mypy_options = parser.parse_known_args(argv)
    root = args.root.resolve()
    tree = build_link_tree(root)
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(root / "pyproject.toml"),
        "--cache-dir",
        str(tree / ".mypy_cache"),
        *mypy_options,
        "-p",
        "vqcore",
    ]
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    sys.stdout.write(repository_paths(result.stdout))
    sys.stderr.write(repository_paths(result.stderr))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
