"""Auxiliary losses: named, unweighted terms following :class:`vqcore.protocols.Loss`.

Every loss takes ``(x, q, indices, codebook, valid)`` (books first, see :mod:`vqcore.protocols`) and
returns one value per book, ``(B,)``. The quantizer owns the weights: :class:`WeightedLosses` holds
``(loss, weight)`` pairs, evaluates them together and gives the weighted total plus each unweighted
term for the loss breakdown. Losses are registered by name (the built-in ``blocks`` plugin), so a
quantizer accepts extra losses as ``{"name": weight}`` as well as objects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vqcore.blocks.distance import DEFAULT_CHUNK_BYTES, similarity
from vqcore.blocks.entropy import entropy
from vqcore.blocks.precision import float32_region
from vqcore.protocols import Codebook, Loss


def masked_mse(x: Tensor, q: Tensor, valid: Tensor | None) -> Tensor:
    """``mean ||x - q||^2`` over the valid tokens and the features of each book: (B, N, d) -> (B,).

    Without a mask, one fused ``mse_loss`` per call (its backward is one kernel, unlike sub + pow +
    mean; benchmarks/README.md has the measurement). With one, ``where`` before the square keeps a NaN
    in a masked token out of the sum and out of the gradient (masking after the square would
    back-propagate 0 * 2 * NaN = NaN into it).
    """
    if (
        valid is None and x.shape[1] == 0
    ):  # no token (a zero-length or empty batch): 0, as with every token masked
        return (x - q).sum((1, 2))
    if valid is None:
        if x.shape[0] == 1:
            return F.mse_loss(x, q).reshape(1)
        return F.mse_loss(x, q, reduction="none").mean((1, 2))
    diff = torch.where(valid.unsqueeze(-1), x - q, torch.zeros((), dtype=x.dtype, device=x.device))
    count = valid.sum(-1).to(diff.dtype) * diff.shape[-1]
    return diff.pow(2).sum((1, 2)) / count.clamp(min=1)


def code_cross_entropy(x: Tensor, codes: Tensor, target: Tensor, *, cosine: bool) -> Tensor:
    """Cross-entropy of the target codes under ``softmax(similarity(x, codes))``: 0-dim, the mean over the
    tokens whose target is not -1 (ignored), all books together (0 when all are ignored).

    x (B, N, d), codes (B, K, d), target (B, N) int64. The logits are
    :func:`vqcore.blocks.distance.similarity`: ``-||x - c||`` (Euclidean) or ``x . c`` (cosine), so the loss
    pulls x towards its target code and away from the others (NaturalSpeech 2's residual VQ loss, and
    vector-quantize-pytorch's cross-entropy commitment loss). Builds one (B, N, K) logits tensor.
    """
    logits = similarity(x, codes, cosine=cosine)
    flat = target.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=-1, reduction="sum")
    return total / (flat >= 0).sum().clamp(min=1)  # 0, not NaN, when every target is ignored


def book_cross_entropy(x: Tensor, codes: Tensor, target: Tensor, *, cosine: bool) -> Tensor:
    """:func:`code_cross_entropy` per book: (B,), each book's mean over its tokens whose target is not -1
    (0 for a book without any)."""
    logits = similarity(x, codes, cosine=cosine)
    per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-1, reduction="none")
    count = (target >= 0).sum(-1).to(per_token.dtype)
    return per_token.sum(-1) / count.clamp(min=1)


def _loss_codes(codebook: Codebook | None, q: Tensor, loss: str) -> tuple[Tensor, bool]:
    """The codebook's codes (B, K, d) for a loss over distances, and whether they are compared by cosine:
    a copy (the codebook's step rewrites its codes in place after the losses are taken) that carries the
    gradient to the codes when ``q`` does (a gradient-trained codebook that is not frozen, see
    :class:`vqcore.protocols.Loss`)."""
    if codebook is None:
        raise ValueError(f"the {loss} loss needs the quantizer's codebook")
    codes = codebook.codes
    return (codes.clone() if q.requires_grad else codes.detach().clone()), bool(codebook.cosine)


def _zero_masked(x: Tensor, valid: Tensor | None) -> Tensor:
    """x with masked tokens set to 0, so that padding (even NaN) reaches neither a value nor a gradient."""
    if valid is None:
        return x
    return torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


@dataclass(frozen=True)
class CommitmentLoss:
    """``mean ||x - sg(q)||^2`` over valid tokens (VQ-VAE, arXiv 1711.00937): pulls the encoder to its codes.

    ``train_codes``: q is not detached, so the same term also pulls the codes to the encoder's outputs
    (the codebook loss of a gradient-trained codebook, with equal weight, as vector-quantize-pytorch).
    """

    train_codes: bool = False
    name: ClassVar[str] = "commitment"

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None, valid: Tensor | None
    ) -> Tensor:
        return masked_mse(x, q if self.train_codes else q.detach(), valid)


@dataclass(frozen=True)
class CodebookLoss:
    """``mean ||sg(x) - q||^2`` over valid tokens (VQ-VAE's codebook term): pulls codes to their inputs."""

    name: ClassVar[str] = "codebook"

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None, valid: Tensor | None
    ) -> Tensor:
        return masked_mse(x.detach(), q, valid)


@dataclass(frozen=True)
class CrossEntropyCommitmentLoss:
    """Cross-entropy of the chosen codes under ``softmax(similarity(x, codes))`` over valid tokens
    (:func:`book_cross_entropy`; ``-||x - c||`` or ``x . c`` for cosine codebooks): pulls x towards its
    code and away from the others. A commitment term (vector-quantize-pytorch's
    ``commitment_use_cross_entropy_loss``); the codes learn from it too when the codebook is trained by
    gradient. Builds one (B, N, K) logits tensor."""

    name: ClassVar[str] = "cross_entropy_commitment"

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None, valid: Tensor | None
    ) -> Tensor:
        codes, cosine = _loss_codes(codebook, q, self.name)
        target = indices if valid is None else indices.masked_fill(~valid, -1)
        with float32_region(x.device.type):
            return book_cross_entropy(_zero_masked(x, valid), codes, target, cosine=cosine)


@dataclass(frozen=True)
class CodebookDiversityLoss:
    """Negative entropy of the mean code distribution: ``-H(mean_n softmax(temperature * similarity(x_n,
    codes)))`` per book, the mean over its valid tokens (similarity ``-||x - c||``, or ``x . c`` for
    cosine codebooks). Minimising it spreads the batch over the codes.

    The entropy is exact (``0 log 0 = 0``). The (tokens x codes) probabilities are summed in chunks whose
    block stays under ``chunk_bytes``; when there is more than one chunk and a gradient to take, each chunk
    is recomputed in the backward pass instead of kept (activation checkpointing), so the memory stays one
    chunk's. Computed in float32 whatever the autocast context.
    """

    temperature: float = 100.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    name: ClassVar[str] = "codebook_diversity"

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(
                f"the codebook diversity temperature must be a finite number > 0, got {self.temperature}"
            )

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None, valid: Tensor | None
    ) -> Tensor:
        codes, cosine = _loss_codes(codebook, q, self.name)
        books, tokens, size = x.shape[0], x.shape[1], codes.shape[1]
        weights = None if valid is None else valid.to(x.dtype)
        chunk = max(1, self.chunk_bytes // (4 * books * size))
        recompute = tokens > chunk and (x.requires_grad or codes.requires_grad)
        with float32_region(x.device.type):
            x = _zero_masked(x, valid)
            total = x.new_zeros(books, size)
            for start in range(0, tokens, chunk):
                part = x[:, start : start + chunk]
                w = None if weights is None else weights[:, start : start + chunk]
                if recompute:
                    summed = checkpoint(self._probability_sum, part, codes, w, cosine, use_reentrant=False)
                else:
                    summed = self._probability_sum(part, codes, w, cosine)
                total = total + summed
            count = x.new_full((books,), tokens) if weights is None else weights.sum(-1)
            return -entropy(total / count.clamp(min=1).unsqueeze(-1))

    def _probability_sum(self, x: Tensor, codes: Tensor, weights: Tensor | None, cosine: bool) -> Tensor:
        """Sum over the tokens of x (B, n, d) of their code distributions: (B, K)."""
        prob = torch.softmax(similarity(x, codes, cosine=cosine) * self.temperature, dim=-1)
        if weights is not None:
            prob = prob * weights.unsqueeze(-1)
        return prob.sum(1)


def orthogonal_error(codes: Tensor) -> Tensor:
    """Per book, ``mean (Ĉ Ĉᵀ - I)²`` over the n x n pairs of codes (B, n, d) -> (B,): 0 when the codes
    are orthonormal after normalisation; Ĉ the codes scaled to unit length (``F.normalize``, eps 1e-6).

    For nonzero codes this is ``Σ (Ĉ Ĉᵀ)² / n² - 1/n``; a zero code (whose normalised vector is zero, not
    unit) counts as an error of 1 on the diagonal instead of lowering the loss below 0.
    """
    normed = F.normalize(codes, dim=-1, eps=1e-6)
    gram = normed @ normed.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).mean((-2, -1))


