"""vqcore-plugin-example: SimVQ (arXiv 2411.02038) as an out-of-tree vqcore plugin.

vqcore finds this module through the entry point declared in this package's pyproject.toml::

    [project.entry-points.vqcore]
    vqcore-plugin-example = "vqcore_plugin_example"

and calls the ``@vqcore.hookimpl`` functions below once, on first registry use. After
``pip install vqcore-plugin-example``::

    import vqcore
    q = vqcore.create("simvq", dim=64, codebook_size=1024)
"""

from __future__ import annotations

from vqcore import hookimpl
from vqcore_plugin_example.simvq import (
    CodebookFitLoss,
    LinearReparamCodebook,
    SimVQ,
    SimVQLossBreakdown,
    SimVQOutput,
    SimVQOutputWithBreakdown,
)

__version__ = "0.1.0"

__all__ = [
    "CodebookFitLoss",
    "LinearReparamCodebook",
    "SimVQ",
    "SimVQLossBreakdown",
    "SimVQOutput",
    "SimVQOutputWithBreakdown",
    "register_codebooks",
    "register_losses",
    "register_quantizers",
]


@hookimpl
def register_quantizers(register):
    register(
        "simvq",
        SimVQ,
        aliases=("SimVQ",),
        summary="SimVQ: frozen random codebook reparameterised by one learned linear map (arXiv 2411.02038)",
    )


@hookimpl
def register_codebooks(register):
    register(
        "simvq",
        LinearReparamCodebook,
        aliases=("linear_reparam",),
        summary="codes = C W: frozen Gaussian basis C, learned linear map W, Euclidean nearest code",
    )


@hookimpl
def register_losses(register):
    register(
        CodebookFitLoss.name, CodebookFitLoss, summary="mean ||sg(x) - q||^2: pulls the codes to their inputs"
    )
