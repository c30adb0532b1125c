"""``vqcore demo`` (what ``make demo`` runs): train a small convolutional VQ-VAE tokenizer on real data
that ships offline, look at the result, and export it.

The data are scikit-learn's handwritten digits: 1,797 8x8 grey images (pixels in [0, 1]), split into
train and held-out images with a fixed permutation. A small conv encoder maps each image to a 4x4 grid
of latent vectors (16 tokens), a quantizer from the registry (``--quantizer``, any registered name)
turns each into a code, and a conv decoder maps the codes back to the image. Training is Adam on the
reconstruction MSE plus the quantizer's own loss (commitment, entropy, ...); codebook-based methods
also update their codebooks by EMA in the training-mode forwards.

After training, a :class:`vqcore.metrics.CodebookMonitor` attached to the quantizer counts the codes of
the evaluation forward on the held-out images (usage, perplexity, dead and rare codes per book, the
quantization error and, for residual stacks, each layer's share of it). At the end the demo prints a
summary (held-out MSE and PSNR, bits per image, the monitor's table) and writes to the output folder:

- ``reconstructions.png``: held-out originals above their reconstructions;
- ``code_usage.png``: the monitor's plot: each book's codes sorted by usage, its perplexity against its
  codebook size;
- ``tokenizer.onnx`` / ``tokenizer.pt`` (images ``(B, 1, 8, 8)`` float32 -> token ids ``(B, 16[, layers])``
  int64) and ``detokenizer.onnx`` / ``detokenizer.pt`` (ids -> images), built with
  :class:`vqcore.export.Tokenizer` / :class:`vqcore.export.Detokenizer`; each is verified at export
  time (onnxruntime, reloaded TorchScript), then again on every held-out image: the ONNX files in
  onnxruntime and the TorchScript files in a fresh Python process, against the eager modules;
- with ``aoti=True`` (``vqcore demo --aoti``) also ``tokenizer.pt2`` / ``detokenizer.pt2``, AOTInductor
  packages compiled for this machine (a C++ compiler is needed; each is parity-checked like the others);
- ``heldout_images.npy`` (float32 ``(N, 1, 8, 8)``), ``heldout_tokens.npy`` (their token ids from the
  eager tokenizer) and ``heldout_decoded.npy`` (the eager detokenizer's images of those ids): what the
  consumers outside Python (``examples/cpp``, ``examples/node``, ``examples/web``) check their runs of
  the artifacts against;
- ``quantizer.safetensors`` (:func:`vqcore.save`) and ``heldout_latents.npy`` (the encoder's outputs on
  the held-out images, float32 ``(N, 16, dim)``: the quantizer's input), so that
  ``vqcore stats OUT/quantizer.safetensors OUT/heldout_latents.npy`` reads the same codebook report
  again, or on other latents;
- ``summary.json``: the numbers above, per-book ``layers`` (usage, perplexity) and the monitor's flat
  report under ``codebook``.

Training progress goes to stderr: a live bar in a terminal, else (CI logs) one line at 0%, 25%, 50%, 75%
and 100% of the steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vqcore.cli import report_json
from vqcore.metrics import CodebookMonitor
from vqcore.serialization import save as save_quantizer

GRID = 4  # latent grid side: 8x8 images -> 4x4 tokens
PIXEL_LEVELS = 17  # the digits' pixels take the values 0..16

# the VQ family's EMA codebook settings for this small dataset
_EMA = dict(decay=0.9, kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=1, commitment_weight=0.25)

# registry name -> constructor kwargs of the bottleneck (besides dim); --set overrides any of them
PRESETS: dict[str, dict] = {
    "vq": dict(codebook_size=256, codebook_dim=8, **_EMA),
    "rvq": dict(codebook_size=64, num_quantizers=2, codebook_dim=8, **_EMA),
    "grouped_rvq": dict(codebook_size=64, num_quantizers=1, groups=2, **_EMA),
    "fsq": dict(levels=[8, 5, 5, 5]),
    "residual_fsq": dict(levels=[4, 4, 4], num_quantizers=2),
    "lfq": dict(codebook_size=256, entropy_loss_weight=0.1),
    "residual_lfq": dict(codebook_size=16, num_quantizers=2, entropy_loss_weight=0.1),
    "latent": dict(levels=[8, 5, 5, 5]),
}
DEFAULT_QUANTIZER = "vq"


@dataclass
class LayerStats:
    """One book of the quantizer (a layer, a group's layer, a head) as the held-out report gives it;
    ``book`` is its key segment in the monitor's report (``""`` for a single book)."""

    layer: int
    codebook_size: int
    usage: float
    perplexity: float
    book: str = ""


@dataclass
class DemoResult:
    quantizer: str
    kwargs: dict
    steps: int
    mse: float
    psnr: float
    mse_mean_baseline: float
    layers: list[LayerStats]
    tokens_per_image: int
    bits_per_image: float
    train_seconds: float
    total_seconds: float
    out: str
    artifacts: dict[str, str] = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    codebook: dict[str, float | None] = field(default_factory=dict)  # CodebookMonitor.report(), held out

    @property
    def usage(self) -> float:
        return min(layer.usage for layer in self.layers)

    @property
    def perplexity(self) -> float:
        return self.layers[0].perplexity


# -- data and statistics -----------------------------------------------------------------------------


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


def load_digits_images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same split as images ``(N, 1, 8, 8)``."""
    train, test = load_digits_vectors(seed)
    return train.reshape(-1, 1, 8, 8), test.reshape(-1, 1, 8, 8)


def psnr(mse: float) -> float:
    """PSNR in dB of pixels in [0, 1]."""
    return 10 * math.log10(1.0 / mse)


def ids_batch_axis(quantizer: nn.Module, indices: torch.Tensor) -> int:
    """The batch axis of token ids: 1 for groups-first ids ``(groups, B, tokens, layers)``, else 0."""
    return 1 if getattr(quantizer, "groups", 1) > 1 and indices.ndim == 4 else 0


# -- the model ---------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """(B, 1, 8, 8) images -> (B, 16, dim) tokens (a 4x4 grid, row-major)."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),
            nn.GELU(),  # 8x8 -> 4x4
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, dim, 1),
        )

    def forward(self, x):
        return self.net(x).flatten(2).transpose(1, 2)


