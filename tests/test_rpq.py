"""RandomProjectionQuantizer: seed example, indices against an explicit LayerNorm -> projection -> cosine
argmax, the cross-entropy paths against F.cross_entropy, buffers only, determinism, state_dict, export.

check_quantizer does not apply as is: forward returns the indices (as the reference), not (quantized,
indices), and decode returns codebook vectors in the projected space, not the input's shape. The same
properties (encode == forward, decode(encode(x)) == the chosen codes, state untouched, state_dict round
trip, torch.export with dynamic axes) are checked explicitly below.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqcore
from vqcore import RandomProjectionQuantizer


def explicit_indices(rpq, x, norm=True):
    ln = nn.LayerNorm(rpq.dim, elementwise_affine=False)
    h = ln(x) if norm else x
    z = torch.einsum("bnd,hdc->bnhc", h, rpq.rand_projs)
    sims = torch.einsum("bnhc,hkc->bnhk", F.normalize(z, dim=-1), rpq.codebooks)
    return sims, sims.argmax(-1)


def test_seed_example_and_single_codebook_shape():
    quantizer = RandomProjectionQuantizer(dim=512, num_codebooks=16, codebook_dim=256, codebook_size=1024)
    x = torch.randn(1, 1024, 512)
    indices = quantizer(x)
    assert indices.shape == (1, 1024, 16) and indices.dtype == torch.int64
    one = RandomProjectionQuantizer(dim=32, codebook_dim=8, codebook_size=16)
    assert one(torch.randn(2, 5, 32)).shape == (2, 5)
    assert one(torch.randn(2, 32)).shape == (2,)


def test_only_projections_and_codebooks_are_stored():
    rpq = RandomProjectionQuantizer(dim=512, num_codebooks=16, codebook_dim=256, codebook_size=1024)
    assert list(rpq.parameters()) == []
    shapes = {k: tuple(v.shape) for k, v in rpq.state_dict().items()}
    assert shapes == {"rand_projs": (16, 512, 256), "codebooks": (16, 1024, 256)}
    torch.testing.assert_close(rpq.codebooks.norm(dim=-1), torch.ones(16, 1024))
    std = (2.0 / (512 + 256)) ** 0.5  # Xavier normal per (dim, codebook_dim) projection
    assert abs(rpq.rand_projs.std().item() - std) < 0.01 * std


@pytest.mark.parametrize("heads, norm", [(3, True), (1, True), (2, False)])
def test_indices_equal_explicit_layernorm_projection_cosine_argmax(heads, norm):
    torch.manual_seed(0)
    rpq = RandomProjectionQuantizer(dim=24, num_codebooks=heads, codebook_dim=8, codebook_size=32, norm=norm)
    x = torch.randn(2, 50, 24) * 3 + 1
    _, want = explicit_indices(rpq, x, norm)
    got = rpq(x)
    assert torch.equal(got, want if heads > 1 else want.squeeze(-1))
    rpq.train()
    assert torch.equal(rpq(x), got)  # no training state: train and eval agree


def test_cross_entropy_paths_equal_hand_computation():
    torch.manual_seed(1)
    rpq = RandomProjectionQuantizer(dim=16, num_codebooks=3, codebook_dim=4, codebook_size=10)
    x = torch.randn(2, 7, 16)
    targets = torch.randint(0, 10, (2, 7, 3))
    targets[0, :3] = -1  # unmasked positions are ignored
    sims, _ = explicit_indices(rpq, x)
    want = F.cross_entropy(sims.reshape(-1, 10), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(rpq(x, indices=targets), want)
    # the BEST-RQ loss on a model's predictions: one softmax per codebook, mean over non-ignored pairs
    logits = torch.randn(2, 7, 3, 10, requires_grad=True)
    loss = rpq.loss(logits, targets)
    terms = [
        -torch.log_softmax(logits[b, n, h], -1)[targets[b, n, h]]
        for b in range(2)
        for n in range(7)
        for h in range(3)
        if targets[b, n, h] >= 0
    ]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    loss.backward()
    assert logits.grad is not None
    torch.testing.assert_close(rpq.logits(x), sims)


def test_determinism_and_state_dict_round_trip():
    a = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=4, codebook_size=8, seed=3)
    b = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=4, codebook_size=8, seed=3)
    c = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=4, codebook_size=8, seed=4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.codebooks, c.codebooks)
    x = torch.randn(3, 9, 16)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(x), a(x))


def test_save_load_through_registry(tmp_path):
    rpq = vqcore.create("rpq", dim=16, num_codebooks=2, codebook_dim=4, codebook_size=8, seed=5)
    vqcore.save(rpq, tmp_path / "rpq.safetensors")
    loaded = vqcore.load(tmp_path / "rpq.safetensors")
    x = torch.randn(2, 4, 16)
    assert torch.equal(loaded(x), rpq(x))


def test_encode_decode_contract_and_state_untouched():
    rpq = RandomProjectionQuantizer(dim=16, num_codebooks=3, codebook_dim=4, codebook_size=8, seed=0)
    x = torch.randn(2, 5, 16)
    before = {k: v.clone() for k, v in rpq.state_dict().items()}
    indices = rpq.encode(x)
    assert torch.equal(indices, rpq(x))
    codes = rpq.decode(indices)
    assert codes.shape == (2, 5, 3, 4)
    for h in range(3):
        assert torch.equal(codes[:, :, h], rpq.codebooks[h][indices[..., h]])
    dropped = indices.clone()
    dropped[0, 0] = -1
    assert (rpq.decode(dropped)[0, 0] == 0).all()
    assert all(torch.equal(v, before[k]) for k, v in rpq.state_dict().items())
    one = RandomProjectionQuantizer(dim=16, codebook_dim=4, codebook_size=8)
    assert one.decode(one(x)).shape == (2, 5, 4)


def test_export_encode_and_decode_with_dynamic_axes():
    from torch.export import Dim

    rpq = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=4, codebook_size=8, seed=0)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = rpq

        def forward(self, x):
            return self.q.encode(x)

    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = rpq

        def forward(self, indices):
            return self.q.decode(indices)

    b, n = Dim("b"), Dim("n")
    x = torch.randn(2, 5, 16)
    enc = torch.export.export(Enc(), (x,), dynamic_shapes={"x": {0: b, 1: n}}, strict=False)
    dec = torch.export.export(Dec(), (rpq.encode(x),), dynamic_shapes={"indices": {0: b, 1: n}}, strict=False)
    probe = torch.randn(4, 11, 16)
    assert torch.equal(enc.module()(probe), rpq.encode(probe))
    assert torch.equal(dec.module()(rpq.encode(probe)), rpq.decode(rpq.encode(probe)))


def test_errors():
    rpq = RandomProjectionQuantizer(dim=16, num_codebooks=2, codebook_dim=4, codebook_size=8)
    with pytest.raises(ValueError, match="must have 16 features"):
        rpq(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="codebook axis of 2"):
        rpq.decode(torch.zeros(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be in \[0, 8\)"):
        rpq.decode(torch.full((2, 5, 2), 8))
    with pytest.raises(ValueError, match=r"logits must be targets' shape \+ \(8,\)"):
        rpq.loss(torch.randn(2, 5, 2, 7), torch.zeros(2, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be in"):
        rpq(torch.randn(2, 5, 16), indices=torch.full((2, 5, 2), 9))
    with pytest.raises(TypeError, match="seed must be an int"):
        RandomProjectionQuantizer(dim=16, codebook_dim=4, codebook_size=8, seed=1.5)
    with pytest.raises(ValueError, match="num_codebooks must be >= 1"):
        RandomProjectionQuantizer(dim=16, codebook_dim=4, codebook_size=8, num_codebooks=0)
