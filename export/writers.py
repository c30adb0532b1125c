"""The writers: :func:`to_onnx`, :func:`to_torchscript`, :func:`to_pt2`, :func:`to_executorch`.

Each one builds the export module (:func:`vqcore.export.graphs.export_module`), finds the dynamic axes,
runs ``torch.export.export(strict=False)`` and checks that no declared dynamic axis was specialised,
writes the artifact, reloads it with its own runtime and checks parity (on by default) at the example
shape, a larger shape and size 1 (and with -1 indices where the method's decode accepts them). An
artifact that fails its parity check is not left on disk.

Options every writer takes:

- ``graph``: "encode" (features -> indices), "decode" (indices -> vectors) or "quantize" (features ->
  ``(vectors, indices)``, the two fused).
- ``index_dtype``: ``torch.int64`` (default) or ``torch.int32`` for the indices the artifact returns or
  takes (engines without int64 tensors). Refused before anything is written when a book of the
  quantizer has more codes than int32 can number.
- ``float_dtype``: ``torch.float32`` (default) or ``torch.float16``: the module is cast (a vqcore
  quantizer keeps its nearest-code search and grids in float32; projections and user encoders run in
  float16) and the artifact takes and returns float16. Its parity is checked against the float16 eager
  module; :attr:`ParityReport.precision` also gives the index agreement and SQNR against the float32
  module on the same inputs. Refused before anything is written when float16 overflows where float32
  does not.
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

from vqcore.book_layout import book_layout_of
from vqcore.errors import VQCoreWarning
from vqcore.export import graphs, metadata, parity

PathLike = str | os.PathLike[str]
# run(input) -> the artifact's outputs, on its own runtime
Runner = Callable[[Tensor], Any]

DEFAULT_OPSET = 20
INT32_CODES = 2**31  # an int32 index numbers at most this many codes per book


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
        for n in (
            "torch.onnx",
            "torch.export",
            "torch._dynamo",
            "onnxscript",
            "torch.fx",
            "torchao",
            "executorch",
            "torch.utils._pytree",  # torchao registers enum constants at import (a deprecation notice)
        )
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
        self,
        obj: nn.Module,
        graph: str,
        example: Tensor,
        dynamic_dims: Sequence[int] | None = None,
        index_dtype: torch.dtype = torch.int64,
        float_dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(example, Tensor):
            raise TypeError("example must be a tensor (features for encode / quantize, indices for decode)")
        graphs.check_interface_dtypes(index_dtype, float_dtype)
        inner = graphs.export_module(obj, graph).eval()
        quantizer = graphs.quantizer_of(inner) if graphs.is_wrapper(inner) else obj
        check_index_dtype(quantizer, index_dtype)
        example = example.detach().contiguous()  # a strided view would make torch.export guard its strides
        if example.is_floating_point():
            example = example.to(float_dtype)
        else:
            example = example.to(index_dtype)
        # the float32 module, as the user built it: what a float16 artifact is measured against
        self.float32_module = graphs.with_interface_dtypes(inner, index_dtype, torch.float32)
        if float_dtype != torch.float32:
            inner = graphs.export_module(copy.deepcopy(obj).to(float_dtype), graph).eval()
            quantizer = graphs.quantizer_of(inner) if graphs.is_wrapper(inner) else quantizer
        self.inner = inner  # the export module before the interface dtypes (its type and weights: metadata)
        self.module = graphs.with_interface_dtypes(inner, index_dtype, float_dtype).eval()
        self.quantizer = quantizer
        self.graph = graph
        self.index_dtype, self.float_dtype = index_dtype, float_dtype
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
        if float_dtype != torch.float32:
            check_float_range(self.float32_module, self.module, self.example)
        self.input_name = "indices" if graph == "decode" else "features"
        self.output_names = {
            "encode": ["indices"],
            "decode": ["vectors"],
            "quantize": ["vectors", "indices"],
        }[graph]
        self.output_names += [f"indices{k}" for k in range(len(self.output_names), len(self.example_out))]
        self.index_names = self.out_names
        if graph == "quantize":  # the indices' axes, for the metadata's index layout
            with torch.no_grad():
                index_axes = graphs.map_dynamic_axes(lambda x: self.module(x)[1], self.example, axes)
            self.index_names = {o: self.in_names[i] for i, o in index_axes.items() if o is not None}
        enc = getattr(inner, "encoder", None) if isinstance(inner, graphs.Tokenizer) else None
        self.tie_tolerance = (
            parity.TIE_TOLERANCE if float_dtype == torch.float32 else parity.FLOAT16_TOLERANCE
        )
        self.tie_check = (
            parity.tie_checker(self.quantizer, encoder=enc, tolerance=self.tie_tolerance)
            if graph in ("encode", "quantize")
            else None
        )
        # the eager reference: the wrapper itself, or the quantizer's own encode/decode when a plugin's
        # hook supplied the module (so a hook module that disagrees with the quantizer is caught)
        self.reference = (
            self.module
            if graphs.is_wrapper(inner)
            else graphs.with_interface_dtypes(
                graphs.export_module_default(self.quantizer, graph), index_dtype, float_dtype
            )
        )
        # a quantize artifact's vectors are judged against the eager decode of its own indices, so that
        # a float64-verified tie in the indices does not count twice
        self.decode_reference = (
            graphs.with_interface_dtypes(
                graphs.export_module_default(self.quantizer, "decode"), index_dtype, float_dtype
            )
            if graph == "quantize"
            else None
        )

    def export_program(self, max_sizes: dict[str, int] | None = None) -> torch.export.ExportedProgram:
        with _quiet():
            try:
                ep = torch.export.export(
                    self.module,
                    (self.example,),
                    dynamic_shapes=graphs.dynamic_shapes(self.in_names, max_sizes),
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
            if self.graph != "decode" and ex.is_floating_point():
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
            self.graph, runtime, tie_tolerance=self.tie_tolerance if self.tie_check else None
        )
        precision = parity.PrecisionMeter(self.float_dtype) if self.float_dtype != torch.float32 else None
        for probe in self.probes():
            with torch.no_grad():
                want = parity.as_tuple(self.reference(probe))
            try:
                with torch.no_grad():
                    got = parity.as_tuple(run(probe))
            except Exception as err:  # a runtime failure is a parity failure
                report.shapes.append(tuple(probe.shape))
                report.failures.append(
                    f"input {tuple(probe.shape)}: {runtime} failed: {type(err).__name__}: {str(err)[:300]}"
                )
                continue
            if self.decode_reference is not None and len(got) == 2 and got[1].shape == want[1].shape:
                with torch.no_grad():
                    want = (parity.as_tuple(self.decode_reference(torch.as_tensor(got[1])))[0], *want[1:])
            parity.compare(report, probe, want, got, self.tie_check)
            if precision is not None:
                with torch.no_grad():
                    wide = probe.float() if probe.is_floating_point() else probe
                    precision.add(parity.as_tuple(self.float32_module(wide)), got)
        if precision is not None:
            report.precision = precision.summary()
        return report

    def metadata(
        self,
        fmt: str,
        opset: int | None = None,
        report: parity.ParityReport | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return metadata.build(
            self.inner,
            self.quantizer,
            graph=self.graph,
            fmt=fmt,
            input_name=self.input_name,
            output_names=self.output_names,
            example_in=self.example,
            example_outs=self.example_out,
            in_names=self.in_names,
            out_names=self.out_names,
            index_names=self.index_names,
            index_dtype=self.index_dtype,
            opset=opset,
            parity=None if report is None else report.summary(),
            extra=extra,
        )


def check_index_dtype(quantizer: nn.Module, index_dtype: torch.dtype) -> None:
    """Refuse int32 indices for a quantizer with a book of more than 2^31 codes (its book layout,
    :func:`vqcore.book_layout.book_layout_of`, says how many each book has)."""
    if index_dtype != torch.int32:
        return
    try:
        sizes = book_layout_of(quantizer).sizes
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"index_dtype=torch.int32 needs the codebook sizes of {type(quantizer).__name__} "
            f"(its book layout), which it does not give: {err}"
        ) from err
    largest = max(sizes)
    if largest > INT32_CODES:
        raise ValueError(
            f"index_dtype=torch.int32 cannot number the codes of {type(quantizer).__name__}: a book has "
            f"{largest} codes, int32 indices reach {INT32_CODES - 1}; export with torch.int64"
        )


def check_float_range(float32_module: nn.Module, module: nn.Module, example: Tensor) -> None:
    """Refuse a reduced-precision variant whose eager outputs on ``example`` are not finite where the
    float32 module's are (float16 overflows above 65504)."""
    with torch.no_grad():
        wide = parity.as_tuple(float32_module(example.float() if example.is_floating_point() else example))
        narrow = parity.as_tuple(module(example))
    for k, (w, n) in enumerate(zip(wide, narrow)):
        if not n.is_floating_point():
            continue
        lost = n.isfinite().logical_not() & w.isfinite()
        if bool(lost.any()):
            top = float(w[lost].abs().max())
            raise ValueError(
                f"float_dtype={n.dtype} cannot hold output {k} of this graph: {int(lost.sum())} of "
                f"{n.numel()} values overflow (largest {top:.4g}; float16 reaches 65504); "
                "export with torch.float32"
            )