class Decoder(nn.Module):
    """(B, 16, dim) tokens -> (B, 1, 8, 8) images."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            nn.GELU(),  # 4x4 -> 8x8
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, z):
        return self.net(z.transpose(1, 2).unflatten(2, (GRID, GRID)))


class VQVAE(nn.Module):
    def __init__(self, quantizer: nn.Module, dim: int, width: int = 64):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = Encoder(dim, width), quantizer, Decoder(dim, width)

    def forward(self, x):
        out = self.quantizer(self.encoder(x))
        aux = out[2].sum() if len(out) > 2 and torch.is_tensor(out[2]) else x.new_zeros(())
        return self.decoder(out[0]), out[1], aux


def build_quantizer(name: str, dim: int, overrides: dict | None = None) -> tuple[nn.Module, dict]:
    """The bottleneck: ``vqcore.create(name, dim=dim, **preset, **overrides)`` and its kwargs (with the
    canonical name). Raises :class:`vqcore.errors.MissingArgumentsError` naming the arguments a
    quantizer without a preset requires."""
    from vqcore import create, get_entry

    canonical = get_entry(name).name
    kwargs = {**PRESETS.get(canonical, {}), **(overrides or {})}
    return create(canonical, dim=dim, **kwargs), {"name": canonical, **kwargs}


# -- reporting ---------------------------------------------------------------------------------------


class TrainingProgress:
    """Training progress on stderr: in a terminal a live tqdm bar (mse and aux every 25 steps); elsewhere
    (CI logs, pipes) one line at 0%, 25%, 50%, 75% and 100% of the steps; nothing when ``quiet``.
    Reads the loss tensors only when it shows them."""

    def __init__(self, steps: int, desc: str, quiet: bool = False):
        self.steps, self.desc, self.start = steps, desc, time.perf_counter()
        self.bar = None
        self.marks: set[int] = set()
        if quiet or steps < 1:
            return
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True)
                return
            except ImportError:  # pragma: no cover - the demo extra installs it
                pass
        self.marks = {max(1, round(steps * quarter / 4)) for quarter in range(5)}

    def update(self, done: int, mse: torch.Tensor, aux: torch.Tensor) -> None:
        """``done`` steps are finished, the last one with these losses."""
        if self.bar is not None:
            self.bar.update(1)
            if done % 25 == 1:
                self.bar.set_postfix(mse=f"{mse.item():.4f}", aux=f"{aux.item():.4f}")
        elif done in self.marks:
            print(
                f"{self.desc}: step {done}/{self.steps} ({100 * done / self.steps:.0f}%)  "
                f"mse {mse.item():.4f}  aux {aux.item():.4f}  {time.perf_counter() - self.start:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_reconstructions(
    path,
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    columns: int = 12,
    rows: int = 2,
    title: str = "",
):
    """``rows`` pairs of rows: originals above their reconstructions (held-out images)."""
    plt = _pyplot()
    n = min(columns * rows, originals.shape[0])
    fig, axes = plt.subplots(2 * rows, columns, figsize=(columns * 0.62, 2 * rows * 0.68 + 0.35), dpi=80)
    for i in range(columns * rows):
        r, c = divmod(i, columns)
        for k, images in enumerate((originals, reconstructions)):
            ax = axes[2 * r + k, c]
            ax.set_xticks([]), ax.set_yticks([])
            if i < n:
                ax.imshow(
                    images[i, 0].clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest"
                )
            if c == 0:
                ax.set_ylabel("original" if k == 0 else "decoded", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.2, h_pad=0.1, w_pad=0.1)
    fig.savefig(path)
    plt.close(fig)


# -- export and verification -------------------------------------------------------------------------

_TORCHSCRIPT_CHECK = r"""
import json, sys, torch
data = torch.load(sys.argv[1])
tok, detok = torch.jit.load(sys.argv[2]), torch.jit.load(sys.argv[3])
with torch.no_grad():
    ids, images = tok(data["images"]), detok(data["ids"])
