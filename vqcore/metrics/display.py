"""The codebook monitor's report as a text table and as a PNG (matplotlib, the ``demo`` extra)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vqcore.metrics.monitor import BookInfo


def report_key(name: str, book: str, metric: str) -> str:
    """A book's key in a monitor's report: ``name/book/metric``, or ``name/metric`` for a single book
    (``book == ""``) and for the aggregates over books."""
    return f"{name}/{book}/{metric}" if book else f"{name}/{metric}"


def format_table(name: str, books: Sequence[BookInfo], report: Mapping[str, float]) -> str:
    """One row per book (codes, tokens, used codes, usage, perplexity, bits of nominal bits, dead and rare
    codes), a total row for several books, then the per-layer errors of a residual stack."""
    headers = ["book", "codes", "tokens", "used", "usage", "perplexity", "bits / nominal", "dead", "rare"]
    rows = []

    def get(what: str, book: str = "") -> float:
        return report[report_key(name, book, what)]

    for b in books:
        approx = "" if b.exact else "~"
        rare = get("rare_codes", b.name)
        rows.append(
            [
                b.name or name,
                f"{b.size}",
                f"{get('tokens', b.name):.0f}",
                f"{approx}{get('used_codes', b.name):.0f}",
                f"{approx}{100 * get('usage', b.name):.1f}%",
                f"{approx}{get('perplexity', b.name):.1f}",
                f"{approx}{get('bits', b.name):.2f} / {get('nominal_bits', b.name):.2f}",
                f"{approx}{get('dead_codes', b.name):.0f}",
                "-" if rare != rare else f"{rare:.0f}",
            ]
        )
    if len(books) > 1:
        rows.append(
            [
                "all",
                "",
                "",
                "",
                f"{100 * get('usage'):.1f}%",
                f"{get('perplexity'):.1f} (mean)",
                f"{get('bits'):.2f} / {get('nominal_bits'):.2f}",
                f"{get('dead_codes'):.0f}",
                "",
            ]
        )
    lines = _aligned(headers, rows)
    if report_key(name, "", "mse") in report:
        lines.append(
            f"quantization error: mse {get('mse'):.4g}, "
            f"relative {get('relative_error'):.4g} (||x - q||^2 / ||x||^2)"
        )
    layers = sorted(
        {key.split("/")[-2] for key in report if key.endswith("/energy_share")},
        key=lambda layer: int(layer.removeprefix("layer")),
    )
    if layers:
        lines.append("")
        lines += _aligned(
            ["layer", "energy share", "relative error after it"],
            [
                [
                    layer,
                    f"{100 * get('energy_share', layer):.1f}%",
                    f"{get('error', layer):.4g}",
                ]
                for layer in layers
            ],
        )
    return "\n".join(lines)


def _aligned(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    fmt = lambda r: "  ".join(
        str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))
    )
    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def plot_usage(
    path: str | os.PathLike,
    name: str,
    books: Sequence[BookInfo],
    counts: Mapping[str, Tensor],
    report: Mapping[str, float],
) -> Path:
    """Left: each book's codes sorted by usage (share of its tokens, log scale; the dashed line is the
    uniform share). Right: each book's perplexity against its codebook size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - the demo extra installs it
        raise ImportError("CodebookMonitor.plot needs matplotlib: pip install 'vqcore[demo]'") from err
    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=90, gridspec_kw={"width_ratios": [3, 2]})
    labels = [b.name or name for b in books]
    for b, label in zip(books, labels):
        c = counts[b.name].double()
        total = float(c.sum())
        if total == 0:
            continue
        share = (c / total).sort(descending=True).values
        used = int((share > 0).sum())
        ranks = torch.arange(1, used + 1, dtype=torch.float64) / share.numel()
        left.plot(ranks.numpy(), share[:used].numpy(), lw=1.2, label=label)
    if books:
        left.axhline(1 / books[0].size, ls="--", lw=0.8, color="grey", label="uniform")
    left.set_yscale("log")
    left.set_xlim(0, 1)
    left.set_xlabel("code rank / codebook size (codes sorted by usage)")
    left.set_ylabel("share of tokens")
    left.set_title(f"{name}: code usage per book", fontsize=9)
    if len(books) <= 12:
        left.legend(fontsize=7)
    perplexity = [report[report_key(name, b.name, "perplexity")] for b in books]
    positions = list(range(len(books)))
    right.bar(positions, perplexity, color="#3b6ea5", label="perplexity")
    right.scatter(positions, [b.size for b in books], marker="_", s=400, color="black", label="codebook size")
    right.set_xticks(positions, labels, rotation=45 if len(books) > 4 else 0, fontsize=7, ha="right")
    right.set_yscale("log")
    right.set_ylim(1, 2 * max(b.size for b in books))  # a perplexity of 1 (one code used) is the floor
    right.set_title("perplexity per book", fontsize=9)
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