@contextlib.contextmanager
def _staged(path: str) -> Iterator[str]:
    """A temporary path next to ``path``, moved onto it when the block succeeds and removed otherwise,
    so that an artifact that fails its checks is never left at ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    # the same extension (AOTInductor checks it) and a non-empty stem (TorchScript's archive name)
    staging = os.path.join(directory, f"{stem}.partial{ext}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


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
    index_dtype: torch.dtype = torch.int64,
    float_dtype: torch.dtype = torch.float32,
) -> ExportResult:
    """Write an ONNX file (dynamo exporter, single file, ``opset``) of ``graph`` of ``obj`` (a quantizer,
    Tokenizer or Detokenizer). The input is named "features" (encode, quantize) or "indices" (decode), the
    outputs "indices", "vectors" or "vectors", "indices"; batch and sequence / spatial axes are symbolic
    (``dim_param``), which is checked. ``index_dtype`` / ``float_dtype``: see the module docstring.
    Metadata: ``metadata_props["vqcore"]`` (JSON) plus ``vqcore.<key>`` scalars."""
    import onnx

    plan = _Plan(obj, _graph_of(obj, graph), example, dynamic_dims, index_dtype, float_dtype)
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
                output_names=plan.output_names,
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
    with _staged(path) as staging:
        onnx.save(model, staging)
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
    index_dtype: torch.dtype = torch.int64,
    float_dtype: torch.dtype = torch.float32,
) -> ExportResult:
    """Write a frozen ``torch.jit.trace`` of ``graph`` (TorchScript is deprecated upstream but still the
    artifact existing libtorch consumers load). Frozen: the weights are constants of the graph, so the
    artifact holds no parameters and its outputs never require grad (no ``.detach()`` or no-grad guard
    needed by the caller). The dynamic axes are checked by running the reloaded module at other shapes.
    Metadata: extra file "vqcore.json"."""
    plan = _Plan(obj, _graph_of(obj, graph), example, dynamic_dims, index_dtype, float_dtype)
    plan.export_program()  # the same dynamic-axes contract as the other formats
    module = copy.deepcopy(plan.module).requires_grad_(False).eval()
    with _quiet(), torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(module, (plan.example,), check_trace=False))
    path = os.fspath(path)
    meta = plan.metadata("torchscript")
    report = None
    with _staged(path) as staging:
        if verify:
            with _quiet():
                torch.jit.save(traced, staging)
                loaded = torch.jit.load(staging)
            report = plan.verify(lambda x: loaded(x), "torch.jit")
            _finish(report, verify)
            meta = plan.metadata("torchscript", report=report)
        with _quiet():
            torch.jit.save(traced, staging, _extra_files={metadata.EXTRA_FILE: metadata.dumps(meta)})
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
    index_dtype: torch.dtype = torch.int64,
    float_dtype: torch.dtype = torch.float32,
) -> ExportResult:
    """Write a ``torch.export`` program (``torch.export.save``, extra file "vqcore.json"); with
    ``aoti=True`` an AOTInductor package instead (compiled for this host's ISA and torch version; needs a
    C++ compiler; metadata in ``aot_inductor.metadata``)."""
    plan = _Plan(obj, _graph_of(obj, graph), example, dynamic_dims, index_dtype, float_dtype)
    ep = plan.export_program()
    path = os.fspath(path)
    if aoti:
        return _to_aoti(plan, ep, path, verify)
    meta = plan.metadata("pt2")
    report = None
    with _staged(path) as staging:
        if verify:
            with _quiet():
                torch.export.save(ep, staging)
                loaded = torch.export.load(staging).module()
            report = plan.verify(lambda x: loaded(x), "torch.export")
            _finish(report, verify)
            meta = plan.metadata("pt2", report=report)
        with _quiet():
            torch.export.save(ep, staging, extra_files={metadata.EXTRA_FILE: metadata.dumps(meta)})
    return ExportResult(path, meta, report)


def _to_aoti(plan: _Plan, ep: torch.export.ExportedProgram, path: str, verify: bool) -> ExportResult:
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    meta = plan.metadata("aoti")
    report = None
    with _staged(path) as staging:
        with _quiet():
            aoti_compile_and_package(
                ep, package_path=staging, inductor_configs={"aot_inductor.metadata": metadata.flat(meta)}
            )
        if verify:
            with _quiet():
                loaded = aoti_load_package(staging)
            report = plan.verify(lambda x: loaded(x), "aotinductor")
            _finish(report, verify)
            # recorded in the returned metadata; the package keeps the pre-check copy
            meta["parity"] = report.summary()
    return ExportResult(path, meta, report)


# ExecuTorch plans its memory for the largest input: each dynamic axis is bounded by max_sizes[name],
# by default this many times the example's size (at least EXECUTORCH_MIN_BOUND)
EXECUTORCH_BOUND_FACTOR = 4
EXECUTORCH_MIN_BOUND = 16


def to_executorch(
    obj: nn.Module,
    path: PathLike,
    *,
    graph: str | None = None,
    example: Tensor,
    verify: bool = True,
    dynamic_dims: Sequence[int] | None = None,
    index_dtype: torch.dtype = torch.int64,
    float_dtype: torch.dtype = torch.float32,
    max_sizes: dict[str, int] | None = None,
    xnnpack: bool = True,
) -> ExportResult:
    """Write an ExecuTorch program (``.pte``, for the ExecuTorch runtime on mobile and embedded targets),
    lowered to the XNNPACK delegate where its kernels apply (``xnnpack=False``: portable kernels only;
    where XNNPACK's passes refuse the graph, a :class:`vqcore.errors.VQCoreWarning` says so and the
    program uses the portable kernels; the metadata's ``delegate`` tells which).

    ExecuTorch plans memory for the largest input, so every dynamic axis has an upper bound:
    ``max_sizes={"batch": 64, "seq": 4096}`` by axis name (see the metadata's ``dynamic_axes``); an axis
    not named is bounded by 4 times its size in the example (at least 16). Parity runs through
    executorch's own Python runtime. The metadata is the program's constant method ``vqcore_metadata``
    (a JSON string) and :func:`read_metadata` reads it. Needs the ``executorch`` package
    (``pip install 'vqcore[executorch]'``)."""
    try:
        with _quiet():  # torchao, imported by executorch, logs its missing GPU kernels
            from executorch.exir import to_edge_transform_and_lower
    except ImportError as err:
        raise ImportError(
            "to_executorch needs the executorch package (built for this torch): "
            "pip install 'vqcore[executorch]'"
        ) from err
    plan = _Plan(obj, _graph_of(obj, graph), example, dynamic_dims, index_dtype, float_dtype)
    bounds = executorch_bounds(plan.example, plan.in_names, max_sizes)
    ep = plan.export_program(bounds)
    path = os.fspath(path)

    def lower(delegate: str | None) -> tuple[bytes, dict[str, Any]]:
        meta = plan.metadata("pte", extra={"max_sizes": bounds, "delegate": delegate})
        partitioners: list[Any] = []
        with _quiet():
            if delegate == "xnnpack":
                from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

                partitioners.append(XnnpackPartitioner())
            try:
                edge = to_edge_transform_and_lower(
                    ep, partitioner=partitioners, constant_methods={"vqcore_metadata": metadata.dumps(meta)}
                )
                return edge.to_executorch().buffer, meta
            except Exception as err:
                raise ExportError(
                    f"ExecuTorch lowering of the {plan.graph} graph "
                    f"({'XNNPACK delegate' if delegate else 'portable kernels'}) failed: "
                    f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
                ) from err

    try:
        program, meta = lower("xnnpack" if xnnpack else None)
    except ExportError as err:
        if not xnnpack:
            raise
        # XNNPACK's own graph passes refuse some graphs (a 1-D convolution with dynamic length, for one):
        # the portable kernels run every operator, slower
        warnings.warn(
            f"{err}; the program uses ExecuTorch's portable kernels instead", VQCoreWarning, stacklevel=2
        )
        program, meta = lower(None)
    report = None
    with _staged(path) as staging:
        with open(staging, "wb") as handle:
            handle.write(program)
        if verify:
            report = plan.verify(executorch_runner(staging), "executorch")
            _finish(report, verify)
            # recorded in the returned metadata; the program keeps the pre-check copy (lowering is slow)
            meta["parity"] = report.summary()
    return ExportResult(path, meta, report)


def executorch_bounds(
    example: Tensor, names: dict[int, str], max_sizes: dict[str, int] | None = None
) -> dict[str, int]:
    """The upper bound of each dynamic axis (by name) for :func:`to_executorch`."""
    given = dict(max_sizes or {})
    unknown = sorted(set(given) - set(names.values()))
    if unknown:
        raise ValueError(
            f"max_sizes names axes {unknown}; this graph's dynamic axes are {sorted(names.values())}"
        )
    bounds = {}
    for axis, name in names.items():
        size = int(example.shape[axis])
        bound = given.get(name, max(EXECUTORCH_MIN_BOUND, EXECUTORCH_BOUND_FACTOR * size))
        if not isinstance(bound, int) or bound < size:
            raise ValueError(
                f"max_sizes[{name!r}] must be an int >= {size} (the example's size), got {bound!r}"
            )
        bounds[name] = bound
    return bounds


def executorch_runner(path: PathLike) -> Runner:
    """``run(tensor) -> tuple of tensors`` through executorch's Python runtime."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(os.fspath(path)).load_method("forward")

    def run(x: Tensor) -> tuple[Tensor, ...]:
        return tuple(method.execute([x.contiguous()]))

    return run


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The vqcore metadata of an artifact written by this module (ONNX, TorchScript, pt2 or ExecuTorch)."""
    import json
    import zipfile

    path = os.fspath(path)
    if path.endswith(".onnx"):
        import onnx

        model = onnx.load(path, load_external_data=False)
        return json.loads({p.key: p.value for p in model.metadata_props}[metadata.METADATA_KEY])
    if path.endswith(".pte"):
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(path)
        return json.loads(program.load_method("vqcore_metadata").execute([])[0])
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("/" + metadata.EXTRA_FILE) or name.endswith("extra/" + metadata.EXTRA_FILE):
                return json.loads(archive.read(name))
        for name in archive.namelist():
            if name.endswith(metadata.EXTRA_FILE):
                return json.loads(archive.read(name))
    raise ValueError(f"{path} carries no vqcore metadata")
