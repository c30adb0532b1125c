"""The example plugin's own tests: what every plugin author should run (vqcore's conformance kit)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vqcore
from vqcore.protocols import Codebook, Loss
from vqcore.testing import check_quantizer
from vqcore_plugin_example import DirectionCodebook, DirectionLoss, GainShapeVQ


@pytest.mark.parametrize(
    "shape, dynamic_dims",
    [((2, 16, 32), None), ((3, 32), None), ((2, 5, 4, 32), (0, 1, 2))],
    ids=["sequence", "vectors", "grid"],
)
def test_gain_shape_vq_passes_the_conformance_kit(shape, dynamic_dims):
    report = check_quantizer(
        GainShapeVQ, torch.randn(shape), dynamic_dims=dynamic_dims, dim=32, codebook_size=64
    )
    assert len(report.checks) == 6  # protocol, training, eval, book layout, state_dict, torch.export


def test_registered_through_the_entry_point():
    # the plugin is found by installation alone: no import of vqcore_plugin_example by the user
    assert vqcore.get_entry("gain_shape_vq").plugin == "vqcore-plugin-example"
    assert vqcore.get_entry("unit_direction", kind="codebook").factory is DirectionCodebook
    assert vqcore.get_entry("direction_commitment", kind="loss").factory is DirectionLoss
    check_quantizer("gain_shape_vq", torch.randn(2, 8, 16), dim=16, codebook_size=32, check_export=False)


def test_codes_are_a_gain_times_a_unit_direction():
    torch.manual_seed(0)
    q = GainShapeVQ(dim=3, codebook_size=2, gain_levels=3, gain_min=1.0, gain_max=4.0).eval()
    assert torch.allclose(q.gains, torch.tensor([1.0, 2.0, 4.0]))
    with torch.no_grad():
        q.shapes.embed.copy_(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]]))
    x = torch.tensor([[3.2, 0.1, 0.0], [0.0, 0.3, 0.4], [0.0, -6.0, -8.0]])
    indices = q.encode(x)
    # shape 0, best gain x.s = 3.2 -> level 4 (index 2); shape 1, x.s = 0.5 -> level 1 (index 0);
    # (0, -6, -8) has a negative dot product with both: shape 0 (0 > -10), gain x.s = 0 -> level 1
    assert indices.tolist() == [0 * 3 + 2, 1 * 3 + 0, 0 * 3 + 0]
    assert q.codebook_size == 6 and indices.dtype == torch.int64
    expected = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.6, 0.8], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(q.decode(indices), expected)  # the grid is logspace's: 4 up to rounding
    assert torch.equal(q(x).quantized, q.decode(indices))
    assert torch.equal(q.decode(torch.tensor([-1, 5]))[0], torch.zeros(3))  # -1 decodes to zeros


def test_codebook_and_loss_follow_the_protocols():
    book = DirectionCodebook(size=10, dim=4)
    assert isinstance(book, Codebook) and book.codes.shape == (1, 10, 4)
    torch.testing.assert_close(book.codes.norm(dim=-1), torch.ones(1, 10))
    idx = book.nearest(3 * book.codes[:, [3, 7]])  # the largest dot product, whatever the length
    assert idx.tolist() == [[3, 7]] and idx.dtype == torch.int64
    assert torch.equal(book.lookup(idx), book.codes[:, [3, 7]])
    loss = DirectionLoss()
    assert isinstance(loss, Loss)
    x, codes = torch.randn(1, 5, 4), 2 * book.lookup(torch.tensor([[0, 1, 2, 3, 4]]))
    valid = torch.tensor([[True, True, False, True, False]])
    expected = (F.normalize(x, dim=-1) - codes / 2)[valid].pow(2).mean().reshape(1)
    torch.testing.assert_close(loss(x, codes, None, book, valid), expected)


def test_ema_step_moves_each_used_direction_to_its_inputs():
    book = DirectionCodebook(size=3, dim=2, decay=0.5)
    before = book.embed.clone()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    book.train_step_(x, torch.tensor([[0, 0, 2]]))
    # code 0: sum (1, 1) * 0.5, normalised; code 2: (0.6, 0.8); code 1 unused: unchanged
    torch.testing.assert_close(book.embed[0, 0], torch.tensor([1.0, 1.0]) / 2**0.5)
    torch.testing.assert_close(book.embed[0, 2], torch.tensor([0.6, 0.8]))
    assert torch.equal(book.embed[0, 1], before[0, 1])
    assert book.cluster_size.tolist() == [[1.0, 0.0, 0.5]]


def test_training_fits_the_directions_to_the_data():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 8), dim=-1)
    x = centres.repeat(64, 1) * torch.rand(256, 1).mul(5).add(0.5) + 0.01 * torch.randn(256, 8)
    q = GainShapeVQ(dim=8, codebook_size=16, gain_levels=32)
    first = q.eval()(x, return_loss_breakdown=True)
    q.train()
    for _ in range(10):
        q(x)
    last = q.eval()
    error = (last(x).quantized - x).pow(2).mean()
    before = (first.quantized - x).pow(2).mean()
    assert error < 0.5 * before  # the directions moved to the data's directions


def test_onnx_export_through_the_protocol(tmp_path):
    pytest.importorskip("onnxruntime")
    from vqcore.export import read_metadata, to_onnx

    q = vqcore.create("gain_shape_vq", dim=16, codebook_size=32).eval()
    example = torch.randn(2, 8, 16)
    result = to_onnx(q, tmp_path / "gain_shape_encode.onnx", graph="encode", example=example)
    assert result.metadata["parity"]["ok"]
    assert read_metadata(tmp_path / "gain_shape_encode.onnx")["method"] == "gain_shape_vq"


@pytest.mark.parametrize("quantizer", ["vq", "rvq"])
def test_the_codebook_plugs_into_vqcores_own_quantizers(quantizer, tmp_path):
    """The plugin's codebook, by its registered name, in the built-in VectorQuantize and ResidualVQ: a
    cosine codebook trained by its own EMA step, saved and loaded, exported to ONNX."""
    kwargs = {
        "vq": dict(dim=16, codebook_size=32, codebook="unit_direction"),
        "rvq": dict(dim=16, num_quantizers=2, codebook_size=32, codebook="unit_direction"),
    }[quantizer]
    torch.manual_seed(0)
    q = vqcore.create(quantizer, **kwargs).train()
    books = [m for m in q.modules() if isinstance(m, DirectionCodebook)]
    assert len(books) == (1 if quantizer == "vq" else 2)
    before = [book.embed.clone() for book in books]
    x = torch.randn(4, 32, 16)
    q(x)
    assert all(not torch.equal(book.embed, b) for book, b in zip(books, before))  # the EMA step ran
    path = tmp_path / "q.safetensors"
    vqcore.save(q, path)
    loaded = vqcore.load(path)
    assert torch.equal(loaded.encode(x), q.eval().encode(x))
    pytest.importorskip("onnxruntime")
    from vqcore.export import to_onnx

    result = to_onnx(loaded, tmp_path / "encode.onnx", graph="encode", example=x[:2, :8])
    assert result.metadata["parity"]["ok"]
