"""vqcore.compat: vector-quantize-pytorch 1.32.0 modules, trained a few steps, migrate to vqcore."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch")

import vqcore  # noqa: E402
from vqcore.compat import (  # noqa: E402
    converter_for,
    from_reference,
    load_reference_state_dict,
    reference_kwargs,
)

warnings.filterwarnings("ignore", module="vector_quantize_pytorch")


def _train(ref, shape, steps=4, seed=0):
    torch.manual_seed(seed)
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    for _ in range(steps):
        x = torch.randn(*shape)
        out = ref(x)
        loss = out[-1]
        if opt is not None and isinstance(loss, torch.Tensor) and loss.requires_grad:
            opt.zero_grad()
            (loss.sum() + out[0].square().mean()).backward()
            opt.step()
    return ref.eval()


def _compare(ref, mine, x, quantized_index=0, indices_index=1):
    with torch.no_grad():
        r = ref(x)
        m = mine(x)
    torch.testing.assert_close(m[quantized_index], r[quantized_index], atol=1e-5, rtol=1e-5)
    ri, mi = r[indices_index], m[indices_index]
    assert mi.dtype == torch.int64
    assert mi.shape == ri.shape
    mismatch = (mi != ri.long()).float().mean().item()
    assert mismatch <= 0.01, mismatch  # ties only


def _check_vq_state_nontrivial(ref):
    book = ref._codebook
    assert not torch.allclose(book.cluster_size, torch.ones_like(book.cluster_size))


VQ_CASES = {
    "plain": dict(dim=8, codebook_size=16),
    "cosine": dict(dim=8, codebook_size=16, use_cosine_sim=True),
    "kmeans": dict(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=3),
    "heads_separate": dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True),
    "heads_shared": dict(dim=8, codebook_size=16, heads=2, codebook_dim=4),
    "codebook_dim": dict(dim=8, codebook_size=16, codebook_dim=4),
    "layernorm": dict(dim=8, codebook_size=16, codebook_dim=4, layernorm_after_project_in=True),
    "orthogonal": dict(dim=8, codebook_size=16, orthogonal_reg_weight=1.0),
    "dead_codes": dict(dim=8, codebook_size=32, threshold_ema_dead_code=2, decay=0.5),
}


@pytest.mark.parametrize("case", list(VQ_CASES))
def test_vector_quantize(case):
    torch.manual_seed(1)
    ref = _train(vqp.VectorQuantize(**VQ_CASES[case]), (4, 32, 8))
    _check_vq_state_nontrivial(ref)
    mine = from_reference(ref).eval()
    assert type(mine).__name__ == "VectorQuantize"
    _compare(ref, mine, torch.randn(3, 20, 8))


def test_vector_quantize_image_fmap():
    torch.manual_seed(2)
    ref = vqp.VectorQuantize(dim=8, codebook_size=16, accept_image_fmap=True)
    _train(ref, (2, 8, 4, 4))
    mine = from_reference(ref).eval()
    _compare(ref, mine, torch.randn(2, 8, 5, 3))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=8, codebook_size=16, num_quantizers=3),
        dict(dim=8, codebook_size=16, num_quantizers=2, codebook_dim=4),
        dict(dim=8, codebook_size=16, num_quantizers=2, use_cosine_sim=True),
        dict(dim=8, codebook_size=16, num_quantizers=2, shared_codebook=True),
    ],
    ids=["plain", "codebook_dim", "cosine", "shared"],
)
def test_residual_vq(kwargs):
    torch.manual_seed(3)
    ref = _train(vqp.ResidualVQ(**kwargs), (4, 32, 8))
    mine = from_reference(ref).eval()
    assert type(mine).__name__ == "ResidualVQ"
    _compare(ref, mine, torch.randn(3, 20, 8))


def test_grouped_residual_vq():
    torch.manual_seed(4)
    ref = _train(vqp.GroupedResidualVQ(dim=8, groups=2, codebook_size=16, num_quantizers=2), (4, 32, 8))
    mine = from_reference(ref).eval()
    assert type(mine).__name__ == "GroupedResidualVQ"
    _compare(ref, mine, torch.randn(3, 20, 8))


@pytest.mark.parametrize(
    "kwargs",
    [dict(levels=[5, 3, 4]), dict(levels=[8, 5], dim=6), dict(levels=[5, 5], dim=8, num_codebooks=2)],
    ids=["no_projection", "projection", "codebooks"],
)
def test_fsq(kwargs):
    torch.manual_seed(5)
    ref = vqp.FSQ(**kwargs)
    dim = ref.dim
    _train(ref, (2, 16, dim))
    with torch.no_grad():  # non-trivial projections
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mine = from_reference(ref).eval()
    _compare(ref, mine, torch.randn(3, 20, dim))


@pytest.mark.parametrize(
    "kwargs",
    [dict(codebook_size=16), dict(codebook_size=16, dim=6), dict(codebook_size=16, dim=8, num_codebooks=2)],
    ids=["no_projection", "projection", "codebooks"],
)
def test_lfq(kwargs):
    torch.manual_seed(6)
    ref = vqp.LFQ(**kwargs)
    dim = ref.dim
    _train(ref, (2, 16, dim))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mine = from_reference(ref).eval()
    _compare(ref, mine, torch.randn(3, 20, dim))


def test_latent_quantize():
    torch.manual_seed(7)
    ref = vqp.LatentQuantize(levels=[5, 3], dim=6, commitment_loss_weight=0.1, quantization_loss_weight=0.1)
    with torch.no_grad():  # the reference never trains its tables: give them learned-looking values
        for table in ref.values_per_latent:
            table.copy_(table.sort().values + torch.rand_like(table) * 0.05)
        for p in ref.project_in.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mine = from_reference(ref).eval()
    ref.eval()
    x = torch.randn(2, 6, 4, 4)  # the reference takes images (channel first)
    _compare(ref, mine, x)


def test_load_reference_state_dict_into_prebuilt_module():
    import vqcore

    torch.manual_seed(8)
    ref = _train(
        vqp.VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True), (4, 32, 8)
    )
    # vqcore's codebook_dim default (dim // heads) differs from the reference's (dim): pass it explicitly
    mine = vqcore.VectorQuantize(
        dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, codebook_dim=8
    )
    load_reference_state_dict(mine, ref.state_dict())
    _compare(ref, mine.eval(), torch.randn(3, 20, 8))
    wrong = vqcore.VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True)
    with pytest.raises(ValueError, match="project_in"):
        load_reference_state_dict(wrong, ref.state_dict())


def test_reference_kwargs_roundtrip_config():
    ref = vqp.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, codebook_dim=4, decay=0.9)
    kind, kwargs = reference_kwargs(ref)
    assert kind == "ResidualVQ"
    assert kwargs["codebook_dim"] == 4 and kwargs["decay"] == 0.9 and kwargs["num_quantizers"] == 2


def test_training_only_option_needs_opt_in():
    # vqcore refuses an in-place optimizer on a codebook shared by every layer (the reference never steps it)
    ref = vqp.ResidualVQ(
        dim=8,
        codebook_size=16,
        num_quantizers=2,
        shared_codebook=True,
        learnable_codebook=True,
        ema_update=False,
        in_place_codebook_optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    with pytest.raises(ValueError, match="allow_training_differences"):
        from_reference(ref)
    mine = from_reference(ref, allow_training_differences=True).eval()
    _compare(ref.eval(), mine, torch.randn(2, 5, 8))


def test_unknown_class_raises():
    # the supported classes are the registry's converters, sorted
    supported = (
        "BinaryMapper, FSP, FSQ, GroupedResidualFSQ, GroupedResidualLFQ, GroupedResidualVQ, "
        "HierarchicalVQ, LFQ, LatentQuantize, ResidualFSQ, ResidualLFQ, ResidualSimVQ, ResidualVQ, "
        "SimVQ, VectorQuantize"
    )
    with pytest.raises(ValueError) as err:
        from_reference(torch.nn.Linear(2, 2))
    assert str(err.value) == (
        f"vqcore.compat: no conversion for reference class 'Linear'; supported: {supported}"
    )


# -- layouts: RVQ / GRVQ with image, video and channel-first feature maps ----------------------------------
def _tokens(x):
    """(b, d, *positions) -> the (b, n, d) token sequence the reference's layers quantize."""
    return x.flatten(2).transpose(1, 2)


