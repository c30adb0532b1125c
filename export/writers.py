"""The writers: :func:`to_onnx`, :func:`to_torchscript`, :func:`to_pt2`.

Each one builds the export module (:func:`vqcore.export.graphs.export_module`), finds the dynamic axes,
runs ``torch.export.export(strict=False)`` and checks that no declared dynamic axis was specialised,
writes the artifact, reloads it with its own runtime and checks parity (on by default) at the example
shape, a larger shape and size 1 (and with -1 indices where the method's decode accepts them).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.export import graphs, metadata, parity

PathLike = str | os.PathLike[str]
# run(input) -> the artifact's outputs, on its own runtime
Runner = Callable[[Tensor], Any]

DEFAULT_OPSET = 20


class ExportError(RuntimeError):
    """The exporter failed, or produced an artifact with specialised (static) dynamic axes."""


@dataclass
class ExportResult:
    """The artifact's path, its embedded metadata, and the parity report (None with ``verify=False``)."""

    path: str
    metadata: dict[str, Any]
    parity: parity.ParityReport | None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' known noise (treespec FutureWarning, torch.jit deprecation, tracer warnings,
    onnx progress logs)."""
    loggers = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx")
    ]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torchvision.*")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


class _Plan:
    """Everything the writers share: module, example, dynamic axes, probes, eager references."""

    def __init__(
        self, obj: nn.Module, graph: str, example: Tensor, dynamic_dims: Sequence[int] | None = None
    ):
        self.module = graphs.export_module(obj, graph).eval()
        self.quantizer = graphs.quantizer_of(self.module) if graphs.is_wrapper(self.module) else obj
        self.graph = graph
        if not isinstance(example, Tensor):
            raise TypeError("example must be a tensor (features for encode, indices for decode)")
        example = example.detach().contiguous()  # a strided view would make torch.export guard its strides
        with torch.no_grad():
            axes = graphs.map_dynamic_axes(self.module, example, dynamic_dims)
        if not axes:
            raise ExportError(
                f"no axis of the example {tuple(example.shape)} can change size: nothing to make dynamic"
            )
        self.example = graphs.export_example(example, axes)
        self.in_names = graphs.axis_names(self.example, axes)
        self.out_names = {o: self.in_names[i] for i, o in axes.items() if o is not None}
        with torch.no_grad():
            self.example_out = parity.as_tuple(self.module(self.example))
        self.input_name = "features" if graph == "encode" else "indices"
        self.output_name = "indices" if graph == "encode" else "vectors"
        enc = getattr(self.module, "encoder", None) if isinstance(self.module, graphs.Tokenizer) else None
        self.tie_check = parity.tie_checker(self.quantizer, encoder=enc) if graph == "encode" else None
        # the eager reference: the wrapper itself, or the quantizer's own encode/decode when a plugin's
        # hook supplied the module (so a hook module that disagrees with the quantizer is caught)
        self.reference = (
            self.module
            if graphs.is_wrapper(self.module)
            else graphs.export_module_default(self.quantizer, graph)
        )

    def export_program(self) -> torch.export.ExportedProgram:
        with _quiet():
            try:
                ep = torch.export.export(
                    self.module,
                    (self.example,),
                    dynamic_shapes=graphs.dynamic_shapes(self.in_names),
                    strict=False,
                )
            except Exception as err:
                raise ExportError(
                    f"torch.export of the {self.graph} graph failed: {type(err).__name__}: {err}"
                ) from err
        user_input = ep.graph_signature.user_inputs[0]
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == user_input)
        shape = node.meta["val"].shape
        static = [self.in_names[a] for a in self.in_names if isinstance(shape[a], int)]
        if static:
            raise ExportError(
                f"torch.export specialised the dynamic axes {static} of the {self.graph} graph "
                f"to constants (shape {tuple(shape)})"
            )
        return ep

    def probes(self) -> list[Tensor]:
        """The example, a larger shape, size 1 on every dynamic axis (and -1 indices where accepted)."""
        ex, out = self.example, [self.example]
        gen = torch.Generator().manual_seed(1234)
        for size in (None, 1):
            shape = [
                (s + 3 if size is None else size) if a in self.in_names else s for a, s in enumerate(ex.shape)
            ]
            if self.graph == "encode" and ex.is_floating_point():
                probe = torch.randn(shape, generator=gen, dtype=ex.dtype).to(
                    ex.device
                )  # CPU generator, any device
                probe = probe * ex.float().std().clamp(min=1e-3).to(ex.dtype) + ex.mean()
            else:
                probe = ex
                for a in self.in_names:
                    probe = graphs.grow(probe, a, shape[a], gen)
            out.append(probe)
        if self.graph == "decode" and not ex.is_floating_point():
            dropped = ex.clone()
            dropped.reshape(-1)[:: max(2, dropped.numel() // 3)] = -1
            try:
                with torch.no_grad():
                    self.module(dropped)
                out.append(dropped)
            except Exception:  # this method does not accept dropped codes
                pass
        return out

    def verify(self, run: Runner, runtime: str) -> parity.ParityReport:
        report = parity.ParityReport(
            self.graph, runtime, tie_tolerance=parity.TIE_TOLERANCE if self.tie_check else None
        )
        for probe in self.probes():
            with torch.no_grad():
                want = self.reference(probe)
            try:
                with torch.no_grad():
                    got = run(probe)
            except Exception as err:  # a runtime failure is a parity failure
                report.shapes.append(tuple(probe.shape))
                report.failures.append(
                    f"input {tuple(probe.shape)}: {runtime} failed: {type(err).__name__}: {str(err)[:300]}"
                )
                continue
            parity.compare(report, probe, want, got, self.tie_check)
        return report

    def metadata(
        self, fmt: str, opset: int | None = None, report: parity.ParityReport | None = None
    ) -> dict[str, Any]:
        return metadata.build(
            self.module,
            self.quantizer,
            graph=self.graph,
            fmt=fmt,
            input_name=self.input_name,
            output_name=self.output_name,
            example_in=self.example,
            example_out=self.example_out[0],
            in_names=self.in_names,
            out_names=self.out_names,
            opset=opset,
            parity=None if report is None else report.summary(),
        )


def _finish(report: parity.ParityReport, verify: bool) -> None:
    if verify and not report.ok:
        raise parity.ParityError(report)


def _graph_of(obj: nn.Module, graph: str | None) -> str:
    if graph is None:
        graph = obj.graph if graphs.is_wrapper(obj) else "encode"
    return graph


def to_onnx(
    obj: nn.Module,
    path: PathLike,
    *,
    graph: str | None = None,
    example: Tensor,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    dynamic_dims: Sequence[int] | None = None,
    providers: Sequence[str] | None = None,
) -> ExportResult:
    """Write an ONNX file (dynamo exporter, single file, ``opset``) of ``graph`` of ``obj`` (a quantizer,
    Tokenizer or Detokenizer). The input is named "features" (encode) or "indices" (decode), the output
    "indices" or "vectors"; batch and sequence / spatial axes are symbolic (``dim_param``), which is
    checked. Metadata: ``metadata_props["vqcore"]`` (JSON) plus ``vqcore.<key>`` scalars."""
    import onnx

    plan = _Plan(obj, _graph_of(obj, graph), example, dynamic_dims)
    ep = plan.export_program()
    with _quiet():
        try:
            program = torch.onnx.export(
                ep,
                (plan.example,),
                None,
                dynamo=True,
                opset_version=opset,
                input_names=[plan.input_name],
                output_names=[plan.output_name],
                external_data=False,
                verbose=False,
            )
        except Exception as err:
            raise ExportError(
                f"ONNX export of the {plan.graph} graph failed: {type(err).__name__}: {err}"
            ) from err
    assert program is not None  # the dynamo exporter always returns its program
    dims = program.model_proto.graph.input[0].type.tensor_type.shape.dim
    static = [name for axis, name in plan.in_names.items() if not dims[axis].dim_param]
    if not static:  # torch.export's symbols (s37, ...) -> the axis names
        program.rename_axes({dims[axis].dim_param: name for axis, name in plan.in_names.items()})
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if static:
        raise ExportError(
            f"the ONNX {plan.graph} graph has static sizes on the dynamic axes {static} "
            f"(input dims {[d.dim_param or d.dim_value for d in dims]}): the exporter specialised them"
        )
    report = None
    if verify:
        run = onnxruntime_runner(model.SerializeToString(), providers)
        report = plan.verify(run, "onnxruntime")
        _finish(report, verify)
    meta = plan.metadata("onnx", opset=opset, report=report)
    del model.metadata_props[:]
    for key, value in metadata.flat(meta).items():
        model.metadata_props.add(key=key, value=value)
    path = os.fspath(path)
    onnx.save(model, path)
    return ExportResult(path, meta, report)


def onnxruntime_runner(model: bytes | PathLike, providers: Sequence[str] | None = None) -> Runner:
    """``run(tensor) -> tuple of tensors`` on an onnxruntime session (CUDA provider first when present)."""
    import onnxruntime as ort

    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    source = model if isinstance(model, bytes) else os.fspath(model)
    session = ort.InferenceSession(source, providers=list(providers))
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.from_numpy(o) for o in session.run(None, {name: x.cpu().numpy()}))

    return run


def to_torchscript(
    obj: nn.Module,
    path: PathLike,
    *,
    graph: str | None = None,
    example: Tensor,
    verify: bool = True,
    dynamic_dims: Sequence[int] | None = None,
) -> ExportResult:
    """Write a ``torch.jit.trace`` of ``graph`` (TorchScript is deprecated upstream but still the artifact
    existing libtorch consumers load). The dynamic axes are checked by running the reloaded module at
    other shapes. Metadata: extra file "vqcore.json"."""
    plan = _Plan(obj, _graph_of(obj, graph), example, dynamic_dims)
    plan.export_program()  # the same dynamic-axes contract as the other formats
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(plan.module), (plan.example,), check_trace=False)
    path = os.fspath(path)
    meta = plan.metadata("torchscript")
    with _quiet():
        torch.jit.save(traced, path, _extra_files={metadata.EXTRA_FILE: metadata.dumps(meta)})
    report = None
    if verify:
        with _quiet():
            loaded = torch.jit.load(path)
        report = plan.verify(lambda x: loaded(x), "torch.jit")
        _finish(report, verify)
        meta = plan.metadata("torchscript", report=report)
        with _quiet():
            torch.jit.save(traced, path, _extra_files={metadata.EXTRA_FILE: metadata.dumps(meta)})
    return ExportResult(path, meta, report)


def to_pt2(
    obj: nn.Module,
    path: PathLike,
    *,
    graph: str | None = None,
    example: Tensor,
    verify: bool = True,
    dynamic_dims: Sequence[int] | None = None,
    aoti: bool = False,
) -> ExportResult:
    """Write a ``torch.export`` program (``torch.export.save``, extra file "vqcore.json"); with
    ``aoti=True`` an AOTInductor package instead (compiled for this host's ISA and torch version; needs a
    C++ compiler; metadata in ``aot_inductor.metadata``)."""
    plan = _Plan(obj, _graph_of(obj, graph), example, dynamic_dims)
    ep = plan.export_program()
    path = os.fspath(path)
    if aoti:
        return _to_aoti(plan, ep, path, verify)
    meta = plan.metadata("pt2")
    report = None
    if verify:
        with _quiet():
            torch.export.save(ep, path, extra_files={metadata.EXTRA_FILE: metadata.dumps(meta)})
            loaded = torch.export.load(path).module()
        report = plan.verify(lambda x: loaded(x), "torch.export")
        _finish(report, verify)
        meta = plan.metadata("pt2", report=report)
    with _quiet():
        torch.export.save(ep, path, extra_files={metadata.EXTRA_FILE: metadata.dumps(meta)})
    return ExportResult(path, meta, report)


def _to_aoti(plan: _Plan, ep: torch.export.ExportedProgram, path: str, verify: bool) -> ExportResult:
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    def package(meta: dict[str, Any]) -> None:
        with _quiet():
            aoti_compile_and_package(
                ep, package_path=path, inductor_configs={"aot_inductor.metadata": metadata.flat(meta)}
            )

    meta = plan.metadata("aoti")
    package(meta)
    report = None
    if verify:
        with _quiet():
            loaded = aoti_load_package(path)
        report = plan.verify(lambda x: loaded(x), "aotinductor")
        _finish(report, verify)
        meta["parity"] = (
            report.summary()
        )  # recorded in the returned metadata; the package keeps the pre-check copy
    return ExportResult(path, meta, report)


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The vqcore metadata of an artifact written by this module (ONNX, TorchScript or pt2)."""
    import json
    import zipfile

    path = os.fspath(path)
    if path.endswith(".onnx"):
        import onnx

        model = onnx.load(path, load_external_data=False)
        return json.loads({p.key: p.value for p in model.metadata_props}[metadata.METADATA_KEY])
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("/" + metadata.EXTRA_FILE) or name.endswith("extra/" + metadata.EXTRA_FILE):
                return json.loads(archive.read(name))
        for name in archive.namelist():
            if name.endswith(metadata.EXTRA_FILE):
                return json.loads(archive.read(name))
    raise ValueError(f"{path} carries no vqcore metadata")
