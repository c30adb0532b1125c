"""vqcore.export: every artifact is reloaded in a subprocess where vqcore cannot be imported
(onnxruntime + numpy only for ONNX; torch only for TorchScript / pt2) and run at a shape different from
the export example. The default run covers a representative subset; the full matrix is slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import vqcore
from vqcore.export import (
    Detokenizer,
    ExportError,
    ParityError,
    Tokenizer,
    default_example_shape,
    read_metadata,
    to_onnx,
    to_pt2,
    to_torchscript,
)
from vqcore.export import metadata as metadata_mod
from vqcore.export import parity as parity_mod

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

METHODS = {
    "vq": dict(dim=8, codebook_size=16),
    "rvq": dict(dim=8, codebook_size=16, num_quantizers=3),
    "grouped_rvq": dict(dim=8, codebook_size=16, num_quantizers=2, groups=2),
    "fsq": dict(levels=[3, 5, 4]),
    "residual_fsq": dict(dim=8, levels=[3, 5], num_quantizers=2),
    "lfq": dict(dim=8, codebook_size=16),
    "residual_lfq": dict(dim=8, codebook_size=16, num_quantizers=2),
    "latent": dict(levels=[3, 5, 4]),
    "rpq": dict(dim=8, codebook_size=16, codebook_dim=4),
}
WRITERS = {"onnx": to_onnx, "torchscript": to_torchscript, "pt2": to_pt2}
FAST = [
    ("vq", "onnx", "encode"),
    ("vq", "onnx", "decode"),
    ("rvq", "onnx", "decode"),
    ("grouped_rvq", "pt2", "decode"),
    ("fsq", "torchscript", "encode"),
    ("residual_fsq", "onnx", "decode"),
    ("lfq", "pt2", "encode"),
    ("latent", "onnx", "encode"),
    ("rpq", "torchscript", "encode"),
]
FULL = [(m, f, g) for m in METHODS for f in WRITERS for g in ("encode", "decode")]

ORT_ONLY = r"""
import sys
sys.modules["torch"] = None
sys.modules["vqcore"] = None
import json, numpy as np, onnxruntime as ort
for item in json.load(open(sys.argv[1])):
    s = ort.InferenceSession(item["path"], providers=["CPUExecutionProvider"])
    meta = json.loads(s.get_modelmeta().custom_metadata_map["vqcore"])
    assert meta["graph"] == item["graph"] and meta["method"] == item["method"], meta
    x, want = np.load(item["input"]), np.load(item["expected"])
    got = s.run(None, {s.get_inputs()[0].name: x})[0]
    assert got.shape == want.shape and got.dtype == want.dtype, (item, got.shape, want.shape)
    if want.dtype.kind == "f":
        assert np.allclose(got, want, atol=1e-5, rtol=1e-5), item
    else:
        assert (got == want).all(), item
print("OK", len(json.load(open(sys.argv[1]))))
"""

TORCH_ONLY = r"""
import sys
sys.modules["vqcore"] = None
import json, numpy as np, torch
for item in json.load(open(sys.argv[1])):
    if item["format"] == "torchscript":
        extra = {"vqcore.json": ""}
        module = torch.jit.load(item["path"], _extra_files=extra)
    else:
        extra = {"vqcore.json": ""}
        module = torch.export.load(item["path"], extra_files=extra).module()
    meta = json.loads(extra["vqcore.json"])
    assert meta["graph"] == item["graph"] and meta["method"] == item["method"], meta
    x, want = torch.from_numpy(np.load(item["input"])), torch.from_numpy(np.load(item["expected"]))
    with torch.no_grad():
        got = module(x)
    assert got.shape == want.shape and got.dtype == want.dtype, (item, got.shape, want.shape)
    assert (
        torch.equal(got, want)
        if not want.is_floating_point()
        else torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    ), item