def _compare_with_sequence_twin(twin, mine, x):
    """``mine`` on the map ``x`` against the sequence-layout reference ``twin`` on its tokens.

    The reference's ResidualVQ bookkeeping (index buffers, projections, the group split) is channel-last
    only, so its forward on a map fails or, for a grouped module, splits the wrong axis; what the layout
    options mean is the reference run position by position, i.e. on the ``(b, n, d)`` tokens.
    """
    with torch.no_grad():
        r = twin(_tokens(x))
        m = mine(x)
    assert m[0].shape == x.shape
    torch.testing.assert_close(_tokens(m[0]), r[0], atol=1e-5, rtol=1e-5)
    assert m[1].dtype == torch.int64
    assert m[1].shape == (*r[1].shape[:-2], *x.shape[2:], r[1].shape[-1])  # ([groups,] b, *positions, Q)
    mismatch = (m[1].reshape(r[1].shape) != r[1]).float().mean().item()
    assert mismatch <= 0.01, mismatch


RVQ_BASE = dict(dim=8, codebook_size=16, num_quantizers=2)
GRVQ_BASE = dict(dim=8, groups=2, codebook_size=16, num_quantizers=2)
FMAP_CASES = {
    "rvq_image": ("ResidualVQ", RVQ_BASE, dict(accept_image_fmap=True), (2, 8, 5, 3)),
    "rvq_image_codebook_dim": (
        "ResidualVQ",
        dict(RVQ_BASE, codebook_dim=4),
        dict(accept_image_fmap=True),
        (2, 8, 5, 3),
    ),
    "rvq_image_shared_kmeans": (
        "ResidualVQ",
        dict(RVQ_BASE, shared_codebook=True, kmeans_init=True, kmeans_iters=3, use_cosine_sim=True),
        dict(accept_image_fmap=True),
        (2, 8, 4, 6),
    ),
    "rvq_video": (
        "ResidualVQ",
        dict(RVQ_BASE, codebook_size=(8, 16)),
        dict(accept_3d_fmap=True),
        (2, 8, 2, 3, 2),
    ),
    "rvq_channel_first": ("ResidualVQ", dict(RVQ_BASE, codebook_dim=4), dict(channel_last=False), (2, 8, 7)),
    "grvq_image": ("GroupedResidualVQ", GRVQ_BASE, dict(accept_image_fmap=True), (2, 8, 5, 3)),
    "grvq_image_codebook_dim": (
        "GroupedResidualVQ",
        dict(GRVQ_BASE, codebook_dim=2, kmeans_init=True, kmeans_iters=2),
        dict(accept_image_fmap=True),
        (2, 8, 3, 5),
    ),
    "grvq_video": ("GroupedResidualVQ", GRVQ_BASE, dict(accept_3d_fmap=True), (2, 8, 2, 2, 3)),
    "grvq_channel_first": ("GroupedResidualVQ", GRVQ_BASE, dict(channel_last=False), (2, 8, 6)),
}


