"""Precision policy (vqcore.blocks.precision): float32 regions under autocast, float32 methods, and modules
whose own floating state stays float32 under dtype casts while device moves and children's casts apply."""

from __future__ import annotations

import torch
from torch import nn

from vqcore.blocks.precision import Float32State, float32_method, float32_region


def test_float32_region_turns_autocast_off_inside_only():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with float32_region("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype == torch.float32 and torch.equal(a @ b, torch.mm(a, b))
        assert torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.bfloat16


class Probe:
    @float32_method
    def run(self, x, scale, *, shift=0.0):
        """what the method sees"""
        return x.dtype, torch.is_autocast_enabled("cpu"), x * scale + shift


def test_float32_method_casts_its_tensor_and_turns_autocast_off():
    x = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtype, autocast, value = Probe().run(x, 2.0, shift=1.0)
    assert dtype == torch.float32 and not autocast
    assert value.tolist() == [4.0, -3.0]
    assert Probe.run.__name__ == "run" and Probe.run.__doc__ == "what the method sees"


class State(Float32State):
    def __init__(self, float32_parameters: bool = False):
        super().__init__()
        self.float32_parameters = float32_parameters
        self.register_buffer("stats", torch.tensor([1.0 / 3.0, 1e-8]))  # bf16 / fp16 would round both
        self.register_buffer("count", torch.tensor([3]))
        self.weight = nn.Parameter(torch.tensor([1.0 / 3.0]))
        self.child = nn.Linear(2, 2)


def test_own_buffers_stay_float32_and_unrounded_under_every_dtype_cast():
    for cast in (nn.Module.half, nn.Module.bfloat16, nn.Module.double, lambda m: m.to(torch.float16)):
        module = State()
        before = module.stats.clone()
        cast(module)
        assert module.stats.dtype == torch.float32 and torch.equal(module.stats, before)
        assert module.count.dtype == torch.int64
        assert module.weight.dtype != torch.float32  # parameters follow the cast by default
        assert module.child.weight.dtype == module.weight.dtype  # children are cast as usual


def test_float32_parameters_keep_parameters_and_their_gradients_float32():
    module = State(float32_parameters=True)
    module.weight.grad = torch.tensor([0.1])
    module.half()
    assert module.weight.dtype == torch.float32 and module.weight.grad.dtype == torch.float32
    assert module.child.weight.dtype == torch.float16
    plain = State()
    plain.weight.grad = torch.tensor([0.1])
    plain.half()
    assert plain.weight.dtype == torch.float16 and plain.weight.grad.dtype == torch.float16


def test_device_moves_apply_to_everything():
    module = State().to("meta", torch.float16)
    assert module.stats.device.type == "meta" and module.stats.dtype == torch.float32
    assert module.weight.device.type == "meta" and module.weight.dtype == torch.float16
    assert module.child.weight.device.type == "meta"
