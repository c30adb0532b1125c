"""The layers of docs/architecture.md, checked on every import statement of the package.

contracts (vqcore/*.py) < building blocks (vqcore/blocks) < methods (plugins/) < export (export/)
< applications (vqcore/cli, vqcore/compat, vqcore/testing): a module imports only from its own layer
and the ones below; export and the applications other than the CLI import no method.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"contracts": 0, "blocks": 1, "plugins": 2, "export": 3, "apps": 4}
# the registry loads the built-in plugins: the one place the contracts refer to the methods
ALLOWED = {("vqcore.registry", "vqcore.plugins")}
KNOW_NO_METHOD = ("vqcore.export", "vqcore.compat", "vqcore.testing", "vqcore.metrics")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("plugins", "export"):
        parts = ["vqcore", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "vqcore" or len(parts) == 1:
        return "contracts"
    second = parts[1]
    if second == "blocks":
        return "blocks"
    if second in ("plugins", "export"):
        return second
    if second in ("cli", "compat", "testing", "metrics", "__main__"):
        return "apps"
    return "contracts"


def _package_files() -> list[Path]:
    files = [
        *(ROOT / "vqcore").rglob("*.py"),
        *(ROOT / "plugins").glob("*.py"),
        *(ROOT / "export").glob("*.py"),
    ]
    return sorted(f for f in files if "__pycache__" not in f.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import statement, function-level ones included."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from vqcore import blocks` / `from vqcore.plugins import vq` name submodules too
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "vqcore"]


def _is_module(name: str) -> bool:
    parts = name.split(".")
    base = ROOT / "vqcore"
    if len(parts) > 1 and parts[1] in ("plugins", "export"):
        base, parts = ROOT / parts[1], parts[2:]
    else:
        parts = parts[1:]
    target = base.joinpath(*parts) if parts else base
    return target.with_suffix(".py").exists() or (target / "__init__.py").exists()


def test_the_layer_map_covers_every_module():
    modules = {_module_name(f) for f in _package_files()}
    assert {_layer(m) for m in modules} == set(LAYERS)
    assert _layer("vqcore.blocks.codebooks") == "blocks" and _layer("vqcore.plugins.vq") == "plugins"
    assert _layer("vqcore.compat") == "apps" and _layer("vqcore.protocols") == "contracts"


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_downward(path):
    module = _module_name(path)
    layer = _layer(module)
    wrong = []
    for line, name in _imports(path):
        if not _is_module(name):  # `from vqcore.x import function`: the module itself was checked
            continue
        target = _layer(name)
        if LAYERS[target] > LAYERS[layer] and (module, name) not in ALLOWED:
            wrong.append(f"line {line}: {layer} module imports {name} ({target})")
        if module.startswith(KNOW_NO_METHOD) and target == "plugins":
            wrong.append(f"line {line}: {module} must not know the methods, imports {name}")
    assert not wrong, f"{module}:\n" + "\n".join(wrong)
