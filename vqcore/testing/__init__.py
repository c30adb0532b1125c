"""The conformance kit: ``check_quantizer(factory, example, **factory_kwargs)``.

Built-in methods pass it in vqcore's test suite; plugin authors call it in theirs::

    from vqcore.testing import check_quantizer

    def test_my_quantizer():
        check_quantizer(MyQuantizer, torch.randn(2, 16, 32), dim=32, codebook_size=64)

It raises :class:`ConformanceError` naming the first broken rule, and returns a
:class:`ConformanceReport` of what was checked:

1. the factory builds an ``nn.Module`` following :class:`vqcore.protocols.Quantizer`;
2. training-mode forward: ``quantized`` has the input's shape and dtype, indices are an integer tensor
   (int64; a method may keep a narrower type its reference returns there, FSP's int32) in
   ``[0, codebook_size)``, the losses are finite, and ``quantized`` itself carries a non-zero gradient
   to the input (a gradient through the losses alone does not count);
3. eval: ``encode(x)`` equals the forward's indices, ``decode(encode(x))`` equals the eval forward's
   ``quantized`` bit for bit, ``-1`` (a dropped or masked position) decodes to zeros: every index -1 ->
   all zeros, and one batch item all -1 -> that item zeros, the others unchanged (a decode that
   rejects -1 with a ValueError/TypeError passes; one that maps it to a code fails); encode, decode
   and the eval forward leave the state_dict unchanged;
4. state_dict round trip into a freshly built module gives identical eval outputs;
5. the book layout (``book_layout()``, or one book / a trailing axis of ``num_codebooks`` books) fits
   the indices, each index below its book's codebook size (what the codebook monitor relies on);
6. ``torch.export.export(strict=False)`` of encode and decode with dynamic batch and sequence axes;
   the exported programs run (no guard fails) and match eager on a larger shape and at size 1.

:func:`record_host_syncs` (from :mod:`vqcore.testing.host_syncs`) finds, on the CPU, the operations that make
the host wait for a GPU: a plugin's tests can pin its training step as free of them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.book_layout import book_layout_of
from vqcore.protocols import DROPPED_INDEX, INDEX_DTYPE, check_quantizer_instance
from vqcore.testing.host_syncs import record_host_syncs

__all__ = ["ConformanceError", "ConformanceReport", "check_quantizer", "record_host_syncs"]

# The helpers hold the quantizer under test as ``Any``, as vqcore.create returns it: its members are those of
# vqcore.protocols.Quantizer, which the ``nn.Module`` type does not describe.


class ConformanceError(AssertionError):
    """A quantizer broke one of the rules of :func:`check_quantizer`."""


@dataclass
class ConformanceReport:
    name: str
    checks: list[str] = field(default_factory=list)

    def passed(self, what: str) -> None:
        self.checks.append(what)


def check_quantizer(
    factory: Callable[..., nn.Module] | str,
    example: Tensor,
    *,
    dynamic_dims: tuple[int, ...] | None = None,
    check_export: bool = True,
    train_steps: int = 2,
    seed: int = 0,
    **factory_kwargs,
) -> ConformanceReport:
    """Check that ``factory(**factory_kwargs)`` is a well-behaved vqcore quantizer on ``example``.

    ``factory`` is a class/callable or a registry name. ``dynamic_dims`` are the axes of ``example``
    that must be dynamic in the exported encode graph (default: batch plus the sequence / spatial axes:
    ``(0,)`` for 2-D, ``(0, 1)`` for 3-D channel-last, ``(0, 2, ...)`` for image and video fmaps).
    """
    if isinstance(factory, str):
        from vqcore.api import create

        name = factory
        build = lambda: create(name, **factory_kwargs)
    else:
        name = getattr(factory, "__name__", repr(factory))
        build = lambda: factory(**factory_kwargs)
    if not isinstance(example, Tensor) or not example.is_floating_point():
        raise TypeError("example must be a floating point tensor")
    report = ConformanceReport(name)

    torch.manual_seed(seed)
    quantizer = build()
    check_quantizer_instance(quantizer, origin=name)
    _require(
        isinstance(quantizer.codebook_size, int) and quantizer.codebook_size > 0,
        "codebook_size must be a positive int",
    )
    report.passed("protocol")

    # -- training -----------------------------------------------------------------------------------
    quantizer.train()
    for step in range(max(1, train_steps)):
        x = example.detach().clone().requires_grad_(True)
        out = quantizer(x)
        quantized, indices = out[0], out[1]
        _check_outputs(quantizer, example, quantized, indices, f"training forward (step {step})")
        losses = [t for t in tuple(out)[2:] if isinstance(t, Tensor) and t.is_floating_point()]
        for loss in losses:
            _require(bool(torch.isfinite(loss).all()), f"training loss is not finite: {loss}")
        _check_quantized_gradient(x, quantized, step, seed)
        total = sum((loss.sum() for loss in losses if loss.requires_grad), quantized.float().sum())
        total.backward()
        if x.grad is None:
            raise ConformanceError("no gradient reached the input in training mode")
        _require(bool(torch.isfinite(x.grad).all()), "the input's gradient is not finite")
    report.passed(
        "training forward: shapes, dtypes, index range, finite losses, quantized's gradient to the input"
    )

    # -- eval: encode / decode / forward agree, no state touched ----------------------------------------
    quantizer.eval()
    x = example.detach().clone()
    state = _snapshot(quantizer)
    with torch.no_grad():
        out = quantizer(x)
        indices = quantizer.encode(x)
        decoded = quantizer.decode(indices)
    _check_outputs(quantizer, example, out[0], out[1], "eval forward")
    _require(indices.dtype == INDEX_DTYPE, f"encode must return {INDEX_DTYPE}, got {indices.dtype}")
    _require(
        torch.equal(indices, out[1].to(indices.dtype)), "encode(x) differs from the eval forward's indices"
    )
    _require(
        decoded.shape == out[0].shape and torch.equal(decoded.to(out[0].dtype), out[0]),
        "decode(encode(x)) differs from the eval forward's quantized output (must be bit for bit equal)",
    )
    dropped = _check_dropped_indices(quantizer, indices, decoded)
    _require(
        _same_state(state, _snapshot(quantizer)), "encode/decode/eval forward changed the module's state"
    )
    report.passed(
        f"eval: encode == forward indices, decode(encode(x)) == forward quantized, {dropped}, state untouched"
    )
    _check_book_layout(quantizer, indices)
    report.passed("book layout: the indices hold the declared books, each index below its book's size")

    # -- state_dict round trip ------------------------------------------------------------------------
    torch.manual_seed(seed + 1)
    fresh = build()
    fresh.load_state_dict(quantizer.state_dict())
    fresh.eval()
    with torch.no_grad():
        again = fresh(x)
    _require(
        torch.equal(again[0], out[0]) and torch.equal(again[1], out[1]),
        "state_dict round trip changed the outputs",
    )
    report.passed("state_dict round trip")

    if check_export:
        _check_export(quantizer, x, indices, dynamic_dims, report)
    return report


def _check_outputs(quantizer: Any, example: Tensor, quantized: Any, indices: Any, where: str) -> None:
    _require(isinstance(quantized, Tensor), f"{where}: the first output must be the quantized tensor")
    _require(
        quantized.shape == example.shape,
        f"{where}: quantized shape {tuple(quantized.shape)} != input shape {tuple(example.shape)}",
    )
    _require(
        quantized.dtype == example.dtype,
        f"{where}: quantized dtype {quantized.dtype} != input dtype {example.dtype}",
    )
    _require(isinstance(indices, Tensor), f"{where}: the second output must be the indices tensor")
    _require(
        not indices.is_floating_point() and not indices.is_complex() and indices.dtype != torch.bool,
        f"{where}: indices must be an integer tensor ({INDEX_DTYPE}), got {indices.dtype}",
    )
    _require(indices.shape[0] == example.shape[0], f"{where}: indices must keep the batch axis first")
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        _require(
            low >= 0 and high < quantizer.codebook_size,
            f"{where}: indices out of range [0, {quantizer.codebook_size}): min {low}, max {high}",
        )


def _check_book_layout(quantizer: Any, indices: Tensor) -> None:
    """The books that readers of indices (the codebook monitor) see: ``book_layout()``, or one book /
    a trailing axis of ``num_codebooks`` books, must fit the indices, each below its book's size."""
    try:
        layout = book_layout_of(quantizer)
        books = layout.books_first(indices)
    except (TypeError, ValueError) as err:
        raise ConformanceError(f"book layout: {err}") from err
    sizes = torch.tensor(layout.sizes, device=books.device).unsqueeze(1)
    _require(
        bool((books < sizes).all()),
        f"book layout: indices at or above their book's codebook size ({layout.describe()}); a quantizer "
        "whose indices hold several books declares them with book_layout()",
    )


