"""`make demo` runs `vqcore demo`; here in a reduced mode (a few steps)."""

import math

import torch

from vqcore.demo import code_statistics, load_digits_vectors, run_demo


def test_digits_split_is_fixed_and_scaled():
    train, test = load_digits_vectors(seed=0)
    assert train.shape == (1438, 64) and test.shape == (359, 64)
    assert float(train.min()) == 0.0 and float(train.max()) == 1.0
    again, _ = load_digits_vectors(seed=0)
    assert torch.equal(train, again)


def test_code_statistics_hand_computed():
    usage, perplexity = code_statistics(torch.tensor([0, 0, 1, 3]), 4)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert usage == 0.75
    assert math.isclose(perplexity, float(torch.exp(-(p * p.log()).sum())), rel_tol=1e-6)


def test_demo_runs_and_beats_the_baselines(capsys):
    result = run_demo(steps=8, codebook_size=64, quiet=True)
    out = capsys.readouterr().out
    assert "held-out reconstruction MSE" in out and "perplexity" in out
    assert result.mse < 0.5 * result.mse_mean_baseline
    assert 0.5 < result.usage <= 1.0 and 1.0 < result.perplexity <= 64
    assert math.isclose(result.psnr, 10 * math.log10(1 / result.mse))