@pytest.mark.parametrize("case", list(FMAP_CASES))
def test_residual_vq_feature_maps(case):
    cls_name, kwargs, layout, shape = FMAP_CASES[case]
    cls = getattr(vqp, cls_name)
    torch.manual_seed(10)
    twin = _train(cls(**kwargs), (4, 32, 8))  # trained on sequences: the map layouts cannot train (below)
    ref = cls(**kwargs, **layout)
    ref.load_state_dict(twin.state_dict())  # the layout options are not state
    ref.eval()
    x = torch.randn(*shape)
    with pytest.raises((RuntimeError, ValueError, AssertionError)):  # the reference's own forward is broken
        with torch.no_grad():
            ref(x)
    mine = from_reference(ref).eval()
    assert type(mine).__name__ == cls_name
    kind, kw = reference_kwargs(ref)
    for key, value in layout.items():
        assert kw[key] == value
    _compare_with_sequence_twin(twin, mine, x)


def test_grouped_residual_vq_image_fmap_trained_by_its_own_forward():
    # with a per-group dim equal to the map's height and width the reference's GRVQ image forward runs
    # (its shape bookkeeping coincides), so such a checkpoint can be trained as a map module
    torch.manual_seed(11)
    ref = vqp.GroupedResidualVQ(**GRVQ_BASE, accept_image_fmap=True, threshold_ema_dead_code=1, decay=0.6)
    _train(ref, (4, 8, 4, 4))
    _check_vq_state_nontrivial(ref.rvqs[1].layers[1])
    mine = from_reference(ref).eval()
    _compare(ref, mine, torch.randn(3, 8, 4, 4))  # the reference's own forward, where it works
    twin = vqp.GroupedResidualVQ(**GRVQ_BASE, threshold_ema_dead_code=1, decay=0.6)
    twin.load_state_dict(ref.state_dict())
    _compare_with_sequence_twin(twin.eval(), mine, torch.randn(2, 8, 5, 3))  # and elsewhere, what it means