@dataclass(frozen=True)
class OrthogonalLoss:
    """Orthogonal codebook regulariser (arXiv 2112.00384): mean squared cosine similarity between codes.

    Per book, :func:`orthogonal_error` of the codes: 0 when they are orthogonal. ``active_codes_only``:
    only the codes this batch chose (one book only); ``max_codes``: at most that many codes, drawn at
    random.
    Computed in float32 whatever the autocast context: the codebook it regularises is float32.
    """

    active_codes_only: bool = False
    max_codes: int | None = None
    name: ClassVar[str] = "orthogonal_reg"

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None, valid: Tensor | None
    ) -> Tensor:
        if codebook is None:
            raise ValueError("the orthogonal loss needs the quantizer's codebook")
        codes = codebook.codes
        if self.active_codes_only:
            used = indices if valid is None else indices[valid]
            codes = codes[:, torch.unique(used)]
        else:
            codes = codes.clone()  # the codebook's step rewrites its codes in place; keep this loss's view
        if self.max_codes is not None and codes.shape[1] > self.max_codes:
            pick = torch.randperm(codes.shape[1], device=codes.device)[: self.max_codes]
            codes = codes[:, pick]
        with float32_region(codes.device.type):
            return orthogonal_error(codes.float())


LossSpec = Mapping[str, float] | Iterable[tuple["str | Loss", float]] | None


