"""The example plugin's own tests: what every plugin author should run (vqcore's conformance kit)."""

from __future__ import annotations

import pytest
import torch

import vqcore
from vqcore.protocols import Codebook, Loss
from vqcore.testing import check_quantizer
from vqcore_plugin_example import CodebookFitLoss, LinearReparamCodebook, SimVQ


@pytest.mark.parametrize(
    "shape, dynamic_dims",
    [((2, 16, 32), None), ((3, 32), None), ((2, 5, 4, 32), (0, 1, 2))],
    ids=["sequence", "vectors", "grid"],
)
def test_simvq_passes_the_conformance_kit(shape, dynamic_dims):
    report = check_quantizer(SimVQ, torch.randn(shape), dynamic_dims=dynamic_dims, dim=32, codebook_size=64)
    assert len(report.checks) == 5  # protocol, training, eval, state_dict, torch.export


def test_registered_through_the_entry_point():
    # the plugin is found by installation alone: no import of vqcore_plugin_example by the user
    assert vqcore.get_entry("simvq").plugin == "vqcore-plugin-example"
    assert vqcore.get_entry("simvq", kind="codebook").factory is LinearReparamCodebook
    assert vqcore.get_entry("codebook_fit", kind="loss").factory is CodebookFitLoss
    check_quantizer("simvq", torch.randn(2, 8, 16), dim=16, codebook_size=32, check_export=False)


def test_codebook_and_loss_follow_the_protocols():
    book = LinearReparamCodebook(size=10, dim=4)
    assert isinstance(book, Codebook) and book.codes.shape == (1, 10, 4)
    assert torch.equal(book.codes, book.basis)  # W starts as the identity
    idx = book.nearest(book.codes[:, [3, 7]].detach())
    assert idx.tolist() == [[3, 7]] and idx.dtype == torch.int64
    assert torch.equal(book.lookup(idx), book.codes[:, [3, 7]])
    q = SimVQ(dim=4, codebook_size=10).eval()
    assert torch.equal(q.decode(torch.tensor([[-1, 2]]))[0, 0], torch.zeros(4))  # -1 decodes to zeros
    loss = CodebookFitLoss()
    assert isinstance(loss, Loss)
    x, codes = torch.randn(1, 5, 4), book.lookup(idx.repeat(1, 3)[:, :5])
    valid = torch.tensor([[True, True, False, True, False]])
    torch.testing.assert_close(loss(x, codes, None, book, valid), (x - codes)[valid].pow(2).mean().reshape(1))


def test_training_moves_the_whole_codebook_through_w():
    torch.manual_seed(0)
    q = SimVQ(dim=8, codebook_size=32)
    basis = q.codebook.basis.clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    x = torch.randn(64, 8) * 3
    first = None
    for _ in range(30):
        out = q(x.requires_grad_(False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = out.loss.item() if first is None else first
    assert out.loss.item() < first  # the codes moved towards the data
    assert torch.equal(q.codebook.basis, basis)  # C is frozen: only W learned
    assert list(dict(q.named_parameters())) == ["codebook.weight"]


def test_onnx_export_through_the_protocol(tmp_path):
    pytest.importorskip("onnxruntime")
    from vqcore.export import read_metadata, to_onnx

    q = vqcore.create("simvq", dim=16, codebook_size=32).eval()
    example = torch.randn(2, 8, 16)
    result = to_onnx(q, tmp_path / "simvq_encode.onnx", graph="encode", example=example)
    assert result.metadata["parity"]["ok"]
    assert read_metadata(tmp_path / "simvq_encode.onnx")["method"] == "simvq"


@pytest.mark.parametrize("quantizer", ["vq", "rvq", "rvq_shared"])
def test_the_codebook_plugs_into_vqcores_own_quantizers(quantizer, tmp_path):
    """The plugin's codebook, by its registered name, in the built-in VectorQuantize and ResidualVQ:
    trained by gradient (the commitment term reaches W), saved and loaded, exported to ONNX."""
    kwargs = {
        "vq": dict(dim=16, codebook_size=32, codebook="simvq"),
        "rvq": dict(dim=16, num_quantizers=2, codebook_size=32, codebook="simvq"),
        "rvq_shared": dict(
            dim=16, num_quantizers=2, codebook_size=32, codebook="simvq", shared_codebook=True
        ),
    }[quantizer]
    torch.manual_seed(0)
    q = vqcore.create(quantizer.split("_")[0], **kwargs).train()
    books = {id(m) for m in q.modules() if isinstance(m, LinearReparamCodebook)}
    assert len(books) == (1 if quantizer != "rvq" else 2)
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    x = torch.randn(4, 32, 16) * 2
    losses = []
    for _ in range(25):
        out = q(x)
        loss = out[2].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # the codes (through W) moved towards the data
    for book in (m for m in q.modules() if isinstance(m, LinearReparamCodebook)):
        assert not torch.allclose(book.weight, torch.eye(16))  # W learned; C stayed frozen
    path = tmp_path / "q.safetensors"
    vqcore.save(q, path)
    loaded = vqcore.load(path)
    assert torch.equal(loaded.encode(x), q.eval().encode(x))
    pytest.importorskip("onnxruntime")
    from vqcore.export import to_onnx

    result = to_onnx(loaded, tmp_path / "encode.onnx", graph="encode", example=x[:2, :8])
    assert result.metadata["parity"]["ok"]
