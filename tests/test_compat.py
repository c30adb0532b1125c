"""vqcore.compat: vector-quantize-pytorch 1.32.0 modules, trained a few steps, migrate to vqcore."""

from __future__ import annotations

import warnings

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch")

from vqcore.compat import from_reference, load_reference_state_dict, reference_kwargs  # noqa: E402

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
    ref = _train(vqp.VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True), (4, 32, 8))
    # vqcore's codebook_dim default (dim // heads) differs from the reference's (dim): pass it explicitly
    mine = vqcore.VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, codebook_dim=8)
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


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: vqp.VectorQuantize(
            dim=8, codebook_size=16, directional_reparam=True, rotation_trick=False, threshold_ema_dead_code=1
        ), "directional_reparam"),
        (lambda: vqp.VectorQuantize(dim=8, codebook_size=16, affine_param=True), "affine_param"),
        (lambda: vqp.FSQ(levels=[5, 3], orthogonal_rotation=True), "orthogonal_rotation"),
        (lambda: vqp.LFQ(codebook_size=16, spherical=True), "spherical"),
    ],
    ids=["directional_reparam", "affine_param", "fsq_rotation", "lfq_spherical"],
)
def test_unsupported_option_raises(make, match):
    with pytest.raises(ValueError, match=match):
        from_reference(make())


def test_training_only_option_needs_opt_in():
    ref = vqp.VectorQuantize(dim=8, codebook_size=16, codebook_diversity_loss_weight=0.5)
    with pytest.raises(ValueError, match="allow_training_differences"):
        from_reference(ref)
    mine = from_reference(ref, allow_training_differences=True).eval()
    _compare(ref.eval(), mine, torch.randn(2, 5, 8))


def test_unknown_class_raises():
    with pytest.raises(ValueError, match="no conversion"):
        from_reference(torch.nn.Linear(2, 2))
