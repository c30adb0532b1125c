"""The Linear pair around a quantizer (vqcore.blocks.projection): when it exists, the values it computes,
and the precision rule: the layers run in their own dtype with autocast off, quantization gets float32."""

from __future__ import annotations

import torch
from torch import nn

from vqcore.blocks.projection import project_from, project_into, projection_pair


def hand_linear() -> nn.Linear:
    """y = W x + b with W = [[1, 2], [3, 4], [0, -1]], b = [0.5, -1, 0.25]."""
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, -1.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0, 0.25]))
    return layer


def test_projection_pair_exists_only_when_the_widths_differ_or_when_asked():
    p_in, p_out = projection_pair(4, 4)
    assert isinstance(p_in, nn.Identity) and isinstance(p_out, nn.Identity)
    p_in, p_out = projection_pair(4, 3)
    assert isinstance(p_in, nn.Linear) and (p_in.in_features, p_in.out_features) == (4, 3)
    assert isinstance(p_out, nn.Linear) and (p_out.in_features, p_out.out_features) == (3, 4)
    assert p_in.bias is not None and p_out.bias is not None
    p_in, p_out = projection_pair(4, 4, enabled=True, bias=False)
    assert isinstance(p_in, nn.Linear) and p_in.bias is None and p_out.bias is None
    p_in, p_out = projection_pair(4, 3, enabled=False)
    assert isinstance(p_in, nn.Identity) and isinstance(p_out, nn.Identity)


def test_project_into_computes_the_linear_map_and_returns_float32():
    x = torch.tensor([[[1.0, 1.0], [2.0, -1.0]]])
    got = project_into(hand_linear(), x)
    assert got.dtype == torch.float32
    assert got.tolist() == [[[3.5, 6.0, -0.75], [0.5, 1.0, 1.25]]]
    assert project_into(hand_linear(), x, dtype=torch.float64).dtype == torch.float64


def test_identity_projection_only_casts():
    half = torch.tensor([[[0.1, 0.2]]], dtype=torch.float16)
    got = project_into(nn.Identity(), half)
    assert got.dtype == torch.float32 and torch.equal(got, half.float())
    codes = torch.randn(1, 3, 2)
    assert project_from(nn.Identity(), codes) is codes


def test_layers_run_in_their_own_dtype_with_autocast_off():
    layer = hand_linear()
    x = torch.randn(2, 5, 2)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(project_into(layer, x), want)  # a bf16 GEMM would round
        out = project_from(layer, x)
    assert out.dtype == torch.float32 and torch.equal(out, want)
    half = hand_linear().half()
    got = project_into(half, x)
    assert got.dtype == torch.float32 and torch.equal(got, half(x.half()).float())
    back = project_from(half, x)
    assert back.dtype == torch.float16 and torch.equal(back, half(x.half()))
