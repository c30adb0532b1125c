"""Every built-in's encode, decode and quantize graphs in the Python-side consumers, each in a process of
its own that cannot import vqcore: onnxruntime (no torch either), torch.jit (frozen TorchScript) and
executorch's runtime. The runners only run and write outputs; ``consumer_bundle.compare`` judges them by
the export layer's parity rules. The default run covers a few methods; the slow run every built-in, and
the int32 / float16 variants. The C++, Node.js and browser consumers run the same bundles
(test_consumer_cpp.py, test_consumer_js.py)."""

from __future__ import annotations

import subprocess
import sys

import consumer_bundle
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# a runner of the bundle contract: RUNNER BUNDLE RESULTS [FORMAT]
RUNNER = r"""
import sys
sys.modules["vqcore"] = None
fmt = sys.argv[3]
if fmt == "onnx":
    sys.modules["torch"] = None  # onnxruntime and numpy only
import json, pathlib
import numpy as np
bundle, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
results.mkdir(parents=True, exist_ok=True)
if fmt == "onnx":
    import onnxruntime as ort
    def run(path, x):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})
elif fmt == "torchscript":
    import torch
    def run(path, x):
        out = torch.jit.load(str(path))(torch.from_numpy(x))  # no no_grad: outputs must not need one
        return [o.numpy() for o in ((out,) if isinstance(out, torch.Tensor) else out)]
else:
    import torch
    from executorch.runtime import Runtime
    def run(path, x):
        method = Runtime.get().load_program(str(path)).load_method("forward")
        return [o.numpy() for o in method.execute([torch.from_numpy(x)])]
failed = 0
for case in json.loads((bundle / "manifest.json").read_text())["cases"]:
    if case["format"] != fmt:
        continue
    try:
        outs = run(bundle / case["artifact"], np.load(bundle / case["inputs"][0]))
    except Exception as err:
        print(case["name"], "FAILED:", type(err).__name__, str(err)[:200])
        failed += 1
        continue
    for k, out in enumerate(outs):
        np.save(results / f"{case['name']}.out{k}.npy", out)
    print(case["name"], "ok")
sys.exit(1 if failed else 0)
"""


def run_python_consumer(bundle, results, fmt):
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(bundle), str(results), fmt],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return consumer_bundle.compare(bundle, results, fmt, formats=[fmt])


def assert_all_ok(verdicts, cases):
    assert len(verdicts) == cases
    failed = [(v.name, v.failures) for v in verdicts if not v.ok]
    assert not failed
    for v in verdicts:
        if v.graph != "decode":
            assert v.index_entries > 0 and v.index_mismatches == v.ties
        if v.graph != "encode":
            assert v.max_abs_diff <= 1e-5


FAST_METHODS = ["vq", "residual_fsq"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_python_consumers_reproduce_every_graph(fmt, tmp_path):
    manifest = consumer_bundle.write_bundle(tmp_path / "bundle", methods=FAST_METHODS, formats=[fmt])
    verdicts = run_python_consumer(tmp_path / "bundle", tmp_path / "results", fmt)
    assert_all_ok(verdicts, len(manifest["cases"]))


def test_compare_catches_a_wrong_output(tmp_path):
    consumer_bundle.write_bundle(
        tmp_path / "bundle", methods=["vq"], formats=["onnx"], graph_names=["encode"]
    )
    results = tmp_path / "results"
    run_python_consumer(tmp_path / "bundle", results, "onnx")
    import numpy as np

    path = results / "vq.encode.onnx.out0.npy"
    got = np.load(path)
    got.reshape(-1)[0] = (got.reshape(-1)[0] + 1) % 16  # a far code: no tie
    np.save(path, got)
    (verdict,) = consumer_bundle.compare(tmp_path / "bundle", results, "onnx")
    assert (
        not verdict.ok
        and verdict.index_mismatches == 1
        and "not float64-verified ties" in verdict.failures[0]
    )
    path.unlink()
    (verdict,) = consumer_bundle.compare(tmp_path / "bundle", results, "onnx")
    assert not verdict.ok and verdict.failures == ["no output vq.encode.onnx.out0.npy"]


@pytest.mark.slow
def test_executorch_consumer(tmp_path):
    pytest.importorskip("executorch")
    manifest = consumer_bundle.write_bundle(tmp_path / "bundle", methods=["vq"], formats=["pte"])
    verdicts = run_python_consumer(tmp_path / "bundle", tmp_path / "results", "pte")
    assert_all_ok(verdicts, len(manifest["cases"]))


@pytest.mark.slow
def test_executorch_refuses_what_it_cannot_lower_before_writing(tmp_path):
    pytest.importorskip("executorch")
    from vqcore.errors import VQCoreWarning
    from vqcore.export import ExportError, to_executorch

    quantizer, features = consumer_bundle.build("hierarchical_vq")
    path = tmp_path / "h.pte"
    with pytest.warns(VQCoreWarning, match="XNNPACK delegate.*failed.*portable kernels instead"):
        with pytest.raises(ExportError, match=r"\(portable kernels\) failed: .*copy_strided"):
            to_executorch(quantizer, path, graph="decode", example=quantizer.encode(features))
    assert list(tmp_path.iterdir()) == []


# ExecuTorch lowering takes seconds per graph: its int32 / float16 variants run on a few methods
VARIANT_METHODS = {"pte": ["vq", "rvq", "lfq", "hierarchical_vq"]}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pte"])
@pytest.mark.parametrize(
    "index_dtype, float_dtype",
    [(torch.int64, torch.float32), (torch.int32, torch.float32), (torch.int64, torch.float16)],
)
def test_every_builtin_in_every_python_consumer(fmt, index_dtype, float_dtype, tmp_path):
    if fmt == "pte":
        pytest.importorskip("executorch")
    default = index_dtype == torch.int64 and float_dtype == torch.float32
    manifest = consumer_bundle.write_bundle(
        tmp_path / "bundle",
        methods=None if default else VARIANT_METHODS.get(fmt),
        formats=[fmt],
        index_dtype=index_dtype,
        float_dtype=float_dtype,
        skip=consumer_bundle.PTE_UNSUPPORTED if fmt == "pte" else (),
    )
    verdicts = run_python_consumer(tmp_path / "bundle", tmp_path / "results", fmt)
    if float_dtype == torch.float32:
        assert_all_ok(verdicts, len(manifest["cases"]))
    else:  # float16: judged within float16 rounding (consumer_bundle.compare)
        assert len(verdicts) == len(manifest["cases"])
        assert all(v.ok for v in verdicts), [(v.name, v.failures) for v in verdicts if not v.ok]
