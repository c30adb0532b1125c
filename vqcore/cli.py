"""Command line: ``vqcore list``, ``vqcore plugins``, ``vqcore demo`` (also ``python -m vqcore``)."""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args) -> int:
    from vqcore.registry import get_registry

    registry = get_registry()
    kinds = ("quantizer", "codebook", "loss") if args.all else ("quantizer",)
    rows = [(e.kind, e.name, e.plugin, ", ".join(e.aliases), e.summary) for k in kinds for e in registry.entries(k, args.pattern)]
    if not rows:
        print(f"no {'entries' if args.all else 'quantizers'} match {args.pattern!r}")
        return 1
    headers = ("kind", "name", "plugin", "aliases", "summary")
    if not args.all:
        headers, rows = headers[1:], [r[1:] for r in rows]
    _table(headers, rows)
    return 0


def _cmd_plugins(args) -> int:
    from vqcore.registry import get_registry

    failed = 0
    for info in get_registry().plugins():
        print(f"{info.name} {info.version}  [{info.source}]  {info.status}")
        if info.status != "ok":
            failed += 1
            continue
        print(f"    hooks: {', '.join(info.hooks) or '-'}")
        for kind, names in info.registered.items():
            print(f"    {kind}s: {', '.join(names)}")
    return 1 if failed and args.strict else 0


def _cmd_demo(args) -> int:
    from vqcore.demo import run_demo

    run_demo(steps=args.steps, codebook_size=args.codebook_size, seed=args.seed, quiet=args.quiet)
    return 0


def _table(headers, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(line(headers))
    print(line("-" * w for w in widths))
    for row in rows:
        print(line(row))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqcore", description="vqcore: vector quantizers as pluggy plugins")
    from vqcore._version import __version__

    parser.add_argument("--version", action="version", version=f"vqcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered quantizers (and with --all, codebooks and losses)")
    p.add_argument("pattern", nargs="?", default="*", help="glob over names and aliases (default: *)")
    p.add_argument("--all", action="store_true", help="include codebooks and losses")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("plugins", help="show every plugin: version, source, status, hooks, what it registered")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("demo", help="train a VectorQuantize on the scikit-learn digits and report quality")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