def test_load_reference_state_dict_into_prebuilt_image_rvq():
    import vqcore

    torch.manual_seed(12)
    twin = _train(vqp.ResidualVQ(**RVQ_BASE, codebook_dim=4), (4, 32, 8))
    mine = vqcore.ResidualVQ(**RVQ_BASE, codebook_dim=4, accept_image_fmap=True)
    load_reference_state_dict(mine, twin.state_dict())
    _compare_with_sequence_twin(twin, mine.eval(), torch.randn(2, 8, 3, 3))


@pytest.mark.parametrize(
    "layout, shape",
    [(dict(accept_3d_fmap=True), (2, 8, 2, 3, 2)), (dict(channel_last=False), (2, 8, 7))],
    ids=["video", "channel_first"],
)
def test_vector_quantize_layouts(layout, shape):
    torch.manual_seed(13)
    ref = vqp.VectorQuantize(dim=8, codebook_size=16, codebook_dim=4, **layout)
    _train(ref, (2, *shape[1:]))
    mine = from_reference(ref).eval()
    _compare(ref, mine, torch.randn(*shape))


# -- options a trained checkpoint carries ---------------------------------------------------------------
@pytest.mark.parametrize(
    "cls_name, kwargs",
    [
        ("ResidualVQ", dict(dim=8, codebook_size=(8, 16, 32))),
        (
            "ResidualVQ",
            dict(RVQ_BASE, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1, decay=0.5),
        ),
        (
            "ResidualVQ",
            dict(RVQ_BASE, stochastic_sample_codes=True, sample_codebook_temp=0.5, quantize_dropout=True),
        ),
        ("ResidualVQ", dict(RVQ_BASE, orthogonal_reg_weight=0.5, rotation_trick=False)),
        ("GroupedResidualVQ", dict(dim=8, groups=2, codebook_size=(8, 16), codebook_dim=2)),
        (
            "VectorQuantize",
            dict(dim=8, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=0.5),
        ),
        (
            "VectorQuantize",
            dict(dim=8, codebook_size=16, heads=2, codebook_dim=3, use_cosine_sim=True, kmeans_init=True),
        ),
    ],
    ids=[
        "rvq_sizes",
        "rvq_kmeans_dead",
        "rvq_stochastic_dropout",
        "rvq_orthogonal",
        "grvq_sizes",
        "vq_stochastic",
        "vq_heads_cosine_kmeans",
    ],
)
def test_more_trained_options(cls_name, kwargs):
    torch.manual_seed(14)
    ref = _train(getattr(vqp, cls_name)(**kwargs), (4, 32, 8))
    mine = from_reference(ref).eval()
    _compare(ref, mine, torch.randn(3, 20, 8))


def test_options_are_mapped():
    _, kw = reference_kwargs(vqp.VectorQuantize(dim=8, codebook_size=16))
    assert kw["rotation_trick"] is True  # the reference's default estimator, kept
    assert kw["sync_codebook"] is None and kw["stochastic_sample_codes"] is False
    ref = vqp.VectorQuantize(
        dim=8,
        codebook_size=16,
        sync_codebook=True,
        sync_kmeans=False,
        rotation_trick=False,
        stochastic_sample_codes=True,
        sample_codebook_temp=0.3,
    )
    _, kw = reference_kwargs(ref)
    assert kw["sync_codebook"] is True and kw["sync_kmeans"] is False and kw["rotation_trick"] is False
    assert kw["stochastic_sample_codes"] is True and kw["sample_codebook_temp"] == 0.3
    mine = from_reference(ref)
    assert (
        mine.sync_codebook is True
        and mine.codebook_module.sync_kmeans is False
        and mine.stochastic_sample_codes
    )
    _, kw = reference_kwargs(vqp.ResidualVQ(**RVQ_BASE, sync_codebook=True, rotation_trick=False))
    assert kw["sync_codebook"] is True and kw["rotation_trick"] is False


