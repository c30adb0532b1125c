"""Command line: ``vqcore list``, ``vqcore plugins``, ``vqcore demo``, ``vqcore export``, ``vqcore stats``
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
            aoti=args.aoti,
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

    if args.aoti and args.format != "pt2":
        print("vqcore export: --aoti needs --format pt2", file=sys.stderr)
        return 2
    if args.max_size and args.format != "executorch":
        print("vqcore export: --max-size needs --format executorch", file=sys.stderr)
        return 2
    try:
        max_sizes = _parse_sizes(args.max_size)
    except ValueError as err:
        print(f"vqcore export: {err}", file=sys.stderr)
        return 2
    try:
        quantizer = _load_checkpoint(args.checkpoint, "cpu")  # in eval mode
    except _BadInput as err:
        print(f"vqcore export: {err}", file=sys.stderr)
        return 2
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
        example = quantizer.encode(features) if args.graph == "decode" else features
    if isinstance(example, tuple):
        example = example[0]
    writer = {
        "onnx": export.to_onnx,
        "torchscript": export.to_torchscript,
        "pt2": export.to_pt2,
        "executorch": export.to_executorch,
    }[args.format]
    kwargs: dict = {
        "index_dtype": getattr(torch, args.index_dtype),
        "float_dtype": getattr(torch, args.float_dtype),
    }
    if args.format == "onnx":
        kwargs["opset"] = args.opset
    elif args.format == "pt2" and args.aoti:
        kwargs["aoti"] = True
    elif args.format == "executorch" and max_sizes:
        kwargs["max_sizes"] = max_sizes
    try:
        result = writer(
            quantizer, args.output, graph=args.graph, example=example, verify=not args.no_verify, **kwargs
        )
    except (export.ParityError, export.ExportError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    except (ValueError, ImportError) as err:  # an option this artifact cannot honour: nothing written
        print(f"vqcore export: {err}", file=sys.stderr)
        return 2
    meta = result.metadata
    parity = meta.get("parity") or {}
    outputs = ", ".join(f"{o['name']} {o['layout']} {o['dtype']}" for o in meta["outputs"])
    line = (
        f"wrote {result.path}: {meta['method']} {args.graph} ({args.format}), "
        f"input {meta['input']['layout']} {meta['input']['dtype']} -> {outputs}; "
        f"parity {'ok' if parity.get('ok') else 'not checked'}"
    )
    if parity.get("index_mismatches"):
        line += f" ({parity['index_mismatches']} index ties)"
    precision = parity.get("precision")
    if precision:
        line += (
            f"; {precision['dtype']} vs float32: {precision['index_flips']} of {precision['index_entries']} "
            f"indices differ, SQNR {precision['sqnr_db']:.1f} dB"
        )
    print(line)
    return 0


def _parse_sizes(items) -> dict[str, int]:
    """``NAME=N`` pairs (``--max-size batch=64``) -> ``{name: n}``."""
    sizes = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--max-size expects AXIS=N with a positive N (e.g. batch=64), got {item!r}")
        sizes[name] = int(value)
    return sizes


class _BadInput(Exception):
    """A command's input that cannot be used: its message is printed as one line, exit code 2."""


def report_json(report: dict[str, float]) -> dict[str, float | None]:
    """A :meth:`vqcore.metrics.CodebookMonitor.report` for JSON: keys sorted, ``null`` where the monitor
    reports NaN or infinity (strict JSON has neither)."""
    import math

    return {key: (value if math.isfinite(value) else None) for key, value in sorted(report.items())}


def _load_checkpoint(path: str, device: str):
    import os

    from vqcore.serialization import load

    if not os.path.isfile(path):
        raise _BadInput(
            f"checkpoint {path} does not exist" if not os.path.exists(path) else f"{path} is not a file"
        )
    try:
        return load(path, device=device)
    except (OSError, ValueError, KeyError, TypeError) as err:
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        raise _BadInput(
            message if path in message else f"cannot load the checkpoint {path}: {message}"
        ) from None


def _load_features(path: str):
    """DATA.npy as a read-only memory map (batches are read as they are encoded)."""
    import os

    import numpy as np

    if not os.path.isfile(path):
        raise _BadInput(
            f"data file {path} does not exist" if not os.path.exists(path) else f"{path} is not a file"
        )
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY":
        kind = "a .npz archive" if magic.startswith(b"PK") else "not a .npy file (no NUMPY header)"
        raise _BadInput(f"{path} is {kind}: save one float array with numpy.save")
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise _BadInput(f"{path} is not a readable .npy array: {err}") from None
    if data.dtype.kind != "f":
        raise _BadInput(
            f"{path} holds {data.dtype} values: the quantizer takes floating-point features (e.g. float32)"
        )
    if data.ndim < 2 or data.shape[0] == 0:
        raise _BadInput(
            f"{path} has shape {data.shape}: it needs a batch axis first (at least one entry) and the "
            f"quantizer's features"
        )
    return data


