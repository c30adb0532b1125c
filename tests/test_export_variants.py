"""Export variants for production and edge: int32 index graphs, float16 graphs, the fused quantize graph,
frozen TorchScript, staged writes, ExecuTorch programs, and the CLI's options for them."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import vqcore
from vqcore.export import (
    ParityError,
    PrecisionMeter,
    read_metadata,
    to_onnx,
    to_pt2,
    to_torchscript,
)
from vqcore.export import writers as writers_mod

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

WRITERS = {"onnx": to_onnx, "torchscript": to_torchscript, "pt2": to_pt2}
EXTENSIONS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}


def _trained(name: str, **kwargs):
    torch.manual_seed(0)
    q = vqcore.create(name, **kwargs)
    x = torch.randn(2, 16, q.dim, generator=torch.Generator().manual_seed(0))
    q.train()
    with torch.no_grad():
        q(x)
    return q.eval(), x


def _run(path, x):
    """The artifact at ``path`` on ``x``, in its own runtime: a tuple of tensors."""
    path = str(path)
    if path.endswith(".onnx"):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        return tuple(torch.from_numpy(o) for o in outs)
    module = torch.jit.load(path) if path.endswith(".pt") else torch.export.load(path).module()
    out = module(x)
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


# -- int32 indices ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, graph, fmt",
    [
        ("vq", dict(dim=8, codebook_size=16), "encode", "onnx"),
        ("rvq", dict(dim=8, codebook_size=16, num_quantizers=2), "decode", "onnx"),
        ("fsq", dict(levels=[3, 5, 4], dim=8), "quantize", "onnx"),
        ("lfq", dict(dim=8, codebook_size=16), "encode", "torchscript"),
        ("residual_fsq", dict(dim=8, levels=[3, 5], num_quantizers=2), "decode", "torchscript"),
        ("vq", dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True), "quantize", "pt2"),
    ],
)
def test_int32_graphs_carry_the_int64_values(name, kwargs, graph, fmt, tmp_path):
    q, x = _trained(name, **kwargs)
    with torch.no_grad():
        indices = q.encode(x)
        vectors = q(x)[0]
    example = indices if graph == "decode" else x
    path = tmp_path / f"a{EXTENSIONS[fmt]}"
    result = WRITERS[fmt](q, path, graph=graph, example=example, index_dtype=torch.int32)
    meta = read_metadata(path)
    assert meta["index_dtype"] == "int32" and result.parity.ok
    # the artifact on the eager example: int32 indices with the int64 indices' values
    arg = indices.to(torch.int32) if graph == "decode" else x
    out = _run(path, arg)
    if graph == "decode":
        assert meta["input"]["dtype"] == "int32" and out[0].dtype == torch.float32
        torch.testing.assert_close(out[0], q.decode(indices), atol=1e-5, rtol=1e-5)
    else:
        got = out[0] if graph == "encode" else out[1]
        assert got.dtype == torch.int32 and torch.equal(got.long(), indices)
        assert [o["dtype"] for o in meta["outputs"]] == (
            ["int32"] if graph == "encode" else ["float32", "int32"]
        )
    if graph == "quantize":
        torch.testing.assert_close(out[0], vectors, atol=1e-5, rtol=1e-5)
    if fmt == "onnx":  # what an engine without int64 sees at the graph's edge
        model = onnx.load(str(path))
        edge = model.graph.input[0] if graph == "decode" else model.graph.output[-1]
        assert edge.type.tensor_type.elem_type == onnx.TensorProto.INT32


def test_int32_is_refused_before_writing_when_a_book_has_more_than_2_31_codes(tmp_path):
    q = vqcore.create("fsq", levels=[2**16, 2**16]).eval()  # 2^32 codes in one book
    path = tmp_path / "fsq.onnx"
    with pytest.raises(ValueError, match=r"a book has 4294967296 codes, int32 indices reach 2147483647"):
        to_onnx(q, path, graph="encode", example=torch.randn(2, 5, 2), index_dtype=torch.int32)
    assert list(tmp_path.iterdir()) == []
    # 2^31 codes still fit: indices 0 .. 2^31 - 1
    writers_mod.check_index_dtype(vqcore.create("fsq", levels=[2**16, 2**15]), torch.int32)


@pytest.mark.parametrize(
    "index_dtype, float_dtype, message",
    [
        (torch.int16, torch.float32, "index_dtype must be one of"),
        (torch.int64, torch.bfloat16, "float_dtype must be one of"),
    ],
)
def test_unsupported_dtypes_are_named(index_dtype, float_dtype, message, tmp_path):
    q, x = _trained("vq", dim=8, codebook_size=16)
    with pytest.raises(ValueError, match=message):
        to_onnx(
            q,
            tmp_path / "v.onnx",
            graph="encode",
            example=x,
            index_dtype=index_dtype,
            float_dtype=float_dtype,
        )
    assert not (tmp_path / "v.onnx").exists()


# -- float16 ------------------------------------------------------------------------------------------


def test_precision_meter_by_hand():
    meter = PrecisionMeter(torch.float16)
    meter.add(
        [torch.tensor([3.0, 4.0]), torch.tensor([1, 2, 3, 4])],
        [torch.tensor([3.0, 3.0]), torch.tensor([1, 2, 0, 4])],
    )
    summary = meter.summary()
    # signal 3^2 + 4^2 = 25, noise (4 - 3)^2 = 1: 10 log10(25) dB; one of four indices differs
    assert summary["sqnr_db"] == pytest.approx(10 * math.log10(25))
    assert (summary["index_flips"], summary["index_entries"], summary["index_agreement"]) == (1, 4, 0.75)
    same = PrecisionMeter(torch.float16)
    same.add([torch.ones(3)], [torch.ones(3)])
    assert same.summary()["sqnr_db"] == math.inf


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_float16_graph_reports_its_distance_from_float32(fmt, tmp_path):
    # a projection into a 4-dim codebook space: float16 rounds the projected features, so some indices
    # may flip against the float32 module; the report counts them, the search itself stays float32
    q, x = _trained("vq", dim=8, codebook_size=16, codebook_dim=4)
    path = tmp_path / f"h{EXTENSIONS[fmt]}"
    writer = to_onnx if fmt == "onnx" else to_torchscript
    result = writer(q, path, graph="quantize", example=x, float_dtype=torch.float16)
    meta = read_metadata(path)
    assert meta["float_dtype"] == "float16" and meta["input"]["dtype"] == "float16"
    assert [o["dtype"] for o in meta["outputs"]] == ["float16", "int64"]
    precision = result.parity.precision
    assert precision["dtype"] == "float16" and precision["index_entries"] > 0
    assert 0.9 <= precision["index_agreement"] <= 1.0
    # float16 rounding alone costs about 70 dB; a flipped index costs a whole code's distance
    assert precision["sqnr_db"] > (60 if precision["index_flips"] == 0 else 20)
    assert meta["parity"]["precision"] == precision
    # the example is one of the inputs the report covers: its flips are among those counted
    out = _run(path, x.half())
    with torch.no_grad():
        ref_vectors, ref_indices = q(x)[:2]
    assert out[0].dtype == torch.float16 and out[1].dtype == torch.int64
    assert int((out[1] != ref_indices).sum()) <= precision["index_flips"]
    same = out[1] == ref_indices
    torch.testing.assert_close(out[0][same].float(), ref_vectors[same], atol=2e-3, rtol=2e-3)


def test_float16_is_refused_before_writing_when_it_overflows(tmp_path):
    q, x = _trained("lfq", dim=4, codebook_size=16, codebook_scale=1e5)  # decoded values of 1e5 > 65504
    path = tmp_path / "l.onnx"
    with pytest.raises(
        ValueError, match=r"float_dtype=torch.float16 cannot hold output 0 .* overflow \(largest 1e\+05"
    ):
        to_onnx(q, path, graph="decode", example=q.encode(x), float_dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
    # float32 holds them
    assert to_onnx(q, path, graph="decode", example=q.encode(x)).parity.ok


# -- the quantize graph -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, fmt",
    [
        ("rvq", dict(dim=8, codebook_size=16, num_quantizers=3), "onnx"),
        ("latent", dict(levels=[3, 5, 4], dim=3), "torchscript"),
        ("residual_lfq", dict(dim=8, codebook_size=16, num_quantizers=2), "pt2"),
    ],
)
def test_quantize_graph_is_the_eval_forward(name, kwargs, fmt, tmp_path):
    q, x = _trained(name, **kwargs)
    path = tmp_path / f"q{EXTENSIONS[fmt]}"
    result = WRITERS[fmt](q, path, graph="quantize", example=x)
    meta = read_metadata(path)
    assert meta["graph"] == "quantize" and [o["name"] for o in meta["outputs"]] == ["vectors", "indices"]
    assert meta["index_layout"] == meta["outputs"][1]["layout"] and "batch" in meta["index_layout"]
    probe = torch.randn(3, 7, x.shape[-1])
    vectors, indices = _run(path, probe)
    with torch.no_grad():
        out = q(probe)
    assert torch.equal(indices, out[1]) and result.parity.index_mismatches == 0
    torch.testing.assert_close(vectors, out[0], atol=1e-5, rtol=1e-5)


def test_quantize_graph_vectors_are_judged_on_the_artifacts_own_indices():
    """x halfway between two different codes: a runtime may pick either (a float64-verified tie); its
    vectors must then be the other code, not the eager one."""
    q = vqcore.create("vq", dim=2, codebook_size=2).eval()
    codes = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    q.load_state_dict({**q.state_dict(), "_codebook.embed": codes[None]})
    x = torch.tensor([[[0.0, 1.0], [0.0, -1.0], [2.0, 0.0]]])  # two exact ties and a clear winner
    plan = writers_mod._Plan(q, "quantize", x)

    def flipped(probe):
        vectors, indices = plan.module(probe)
        tie = probe[..., 0] == 0
        other = torch.where(tie, 1 - indices, indices)
        return q.decode(other), other

    def wrong_vectors(probe):
        vectors, indices = flipped(probe)
        return torch.zeros_like(vectors), indices

    ok = plan.verify(flipped, "fake")
    assert ok.ok and ok.ties == ok.index_mismatches > 0
    bad = plan.verify(wrong_vectors, "fake")
    assert not bad.ok and any("values differ" in f for f in bad.failures)


# -- frozen TorchScript -------------------------------------------------------------------------------

TORCH_ONLY = r"""
import sys
sys.modules["vqcore"] = None
import json, torch
for path, arg in json.loads(sys.argv[1]):
    m = torch.jit.load(path)
    x = torch.load(arg)
    out = m(x)  # no torch.no_grad(): a deployer's plain call
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    print(json.dumps({
        "parameters": len(list(m.parameters())),
        "requires_grad": [o.requires_grad for o in outs],
        "numpy": [list(o.numpy().shape) for o in outs],
    }))
