"""Command line: ``vqcore list``, ``vqcore plugins``, ``vqcore demo``, ``vqcore export``
(also ``python -m vqcore``).
"""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args) -> int:
    from vqcore.registry import KINDS, get_registry

    registry = get_registry()
    kinds = KINDS if args.all else ("quantizer",)
    rows: list[tuple[str, ...]] = [
        (e.kind, e.name, e.plugin, ", ".join(e.aliases), e.summary)
        for k in kinds
        for e in registry.entries(k, args.pattern)
    ]
    if not rows:
        print(f"no {'entries' if args.all else 'quantizers'} match {args.pattern!r}")
        return 1
    headers: tuple[str, ...] = ("kind", "name", "plugin", "aliases", "summary")
    if not args.all:
        headers, rows = headers[1:], [r[1:] for r in rows]
    _table(headers, rows)
    return 0


_PLURAL = {"loss": "losses"}


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
            print(f"    {_PLURAL.get(kind, kind + 's')}: {', '.join(names)}")
    return 1 if failed and args.strict else 0


def _parse_overrides(items) -> dict:
    """``KEY=VALUE`` pairs (VALUE as JSON when it parses, else a string) -> kwargs."""
    import json

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _cmd_demo(args) -> int:
    import torch

    from vqcore.cli.demo import run_demo
    from vqcore.errors import MissingArgumentsError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_demo(
            args.quantizer,
            args.steps,
            args.out,
            dim=args.dim,
            width=args.width,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            overrides=_parse_overrides(args.set),
            export=not args.no_export,
            quiet=args.quiet,
        )
    except MissingArgumentsError as err:
        needed = " ".join(f"--set {name}=VALUE" for name in err.missing)
        print(
            f"vqcore demo: quantizer {err.quantizer!r} needs arguments the demo does not give: {needed}",
            file=sys.stderr,
        )
        return 2
    return 0


def _cmd_export(args) -> int:
    import torch

    from vqcore import export
    from vqcore.serialization import load

    quantizer = load(args.checkpoint)  # in eval mode
    try:
        shape = (
            tuple(int(s) for s in args.example_shape.replace("x", ",").split(","))
            if args.example_shape
            else export.default_example_shape(quantizer)
        )
    except ValueError as err:
        print(f"vqcore export: no example shape: {err} (--example-shape 2,16,DIM)", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    features = torch.randn(shape)
    with torch.no_grad():
        example = features if args.graph == "encode" else quantizer.encode(features)
    writer = {"onnx": export.to_onnx, "torchscript": export.to_torchscript, "pt2": export.to_pt2}[args.format]
    kwargs = {"opset": args.opset} if args.format == "onnx" else {"aoti": True} if args.aoti else {}
    if args.aoti and args.format != "pt2":
        print("--aoti needs --format pt2", file=sys.stderr)
        return 2
    try:
        result = writer(
            quantizer, args.output, graph=args.graph, example=example, verify=not args.no_verify, **kwargs
        )
    except (export.ParityError, export.ExportError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    meta = result.metadata
    parity = meta.get("parity") or {}
    print(
        f"wrote {result.path}: {meta['method']} {args.graph} ({args.format}), "
        f"input {meta['input']['layout']} {meta['input']['dtype']} -> "
        f"output {meta['output']['layout']} {meta['output']['dtype']}; "
        f"parity {'ok' if parity.get('ok') else 'not checked'}"
        + (f" ({parity['index_mismatches']} index ties)" if parity.get("index_mismatches") else "")
    )
    return 0


def _table(headers, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
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
    p.add_argument("--all", action="store_true", help="include codebooks, losses, estimators and converters")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "plugins", help="show every plugin: version, source, status, hooks, what it registered"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser(
        "demo",
        help=(
            "train a conv VQ-VAE tokenizer on the scikit-learn digits, plot it, export and verify it "
            "(ONNX, TorchScript)"
        ),
    )
    p.add_argument(
        "--quantizer",
        default="vq",
        help="registry name of the bottleneck (vq, rvq, fsq, lfq, latent, ...; default: vq)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="quantizer kwarg over the preset (JSON value), repeatable",
    )
    p.add_argument("--steps", type=int, default=1200, help="training steps (default: 1200)")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--dim", type=int, default=16, help="latent dim per token (default: 16)")
    p.add_argument("--width", type=int, default=64, help="conv channels (default: 64)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX / TorchScript export")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "export", help="export a vqcore.save checkpoint's encode or decode graph (ONNX, TorchScript, pt2)"
    )
    p.add_argument("checkpoint", help="file written by vqcore.save")
    p.add_argument("--format", choices=("onnx", "torchscript", "pt2"), default="onnx")
    p.add_argument("--graph", choices=("encode", "decode"), default="encode")
    p.add_argument("-o", "--output", required=True, help="artifact path")
    p.add_argument(
        "--example-shape",
        help="features shape of the example, e.g. 2,16,64 (default from the quantizer: (2, 16, dim) for "
        "sequences, (2, dim, 8, 6) for images, ...); decode graphs use the indices of these features",
    )
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (default: 20)")
    p.add_argument(
        "--aoti", action="store_true", help="pt2: AOTInductor package (compiled; needs a C++ compiler)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the export-time parity check")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
