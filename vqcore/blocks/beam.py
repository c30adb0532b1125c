"""Beam search over the code paths of a residual quantizer.

A residual stack quantizes ``r_0 = z`` layer by layer: layer ``q`` picks a code ``c_q`` for ``r_q`` and passes
``r_{q+1} = r_q - c_q`` on. The greedy stack takes each layer's nearest code; a beam search keeps the
``beam_size`` best partial paths instead. At each layer every kept path expands to its ``k`` best codes, a
path's score is minus the weighted sum of its per-layer costs (``Σ_q w_q cost_q``, the commitment MSE
``||r_q - c_q||^2 / d`` for the built-in search), and the ``beam_size`` best paths survive (one after the
last layer). ``beam_size = K^(Q-1)`` (with ``k = K`` codes per path) keeps every path, so its result is the
exact optimum; ``beam_size = 1`` is the greedy stack.

The search is two functions per layer, so that a stack whose codes depend on the path (an implicit neural
codebook conditioned on the partial reconstruction) plugs in its own:

- ``search(layer, residual (M, d), condition (M, d), k) -> (indices (M, k) int64, cost (M, k))``: the ``k``
  best codes of every residual, best first; ``condition`` is the path's partial reconstruction
  ``Σ_{p<q} c_p`` (zeros at the first layer);
- ``codes_of(layer, indices (M,), condition (M, d)) -> codes (M, d)``: the chosen codes.

Per layer one ``search`` call covers all (tokens x beams) residuals; beams are reselected by ``gather``
(no one-hot, no tokens x beams x codes x dim tensor). Every shape follows from ``beam_size``, the codebook
sizes and the number of tokens only, so the search exports (ONNX, TorchScript, torch.export) with dynamic
token axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from vqcore.blocks.distance import nearest_k

# (layer, residual (M, d), condition (M, d), k) -> (indices (M, k) int64, cost (M, k)), best first
CandidateSearch = Callable[[int, Tensor, Tensor, int], tuple[Tensor, Tensor]]
# (layer, indices (M,), condition (M, d)) -> codes (M, d)
CodesOf = Callable[[int, Tensor, Tensor], Tensor]


class BeamPath(NamedTuple):
    """The best path of every token: ``indices`` (N, L) int64, ``total`` (N, d) the sum of its codes added
    in layer order (as a residual decode adds them), ``score`` (N,) minus its weighted cost."""

    indices: Tensor
    total: Tensor
    score: Tensor


def nearest_candidates(x: Tensor, codes: Tensor, k: int, *, cosine: bool) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest of codes (K, d) to x (M, d), nearest first: (indices (M, k), ``||x - c||^2 / d``).

    ``cosine``: x is already l2-normalised and the search ranks by ``x . c``; the cost is still the squared
    distance (``|x|^2 + |c|^2 - 2 x.c``), the commitment MSE of a cosine layer.
    """
    indices, scores = nearest_k(x.unsqueeze(0), codes.unsqueeze(0), k, cosine=cosine)
    indices, scores = indices[0], scores[0]
    if cosine:  # scores are -x.c
        with torch.no_grad():
            code_sq = codes.detach().pow(2).sum(-1)[indices]
            scores = (x.detach().pow(2).sum(-1, keepdim=True) + code_sq + 2 * scores).clamp(min=0)
    return indices, scores / x.shape[-1]


@torch.no_grad()
def beam_search(
    z: Tensor,
    sizes: Sequence[int],
    search: CandidateSearch,
    codes_of: CodesOf,
    beam_size: int,
    weights: Sequence[float],
) -> BeamPath:
    """The best code path of each token z (N, d) through ``len(sizes)`` layers of ``sizes[q]`` codes (see the
    module docstring); ``weights[q]`` scales layer q's cost in the score. No gradient."""
    n, d = z.shape
    residual = z.unsqueeze(1)  # (N, J, d): J paths per token, 1 before the first layer
    total = torch.zeros_like(residual)
    score = z.new_zeros(n, 1)
    path = torch.zeros(n, 1, 0, dtype=torch.int64, device=z.device)
    last = len(sizes) - 1
    for q, size in enumerate(sizes):
        paths = residual.shape[1]
        k = min(beam_size, size)
        idx, cost = search(q, residual.reshape(n * paths, d), total.reshape(n * paths, d), k)
        candidates = (score.unsqueeze(-1) - float(weights[q]) * cost.reshape(n, paths, k)).reshape(
            n, paths * k
        )
        keep = 1 if q == last else min(beam_size, paths * k)
        score, chosen = candidates.topk(keep, -1)  # (N, keep), best first
        parent = torch.div(chosen, k, rounding_mode="floor")
        code_idx = idx.reshape(n, paths * k).gather(-1, chosen)
        rows = parent.unsqueeze(-1)
        residual = residual.gather(1, rows.expand(-1, -1, d))
        total = total.gather(1, rows.expand(-1, -1, d))
        path = path.gather(1, rows.expand(-1, -1, q))
        codes = codes_of(q, code_idx.reshape(-1), total.reshape(n * keep, d)).reshape(n, keep, d)
        residual = residual - codes
        total = total + codes
        path = torch.cat((path, code_idx.unsqueeze(-1)), -1)
    return BeamPath(path[:, 0], total[:, 0], score[:, 0])
