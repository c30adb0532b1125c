"""Codebooks, losses and estimators as extension points: a part given by registry name or as an
object plugs into the built-in VectorQuantize / ResidualVQ exactly as the built-in parts do, and the
Codebook training-step contract holds (prepare_ and train_step_ in training-mode forwards only)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import vqcore
from vqcore import ResidualVQ, VectorQuantize
from vqcore.blocks.codebooks import EMACodebook
from vqcore.blocks.estimators import GumbelStraightThrough, RotationTrick, StraightThrough
from vqcore.blocks.losses import CodebookLoss
from vqcore.plugins.vq import BookStep
from vqcore.protocols import Codebook
from vqcore.registry import reset_registry


class RecordingCodebook(nn.Module):
    """A third-party codebook: fixed random codes, nearest by Euclidean distance, and a log of every
    training-step call it receives."""

    cosine = False
    trained_by_gradient = False

    def __init__(self, size: int, dim: int, books: int = 1, scale: float = 1.0):
        super().__init__()
        self.register_buffer("table", torch.randn(books, size, dim) * scale)
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    size = property(lambda self: self.table.shape[1])
    dim = property(lambda self: self.table.shape[2])
    books = property(lambda self: self.table.shape[0])
    codes = property(lambda self: self.table)

    def nearest(self, x):
        return torch.cdist(x, self.table).argmin(-1)

    def lookup(self, indices):
        return torch.gather(self.table, 1, indices.unsqueeze(-1).expand(-1, -1, self.dim))

    def prepare_(self, x, valid=None, *, sync=False):
        self.calls.append(("prepare_", tuple(x.shape)))

    def train_step_(self, x, indices, valid=None, *, sync=False):
        self.calls.append(("train_step_", tuple(x.shape)))


class Plugin:
    """Registers the recording codebook, a loss and an estimator, as a third-party plugin would."""

    @vqcore.hookimpl
    def register_codebooks(self, register):
        register("recording", RecordingCodebook, summary="test codebook")

    @vqcore.hookimpl
    def register_losses(self, register):
        register("mean_code_norm", MeanCodeNorm, summary="test loss")

    @vqcore.hookimpl
    def register_estimators(self, register):
        register("halved_gradient", HalvedGradient, summary="test estimator")


class MeanCodeNorm(nn.Module):
    """A loss with a parameter (its scale), to check that module losses train and save with the quantizer."""

    name = "mean_code_norm"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, q, indices, codebook, valid):
        return self.scale * x.pow(2).mean((1, 2))


@dataclasses.dataclass(frozen=True)
class HalvedGradient:
    name = "halved_gradient"

    def __call__(self, x, q, indices, codebook):
        return q.detach() + 0.5 * (x - x.detach())


@pytest.fixture
def plugin():
    registry = reset_registry()
    registry.register_plugin(Plugin(), name="test-parts")
    yield registry
    reset_registry()


# -- codebooks ------------------------------------------------------------------------------------------


def test_builtin_codebooks_are_registered_and_chosen_by_the_seed_arguments():
    for name, cosine, by_gradient in (
        ("euclidean", False, False),
        ("cosine", True, False),
        ("learnable", False, True),
    ):
        book = vqcore.get_entry(name, kind="codebook").create(size=8, dim=4)
        assert (
            isinstance(book, Codebook) and book.cosine is cosine and book.trained_by_gradient is by_gradient
        )
    assert VectorQuantize(dim=4, codebook_size=8).codebook_module.cosine is False
    assert VectorQuantize(dim=4, codebook_size=8, use_cosine_sim=True).codebook_module.cosine is True
    assert VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True).codebook_module.trained_by_gradient


def test_codebook_by_name_equals_the_seed_arguments():
    torch.manual_seed(0)
    seeded = VectorQuantize(dim=6, codebook_size=16, use_cosine_sim=True, decay=0.5).train()
    torch.manual_seed(0)
    named = VectorQuantize(dim=6, codebook_size=16, codebook="cosine", codebook_kwargs={"decay": 0.5}).train()
    x = torch.randn(2, 20, 6)
    for _ in range(2):
        a, b = seeded(x), named(x)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    assert seeded.state_dict().keys() == named.state_dict().keys()
    for key, value in seeded.state_dict().items():
        assert torch.equal(value, named.state_dict()[key]), key


def test_codebook_object_is_used_as_given_and_checked():
    book = EMACodebook(16, 3, books=2, decay=0.5)
    vq = VectorQuantize(dim=6, codebook_size=16, heads=2, separate_codebook_per_head=True, codebook=book)
    assert vq.codebook_module is book and "_codebook.embed" in vq.state_dict()
    with pytest.raises(
        ValueError, match=r"has \(size, dim, books\) = \(16, 3, 2\); the quantizer needs \(16, 3, 1\)"
    ):
        VectorQuantize(dim=6, codebook_size=16, heads=2, codebook=EMACodebook(16, 3, books=2))
    with pytest.raises(TypeError, match="does not follow vqcore.protocols.Codebook: missing .*prepare_"):
        VectorQuantize(dim=4, codebook_size=8, codebook=nn.Linear(4, 4))
    with pytest.raises(ValueError, match="decay, kmeans_init configure the built-in codebooks"):
        VectorQuantize(dim=4, codebook_size=8, codebook="euclidean", decay=0.5, kmeans_init=True)
    with pytest.raises(ValueError, match="codebook_kwargs are the options of a codebook given by name"):
        VectorQuantize(dim=4, codebook_size=8, codebook_kwargs={"decay": 0.5})
    with pytest.raises(KeyError, match="unknown codebook 'nope'"):
        VectorQuantize(dim=4, codebook_size=8, codebook="nope")


def test_third_party_codebook_follows_the_training_step_contract(plugin):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, codebook="recording", codebook_kwargs={"scale": 2.0}).train()
    book = vq.codebook_module
    x = torch.randn(2, 5, 4, requires_grad=True)
    out = vq(x)
    assert book.calls == [("prepare_", (1, 10, 4)), ("train_step_", (1, 10, 4))]
    out.quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # straight-through
    assert torch.equal(out.indices, book.nearest(x.detach().reshape(1, 10, 4)).reshape(2, 5))
    vq(x, freeze_codebook=True)
    assert book.calls[2:] == [("prepare_", (1, 10, 4))]  # frozen: no step
    book.calls.clear()
    vq.eval()
    vq(x)
    vq.decode(vq.encode(x))
    assert book.calls == []  # eval, encode and decode never touch the codebook's state
    vq.train()
    with torch.no_grad():
        vq(x)
    assert [c[0] for c in book.calls] == ["prepare_", "train_step_"]  # training mode, not grad mode, decides


def test_third_party_codebook_in_residual_stacks(plugin):
    torch.manual_seed(0)
    own = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, codebook="recording").train()
    shared = ResidualVQ(
        dim=4, num_quantizers=3, codebook_size=8, codebook="recording", shared_codebook=True
    ).train()
    x = torch.randn(2, 5, 4)
    own(x)
    for layer in own.layers:
        assert layer.codebook_module.calls == [("prepare_", (1, 10, 4)), ("train_step_", (1, 10, 4))]
    shared(x)
    book = shared.layers[0].codebook_module
    assert all(layer.codebook_module is book for layer in shared.layers)
    # each layer searches its residual; one step for all of them on the concatenated residuals
    assert book.calls == [("prepare_", (1, 10, 4))] * 3 + [("train_step_", (1, 30, 4))]


def test_residual_stack_takes_a_codebook_object_only_to_share_it():
    book = EMACodebook(8, 4)
    shared = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, codebook=book, shared_codebook=True)
    assert all(layer.codebook_module is book for layer in shared.layers)
    with pytest.raises(ValueError, match="a codebook object is one codebook: pass shared_codebook=True"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, codebook=book)


def test_third_party_codebook_saves_loads_and_exports(plugin, tmp_path):
    torch.manual_seed(0)
    vq = vqcore.create("vq", dim=4, codebook_size=8, codebook="recording")
    path = tmp_path / "vq.safetensors"
    vqcore.save(vq, path)
    loaded = vqcore.load(path)
    assert torch.equal(loaded.codebook_module.table, vq.codebook_module.table)
    x = torch.randn(2, 6, 4)
    assert torch.equal(loaded.encode(x), vq.eval().encode(x))


def test_codebook_module_is_public_and_its_codes_collect_the_gradient():
    vq = VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True).train()
    vq(torch.randn(2, 10, 8)).loss.backward()
    codes = vq.codebook_module.codes
    assert codes.is_leaf and codes.grad is not None and codes.grad.abs().sum() > 0
    assert [n for n, _ in vq.named_parameters()] == ["_codebook.embed"]


# -- losses ----------------------------------------------------------------------------------------------


def test_extra_losses_by_name_are_weighted_and_reported():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, commitment_weight=0.0, extra_losses={"codebook": 0.5}).train()
    x = torch.randn(2, 5, 4)
    codes_before = vq.codebook.detach().clone()
    out = vq(x, return_loss_breakdown=True)
    q = codes_before[out.indices.reshape(-1)]
    want = (x.reshape(-1, 4) - q).pow(2).mean()
    torch.testing.assert_close(out.breakdown.extra["codebook"], want)
    torch.testing.assert_close(out.loss, 0.5 * want)
    assert out.breakdown.commitment.item() == 0.0
    vq.eval()
    evaluated = vq(x, return_loss_breakdown=True)
    assert evaluated.breakdown.extra == {"codebook": evaluated.loss} and evaluated.loss.item() == 0.0


def test_extra_loss_module_by_name_trains_and_saves_with_the_quantizer(plugin):
    vq = VectorQuantize(dim=4, codebook_size=8, extra_losses={"mean_code_norm": 1.0}).train()
    assert "losses.modules_with_state.0.scale" in vq.state_dict()
    x = torch.randn(2, 5, 4)
    out = vq(x, return_loss_breakdown=True)
    torch.testing.assert_close(out.breakdown.extra["mean_code_norm"], 2.0 * x.pow(2).mean())
    out.loss.backward()
    scale = vq.losses.modules_with_state[0].scale
    assert scale.grad is not None and scale in set(vq.parameters())


def test_extra_losses_reach_every_residual_layer():
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=4, num_quantizers=2, codebook_size=8, commitment_weight=0.0, extra_losses=[(CodebookLoss(), 1.0)]
    )
    x = torch.randn(2, 5, 4)
    _, indices, losses = rvq.train()(x)
    assert losses.shape == (2,) and (losses > 0).all()


# -- estimators ------------------------------------------------------------------------------------------


def test_estimator_by_name_or_object_and_the_seed_flags():
    assert isinstance(VectorQuantize(dim=4, codebook_size=8).estimator, StraightThrough)
    assert isinstance(VectorQuantize(dim=4, codebook_size=8, rotation_trick=True).estimator, RotationTrick)
    assert isinstance(VectorQuantize(dim=4, codebook_size=8, estimator="rotation").estimator, RotationTrick)
    gumbel = VectorQuantize(dim=4, codebook_size=8, straight_through=True, sample_codebook_temp=0.5).estimator
    assert gumbel == GumbelStraightThrough(temperature=0.5)
    with pytest.raises(ValueError, match="either estimator or rotation_trick"):
        VectorQuantize(dim=4, codebook_size=8, estimator="ste", rotation_trick=True)
    with pytest.raises(ValueError, match="exclude each other"):
        VectorQuantize(dim=4, codebook_size=8, rotation_trick=True, straight_through=True)


def test_rotation_trick_by_name_equals_the_flag():
    torch.manual_seed(0)
    flag = VectorQuantize(dim=4, codebook_size=8, rotation_trick=True).train()
    named = VectorQuantize(dim=4, codebook_size=8, estimator="rotation_trick")
    named.load_state_dict(flag.state_dict())
    named.train()
    x = torch.randn(2, 5, 4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    flag(xa).quantized.pow(2).sum().backward()
    named(xb).quantized.pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_third_party_estimator_by_name(plugin):
    vq = VectorQuantize(dim=4, codebook_size=8, commitment_weight=0.0, estimator="halved_gradient").train()
    x = torch.randn(2, 5, 4, requires_grad=True)
    vq(x).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))


def test_gumbel_straight_through_in_vector_quantize():
    torch.manual_seed(0)
    vq = VectorQuantize(
        dim=4, codebook_size=8, straight_through=True, sample_codebook_temp=0.5, commitment_weight=0.0
    )
    vq.train()
    x = torch.randn(1, 6, 4, requires_grad=True)
    out = vq(x, freeze_codebook=True)
    codes = vq.codebook.detach()
    assert torch.equal(out.quantized.detach(), codes[out.indices])
    out.quantized.sum().backward()
    xs = x.detach().clone().requires_grad_()
    soft = torch.softmax(-torch.cdist(xs[0], codes) / 0.5, -1) @ codes
    soft.sum().backward()
    torch.testing.assert_close(x.grad, xs.grad)
    # at temperature 0 (per call) there is no soft assignment: straight-through
    x.grad = None
    vq(x, sample_codebook_temp=0.0, freeze_codebook=True).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


# -- the token-level API the residual stacks use -------------------------------------------------------------


def test_quantize_books_returns_pre_step_codes_and_step_codebook_takes_the_step():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, decay=0.5).train()
    z = vq.to_books(torch.randn(2, 5, 4))
    before = vq.codebook_module.codes.detach().clone()
    step = vq.quantize_books(z)
    assert isinstance(step, BookStep) and step.indices.shape == (1, 10) and step.codes.shape == (1, 10, 4)
    assert torch.equal(step.codes, before[0][step.indices[0]].unsqueeze(0))
    assert torch.equal(vq.codebook_module.codes, before)  # quantize_books takes no step
    torch.testing.assert_close(step.loss, (z - step.codes).pow(2).mean())
    vq.step_codebook_(z, step.indices)
    assert not torch.equal(vq.codebook_module.codes, before)
    assert torch.equal(vq.from_books(step.codes, 2, 5), step.codes.reshape(2, 5, 4))
