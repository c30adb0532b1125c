"""Where the codebooks are in a quantizer's indices: :class:`BookLayout`.

A quantizer's indices hold one code per token and *book*: a head, a residual layer, a group, a codebook
of ``num_codebooks``. Where the books sit differs per method (``(b, n)`` for one codebook, ``(b, n,
heads)``, ``(b, n, layers)``, ``(groups, b, n, layers)``, ...). A :class:`BookLayout` names those axes,
so that code reading indices without knowing the method (the codebook monitor, :mod:`vqcore.metrics`) can
take them apart: :meth:`BookLayout.books_first` turns any indices of the quantizer into ``(books,
tokens)``.

A quantizer describes its layout with the optional member ``book_layout() -> BookLayout``
(:class:`vqcore.protocols.SupportsBookLayout`). Without one, :func:`book_layout_of` derives it from
the protocol alone: one book when ``num_codebooks == 1``, else a trailing axis of ``num_codebooks``
books, each of ``codebook_size`` codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class BookAxis:
    """One axis of the indices that enumerates books: its ``name`` (``"head"``, ``"layer"``, ``"group"``,
    ``"codebook"``, ...), its position ``dim`` in the indices tensor (``0`` leading, ``-1`` trailing, ...)
    and its ``size``."""

    name: str
    dim: int
    size: int


@dataclass(frozen=True)
class BookLayout:
    """The book axes of a quantizer's indices and the codebook size of each book.

    - ``axes``: the book axes, outermost first (books are numbered row-major over them); every other axis
      of the indices is a token axis. No axes: one book.
    - ``sizes``: the number of codes of each book, ``prod(axis sizes)`` entries (one entry for all books
      is accepted and repeated).
    - ``residual``: the name of the axis along which the books form a residual stack: decoding the
      indices with the entries after position ``k`` of that axis set to ``-1`` reconstructs what the
      first ``k + 1`` layers explain (the monitor's per-layer error); None where that does not hold.

    Negative indices (``-1``: dropped or masked) are positions without a code.
    """

    axes: tuple[BookAxis, ...] = ()
    sizes: tuple[int, ...] = (1,)
    residual: str | None = None

    def __post_init__(self) -> None:
        books = math.prod(axis.size for axis in self.axes)
        sizes = tuple(int(s) for s in self.sizes)
        if len(sizes) == 1 and books > 1:
            sizes = sizes * books
        if len(sizes) != books:
            raise ValueError(f"BookLayout needs one codebook size per book ({books}), got {len(sizes)}")
        if any(s < 1 for s in sizes) or any(axis.size < 1 for axis in self.axes):
            raise ValueError(f"BookLayout sizes must be positive, got axes {self.axes} and sizes {sizes}")
        if len({axis.name for axis in self.axes}) != len(self.axes):
            raise ValueError(f"BookLayout axis names must be unique, got {[a.name for a in self.axes]}")
        if self.residual is not None and self.residual not in {axis.name for axis in self.axes}:
            raise ValueError(f"BookLayout residual axis {self.residual!r} is not one of its axes")
        object.__setattr__(self, "sizes", sizes)

    @classmethod
    def single(cls, size: int) -> BookLayout:
        """One book of ``size`` codes: every axis of the indices is a token axis."""
        return cls((), (size,))

    @classmethod
    def trailing(cls, name: str, count: int, sizes: int | tuple[int, ...], residual: bool = False):
        """``count`` books on the last axis (``(..., count)``); one book when ``count == 1`` and the
        quantizer drops that axis (pass ``count`` > 1 only where the axis exists)."""
        sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
        if count == 1 and not residual:
            return cls.single(sizes[0])
        return cls((BookAxis(name, -1, count),), sizes, name if residual else None)

    @classmethod
    def residual_stack(cls, sizes: tuple[int, ...], dim: int = -1) -> BookLayout:
        """A residual stack's ``(..., layers)`` indices (the layer axis at ``dim``): one book per layer,
        ``sizes[k]`` codes in layer k."""
        return cls((BookAxis("layer", dim, len(sizes)),), tuple(sizes), "layer")

    def grouped(self, groups: int) -> BookLayout:
        """This layout behind a leading axis of ``groups`` (the grouped stacks' ``(groups, b, ...)``)."""
        shifted = (BookAxis(a.name, a.dim + 1 if a.dim >= 0 else a.dim, a.size) for a in self.axes)
        return BookLayout((BookAxis("group", 0, groups), *shifted), self.sizes * groups, self.residual)

    @property
    def books(self) -> int:
        return len(self.sizes)

    @property
    def names(self) -> tuple[str, ...]:
        """One name per book, ``"layer2"`` or ``"group1/layer0"``; ``""`` for a layout of one book."""
        if not self.axes:
            return ("",)
        names = [""]
        for axis in self.axes:
            names = [f"{prefix}/{axis.name}{i}".lstrip("/") for prefix in names for i in range(axis.size)]
        return tuple(names)

    def axis(self, name: str) -> BookAxis:
        for axis in self.axes:
            if axis.name == name:
                return axis
        raise KeyError(f"BookLayout has no axis {name!r}; its axes are {[a.name for a in self.axes]}")

    def check(self, indices: Any, what: str = "indices") -> None:
        """Raise a ValueError when ``indices`` cannot hold this layout's book axes (shapes only: no sync)."""
        if not isinstance(indices, Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer tensor, got {indices.dtype}")
        ndim = indices.ndim
        for axis in self.axes:
            if not -ndim <= axis.dim < ndim or indices.shape[axis.dim] != axis.size:
                got = indices.shape[axis.dim] if -ndim <= axis.dim < ndim else "no such axis"
                raise ValueError(
                    f"{what} of shape {tuple(indices.shape)} do not match the quantizer's book layout: "
                    f"axis {axis.dim} should enumerate {axis.size} {axis.name}s (got {got}); "
                    f"layout: {self.describe()}"
                )
        if ndim < len(self.axes) + 1:
            raise ValueError(
                f"{what} of shape {tuple(indices.shape)} have no token axis besides the book axes of "
                f"{self.describe()}"
            )

    def books_first(self, indices: Any) -> Tensor:
        """Any indices of the quantizer -> ``(books, tokens)`` int64 (a reshape: no copy where possible)."""
        self.check(indices)
        dims = [axis.dim % indices.ndim for axis in self.axes]
        moved = indices.movedim(dims, list(range(len(dims)))) if dims else indices
        return moved.reshape(self.books, -1).long()

    def truncate(self, indices: Tensor, keep: int) -> Tensor:
        """A copy of ``indices`` with the residual axis's entries from position ``keep`` on set to -1."""
        if self.residual is None:
            raise ValueError(f"the book layout {self.describe()} declares no residual axis")
        axis = self.axis(self.residual)
        out = indices.clone()
        out.narrow(axis.dim % indices.ndim, keep, axis.size - keep).fill_(-1)
        return out

    def describe(self) -> str:
        if not self.axes:
            return f"one codebook of {self.sizes[0]} codes"
        axes = ", ".join(f"{a.size} {a.name}s on axis {a.dim}" for a in self.axes)
        sizes = f"{self.sizes[0]} codes each" if len(set(self.sizes)) == 1 else f"sizes {list(self.sizes)}"
        return f"{axes}; {sizes}"


def book_layout_of(quantizer: Any) -> BookLayout:
    """The quantizer's :class:`BookLayout`: its ``book_layout()`` if it has one, else the protocol's
    ``codebook_size`` / ``num_codebooks`` (one book, or a trailing axis of ``num_codebooks`` books).
    Raises a TypeError naming what is missing for a module that is not a quantizer."""
    members = ("dim", "codebook_size", "num_codebooks", "forward", "encode", "decode")
    missing = [name for name in members if not hasattr(quantizer, name)]
    if not isinstance(quantizer, nn.Module) or missing:
        what = (
            "is not an nn.Module" if not isinstance(quantizer, nn.Module) else f"lacks {', '.join(missing)}"
        )
        raise TypeError(
            f"{type(quantizer).__name__} is not a vqcore quantizer (vqcore.protocols.Quantizer): it {what}"
        )
    describe = getattr(quantizer, "book_layout", None)
    if callable(describe):
        layout = describe()
        if not isinstance(layout, BookLayout):
            raise TypeError(
                f"{type(quantizer).__name__}.book_layout() must return a vqcore.book_layout.BookLayout, "
                f"got {type(layout).__name__}"
            )
        return layout
    size, count = quantizer.codebook_size, quantizer.num_codebooks
    if not isinstance(size, int) or size < 1 or not isinstance(count, int) or count < 1:
        raise TypeError(
            f"{type(quantizer).__name__} declares codebook_size={size!r} and num_codebooks={count!r}: "
            f"both must be positive ints (or the quantizer describes its books with book_layout())"
        )
    return BookLayout.trailing("codebook", count, size)
