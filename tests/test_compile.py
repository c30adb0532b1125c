"""torch.compile: the eval / encode / decode paths of every built-in method, and the
training forward of every method, trace as one graph (torch._dynamo.explain: no breaks), but for the
options README "torch.compile" lists (k-means until initialised, dead-code expiry, quantize dropout)."""

from __future__ import annotations

import pytest
import torch

import vqcore
from vqcore.blocks.codebooks import EMACodebook

CASES = {
    "vq": lambda: vqcore.VectorQuantize(dim=8, codebook_size=16),
    "vq_heads_cosine_projection": lambda: vqcore.VectorQuantize(
        dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, use_cosine_sim=True, codebook_dim=3
    ),
    "rvq": lambda: vqcore.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, codebook_dim=4),
    "rvq_shared": lambda: vqcore.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, shared_codebook=True),
    "grvq": lambda: vqcore.GroupedResidualVQ(dim=8, groups=2, codebook_size=16, num_quantizers=2),
    "rpq": lambda: vqcore.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4),
    "fsq": lambda: vqcore.FSQ(levels=[5, 3], dim=8),
    "residual_fsq": lambda: vqcore.ResidualFSQ(levels=[5, 3], num_quantizers=2, dim=8),
    "lfq": lambda: vqcore.LFQ(dim=8, codebook_size=16),
    "residual_lfq": lambda: vqcore.ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2),
    "latent": lambda: vqcore.LatentQuantize(levels=[5, 3], dim=8),
}


def _breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [str(r.reason) for r in explanation.break_reasons]


@pytest.mark.parametrize("name", list(CASES))
def test_inference_paths_have_no_graph_breaks(name):
    torch.manual_seed(0)
    module = CASES[name]().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        indices = module.encode(x)
        for path, args in (("encode", (x,)), ("decode", (indices,)), ("forward", (x,))):
            fn = module if path == "forward" else getattr(module, path)
            count, reasons = _breaks(fn, *args)
            assert count == 0, (path, reasons)


@pytest.mark.parametrize("name", ["fsq", "lfq", "latent"])
def test_training_forward_has_no_graph_breaks(name):
    torch.manual_seed(0)
    module = CASES[name]().train()
    x = torch.randn(2, 5, 8, requires_grad=True)
    count, reasons = _breaks(module, x)
    assert count == 0, reasons


def test_compiled_encode_decode_match_eager():
    torch.manual_seed(0)
    module = CASES["vq"]().eval()
    x = torch.randn(2, 5, 8)
    torch._dynamo.reset()
    encode = torch.compile(module.encode, fullgraph=True, backend="eager")
    decode = torch.compile(module.decode, fullgraph=True, backend="eager")
    with torch.no_grad():
        indices = encode(x)
        assert torch.equal(indices, module.encode(x))
        assert torch.equal(decode(indices), module.decode(indices))


# -- training forward of the VQ family (README "torch.compile": the documented breaks) ----------------
TRAINING_CASES = {
    "vq": lambda: vqcore.VectorQuantize(dim=8, codebook_size=16),
    "vq_heads_cosine_projection": CASES["vq_heads_cosine_projection"],
    "vq_rotation_trick": lambda: vqcore.VectorQuantize(dim=8, codebook_size=16, rotation_trick=True),
    "vq_gumbel": lambda: vqcore.VectorQuantize(
        dim=8, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=0.5
    ),
    "vq_orthogonal": lambda: vqcore.VectorQuantize(dim=8, codebook_size=16, orthogonal_reg_weight=1.0),
    "vq_learnable": lambda: vqcore.VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True),
    "rvq": CASES["rvq"],
    "rvq_shared": CASES["rvq_shared"],
    "grvq": CASES["grvq"],
    "rvq_image": lambda: vqcore.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, accept_image_fmap=True),
    "residual_fsq": CASES["residual_fsq"],
    "residual_lfq": CASES["residual_lfq"],
}


def _explain_places(fn, *args, **kwargs):
    """(graph break count, [(reason, "file.py:line" of the innermost frame)]).

    One host read inside nested calls splits every frame on the stack, so the count can exceed the
    number of distinct places that caused it; the tests below assert on the places.
    """
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    places = [
        (str(r.reason), f"{r.user_stack[-1].filename.rsplit('/', 1)[-1]}:{r.user_stack[-1].lineno}")
        for r in explanation.break_reasons
    ]
    return explanation.graph_break_count, places


