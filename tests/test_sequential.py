"""Sequential: modules in order around exactly one quantizer, keyword arguments to the quantizer, the
quantizer's output structure kept, the reference's state_dict keys, clear errors."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

import vqcore
from vqcore import FSQ, ConfigurationError, Sequential, VectorQuantize
from vqcore.blocks import sequential as sequential_module

vqp = pytest.importorskip("vector_quantize_pytorch")


class Pair(NamedTuple):
    quantized: torch.Tensor
    indices: torch.Tensor


class SignQuantizer(nn.Module):
    """A third-party quantizer: follows vqcore.protocols.Quantizer without subclassing anything of vqcore;
    records the keyword arguments it gets."""

    def __init__(self, dim=4, plain=False):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks, self.plain = dim, 2**dim, 1, plain
        self.calls = []

    def encode(self, x):
        return ((x > 0).long() * 2 ** torch.arange(self.dim)).sum(-1)

    def decode(self, indices):
        return ((indices.unsqueeze(-1) >> torch.arange(self.dim)) & 1).float() * 2 - 1

    def forward(self, x, **kwargs):
        self.calls.append(kwargs)
        out = (torch.where(x > 0, 1.0, -1.0), self.encode(x))
        return out if self.plain else Pair(*out)


def test_runs_the_chain_and_keeps_the_quantizers_output_structure():
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(8, 4), nn.Linear(4, 8)
    fsq = FSQ([8, 5, 5, 5])
    model = Sequential(encoder, fsq, decoder)
    x = torch.randn(2, 10, 8)
    out = model(x)
    want = fsq(encoder(x))
    assert type(out) is type(want) and out._fields == want._fields
    assert torch.equal(out[0], decoder(want.quantized)) and torch.equal(out.indices, want.indices)
    assert model.quantizer is fsq and model.quantizer_position == 1


def test_keyword_arguments_go_to_the_quantizer_only():
    quantizer = SignQuantizer()
    model = Sequential(nn.Identity(), quantizer, nn.Tanh())
    out = model(torch.randn(3, 4), mask=None, temperature=0.5)
    assert quantizer.calls == [dict(mask=None, temperature=0.5)]
    assert isinstance(out, Pair) and torch.equal(out.quantized, torch.tanh(quantizer.decode(out.indices)))
    plain = Sequential(SignQuantizer(plain=True), nn.Identity())(torch.randn(3, 4))
    assert type(plain) is tuple and len(plain) == 2


def test_vector_quantize_with_its_forward_options():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=16)
    model = Sequential(nn.Linear(6, 4), vq).eval()
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = model(x, mask=mask)
    assert (out.indices[1, 2:] == -1).all() and (out.indices[0] >= 0).all()


def test_state_dict_keys_are_the_references():
    torch.manual_seed(0)
    ref = vqp.utils.Sequential(nn.Linear(8, 4), vqp.FSQ(levels=[8, 5, 5, 5]), nn.Linear(4, 8))
    mine = Sequential(nn.Linear(8, 4), FSQ([8, 5, 5, 5]), nn.Linear(4, 8))
    mine.load_state_dict(ref.state_dict(), strict=True)
    assert list(mine.state_dict()) == ["fns.0.weight", "fns.0.bias", "fns.2.weight", "fns.2.bias"]
    x = torch.randn(2, 10, 8)
    assert torch.equal(mine(x)[0], ref(x)[0]) and torch.equal(mine(x)[1], ref(x)[1].long())


def test_exactly_one_quantizer():
    with pytest.raises(ConfigurationError, match=r"exactly one quantizer .*got 0: none"):
        Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ConfigurationError, match=r"got 2: FSQ at 0, SignQuantizer at 2") as err:
        Sequential(FSQ([5, 5]), nn.Identity(), SignQuantizer())
    assert isinstance(err.value, AssertionError)  # the reference asserts
    with pytest.raises(TypeError, match="Sequential takes nn.Module arguments, got function at 1"):
        Sequential(FSQ([5, 5]), lambda t: t)


def test_exported_lazily_and_under_the_references_module_name():
    assert vqcore.Sequential is sequential_module.Sequential is Sequential
    assert Sequential(vqcore.create("binary_mapper", bits=2)).quantizer_position == 0
