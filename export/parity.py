"""Export-time parity: the artifact, run by its own runtime, against the eager module.

- Integer outputs (indices) must be equal. For distance-based methods (the VQ family: VectorQuantize,
  ResidualVQ, GroupedResidualVQ, RandomProjectionQuantizer) a mismatch is accepted only when it is a
  genuine tie: both candidates' distances are recomputed in float64 from the quantizer's own tensors and
  must agree within ``tie_tolerance`` relative to ``(|z| + |c|)^2`` (fp32 cannot order them). Residual
  methods are judged at the first layer where the two index tuples differ (later layers then
  legitimately follow a different residual). A plugin may define ``export_tie_check(x, a, b)``
  returning a bool tensor (True where index entries of ``a`` and ``b`` are equally good). Every other
  method (FSQ, LFQ, LatentQuantize, plugins without the method) must match exactly.
- Float outputs (decode graphs) must match within ``atol + rtol * |ref|`` (1e-5, 1e-5).

A failure raises :class:`ParityError` carrying the :class:`ParityReport`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

TIE_TOLERANCE = 1e-6
ATOL = RTOL = 1e-5
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
    shapes: list = field(default_factory=list)
    index_entries: int = 0
    index_mismatches: int = 0
    ties: int = 0
    max_abs_diff: float = 0.0
    tie_tolerance: float | None = None
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict:
        return {
            "runtime": self.runtime,
            "shapes": [list(s) for s in self.shapes],
            "index_entries": self.index_entries,
            "index_mismatches": self.index_mismatches,
            "ties": self.ties,
            "max_abs_diff": self.max_abs_diff,
            "tie_tolerance": self.tie_tolerance,
            "ok": self.ok,
        }

    def __str__(self) -> str:
        head = f"parity of the {self.graph} graph in {self.runtime}: {'ok' if self.ok else 'FAILED'}"
        lines = [
            head,
            f"  input shapes checked: {', '.join(str(tuple(s)) for s in self.shapes)}",
            f"  index entries: {self.index_entries}, mismatches: {self.index_mismatches} "
            f"(float64-verified ties: {self.ties})",
            f"  max |float diff|: {self.max_abs_diff:.3g} (atol {ATOL}, rtol {RTOL})",
        ]
        lines += [f"  - {f}" for f in self.failures]
        return "\n".join(lines)


def as_tuple(out) -> tuple:
    return (out,) if isinstance(out, Tensor) else tuple(out)


def compare(report: ParityReport, inp: Tensor, want, got, tie_check=None) -> None:
    """Add one input's comparison to ``report``."""
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
        bad = diff > ATOL + RTOL * w.double().abs()
        if bool(bad.any()):
            report.failures.append(
                f"{out}: {int(bad.sum())} of {w.numel()} values differ by more than atol+rtol*|ref| "
                f"(max {float(diff.max()):.3g})"
            )


def _compare_indices(report, out, inp, want, got, tie_check) -> None:
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


# -- tie checks of the VQ family ------------------------------------------------------------------


def tie_checker(quantizer, encoder=None, tolerance: float = TIE_TOLERANCE):
    """``fn(x, a, b) -> bool tensor like a`` (True: entry is a genuine tie or equal), or None when the
    method must match exactly. ``encoder`` (Tokenizer) runs first, eagerly."""
    custom = getattr(quantizer, "export_tie_check", None)
    if custom is not None:
        base = custom
    else:
        from vqcore.plugins.rpq import RandomProjectionQuantizer
        from vqcore.plugins.rvq import GroupedResidualVQ, ResidualVQ
        from vqcore.plugins.vq import VectorQuantize

        kinds = {
            VectorQuantize: _vq_ties,
            ResidualVQ: _rvq_ties,
            GroupedResidualVQ: _grvq_ties,
            RandomProjectionQuantizer: _rpq_ties,
        }
        judge = next((fn for cls, fn in kinds.items() if isinstance(quantizer, cls)), None)
        if judge is None:
            return None
        q64 = copy.deepcopy(quantizer).double().eval()

        def base(x, a, b):
            with torch.no_grad():
                return judge(q64, x.double(), a, b, tolerance)

    if encoder is None:
        return base

    def chained(x, a, b):
        with torch.no_grad():
            return base(encoder(x), a, b)

    return chained


