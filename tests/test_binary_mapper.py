"""BinaryMapper: index layout and one-hot codes, sampling from the global generator, the KL aux loss,
log_prob and the straight-through gradient against hand computations; encode/decode, save/load, export;
float32 computation; errors; parity with vector-quantize-pytorch 1.32.0."""

from __future__ import annotations

import math

import pytest
import torch

import vqcore
from vqcore import BinaryMapper, ConfigurationError
from vqcore.compat import from_reference
from vqcore.export import to_onnx, to_torchscript
from vqcore.plugins.binary_mapper import BinaryMapperOutput, BinaryMapperOutputWithIndices

vqp = pytest.importorskip("vector_quantize_pytorch")


def hand_bits(index, bits):
    return [(index >> i) & 1 for i in range(bits)]


def test_shapes_and_return_structures():
    mapper = BinaryMapper(bits=8)
    logits = torch.randn(3, 4, 8)
    out = mapper(logits, return_indices=True, reduce_aux_kl_loss=False)
    assert isinstance(out, BinaryMapperOutputWithIndices)
    assert (
        out.one_hot.shape == (3, 4, 256) and out.indices.shape == (3, 4) and out.aux_kl_loss.shape == (3, 4)
    )
    assert out.indices.dtype == torch.int64 and out.one_hot.dtype == torch.float32
    plain = mapper(logits)
    assert isinstance(plain, BinaryMapperOutput) and plain.aux_kl_loss.ndim == 0
    assert (mapper.dim, mapper.codebook_size, mapper.num_codebooks) == (8, 256, 1)


def test_deterministic_bits_are_the_signs_first_bit_least_significant():
    mapper = BinaryMapper(bits=3).eval()
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -0.1, 4.0], [1e-30, 0.0, -1e-30]])
    one_hot, indices, aux = mapper(logits, deterministic=True, return_indices=True)
    assert indices.tolist() == [1 + 4, 4, 1]  # bit i is worth 2^i; logit 0 is bit 0
    assert torch.equal(one_hot, torch.eye(8)[indices])
    assert aux.item() == 0.0  # eval: no aux loss unless asked
    assert torch.equal(mapper.encode(logits), indices)
    assert mapper.codes[5].tolist() == [True, False, True]


def test_sampling_draws_bernoulli_from_the_global_generator():
    mapper = BinaryMapper(bits=4).train()
    logits = torch.randn(5, 6, 4)
    torch.manual_seed(3)
    _, indices, _ = mapper(logits, temperature=0.5, return_indices=True)
    torch.manual_seed(3)
    bits = (logits / 0.5).sigmoid().bernoulli()
    assert torch.equal(indices, (bits * torch.tensor([1, 2, 4, 8])).sum(-1).long())
    # eval samples too unless deterministic_on_eval
    mapper.eval()
    torch.manual_seed(4)
    first = mapper(logits * 0.1, return_indices=True).indices
    assert not torch.equal(first, mapper(logits * 0.1, return_indices=True).indices)
    fixed = BinaryMapper(bits=4, deterministic_on_eval=True).eval()
    assert torch.equal(fixed(logits, return_indices=True).indices, fixed.encode(logits))


def test_aux_loss_matches_hand_computation():
    mapper = BinaryMapper(bits=2, kl_loss_threshold=0.1)
    logits = torch.tensor([[0.0, 0.0], [3.0, -2.0], [0.5, 0.2]])
    per_position = mapper.calc_aux_loss(logits, reduce_aux_kl_loss=False)
    want = []
    for row in logits.tolist():
        entropy = 0.0
        for logit in row:
            p = 1 / (1 + math.exp(-logit))
            entropy -= p * math.log(p) + (1 - p) * math.log(1 - p)
        want.append(max(0.0, 2 * math.log(2) - entropy - 0.1))
    assert per_position.tolist() == pytest.approx(want, abs=1e-6)
    assert want[0] == 0.0 and want[1] > 0
    assert mapper.train()(logits).aux_kl_loss.item() == pytest.approx(sum(want) / 3, abs=1e-6)


def test_log_prob_matches_hand_computation():
    mapper = BinaryMapper(bits=3)
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    indices = torch.tensor([5, 2])
    want = []
    for row, index in zip(logits.tolist(), indices.tolist()):
        bits = hand_bits(index, 3)
        want.append(sum(math.log(1 / (1 + math.exp(-(v if b else -v)))) for v, b in zip(row, bits)))
    assert mapper.log_prob(logits, indices=indices).tolist() == pytest.approx(want, abs=1e-6)
    per_bit = mapper.log_prob(logits, indices=indices, sum_bits=False)
    assert per_bit.shape == (2, 3) and per_bit.sum(-1).tolist() == pytest.approx(want, abs=1e-6)
    one_hot = torch.eye(8)[indices]
    assert torch.equal(mapper.log_prob(logits, one_hot=one_hot), mapper.log_prob(logits, indices=indices))


