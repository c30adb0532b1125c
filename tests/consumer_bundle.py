"""The consumer bundle: every built-in method's export graphs, with inputs and the eager outputs, for the
runtimes outside this Python process (examples/cpp, examples/node, examples/web, executorch's runtime).

``write_bundle(folder, ...)`` writes, per case ``NAME`` (``<method>.<graph>[.<dtype>...].<format>``):
the artifact, its input ``NAME.in0.npy`` (a shape other than the export example's) and the eager outputs
``NAME.expected<k>.npy``; plus ``manifest.json`` and ``manifest.tsv`` (one case per line:
``name, format, artifact, input, number of outputs``, tab-separated) and each method's quantizer
(``<method>.safetensors``, for the float64 tie checks). A runner (``RUNNER BUNDLE RESULTS``) runs the
cases of its formats and writes output k of case NAME to ``RESULTS/NAME.out<k>.npy``; ``compare`` judges
every runtime by the export layer's own parity rules (:func:`vqcore.export.parity.compare`: equal
indices apart from float64-verified ties, float outputs within 1e-5 (float16 ones within float16
rounding); a quantize graph's vectors against
the eager decode of the runtime's own indices).

Also a script: ``python tests/consumer_bundle.py OUT [--formats onnx,torchscript] [--methods vq,rvq]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vqcore
from vqcore.export import graphs, parity, to_executorch, to_onnx, to_pt2, to_torchscript

SCHEMA = "vqcore.consumer-bundle/1"

# every built-in method, small: registry name -> constructor kwargs
METHODS: dict[str, dict[str, Any]] = {
    "vq": dict(dim=8, codebook_size=16, codebook_dim=4),
    "vq_cosine_heads": dict(
        name="vq", dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, use_cosine_sim=True
    ),
    "rvq": dict(dim=8, codebook_size=16, num_quantizers=3),
    "grouped_rvq": dict(dim=8, codebook_size=16, num_quantizers=2, groups=2),
    "rpq": dict(dim=8, codebook_size=16, codebook_dim=4, num_codebooks=2),
    "sim_vq": dict(dim=8, codebook_size=16),
    "residual_sim_vq": dict(dim=8, codebook_size=16, num_quantizers=3),
    "hierarchical_vq": dict(dim=8, codebook_size=16, scales=(2, 4, 8), shared_codebook=False),
    "fsq": dict(levels=[3, 5, 4], dim=8),
    "residual_fsq": dict(dim=8, levels=[3, 5], num_quantizers=2),
    "grouped_residual_fsq": dict(dim=8, levels=[3, 5], num_quantizers=2, groups=2),
    "fsp": dict(levels=[3, 5, 4]),
    "lfq": dict(dim=8, codebook_size=16, num_codebooks=2),
    "residual_lfq": dict(dim=8, codebook_size=16, num_quantizers=2),
    "grouped_residual_lfq": dict(dim=8, codebook_size=16, num_quantizers=2, groups=2),
    "binary_mapper": dict(bits=4),
    "latent": dict(levels=[3, 5, 4], dim=3),
}
GRAPHS = ("encode", "decode", "quantize")
# graphs that executorch 1.4 cannot lower: HierarchicalVQ's phi mix (aten.lerp) decomposes to
# prims.copy_strided, which has no ExecuTorch kernel, and XNNPACK's pass for 1-D convolutions rejects
# its dynamic-length conv1d (tests/test_consumers.py pins the error)
PTE_UNSUPPORTED = frozenset({("hierarchical_vq", "decode"), ("hierarchical_vq", "quantize")})
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "aoti": ".pt2", "pte": ".pte"}


def build(method: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The quantizer of ``method`` (two training forwards on its example, so data-fitted codebooks), in
    eval mode, and features in its input layout."""
    kwargs = dict(METHODS[method])
    name = kwargs.pop("name", method)
    torch.manual_seed(seed)
    quantizer = vqcore.create(name, **kwargs)
    features = torch.randn(
        graphs.default_example_shape(quantizer), generator=torch.Generator().manual_seed(seed)
    )
    quantizer.train()
    with torch.no_grad():
        for _ in range(2):
            quantizer(features)
    return quantizer.eval(), features


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _grown(example: torch.Tensor, layout: str, extra: int = 3, seed: int = 1) -> torch.Tensor:
    """An input ``extra`` longer than the export example on every dynamic axis of ``layout``
    (``"batch,seq,8"``): consumers are checked at a shape the exporter did not see."""
    generator = torch.Generator().manual_seed(seed)
    out = example
    for axis, size in enumerate(layout.split(",")):
        if not size.isdigit():
            out = graphs.grow(out, axis, out.shape[axis] + extra, generator)
    return out