def _is_tie(z: Tensor, ca: Tensor, cb: Tensor, cosine: bool, tol: float) -> bool:
    if cosine:
        da, db = -(z * ca).sum(), -(z * cb).sum()
    else:
        da, db = (z - ca).pow(2).sum(), (z - cb).pow(2).sum()
    scale = (z.norm() + torch.maximum(ca.norm(), cb.norm())) ** 2
    return bool((da - db).abs() <= tol * scale)


def _vq_space(vq, tokens: Tensor) -> Tensor:
    """float64 tokens (..., dim) -> codebook space (heads split by the caller), as VectorQuantize does."""
    z = vq.norm_in(vq.project_in(tokens))
    return z


def _vq_ties(vq, x, a, b, tol):
    tokens, _ = vq.layout.to_tokens(x)
    bsz, n = tokens.shape[0], tokens.shape[1]
    z = vq._split_heads(_vq_space(vq, tokens))
    if vq.use_cosine_sim:
        z = F.normalize(z, dim=-1)
    extra = 1 if vq.heads > 1 else 0
    ba = vq._book_indices(vq.layout.indices_to_tokens(a, extra)[0].long())
    bb = vq._book_indices(vq.layout.indices_to_tokens(b, extra)[0].long())
    codes = vq._codebook.embed
    ok = ba == bb
    for book, t in (~ok).nonzero().tolist():
        ok[book, t] = _is_tie(
            z[book, t], codes[book, ba[book, t]], codes[book, bb[book, t]], vq.use_cosine_sim, tol
        )
    return vq.layout.indices_from_tokens(vq._token_indices(ok, bsz, n), _spatial_of(vq, x)).reshape(a.shape)


def _spatial_of(module, x):
    return module.layout.to_tokens(x)[1]


def _rvq_token_ties(rvq, z, ta, tb, tol):
    """z (b, n, cd) float64 after project_in; ta, tb (b, n, Q) -> ok (b, n, Q)."""
    ok = torch.ones_like(ta, dtype=torch.bool)
    for bi, ni in (ta != tb).any(-1).nonzero().tolist():
        r = z[bi, ni]
        for q, layer in enumerate(rvq.layers):
            codes = layer._codebook.embed[0]
            zq = _vq_space(layer, r)
            if layer.use_cosine_sim:
                zq = F.normalize(zq, dim=-1)
            ia, ib = int(ta[bi, ni, q]), int(tb[bi, ni, q])
            if ia == ib:
                r = r - codes[ia]
                continue
            ok[bi, ni, q:] = _is_tie(zq, codes[ia], codes[ib], layer.use_cosine_sim, tol)
            break
    return ok


def _rvq_ties(rvq, x, a, b, tol):
    tokens, spatial = rvq.layout.to_tokens(x)
    ta, tb = (rvq.layout.indices_to_tokens(i, 1)[0].long() for i in (a, b))
    ok = _rvq_token_ties(rvq, rvq.project_in(tokens), ta, tb, tol)
    return rvq.layout.indices_from_tokens(ok, spatial).reshape(a.shape)


def _grvq_ties(grvq, x, a, b, tol):
    tokens, spatial = grvq.layout.to_tokens(x)
    out = []
    for g, (rvq, chunk) in enumerate(zip(grvq.rvqs, tokens.chunk(grvq.groups, dim=-1))):
        ta, tb = (grvq.layout.indices_to_tokens(i[g], 1)[0].long() for i in (a, b))
        ok = _rvq_token_ties(rvq, rvq.project_in(chunk), ta, tb, tol)
        out.append(grvq.layout.indices_from_tokens(ok, spatial))
    return torch.stack(out).reshape(a.shape)


def _rpq_ties(rpq, x, a, b, tol):
    tokens, _ = rpq.layout.to_tokens(x)
    flat = tokens.reshape(-1, rpq.dim)
    if rpq.norm:
        flat = F.layer_norm(flat, (rpq.dim,))
    z = F.normalize(torch.matmul(flat, rpq.rand_projs), dim=-1)  # (H, T, cd)
    ha, hb = (i.reshape(-1, rpq.heads).transpose(0, 1).long() for i in (a, b))
    ok = ha == hb
    for h, t in (~ok).nonzero().tolist():
        ok[h, t] = _is_tie(z[h, t], rpq.codebooks[h, ha[h, t]], rpq.codebooks[h, hb[h, t]], True, tol)
    return ok.transpose(0, 1).reshape(a.shape)
