"""The C++ (libtorch) consumers in examples/cpp, built with CMake against the libtorch of the installed torch
wheel: ``tokenize_digits`` on the demo's output (TorchScript and AOTInductor) and ``run_bundle`` on a
consumer bundle. All slow (a cold build compiles against the libtorch headers; AOTInductor packages
compile C++ too): ``make test-slow`` runs them.

Without cmake or a C++ compiler the tests are skipped, unless ``VQCORE_REQUIRE_CONSUMERS=1`` makes that
a failure. The build folder lives in the temporary directory, keyed by this checkout's path, so that a
rerun only rebuilds what changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "cpp"
# tokenize_digits prints, for each artifact format, these two lines
SUMMARY = re.compile(r"^(\w+): (\d+) images: (\d+) token mismatches, max decode error (\S+)$", re.M)
FIRST_TOKENS = re.compile(r"^(\w+) first image tokens:((?: -?\d+)*)$", re.M)
DEMO_FILES = (
    "tokenizer.pt",
    "detokenizer.pt",
    "heldout_images.npy",
    "heldout_tokens.npy",
    "heldout_decoded.npy",
)


def _missing_tool() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    if not any(shutil.which(c) for c in compilers):
        return f"no C++ compiler found (looked for {', '.join(compilers)})"
    return None


def _run(command: list, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def cpp_bin() -> Path:
    """The folder of the examples/cpp binaries, configured and built (incrementally when it exists)."""
    missing = _missing_tool()
    if missing:
        if os.environ.get("VQCORE_REQUIRE_CONSUMERS") == "1":
            pytest.fail(f"VQCORE_REQUIRE_CONSUMERS=1 but {missing}: cannot build examples/cpp")
        pytest.skip(f"{missing}: cannot build examples/cpp")
    key = hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]
    build = Path(tempfile.gettempdir()) / f"vqcore-cpp-build-{key}"
    configure = ["cmake", "-S", SOURCE, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja") and not (build / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]  # a configured folder keeps its generator
    for step in (configure, ["cmake", "--build", build, "--parallel", "2"]):
        proc = _run(step, timeout=1200)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, step))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return build


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    from vqcore.cli.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo("vq", steps=30, out=out, dim=8, width=16, batch_size=64, quiet=True)
    return out


def _copy_demo(demo: Path, to: Path) -> Path:
    to.mkdir()
    for name in DEMO_FILES:
        shutil.copy(demo / name, to / name)
    return to


def _results(stdout: str) -> dict[str, tuple[int, int, float, list[int]]]:
    """format -> (images, token mismatches, max decode error, first image's tokens) from tokenize_digits."""
    first = {fmt: [int(t) for t in tokens.split()] for fmt, tokens in FIRST_TOKENS.findall(stdout)}
    return {fmt: (int(n), int(m), float(e), first[fmt]) for fmt, n, m, e in SUMMARY.findall(stdout)}


# -- tokenize_digits ---------------------------------------------------------------------------------


def test_tokenize_digits_reproduces_the_demo_tokens_and_images(cpp_bin, demo_out):
    proc = _run([cpp_bin / "tokenize_digits", demo_out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tokens = np.load(demo_out / "heldout_tokens.npy")
    results = _results(proc.stdout)
    assert "torchscript" in results  # and "aoti" when the demo wrote the .pt2 packages
    for n, mismatches, error, first in results.values():
        assert (n, mismatches) == (len(np.load(demo_out / "heldout_images.npy")), 0)
        assert error <= 1e-5
        assert first == tokens[0].reshape(-1).tolist()


def test_tokenize_digits_counts_a_changed_token(cpp_bin, demo_out, tmp_path):
    out = _copy_demo(demo_out, tmp_path / "tampered")
    tokens = np.load(out / "heldout_tokens.npy")
    tokens[3, 5] = (tokens[3, 5] + 1) % 256  # still a code of the 256-code book: decodable
    np.save(out / "heldout_tokens.npy", tokens)
    proc = _run([cpp_bin / "tokenize_digits", out])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _results(proc.stdout)["torchscript"][:2] == (len(tokens), 1)


def test_tokenize_digits_reads_npy_format_2(cpp_bin, demo_out, tmp_path):
    out = _copy_demo(demo_out, tmp_path / "format_2")
    for name in ("heldout_images.npy", "heldout_tokens.npy"):
        array = np.load(out / name)
        with open(out / name, "wb") as f:
            np.lib.format.write_array(f, array, version=(2, 0))
        assert (out / name).read_bytes()[6:8] == b"\x02\x00"
    proc = _run([cpp_bin / "tokenize_digits", out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _results(proc.stdout)["torchscript"][:2] == (len(np.load(out / "heldout_images.npy")), 0)


def _as_float64(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float64))


def _as_float32(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float32))


def _fortran_order(path: Path) -> None:
    np.save(path, np.asfortranarray(np.load(path)))


def _wrong_size(path: Path) -> None:
    np.save(path, np.load(path)[:, :, :4])


def _big_endian(path: Path) -> None:
    np.save(path, np.load(path).astype(">f4"))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-4])


def _version_3(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[6] = 3
    path.write_bytes(bytes(data))


def _unknown_key(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b"'shape'", b"'shapf'", 1))


def _not_npy(path: Path) -> None:
    path.write_text("1 2 3\n")


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("heldout_tokens.npy", Path.unlink, "heldout_tokens.npy: missing"),
        ("tokenizer.pt", Path.unlink, "tokenizer.pt: missing"),
        (
            "heldout_tokens.npy",
            _as_float32,
            "heldout_tokens.npy: expected integer token ids (int32 or int64), got float32",
        ),
        (
            "heldout_images.npy",
            _as_float64,
            "heldout_images.npy: expected a dtype among <f4 <f2 <i4 <i8 |b1, got '<f8'",
        ),
        (
            "heldout_images.npy",
            _wrong_size,
            "heldout_images.npy: expected float32 images (N, 1, 8, 8), got float32 [359, 1, 4, 8]",
        ),
        (
            "heldout_images.npy",
            _big_endian,
            "heldout_images.npy: expected a dtype among <f4 <f2 <i4 <i8 |b1, got '>f4'",
        ),
        (
            "heldout_images.npy",
            _fortran_order,
            "heldout_images.npy: expected C order (fortran_order False), got Fortran order",
        ),
        (
            "heldout_images.npy",
            _truncated,
            "heldout_images.npy: expected 91904 data bytes for shape [359, 1, 8, 8] <f4, the file has 91900",
        ),
        (
            "heldout_images.npy",
            _version_3,
            "heldout_images.npy: expected .npy format version 1.0 or 2.0, got 3.0",
        ),
        (
            "heldout_decoded.npy",
            _unknown_key,
            "heldout_decoded.npy: bad .npy header: expected a key 'descr', 'fortran_order' or 'shape', "
            "got 'shapf' in {'descr': '<f4', 'fortran_order': False, 'shapf': (359, 1, 8, 8), }\n",
        ),
        ("heldout_decoded.npy", _not_npy, "heldout_decoded.npy: not a .npy file"),
    ],
)
def test_tokenize_digits_names_bad_input(cpp_bin, demo_out, tmp_path, name, damage, message):
    out = _copy_demo(demo_out, tmp_path / "bad")
    damage(out / name)
    proc = _run([cpp_bin / "tokenize_digits", out])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""  # nothing was run


