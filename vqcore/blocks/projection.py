"""The optional Linear pair around a quantizer (codebook_dim / dim mismatch, arXiv: improved VQGAN).

``project_in`` maps features (dim) to the quantizer's space (inner) and ``project_out`` maps codes back;
both are ``nn.Identity`` when no projection is needed. The Linear layers run in their own dtype (after
``.half()`` say) with autocast off, while quantization itself always runs in float32. One rule for every
method: under autocast a quantizer's indices are those of the float32 module on the same input, so a
tokenizer trained with mixed precision gives the token ids its float32 (or exported) copy gives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqcore.blocks.precision import float32_region


def projection_pair(
    dim: int, inner: int, *, enabled: bool | None = None, bias: bool = True
) -> tuple[nn.Module, nn.Module]:
    """``(project_in, project_out)``: Linear layers when ``enabled`` (default: ``dim != inner``),
    else identities.
    """
    if enabled is None:
        enabled = dim != inner
    if not enabled:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, inner, bias=bias), nn.Linear(inner, dim, bias=bias)


def project_into(layer: nn.Module, tokens: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``tokens`` through ``layer`` (in the layer's dtype), returned in ``dtype`` (float32 for quantization;
    float64 where the export layer verifies ties)."""
    if isinstance(layer, nn.Linear):
        with float32_region(tokens.device.type):
            tokens = layer(tokens.to(layer.weight.dtype))
    return tokens.to(dtype)


def project_from(layer: nn.Module, codes: Tensor) -> Tensor:
    """``codes`` through ``layer`` in the layer's dtype (identity: unchanged)."""
    if isinstance(layer, nn.Linear):
        with float32_region(codes.device.type):
            return layer(codes.to(layer.weight.dtype))
    return codes
