"""Residual-stack blocks (vqcore.blocks.residual): quantize dropout's options, draw and rounding; coarse
indices padded with dropped layers; the residual decode, where -1 adds nothing and a token whose every
layer is -1 decodes to zero."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch import nn

from vqcore.blocks.residual import QuantizeDropout, decode_layers, pad_layers, sum_layers, zero_dropped

# -- quantize dropout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, exc, message",
    [
        ((0,), ValueError, "num_quantizers must be >= 1, got 0"),
        ((2.0,), TypeError, r"num_quantizers must be an int, got float \(2.0\)"),
        ((3, True, -1), ValueError, "quantize_dropout_cutoff_index must be >= 0, got -1"),
        (
            (3, True, 3),
            ValueError,
            r"quantize_dropout_cutoff_index must be in \[0, 3\) \(num_quantizers=3\), got 3",
        ),
        ((3, True, 0, 0), ValueError, "quantize_dropout_multiple_of must be >= 1, got 0"),
        ((3, True, 0, 1.5), TypeError, r"quantize_dropout_multiple_of must be an int, got float \(1.5\)"),
    ],
)
def test_quantize_dropout_rejects_bad_options(args, exc, message):
    with pytest.raises(exc, match=message):
        QuantizeDropout(*args)


def test_every_layer_runs_outside_training_or_without_dropout():
    on = QuantizeDropout(4, enabled=True)
    assert [on.kept_layers(False) for _ in range(20)] == [4] * 20
    off = QuantizeDropout(4, enabled=False)
    assert [off.kept_layers(True) for _ in range(20)] == [4] * 20
    single = QuantizeDropout(1, enabled=True)  # nothing to drop in a one-layer stack
    assert not single.enabled and single.kept_layers(True) == 1


def test_the_draw_is_uniform_over_the_allowed_prefixes():
    """``last`` uniform in [cutoff, Q - 1]: with Q = 5 and cutoff 1, 2..5 layers, 1/4 each."""
    dropout = QuantizeDropout(5, enabled=True, cutoff_index=1)
    torch.manual_seed(0)
    counts = Counter(dropout.kept_layers(True) for _ in range(4000))
    assert set(counts) == {2, 3, 4, 5}
    for kept in counts:
        assert abs(counts[kept] / 4000 - 0.25) < 0.03, counts


def test_multiple_of_rounds_the_prefix_up_and_caps_it_at_the_stack():
    """Q = 7, multiple_of 3: ``last + 1`` in 1..7 rounds up to 3 (for 1, 2, 3), 6 (4, 5, 6) or 9, capped at 7
    (for 7): probabilities 3/7, 3/7 and 1/7."""
    dropout = QuantizeDropout(7, enabled=True, multiple_of=3)
    torch.manual_seed(0)
    counts = Counter(dropout.kept_layers(True) for _ in range(7000))
    assert set(counts) == {3, 6, 7}
    for kept, p in ((3, 3 / 7), (6, 3 / 7), (7, 1 / 7)):
        assert abs(counts[kept] / 7000 - p) < 0.03, counts
    # the seeded draw rounds the same way: last = Random(seed).randrange(0, 7)
    for seed in range(30):
        last = random.Random(seed).randrange(0, 7)
        assert dropout.kept_layers(True, seed=seed) == {0: 3, 1: 3, 2: 3, 3: 6, 4: 6, 5: 6, 6: 7}[last]


def test_a_seed_fixes_the_draw_and_touches_no_global_generator():
    dropout = QuantizeDropout(8, enabled=True, cutoff_index=2)
    for seed in range(20):
        assert dropout.kept_layers(True, seed=seed) == random.Random(seed).randrange(2, 8) + 1
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    draws = [dropout.kept_layers(True, seed=7) for _ in range(10)]
    assert len(set(draws)) == 1
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def test_without_a_seed_the_draw_follows_torch_manual_seed_and_leaves_python_random_alone():
    dropout = QuantizeDropout(8, enabled=True)
    python_state = random.getstate()
    torch.manual_seed(3)
    first = [dropout.kept_layers(True) for _ in range(20)]
    torch.manual_seed(3)
    assert [dropout.kept_layers(True) for _ in range(20)] == first
    assert len(set(first)) > 1 and random.getstate() == python_state


def test_repr_names_the_options():
    assert repr(QuantizeDropout(4, True, 1, 2)) == (
        "QuantizeDropout(num_quantizers=4, enabled=True, cutoff_index=1, multiple_of=2)"
    )


# -- coarse indices ------------------------------------------------------------------------------


def test_pad_layers_appends_dropped_layers():
    tokens = torch.tensor([[[1, 2], [0, -1]]], dtype=torch.int32)  # (b, n, q=2) of Q=4
    padded = pad_layers(tokens, [4, 4, 4, 4])
    assert padded.dtype == torch.int64
    assert padded.tolist() == [[[1, 2, -1, -1], [0, -1, -1, -1]]]
    full = torch.tensor([[[1, 2, 3]]])
    assert torch.equal(pad_layers(full, [4, 4, 4]), full)


def test_pad_layers_rejects_too_many_or_no_layers():
    message = (
        r"indices must end with a quantizer axis of 1..3 entries \(num_quantizers=3\), got shape \(1, 4\)"
    )
    with pytest.raises(ValueError, match=message):
        pad_layers(torch.zeros(1, 4, dtype=torch.int64), [2, 2, 2])
    with pytest.raises(ValueError, match=r"got shape \(1, 0\)"):
        pad_layers(torch.zeros(1, 0, dtype=torch.int64), [2, 2, 2])


def test_pad_layers_checks_each_layer_against_its_own_size():
    sizes = [4, 2, 8]
    assert pad_layers(torch.tensor([[3, 1, 7]]), sizes).tolist() == [[3, 1, 7]]
    with pytest.raises(
        ValueError, match=r"codes\[..., 1\] must be in \[0, 2\) or -1 \(dropped\); got values in \[1, 3\]"
    ):
        pad_layers(torch.tensor([[3, 1], [0, 3]]), sizes, "codes")
    with pytest.raises(
        ValueError, match=r"indices must be in \[0, 4\) or -1 \(dropped\); got values in \[-1, 4\]"
    ):
        pad_layers(torch.tensor([[4, -1]]), [4, 4])


# -- the residual decode -------------------------------------------------------------------------


def test_zero_dropped_zeroes_exactly_the_dropped_positions():
    code = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    assert zero_dropped(code, torch.tensor([[0, -1, 2]])).tolist() == [[[1.0, 2.0], [0.0, 0.0], [5.0, 6.0]]]


def test_sum_layers_adds_in_layer_order():
    """1e8 + 1 rounds to 1e8 in float32: (1e8 + 1) - 1e8 = 0, while 1e8 - 1e8 + 1 = 1."""
    a, b, c = torch.tensor([1e8]), torch.tensor([1.0]), torch.tensor([-1e8])
    assert sum_layers([a, b, c]).item() == 0.0
    assert sum_layers([a, c, b]).item() == 1.0
    assert sum_layers([b]) is b


def test_decode_layers_by_hand_with_dropped_layers_and_a_fully_dropped_token():
    project_out = nn.Linear(2, 2)
    with torch.no_grad():
        project_out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        project_out.bias.copy_(torch.tensor([1.0, 1.0]))
    indices = torch.tensor([[[0, 1], [2, -1], [-1, -1]]])  # (b, n=3, Q=2)
    layer0 = zero_dropped(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]]), indices[..., 0])
    layer1 = zero_dropped(torch.tensor([[[0.5, 0.5], [9.0, 9.0], [9.0, 9.0]]]), indices[..., 1])
    out = decode_layers([layer0, layer1], indices, project_out)
    # sums (1.5, 2.5) and (3, 4) -> W s + b; the third token, all -1, is zero although the bias is not
    assert out.tolist() == [[[2.5, 6.0], [4.0, 9.0], [0.0, 0.0]]]
    plain = decode_layers([layer0, layer1], indices, nn.Identity())
    assert plain.tolist() == [[[1.5, 2.5], [3.0, 4.0], [0.0, 0.0]]]
