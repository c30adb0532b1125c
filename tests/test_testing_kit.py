"""vqcore.testing.check_quantizer: built-ins pass it, broken quantizers fail it with the rule they break."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqcore import VectorQuantize
from vqcore.testing import ConformanceError, check_quantizer

VQ_CONFIGS = [
    ((2, 12, 16), dict(dim=16, codebook_size=32)),
    ((2, 12, 16), dict(dim=16, codebook_size=32, kmeans_init=True, threshold_ema_dead_code=1.0)),
    ((2, 12, 16), dict(dim=16, codebook_size=32, codebook_dim=4, use_cosine_sim=True)),
    ((2, 12, 16), dict(dim=16, codebook_size=32, heads=4, separate_codebook_per_head=True)),
    ((2, 12, 16), dict(dim=16, codebook_size=32, heads=2, rotation_trick=True, orthogonal_reg_weight=1.0)),
    ((2, 12, 16), dict(dim=16, codebook_size=32, stochastic_sample_codes=True, sample_codebook_temp=0.1)),
    ((3, 16), dict(dim=16, codebook_size=32)),
    ((2, 16, 12), dict(dim=16, codebook_size=32, channel_last=False)),
    ((2, 16, 3, 4), dict(dim=16, codebook_size=32, accept_image_fmap=True, heads=2)),
    ((2, 16, 2, 3, 4), dict(dim=16, codebook_size=32, accept_3d_fmap=True, codebook_dim=8)),
    ((2, 12, 16), dict(dim=16, codebook_size=32, learnable_codebook=True, threshold_ema_dead_code=0.5)),
]


@pytest.mark.parametrize("shape,kwargs", VQ_CONFIGS, ids=lambda v: str(v))
def test_vector_quantize_passes(shape, kwargs):
    dynamic = (0, 2) if kwargs.get("channel_last") is False else None  # (b, d, n): seq is axis 2
    report = check_quantizer(VectorQuantize, torch.randn(*shape), dynamic_dims=dynamic, **kwargs)
    assert len(report.checks) == 6 and report.checks[-1].startswith("torch.export")
    assert any(check.startswith("book layout") for check in report.checks)


def test_registry_name_as_factory():
    report = check_quantizer("vq", torch.randn(2, 6, 8), dim=8, codebook_size=4, check_export=False)
    assert report.name == "vq" and len(report.checks) == 5


class SignQuantizer(nn.Module):
    """A minimal correct quantizer; subclasses below break one rule each."""

    def __init__(self, dim=4):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks = dim, 2**dim, 1
        self.register_buffer("weights", 2 ** torch.arange(dim))

    def encode(self, x):
        return ((x > 0).long() * self.weights).sum(-1)

    def decode(self, indices):
        signs = ((indices.unsqueeze(-1) // self.weights) % 2).float() * 2 - 1
        return signs * (indices >= 0).unsqueeze(-1)  # -1 (dropped) decodes to zeros

    def forward(self, x):
        indices = self.encode(x)
        q = self.decode(indices).to(x.dtype)
        return x + (q - x).detach(), indices


class DecodeDiffers(SignQuantizer):
    def forward(self, x):
        indices = self.encode(x)
        q = SignQuantizer.decode(self, indices)
        return x + (q - x).detach(), indices

    def decode(self, indices):
        return super().decode(indices) * 0.5


class FloatIndices(SignQuantizer):
    def forward(self, x):
        q, indices = super().forward(x)
        return q, indices.float()


class Int32Encode(SignQuantizer):
    """A forward may keep a narrower integer type (a reference's), encode may not."""

    def forward(self, x):
        q, indices = super().forward(x)
        return q, indices.int()

    def encode(self, x):
        return super().encode(x).int()


class EncodeTouchesState(SignQuantizer):
    def __init__(self, dim=4):
        super().__init__(dim)
        self.register_buffer("calls", torch.zeros(()))

    def encode(self, x):
        self.calls += 1
        return super().encode(x)


class NoGradient(SignQuantizer):
    def forward(self, x):
        indices = self.encode(x)
        return self.decode(indices), indices


class BranchOnValues(SignQuantizer):
    def encode(self, x):
        if bool((x > 0).any()):  # data-dependent Python branch: not exportable
            return super().encode(x)
        return super().encode(-x)


class OutOfRange(SignQuantizer):
    def forward(self, x):
        q, indices = super().forward(x)
        return q, indices + self.codebook_size


class DeclaresTwoCodebooks(SignQuantizer):
    """num_codebooks=2 without a book_layout(): readers expect a trailing axis of 2 books."""

    def __init__(self, dim=4):
        super().__init__(dim)
        self.num_codebooks = 2


class SmallerBooksThanItsCodes(SignQuantizer):
    """A book_layout() of 2 books of 4 codes on a trailing axis the indices do not have."""

    def book_layout(self):
        from vqcore.book_layout import BookLayout

        return BookLayout.trailing("head", 5, 4)


class LossCarriesTheOnlyGradient(SignQuantizer):
    """quantized is detached; only the commitment loss reaches x (passed the old gradient check)."""

    def forward(self, x):
        indices = self.encode(x)
        q = self.decode(indices).to(x.dtype)
        return q, indices, (x - q).pow(2).mean()


class ZeroGradient(SignQuantizer):
    def forward(self, x):
        indices = self.encode(x)
        return self.decode(indices).to(x.dtype) + 0 * x, indices


class DroppedDecodesToACode(SignQuantizer):
    def decode(self, indices):
        return super().decode(indices % self.codebook_size)  # -1 becomes the last code


class DroppedCrashes(SignQuantizer):
    def decode(self, indices):
        table = SignQuantizer.decode(self, torch.arange(self.codebook_size))
        return nn.functional.embedding(indices, table)  # IndexError on -1


class DroppedOnlyWhenAllAre(SignQuantizer):
    """Zeros only when every index is -1; a partly dropped batch decodes -1 as code 0."""

    def decode(self, indices):
        out = super().decode(indices.clamp(min=0))
        return torch.where((indices < 0).all(), torch.zeros_like(out), out)


class DroppedScalesTheOthers(SignQuantizer):
    """-1 decodes to zeros, but the other batch items depend on how many codes were dropped."""

    def decode(self, indices):
        return super().decode(indices) * (1 + (indices < 0).float().mean())


class DroppedRejected(SignQuantizer):
    def decode(self, indices):
        if bool((indices < 0).any()):
            raise ValueError("indices must be in [0, 16), got -1")
        return super().decode(indices)


class CdistEncode(SignQuantizer):
    """Nearest sign code by torch.cdist: exports, but the program guards the token count (cdist picks
    its algorithm by size), so it fails at a larger shape."""

    def encode(self, x):
        codes = SignQuantizer.decode(self, torch.arange(self.codebook_size, device=x.device))
        return torch.cdist(x.reshape(-1, self.dim), codes).argmin(-1).reshape(x.shape[:-1])


class NotAModule:
    dim = codebook_size = num_codebooks = 1


def test_correct_plugin_passes_through_the_protocol_alone():
    report = check_quantizer(SignQuantizer, torch.randn(2, 5, 4))
    assert report.name == "SignQuantizer"


@pytest.mark.parametrize(
    "factory,message",
    [
        (DecodeDiffers, "decode(encode(x)) differs from the eval forward"),
        (FloatIndices, "indices must be an integer tensor (torch.int64), got torch.float32"),
        (Int32Encode, "encode must return torch.int64, got torch.int32"),
        (EncodeTouchesState, "changed the module's state"),
        (NoGradient, "training forward (step 0): quantized carries no gradient to the input"),
        (LossCarriesTheOnlyGradient, "quantized carries no gradient to the input (it is detached from x)"),
        (ZeroGradient, "training forward (step 0): quantized's gradient to the input is zero everywhere"),
        (
            DroppedDecodesToACode,
            "decode maps -1 to a code: indices all -1 decoded to values up to 1; -1 must decode to zeros",
        ),
        (DroppedCrashes, "decode of indices all -1 raised IndexError: index out of range"),
        (DroppedOnlyWhenAllAre, "decode maps -1 to a code: batch item 0 all -1 decoded to values up to 1"),
        (DroppedScalesTheOthers, "decode of batch item 0 all -1 changed the other batch items' vectors"),
        (
            CdistEncode,
            "the exported encode graph must run at other sizes of its dynamic axes (0, 1): it failed at "
            "input shape (5, 8, 4): AssertionError: Guard failed",
        ),
        (BranchOnValues, "torch.export of encode/decode with dynamic axes (0, 1) failed"),
        (OutOfRange, "indices out of range [0, 16)"),
        (
            DeclaresTwoCodebooks,
            "book layout: indices of shape (2, 5) do not match the quantizer's book layout: "
            "axis -1 should enumerate 2 codebooks (got 5)",
        ),
        (SmallerBooksThanItsCodes, "book layout: indices at or above their book's codebook size"),
        (NotAModule, "must build an nn.Module"),
    ],
)
def test_broken_quantizers_fail_with_the_rule_they_break(factory, message):
    with pytest.raises((ConformanceError, TypeError)) as info:
        check_quantizer(factory, torch.randn(2, 5, 4))
    assert message in str(info.value)


def test_decode_that_rejects_dropped_indices_passes():
    report = check_quantizer(DroppedRejected, torch.randn(2, 5, 4), check_export=False)
    assert "decode rejects -1 (ValueError/TypeError)" in report.checks[2]
    report = check_quantizer(SignQuantizer, torch.randn(2, 5, 4), check_export=False)
    assert "-1 decodes to zeros (all indices, one batch item)" in report.checks[2]
    report = check_quantizer(SignQuantizer, torch.randn(1, 5, 4), dynamic_dims=(1,), check_export=False)
    assert "-1 decodes to zeros," in report.checks[2]  # one batch item: no other item to compare


def test_dynamic_axes_need_examples_larger_than_one():
    with pytest.raises(ConformanceError, match="axis 1 is declared dynamic; give it a size >= 2"):
        check_quantizer(SignQuantizer, torch.randn(2, 1, 4))
