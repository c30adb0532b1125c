"""CodebookMonitor: exact codebook usage of any quantizer, counted on the device, read on demand.

How it counts. The monitor keeps one int64 table per book (head, layer, group, codebook of the
quantizer's :class:`~vqcore.book_layout.BookLayout`) on the quantizer's device. Every observed call adds
its indices to the tables with one ``scatter_add_`` of fixed shape: no host synchronisation, no
data-dependent shape, so a compiled training forward keeps its single graph. Negative indices (``-1``:
dropped by quantize dropout, masked out) are not counted; an index at or above its book's codebook size
lands in an overflow slot that :meth:`CodebookMonitor.report` turns into an error (a plugin whose indices
do not match its declared sizes). Under torch.distributed the tables are summed over ranks when read,
never per step: every rank must then call the reading method (report, table, plot, counts) together.

Books of at most ``exact_limit`` codes (default 2^24) are counted exactly. A larger book (LFQ with many
bits) is counted in ``sketch_buckets`` hashed buckets (default 2^22; bounded memory): the number of used
codes is then the linear-counting estimate ``m ln(m / empty buckets)`` (Whang et al., 1990: relative
standard error ``sqrt(m (e^t - t - 1)) / n`` at ``n`` used codes, ``t = n / m``, reported as
``usage_rel_error``) and the perplexity is that of the bucket distribution, a lower bound of the true
one: codes sharing a bucket merge, which for codes used about equally often lowers it by a factor of
about ``2^t`` (3% at ``t = 0.04``); rare codes are not estimated.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.blocks.distributed import all_reduce_sum_, should_sync
from vqcore.book_layout import BookLayout, book_layout_of
from vqcore.metrics.display import format_table, plot_usage, report_key
from vqcore.module import get_config

EXACT_LIMIT = 2**24
SKETCH_BUCKETS = 2**22
# splitmix64's finaliser constants as signed int64 (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MIX = (-4658895280553007687, -7723592293110705685)


def _mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 (wrapping products, logical shifts): a random-looking hash, which the
    linear-counting estimate assumes (a multiplicative hash spreads consecutive codes too evenly)."""

    def shifted(v: Tensor, s: int) -> Tensor:
        return (v >> s) & ((1 << (64 - s)) - 1)

    x = (x ^ shifted(x, 30)) * _MIX[0]
    x = (x ^ shifted(x, 27)) * _MIX[1]
    return x ^ shifted(x, 31)


def _not_observable() -> bool:
    """True while a graph is traced for export (TorchScript, torch.export, ONNX): those graphs must not
    capture the monitor's counting. torch.compile does trace it (``is_compiling`` alone is not checked)."""
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_exporting())


def split_output(output: Any) -> tuple[Tensor | None, Any]:
    """A quantizer forward's output -> ``(quantized or None, indices or None)``.

    Follows the protocol's ``quantized, indices, ...`` NamedTuples by field name, the reference's nested
    ``((quantized, indices, aux), breakdown)`` (LFQ with a loss breakdown), a plain tuple by position,
    and a bare integer tensor (RandomProjectionQuantizer returns its indices).
    """
    if isinstance(output, Tensor):
        return (None, output) if not output.is_floating_point() else (output, None)
    if not isinstance(output, tuple) or not output:
        return None, None
    if hasattr(output, "_fields"):
        fields = output._fields
        if "indices" in fields or "quantized" in fields:
            quantized = getattr(output, "quantized", None)
            return (quantized if isinstance(quantized, Tensor) else None), getattr(output, "indices", None)
    if isinstance(output[0], tuple):
        return split_output(output[0])
    quantized = output[0] if isinstance(output[0], Tensor) and output[0].is_floating_point() else None
    indices = output[1] if len(output) > 1 else None
    if isinstance(indices, Tensor) and indices.is_floating_point():
        indices = None
    return quantized, indices


def _forward_input(args: tuple, kwargs: Mapping[str, Any]) -> Tensor | None:
    x = args[0] if args else kwargs.get("x", kwargs.get("z"))
    return x if isinstance(x, Tensor) else None