def test_tokenize_digits_usage(cpp_bin):
    proc = _run([cpp_bin / "tokenize_digits"])
    assert proc.returncode == 2 and "usage:" in proc.stderr and "DEMO_OUT" in proc.stderr


@pytest.fixture(scope="module")
def aoti_demo_out(tmp_path_factory) -> Path:
    """A folder shaped like the demo's output, with the AOTInductor packages tokenizer.pt2 and
    detokenizer.pt2 too: the demo's tokenizer (its encoder, VQ preset and decoder, untrained; the codebook
    initialised by k-means on the encoder's outputs) exported by vqcore.export."""
    from vqcore.cli.demo import Decoder, Encoder, build_quantizer, load_digits_images
    from vqcore.export import Detokenizer, Tokenizer, to_pt2, to_torchscript

    out = tmp_path_factory.mktemp("aoti_demo")
    torch.manual_seed(0)
    quantizer, _ = build_quantizer("vq", dim=8)
    encoder, decoder = Encoder(8, width=16), Decoder(8, width=16)
    _, images = load_digits_images()
    with torch.no_grad():
        quantizer.train()(encoder(images))  # k-means initialisation of the codebook
        tokenizer, detokenizer = Tokenizer(encoder, quantizer).eval(), Detokenizer(quantizer, decoder).eval()
        tokens = tokenizer(images)
        decoded = detokenizer(tokens)
    np.save(out / "heldout_images.npy", images.numpy())
    np.save(out / "heldout_tokens.npy", tokens.numpy())
    np.save(out / "heldout_decoded.npy", decoded.numpy())
    for module, name, example in (
        (tokenizer, "tokenizer", images[:4]),
        (detokenizer, "detokenizer", tokens[:4]),
    ):
        to_torchscript(module, out / f"{name}.pt", example=example, dynamic_dims=(0,))
        to_pt2(module, out / f"{name}.pt2", example=example, dynamic_dims=(0,), aoti=True)
    return out


