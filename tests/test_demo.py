"""`make demo` runs `vqcore demo`; here in a reduced mode (a few steps, a small model)."""

import json
import math

import numpy as np
import pytest
import torch

from vqcore.cli.demo import (
    GRID,
    TrainingProgress,
    load_digits_images,
    load_digits_vectors,
    run_demo,
    verification_ok,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_digits_split_is_fixed_and_scaled():
    train, test = load_digits_vectors(seed=0)
    assert train.shape == (1438, 64) and test.shape == (359, 64)
    assert float(train.min()) == 0.0 and float(train.max()) == 1.0
    again, _ = load_digits_vectors(seed=0)
    assert torch.equal(train, again)
    images, _ = load_digits_images(seed=0)
    assert images.shape == (1438, 1, 8, 8) and torch.equal(images.reshape(-1, 64), train)


@pytest.mark.parametrize(
    "steps, lines", [(3, [1, 2, 3]), (10, [1, 2, 5, 8, 10]), (300, [1, 75, 150, 225, 300])]
)
def test_progress_off_a_terminal_prints_a_line_per_quarter(capsys, steps, lines):
    progress = TrainingProgress(steps, "training vq tokenizer")
    for done in range(1, steps + 1):
        progress.update(done, torch.tensor(0.125), torch.tensor(0.5))
    progress.close()
    captured = capsys.readouterr()
    printed = captured.err.splitlines()
    assert captured.out == "" and len(printed) == len(lines)
    for line, done in zip(printed, lines):
        assert line.startswith(f"training vq tokenizer: step {done}/{steps} ({100 * done / steps:.0f}%)  ")
        assert "mse 0.1250  aux 0.5000  " in line and line.endswith(" s")


def test_progress_quiet_or_without_steps_prints_nothing(capsys):
    for progress in (TrainingProgress(10, "quiet", quiet=True), TrainingProgress(0, "no steps")):
        for done in range(1, progress.steps + 1):
            progress.update(done, torch.tensor(0.0), torch.tensor(0.0))
        progress.close()
    assert capsys.readouterr() == ("", "")


def test_progress_in_a_terminal_is_a_live_bar(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = TrainingProgress(30, "training vq tokenizer")
    assert progress.bar is not None and not progress.marks
    for done in range(1, 31):
        progress.update(done, torch.tensor(0.25), torch.tensor(0.0))
    progress.close()
    text = terminal.getvalue()
    assert "\r" in text and "30/30" in text and "mse=0.2500" in text  # a bar redrawn in place


def test_verification_ok_thresholds():
    good = {"token_agreement": 1.0, "detokenizer_max_abs_diff": 1e-6}
    assert verification_ok({"onnxruntime": good, "torchscript_subprocess": good})
    bad = {"token_agreement": 0.9, "detokenizer_max_abs_diff": 1e-6}
    assert not verification_ok({"onnxruntime": good, "torchscript_subprocess": bad})


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > 1000


@pytest.mark.parametrize("quantizer", ["fsq", "rvq", "grouped_rvq"])
def test_demo_end_to_end_writes_every_artifact(tmp_path, capsys, quantizer):
    import onnx

    from vqcore.cli import main
    from vqcore.export import read_metadata

    out = tmp_path / "demo"
    result = run_demo(quantizer, steps=30, out=out, dim=8, width=16, batch_size=64)
    captured = capsys.readouterr()
    printed = captured.out
    for needle in (
        "reconstruction MSE",
        "PSNR",
        "bits per image",
        "codebooks on the 359 held-out images (vqcore.metrics.CodebookMonitor):",
        "book ",
        "quantization error: mse ",
        "onnxruntime",
        "TorchScript (fresh process)",
        f"vqcore stats {out / 'quantizer.safetensors'} {out / 'heldout_latents.npy'}",
    ):
        assert needle in printed
    # not a terminal: one progress line at 0%, 25%, 50%, 75% and 100% of the 30 steps, not a bar
    progress = [line for line in captured.err.splitlines() if line.startswith("training ")]
    assert [line.split()[4] for line in progress] == ["1/30", "8/30", "15/30", "22/30", "30/30"]

    names = {
        "reconstructions.png",
        "code_usage.png",
        "tokenizer.onnx",
        "tokenizer.pt",
        "detokenizer.onnx",
        "detokenizer.pt",
        "summary.json",
        "quantizer.safetensors",
        "heldout_latents.npy",
        "heldout_images.npy",
        "heldout_tokens.npy",
        "heldout_decoded.npy",
    }
    assert names <= {p.name for p in out.iterdir()}
    # the consumers' check files: the held-out images, their eager tokens and decoded images
    images, ids = np.load(out / "heldout_images.npy"), np.load(out / "heldout_tokens.npy")
    assert images.shape == (359, 1, 8, 8) and images.dtype == np.float32
    assert ids.dtype == np.int64 and 359 in ids.shape and ids.size % (359 * GRID * GRID) == 0
    assert np.load(out / "heldout_decoded.npy").shape == images.shape
    assert _is_png(out / "reconstructions.png") and _is_png(out / "code_usage.png")
    for name in ("tokenizer.onnx", "detokenizer.onnx"):
        onnx.checker.check_model(onnx.load(str(out / name)))
    for name in ("tokenizer.onnx", "tokenizer.pt", "detokenizer.onnx", "detokenizer.pt"):
        meta = read_metadata(out / name)
        assert meta["graph"] == ("encode" if name.startswith("tokenizer") else "decode")

    # every artifact reproduces the eager model on all held-out images (ONNX in onnxruntime,
    # TorchScript in a fresh process)
    assert result.verification["images"] == 359
    assert verification_ok(result.verification)

    # sane numbers
    layers = {"fsq": 1, "rvq": 2, "grouped_rvq": 2}[quantizer]  # grouped: 2 groups x 1 layer
    assert len(result.layers) == layers and result.tokens_per_image == GRID * GRID
    size = result.layers[0].codebook_size
    assert math.isclose(result.bits_per_image, GRID * GRID * layers * math.log2(size))
    assert 0 < result.mse < 0.25  # 30 steps: sane, not yet good (predicting zeros gives ~0.12)
    assert math.isclose(result.psnr, 10 * math.log10(1 / result.mse))
    for layer in result.layers:
        assert 0 < layer.usage <= 1 and 1 <= layer.perplexity <= size
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantizer"] == quantizer and math.isclose(summary["mse"], result.mse)

    # summary.json: the per-book layers are the monitor's report, which is under "codebook"
    report = summary["codebook"]
    books = {"fsq": [""], "rvq": ["layer0", "layer1"], "grouped_rvq": ["group0/layer0", "group1/layer0"]}
    assert [layer["book"] for layer in summary["layers"]] == books[quantizer]
    for layer in summary["layers"]:
        prefix = f"{quantizer}/{layer['book']}/" if layer["book"] else f"{quantizer}/"
        assert (
            layer["usage"] == report[prefix + "usage"]
            and layer["perplexity"] == report[prefix + "perplexity"]
        )
        assert report[prefix + "tokens"] == 359 * GRID * GRID
        assert report[prefix + "nominal_bits"] == math.log2(size)
    # residual stacks: each layer's share of the held-out error (of all groups together)
    shares = sorted(key for key in report if key.endswith("/energy_share"))
    assert (
        shares
        == {
            "fsq": [],
            "rvq": ["rvq/layer0/energy_share", "rvq/layer1/energy_share"],
            "grouped_rvq": ["grouped_rvq/layer0/energy_share"],
        }[quantizer]
    )

    # the saved quantizer and latents give `vqcore stats` the demo's own held-out report
    latents = np.load(out / "heldout_latents.npy")
    assert latents.dtype == np.float32 and latents.shape == (359, GRID * GRID, 8)
    assert (
        main(["stats", str(out / "quantizer.safetensors"), str(out / "heldout_latents.npy"), "--json"]) == 0
    )
    stats = json.loads(capsys.readouterr().out)
    assert stats.keys() == report.keys()
    for key, value in report.items():  # counts exactly; the error sums in float32, batched differently
        counted = not key.endswith(("mse", "relative_error", "/error", "energy_share"))
        assert math.isclose(stats[key], value, rel_tol=1e-12 if counted else 1e-4), key


def test_demo_learns_in_a_short_run(tmp_path):
    """A couple hundred steps already beat predicting the mean image by far (no export: fast)."""
    result = run_demo("fsq", steps=150, out=tmp_path, dim=8, width=32, export=False, quiet=True)
    assert result.mse < 0.5 * result.mse_mean_baseline
    assert result.layers[0].usage > 0.05


def test_cli_demo_options(tmp_path, capsys):
    from vqcore.cli import main

    rc = main(
        [
            "demo",
            "--quantizer",
            "vq",
            "--set",
            "codebook_size=32",
            "--steps",
            "3",
            "--dim",
            "8",
            "--width",
            "8",
            "--out",
            str(tmp_path),
            "--no-export",
            "--quiet",
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quantizer"] == "vq" and summary["kwargs"]["codebook_size"] == 32
    assert summary["layers"][0]["codebook_size"] == 32 and summary["artifacts"].keys() >= {
        "reconstructions.png",
        "code_usage.png",
    }
    assert "reconstruction MSE" in capsys.readouterr().out


def test_readme_picture_is_committed_small_and_shown():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    picture = root / "docs" / "images" / "demo_reconstructions.png"
    assert _is_png(picture) and picture.stat().st_size < 200_000
    assert "](docs/images/demo_reconstructions.png)" in (root / "README.md").read_text()


def test_quality_benchmark_vq_matches_faiss_kmeans(tmp_path, capsys):
    """benchmarks/bench_quality.py: VectorQuantize (kmeans_init + EMA, 256 codes) within 3% of faiss
    k-means with >= 95% codes used (exit code 0); the projected methods get only a few steps here."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("faiss")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "quality.md"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--steps", "20", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    table = out.read_text()
    assert "PASS" in table and "| faiss k-means" in table
    for method in (
        "VectorQuantize 256",
        "ResidualVQ 2 x 16",
        "FSQ [4, 4, 4, 4]",
        "LFQ 256",
        "LatentQuantize",
    ):
        assert f"| {method}" in table