class WeightedLosses(nn.Module):
    """``(loss, weight)`` pairs evaluated together: ``(total (B,), {name: unweighted term (B,)})`` with
    ``total = Σ weight · term``. A term of weight 0 is not computed (reported as zeros). Losses that are
    ``nn.Module`` s (with parameters or buffers) are registered here, so they train, move and save with
    their quantizer (state_dict keys ``<attribute>.modules.<i>.*``).
    """

    def __init__(self, pairs: Iterable[tuple[Loss, float]]):
        super().__init__()
        self.pairs = tuple((loss, float(weight)) for loss, weight in pairs)
        names = [loss.name for loss, _ in self.pairs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"loss names must be unique within a quantizer, got {duplicated} more than once")
        self.modules_with_state = nn.ModuleList(loss for loss, _ in self.pairs if isinstance(loss, nn.Module))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(loss.name for loss, _ in self.pairs)

    def forward(
        self,
        x: Tensor,
        q: Tensor,
        indices: Tensor,
        codebook: Codebook | None,
        valid: Tensor | None,
        skip: Iterable[str] = (),
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``skip``: names of terms not to compute here (reported as zeros, left out of the total)."""
        zeros = x.new_zeros(x.shape[0])
        total, terms = zeros, {}
        for loss, weight in self.pairs:
            if weight == 0 or loss.name in skip:
                terms[loss.name] = zeros
                continue
            term = loss(x, q, indices, codebook, valid)
            terms[loss.name] = term
            total = total + weight * term
        return total, terms

    def extra_repr(self) -> str:
        return ", ".join(f"{loss.name}={weight}" for loss, weight in self.pairs)


def resolve_loss(loss: str | Loss) -> Loss:
    """A Loss object, or one built from its registry name (``vqcore list --all`` shows the names)."""
    if isinstance(loss, str):
        from vqcore.registry import get_registry

        return get_registry().get_entry(loss, "loss").create()
    if not isinstance(loss, Loss):
        raise TypeError(
            f"a loss must be a registered name or follow vqcore.protocols.Loss (a callable with a name), "
            f"got {type(loss).__name__}"
        )
    return loss


def extra_loss_pairs(spec: LossSpec, reserved: Iterable[str] = ()) -> list[tuple[Loss, float]]:
    """``{"name": weight}`` or ``[(name or Loss, weight), ...]`` -> checked (Loss, weight) pairs."""
    if spec is None:
        return []
    items = spec.items() if isinstance(spec, Mapping) else spec
    pairs = []
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"extra_losses entries must be (loss, weight) pairs, got {item!r}")
        loss, weight = item
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"the weight of extra loss {loss!r} must be a finite number, got {weight!r}")
        pairs.append((resolve_loss(loss), float(weight)))
    clash = sorted({loss.name for loss, _ in pairs} & set(reserved))
    if clash:
        raise ValueError(f"extra_losses {clash} clash with the quantizer's own loss terms {sorted(reserved)}")
    return pairs
