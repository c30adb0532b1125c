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
    """Register codebook factories (see :class:`vqcore.protocols.Codebook`): called as
    ``factory(size=..., dim=..., books=..., **codebook_kwargs)`` by quantizers that take a codebook."""


@hookspec
def register_losses(register):
    """Register auxiliary loss factories (see :class:`vqcore.protocols.Loss`); quantizers take extra
    losses by these names."""


@hookspec
def register_estimators(register):
    """Register gradient estimator factories (see :class:`vqcore.protocols.Estimator`)."""


@hookspec
def register_converters(register):
    """Register converters from vector-quantize-pytorch modules, under the reference's class name
    (``register("VectorQuantize", factory)``); the factory builds a
    :class:`vqcore.protocols.ReferenceConverter` (see :mod:`vqcore.compat`)."""


@hookspec(firstresult=True)
def export_module(quantizer, graph):
    """Return an ``nn.Module`` to export for ``graph`` ("encode", "decode" or "quantize") of
    ``quantizer``, or None.

    The module takes one tensor (features for "encode" and "quantize", int64 indices for "decode") and
    returns a tensor (or a plain tuple of tensors; "quantize": vectors, then indices): no namedtuples,
    no Python branches on tensor values. The first non-None answer wins; with none,
    :mod:`vqcore.export` wraps ``quantizer.encode`` / ``decode``. Index and float dtypes other than
    int64 / float32 (``index_dtype``, ``float_dtype``) are put around the module by the export layer.
    The export layer still verifies the module's artifact against the quantizer's own eager path.
    """
