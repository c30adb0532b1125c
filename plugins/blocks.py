"""Built-in building blocks as registry entries: codebooks and auxiliary losses.

Plugins can build on them by name (``vqcore.get_entry("euclidean", kind="codebook").create(...)``)
instead of importing core modules.
"""

from __future__ import annotations

import functools

from vqcore.blocks.codebooks import EMACodebook
from vqcore.blocks.losses import CommitmentLoss, OrthogonalLoss
from vqcore.hookspecs import hookimpl


@hookimpl
def register_codebooks(register):
    register(
        "euclidean",
        functools.partial(EMACodebook, cosine=False),
        aliases=("ema",),
        summary="EMA codebook, nearest code by Euclidean distance (k-means init, dead-code expiry)",
    )
    register(
        "cosine",
        functools.partial(EMACodebook, cosine=True),
        summary="EMA codebook of unit vectors, nearest code by cosine similarity",
    )


@hookimpl
def register_losses(register):
    register(CommitmentLoss.name, CommitmentLoss, summary="mean ||x - sg(q)||^2 over valid tokens")
    register(OrthogonalLoss.name, OrthogonalLoss, summary="mean squared cosine similarity between codes")