"""


def test_torchscript_artifacts_are_frozen_and_never_require_grad(tmp_path):
    items = []
    cases = {
        "residual_fsq": dict(dim=8, levels=[3, 5], num_quantizers=2),
        "residual_lfq": dict(dim=8, codebook_size=16, num_quantizers=2),
        "latent": dict(levels=[3, 5, 4], dim=3),
        "vq": dict(dim=8, codebook_size=16, codebook_dim=4, learnable_codebook=True, ema_update=False),
    }
    for name, kwargs in cases.items():
        q, x = _trained(name, **kwargs)
        assert any(p.requires_grad for p in q.parameters())
        for graph, example in (("decode", q.encode(x)), ("quantize", x)):
            path = tmp_path / f"{name}.{graph}.pt"
            to_torchscript(q, path, graph=graph, example=example)
            torch.save(example, tmp_path / f"{name}.{graph}.in")
            items.append((str(path), str(tmp_path / f"{name}.{graph}.in")))
        assert any(p.requires_grad for p in q.parameters())  # the user's module is untouched
    import json

    proc = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY, json.dumps(items)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.strip().splitlines():
        seen = json.loads(line)
        assert seen["parameters"] == 0 and not any(seen["requires_grad"])


# -- staged writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [to_onnx, to_torchscript, to_pt2])
def test_an_artifact_that_fails_parity_is_not_left_on_disk(writer, tmp_path):
    from test_export import TracingBroken

    previous = tmp_path / "b.art"
    previous.write_bytes(b"an earlier artifact")
    with pytest.raises(ParityError):
        writer(TracingBroken().eval(), previous, graph="encode", example=torch.randn(2, 5, 4))
    assert previous.read_bytes() == b"an earlier artifact"  # not replaced by the failed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.art"]  # no partial file either


# -- the command line ---------------------------------------------------------------------------------


def test_cli_export_variants(tmp_path, capsys):
    from vqcore.cli import main

    q, _ = _trained("vq", dim=8, codebook_size=16, codebook_dim=4)
    vqcore.save(q, tmp_path / "q.safetensors")
    out = tmp_path / "q.onnx"
    args = ["export", str(tmp_path / "q.safetensors"), "-o", str(out), "--graph", "quantize"]
    assert main([*args, "--index-dtype", "int32", "--float-dtype", "float16"]) == 0
    printed = capsys.readouterr().out
    assert "vectors batch,seq,8 float16, indices batch,seq int32" in printed
    assert "float16 vs float32:" in printed and "dB" in printed
    meta = read_metadata(out)
    assert (meta["graph"], meta["index_dtype"], meta["float_dtype"]) == ("quantize", "int32", "float16")

    big = vqcore.create("fsq", levels=[2**16, 2**16])
    vqcore.save(big, tmp_path / "big.safetensors")
    refused = tmp_path / "big.onnx"
    assert (
        main(["export", str(tmp_path / "big.safetensors"), "-o", str(refused), "--index-dtype", "int32"]) == 2
    )
    assert "int32 indices reach" in capsys.readouterr().err and not refused.exists()
    assert main([*args, "--max-size", "batch=8"]) == 2
    assert "--max-size needs --format executorch" in capsys.readouterr().err


# -- ExecuTorch ---------------------------------------------------------------------------------------


def test_executorch_program_runs_in_executorchs_runtime(tmp_path):
    pytest.importorskip("executorch")
    from vqcore.export import to_executorch
    from vqcore.export.writers import executorch_runner

    q, x = _trained("vq", dim=8, codebook_size=16, codebook_dim=4)
    path = tmp_path / "vq.pte"
    result = to_executorch(
        q, path, graph="quantize", example=x, index_dtype=torch.int32, max_sizes={"batch": 4}
    )
    meta = read_metadata(path)
    assert (
        meta["format"] == "pte"
        and meta["max_sizes"] == {"batch": 4, "seq": 64}
        and meta["delegate"] == "xnnpack"
    )
    assert result.parity.ok and result.parity.index_entries > 0
    run = executorch_runner(path)
    probe = torch.randn(4, 64, 8)  # the largest input the program planned for
    vectors, indices = run(probe)
    with torch.no_grad():
        want = q(probe)
    assert indices.dtype == torch.int32 and torch.equal(indices.long(), want[1])
    torch.testing.assert_close(vectors, want[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):  # beyond the planned bound
        run(torch.randn(5, 64, 8))
    with pytest.raises(ValueError, match=r"max_sizes names axes \['time'\]"):
        to_executorch(q, tmp_path / "bad.pte", graph="encode", example=x, max_sizes={"time": 8})
    assert not (tmp_path / "bad.pte").exists()


def test_executorch_missing_is_a_clear_import_error(monkeypatch, tmp_path):
    from vqcore.export import to_executorch

    monkeypatch.setitem(sys.modules, "executorch", None)
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    q, x = _trained("vq", dim=8, codebook_size=16)
    with pytest.raises(ImportError, match=r"pip install 'vqcore\[executorch\]'"):
        to_executorch(q, tmp_path / "v.pte", graph="encode", example=x)
    assert not os.path.exists(tmp_path / "v.pte")