def test_uninitialised_kmeans_codebook_is_not_copied():
    ref = vqp.VectorQuantize(dim=8, codebook_size=16, kmeans_init=True)  # zeros until it sees a batch
    mine = from_reference(ref)
    book = mine._codebook
    assert not bool(book.initted) and book.kmeans_init
    assert book.embed.abs().sum(-1).min() > 0  # vqcore's placeholders, never zero codes
    torch.manual_seed(15)
    mine.train()(torch.randn(2, 32, 8))
    assert bool(book.initted)


def test_rvq_kmeans_state_is_per_layer():
    torch.manual_seed(16)
    ref = vqp.ResidualVQ(**RVQ_BASE, kmeans_init=True, kmeans_iters=2)
    ref.layers[0].train()(torch.randn(2, 32, 8))  # only the first layer has run k-means
    kind, kw = reference_kwargs(ref)
    assert kw["kmeans_init"] is True  # the second layer still has to run it
    mine = from_reference(ref)
    torch.testing.assert_close(mine.layers[0]._codebook.embed, ref.layers[0]._codebook.embed)
    assert bool(mine.layers[0]._codebook.initted) and not bool(mine.layers[1]._codebook.initted)
    assert mine.layers[1]._codebook.embed.abs().sum(-1).min() > 0
    mine.train()(torch.randn(2, 32, 8))
    assert bool(mine.layers[1]._codebook.initted)


def test_fsq_scale_is_ignored_like_the_reference():
    torch.manual_seed(17)
    ref = vqp.FSQ(levels=[5, 3], dim=4, scale=2.0)
    mine = from_reference(ref).eval()
    _compare(ref.eval(), mine, torch.randn(2, 9, 4))


@pytest.mark.parametrize("optimize_values", [True, False])
def test_latent_quantize_channel_first_sequence(optimize_values):
    torch.manual_seed(18)
    ref = vqp.LatentQuantize(levels=[5, 4], dim=6, optimize_values=optimize_values).eval()
    mine = from_reference(ref).eval()
    assert mine.channel_first is True and mine.optimize_values is optimize_values
    _compare(ref, mine, torch.randn(2, 6, 7))  # the reference reads (b, dim, n): so must the conversion


@pytest.mark.parametrize(
    "make, match, x",
    [
        (
            lambda: vqp.LFQ(codebook_size=16, force_quantization_f32=False),
            "force_quantization_f32",
            (2, 5, 4),
        ),
    ],
    ids=[
        "lfq_f32",
    ],
)
def test_training_only_options_need_opt_in(make, match, x):
    ref = make()
    with pytest.raises(ValueError, match=match) as err:
        from_reference(ref)
    assert "allow_training_differences" in str(err.value)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mine = from_reference(ref, allow_training_differences=True).eval()
    _compare(ref.eval(), mine, torch.randn(*x))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: vqp.LatentQuantize(levels=[5, 3], dim=4, codebook_dim=4), "codebook_dim"),
    ],
    ids=["latent_codebook_dim"],
)
def test_more_unsupported_options_raise(make, match):
    with pytest.raises(ValueError, match=match):
        from_reference(make())


def test_learnable_codebook_converts_to_a_gradient_trained_codebook():
    ref = _train(
        vqp.VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False), (2, 32, 8)
    )
    mine = from_reference(ref)
    assert mine.codebook_module.trained_by_gradient
    assert isinstance(mine._codebook.embed, torch.nn.Parameter)
    _compare(ref, mine, torch.randn(2, 20, 8))
    # training continues by gradient: the commitment term reaches the codes
    mine.train()
    _, _, loss = mine(torch.randn(2, 20, 8))
    (grad,) = torch.autograd.grad(loss, mine._codebook.embed)
    assert grad.abs().sum() > 0