def _check_feature_axis(quantizer, data, path: str) -> None:
    """The data's feature axis (the last one; axis 1 for a channel-first input layout) must hold the
    quantizer's ``dim`` features. Quantizers whose layout cannot be told are left to their encode."""
    from vqcore import export
    from vqcore.export.graphs import EXAMPLE_SHAPES

    try:
        example = export.default_example_shape(quantizer)  # checks that dim is a positive int
    except (TypeError, ValueError):
        return
    dim: int = quantizer.dim
    last = example == EXAMPLE_SHAPES["sequence"](dim)
    axis = -1 if last else 1
    if data.shape[axis] != dim:
        where = "last axis" if last else "axis 1 (the quantizer takes channel-first features)"
        raise _BadInput(
            f"{path} has shape {data.shape}: its {where} holds {data.shape[axis]} features, the quantizer "
            f"takes dim={dim} (an input like {example}, batch first)"
        )


def _cmd_stats(args) -> int:
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from vqcore.metrics import CodebookMonitor

    try:
        quantizer = _load_checkpoint(args.checkpoint, args.device)
        data = _load_features(args.data)
        _check_feature_axis(quantizer, data, args.data)
    except _BadInput as err:
        print(f"vqcore stats: {err}", file=sys.stderr)
        return 2
    monitor = CodebookMonitor(quantizer, hooks=False)
    dtype = next((p.dtype for p in quantizer.parameters() if p.is_floating_point()), torch.float32)
    track_error = None  # whether decode(indices) has the input's shape: then the error is counted too
    with torch.no_grad():
        for start in range(0, data.shape[0], args.batch_size):
            batch = np.array(data[start : start + args.batch_size])  # a writable copy of the memory map
            x = torch.from_numpy(batch).to(device=args.device, dtype=dtype)
            try:
                indices = quantizer.encode(x)
            except (ValueError, TypeError, RuntimeError) as err:
                if start:
                    raise
                message = " ".join(str(err).split())
                print(
                    f"vqcore stats: the quantizer cannot encode {args.data} (shape {data.shape}): {message}",
                    file=sys.stderr,
                )
                return 2
            quantized = quantizer.decode(indices) if track_error is not False else None
            track_error = quantized is not None and quantized.shape == x.shape
            monitor.update(
                indices, x=x if track_error else None, quantized=quantized if track_error else None
            )
    report = monitor.report()
    vectors = data.size // quantizer.dim
    notes = sys.stderr if args.json else sys.stdout
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print(
            f"{args.checkpoint}: {monitor.name} ({type(quantizer).__name__}), {data.shape[0]} samples of "
            f"{args.data} {tuple(data.shape)}, {vectors} vectors of dim {quantizer.dim} counted"
        )
        if not track_error:
            print("(its decode does not return the input's layout: no quantization error)")
        print(monitor.table())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "codebook_stats.json").write_text(json.dumps(report_json(report), indent=2) + "\n")
        monitor.plot(out / "codebook_usage.png")
        print(f"wrote {out / 'codebook_usage.png'} and {out / 'codebook_stats.json'}", file=notes)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    p.add_argument(
        "--aoti",
        action="store_true",
        help="also export AOTInductor packages tokenizer.pt2 / detokenizer.pt2 (needs a C++ compiler)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "export",
        help="export a vqcore.save checkpoint's encode, decode or quantize graph "
        "(ONNX, TorchScript, pt2, ExecuTorch)",
    )
    p.add_argument("checkpoint", help="file written by vqcore.save")
    p.add_argument("--format", choices=("onnx", "torchscript", "pt2", "executorch"), default="onnx")
    p.add_argument(
        "--graph",
        choices=("encode", "decode", "quantize"),
        default="encode",
        help="encode: features -> indices; decode: indices -> vectors; "
        "quantize: features -> vectors and indices",
    )
    p.add_argument("-o", "--output", required=True, help="artifact path")
    p.add_argument(
        "--example-shape",
        help="features shape of the example, e.g. 2,16,64 (default from the quantizer: (2, 16, dim) for "
        "sequences, (2, dim, 8, 6) for images, ...); decode graphs use the indices of these features",
    )
    p.add_argument(
        "--index-dtype",
        choices=("int64", "int32"),
        default="int64",
        help="dtype of the indices the artifact returns or takes (default: int64)",
    )
    p.add_argument(
        "--float-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="float16: a half-precision variant; its index agreement and SQNR against float32 are printed",
    )
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (default: 20)")
    p.add_argument(
        "--aoti", action="store_true", help="pt2: AOTInductor package (compiled; needs a C++ compiler)"
    )
    p.add_argument(
        "--max-size",
        action="append",
        metavar="AXIS=N",
        help="executorch: upper bound of a dynamic axis (batch, seq, height, ...), repeatable; "
        "default 4 times the example's size, at least 16",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the export-time parity check")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "stats",
        help="codebook usage, perplexity, dead codes and quantization error of a vqcore.save checkpoint",
    )
    p.add_argument("checkpoint", help="file written by vqcore.save")
    p.add_argument(
        "data",
        help=".npy float array in the quantizer's input layout, batch first (e.g. (N, tokens, dim))",
    )
    p.add_argument("--batch-size", type=_positive_int, default=256, help="samples per encode (default: 256)")
    p.add_argument("--out", help="folder for codebook_usage.png and codebook_stats.json")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--device", default="cpu", help="torch device to encode on (default: cpu)")
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
