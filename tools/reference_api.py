"""Write the public API of vector-quantize-pytorch (installed) as JSON: the list that
``tests/test_reference_api.py`` holds vqcore to, without needing the reference installed.

Usage: ``.venv/bin/python tools/reference_api.py [--check] [PATH]`` (default
``tests/reference_api.json``). ``--check`` exits 1 when the file differs from the installed reference.

For every name the reference exports from its top-level package (and the module-level helpers its tests
import, :data:`HELPERS`): each public method's parameters as ``name`` (required), ``name=default`` (the
default's repr; callables and objects by type name, since their reprs carry addresses), ``*name`` /
``**name`` (var-positional / var-keyword), and its public properties.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from pathlib import Path

# module-level functions the reference's own tests import, by "module:name"
HELPERS = ("vector_quantize_pytorch.vector_quantize_pytorch:orthogonal_loss_fn",)
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "tests" / "reference_api.json"


def default_text(value: object) -> str:
    """A stable text for a default value: its repr, or ``<TypeName>`` for callables and objects whose
    repr carries a memory address."""
    text = repr(value)
    if " at 0x" in text or (callable(value) and not isinstance(value, type)):
        name = getattr(value, "__name__", None) or type(value).__name__
        return f"<{name}>"
    return text


def parameters(function) -> list[str]:
    out = []
    for p in inspect.signature(function).parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        elif p.default is p.empty:
            out.append(p.name)
        else:
            out.append(f"{p.name}={default_text(p.default)}")
    return out


def describe_class(cls: type) -> dict:
    from torch import nn

    methods = {}
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        inherited = hasattr(nn.Module, name) and name not in ("__init__", "forward")
        if (name.startswith("_") and name != "__init__") or inherited:
            continue
        methods[name] = parameters(fn)
    properties = sorted(
        name for name, v in inspect.getmembers(cls) if isinstance(v, property) and not name.startswith("_")
    )
    return {"methods": methods, "properties": properties}


def describe() -> dict:
    import vector_quantize_pytorch as vqp

    classes = {}
    for name in sorted(dir(vqp)):
        obj = getattr(vqp, name)
        if inspect.isclass(obj) or (inspect.isfunction(obj) and name[:1].isupper()):
            classes[name] = describe_class(obj) if inspect.isclass(obj) else {"function": parameters(obj)}
    helpers = {}
    for spec in HELPERS:
        module, name = spec.split(":")
        helpers[spec] = parameters(getattr(importlib.import_module(module), name))
    version = importlib.import_module("importlib.metadata").version("vector-quantize-pytorch")
    return {"version": version, "classes": classes, "helpers": helpers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = json.dumps(describe(), indent=1, sort_keys=True) + "\n"
    if args.check:
        same = args.path.exists() and args.path.read_text() == text
        print(f"{args.path}: {'up to date' if same else 'differs from the installed reference'}")
        return 0 if same else 1
    args.path.write_text(text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
