"""Token layouts (vqcore.blocks.layout): where each input position lands among the tokens and back, index
and mask layouts, layout detection, and the errors for inputs of the wrong shape, with their messages."""

from __future__ import annotations

import pytest
import torch

from vqcore.blocks.layout import TokenLayout, auto_index_layout, auto_layout, index_tokens, token_mask

# -- features ------------------------------------------------------------------------------------


def test_image_tokens_are_row_major_positions():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)  # (b, d, h, w)
    layout = TokenLayout("image", 3)
    tokens, spatial = layout.to_tokens(x)
    assert tokens.shape == (2, 8, 3) and spatial == (2, 4)
    for b in range(2):
        for h in range(2):
            for w in range(4):
                assert torch.equal(tokens[b, h * 4 + w], x[b, :, h, w])
    assert torch.equal(layout.from_tokens(tokens, spatial), x)


def test_video_tokens_are_time_row_column_positions():
    x = torch.randn(1, 2, 3, 2, 2)  # (b, d, t, h, w)
    layout = TokenLayout("video", 2)
    tokens, spatial = layout.to_tokens(x)
    assert tokens.shape == (1, 12, 2) and spatial == (3, 2, 2)
    assert torch.equal(tokens[0, 2 * 4 + 1 * 2 + 0], x[0, :, 2, 1, 0])
    assert torch.equal(layout.from_tokens(tokens, spatial), x)


def test_sequences_single_tokens_and_channel_first_sequences():
    layout = TokenLayout("sequence", 3)
    x = torch.randn(2, 5, 3)
    tokens, spatial = layout.to_tokens(x)
    assert tokens is x and spatial == (5,)
    single = torch.randn(2, 3)
    tokens, spatial = layout.to_tokens(single)
    assert tokens.shape == (2, 1, 3) and spatial == ()
    assert torch.equal(layout.from_tokens(tokens, spatial), single)
    channel_first = TokenLayout("channel_first", 3)
    y = torch.randn(2, 3, 5)  # (b, d, n)
    tokens, spatial = channel_first.to_tokens(y)
    assert torch.equal(tokens, y.transpose(1, 2)) and spatial == (5,)
    assert torch.equal(channel_first.from_tokens(tokens, spatial), y)
    # the way back takes any feature width (codes after project_out may differ from dim)
    assert channel_first.from_tokens(torch.zeros(2, 5, 7), spatial).shape == (2, 7, 5)


@pytest.mark.parametrize(
    "kind, shape, exc, message",
    [
        (
            "image",
            (2, 3),
            ValueError,
            r"x must be \(batch, dim, height, width\) for this module, got shape \(2, 3\)",
        ),
        (
            "image",
            (2, 4, 5, 5),
            ValueError,
            r"x must have 3 features on its second \(channel-first\) axis \(\(batch, dim, height, width\)\), "
            r"got shape \(2, 4, 5, 5\)",
        ),
        ("sequence", (2, 5, 4), ValueError, r"x must have 3 features on its last axis"),
        (
            "sequence",
            (2, 5, 3, 1),
            ValueError,
            r"x must be \(batch, seq, dim\) or \(batch, dim\) for this module",
        ),
        ("video", (1, 3, 2, 2), ValueError, r"x must be \(batch, dim, time, height, width\)"),
    ],
)
def test_to_tokens_rejects_the_wrong_shape_naming_the_expected_one(kind, shape, exc, message):
    with pytest.raises(exc, match=message):
        TokenLayout(kind, 3).to_tokens(torch.zeros(shape))