# -- Gumbel straight-through ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls_name, kwargs", [("VectorQuantize", dict(dim=8, codebook_size=16)), ("ResidualVQ", RVQ_BASE)]
)
def test_gumbel_straight_through_converts_to_the_straight_through_estimator(cls_name, kwargs):
    # the reference's codebook returns the soft assignment's output, but its forward replaces it by
    # x + sg(q - x): the gradient reaching its input is the identity per layer, vqcore's straight-through
    torch.manual_seed(19)
    options = dict(kwargs, straight_through=True, rotation_trick=False, sample_codebook_temp=0.5)
    ref = _train(getattr(vqp, cls_name)(**options), (4, 32, 8))
    _, kw = reference_kwargs(ref)  # no allow_training_differences needed
    assert kw["rotation_trick"] is False and "straight_through" not in kw
    mine = from_reference(ref)
    layers = list(mine.layers) if cls_name == "ResidualVQ" else [mine]
    assert [layer.estimator.name for layer in layers] == ["straight_through"] * len(layers)
    _compare(ref, mine, torch.randn(3, 20, 8))

    x, weight = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    outputs, grads = [], []
    for module in (ref, mine):
        xg = x.clone().requires_grad_()
        out = module.train()(xg)
        (out[0] * weight).sum().backward()
        outputs.append(out)
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], weight * len(layers))  # the identity, once per layer
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs[1][1], outputs[0][1].long())


