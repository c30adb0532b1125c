"""``vqcore demo`` (what ``make demo`` runs): fit a VectorQuantize to real data that ships offline.

The data are scikit-learn's handwritten digits: 1,797 8x8 images, i.e. 64-d vectors. The codebook is
fitted the way a tokenizer's bottleneck is, by k-means init and EMA updates in training-mode
forwards (no optimizer needed: EMA works under ``torch.no_grad``), with dead-code expiry. The demo
reports held-out reconstruction MSE (and PSNR), codebook usage and perplexity, next to two baselines:
predicting the mean image and the k-means init alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DemoResult:
    mse: float
    psnr: float
    mse_mean_baseline: float
    mse_after_init: float
    usage: float
    perplexity: float
    codebook_size: int


def load_digits_vectors(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float32 vectors in [0, 1], split into (train, test) with a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - the demo extra installs it
        raise SystemExit("the demo needs scikit-learn: pip install 'vqcore[demo]'") from err
    data = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * data.shape[0]))
    return data[order[n_test:]], data[order[:n_test]]


def code_statistics(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of codes used, perplexity exp(H) of the code distribution) of int indices."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


def _progress(steps: int, quiet: bool):
    if quiet:
        return range(steps)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - the demo extra installs it
        return range(steps)
    return tqdm(range(steps), desc="training VectorQuantize", unit="step")


def run_demo(steps: int = 300, codebook_size: int = 256, seed: int = 0, batch_size: int = 512, quiet: bool = False) -> DemoResult:
    from vqcore import create

    torch.manual_seed(seed)
    train, test = load_digits_vectors(seed)
    vq = create(
        "vq",
        dim=train.shape[1],
        codebook_size=codebook_size,
        decay=0.9,
        kmeans_init=True,
        kmeans_iters=20,
        threshold_ema_dead_code=0.5,
    )
    generator = torch.Generator().manual_seed(seed)

    def evaluate() -> tuple[float, torch.Tensor]:
        vq.eval()
        with torch.no_grad():
            quantized, indices, _ = vq(test)
        vq.train()
        return float((quantized - test).pow(2).mean()), indices

    mse_after_init = math.nan
    vq.train()
    bar = _progress(steps, quiet)
    with torch.no_grad():
        for step in bar:
            batch = train[torch.randint(train.shape[0], (batch_size,), generator=generator)]
            _, _, loss = vq(batch)
            if step == 0:
                mse_after_init, _ = evaluate()
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(commit=f"{float(loss):.4f}")

    mse, indices = evaluate()
    usage, perplexity = code_statistics(indices, codebook_size)
    _, train_indices = vq.eval()(train)[:2]
    train_usage, train_perplexity = code_statistics(train_indices, codebook_size)
    result = DemoResult(
        mse=mse,
        psnr=10 * math.log10(1.0 / mse),
        mse_mean_baseline=float((test - train.mean(0)).pow(2).mean()),
        mse_after_init=mse_after_init,
        usage=usage,
        perplexity=perplexity,
        codebook_size=codebook_size,
    )
    print(f"\nVectorQuantize(dim=64, codebook_size={codebook_size}) on scikit-learn digits "
          f"({train.shape[0]} train / {test.shape[0]} held-out images, {steps} EMA steps)")
    print(f"  held-out reconstruction MSE     {result.mse:.5f}   (PSNR {result.psnr:.2f} dB, pixels in [0, 1])")
    print(f"  after the first step (k-means)  {result.mse_after_init:.5f}")
    print(f"  predicting the mean image       {result.mse_mean_baseline:.5f}")
    print(f"  codebook usage (held-out)       {100 * usage:.1f}%  of {codebook_size} codes")
    print(f"  codebook usage (train)          {100 * train_usage:.1f}%")
    print(f"  perplexity (held-out / train)   {perplexity:.1f} / {train_perplexity:.1f}   "
          f"(max {codebook_size}, {math.log2(codebook_size):.0f} bits per image)")
    return result