def test_to_tokens_rejects_non_float_and_non_tensor_inputs():
    layout = TokenLayout("sequence", 3)
    with pytest.raises(TypeError, match=r"x must be a floating point tensor, got dtype torch.int64"):
        layout.to_tokens(torch.zeros(2, 5, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"feats must be a torch.Tensor, got list"):
        layout.to_tokens([[0.0] * 3], name="feats")


def test_layout_kinds_and_flags():
    with pytest.raises(
        ValueError,
        match=r"layout must be one of \['channel_first', 'image', 'sequence', 'video'\], got 'grid'",
    ):
        TokenLayout("grid", 3)
    assert TokenLayout.from_flags(3).kind == "sequence"
    assert TokenLayout.from_flags(3, channel_last=False).kind == "channel_first"
    assert TokenLayout.from_flags(3, accept_image_fmap=True).kind == "image"
    assert TokenLayout.from_flags(3, accept_3d_fmap=True).kind == "video"
    with pytest.raises(ValueError, match="accept_image_fmap and accept_3d_fmap cannot both be True"):
        TokenLayout.from_flags(3, accept_image_fmap=True, accept_3d_fmap=True)
    with pytest.raises(ValueError, match=r"channel_last=False is for \(batch, dim, seq\) sequences"):
        TokenLayout.from_flags(3, accept_image_fmap=True, channel_last=False)
    assert [TokenLayout(k, 3).channel_first for k in ("sequence", "channel_first", "image", "video")] == [
        False,
        True,
        True,
        True,
    ]


# -- indices and masks ---------------------------------------------------------------------------


def test_indices_move_between_positions_and_tokens():
    layout = TokenLayout("image", 3)
    indices = torch.arange(2 * 2 * 3 * 4).reshape(2, 2, 3, 4)  # (b, h, w, heads)
    tokens, spatial = layout.indices_to_tokens(indices, extra_dims=1)
    assert tokens.shape == (2, 6, 4) and spatial == (2, 3)
    assert torch.equal(tokens[1, 1 * 3 + 2], indices[1, 1, 2])
    assert torch.equal(layout.indices_from_tokens(tokens, spatial), indices)
    with pytest.raises(
        ValueError,
        match=r"indices must have 4 dims \(\(batch, height, width\) \+ \(heads,\)\), got shape \(2, 3\)",
    ):
        layout.indices_to_tokens(torch.zeros(2, 3, dtype=torch.int64), extra_dims=1)
    with pytest.raises(
        ValueError,
        match=r"codes must have 3 or 2 dims \(\(batch, seq\) or \(batch\) \+ \(heads,\)\), got shape \(2,\)",
    ):
        TokenLayout("sequence", 3).indices_to_tokens(torch.zeros(2), extra_dims=1, name="codes")


def test_mask_to_tokens_checks_shape_and_dtype():
    layout = TokenLayout("image", 3)
    mask = torch.tensor([[[True, False], [False, True]]])
    assert layout.mask_to_tokens(mask, 1, (2, 2)).tolist() == [[True, False, False, True]]
    with pytest.raises(
        ValueError, match=r"mask must have shape \(1, 2, 2\) \(batch, \*positions\), got \(1, 4\)"
    ):
        layout.mask_to_tokens(mask.reshape(1, 4), 1, (2, 2))
    with pytest.raises(TypeError, match="mask must be a bool tensor, got dtype torch.float32"):
        layout.mask_to_tokens(mask.float(), 1, (2, 2))


@pytest.mark.parametrize(
    "ndim, channel_first, kind",
    [
        (2, None, "sequence"),
        (3, None, "sequence"),
        (3, True, "channel_first"),
        (4, None, "image"),
        (5, None, "video"),
    ],
)
def test_auto_layout_by_rank(ndim, channel_first, kind):
    assert auto_layout(ndim, 8, channel_first).kind == kind
    # the indices of that input (with one trailing axis) lead back to the same layout
    spatial = {"sequence": 1, "channel_first": 1, "image": 2, "video": 3}[kind] if ndim > 2 else 0
    assert auto_index_layout(1 + spatial + 1, 1, 8, channel_first).kind == kind


def test_auto_layouts_reject_other_ranks():
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, dim\), .*; got 6 dims"):
        auto_layout(6, 8)
    with pytest.raises(
        ValueError, match=r"indices must be \(batch,\), .* \+ 1 trailing axes; got shape with 6 dims"
    ):
        auto_index_layout(6, 1, 8)