# -- the driver and the registry ----------------------------------------------------------------------
def test_compat_imports_no_plugin_module():
    import ast
    from pathlib import Path

    import vqcore.compat

    imported = []
    for path in Path(vqcore.compat.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported.append(node.module or "")
    assert imported and not [
        name for name in imported if name == "vqcore" or name.startswith("vqcore.plugins")
    ]


def test_converters_are_registered_under_the_reference_class_names():
    from vqcore.registry import get_registry

    entries = get_registry().entries("converter")
    assert {e.name: e.plugin for e in entries} == {
        "VectorQuantize": "vqcore.plugins.reference_vq",
        "ResidualVQ": "vqcore.plugins.reference_vq",
        "GroupedResidualVQ": "vqcore.plugins.reference_vq",
        "FSQ": "vqcore.plugins.reference_scalar",
        "ResidualFSQ": "vqcore.plugins.reference_scalar",
        "GroupedResidualFSQ": "vqcore.plugins.reference_scalar",
        "LFQ": "vqcore.plugins.reference_scalar",
        "ResidualLFQ": "vqcore.plugins.reference_scalar",
        "GroupedResidualLFQ": "vqcore.plugins.reference_scalar",
        "LatentQuantize": "vqcore.plugins.reference_scalar",
        "FSP": "vqcore.plugins.reference_scalar",
        "BinaryMapper": "vqcore.plugins.reference_scalar",
        "SimVQ": "vqcore.plugins.sim_vq",
        "ResidualSimVQ": "vqcore.plugins.residual_sim_vq",
        "HierarchicalVQ": "vqcore.plugins.hierarchical_vq",
    }
    # each builds the quantizer registered under the same class name (an alias of the canonical name)
    for entry in entries:
        converter = converter_for(entry.name)
        assert vqcore.get_entry(converter.quantizer).factory.__name__ == entry.name


def test_shared_codebook_state_is_mapped_layer_by_layer():
    torch.manual_seed(21)
    ref = _train(vqp.ResidualVQ(**RVQ_BASE, shared_codebook=True), (4, 32, 8))
    mine = from_reference(ref)
    assert mine.layers[0].codebook_module is mine.layers[1].codebook_module
    state = converter_for("ResidualVQ").state_dict(mine, ref.state_dict())
    names = ("embed", "cluster_size", "embed_avg", "initted")
    assert set(state) == {f"layers.{q}._codebook.{name}" for q in range(2) for name in names}
    torch.testing.assert_close(mine.layers[1].codebook_module.codes, ref.layers[1]._codebook.embed)


def test_load_reference_state_dict_errors():
    with pytest.raises(ValueError, match="no reference mapping for vqcore class 'Linear'"):
        load_reference_state_dict(torch.nn.Linear(2, 2), {})
    rpq = vqcore.create("rpq", dim=8, codebook_size=16, codebook_dim=4)  # registered, without a converter
    with pytest.raises(ValueError, match="no reference mapping for vqcore class 'RandomProjectionQuantizer'"):
        load_reference_state_dict(rpq, {})
    vq = vqcore.VectorQuantize(dim=8, codebook_size=16)
    with pytest.raises(ValueError) as err:
        load_reference_state_dict(vq, {})
    assert str(err.value) == (
        "vqcore.compat: the reference state_dict has no key '_codebook.initted' needed by VectorQuantize"
    )
    with pytest.raises(ValueError, match="the converter for reference 'FSQ' builds 'FSQ', not 'vq'"):
        load_reference_state_dict(vq, {}, reference="FSQ")


class MySimVQConverter:
    """A third-party converter: a subclass of the reference's SimVQ (codes = code_transform(frozen_codebook),
    a linear map trained by gradient) as a vqcore VectorQuantize whose gradient-trained codebook holds
    those codes."""

    quantizer = "vq"

    def kwargs(self, ref, allow_training_differences=False):
        if not allow_training_differences:
            raise ValueError("SimVQ trains a map of a frozen codebook: pass allow_training_differences=True")
        return dict(
            dim=int(ref.codebook.shape[-1]),
            codebook_size=int(ref.codebook_size),
            learnable_codebook=True,
            rotation_trick=bool(ref.rotation_trick),
        )

    def state_dict(self, module, ref_state_dict):
        state = module.state_dict()
        codes = ref_state_dict["frozen_codebook"] @ ref_state_dict["code_transform.weight"].T
        state["_codebook.embed"] = codes.unsqueeze(0)
        return state


class SimVQConverterPlugin:
    @vqcore.hookimpl
    def register_converters(self, register):
        register("MySimVQ", MySimVQConverter, summary="MySimVQ as a VectorQuantize with its implicit codes")


def test_a_plugin_registers_a_converter_at_run_time(fresh_registry):
    vqcore.register_plugin(SimVQConverterPlugin(), name="simvq-converter")
    torch.manual_seed(20)
    # vqcore converts the reference's SimVQ itself; a project's subclass is another reference class
    my_sim_vq = type("MySimVQ", (vqp.SimVQ,), {})
    ref = _train(my_sim_vq(dim=8, codebook_size=16), (2, 32, 8))
    with pytest.raises(ValueError, match="allow_training_differences"):
        from_reference(ref)
    assert reference_kwargs(ref, allow_training_differences=True)[0] == "vq"
    mine = from_reference(ref, allow_training_differences=True)
    assert mine.config["name"] == "vq" and mine.codebook_module.trained_by_gradient
    assert not mine.training
    _compare(ref, mine, torch.randn(3, 20, 8))
    with pytest.raises(
        ValueError, match="supported: BinaryMapper, FSP, FSQ, .*, MySimVQ, .*, VectorQuantize$"
    ):
        from_reference(torch.nn.Linear(2, 2))

    # two reference classes now convert to "vq": a prebuilt module needs to be told which one
    prebuilt = vqcore.create("vq", dim=8, codebook_size=16, learnable_codebook=True)
    with pytest.raises(
        ValueError, match=r"several reference classes convert to 'vq' \(MySimVQ, VectorQuantize\)"
    ):
        load_reference_state_dict(prebuilt, ref.state_dict())
    load_reference_state_dict(prebuilt, ref.state_dict(), reference="MySimVQ")
    _compare(ref, prebuilt.eval(), torch.randn(3, 20, 8))


def test_a_converter_must_follow_the_protocol(fresh_registry):
    class NoStateDict:
        quantizer = "vq"

        def kwargs(self, ref, allow_training_differences=False):
            return dict(dim=2, codebook_size=4)

    class Plugin:
        @vqcore.hookimpl
        def register_converters(self, register):
            register("Linear", NoStateDict)

    vqcore.register_plugin(Plugin(), name="broken-converter")
    with pytest.raises(TypeError) as err:
        from_reference(torch.nn.Linear(2, 2))
    assert str(err.value) == (
        "converter 'Linear' (plugin 'broken-converter') built NoStateDict, which does not follow "
        "vqcore.protocols.ReferenceConverter: missing state_dict"
    )