def _check_quantized_gradient(x: Tensor, quantized: Tensor, step: int, seed: int) -> None:
    """``quantized`` alone carries a finite, non-zero gradient to ``x`` (losses excluded)."""
    where = f"training forward (step {step})"
    _require(
        quantized.requires_grad,
        f"{where}: quantized carries no gradient to the input (it is detached from x); "
        "a gradient through the losses alone does not count",
    )
    # a random direction: a plain sum of squares would vanish where the codes are zero
    generator = torch.Generator().manual_seed(seed + step)
    direction = torch.randn(quantized.shape, generator=generator).to(quantized.device)
    (grad,) = torch.autograd.grad(
        (quantized.float() * direction).sum(), x, retain_graph=True, allow_unused=True
    )
    _require(
        grad is not None,
        f"{where}: quantized carries no gradient to the input; a gradient through the losses alone "
        "does not count",
    )
    _require(bool(torch.isfinite(grad).all()), f"{where}: quantized's gradient to the input is not finite")
    _require(bool(grad.abs().sum() > 0), f"{where}: quantized's gradient to the input is zero everywhere")


def _check_dropped_indices(quantizer: Any, indices: Tensor, decoded: Tensor) -> str:
    """-1 decodes to zeros, or decode rejects it with a ValueError/TypeError; returns what was checked."""
    rule = "-1 must decode to zeros (or be rejected with a ValueError/TypeError)"
    everywhere = torch.full_like(indices, DROPPED_INDEX)
    try:
        with torch.no_grad():
            out = quantizer.decode(everywhere)
    except (ValueError, TypeError):
        return "decode rejects -1 (ValueError/TypeError)"
    except Exception as err:  # any other failure breaks the rule
        raise ConformanceError(
            f"decode of indices all -1 raised {type(err).__name__}: {err}; {rule}"
        ) from err
    _require(
        isinstance(out, Tensor) and out.shape == decoded.shape,
        f"decode of indices all -1 gave shape {tuple(getattr(out, 'shape', ()))}, "
        f"expected {tuple(decoded.shape)}",
    )
    _require(
        not bool(out.any()),
        f"decode maps -1 to a code: indices all -1 decoded to values up to "
        f"{float(out.abs().max()):.3g}; {rule}",
    )
    if indices.shape[0] < 2:  # one batch item: nothing else to stay unchanged
        return "-1 decodes to zeros"
    # indices keep the batch axis first (checked on the forward's outputs), like the features
    one_item = indices.clone()
    one_item[0] = DROPPED_INDEX
    with torch.no_grad():
        out = quantizer.decode(one_item)
    _require(
        not bool(out[0].any()),
        f"decode maps -1 to a code: batch item 0 all -1 decoded to values up to "
        f"{float(out[0].abs().max()):.3g}; {rule}",
    )
    _require(
        torch.equal(out[1:], decoded[1:]),
        "decode of batch item 0 all -1 changed the other batch items' vectors",
    )
    return "-1 decodes to zeros (all indices, one batch item)"