def test_index_tokens_checks_the_trailing_axis_and_the_values():
    indices = torch.tensor([[[0, 7], [3, -1]]], dtype=torch.int32)  # (b=1, n=2, codebooks=2)
    tokens, spatial, layout = index_tokens(indices, dim=4, channel_first=None, size=8, trailing=2)
    assert tokens.dtype == torch.int64 and tokens.tolist() == [[[0, 7], [3, -1]]]
    assert spatial == (2,) and layout.kind == "sequence"
    with pytest.raises(
        ValueError, match=r"indices must end with a codebook axis of size 3, got shape \(1, 2, 2\)"
    ):
        index_tokens(indices, dim=4, channel_first=None, size=8, trailing=3)
    # coarse residual indices may hold fewer layers, never more
    short, _, _ = index_tokens(
        indices, dim=4, channel_first=None, size=8, trailing=3, at_most=True, axis="quantizer"
    )
    assert short.shape == (1, 2, 2)
    with pytest.raises(ValueError, match=r"a quantizer axis of size <= 1"):
        index_tokens(indices, dim=4, channel_first=None, size=8, trailing=1, at_most=True, axis="quantizer")
    with pytest.raises(
        ValueError, match=r"indices must be in \[0, 7\) or -1 \(dropped\); got values in \[-1, 7\]"
    ):
        index_tokens(indices, dim=4, channel_first=None, size=7, trailing=2)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 8\); got values in \[-1, 7\]"):
        index_tokens(indices, dim=4, channel_first=None, size=8, trailing=2, allow_dropped=False)
    # without a trailing axis the tokens get one of size 1
    plain, spatial, _ = index_tokens(
        torch.tensor([[1, 2, 3]]), dim=4, channel_first=None, size=8, trailing=None
    )
    assert plain.tolist() == [[[1], [2], [3]]] and spatial == (3,)


def test_token_mask_from_lengths_per_sample_flags_and_masks():
    seq = TokenLayout("sequence", 4)
    assert token_mask(seq, 3, 3, (3,)) is None
    lens = torch.tensor([2, 0, 3])
    assert token_mask(seq, 3, 3, (3,), lens=lens).tolist() == [
        [True, True, False],
        [False, False, False],
        [True, True, True],
    ]
    per_sample = torch.tensor([True, False, True])
    assert token_mask(seq, 3, 2, (2,), per_sample, per_sample=True).tolist() == [
        [True, True],
        [False, False],
        [True, True],
    ]
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    assert torch.equal(token_mask(seq, 3, 2, (2,), mask), mask)


def test_token_mask_errors():
    seq, image = TokenLayout("sequence", 4), TokenLayout("image", 4)
    lens, mask = torch.tensor([1, 2]), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="pass either mask or lens, not both"):
        token_mask(seq, 2, 3, (3,), mask, lens)
    with pytest.raises(ValueError, match="lens is for"):
        token_mask(image, 2, 4, (2, 2), lens=lens)
    with pytest.raises(
        ValueError, match=r"lens must be an integer tensor of shape \(2,\), got \(3,\) torch.int64"
    ):
        token_mask(seq, 2, 3, (3,), lens=torch.tensor([1, 2, 3]))
    with pytest.raises(
        ValueError, match=r"lens must be an integer tensor of shape \(2,\), got \(2,\) torch.float32"
    ):
        token_mask(seq, 2, 3, (3,), lens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"a per-sample mask must have shape \(2,\), got \(3,\)"):
        token_mask(seq, 2, 3, (3,), torch.ones(3, dtype=torch.bool), per_sample=True)
    with pytest.raises(TypeError, match="mask must be a bool tensor, got dtype torch.int64"):
        token_mask(seq, 2, 3, (3,), torch.ones(2, dtype=torch.int64), per_sample=True)
