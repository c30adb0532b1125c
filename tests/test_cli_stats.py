"""`vqcore stats CHECKPOINT DATA.npy`: a saved quantizer's codebook health on data, read by the monitor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vqcore
from vqcore.cli import main
from vqcore.metrics import CodebookMonitor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(table: str, book: str) -> list[str]:
    """The cells of the table row of ``book`` (its first cell)."""
    return next(line.split() for line in table.splitlines() if line.split()[:1] == [book])


@pytest.fixture
def vq_three_codes(tmp_path):
    """A saved VectorQuantize of 4 codes and data made of its codes 0, 1, 2 used 3, 2 and 1 times (6
    vectors as 3 samples of 2 tokens): code 3 is never used."""
    torch.manual_seed(0)
    quantizer = vqcore.create("vq", dim=2, codebook_size=4)
    checkpoint = tmp_path / "vq.safetensors"
    vqcore.save(quantizer, checkpoint)
    features = quantizer.codebook[[0, 1, 2, 0, 0, 1]].reshape(3, 2, 2).detach().numpy().astype(np.float32)
    data = tmp_path / "features.npy"
    np.save(data, features)
    return checkpoint, data


def test_stats_table_counts_three_used_codes_of_four(vq_three_codes, capsys):
    checkpoint, data = vq_three_codes
    assert main(["stats", str(checkpoint), str(data), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith(f"{checkpoint}: vq (VectorQuantize), 3 samples of {data} (3, 2, 2)")
    assert "6 vectors of dim 2 counted" in header
    # one book: codes, tokens, used, usage, perplexity, bits / nominal, dead, rare
    p = torch.tensor([3, 2, 1], dtype=torch.float64) / 6
    entropy = float(-(p * p.log()).sum())
    codes, tokens, used, usage, perplexity, bits, _, nominal, dead, rare = _row(out, "vq")[1:]
    assert (codes, tokens, used, usage, dead) == ("4", "6", "3", "75.0%", "1")
    assert perplexity == f"{math.exp(entropy):.1f}" and bits == f"{entropy / math.log(2):.2f}"
    assert nominal == "2.00" and rare == "1"  # only the dead code is below 1% of a uniform share
    # the features are the codes themselves: no quantization error
    assert "quantization error: mse 0, relative 0 " in out


def test_stats_json_and_out_files(vq_three_codes, tmp_path, capsys):
    checkpoint, data = vq_three_codes
    out_dir = tmp_path / "report"
    assert main(["stats", str(checkpoint), str(data), "--json", "--out", str(out_dir)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout is the JSON alone
    assert captured.err == f"wrote {out_dir / 'codebook_usage.png'} and {out_dir / 'codebook_stats.json'}\n"
    written_text = (out_dir / "codebook_stats.json").read_text()
    written = json.loads(written_text)
    assert written == printed and list(written) == sorted(written)
    assert set(written) == {
        f"vq/{key}"
        for key in (
            "tokens",
            "used_codes",
            "usage",
            "dead_codes",
            "rare_codes",
            "perplexity",
            "bits",
            "nominal_bits",
            "mse",
            "relative_error",
        )
    }
    assert (written["vq/tokens"], written["vq/used_codes"], written["vq/dead_codes"]) == (6, 3, 1)
    assert written["vq/usage"] == 0.75 and written["vq/mse"] == 0.0 and written["vq/nominal_bits"] == 2.0
    p = np.array([3, 2, 1]) / 6
    assert math.isclose(written["vq/perplexity"], math.exp(-(p * np.log(p)).sum()), rel_tol=1e-12)
    assert (out_dir / "codebook_usage.png").read_bytes()[:8] == PNG_SIGNATURE


def test_stats_of_a_residual_stack_equal_the_monitor_in_one_batch(tmp_path, capsys):
    """Batches of 7 samples give what one monitor fed all the data at once reports, per-layer errors
    included."""
    torch.manual_seed(1)
    quantizer = vqcore.create("rvq", dim=4, codebook_size=8, num_quantizers=3)
    checkpoint = tmp_path / "rvq.safetensors"
    vqcore.save(quantizer, checkpoint)
    features = torch.randn(30, 5, 4)
    data = tmp_path / "features.npy"
    np.save(data, features.numpy())

    monitor = CodebookMonitor(quantizer.eval(), hooks=False)
    with torch.no_grad():
        monitor.update(quantizer.encode(features), x=features)
    expected = monitor.report()

    assert main(["stats", str(checkpoint), str(data), "--batch-size", "7", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report.keys() == expected.keys()
    assert {"rvq/layer2/error", "rvq/layer0/energy_share", "rvq/layer1/perplexity"} <= report.keys()
    errors = ("mse", "relative_error", "error", "energy_share")  # float32 sums per batch, not per call
    for key, value in expected.items():
        tolerance = 1e-6 if key.rsplit("/", 1)[-1] in errors else 1e-12  # counts: exactly
        assert math.isclose(report[key], value, rel_tol=tolerance), key
    assert report["rvq/layer0/tokens"] == 150  # 30 samples x 5 tokens, per layer

    assert main(["stats", str(checkpoint), str(data), "--batch-size", "7"]) == 0
    table = capsys.readouterr().out
    counts = monitor.counts()
    for layer in range(3):
        row = _row(table, f"layer{layer}")
        assert row[2:4] == ["150", str(int((counts[f"layer{layer}"] > 0).sum()))]
        assert row[5] == f"{expected[f'rvq/layer{layer}/perplexity']:.1f}"
    # the per-layer error table comes last
    assert table.rstrip().splitlines()[-1].split() == [
        "layer2",
        f"{100 * expected['rvq/layer2/energy_share']:.1f}%",
        f"{expected['rvq/layer2/error']:.4g}",
    ]


def _save_array(path, array) -> str:
    np.save(path, array)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing checkpoint", "vqcore stats: checkpoint {tmp}/none.safetensors does not exist"),
        (
            "text as checkpoint",
            "vqcore stats: {tmp}/notes.txt is not a vqcore checkpoint (not a complete safetensors file",
        ),
        ("plain safetensors", "vqcore stats: {tmp}/plain.safetensors is not a vqcore checkpoint (metadata"),
        ("missing data", "vqcore stats: data file {tmp}/none.npy does not exist"),
        ("text as data", "vqcore stats: {tmp}/notes.txt is not a .npy file (no NUMPY header)"),
        (
            "npz data",
            "vqcore stats: {tmp}/arrays.npz is a .npz archive: save one float array with numpy.save",
        ),
        (
            "integer data",
            "vqcore stats: {tmp}/ints.npy holds int64 values: the quantizer takes floating-point",
        ),
        (
            "wrong last axis",
            "vqcore stats: {tmp}/dim3.npy has shape (4, 5, 3): its last axis holds 3 features",
        ),
        ("no batch axis", "vqcore stats: {tmp}/flat.npy has shape (4,): it needs a batch axis first"),
    ],
)
def test_stats_bad_input_exits_2_with_one_line(tmp_path, capsys, case, message):
    from safetensors.torch import save_file

    quantizer = vqcore.create("vq", dim=4, codebook_size=8)
    checkpoint = str(tmp_path / "vq.safetensors")
    vqcore.save(quantizer, checkpoint)
    good = _save_array(tmp_path / "good.npy", np.zeros((4, 5, 4), np.float32))
    (tmp_path / "notes.txt").write_text("not an array\n")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    argv = {
        "missing checkpoint": [str(tmp_path / "none.safetensors"), good],
        "text as checkpoint": [str(tmp_path / "notes.txt"), good],
        "plain safetensors": [str(tmp_path / "plain.safetensors"), good],
        "missing data": [checkpoint, str(tmp_path / "none.npy")],
        "text as data": [checkpoint, str(tmp_path / "notes.txt")],
        "npz data": [checkpoint, str(tmp_path / "arrays.npz")],
        "integer data": [checkpoint, _save_array(tmp_path / "ints.npy", np.zeros((4, 5, 4), np.int64))],
        "wrong last axis": [checkpoint, _save_array(tmp_path / "dim3.npy", np.zeros((4, 5, 3), np.float32))],
        "no batch axis": [checkpoint, _save_array(tmp_path / "flat.npy", np.zeros(4, np.float32))],
    }[case]
    assert main(["stats", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message.format(tmp=tmp_path)) and captured.err.count("\n") == 1


def test_stats_batch_size_must_be_positive(vq_three_codes, capsys):
    checkpoint, data = vq_three_codes
    with pytest.raises(SystemExit) as info:
        main(["stats", str(checkpoint), str(data), "--batch-size", "0"])
    assert info.value.code == 2
    assert "argument --batch-size: expected a positive integer, got 0" in capsys.readouterr().err


def test_stats_reports_an_encode_failure_in_one_line(vq_three_codes, monkeypatch, capsys):
    """Data that passes the file checks but that the quantizer's encode rejects: its message, one line."""
    import vqcore.serialization

    checkpoint, data = vq_three_codes
    real_load = vqcore.serialization.load

    def load_rejecting(path, device="cpu"):
        quantizer = real_load(path, device=device)

        def encode(x):
            raise ValueError("expected tokens\nof another kind")

        quantizer.encode = encode
        return quantizer

    monkeypatch.setattr(vqcore.serialization, "load", load_rejecting)
    assert main(["stats", str(checkpoint), str(data)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"vqcore stats: the quantizer cannot encode {data} (shape (3, 2, 2)): "
        "expected tokens of another kind\n"
    )