ids = ids[0] if isinstance(ids, (tuple, list)) else ids
images = images[0] if isinstance(images, (tuple, list)) else images
print(json.dumps({
    "token_agreement": float((ids == data["ids"]).float().mean()),
    "detokenizer_max_abs_diff": float((images - data["decoded"]).abs().max()),
}))
"""


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def export_and_verify(model: VQVAE, images: torch.Tensor, out: Path, aoti: bool = False) -> tuple[dict, dict]:
    """Export the tokenizer / detokenizer (ONNX, TorchScript; with ``aoti`` also AOTInductor packages),
    each parity-checked by vqcore.export, then run every artifact on ``images`` (ONNX in onnxruntime,
    TorchScript in a fresh process)."""
    from vqcore.export import Detokenizer, Tokenizer, to_onnx, to_pt2, to_torchscript
    from vqcore.export.writers import onnxruntime_runner

    tokenizer = Tokenizer(model.encoder, model.quantizer).eval()
    detokenizer = Detokenizer(model.quantizer, model.decoder).eval()
    with torch.no_grad():
        ids = _first(tokenizer(images))
        decoded = _first(detokenizer(ids))
    paths = {
        "tokenizer.onnx": out / "tokenizer.onnx",
        "tokenizer.pt": out / "tokenizer.pt",
        "detokenizer.onnx": out / "detokenizer.onnx",
        "detokenizer.pt": out / "detokenizer.pt",
        "heldout_images.npy": out / "heldout_images.npy",
        "heldout_tokens.npy": out / "heldout_tokens.npy",
        "heldout_decoded.npy": out / "heldout_decoded.npy",
    }
    # what a consumer outside Python checks its runs against (examples/cpp, examples/node, examples/web)
    np.save(paths["heldout_images.npy"], images.numpy().astype(np.float32))
    np.save(paths["heldout_tokens.npy"], ids.numpy())
    np.save(paths["heldout_decoded.npy"], decoded.numpy().astype(np.float32))
    batch = ids_batch_axis(model.quantizer, ids)
    example_images, example_ids = images[:4], ids.narrow(batch, 0, 4).contiguous()
    to_onnx(tokenizer, paths["tokenizer.onnx"], example=example_images, dynamic_dims=(0,))
    to_torchscript(tokenizer, paths["tokenizer.pt"], example=example_images, dynamic_dims=(0,))
    to_onnx(detokenizer, paths["detokenizer.onnx"], example=example_ids, dynamic_dims=(batch,))
    to_torchscript(detokenizer, paths["detokenizer.pt"], example=example_ids, dynamic_dims=(batch,))
    if aoti:  # compiled for this machine (needs a C++ compiler): what examples/cpp loads besides TorchScript
        paths["tokenizer.pt2"], paths["detokenizer.pt2"] = out / "tokenizer.pt2", out / "detokenizer.pt2"
        to_pt2(tokenizer, paths["tokenizer.pt2"], example=example_images, dynamic_dims=(0,), aoti=True)
        to_pt2(detokenizer, paths["detokenizer.pt2"], example=example_ids, dynamic_dims=(batch,), aoti=True)

    verification: dict = {"images": int(images.shape[0])}
    onnx_ids = _first(onnxruntime_runner(str(paths["tokenizer.onnx"]), ["CPUExecutionProvider"])(images))
    onnx_images = _first(onnxruntime_runner(str(paths["detokenizer.onnx"]), ["CPUExecutionProvider"])(ids))
    verification["onnxruntime"] = {
        "token_agreement": float((onnx_ids == ids).float().mean()),
        "detokenizer_max_abs_diff": float((onnx_images - decoded).abs().max()),
    }
    reference = out / "reference.pt"
    torch.save({"images": images, "ids": ids, "decoded": decoded}, reference)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _TORCHSCRIPT_CHECK,
                str(reference),
                str(paths["tokenizer.pt"]),
                str(paths["detokenizer.pt"]),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        reference.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the TorchScript artifacts failed in a fresh process:\n{proc.stderr[-2000:]}")
    verification["torchscript_subprocess"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: str(v) for k, v in paths.items()}, verification


def verification_ok(verification: dict, min_agreement: float = 0.999, atol: float = 1e-4) -> bool:
    """Artifacts agree with eager: (near-)identical tokens (ties of distance-based codebooks may flip a
    rare id) and decoded images within ``atol``."""
    runs = [verification[k] for k in ("onnxruntime", "torchscript_subprocess")]
    return all(r["token_agreement"] >= min_agreement and r["detokenizer_max_abs_diff"] <= atol for r in runs)


# -- the demo ----------------------------------------------------------------------------------------


def run_demo(
    quantizer: str = DEFAULT_QUANTIZER,
    steps: int = 1200,
    out: str | os.PathLike = "demo-output",
    *,
    dim: int = 16,
    width: int = 64,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    overrides: dict | None = None,
    export: bool = True,
    quiet: bool = False,
    aoti: bool = False,
) -> DemoResult:
    """Train, evaluate, plot and export; see the module docstring. Returns the numbers it printed."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    q, kwargs = build_quantizer(quantizer, dim, overrides)  # bad arguments fail before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits_images(seed)
    model = VQVAE(q, dim, width)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)

    model.train()
    progress = TrainingProgress(steps, f"training {kwargs['name']} tokenizer", quiet)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = train[torch.randint(train.shape[0], (batch_size,), generator=generator)]
        recon, _, aux = model(batch)
        mse = (recon - batch).pow(2).mean()
        loss = mse + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(step + 1, mse, aux)
    progress.close()
    train_seconds = time.perf_counter() - t0

    model.eval()
    with CodebookMonitor(q, layer_errors=True) as monitor, torch.no_grad():
        recon, _, _ = model(test)  # the monitor counts this forward's codes and errors
        latents = model.encoder(test)
        codebook, table = monitor.report(), monitor.table()
        monitor.plot(out / "code_usage.png")
    mse = float((recon - test).pow(2).mean())
    tokens = GRID * GRID
    layers = [
        LayerStats(
            i,
            b.size,
            codebook[monitor.key(b.name, "usage")],
            codebook[monitor.key(b.name, "perplexity")],
            b.name,
        )
        for i, b in enumerate(monitor.books)
    ]
    bits = tokens * codebook[f"{monitor.name}/nominal_bits"]

    title = f"{kwargs['name']}: {tokens} tokens x {len(layers)} book(s) = {bits:.0f} bits per image"
    save_reconstructions(
        out / "reconstructions.png",
        test,
        recon,
        title=f"held-out digits, {title}; MSE {mse:.4f}, PSNR {psnr(mse):.1f} dB",
    )
    save_quantizer(q, out / "quantizer.safetensors")
    np.save(out / "heldout_latents.npy", latents.numpy().astype(np.float32))
    artifacts = {
        name: str(out / name)
        for name in ("reconstructions.png", "code_usage.png", "quantizer.safetensors", "heldout_latents.npy")
    }
    verification: dict = {}
    if export:
        exported, verification = export_and_verify(model, test, out, aoti=aoti)
        artifacts.update(exported)

    result = DemoResult(
        quantizer=kwargs["name"],
        kwargs=kwargs,
        steps=steps,
        mse=mse,
        psnr=psnr(mse),
        mse_mean_baseline=float((test - train.mean(0)).pow(2).mean()),
        layers=layers,
        tokens_per_image=tokens,
        bits_per_image=bits,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - start,
        out=str(out),
        artifacts=artifacts,
        verification=verification,
        codebook=report_json(codebook),
    )
    (out / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    artifacts["summary.json"] = str(out / "summary.json")
    print_summary(result, n_train=train.shape[0], n_test=test.shape[0], table=table)
    if export and not verification_ok(verification):
        raise RuntimeError(f"exported artifacts disagree with the eager model: {verification}")
    return result


def print_summary(r: DemoResult, n_train: int, n_test: int, table: str) -> None:
    """The summary of a demo run; ``table`` is the held-out CodebookMonitor table."""
    raw_bits = 64 * math.log2(PIXEL_LEVELS)
    print(
        f"\nconv VQ-VAE tokenizer with {r.quantizer} on scikit-learn digits "
        f"({n_train} train / {n_test} held-out 8x8 images, {r.steps} steps, {r.train_seconds:.0f} s training)"
    )
    print(f"  quantizer kwargs: {json.dumps({k: v for k, v in r.kwargs.items() if k != 'name'})}")
    print()
    print("| metric (held-out) | value |")
    print("|---|---|")
    print(f"| reconstruction MSE | {r.mse:.5f} (mean-image baseline {r.mse_mean_baseline:.5f}) |")
    print(f"| PSNR | {r.psnr:.2f} dB |")
    print(f"| tokens per image | {r.tokens_per_image} ({GRID}x{GRID} grid) x {len(r.layers)} book(s) |")
    print(f"| bits per image | {r.bits_per_image:.1f} (raw pixels: {raw_bits:.0f}) |")
    print()
    print(f"codebooks on the {n_test} held-out images (vqcore.metrics.CodebookMonitor):")
    print(table)
    print()
    if r.verification:
        onnx, ts = r.verification["onnxruntime"], r.verification["torchscript_subprocess"]
        print(
            f"exported and verified on {r.verification['images']} held-out images "
            f"(token agreement / max |decoded diff| vs eager):"
        )
        print(
            f"  onnxruntime                      {100 * onnx['token_agreement']:.2f}% / "
            f"{onnx['detokenizer_max_abs_diff']:.2g}"
        )
        print(
            f"  TorchScript (fresh process)      {100 * ts['token_agreement']:.2f}% / "
            f"{ts['detokenizer_max_abs_diff']:.2g}"
        )
    print(f"wrote to {r.out}/:")
    for name in sorted(r.artifacts):
        print(f"  {name}")
    print(f"total {r.total_seconds:.0f} s")
    out = Path(r.out)
    print(
        f"codebook report again, or on other latents: "
        f"vqcore stats {out / 'quantizer.safetensors'} {out / 'heldout_latents.npy'} [--out DIR]"
    )
