"""A fixed random orthogonal rotation around a scalar quantizer (``orthogonal_rotation=True``).

Rotating the codebook-space features by a random orthogonal ``R`` before an axis-aligned quantizer
(FSQ, LFQ) and the codes back by ``R^T`` after it spreads every input direction over all the axes,
which raises codebook utilisation without an auxiliary loss (arXiv 2307.13304v2). ``R`` is drawn once
(``torch.nn.init.orthogonal_``, from the global generator) and stored as a persistent buffer named
``orthogonal_rot`` on the quantizer, the key vector-quantize-pytorch uses, so state dicts carry over.

Per codebook the features are ``(..., d)``; ``rotate`` is ``z @ R`` and ``unrotate`` is ``c @ R^T``, so
``unrotate(rotate(z)) == z`` up to rounding and the decode path (indices -> codes) applies ``unrotate``
only. The rotation runs in float32 inside the quantizers' float32 region.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ORTHOGONAL_ROTATION_KEY = "orthogonal_rot"


def orthogonal_matrix(dim: int) -> Tensor:
    """A random ``(dim, dim)`` orthogonal float32 matrix (``R @ R.T == I`` up to rounding)."""
    matrix = torch.empty(dim, dim)
    nn.init.orthogonal_(matrix)
    return matrix


def rotate(z: Tensor, rotation: Tensor | None) -> Tensor:
    """``z (..., d) @ R``; unchanged when ``rotation`` is None (the option is off)."""
    return z if rotation is None else z @ rotation.to(z.dtype)


def unrotate(codes: Tensor, rotation: Tensor | None) -> Tensor:
    """``codes (..., d) @ R^T``, the inverse of :func:`rotate`; unchanged when ``rotation`` is None."""
    return codes if rotation is None else codes @ rotation.to(codes.dtype).T
