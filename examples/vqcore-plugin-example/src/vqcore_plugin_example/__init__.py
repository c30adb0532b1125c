"""vqcore-plugin-example: gain-shape vector quantization as an out-of-tree vqcore plugin.

vqcore finds this module through the entry point declared in this package's pyproject.toml::

    [project.entry-points.vqcore]
    vqcore-plugin-example = "vqcore_plugin_example"

and calls the ``@vqcore.hookimpl`` functions below once, on first registry use. After
``pip install vqcore-plugin-example``::

    import vqcore
    q = vqcore.create("gain_shape_vq", dim=64, codebook_size=256, gain_levels=16)
"""

from __future__ import annotations

from vqcore import hookimpl
from vqcore_plugin_example.gain_shape import (
    DirectionCodebook,
    DirectionLoss,
    GainShapeLossBreakdown,
    GainShapeOutput,
    GainShapeOutputWithBreakdown,
    GainShapeVQ,
)

__version__ = "0.2.0"

__all__ = [
    "DirectionCodebook",
    "DirectionLoss",
    "GainShapeLossBreakdown",
    "GainShapeOutput",
    "GainShapeOutputWithBreakdown",
    "GainShapeVQ",
    "register_codebooks",
    "register_losses",
    "register_quantizers",
]


@hookimpl
def register_quantizers(register):
    register(
        "gain_shape_vq",
        GainShapeVQ,
        aliases=("GainShapeVQ",),
        summary="gain-shape VQ: unit directions (EMA) times a scalar gain grid; K * L codes for K + L",
    )


@hookimpl
def register_codebooks(register):
    register(
        "unit_direction",
        DirectionCodebook,
        summary="unit directions trained by EMA (spherical k-means step), largest dot product",
    )


@hookimpl
def register_losses(register):
    register(
        DirectionLoss.name,
        DirectionLoss,
        summary="mean ||x/|x| - sg(s)||^2: the input's direction to its chosen shape",
    )