def test_tokenize_digits_runs_the_aoti_packages_too(cpp_bin, aoti_demo_out):
    proc = _run([cpp_bin / "tokenize_digits", aoti_demo_out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tokens = np.load(aoti_demo_out / "heldout_tokens.npy")
    results = _results(proc.stdout)
    assert results.keys() == {"torchscript", "aoti"}
    for n, mismatches, error, first in results.values():
        assert (n, mismatches) == (len(tokens), 0) and error <= 1e-5
        assert first == tokens[0].tolist()


# -- run_bundle --------------------------------------------------------------------------------------

# name -> write_bundle arguments: every built-in's encode / decode / quantize graphs as TorchScript; int32
# indices and float16 vectors for a few; AOTInductor packages of two (each package compiles C++)
BUNDLES = {
    "torchscript": dict(formats=("torchscript",)),
    "torchscript_int32_float16": dict(
        formats=("torchscript",),
        methods=("vq", "rvq", "fsq", "lfq"),
        index_dtype=torch.int32,
        float_dtype=torch.float16,
    ),
    "aoti": dict(formats=("aoti",), methods=("vq", "rvq")),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The BUNDLES, written by tests/consumer_bundle.py as they are first asked for."""

    class Bundles(dict):
        def __missing__(self, name: str) -> Path:
            from consumer_bundle import write_bundle

            folder = tmp_path_factory.mktemp(f"bundle_{name}")
            write_bundle(folder, **BUNDLES[name])
            self[name] = folder
            return folder

    return Bundles()


@pytest.mark.parametrize("name", BUNDLES)
def test_run_bundle_matches_python_on_every_case(cpp_bin, bundles, tmp_path, name):
    from consumer_bundle import compare

    bundle, results = bundles[name], tmp_path / "results"
    proc = _run([cpp_bin / "run_bundle", bundle, results])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [line.split("\t")[0] for line in (bundle / "manifest.tsv").read_text().splitlines()]
    assert proc.stdout.splitlines() == [f"{case} ok" for case in names]
    verdicts = compare(bundle, results, "libtorch")
    assert [v.name for v in verdicts] == names
    assert [(v.name, v.failures) for v in verdicts if not v.ok] == []


class AllDtypes(torch.nn.Module):
    """Its input in every dtype a bundle holds, plus a 1-D and a 0-D view: what run_bundle writes back."""

    def forward(self, x: torch.Tensor):  # TorchScript reads no tuple[Tensor, ...]
        return x, x.float(), x.half(), x.int(), x.long(), x > 0, x.reshape(-1), x.reshape(-1)[0]


def _write_manifest(bundle: Path, cases: list) -> None:
    (bundle / "manifest.tsv").write_text("".join("\t".join(map(str, case)) + "\n" for case in cases))


def test_run_bundle_writes_what_the_runtime_returned(cpp_bin, tmp_path):
    """float32, int32 and float16 inputs (5-D, 2-D, 1-D) read; every output dtype written back unchanged."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    torch.jit.script(AllDtypes()).save(str(bundle / "dtypes.pt"))
    inputs = {
        "float32": torch.randn(2, 3, 1, 4, 5),
        "int32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4),
        "float16": torch.randn(7).half(),
    }
    for name, x in inputs.items():
        np.save(bundle / f"{name}.in0.npy", x.numpy())
    _write_manifest(bundle, [(name, "torchscript", "dtypes.pt", f"{name}.in0.npy", 8) for name in inputs])
    proc = _run([cpp_bin / "run_bundle", bundle, tmp_path / "results"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, x in inputs.items():
        for k, want in enumerate(AllDtypes()(x)):
            got = np.load(tmp_path / "results" / f"{name}.out{k}.npy")
            assert got.dtype == want.numpy().dtype and got.shape == tuple(want.shape), (name, k)
            assert np.array_equal(got, want.numpy()), (name, k)


def test_run_bundle_reports_a_failing_case_and_runs_the_rest(cpp_bin, bundles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundles["torchscript"], broken)
    inputs = "vq.encode.torchscript.in0.npy"
    np.save(broken / "one_dimensional.npy", np.zeros(7, np.float32))
    _write_manifest(
        broken,
        [
            ("gone.encode.torchscript", "torchscript", "gone.pt", inputs, 1),
            ("vq.encode.onnx", "onnx", "vq.encode.onnx", inputs, 1),  # not its format: skipped
            ("vq.encode.too_many", "torchscript", "vq.encode.pt", inputs, 2),
            ("vq.encode.wrong_rank", "torchscript", "vq.encode.pt", "one_dimensional.npy", 1),
            ("vq.encode.torchscript", "torchscript", "vq.encode.pt", inputs, 1),
        ],
    )
    results = tmp_path / "results"
    proc = _run([cpp_bin / "run_bundle", broken, results])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == [
        "gone.encode.torchscript",
        "vq.encode.too_many",
        "vq.encode.wrong_rank",
        "vq.encode.torchscript",
    ]
    assert lines[0] == f"gone.encode.torchscript FAILED: {broken / 'gone.pt'}: missing"
    assert lines[1] == "vq.encode.too_many FAILED: expected 2 outputs, got 1"
    # a 1-D input where (batch, tokens, dim) was traced: TorchScript's error, not its traceback
    assert lines[2].startswith("vq.encode.wrong_rank FAILED: RuntimeError: Dimension out of range")
    assert lines[3] == "vq.encode.torchscript ok"
    assert sorted(p.name for p in results.iterdir()) == ["vq.encode.torchscript.out0.npy"]


@pytest.mark.parametrize(
    "manifest, message",
    [
        (None, "manifest.tsv: cannot open"),
        ("vq.encode.torchscript\ttorchscript\tvq.pt\tin.npy\n", "line 1: expected 5 tab-separated fields"),
        (
            "a\ttorchscript\ta.pt\ta.npy\t1\nb\ttorchscript\tb.pt\tb.npy\tone\n",
            "line 2: expected a positive number of outputs, got 'one'",
        ),
    ],
)
def test_run_bundle_rejects_a_bad_manifest(cpp_bin, tmp_path, manifest, message):
    if manifest is not None:
        (tmp_path / "manifest.tsv").write_text(manifest)
    proc = _run([cpp_bin / "run_bundle", tmp_path, tmp_path / "results"])
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "results").exists()


def test_run_bundle_usage(cpp_bin):
    proc = _run([cpp_bin / "run_bundle", "only-one-argument"])
    assert proc.returncode == 2 and "usage:" in proc.stderr and "BUNDLE RESULTS" in proc.stderr