def test_straight_through_is_exactly_one_hot_with_the_joint_probability_gradient():
    mapper = BinaryMapper(bits=3).train()
    logits = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(8)
    torch.manual_seed(0)
    one_hot, indices, _ = mapper(logits, calc_aux_loss=False, return_indices=True)
    assert torch.equal(one_hot.detach(), torch.eye(8)[indices])  # values exactly 0 / 1
    (grad,) = torch.autograd.grad((one_hot * weights).sum(), logits)
    # G_c = prod_i p_i^c_i (1 - p_i)^(1 - c_i), every code c
    codes = torch.tensor([hand_bits(c, 3) for c in range(8)], dtype=torch.float32)
    x = logits.detach().clone().requires_grad_(True)
    p = x.sigmoid().unsqueeze(1)
    joint = (p**codes * (1 - p) ** (1 - codes)).prod(-1)
    (want,) = torch.autograd.grad((joint * weights).sum(), x)
    torch.testing.assert_close(grad, want)


def test_float32_whatever_the_logits_dtype():
    mapper = BinaryMapper(bits=4).train()
    logits = torch.randn(3, 5, 4).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        one_hot, indices, aux = mapper(logits, return_indices=True)
    torch.manual_seed(1)
    want = mapper(logits.detach().float(), return_indices=True)
    assert one_hot.dtype == torch.float32 and aux.dtype == torch.float32
    assert torch.equal(indices, want.indices) and torch.equal(aux, want.aux_kl_loss)
    one_hot.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    half = BinaryMapper(bits=4).half()
    assert half.code_bits.dtype == torch.float32


# -- inference paths, save/load, export -----------------------------------------------------------------


def test_decode_of_encode_is_the_deterministic_forward_and_minus_one_decodes_to_zeros():
    mapper = BinaryMapper(bits=5, deterministic_on_eval=True).eval()
    logits = torch.randn(2, 7, 5)
    indices = mapper.encode(logits)
    assert torch.equal(mapper.decode(indices), mapper(logits).one_hot)
    indices[0, 3] = -1
    decoded = mapper.decode(indices)
    assert not decoded[0, 3].any() and decoded[0, 2].sum() == 1
    with pytest.raises(
        ValueError, match=r"indices must be in \[0, 32\) or -1 \(dropped\); got values in \[0, 32\]"
    ):
        mapper.decode(torch.tensor([0, 32]))


def test_save_load_round_trip(tmp_path):
    mapper = vqcore.create("binary_mapper", bits=6, kl_loss_threshold=0.5, deterministic_on_eval=True)
    vqcore.save(mapper, tmp_path / "bm.safetensors")
    loaded = vqcore.load(tmp_path / "bm.safetensors")
    assert type(loaded) is BinaryMapper and loaded.kl_loss_threshold == 0.5 and not loaded.training
    logits = torch.randn(3, 6)
    assert torch.equal(loaded(logits).one_hot, mapper.eval()(logits).one_hot)


@pytest.mark.parametrize("writer", [to_onnx, to_torchscript], ids=["onnx", "torchscript"])
@pytest.mark.parametrize("graph", ["encode", "decode"])
def test_export_with_parity(writer, graph, tmp_path):
    pytest.importorskip("onnxruntime")
    mapper = BinaryMapper(bits=5).eval()
    logits = torch.randn(2, 16, 5)
    example = logits if graph == "encode" else mapper.encode(logits)
    result = writer(mapper, tmp_path / f"bm_{graph}", graph=graph, example=example)
    assert result.parity.ok and result.metadata["method"] == "binary_mapper"
    assert result.metadata["codebook_size"] == 32 and result.metadata["bits"] == 5


# -- errors ------------------------------------------------------------------------------------------------


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ConfigurationError, match=r"bits must be in \[1, 20\] .*got 0"):
        BinaryMapper(bits=0)
    with pytest.raises(TypeError, match=r"bits must be an int, got float \(2.0\)"):
        BinaryMapper(bits=2.0)
    mapper = BinaryMapper(bits=3)
    logits, wrong = torch.randn(2, 3), torch.randn(2, 4)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="logits must have a last dimension of 3, got shape \\(2, 4\\)"):
        mapper(wrong)
    with pytest.raises(ValueError, match="temperature must be a number > 0 .*got 0"):
        mapper(logits, temperature=0)
    with pytest.raises(ValueError, match="either indices or one_hot"):
        mapper.log_prob(logits)
    with pytest.raises(ValueError, match="either indices or one_hot"):
        mapper.log_prob(logits, indices=torch.tensor([0, 1]), one_hot=torch.eye(8)[:2])
    assert torch.equal(torch.get_rng_state(), rng)  # refused calls draw nothing


# -- the reference ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_parity_with_the_reference(training):
    ref = vqp.BinaryMapper(bits=5, kl_loss_threshold=0.3).train(training)
    mine = from_reference(ref)
    assert mine.config["kwargs"] == dict(bits=5, kl_loss_threshold=0.3, deterministic_on_eval=False)
    logits = torch.randn(4, 7, 5, requires_grad=True)
    mine_logits = logits.detach().clone().requires_grad_(True)
    for deterministic in (None, True):
        torch.manual_seed(3)
        want = ref(logits, return_indices=True, deterministic=deterministic, calc_aux_loss=True)
        torch.manual_seed(3)
        got = mine(mine_logits, return_indices=True, deterministic=deterministic, calc_aux_loss=True)
        assert torch.equal(got.indices, want[1])
        torch.testing.assert_close(got.one_hot, want[0])
        torch.testing.assert_close(got.aux_kl_loss, want[2])
    if training:
        weights = torch.randn(32)
        ((want[0] * weights).sum() + want[2]).backward()
        ((got.one_hot * weights).sum() + got.aux_kl_loss).backward()
        torch.testing.assert_close(mine_logits.grad, logits.grad)