print("OK", len(json.load(open(sys.argv[1]))))
"""


def _export_cases(cases, tmp):
    """Export each case, save a probe input of another shape and the eager output; return manifests."""
    manifests = {"onnx": [], "torch": []}
    for method, fmt, graph in cases:
        torch.manual_seed(0)
        q = vqcore.create(method, **METHODS[method]).eval()
        features = torch.randn(2, 5, q.dim)
        probe = torch.randn(3, 11, q.dim)
        with torch.no_grad():
            example = features if graph == "encode" else q.encode(features)
            x = probe if graph == "encode" else q.encode(probe)
            want = q.encode(x) if graph == "encode" else q.decode(x)
        path = os.path.join(tmp, f"{method}_{graph}.{fmt}")
        result = WRITERS[fmt](q, path, graph=graph, example=example)
        assert result.parity.ok and result.metadata["method"] == method
        stem = os.path.join(tmp, f"{method}_{graph}_{fmt}")
        np.save(stem + "_in.npy", x.numpy())
        np.save(stem + "_out.npy", want.numpy())
        item = dict(
            path=path,
            format=fmt,
            graph=graph,
            method=method,
            input=stem + "_in.npy",
            expected=stem + "_out.npy",
        )
        manifests["onnx" if fmt == "onnx" else "torch"].append(item)
    return manifests


def _run_isolated(script, manifest, tmp, name):
    if not manifest:
        return
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    out = subprocess.run(
        [sys.executable, "-I", "-c", script, path], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"OK {len(manifest)}"


@pytest.mark.parametrize(
    "cases", [pytest.param(FAST, id="fast"), pytest.param(FULL, id="full", marks=pytest.mark.slow)]
)
def test_artifacts_run_without_vqcore(cases, tmp_path):
    manifests = _export_cases(cases, str(tmp_path))
    _run_isolated(ORT_ONLY, manifests["onnx"], str(tmp_path), "onnx")
    _run_isolated(TORCH_ONLY, manifests["torch"], str(tmp_path), "torch")


def test_onnx_dynamic_axes_and_metadata(tmp_path):
    import onnx

    q = vqcore.create("rvq", dim=8, codebook_size=16, num_quantizers=3).eval()
    x = torch.randn(2, 5, 8)
    result = to_onnx(q, tmp_path / "rvq.onnx", graph="decode", example=q.encode(x))
    model = onnx.load(tmp_path / "rvq.onnx")
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 3]
    assert model.opset_import[0].version == 20
    meta = read_metadata(tmp_path / "rvq.onnx")
    assert meta == result.metadata
    assert meta["method"] == "rvq" and meta["graph"] == "decode" and meta["num_quantizers"] == 3
    assert meta["codebook_size"] == 16 and meta["dim"] == 8 and meta["index_dtype"] == "int64"
    assert meta["index_layout"] == "batch,seq,3" and meta["dropped_index"] == -1
    assert (
        meta["opset"] == 20
        and meta["torch_version"] == torch.__version__
        and len(meta["weights_sha256"]) == 64
    )
    # example, larger shape, size 1, and -1 (dropped layers) indices
    assert (
        meta["parity"]["ok"] and [1, 1, 3] in meta["parity"]["shapes"] and len(meta["parity"]["shapes"]) == 4
    )


def test_image_layout(tmp_path):
    import onnx

    q = vqcore.create("vq", dim=8, codebook_size=16, accept_image_fmap=True).eval()
    x = torch.randn(2, 8, 4, 3)
    enc = to_onnx(q, tmp_path / "e.onnx", graph="encode", example=x)
    dims = [
        d.dim_param or d.dim_value
        for d in onnx.load(tmp_path / "e.onnx").graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims == ["batch", 8, "height", "width"]
    assert enc.metadata["index_layout"] == "batch,height,width" and enc.metadata["layout"] == "image"
    dec = to_pt2(q, tmp_path / "d.pt2", graph="decode", example=q.encode(x))
    assert dec.metadata["output"]["layout"] == "batch,8,height,width"


class SignQuantizer(nn.Module):
    """A plugin-style quantizer with no export code: sign bits of a projection."""

    def __init__(self, dim=4):
        super().__init__()
        self.dim, self.codebook_size, self.num_codebooks = dim, 2**dim, 1
        self.register_buffer("basis", 2 ** torch.arange(dim))
        self.scale = nn.Parameter(torch.ones(dim))

    def encode(self, x):
        return ((x > 0).long() * self.basis).sum(-1)

    def decode(self, indices):
        bits = (indices.unsqueeze(-1) // self.basis) % 2
        return (bits.float() * 2 - 1) * self.scale

    def forward(self, x):
        return self.decode(self.encode(x)), self.encode(x)


def test_protocol_plugin_exports_for_free(tmp_path):
    q = SignQuantizer().eval()
    x = torch.randn(2, 5, 4)
    r = to_onnx(q, tmp_path / "s.onnx", graph="encode", example=x)
    assert (
        r.parity.ok
        and r.metadata["class"] == "SignQuantizer"
        and r.metadata["input"]["layout"] == "batch,seq,4"
    )
    r = to_torchscript(q, tmp_path / "s.pt", graph="decode", example=q.encode(x))
    assert r.parity.ok and r.metadata["output"]["layout"] == "batch,seq,4"


class DeclaresMetadata(SignQuantizer):
    """A plugin quantizer that declares its export metadata through the protocol."""

    levels = [2, 2, 2, 2]  # an attribute, not declared: must not be picked up

    def export_metadata(self):
        return {"bits": 4, "scale": self.scale.detach(), "layout": "sequence", "signs": (-1, 1)}


class DeclaresPlugin:
    @vqcore.hookimpl
    def register_quantizers(self, register):
        register("declares", DeclaresMetadata)
        register("sign", SignQuantizer)


def test_metadata_comes_through_the_protocol(fresh_registry, tmp_path):
    fresh_registry.register_plugin(DeclaresPlugin(), name="declares-plugin")
    q = vqcore.create("declares", dim=4).eval()
    meta = to_torchscript(q, tmp_path / "d.pt", graph="encode", example=torch.randn(2, 5, 4)).metadata
    assert read_metadata(tmp_path / "d.pt") == meta
    assert (meta["dim"], meta["codebook_size"], meta["num_codebooks"]) == (4, 16, 1)
    assert meta["method"] == "declares" and meta["class"] == "DeclaresMetadata"
    assert meta["config"] == {"name": "declares", "version": 1, "kwargs": {"dim": 4}}
    assert (meta["bits"], meta["scale"], meta["layout"], meta["signs"]) == (4, [1.0] * 4, "sequence", [-1, 1])
    assert "levels" not in meta

    # without export_metadata: the protocol fields and the config only
    plain = vqcore.create("sign", dim=3).eval()
    meta = to_torchscript(plain, tmp_path / "s.pt", graph="encode", example=torch.randn(2, 5, 3)).metadata
    quantizer_keys = set(meta) - set(metadata_mod.RESERVED_KEYS)
    assert quantizer_keys == {"dim", "codebook_size", "num_codebooks"} and meta["config"]["kwargs"] == {
        "dim": 3
    }
    # built outside the registry: no config, no method
    meta = metadata_mod.quantizer_fields(SignQuantizer(dim=2))
    assert meta == {"dim": 2, "codebook_size": 4, "num_codebooks": 1}


@pytest.mark.parametrize(
    "declared, error, message",
    [
        (
            {"graph": "mine"},
            ValueError,
            r"DeclaresMetadata.export_metadata\(\) returned keys that vqcore writes "
            r"itself: \['graph'\]",
        ),
        (
            {"dtype": torch.float32},
            TypeError,
            "export metadata 'dtype' must be JSON-serialisable .*got dtype",
        ),
        ([("bits", 4)], TypeError, "must return a dict with str keys, got list"),
    ],
)
def test_bad_export_metadata_is_a_clear_error(declared, error, message, monkeypatch):
    monkeypatch.setattr(DeclaresMetadata, "export_metadata", lambda self: declared)
    with pytest.raises(error, match=message):
        metadata_mod.quantizer_fields(DeclaresMetadata())


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("fsq", dict(levels=[3, 5, 4]), (2, 16, 3)),
        ("fsq", dict(levels=[3, 5, 4], dim=8, channel_first=True), (2, 8, 16)),
        ("vq", dict(dim=8, codebook_size=16, channel_last=False), (2, 8, 16)),
        ("vq", dict(dim=8, codebook_size=16, accept_image_fmap=True), (2, 8, 8, 6)),
        ("rvq", dict(dim=8, codebook_size=16, num_quantizers=2, accept_3d_fmap=True), (2, 8, 3, 4, 5)),
    ],
)
def test_default_example_shape_is_what_encode_accepts(name, kwargs, shape):
    q = vqcore.create(name, **kwargs).eval()
    assert default_example_shape(q) == shape
    q.encode(torch.randn(shape))


def test_default_example_shape_prefers_the_declared_layout(monkeypatch):
    monkeypatch.setattr(DeclaresMetadata, "export_metadata", lambda self: {"layout": "image"})
    assert default_example_shape(DeclaresMetadata(dim=4)) == (2, 4, 8, 6)  # declared: not probed

    class Rejects(SignQuantizer):
        def encode(self, x):
            raise ValueError(f"no layout fits {tuple(x.shape)}")

    with pytest.raises(
        ValueError, match=r"Rejects.encode accepts none of the example shapes.*no layout fits"
    ):
        default_example_shape(Rejects())


def test_non_contiguous_example_exports(tmp_path):
    """A strided view as the example made torch.export guard its strides (the seq axis then failed
    "Constraints violated"); the writers export a contiguous copy."""
    q = vqcore.create("vq", dim=8, codebook_size=16).eval()
    example = torch.randn(4, 10, 8)[::2, ::2]  # (2, 5, 8), every other batch item and token
    assert not example.is_contiguous()
    result = to_pt2(q, tmp_path / "v.pt2", graph="encode", example=example)
    assert result.parity.ok and (5, 8, 8) in result.parity.shapes  # ran at another shape
    assert result.metadata["input"]["layout"] == "batch,seq,8"
    indices = q.encode(torch.randn(4, 10, 8))[::2, ::2]
    assert not indices.is_contiguous()
    assert to_onnx(q, tmp_path / "v.onnx", graph="decode", example=indices).parity.ok


class TracingBroken(SignQuantizer):
    def encode(self, x):
        out = super().encode(x)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            out = out.flip(-1)  # the exported graph differs from eager
        return out


@pytest.mark.parametrize("writer", [to_onnx, to_torchscript])
def test_broken_export_raises_parity_report(writer, tmp_path):
    q = TracingBroken().eval()
    with pytest.raises(ParityError) as info:
        writer(q, tmp_path / "b.art", graph="encode", example=torch.randn(2, 5, 4))
    text = str(info.value)
    assert "FAILED" in text and "indices differ" in text and info.value.report.index_mismatches > 0


def test_hook_supplies_export_module(fresh_registry, tmp_path):
    from vqcore import hookimpl

    calls = []

    class Plugin:
        @hookimpl
        def export_module(self, quantizer, graph):
            if isinstance(quantizer, SignQuantizer) and graph == "decode":
                calls.append(graph)
                return Wrong(quantizer)

    class Wrong(nn.Module):
        def __init__(self, q):
            super().__init__()
            self.q = q

        def forward(self, indices):
            return self.q.decode(indices) * 2

    fresh_registry.register_plugin(Plugin(), name="export-test")
    q = SignQuantizer().eval()
    idx = q.encode(torch.randn(2, 5, 4))
    with pytest.raises(ParityError, match="values differ"):  # checked against the quantizer's own decode
        to_pt2(q, tmp_path / "w.pt2", graph="decode", example=idx)
    assert calls == ["decode"]


def test_specialised_axis_is_refused(tmp_path):
    class Static(SignQuantizer):
        def encode(self, x):
            return super().encode(x).reshape(2, -1)  # bakes the batch size

    with pytest.raises((ExportError, ValueError)):
        to_onnx(
            Static().eval(),
            tmp_path / "s.onnx",
            graph="encode",
            example=torch.randn(2, 5, 4),
            dynamic_dims=(0, 1),
        )


def test_tokenizer_and_detokenizer(tmp_path):
    q = vqcore.create("fsq", levels=[5, 4, 3], dim=6).eval()
    tok = Tokenizer(nn.Sequential(nn.Linear(10, 6), nn.GELU()), q).eval()
    detok = Detokenizer(q, nn.Linear(6, 10)).eval()
    x = torch.randn(2, 7, 10)
    r = to_onnx(tok, tmp_path / "tok.onnx", example=x)
    assert (
        r.metadata["graph"] == "encode"
        and r.metadata["module"] == "Tokenizer"
        and r.metadata["method"] == "fsq"
    )
    assert r.metadata["input"]["layout"] == "batch,seq,10"
    with torch.no_grad():
        codes = tok(x)
    r = to_torchscript(detok, tmp_path / "detok.pt", example=codes)
    assert r.metadata["graph"] == "decode" and r.metadata["output"]["layout"] == "batch,seq,10"
    with pytest.raises(ValueError, match="encode graph"):
        to_onnx(tok, tmp_path / "x.onnx", graph="decode", example=x)


def test_tie_check_accepts_only_genuine_ties():
    q = vqcore.create("vq", dim=2, codebook_size=4).eval()
    q.codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    x = torch.tensor([[[0.0, 0.0], [0.9, 0.1]]])  # token 0: codes 0 and 1 tie exactly
    want = q.encode(x)
    assert want.tolist() == [[0, 0]]
    check = parity_mod.tie_checker(q)
    report = parity_mod.ParityReport("encode", "test")
    parity_mod.compare(report, x, want, torch.tensor([[1, 0]]), check)
    assert report.ok and report.ties == 1
    report = parity_mod.ParityReport("encode", "test")
    parity_mod.compare(report, x, want, torch.tensor([[0, 1]]), check)  # not a tie
    assert not report.ok and "not float64-verified ties" in str(report)
    report = parity_mod.ParityReport("encode", "test")
    parity_mod.compare(
        report, x, want, torch.tensor([[1, 0]]), parity_mod.tie_checker(vqcore.create("fsq", levels=[3, 3]))
    )
    assert not report.ok  # FSQ: exact equality required


def test_rvq_tie_judged_at_first_differing_layer():
    q = vqcore.create("rvq", dim=2, codebook_size=2, num_quantizers=2).eval()
    q.layers[0].codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    q.layers[1].codebook = torch.tensor([[0.0, 0.5], [0.0, -0.5]])
    x = torch.tensor([[[0.0, 0.4]]])
    want = q.encode(x)
    got = want.clone()
    got[..., 0] = 1 - got[..., 0]  # the first layer ties; the second follows
    report = parity_mod.ParityReport("encode", "test")
    parity_mod.compare(report, x, want, got, parity_mod.tie_checker(q))
    assert report.ok and report.ties == 1


def test_cli_export_checkpoint(tmp_path, capsys):
    from vqcore.cli import main

    q = vqcore.create("residual_lfq", dim=8, codebook_size=16, num_quantizers=2)
    vqcore.save(q, tmp_path / "q.safetensors")
    out = tmp_path / "q_decode.onnx"
    assert (
        main(
            [
                "export",
                str(tmp_path / "q.safetensors"),
                "--format",
                "onnx",
                "--graph",
                "decode",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    meta = read_metadata(out)
    assert (
        meta["method"] == "residual_lfq"
        and meta["graph"] == "decode"
        and meta["input"]["layout"] == "batch,seq,2"
    )
    out = tmp_path / "q.pt"
    args = [
        "export",
        str(tmp_path / "q.safetensors"),
        "--format",
        "torchscript",
        "-o",
        str(out),
        "--example-shape",
        "3,4,8",
    ]
    assert main(args) == 0
    assert read_metadata(out)["format"] == "torchscript"


@pytest.mark.slow
def test_aoti_package(tmp_path):
    pytest.importorskip("torch._inductor")
    q = vqcore.create("fsq", levels=[3, 5, 4]).eval()
    r = to_pt2(q, tmp_path / "fsq.pt2", graph="encode", example=torch.randn(2, 5, 3), aoti=True)
    assert r.parity.ok and r.metadata["format"] == "aoti"
