"""What gets exported: eval-only wrappers around ``encode`` / ``decode``, and the dynamic axes.

A quantizer that follows :class:`vqcore.protocols.Quantizer` is exported through
:class:`EncodeGraph` / :class:`DecodeGraph` / :class:`QuantizeGraph` with no export code of its own; a
plugin may instead supply a module through the ``export_module(quantizer, graph)`` hook.
:class:`Tokenizer` and :class:`Detokenizer` chain a user's encoder / decoder with the quantizer (the
production artifact). :class:`InterfaceDtypes` puts the artifact's index and float dtypes (int32
indices, float16 vectors) around any of them.

Dynamic axes are found by probing, not by assuming a layout: each axis of the example is grown by
one; an axis is dynamic when the module accepts the grown input and exactly one output axis grows with
it (feature, quantizer, heads and groups axes are rejected by the module's own checks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from vqcore.protocols import SupportsExportMetadata

GRAPHS = ("encode", "decode", "quantize")
INDEX_DTYPES = (torch.int64, torch.int32)
FLOAT_DTYPES = (torch.float32, torch.float16)
# features shapes of export examples, by input layout (see default_example_shape)
EXAMPLE_SHAPES: dict[str, Callable[[int], tuple[int, ...]]] = {
    "sequence": lambda dim: (2, 16, dim),
    "channel_first": lambda dim: (2, dim, 16),
    "image": lambda dim: (2, dim, 8, 6),
    "video": lambda dim: (2, dim, 3, 4, 5),
}

ModuleOutput = Tensor | tuple[Tensor, ...]


def _plain(out: Any) -> ModuleOutput:
    """Namedtuples and lists -> plain tuples (torch.export.save cannot serialise namedtuple specs)."""
    if isinstance(out, Tensor):
        return out
    return tuple(out)


# The wrappers hold their quantizer as ``Any`` (as vqcore.create returns it): its encode / decode are the
# methods of vqcore.protocols.Quantizer, which the ``nn.Module`` type of their arguments does not describe.


class EncodeGraph(nn.Module):
    """features -> int64 indices: ``quantizer.encode`` in eval mode."""

    graph = "encode"

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer: Any = quantizer

    def forward(self, x: Tensor) -> ModuleOutput:
        return _plain(self.quantizer.encode(x))


class DecodeGraph(nn.Module):
    """indices -> vectors (after project_out): ``quantizer.decode`` in eval mode."""

    graph = "decode"

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer: Any = quantizer

    def forward(self, indices: Tensor) -> ModuleOutput:
        return _plain(self.quantizer.decode(indices))


class QuantizeGraph(nn.Module):
    """features -> (vectors, indices): ``quantizer.encode`` then ``quantizer.decode`` of those indices, one
    graph (a codec's bottleneck). The vectors equal the eval forward's quantized output (the Quantizer
    protocol's ``decode(encode(x))`` contract); an encode that returns several index tensors gives
    ``(vectors, *indices)``."""

    graph = "quantize"

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer: Any = quantizer

    def forward(self, x: Tensor) -> ModuleOutput:
        indices = self.quantizer.encode(x)
        return (_first(_plain(self.quantizer.decode(indices))), *_as_tuple(_plain(indices)))


class Tokenizer(nn.Module):
    """``quantizer.encode(encoder(x))``: a user's encoder and the quantizer as one encode artifact."""

    graph = "encode"

    def __init__(self, encoder: nn.Module, quantizer: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.quantizer: Any = quantizer

    def forward(self, x: Tensor) -> ModuleOutput:
        return _plain(self.quantizer.encode(self.encoder(x)))


class Detokenizer(nn.Module):
    """``decoder(quantizer.decode(indices))``: the quantizer and a user's decoder as one decode artifact."""

    graph = "decode"

    def __init__(self, quantizer: nn.Module, decoder: nn.Module):
        super().__init__()
        self.quantizer: Any = quantizer
        self.decoder = decoder

    def forward(self, indices: Tensor) -> ModuleOutput:
        return _plain(self.decoder(self.quantizer.decode(indices)))


class InterfaceDtypes(nn.Module):
    """The dtypes an artifact's caller sees around an export module: integer outputs (indices)
    as ``index_dtype``, integer inputs (a decode graph's indices) taken as ``index_dtype`` and widened to
    int64 before the module, floating outputs (vectors) as ``float_dtype``. The module inside computes as
    before (a vqcore quantizer searches in float32 whatever its dtype)."""

    def __init__(self, module: nn.Module, index_dtype: torch.dtype, float_dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.index_dtype = index_dtype
        self.float_dtype = float_dtype

    def forward(self, x: Tensor) -> ModuleOutput:
        if not x.is_floating_point():
            x = x.long()
        out = _as_tuple(_plain(self.module(x)))
        cast = tuple(o.to(self.float_dtype if o.is_floating_point() else self.index_dtype) for o in out)
        return cast[0] if len(cast) == 1 else cast


def check_interface_dtypes(index_dtype: torch.dtype, float_dtype: torch.dtype) -> None:
    """Refuse dtypes an artifact cannot take or return."""
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")


def with_interface_dtypes(
    module: nn.Module, index_dtype: torch.dtype = torch.int64, float_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """``module`` itself for the default dtypes (int64 indices, float32 vectors), else
    :class:`InterfaceDtypes` around it."""
    check_interface_dtypes(index_dtype, float_dtype)
    if index_dtype == torch.int64 and float_dtype == torch.float32:
        return module
    return InterfaceDtypes(module, index_dtype, float_dtype)


def is_wrapper(
    module: object,
) -> TypeGuard[EncodeGraph | DecodeGraph | QuantizeGraph | Tokenizer | Detokenizer]:
    return isinstance(module, (EncodeGraph, DecodeGraph, QuantizeGraph, Tokenizer, Detokenizer))


def export_module(quantizer: nn.Module, graph: str) -> nn.Module:
    """The module exported for ``graph`` of ``quantizer``: a plugin's (hook ``export_module``) or the
    protocol wrapper. Tokenizer / Detokenizer (and other wrappers) are returned as they are."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if is_wrapper(quantizer):
        if quantizer.graph != graph:
            raise ValueError(
                f"{type(quantizer).__name__} is a {quantizer.graph} graph, asked for graph={graph!r}"
            )
        return quantizer
    from vqcore.registry import get_registry

    supplied = get_registry().export_module(quantizer, graph)
    if supplied is not None:
        return supplied
    return export_module_default(quantizer, graph)


def export_module_default(quantizer: nn.Module, graph: str) -> nn.Module:
    """The protocol wrapper around ``quantizer.encode`` / ``quantizer.decode`` (both for "quantize")."""
    needs = ("encode", "decode") if graph == "quantize" else (graph,)
    missing = [name for name in needs if not callable(getattr(quantizer, name, None))]
    if missing:
        raise TypeError(
            f"{type(quantizer).__name__} has no {' or '.join(f'{m}()' for m in missing)} "
            f"(vqcore.protocols.Quantizer): cannot export the {graph} graph"
        )
    wrapper = {"encode": EncodeGraph, "decode": DecodeGraph, "quantize": QuantizeGraph}[graph]
    return wrapper(quantizer)


def quantizer_of(module: nn.Module) -> nn.Module:
    """The quantizer inside a wrapper (or the module itself)."""
    return getattr(module, "quantizer", module) if is_wrapper(module) else module


# -- examples and dynamic axes ---------------------------------------------------------------------


def default_example_shape(quantizer: nn.Module) -> tuple[int, ...]:
    """Features shape for an export example of ``quantizer`` (its ``dim`` features, batch 2).

    The input layout the quantizer declares as ``export_metadata()["layout"]`` (``sequence``,
    ``channel_first``, ``image`` or ``video``) when it declares one; otherwise the first of
    ``(2, 16, dim)``, ``(2, dim, 16)``, ``(2, dim, 8, 6)``, ``(2, dim, 3, 4, 5)`` that its ``encode``
    accepts. Raises a ValueError when it accepts none of them.
    """
    dim = quantizer.dim
    if not isinstance(dim, int) or dim < 1:
        raise TypeError(f"{type(quantizer).__name__}.dim must be a positive int, got {dim!r}")
    if isinstance(quantizer, SupportsExportMetadata):
        declared = quantizer.export_metadata().get("layout")
        if declared in EXAMPLE_SHAPES:
            return EXAMPLE_SHAPES[declared](dim)
    tried = []
    tensors = [*quantizer.parameters(), *quantizer.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    probed: Any = quantizer  # as the wrappers hold it: encode is a Quantizer method
    for shape in (make(dim) for make in EXAMPLE_SHAPES.values()):
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        try:
            with torch.no_grad():
                probed.encode(probe)
        except Exception as err:  # this layout is not the quantizer's: try the next one
            tried.append(f"{shape}: {type(err).__name__}: {err}")
            continue
        return shape
    raise ValueError(
        f"{type(quantizer).__name__}.encode accepts none of the example shapes; give the example's shape. "
        "Tried: " + "; ".join(tried)
    )


def default_dynamic_dims(example: Tensor) -> tuple[int, ...]:
    """Layout convention of the conformance kit: ``(0,)`` for 2-D, ``(0, 1)`` for 3-D channel-last,
    ``(0, 2, ...)`` for channel-first image and video fmaps."""
    if example.ndim <= 2:
        return (0,)
    if example.ndim == 3:
        return (0, 1)
    return (0, *range(2, example.ndim))


def grow(t: Tensor, axis: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """``t`` resized to ``size`` along ``axis`` by resampling its own slices (indices stay valid)."""
    pick = torch.randint(0, t.shape[axis], (size,), generator=generator).to(
        t.device
    )  # CPU generator, any device
    if size <= t.shape[axis] and generator is None:
        pick = torch.arange(size, device=t.device)
    return t.index_select(axis, pick)


def _first(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _as_tuple(out: ModuleOutput) -> tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)


@torch.no_grad()
def map_dynamic_axes(
    fn: Callable[[Tensor], Any], example: Tensor, dims: Iterable[int] | None = None
) -> dict[int, int | None]:
    """``{input axis: output axis}`` for the axes of ``example`` that ``fn`` accepts at another size.

    With ``dims`` given these axes are required (an error if ``fn`` rejects one); otherwise every axis
    is probed and kept when exactly one output axis follows it."""
    base = _first(fn(example))
    found: dict[int, int | None] = {}
    for axis in range(example.ndim) if dims is None else dims:
        axis = axis % example.ndim
        try:
            out = _first(
                fn(grow(example, axis, example.shape[axis] + 1, torch.Generator().manual_seed(axis)))
            )
        except Exception as err:  # a rejected size marks a static axis
            if dims is not None:
                raise ValueError(
                    f"axis {axis} of the example was declared dynamic "
                    f"but the module rejects another size: {err}"
                ) from err
            continue
        if out.ndim != base.ndim:
            if dims is not None:
                raise ValueError(f"growing axis {axis} changed the output's rank")
            continue
        changed = [a for a in range(out.ndim) if out.shape[a] != base.shape[a]]
        if len(changed) == 1 or dims is not None:
            found[axis] = changed[0] if len(changed) == 1 else None
    return found


def axis_names(example: Tensor, dims: Iterable[int]) -> dict[int, str]:
    """Readable names for dynamic axes: batch, then seq | height, width | time, height, width."""
    dims = sorted(dims)
    if not dims:
        return {}
    rest = dims[1:]  # the first dynamic axis is the batch (axis 1 of groups-first indices)
    labels = {1: ["seq"], 2: ["height", "width"], 3: ["time", "height", "width"]}.get(len(rest))
    if labels is None:
        labels = [f"axis{d}" for d in rest]
    return {dims[0]: "batch", **dict(zip(rest, labels))}


def export_example(example: Tensor, dims: Iterable[int]) -> Tensor:
    """The example with each dynamic axis >= 2 and all dynamic sizes distinct (torch.export
    specialises sizes 0/1 and merges equal sizes)."""
    used: set[int] = set()
    for axis in sorted(dims):
        size = max(2, example.shape[axis])
        while size in used:
            size += 1
        used.add(size)
        if size != example.shape[axis]:
            example = grow(example, axis, size, torch.Generator().manual_seed(size))
    return example


def dynamic_shapes(names: dict[int, str], max_sizes: dict[str, int] | None = None) -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for torch.export (positional, so any forward signature works): one named
    ``Dim`` per dynamic axis of the single input, bounded above by ``max_sizes[name]`` where given."""
    from torch.export import Dim

    bounds = max_sizes or {}
    return (
        {axis: Dim(name, max=bounds[name]) if name in bounds else Dim(name) for axis, name in names.items()},
    )
