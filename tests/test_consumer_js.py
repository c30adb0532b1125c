"""The JavaScript consumers of the exported artifacts: examples/node (onnxruntime-node) and examples/web
(onnxruntime-web in headless Chromium) give Python's tokens and decoded images.

They need node with each example's node_modules (``npm ci --ignore-scripts`` in examples/node and in
examples/web) and, for the page, ``/usr/bin/chromium`` (Debian's ``chromium``); without them each test
is skipped with the reason, or fails when ``VQCORE_REQUIRE_CONSUMERS=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NODE_EXAMPLE = EXAMPLES / "node"
WEB_EXAMPLE = EXAMPLES / "web"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
MAX_DECODE_ERROR = 1e-5
DEMO_FILES = [
    "tokenizer.onnx",
    "detokenizer.onnx",
    "heldout_images.npy",
    "heldout_tokens.npy",
    "heldout_decoded.npy",
]


def unavailable(reason: str) -> None:
    if os.environ.get("VQCORE_REQUIRE_CONSUMERS") == "1":
        pytest.fail(f"{reason} (VQCORE_REQUIRE_CONSUMERS=1 requires the JavaScript consumers)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with examples/node's packages installed."""
    executable = shutil.which("node")
    if executable is None:
        unavailable("node is not installed (Debian: apt-get install -y nodejs npm)")
    if not (NODE_EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        unavailable("examples/node has no node_modules: run `npm ci --ignore-scripts` in examples/node")
    return executable


@pytest.fixture(scope="module")
def browser(node: str) -> str:
    """node again, once headless Chromium and examples/web's packages are there."""
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        unavailable(f"examples/web/headless.mjs (playwright-core) needs node 20 or later, this is {version}")
    if not CHROMIUM.is_file():
        unavailable(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    for package in ("onnxruntime-web", "playwright-core"):
        if not (WEB_EXAMPLE / "node_modules" / package).is_dir():
            unavailable(f"examples/web lacks {package}: run `npm ci --ignore-scripts` in examples/web")
    return node


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A short demo's export: tokenizer / detokenizer and the held-out digits with Python's tokens."""
    from vqcore.cli.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    # seed 1: a short training whose held-out tokens have no distance near-ties (those may flip between
    # runtimes); the demo's own onnxruntime check says so
    result = run_demo("vq", steps=30, out=out, dim=8, width=16, batch_size=64, seed=1, quiet=True)
    assert result.verification["onnxruntime"]["token_agreement"] == 1.0, result.verification
    return out


def run_node(node: str, script: str, *args, cwd: Path = NODE_EXAMPLE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [node, script, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def run_module_script(node: str, script: str, *args) -> subprocess.CompletedProcess:
    """``script`` as an ES module in examples/node (so it imports ./npy.mjs), with ``args`` as argv[1:]."""
    return subprocess.run(
        [node, "--input-type=module", "-e", script, *map(str, args)],
        cwd=NODE_EXAMPLE,
        capture_output=True,
        text=True,
        timeout=60,
    )


def copy_demo(demo: Path, to: Path) -> Path:
    to.mkdir()
    for name in DEMO_FILES:
        shutil.copy(demo / name, to / name)
    return to


# -- Node.js ---------------------------------------------------------------------------------------


def parse_tokenize_digits(stdout: str) -> tuple[list[int], int, int, float]:
    """tokenize_digits.mjs's report: (first image's tokens, images, token mismatches, decode error)."""
    first = re.search(r"^first image's tokens: (\[.*\])$", stdout, re.M)
    counts = re.search(r"^(\d+) images: (\d+) token mismatches, max decode error (\S+)$", stdout, re.M)
    assert first and counts, stdout
    return json.loads(first[1]), int(counts[1]), int(counts[2]), float(counts[3])


def test_node_tokenizes_and_decodes_like_python(node, demo):
    tokens = np.load(demo / "heldout_tokens.npy")
    proc = run_node(node, "tokenize_digits.mjs", demo)
    first, images, mismatches, decode_error = parse_tokenize_digits(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert first == tokens[0].reshape(-1).tolist()
    assert (images, mismatches) == (tokens.shape[0], 0)
    assert decode_error <= MAX_DECODE_ERROR


def test_node_names_a_tampered_token(node, demo, tmp_path):
    folder = copy_demo(demo, tmp_path / "demo")
    tokens = np.load(folder / "heldout_tokens.npy")
    python_id = int(tokens[5, 3])
    tokens[5, 3] = (python_id + 1) % 256  # another id of the 256-code book
    np.save(folder / "heldout_tokens.npy", tokens)
    proc = run_node(node, "tokenize_digits.mjs", folder)
    assert proc.returncode == 1
    assert parse_tokenize_digits(proc.stdout)[2] == 1
    assert f"image 5, id 3: {python_id}, Python's {(python_id + 1) % 256}" in proc.stdout


def _images_as_float64(folder: Path) -> None:
    np.save(folder / "heldout_images.npy", np.load(folder / "heldout_images.npy").astype(np.float64))


def _images_flat(folder: Path) -> None:
    images = np.load(folder / "heldout_images.npy")
    np.save(folder / "heldout_images.npy", images.reshape(images.shape[0], 64))


def _no_detokenizer(folder: Path) -> None:
    (folder / "detokenizer.onnx").unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_no_detokenizer, "missing {folder}/detokenizer.onnx: run `vqcore demo --out {folder}` first"),
        (
            _images_as_float64,
            "{folder}/heldout_images.npy: .npy dtype '<f8' is not supported (supported: <f4 <f2 <i4 <i8)",
        ),
        (_images_flat, "heldout_images.npy: expected float32 images (N, 1, 8, 8), got float32 ({n},64)"),
    ],
)
def test_node_names_bad_input(node, demo, tmp_path, damage, message):
    folder = copy_demo(demo, tmp_path / "demo")
    damage(folder)
    proc = run_node(node, "tokenize_digits.mjs", folder)
    assert proc.returncode == 1
    n = np.load(demo / "heldout_images.npy").shape[0]
    assert proc.stderr == message.format(folder=folder, n=n) + "\n"  # a message, not a stack trace
    assert proc.stdout == ""


def test_npy_module_round_trips_every_dtype(node, tmp_path):
    """npy.mjs reads what NumPy writes (format 1.0 and 2.0) and NumPy reads what it writes."""
    arrays = {
        "f4": np.arange(24, dtype="<f4").reshape(2, 3, 4) / 7,
        "f2": np.array([[0.5, -2.0, 65504.0], [np.inf, 1e-7, -0.0]], dtype="<f2"),
        "i4": np.array([-(2**31), 0, 2**31 - 1], dtype="<i4"),
        "i8": np.array([[-(2**63)], [2**62 + 3]], dtype="<i8"),
        "scalar": np.array(3.25, dtype="<f4"),
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    with open(tmp_path / "v2.npy", "wb") as file:
        np.lib.format.write_array(file, arrays["i8"], version=(2, 0))
    script = """
    import { readFile, writeFile } from "node:fs/promises";
    import { formatNpy, parseNpy, toNumbers } from "./npy.mjs";
    const dir = process.argv[1];
    const out = {};
    for (const name of ["f4", "f2", "i4", "i8", "scalar", "v2"]) {
      const array = parseNpy(await readFile(`${dir}/${name}.npy`));
      await writeFile(`${dir}/${name}.back.npy`, formatNpy(array));
      out[name] = { dtype: array.dtype, shape: array.shape, first: String(array.data[0]) };
    }
    out.half = Array.from(toNumbers(parseNpy(await readFile(`${dir}/f2.npy`))), String);
    console.log(JSON.stringify(out));
    """
    proc = run_module_script(node, script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["f4"] == {"dtype": "float32", "shape": [2, 3, 4], "first": "0"}
    assert seen["f2"]["dtype"] == "float16" and seen["f2"]["first"] == str(0x3800)  # raw bits of 0.5
    assert seen["i4"]["first"] == str(-(2**31)) and seen["i8"]["first"] == str(-(2**63))
    assert seen["scalar"]["shape"] == [] and seen["v2"]["shape"] == [2, 1]
    assert seen["half"] == ["0.5", "-2", "65504", "Infinity", "1.1920928955078125e-7", "0"]
    for name, array in {**arrays, "v2": arrays["i8"]}.items():
        back_path = tmp_path / f"{name}.back.npy"
        assert back_path.read_bytes()[6:8] == b"\x01\x00"  # format 1.0
        assert len(back_path.read_bytes()) % 64 == array.nbytes % 64  # data start 64-byte aligned
        back = np.load(back_path)
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)


def test_npy_module_rejects_what_it_cannot_read(node, tmp_path):
    np.save(tmp_path / "f8.npy", np.zeros(3))
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.zeros((2, 3), dtype="<f4")))
    (tmp_path / "short.npy").write_bytes(np.lib.format.magic(1, 0) + b"\x10\x00{'descr'")
    (tmp_path / "text.npy").write_bytes(b"hello")
    script = """
    import { readFile } from "node:fs/promises";
    import { parseNpy } from "./npy.mjs";
    for (const name of ["f8", "fortran", "short", "text"]) {
      try { parseNpy(await readFile(`${process.argv[1]}/${name}.npy`)); console.log(`${name}: read`); }
      catch (err) { console.log(`${name}: ${err.message}`); }
    }
    """
    proc = run_module_script(node, script, tmp_path)
    assert proc.stdout.splitlines() == [
        "f8: .npy dtype '<f8' is not supported (supported: <f4 <f2 <i4 <i8)",
        "fortran: .npy file in Fortran order: only C order is supported",
        "short: truncated .npy file: the header runs past the end",
        "text: not an .npy file: it does not start with \\x93NUMPY",
    ], proc.stderr


# -- the web page ------------------------------------------------------------------------------------


class LocalServer(ThreadingHTTPServer):
    """localhost: /examples/ is the repository's examples folder, /demo/ and /bundle/ the given folders
    (read-only); PUT /results/NAME stores a file NAME in the results folder (run_bundle.html's outputs)."""

    daemon_threads = True

    def __init__(self, mounts: dict[str, Path], results: Path | None = None):
        self.mounts, self.results = mounts, results
        super().__init__(("127.0.0.1", 0), LocalRequestHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class LocalRequestHandler(SimpleHTTPRequestHandler):
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
    }

    def translate_path(self, path: str) -> str:
        for prefix, folder in self.server.mounts.items():
            if path.startswith(prefix):
                self.directory = str(folder)
                return super().translate_path("/" + path[len(prefix) :])
        return ""  # not served: 404

    def do_PUT(self):
        name = self.path.split("?", 1)[0].removeprefix("/results/")
        if self.server.results is None or "/" in name or name.startswith(".") or not name:
            self.send_error(403, "PUT only to /results/NAME")
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        (self.server.results / name).write_bytes(body)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):  # the test's output stays readable
        pass


def test_web_page_tokenizes_and_decodes_like_python(browser, demo, tmp_path):
    """The page's numbers on every held-out digit; a stroke drawn on its pad gives Python's tokens of the
    8x8 image the page made of it; and the page renders (a screenshot)."""
    with LocalServer({"/examples/": EXAMPLES, "/demo/": demo}) as server:
        page = f"{server.url}/examples/web/index.html?demo=/demo/"
        proc = run_node(browser, "headless.mjs", "demo", page, tmp_path, cwd=WEB_EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads((tmp_path / "page.json").read_text())
    assert seen["pageErrors"] == []
    tokens = np.load(demo / "heldout_tokens.npy")
    decoded = np.load(demo / "heldout_decoded.npy")
    summary = seen["summary"]
    assert summary["tokens"]["shape"] == list(tokens.shape)
    assert np.dtype(summary["tokens"]["dtype"]) == tokens.dtype
    assert int((np.array(summary["tokens"]["values"]) != tokens.reshape(-1)).sum()) == 0
    assert summary["mismatches"] == 0
    assert summary["decoded"]["shape"] == list(decoded.shape)
    decode_error = np.abs(np.array(summary["decoded"]["values"]) - decoded.reshape(-1)).max()
    assert decode_error <= MAX_DECODE_ERROR and summary["decodeError"] == pytest.approx(decode_error)

    drawn = seen["drawn"]
    pixels = np.array(drawn["pixels"], dtype=np.float32)
    assert pixels.shape == (64,) and pixels.max() > 0.5  # the stroke left ink
    assert set(np.unique(pixels * 16)) <= set(range(17))  # the digits' pixel levels: counts / 16
    tokenizer = torch.jit.load(str(demo / "tokenizer.pt"))
    with torch.no_grad():
        python_tokens = tokenizer(torch.from_numpy(pixels).reshape(1, 1, 8, 8))
    assert drawn["tokens"]["ids"] == python_tokens.reshape(-1).tolist()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_web_page_says_which_file_it_cannot_load(browser, demo, tmp_path):
    folder = copy_demo(demo, tmp_path / "demo")
    (folder / "heldout_tokens.npy").unlink()
    with LocalServer({"/examples/": EXAMPLES, "/demo/": folder}) as server:
        page = f"{server.url}/examples/web/index.html?demo=/demo/"
        proc = run_node(browser, "headless.mjs", "demo", page, tmp_path / "out", cwd=WEB_EXAMPLE)
        missing = f"{server.url}/demo/heldout_tokens.npy"
    assert proc.returncode == 1
    assert f"the page failed: cannot load {missing} (HTTP 404): run `make demo`" in proc.stderr
    assert not (tmp_path / "out").exists()


# -- the consumer bundle -----------------------------------------------------------------------------

# bundles of format onnx, each method with its encode, decode and quantize graphs: name -> (methods,
# index dtype, float dtype); a nearest-code method, a grouped residual stack, two scalar families at the
# default dtypes, and int32 indices with float16 features and vectors
BUNDLES = {
    "int64-float32": (["vq", "grouped_rvq", "fsq", "lfq"], torch.int64, torch.float32),
    "int32-float16": (["vq", "grouped_rvq", "lfq"], torch.int32, torch.float16),
}


@pytest.fixture(scope="module", params=list(BUNDLES))
def bundle(request, tmp_path_factory) -> Path:
    """A consumer bundle written by tests/consumer_bundle.py."""
    from consumer_bundle import write_bundle

    folder = tmp_path_factory.mktemp(f"bundle-{request.param}")
    methods, index_dtype, float_dtype = BUNDLES[request.param]
    write_bundle(folder, methods=methods, formats=("onnx",), index_dtype=index_dtype, float_dtype=float_dtype)
    return folder


def judge_bundle(bundle: Path, results: Path, runtime: str) -> list[str]:
    """tests/consumer_bundle.py's verdicts (the export layer's parity rules: equal indices apart from
    float64-verified ties, float outputs within tolerance): the failures, one line each."""
    from consumer_bundle import compare

    verdicts = compare(bundle, results, runtime, formats=("onnx",))
    assert len(verdicts) == len(json.loads((bundle / "manifest.json").read_text())["cases"])
    return [f"{v.name}: {failure}" for v in verdicts for failure in v.failures]


def case_lines(stdout: str, bundle: Path) -> list[str]:
    names = [c["name"] for c in json.loads((bundle / "manifest.json").read_text())["cases"]]
    return [line for line in stdout.splitlines() if line.split(" ")[0] in names]


def test_node_runs_the_bundle(node, bundle, tmp_path):
    results = tmp_path / "results"
    proc = run_node(node, "run_bundle.mjs", bundle, results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [c["name"] for c in json.loads((bundle / "manifest.json").read_text())["cases"]]
    assert case_lines(proc.stdout, bundle) == [f"{name} ok" for name in names]
    assert judge_bundle(bundle, results, "onnxruntime-node") == []


def test_node_bundle_runner_reports_a_failed_case_and_runs_the_rest(node, dtype_bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(dtype_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    half, ids = manifest["cases"]
    half["artifact"] = "nowhere.onnx"
    manifest["cases"].append({**ids, "name": "ids.torchscript", "format": "torchscript"})
    (broken / "manifest.json").write_text(json.dumps(manifest))
    proc = run_node(node, "run_bundle.mjs", broken, tmp_path / "results")
    assert proc.returncode == 1
    assert re.fullmatch(r"half FAILED: .*nowhere\.onnx.*\nids ok\n", proc.stdout), proc.stdout
    assert proc.stderr == "1 onnx case(s) ran, 1 failed\n"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["ids.out0.npy", "ids.out1.npy"]


def test_browser_runs_the_bundle(browser, bundle, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    with LocalServer({"/examples/": EXAMPLES, "/bundle/": bundle}, results=results) as server:
        page = f"{server.url}/examples/web/run_bundle.html?bundle=/bundle/&results=/results/"
        proc = run_node(browser, "headless.mjs", "bundle", page, cwd=WEB_EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [c["name"] for c in json.loads((bundle / "manifest.json").read_text())["cases"]]
    assert case_lines(proc.stdout, bundle) == [f"{name} ok" for name in names]
    assert proc.stdout.splitlines()[-1] == f"done: {len(names)} ok, 0 failed"
    assert judge_bundle(bundle, results, "onnxruntime-web") == []


@pytest.fixture(scope="module")
def dtype_bundle(tmp_path_factory) -> Path:
    """Two hand-made ONNX cases for the runners' dtype handling: float16 in and out (a 5-D input), and
    int32 in with two outputs, int64 and int32."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path_factory.mktemp("dtype_bundle")

    def write(name, nodes, inputs, outputs, initializers, feed, expected):
        graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, folder / f"{name}.onnx")
        np.save(folder / f"{name}.in0.npy", feed)
        for k, out in enumerate(expected):
            np.save(folder / f"{name}.expected{k}.npy", out)
        return {
            "name": name,
            "format": "onnx",
            "artifact": f"{name}.onnx",
            "inputs": [f"{name}.in0.npy"],
            "outputs": len(expected),
            "expected": [f"{name}.expected{k}.npy" for k in range(len(expected))],
        }

    half = np.linspace(-3, 3, 12, dtype=np.float16).reshape(1, 2, 1, 3, 2)
    ids = np.array([[0, -1, 2**31 - 1], [7, 8, 9]], dtype=np.int32)
    cases = [
        write(
            "half",
            [helper.make_node("Mul", ["x", "two"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2, 1, 3, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 2, 1, 3, 2])],
            [helper.make_tensor("two", TensorProto.FLOAT16, [], [2.0])],
            half,
            [half * np.float16(2)],
        ),
        write(
            "ids",
            [
                helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.INT64),
                helper.make_node("Neg", ["x"], ["neg"]),
            ],
            [helper.make_tensor_value_info("x", TensorProto.INT32, [2, 3])],
            [
                helper.make_tensor_value_info("wide", TensorProto.INT64, [2, 3]),
                helper.make_tensor_value_info("neg", TensorProto.INT32, [2, 3]),
            ],
            [],
            ids,
            [ids.astype(np.int64), -ids],
        ),
    ]
    (folder / "manifest.json").write_text(json.dumps({"schema": "vqcore.consumer-bundle/1", "cases": cases}))
    return folder


def assert_outputs_as_expected(bundle: Path, results: Path) -> None:
    """Each output with the expected dtype, shape and values, bit for bit."""
    for case in json.loads((bundle / "manifest.json").read_text())["cases"]:
        for k, expected_file in enumerate(case["expected"]):
            got = np.load(results / f"{case['name']}.out{k}.npy")
            want = np.load(bundle / expected_file)
            assert (got.dtype, got.shape) == (want.dtype, want.shape), case["name"]
            np.testing.assert_array_equal(got, want)


def test_node_bundle_runner_keeps_dtypes(node, dtype_bundle, tmp_path):
    proc = run_node(node, "run_bundle.mjs", dtype_bundle, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["half ok", "ids ok"]
    assert_outputs_as_expected(dtype_bundle, tmp_path)


def test_browser_bundle_runner_keeps_dtypes(browser, dtype_bundle, tmp_path):
    with LocalServer({"/examples/": EXAMPLES, "/bundle/": dtype_bundle}, results=tmp_path) as server:
        page = f"{server.url}/examples/web/run_bundle.html?bundle=/bundle/&results=/results/"
        proc = run_node(browser, "headless.mjs", "bundle", page, cwd=WEB_EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["half ok", "ids ok", "done: 2 ok, 0 failed"]
    assert_outputs_as_expected(dtype_bundle, tmp_path)