def default_dynamic_dims(example: Tensor) -> tuple[int, ...]:
    """Batch plus the sequence / spatial axes (shared with :mod:`vqcore.export`)."""
    from vqcore.export.graphs import default_dynamic_dims as dims_of

    return dims_of(example)


def _check_export(
    quantizer: Any,
    x: Tensor,
    indices: Tensor,
    dynamic_dims: tuple[int, ...] | None,
    report: ConformanceReport,
) -> None:
    # the dynamic-axes logic (which index axes follow the input's, named Dims) is vqcore.export's
    from vqcore.export.graphs import DecodeGraph, EncodeGraph, axis_names, dynamic_shapes, map_dynamic_axes

    dims = tuple(dynamic_dims) if dynamic_dims is not None else default_dynamic_dims(x)
    for d in dims:
        _require(
            x.shape[d] >= 2, f"example axis {d} is declared dynamic; give it a size >= 2 (got {x.shape[d]})"
        )
    quantizer = copy.deepcopy(quantizer).eval()
    encode_module, decode_module = EncodeGraph(quantizer), DecodeGraph(quantizer)
    try:
        # the index axes that follow the input's dynamic axes (batch first, positions in order; after
        # the groups axis for groups-first layouts)
        followed = map_dynamic_axes(encode_module, x, dims)
    except ValueError as err:
        raise ConformanceError(
            f"encode does not accept other sizes on the dynamic axes {dims}: {err}"
        ) from err
    names = axis_names(x, dims)
    index_names: dict[int, str] = {}  # index axis -> the name of the input axis it follows
    for d in dims:
        index_axis = followed[d]
        if index_axis is None:
            raise ConformanceError(f"the indices do not follow the input's dynamic axes {dims}")
        index_names[index_axis] = names[d]
    index_dims = tuple(sorted(index_names))
    try:
        encode = torch.export.export(encode_module, (x,), dynamic_shapes=dynamic_shapes(names), strict=False)
        decode = torch.export.export(
            decode_module, (indices,), dynamic_shapes=dynamic_shapes(index_names), strict=False
        )
    except Exception as err:  # report any exporter failure as a conformance failure
        raise ConformanceError(
            f"torch.export of encode/decode with dynamic axes {dims} failed: {type(err).__name__}: {err}"
        ) from err
    for program, graph in ((encode, "encode"), (decode, "decode")):
        user_input = program.graph_signature.user_inputs[0]
        placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_input)
        shape = placeholder.meta["val"].shape
        static = [i for i in (dims if graph == "encode" else index_dims) if isinstance(shape[i], int)]
        _require(
            not static, f"exported {graph} specialised axes {static} to constants (shape {tuple(shape)})"
        )

    encode_program, decode_program = encode.module(), decode.module()
    for shape in (_grown(x.shape, dims, 1), _grown(x.shape, dims, None)):
        probe = torch.randn(shape, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            want_idx = quantizer.encode(probe)
            got_idx = _run_exported(encode_program, "encode", probe, dims)
            _require(
                torch.equal(got_idx, want_idx), f"exported encode differs from eager at shape {tuple(shape)}"
            )
            got = _run_exported(decode_program, "decode", want_idx, index_dims)
            _require(
                torch.equal(got, quantizer.decode(want_idx)),
                f"exported decode differs from eager at shape {tuple(shape)}",
            )
    report.passed(
        f"torch.export of encode/decode, dynamic axes {dims}, checked at a larger shape and at size 1"
    )


def _run_exported(program: nn.Module, graph: str, inp: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Run an exported program; a failure (e.g. a guard on a dynamic size) is a ConformanceError."""
    try:
        return program(inp)
    except Exception as err:  # torch raises AssertionError/RuntimeError/ValueError for failed guards
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConformanceError(
            f"the exported {graph} graph must run at other sizes of its dynamic axes {dims}: it failed at "
            f"input shape {tuple(inp.shape)}: {type(err).__name__}: {detail} (a guard on a size means "
            f"{graph} branches on a shape when traced, e.g. torch.cdist chooses its algorithm by size)"
        ) from err


def _grown(shape: Sequence[int], dims: Sequence[int], size: int | None) -> tuple[int, ...]:
    """The example's shape with dynamic axes set to ``size`` (None: example + 3)."""
    return tuple((s + 3 if size is None else size) if i in dims else s for i, s in enumerate(shape))


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceError(message)