def _write(writer: str, quantizer: torch.nn.Module, path: Path, graph: str, example: torch.Tensor, **dtypes):
    if writer == "onnx":
        return to_onnx(quantizer, path, graph=graph, example=example, **dtypes)
    if writer == "torchscript":
        return to_torchscript(quantizer, path, graph=graph, example=example, **dtypes)
    if writer == "aoti":
        return to_pt2(quantizer, path, graph=graph, example=example, aoti=True, **dtypes)
    return to_executorch(quantizer, path, graph=graph, example=example, **dtypes)


def write_bundle(
    folder: str | os.PathLike[str],
    *,
    methods: Iterable[str] | None = None,
    formats: Sequence[str] = ("onnx", "torchscript"),
    graph_names: Sequence[str] = GRAPHS,
    index_dtype: torch.dtype = torch.int64,
    float_dtype: torch.dtype = torch.float32,
    skip: Iterable[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Export every graph of every method in every format into ``folder`` (but the ``(method, graph)``
    pairs in ``skip``); returns the manifest."""
    skip = set(skip)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown formats {unknown}; known: {sorted(FORMATS)}")
    suffix = "".join(
        f".{str(d).replace('torch.', '')}"
        for d in (index_dtype, float_dtype)
        if d not in (torch.int64, torch.float32)
    )
    cases = []
    for method in methods or METHODS:
        quantizer, features = build(method)
        vqcore.save(quantizer, folder / f"{method}.safetensors")
        with torch.no_grad():
            indices = _first(quantizer.encode(features))
        for graph in graph_names:
            if (method, graph) in skip:
                continue
            example = indices if graph == "decode" else features
            for fmt in formats:
                name = f"{method}.{graph}{suffix}.{fmt}"
                artifact = folder / f"{method}.{graph}{suffix}{FORMATS[fmt]}"
                result = _write(
                    fmt, quantizer, artifact, graph, example, index_dtype=index_dtype, float_dtype=float_dtype
                )
                meta = result.metadata
                probe = _grown(example, meta["input"]["layout"])
                probe = probe.to(index_dtype) if graph == "decode" else probe.to(float_dtype)
                source = quantizer if float_dtype == torch.float32 else _cast(quantizer, float_dtype)
                reference = graphs.with_interface_dtypes(
                    graphs.export_module(source, graph), index_dtype, float_dtype
                )
                with torch.no_grad():
                    expected = parity.as_tuple(reference(probe))
                np.save(folder / f"{name}.in0.npy", probe.numpy())
                for k, out in enumerate(expected):
                    np.save(folder / f"{name}.expected{k}.npy", out.numpy())
                cases.append(
                    {
                        "name": name,
                        "method": method,
                        "graph": graph,
                        "format": fmt,
                        "artifact": artifact.name,
                        "inputs": [f"{name}.in0.npy"],
                        "outputs": len(expected),
                        "expected": [f"{name}.expected{k}.npy" for k in range(len(expected))],
                        "index_dtype": str(index_dtype).replace("torch.", ""),
                        "float_dtype": str(float_dtype).replace("torch.", ""),
                        "quantizer": f"{method}.safetensors",
                    }
                )
    manifest = {"schema": SCHEMA, "cases": cases}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    lines = [f"{c['name']}\t{c['format']}\t{c['artifact']}\t{c['inputs'][0]}\t{c['outputs']}" for c in cases]
    (folder / "manifest.tsv").write_text("\n".join(lines) + "\n")
    return manifest


def _cast(quantizer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy in ``dtype``, as the writers make a float16 artifact's module."""
    return copy.deepcopy(quantizer).to(dtype)


@dataclass
class CaseResult:
    """One case's verdict in one runtime."""

    name: str
    method: str
    graph: str
    format: str
    runtime: str
    ok: bool
    index_entries: int = 0
    index_mismatches: int = 0
    ties: int = 0
    max_abs_diff: float = 0.0
    failures: list[str] = field(default_factory=list)


def compare(
    bundle: str | os.PathLike[str],
    results: str | os.PathLike[str],
    runtime: str,
    formats: Iterable[str] | None = None,
) -> list[CaseResult]:
    """Judge a runner's outputs (``results/NAME.out<k>.npy``) against the bundle's eager outputs, for the
    cases of ``formats`` (default: all); a missing output is a failure."""
    bundle, results = Path(bundle), Path(results)
    manifest = json.loads((bundle / "manifest.json").read_text())
    quantizers: dict[str, torch.nn.Module] = {}
    verdicts = []
    for case in manifest["cases"]:
        if formats is not None and case["format"] not in formats:
            continue
        if case["quantizer"] not in quantizers:
            quantizers[case["quantizer"]] = vqcore.load(bundle / case["quantizer"])
        quantizer = quantizers[case["quantizer"]]
        float_dtype = getattr(torch, case["float_dtype"])
        if float_dtype != torch.float32:
            quantizer = _cast(quantizer, float_dtype)
        probe = torch.from_numpy(np.load(bundle / case["inputs"][0]))
        want = [torch.from_numpy(np.load(bundle / e)) for e in case["expected"]]
        # float16 graphs: index flips within float16 rounding are ties, as at export time
        tolerance = parity.TIE_TOLERANCE if float_dtype == torch.float32 else parity.FLOAT16_TOLERANCE
        report = parity.ParityReport(case["graph"], runtime, tie_tolerance=tolerance)
        paths = [results / f"{case['name']}.out{k}.npy" for k in range(case["outputs"])]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            report.failures.append(f"no output {', '.join(missing)}")
        else:
            got = [torch.from_numpy(np.load(p)) for p in paths]
            tie_check = (
                parity.tie_checker(quantizer, tolerance=tolerance) if case["graph"] != "decode" else None
            )
            if case["graph"] == "quantize" and len(got) == 2 and got[1].shape == want[1].shape:
                decode = graphs.with_interface_dtypes(
                    graphs.export_module_default(quantizer, "decode"),
                    getattr(torch, case["index_dtype"]),
                    float_dtype,
                )
                with torch.no_grad():
                    want[0] = _first(decode(got[1]))
            parity.compare(report, probe, want, got, tie_check)
        verdicts.append(
            CaseResult(
                case["name"],
                case["method"],
                case["graph"],
                case["format"],
                runtime,
                report.ok,
                report.index_entries,
                report.index_mismatches,
                report.ties,
                report.max_abs_diff,
                report.failures,
            )
        )
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--formats", default="onnx,torchscript")
    parser.add_argument("--methods", default=None)
    parser.add_argument("--graphs", default=",".join(GRAPHS))
    parser.add_argument("--index-dtype", default="int64", choices=("int64", "int32"))
    parser.add_argument("--float-dtype", default="float32", choices=("float32", "float16"))
    args = parser.parse_args(argv)
    manifest = write_bundle(
        args.out,
        methods=args.methods.split(",") if args.methods else None,
        formats=args.formats.split(","),
        graph_names=args.graphs.split(","),
        index_dtype=getattr(torch, args.index_dtype),
        float_dtype=getattr(torch, args.float_dtype),
    )
    print(f"wrote {len(manifest['cases'])} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