class _ObservedEncode:
    """Installed as the quantizer instance's ``encode``: runs the class's encode, then feeds the indices to
    every monitor attached. A copy (``copy.deepcopy``, pickling) of the quantizer is not monitored."""

    def __init__(self, module: Any):
        self.module = module
        self.monitors: list[CodebookMonitor] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        indices = type(self.module).encode(self.module, *args, **kwargs)
        for monitor in self.monitors:
            monitor._observe_encode(indices)
        return indices

    def __deepcopy__(self, memo: dict) -> Any:
        module = memo.get(id(self.module))
        module = copy.deepcopy(self.module, memo) if module is None else module
        return types.MethodType(type(module).encode, module)

    def __reduce__(self) -> Any:
        return (getattr, (self.module, "encode"))


@dataclass(frozen=True)
class BookInfo:
    """One book as the monitor reports it: its key segment (``"layer2"``; ``""`` for a single book), its
    number of codes, and whether it is counted exactly."""

    name: str
    size: int
    exact: bool


class CodebookMonitor:
    """Counts, exactly, how often each code of ``quantizer`` is used, per book (head, layer, group,
    codebook), in every forward and ``encode`` call, training or eval, until :meth:`reset`.

    ``quantizer`` may also be a :class:`~vqcore.book_layout.BookLayout` (``BookLayout.single(256)``) to
    count indices from elsewhere (a dataset's tokens, another library) with :meth:`update`.

    - ``name``: the key prefix of :meth:`report` (default: the quantizer's registry name, else its class
      name in lower case).
    - ``hooks``: attach to the quantizer's forward (a forward hook) and ``encode`` (the instance's
      ``encode`` is wrapped); False: only explicit :meth:`update` calls count. :meth:`detach` undoes it.
    - ``track_error``: in hooked forwards, also sum ``||x - quantized||^2`` and ``||x||^2`` (forwards
      given a ``mask`` or ``lens`` are not included, nor calls whose sums are not finite).
    - ``layer_errors``: residual stacks (a book layout with a ``residual`` axis): in hooked forwards,
      also decode the indices truncated after each layer to measure each layer's error (``layers + 1``
      decodes per call: for evaluation, not the training loop). :meth:`update` given ``x`` always does.
    - ``rare_threshold``: a code is *rare* when used fewer than ``rare_threshold * tokens / codebook
      size`` times (that fraction of a uniform share); never-used codes are *dead*.
    - ``exact_limit`` / ``sketch_buckets``: books up to ``exact_limit`` codes are counted exactly, larger
      ones in ``sketch_buckets`` hashed buckets (a power of two; see the module docstring for the error).
    - ``sync``: sum the counts over torch.distributed ranks when read (None: when a process group of
      more than one rank is initialised).
    """

    def __init__(
        self,
        quantizer: Any,
        *,
        name: str | None = None,
        hooks: bool = True,
        track_error: bool = True,
        layer_errors: bool = False,
        rare_threshold: float = 0.01,
        exact_limit: int = EXACT_LIMIT,
        sketch_buckets: int = SKETCH_BUCKETS,
        sync: bool | None = None,
    ):
        if isinstance(quantizer, BookLayout):
            self.layout, quantizer, hooks = quantizer, None, False
        else:
            self.layout = book_layout_of(quantizer)
        if not (
            isinstance(rare_threshold, (int, float)) and math.isfinite(rare_threshold) and rare_threshold >= 0
        ):
            raise ValueError(f"rare_threshold must be a finite number >= 0, got {rare_threshold!r}")
        if not isinstance(exact_limit, int) or exact_limit < 1:
            raise ValueError(f"exact_limit must be a positive int, got {exact_limit!r}")
        if not isinstance(sketch_buckets, int) or sketch_buckets < 2 or sketch_buckets & (sketch_buckets - 1):
            raise ValueError(f"sketch_buckets must be a power of two >= 2, got {sketch_buckets!r}")
        self.quantizer: Any = quantizer  # members of vqcore.protocols.Quantizer, not of nn.Module
        config = get_config(quantizer) if quantizer is not None else None
        self.name = (
            name
            if name is not None
            else (config or {}).get("name")
            or ("codes" if quantizer is None else type(quantizer).__name__.lower())
        )
        self.track_error = bool(track_error)
        self.layer_errors = bool(layer_errors)
        self.rare_threshold = float(rare_threshold)
        self.sync = sync
        self.sketch_bits = sketch_buckets.bit_length() - 1
        layout = self.layout
        self.books = tuple(
            BookInfo(book, size, size <= exact_limit) for book, size in zip(layout.names, layout.sizes)
        )
        self._width = max(b.size if b.exact else sketch_buckets for b in self.books)
        device = _device_of(quantizer) if quantizer is not None else torch.device("cpu")
        books = layout.books
        # per book: [codes or buckets ... | overflow (index >= size) | not counted (index < 0)]
        self._counts = torch.zeros(books, self._width + 2, dtype=torch.int64, device=device)
        self._offsets = (torch.arange(books, device=device) * (self._width + 2)).unsqueeze(1)
        self._sizes = torch.tensor(layout.sizes, device=device).unsqueeze(1)
        self._hashed = torch.tensor([not b.exact for b in self.books], device=device).unsqueeze(1)
        self._any_hashed = not all(b.exact for b in self.books)
        # [sum ||x - q||^2, sum ||x||^2, elements] over the calls with an error
        self._error = torch.zeros(3, dtype=torch.float64, device=device)
        layers = layout.axis(layout.residual).size if layout.residual else 0
        # residual stacks: [E_-1, E_0, ..., E_{L-1}] with E_k = sum ||x - decode(first k + 1 layers)||^2
        self._layer_error = torch.zeros(layers + 1 if layers else 0, dtype=torch.float64, device=device)
        self._forward_depth = 0
        self._handles: list[Any] = []
        if hooks:
            self._attach()

    # -- attaching ----------------------------------------------------------------------------------
    def _attach(self) -> None:
        q = self.quantizer
        self._handles = [
            q.register_forward_pre_hook(self._enter_forward),
            q.register_forward_hook(self._forward_hook, with_kwargs=True, always_call=True),
        ]
        wrapper = q.__dict__.get("encode")
        if not isinstance(wrapper, _ObservedEncode):
            wrapper = _ObservedEncode(q)
            object.__setattr__(q, "encode", wrapper)
        wrapper.monitors.append(self)

    def detach(self) -> None:
        """Stop observing the quantizer (the counts stay readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        wrapper = None if self.quantizer is None else self.quantizer.__dict__.get("encode")
        if isinstance(wrapper, _ObservedEncode):
            if self in wrapper.monitors:
                wrapper.monitors.remove(self)
            if not wrapper.monitors:
                del self.quantizer.__dict__["encode"]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> CodebookMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget everything counted so far."""
        self._counts.zero_()
        self._error.zero_()
        self._layer_error.zero_()

    # -- observing ------------------------------------------------------------------------------------
    def _enter_forward(self, module: nn.Module, args: tuple) -> None:
        self._forward_depth += 1

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._forward_depth -= 1
        if _not_observable() or output is None:
            return
        quantized, indices = split_output(output)
        if indices is None:
            return  # a forward without indices (BinaryMapper's one-hot codes): its encode calls still count
        self._count(indices)
        x = _forward_input(args, kwargs)
        if x is None or kwargs.get("mask") is not None or kwargs.get("lens") is not None:
            return  # padded positions would count in ||x - q||^2
        if self.track_error and quantized is not None and quantized.shape == x.shape:
            self._add_error(x, quantized)
        if self.layer_errors and self.layout.residual:
            self._add_layer_errors(x, indices)

    def _observe_encode(self, indices: Any) -> None:
        if self._forward_depth == 0 and not _not_observable():  # an encode inside a forward counts once
            self._count(indices)

    def update(self, indices: Any, x: Tensor | None = None, quantized: Tensor | None = None) -> None:
        """Count ``indices`` (any indices of the quantizer: a forward's or ``encode``'s). With ``x`` (the
        quantizer's input), also the quantization error: of ``quantized`` if given, else of
        ``decode(indices)``; for residual stacks also each layer's error (``layers + 1`` decodes)."""
        with torch.no_grad():
            if x is not None:  # every check before anything is counted: a refused call changes nothing
                self.layout.check(indices)
                if quantized is None:
                    if self.quantizer is None:
                        raise ValueError(
                            "a monitor built from a BookLayout has no decode: pass quantized with x"
                        )
                    quantized = self.quantizer.decode(indices)
                if quantized.shape != x.shape:
                    raise ValueError(
                        f"x of shape {tuple(x.shape)} and its quantized version of shape "
                        f"{tuple(quantized.shape)} differ: pass the quantizer's input in the layout "
                        f"its decode returns"
                    )
            self._count(indices)
            if x is None or quantized is None:
                return
            self._add_error(x, quantized)
            if self.layout.residual and self.quantizer is not None:
                self._add_layer_errors(x, indices)

    def _count(self, indices: Any) -> None:
        if isinstance(indices, Tensor) and indices.device != self._counts.device:
            self._to(indices.device)
        books = self.layout.books_first(indices)
        position = books
        if self._any_hashed:
            position = torch.where(self._hashed, _mix64(books) & ((1 << self.sketch_bits) - 1), books)
        position = torch.where(
            books < 0, self._width + 1, torch.where(books >= self._sizes, self._width, position)
        )
        flat = (position + self._offsets).reshape(-1)
        self._counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat))

    def _add_error(self, x: Tensor, quantized: Tensor) -> None:
        with torch.no_grad():
            flat = x.detach().float().reshape(-1)
            sums = torch.stack(
                [_squared_distance(x, quantized), torch.dot(flat, flat), flat.new_tensor(float(flat.numel()))]
            ).double()
            self._error += torch.where(torch.isfinite(sums).all(), sums, 0.0)

    def _add_layer_errors(self, x: Tensor, indices: Tensor) -> None:
        layers = self._layer_error.numel() - 1
        with torch.no_grad():
            errors = []
            for keep in range(layers + 1):
                decoded = self.quantizer.decode(self.layout.truncate(indices, keep))
                if decoded.shape != x.shape:
                    return
                errors.append(_squared_distance(x, decoded))
            sums = torch.stack(errors).double()
            self._layer_error += torch.where(torch.isfinite(sums).all(), sums, 0.0)

    def _to(self, device: torch.device) -> None:
        for attr in ("_counts", "_offsets", "_sizes", "_hashed", "_error", "_layer_error"):
            setattr(self, attr, getattr(self, attr).to(device))

    # -- reading ---------------------------------------------------------------------------------------
    def _read(self) -> tuple[Tensor, Tensor, Tensor]:
        """(counts, error sums, layer error sums) on the CPU, summed over ranks when syncing."""
        sync = should_sync(self.sync)
        counts = all_reduce_sum_(self._counts.clone(), sync).cpu()
        floats = all_reduce_sum_(torch.cat([self._error, self._layer_error]), sync).cpu()
        overflow = counts[:, self._width]
        if bool((overflow > 0).any()):
            bad = [
                f"{b.name or 'the codebook'} ({int(n)} of them, size {b.size})"
                for b, n in zip(self.books, overflow)
                if n > 0
            ]
            raise ValueError(
                f"CodebookMonitor({self.name}): indices at or above their codebook size were observed for "
                f"{', '.join(bad)}: the quantizer's indices do not match its declared codebook sizes "
                f"({self.layout.describe()}). A quantizer whose indices hold several books (heads, layers, "
                f"groups) declares them with book_layout() returning a vqcore.book_layout.BookLayout"
            )
        return counts, floats[:3], floats[3:]

    def key(self, book: str, metric: str) -> str:
        """The report's key of ``metric`` for ``book`` (a :class:`BookInfo` name; ``""``: the aggregate, or
        the only book)."""
        return report_key(self.name, book, metric)

    def counts(self) -> dict[str, Tensor]:
        """Per book (its key segment, ``""`` for a single book): int64 counts of each code (of each hashed
        bucket for a book above ``exact_limit``)."""
        return self._book_counts(self._read()[0])

    def _book_counts(self, counts: Tensor) -> dict[str, Tensor]:
        return {b.name: counts[i, : self._book_width(b)].clone() for i, b in enumerate(self.books)}

    def _book_width(self, book: BookInfo) -> int:
        return book.size if book.exact else 1 << self.sketch_bits

    def table(self) -> str:
        """The report as a text table: one row per book, then the per-layer errors of residual stacks."""
        counts, error, layer_error = self._read()
        return format_table(self.name, self.books, self._report(counts, error, layer_error))

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG to ``path``: the codes of each book sorted by usage (share of its tokens, log scale)
        and the perplexity of each book against its codebook size. Needs matplotlib."""
        counts, error, layer_error = self._read()
        report = self._report(counts, error, layer_error)
        return plot_usage(path, self.name, self.books, self._book_counts(counts), report)

    def report(self) -> dict[str, float]:
        """A flat ``{key: float}`` for a logger (TensorBoard, Weights & Biases, Lightning's ``log_dict``).

        Per book, keys ``{name}/{book}/...`` (``{name}/...`` for a single book): ``tokens`` counted,
        ``used_codes``, ``usage`` (fraction of codes used), ``dead_codes`` (never used), ``rare_codes``
        (below ``rare_threshold`` of a uniform share, dead ones included), ``perplexity`` (exp of the
        entropy of the usage distribution), ``bits`` (that entropy in bits: what a token of the book
        carries) against ``nominal_bits`` (log2 of the codebook size); books above ``exact_limit`` add
        ``usage_rel_error``. Over all books, at ``{name}/...`` when there are several: ``usage``,
        ``perplexity`` (means), ``dead_codes``, ``bits``, ``nominal_bits`` (sums: per token position).
        With the quantizer's input seen: ``{name}/mse`` and ``{name}/relative_error`` (``||x - q||^2 /
        ||x||^2``); residual stacks also ``{name}/layer{k}/error`` (relative error of the first ``k + 1``
        layers' reconstruction) and ``{name}/layer{k}/energy_share`` (the share of the input's energy
        that layer ``k`` explains). Errors are in the quantizer's input space (through its output
        projection): negative shares mean a layer moved the reconstruction away from the input.
        """
        counts, error, layer_error = self._read()
        return self._report(counts, error, layer_error)

    def _report(self, counts: Tensor, error: Tensor, layer_error: Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        stats = [self._book_stats(counts[i], b) for i, b in enumerate(self.books)]
        for b, s in zip(self.books, stats):
            out.update({self.key(b.name, metric): value for metric, value in s.items()})
        if len(self.books) > 1:
            n = len(stats)
            out[f"{self.name}/usage"] = sum(s["usage"] for s in stats) / n
            out[f"{self.name}/perplexity"] = sum(s["perplexity"] for s in stats) / n
            out[f"{self.name}/dead_codes"] = sum(s["dead_codes"] for s in stats)
            out[f"{self.name}/bits"] = sum(s["bits"] for s in stats)
            out[f"{self.name}/nominal_bits"] = sum(s["nominal_bits"] for s in stats)
        squared, energy, elements = (float(v) for v in error)
        if elements > 0:
            out[f"{self.name}/mse"] = squared / elements
            out[f"{self.name}/relative_error"] = squared / energy if energy > 0 else math.nan
        if layer_error.numel() and float(layer_error[0]) > 0:
            base = float(layer_error[0])
            for k in range(1, layer_error.numel()):
                out[f"{self.name}/layer{k - 1}/error"] = float(layer_error[k]) / base
                out[f"{self.name}/layer{k - 1}/energy_share"] = (
                    float(layer_error[k - 1] - layer_error[k]) / base
                )
        return out

    def _book_stats(self, row: Tensor, book: BookInfo) -> dict[str, float]:
        width = self._book_width(book)
        c = row[:width].double()
        tokens = float(c.sum())
        p = c / tokens if tokens > 0 else c
        entropy = float(-torch.special.xlogy(p, p).sum()) if tokens > 0 else 0.0
        stats = {"tokens": tokens}
        if book.exact:
            used = float((c > 0).sum())
            rare = (
                float((c < self.rare_threshold * tokens / book.size).sum())
                if tokens > 0
                else float(book.size)
            )
            rare = max(rare, book.size - used)
        else:
            empty = float((c == 0).sum())
            used = width * math.log(width / empty) if empty > 0 else math.inf
            used = min(used, float(book.size))
            load = used / width
            stats["usage_rel_error"] = (
                math.sqrt(width * (math.exp(load) - load - 1)) / used if 0 < used < math.inf else math.nan
            )
            rare = math.nan
        stats.update(
            used_codes=used,
            usage=used / book.size,
            dead_codes=book.size - used,
            rare_codes=rare,
            perplexity=math.exp(entropy),
            bits=entropy / math.log(2),
            nominal_bits=math.log2(book.size),
        )
        return stats


def _squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||^2`` in float32, 0-dim: one BLAS dot (faster than ``vector_norm`` on the CPU)."""
    difference = (a.detach().float() - b.detach().float()).reshape(-1)
    return torch.dot(difference, difference)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device
