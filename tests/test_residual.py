"""Residual-stack blocks (vqcore.blocks.residual): quantize dropout's options, draw and rounding; coarse
indices padded with dropped layers; the residual decode, where -1 adds nothing and a token whose every
layer is -1 decodes to zero; GroupedStacks (feature chunks, one dropout draw for every group, the
groups-first indices and their coarse prefixes) on stub stacks whose outputs are computed by hand."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch import Tensor, nn

from vqcore.blocks.layout import TokenLayout
from vqcore.blocks.residual import (
    GroupedStacks,
    GroupStep,
    QuantizeDropout,
    decode_layers,
    pad_layers,
    sum_layers,
    zero_dropped,
)
from vqcore.errors import ConfigurationError

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


# -- grouped stacks ------------------------------------------------------------------------------


class StubStack(nn.Module):
    """Two layers of sizes (4, 2) on ``dim`` features: layer q's index of a token is ``q`` (encode); a
    layer's code is its index as a 1-vector (-1: zero); the decode of a token is the sum of its codes on
    every feature, plus ``offset``. ``kept_layers`` returns ``draw`` and counts its calls."""

    codebook_sizes = (4, 2)
    codebook_size = 4
    num_quantizers = 2

    def __init__(self, dim: int, offset: float = 0.0, ragged: bool = False):
        super().__init__()
        self.dim, self.offset, self.ragged = dim, offset, ragged
        self.weight = nn.Parameter(torch.zeros(dim))
        self.draw, self.draws = 2, 0

    @property
    def codebooks(self):
        books = (torch.zeros(4, 1), torch.ones(2, 1))
        return books if self.ragged else torch.zeros(2, 4, 1)

    def kept_layers(self, seed=None, device="cpu"):
        self.draws += 1
        return self.draw

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        return torch.arange(2).expand(*tokens.shape[:2], 2)

    def layer_codes(self, tokens: Tensor) -> list[Tensor]:
        return [tokens[..., q : q + 1].clamp(min=0).float() for q in range(2)]

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        total = sum_layers(self.layer_codes(tokens))
        return total.expand(*tokens.shape[:2], self.dim) + self.offset


class StubGroups(GroupedStacks[StubStack]):
    def __init__(self, dim: int, groups: int, image: bool = False, ragged: bool = False):
        self.built: list[int] = []

        def build(group_dim: int) -> StubStack:
            self.built.append(group_dim)
            return StubStack(group_dim, offset=10.0 * len(self.built), ragged=ragged)

        super().__init__(dim, groups, build)
        self.layout = TokenLayout.from_flags(dim, accept_image_fmap=image)


def test_grouped_stacks_build_one_stack_per_group_on_equal_chunks():
    q = StubGroups(dim=6, groups=3)
    assert [len(s.weight) for s in q.rvqs] == [2, 2, 2]
    assert list(q.state_dict()) == ["rvqs.0.weight", "rvqs.1.weight", "rvqs.2.weight"]
    assert (q.codebook_size, q.num_quantizers, q.num_codebooks) == (4, 2, 6)
    assert q.codebooks.shape == (3, 2, 4, 1)
    ragged = StubGroups(dim=4, groups=2, ragged=True).codebooks
    assert isinstance(ragged, tuple) and len(ragged) == 2 and isinstance(ragged[0], tuple)


@pytest.mark.parametrize(
    "dim, groups, exc, message",
    [
        (10, 3, ConfigurationError, r"dim \(10\) must be divisible by groups \(3\)"),
        (0, 1, ValueError, "dim must be >= 1, got 0"),
        (4, 0, ValueError, "groups must be >= 1, got 0"),
        (4, 2.0, TypeError, r"groups must be an int, got float \(2.0\)"),
    ],
)
def test_grouped_stacks_reject_bad_sizes(dim, groups, exc, message):
    with pytest.raises(exc, match=message):
        StubGroups(dim=dim, groups=groups)


def test_the_forward_draws_quantize_dropout_once_and_gives_every_group_its_chunk():
    """An image (b=1, d=4, h=1, w=2), 2 groups: group g gets features 2g..2g+1 of each of the 2 tokens."""
    q = StubGroups(dim=4, groups=2, image=True)
    q.rvqs[0].draw, q.rvqs[1].draw = 1, 2  # only the first stack's draw counts
    x = torch.arange(8.0).reshape(1, 4, 1, 2)  # token t, feature f: 2 f + t
    seen = []

    def run(stack: StubStack, chunk: Tensor, valid, kept: int) -> GroupStep:
        seen.append((chunk.tolist(), valid, kept))
        indices = torch.full((1, 2, 2), kept)
        codes = torch.stack([chunk[..., :1], -chunk[..., :1]])  # (Q, b, n, 1)
        return GroupStep(-chunk, indices, torch.tensor([float(kept), 0.0]), codes)

    out = q.quantize_groups(x, run, want_codes=True)
    assert (q.rvqs[0].draws, q.rvqs[1].draws) == (1, 0)
    assert seen == [([[[0.0, 2.0], [1.0, 3.0]]], None, 1), ([[[4.0, 6.0], [5.0, 7.0]]], None, 1)]
    assert torch.equal(out.quantized, -x)  # the groups' outputs side by side, back in the image layout
    assert out.indices.shape == (2, 1, 1, 2, 2) and (out.indices == 1).all()
    assert out.losses.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert len(out.codes) == 2 and out.codes[1].shape == (2, 1, 1, 2, 1)  # (Q, b, h, w, cd)
    assert out.codes[1][0].flatten().tolist() == [4.0, 5.0] and out.codes[1][1].flatten().tolist() == [
        -4.0,
        -5.0,
    ]


def test_the_forward_passes_the_token_mask_and_no_losses_stay_none():
    q = StubGroups(dim=4, groups=2)
    x = torch.zeros(2, 3, 4)
    masks = []

    def run(stack, chunk, valid, kept):
        masks.append(valid)
        return GroupStep(chunk, torch.zeros(2, 3, 2, dtype=torch.long), None, None)

    mask = torch.tensor([[True, False, True], [False, True, True]])
    out = q.quantize_groups(x, run, mask=mask)
    assert all(torch.equal(m, mask) for m in masks) and out.losses is None and out.codes == ()
    masks.clear()
    q.quantize_groups(x, run, mask=torch.tensor([True, False]), per_sample_mask=True)
    assert masks[0].tolist() == [[True] * 3, [False] * 3]
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        q.quantize_groups(x, run, mask=torch.tensor([True, False]))


def test_encode_decode_and_codes_go_through_every_group():
    q = StubGroups(dim=4, groups=2)
    indices = q.encode(torch.zeros(1, 3, 4))
    assert indices.shape == (2, 1, 3, 2) and indices[..., 1].eq(1).all() and indices[..., 0].eq(0).all()
    # group g decodes to (sum of its indices) + 10 (g + 1) on each of its 2 features
    decoded = q.decode(torch.tensor([[[[3, 1]]], [[[2, -1]]]]))
    assert decoded.tolist() == [[[14.0, 14.0, 22.0, 22.0]]]
    assert torch.equal(q.get_output_from_indices(torch.tensor([[[[3, 1]]], [[[2, -1]]]])), decoded)
    codes = q.get_codes_from_indices(torch.tensor([[[[3, 1]]], [[[2, -1]]]]))
    assert codes.shape == (2, 2, 1, 1, 1) and codes.flatten().tolist() == [3.0, 1.0, 2.0, 0.0]


def test_a_coarse_prefix_is_padded_with_dropped_layers_in_every_group():
    q = StubGroups(dim=4, groups=2)
    tokens, spatial, layout = q.index_tokens(
        torch.tensor([[[[3]], [[1]]], [[[2]], [[0]]]])
    )  # (G, b=2, n=1, q=1)
    assert [t.tolist() for t in tokens] == [[[[3, -1]], [[1, -1]]], [[[2, -1]], [[0, -1]]]]
    assert spatial == (1,) and layout is q.layout
    assert q.decode(torch.tensor([[[[3]]], [[[2]]]])).tolist() == [[[13.0, 13.0, 22.0, 22.0]]]


def test_indices_must_have_the_groups_axis_first_and_each_group_is_checked_by_name():
    q = StubGroups(dim=4, groups=2)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"indices must have the groups axis first with 2 entries \(groups, then one group's indices\), "
        r"got shape \(3, 1, 5, 2\)",
    ):
        q.decode(torch.zeros(3, 1, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        q.decode(torch.tensor(0))
    with pytest.raises(TypeError, match="indices must be a torch.Tensor, got list"):
        q.decode([[0]])
    bad = torch.tensor([[[[0, 1]]], [[[0, 2]]]])  # group 1's second layer has 2 codes
    with pytest.raises(ValueError, match=r"indices\[1\]\[..., 1\] must be in \[0, 2\) or -1"):
        q.get_codes_from_indices(bad)
    with pytest.raises(ValueError, match=r"indices\[0\] must end with a quantizer axis of 1..2 entries"):
        q.decode(torch.zeros(2, 1, 5, 3, dtype=torch.long))
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())
