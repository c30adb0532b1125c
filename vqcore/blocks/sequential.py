"""``Sequential``: modules applied in order around exactly one quantizer, returning ``(x, *rest)``.

``Sequential(encoder, quantizer, decoder)(x, **kwargs)`` runs ``encoder(x)``, then ``quantizer(x,
**kwargs)`` (its keyword arguments: ``mask=``, ``return_loss_breakdown=`` ...), whose first output
continues through ``decoder``; the result is the quantizer's output with its first entry replaced by the
final ``x`` (the quantizer's NamedTuple type kept, so ``out.indices`` still works; a plain tuple stays a
plain tuple).

The quantizer is the one module that follows :class:`vqcore.protocols.Quantizer` (``dim``,
``codebook_size``, ``num_codebooks``, ``encode``, ``decode``): every vqcore quantizer, and any
third-party plugin's, since :func:`vqcore.create` refuses a product that does not follow it.

Differences from vector-quantize-pytorch 1.32.0 (``vector_quantize_pytorch.utils.Sequential``), on
purpose: the quantizer is recognised by the protocol rather than a fixed list of classes (so
BinaryMapper and plugin quantizers count); the output keeps the quantizer's NamedTuple type; zero or
several quantizers raise :class:`vqcore.errors.ConfigurationError` naming them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vqcore.errors import ConfigurationError
from vqcore.protocols import Quantizer


class Sequential(nn.Module):
    """``fns`` applied in order; exactly one of them is a quantizer (see the module docstring)."""

    def __init__(self, *fns: nn.Module):
        super().__init__()
        for position, fn in enumerate(fns):
            if not isinstance(fn, nn.Module):
                raise TypeError(
                    f"Sequential takes nn.Module arguments, got {type(fn).__name__} at {position}"
                )
        found = [position for position, fn in enumerate(fns) if isinstance(fn, Quantizer)]
        if len(found) != 1:
            listed = ", ".join(f"{type(fns[p]).__name__} at {p}" for p in found) or "none"
            raise ConfigurationError(
                "Sequential must contain exactly one quantizer (a module following "
                f"vqcore.protocols.Quantizer), got {len(found)}: {listed}"
            )
        self.fns = nn.ModuleList(fns)
        self.quantizer_position = found[0]

    @property
    def quantizer(self) -> nn.Module:
        return self.fns[self.quantizer_position]

    def forward(self, x: Any, **kwargs: Any) -> Any:
        out: Any = None
        for position, fn in enumerate(self.fns):
            if position == self.quantizer_position:
                out = fn(x, **kwargs)
                x = out[0]
            else:
                x = fn(x)
        rest = tuple(out[1:])
        if hasattr(out, "_fields"):  # a NamedTuple: keep its type and field names
            return type(out)(x, *rest)
        return (x, *rest)