@pytest.mark.parametrize("name", list(TRAINING_CASES))
def test_vq_family_training_forward_has_no_graph_breaks(name):
    torch.manual_seed(0)
    module = TRAINING_CASES[name]().train()
    shape = (2, 8, 3, 3) if name == "rvq_image" else (2, 5, 8)
    x = torch.randn(*shape, requires_grad=True)
    count, places = _explain_places(module, x)
    assert count == 0, places


def test_masked_training_forward_has_no_graph_breaks():
    torch.manual_seed(0)
    vq = vqcore.VectorQuantize(dim=8, codebook_size=16).train()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    count, places = _explain_places(vq, torch.randn(2, 5, 8), mask=mask)
    assert count == 0, places


@pytest.mark.parametrize("cls", ["vq", "rvq"])
def test_kmeans_init_breaks_only_until_initialised(cls):
    torch.manual_seed(0)
    kw = dict(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=2)
    module = (
        vqcore.VectorQuantize(**kw) if cls == "vq" else vqcore.ResidualVQ(num_quantizers=2, **kw)
    ).train()
    first, _ = _explain_places(module, torch.randn(2, 20, 8))
    assert first > 0  # k-means reads data-dependent sizes on the host
    second, places = _explain_places(module, torch.randn(2, 20, 8))
    assert second == 0, places

    # a freshly built module loading an initialised state: no k-means, no break
    twin = (vqcore.VectorQuantize(**kw) if cls == "vq" else vqcore.ResidualVQ(num_quantizers=2, **kw)).train()
    twin.load_state_dict(module.state_dict())
    count, places = _explain_places(twin, torch.randn(2, 20, 8))
    assert count == 0, places
    # and loading an uninitialised state brings k-means back (the host-side flag is cleared on load)
    fresh = (
        vqcore.VectorQuantize(**kw) if cls == "vq" else vqcore.ResidualVQ(num_quantizers=2, **kw)
    ).train()
    module.load_state_dict(fresh.state_dict())
    books = [m for m in module.modules() if isinstance(m, EMACodebook)]
    assert len(books) == (1 if cls == "vq" else 2)
    assert all(b.needs_init() for b in books)
    module(torch.randn(2, 20, 8))
    assert not any(b.needs_init() for b in books) and all(bool(b.initted) for b in books)


def test_dead_code_expiry_breaks_at_one_place():
    torch.manual_seed(0)
    vq = vqcore.VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=0.5).train()
    vq.codebook_module.cluster_size.fill_(10.0)  # nothing expires this step: only the host-side check breaks
    _, places = _explain_places(vq, torch.randn(2, 5, 8))
    sites = {place for _, place in places}
    assert len(sites) == 1 and sites.pop().startswith("codebooks.py"), places


def test_quantize_dropout_breaks_at_one_place():
    torch.manual_seed(0)
    rvq = vqcore.ResidualVQ(dim=8, codebook_size=16, num_quantizers=3, quantize_dropout=True).train()
    _, places = _explain_places(rvq, torch.randn(2, 5, 8))
    sites = {place for _, place in places}
    assert len(sites) == 1 and sites.pop().startswith("residual.py"), places


def test_compiled_training_steps_match_eager():
    """A compiled (fullgraph) training step mutates the EMA buffers exactly as the eager step does."""
    torch.manual_seed(0)
    eager = vqcore.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, codebook_dim=4).train()
    twin = vqcore.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, codebook_dim=4).train()
    twin.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(2, 7, 8, requires_grad=True)
        want_q, want_idx, want_loss = eager(x)
        got_q, got_idx, got_loss = compiled(x)
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got_q, want_q)
        torch.testing.assert_close(got_loss, want_loss)
        (grad,) = torch.autograd.grad(got_q.sum() + got_loss.sum(), x)
        (want_grad,) = torch.autograd.grad(want_q.sum() + want_loss.sum(), x)
        torch.testing.assert_close(grad, want_grad)
    for (name, got), (_, want) in zip(twin.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(got, want, msg=name)
