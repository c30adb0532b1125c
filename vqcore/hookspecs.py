"""The hooks a vqcore plugin implements.

A plugin is any object or module with functions decorated by :data:`hookimpl`. Each hook receives a
``register(name, factory, *, aliases=(), summary="")`` callable::

    from vqcore import hookimpl

    @hookimpl
    def register_quantizers(register):
        register("my_vq", MyQuantizer, aliases=("myvq",), summary="what it does")
"""

from __future__ import annotations

import pluggy

PROJECT = "vqcore"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_quantizers(register):
    """Register quantizer factories: ``register(name, factory, aliases=(), summary="")``.

    A factory is a class or callable taking keyword arguments and returning an ``nn.Module`` that
    follows :class:`vqcore.protocols.Quantizer`.
    """


@hookspec
def register_codebooks(register):
    """Register codebook factories (see :class:`vqcore.protocols.Codebook`)."""


@hookspec
def register_losses(register):
    """Register auxiliary losses (see :class:`vqcore.protocols.Loss`)."""


@hookspec(firstresult=True)
def export_module(quantizer, graph):
    """Return an ``nn.Module`` to export for ``graph`` ("encode" or "decode") of ``quantizer``, or None.

    The module takes one tensor (features for "encode", indices for "decode") and returns a tensor
    (or a plain tuple of tensors): no namedtuples, no Python branches on tensor values. The first
    non-None answer wins; with none, :mod:`vqcore.export` wraps ``quantizer.encode`` / ``decode``.
    The export layer still verifies the module's artifact against the quantizer's own eager path.
    """
