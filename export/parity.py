"""Export-time parity: the artifact, run by its own runtime, against the eager module.

- Integer outputs (indices) must be equal, except where the quantizer judges a mismatch a genuine tie:
  a quantizer with ``export_tie_check(x, a, b, tolerance)`` (:class:`vqcore.protocols.SupportsExportTieCheck`;
  the distance-based built-ins have one) is asked, on a float64 copy of itself, which differing entries
  are equally good codes (float32 cannot order them). More mismatches than ``MAX_TIE_FRACTION`` of the
  entries is a broken graph, not ties. A quantizer without the method must match exactly.
- Float outputs (decode graphs) must match within ``atol + rtol * |ref|`` (1e-5, 1e-5); float16
  outputs within ``2^-8`` of the output's largest magnitude (runtimes accumulate float16 products
  differently, a few float16 ulps apart), and float16 graphs' indices may differ where the float64
  distances are within that rounding (tie tolerance 2^-8 instead of 1e-6).
- A quantize graph's vectors are compared with the eager decode of the artifact's own indices (a tie
  judged genuine in the indices is not a second failure in the vectors).
- A reduced-precision artifact (float16) must reproduce its own eager float16 module by the rules above;
  how far that is from the float32 module is measured, not required: :class:`PrecisionMeter` gives the
  index agreement and the SQNR of the vectors (``ParityReport.precision``).

A failure raises :class:`ParityError` carrying the :class:`ParityReport`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.protocols import SupportsExportTieCheck

# fn(x, a, b) -> bool tensor shaped like a: True where the indices a and b agree or are genuine ties
TieCheck = Callable[[Tensor, Tensor, Tensor], Tensor]

TIE_TOLERANCE = 1e-6
ATOL = RTOL = 1e-5
# float16 graphs: runtimes accumulate float16 products differently (float16 or float32 sums, another
# order), a few float16 ulps (2^-10 relative) apart: vectors within 2^-8 of the output's largest magnitude,
# and indices that differ only where float64 distances are within that rounding (ties at 2^-8)
FLOAT16_TOLERANCE = 2.0**-8
MAX_TIE_FRACTION = 0.01  # more mismatches than this is a broken graph, not ties


class ParityError(AssertionError):
    """The exported artifact does not reproduce the eager module."""

    def __init__(self, report: ParityReport):
        self.report = report
        super().__init__(str(report))


@dataclass
class ParityReport:
    graph: str
    runtime: str
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    index_entries: int = 0
    index_mismatches: int = 0
    ties: int = 0
    max_abs_diff: float = 0.0
    tie_tolerance: float | None = None
    failures: list[str] = field(default_factory=list)
    precision: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "shapes": [list(s) for s in self.shapes],
            "index_entries": self.index_entries,
            "index_mismatches": self.index_mismatches,
            "ties": self.ties,
            "max_abs_diff": self.max_abs_diff,
            "tie_tolerance": self.tie_tolerance,
            "ok": self.ok,
            **({"precision": self.precision} if self.precision is not None else {}),
        }

    def __str__(self) -> str:
        head = f"parity of the {self.graph} graph in {self.runtime}: {'ok' if self.ok else 'FAILED'}"
        lines = [
            head,
            f"  input shapes checked: {', '.join(str(tuple(s)) for s in self.shapes)}",
            f"  index entries: {self.index_entries}, mismatches: {self.index_mismatches} "
            f"(float64-verified ties: {self.ties})",
            f"  max |float diff|: {self.max_abs_diff:.3g}",
        ]
        if self.precision is not None:
            p = self.precision
            lines.append(
                f"  {p['dtype']} against the float32 module: {p['index_flips']} of {p['index_entries']} "
                f"indices differ, vectors at {p['sqnr_db']:.1f} dB SQNR"
            )
        lines += [f"  - {f}" for f in self.failures]
        return "\n".join(lines)


def as_tuple(out: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)


def compare(
    report: ParityReport,
    inp: Tensor,
    want: Tensor | Sequence[Tensor],
    got: Any,
    tie_check: TieCheck | None = None,
) -> None:
    """Add one input's comparison to ``report``: ``want`` the eager outputs, ``got`` the runtime's
    (tensors or arrays)."""
    want, got = as_tuple(want), tuple(torch.as_tensor(g) for g in as_tuple(got))
    report.shapes.append(tuple(inp.shape))
    where = f"input {tuple(inp.shape)}"
    if len(want) != len(got):
        report.failures.append(f"{where}: {len(got)} outputs, expected {len(want)}")
        return
    for k, (w, g) in enumerate(zip(want, got)):
        out = f"{where}, output {k}"
        if tuple(w.shape) != tuple(g.shape):
            report.failures.append(f"{out}: shape {tuple(g.shape)}, expected {tuple(w.shape)}")
            continue
        if w.dtype != g.dtype:
            report.failures.append(f"{out}: dtype {g.dtype}, expected {w.dtype}")
            continue
        if not w.is_floating_point():
            _compare_indices(report, out, inp, w, g, tie_check)
            continue
        diff = (w.double() - g.double()).abs()
        report.max_abs_diff = max(report.max_abs_diff, float(diff.max()) if diff.numel() else 0.0)
        if w.dtype == torch.float16:
            limit = ATOL + FLOAT16_TOLERANCE * (float(w.double().abs().max()) if w.numel() else 0.0)
            bad, rule = diff > limit, f"{FLOAT16_TOLERANCE:.3g} * max|ref| = {limit:.3g}"
        else:
            bad, rule = diff > ATOL + RTOL * w.double().abs(), f"atol+rtol*|ref| ({ATOL}, {RTOL})"
        if bool(bad.any()):
            report.failures.append(
                f"{out}: {int(bad.sum())} of {w.numel()} values differ by more than {rule} "
                f"(max {float(diff.max()):.3g})"
            )


def _compare_indices(
    report: ParityReport, out: str, inp: Tensor, want: Tensor, got: Tensor, tie_check: TieCheck | None
) -> None:
    report.index_entries += want.numel()
    mismatch = want != got
    count = int(mismatch.sum())
    if not count:
        return
    report.index_mismatches += count
    if tie_check is None:
        report.failures.append(
            f"{out}: {count} of {want.numel()} indices differ (exact equality required for this method)"
        )
        return
    if count > max(8, MAX_TIE_FRACTION * want.numel()):
        report.failures.append(f"{out}: {count} of {want.numel()} indices differ: far too many to be ties")
        return
    ties = int((tie_check(inp, want, got) & mismatch).sum())
    report.ties += ties
    if ties < count:
        report.failures.append(
            f"{out}: {count - ties} of {count} differing indices are not float64-verified ties "
            f"(tolerance {report.tie_tolerance})"
        )


class PrecisionMeter:
    """How far a reduced-precision artifact is from the float32 module on the same inputs: the indices
    that differ (``index_flips`` of ``index_entries``, ``index_agreement``) and the signal-to-quantization
    noise ratio of the float outputs, ``10 log10(sum ref^2 / sum (ref - got)^2)`` in dB (infinite when
    they are equal)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.entries = self.flips = 0
        self.signal = self.noise = 0.0

    def add(self, reference: Sequence[Tensor], got: Sequence[Any]) -> None:
        for ref, out in zip(reference, got):
            out = torch.as_tensor(out)
            if ref.shape != out.shape:
                continue  # a shape mismatch is the parity check's failure to report
            if ref.is_floating_point():
                wide = ref.double()
                self.signal += float(wide.square().sum())
                self.noise += float((wide - out.double()).square().sum())
            else:
                self.entries += ref.numel()
                self.flips += int((ref != out.to(ref.dtype)).sum())

    def summary(self) -> dict[str, Any]:
        import math

        if self.noise == 0.0:
            sqnr = math.inf
        else:
            sqnr = 10 * math.log10(max(self.signal, 1e-300) / self.noise)
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "index_entries": self.entries,
            "index_flips": self.flips,
            "index_agreement": 1.0 - self.flips / self.entries if self.entries else 1.0,
            "sqnr_db": sqnr,
        }


# -- ties --------------------------------------------------------------------------------------------


def tie_checker(
    quantizer: nn.Module, encoder: nn.Module | None = None, tolerance: float = TIE_TOLERANCE
) -> TieCheck | None:
    """``fn(x, a, b) -> bool tensor like a`` (True: entry is a genuine tie or equal), or None when the
    method must match exactly. The quantizer's own ``export_tie_check``
    (vqcore.protocols.SupportsExportTieCheck) runs on a float64 copy of it; ``encoder`` (Tokenizer) runs
    first, eagerly."""
    if not isinstance(quantizer, SupportsExportTieCheck):
        return None
    q64 = copy.deepcopy(quantizer).double().eval()

    def check(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        with torch.no_grad():
            if encoder is not None:
                x = encoder(x)
            return q64.export_tie_check(x.double(), a, b, tolerance)

    return check
