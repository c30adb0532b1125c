"""The built-in building blocks as registry entries: codebooks, auxiliary losses, gradient estimators.

Quantizers take them by name (``VectorQuantize(..., codebook="cosine", estimator="rotation_trick",
extra_losses={"codebook": 1.0})``), exactly as they take a third-party plugin's, and plugins can build
on them without importing vqcore's modules: ``vqcore.get_entry("euclidean", kind="codebook").create(...)``.
"""

from __future__ import annotations

import functools

from vqcore.blocks.codebooks import EMACodebook
from vqcore.blocks.entropy import BatchEntropyLoss, PerSampleEntropyLoss
from vqcore.blocks.estimators import GumbelStraightThrough, RotationTrick, StraightThrough
from vqcore.blocks.losses import (
    CodebookDiversityLoss,
    CodebookLoss,
    CommitmentLoss,
    CrossEntropyCommitmentLoss,
    OrthogonalLoss,
)
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
    register(
        "learnable",
        functools.partial(EMACodebook, learnable=True, ema=False),
        aliases=("gradient",),
        summary="codes trained by gradient (the commitment term reaches them); expiry from usage counts",
    )


@hookimpl
def register_losses(register):
    register(CommitmentLoss.name, CommitmentLoss, summary="mean ||x - sg(q)||^2 over valid tokens")
    register(
        CodebookLoss.name, CodebookLoss, summary="mean ||sg(x) - q||^2 over valid tokens (trains the codes)"
    )
    register(OrthogonalLoss.name, OrthogonalLoss, summary="mean squared cosine similarity between codes")
    register(
        CrossEntropyCommitmentLoss.name,
        CrossEntropyCommitmentLoss,
        summary="cross-entropy of the chosen codes under distance logits (a commitment term)",
    )
    register(
        CodebookDiversityLoss.name,
        CodebookDiversityLoss,
        summary="negative entropy of the batch-mean code distribution (codebook usage; to be minimised)",
    )
    register(
        PerSampleEntropyLoss.name,
        PerSampleEntropyLoss,
        summary="mean entropy of each token's binary code distribution (lookup-free quantization)",
    )
    register(
        BatchEntropyLoss.name,
        BatchEntropyLoss,
        summary="entropy of the batch-mean binary code distribution (codebook usage; to be maximised)",
    )


@hookimpl
def register_estimators(register):
    register(StraightThrough.name, StraightThrough, aliases=("ste",), summary="gradient of the identity")
    register(
        RotationTrick.name,
        RotationTrick,
        aliases=("rotation",),
        summary="rotation trick: the gradient through the rotation and scaling that maps x onto q",
    )
    register(
        GumbelStraightThrough.name,
        GumbelStraightThrough,
        aliases=("gumbel",),
        summary="Gumbel-softmax straight-through: the gradient of the soft assignment to the codes",
    )
