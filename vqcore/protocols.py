"""Core contracts: what a quantizer, a codebook, an auxiliary loss and a gradient estimator are.

Quantizers work on whatever layout their users give them. Codebooks, losses and estimators share one
books-first shape convention, so that any of them composes with any quantizer that follows it:

============  ============  ===============================================================
name          shape         meaning
============  ============  ===============================================================
``x``         (B, N, d)     float32 inputs in codebook space (after projections, heads split);
                            B independent codebooks ("books": separate heads, residual layers)
``indices``   (B, N)        int64 codes in ``[0, size)``
``q``         (B, N, d)     the chosen codes, ``codebook.lookup(indices)``
``valid``     (B, N)        bool, True where a token counts (unmasked, finite); None: all count
============  ============  ===============================================================

Protocols are checked once (a factory's product in :func:`vqcore.create`, a plugin in the
conformance kit), never in a hot path. Tensors are exposed as properties because runtime-checkable
protocols do not see ``nn.Module`` buffers on Python >= 3.12.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

INDEX_DTYPE = torch.int64
DROPPED_INDEX = -1  # marks positions dropped by quantize dropout or masked out


@runtime_checkable
class Quantizer(Protocol):
    """An ``nn.Module`` with three paths.

    - ``forward(x, ...)``: training and eval; returns the method's NamedTuple (``quantized, indices, ...``).
    - ``encode(x) -> indices``: inference only, int64, no training state touched.
    - ``decode(indices) -> quantized``: inference only; ``decode(encode(x))`` equals the eval
      ``forward(x).quantized`` bit for bit; ``-1`` decodes to zeros (or is rejected with a ValueError).

    ``encode``/``decode`` must pass ``torch.export.export(strict=False)`` with dynamic batch and
    sequence axes: no Python branches on tensor values there.

    Optional members the export layer uses when present: ``export_tie_check(x, a, b, tolerance)``
    and ``export_metadata()`` (see :class:`SupportsExportTieCheck`, :class:`SupportsExportMetadata`);
    the codebook monitor uses ``book_layout()`` (:class:`SupportsBookLayout`).
    """

    dim: int
    codebook_size: int
    num_codebooks: int

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, indices: Tensor) -> Tensor: ...


@runtime_checkable
class Codebook(Protocol):
    """``books`` independent codebooks of ``size`` codes of ``dim`` features.

    Shapes (books first, B == books): ``nearest(x (B, N, dim)) -> (B, N)`` int64;
    ``lookup(indices (B, N))`` with indices in ``[0, size)`` ``-> (B, N, dim)``, differentiable with
    respect to the codebook's parameters; ``codes`` is ``(books, size, dim)``, the codes in use.
    ``cosine``: the quantizer l2-normalises its inputs before the search (unit-vector codes).
    ``trained_by_gradient``: the codes learn from the quantizer's losses (the quantizer then lets
    the commitment term reach ``lookup``'s output); otherwise the chosen codes are detached.

    Training step (a training-mode forward only; never encode, decode or eval):

    1. ``prepare_(x, valid, sync=...)`` before the search: data-dependent initialisation
       (k-means); a no-op for codebooks without one;
    2. ``indices = nearest(x)`` (or ``sample(x, temperature)``, where the codebook offers it);
    3. ``q = lookup(indices)``: this batch's codes, before any update;
    4. ``train_step_(x, indices, valid, sync=...)`` once the codes are chosen, unless the quantizer
       is frozen: statistics (EMA), dead-code expiry; a no-op for codebooks trained by gradient only.
       It may take further keyword options (the EMA codebooks take ``step_weight`` and
       ``accumulate``); quantizers pass them only when their user asks for them.

    ``sync`` (torch.distributed is running and the quantizer syncs): every rank must end with the same
    state, equal to what one process computes on the concatenation of every rank's batch.
    """

    @property
    def size(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def books(self) -> int: ...

    @property
    def codes(self) -> Tensor: ...

    @property
    def cosine(self) -> bool: ...

    @property
    def trained_by_gradient(self) -> bool: ...

    def nearest(self, x: Tensor) -> Tensor: ...

    def lookup(self, indices: Tensor) -> Tensor: ...

    def prepare_(self, x: Tensor, valid: Tensor | None = None, *, sync: bool = False) -> None: ...

    def train_step_(
        self, x: Tensor, indices: Tensor, valid: Tensor | None = None, *, sync: bool = False
    ) -> None: ...


@runtime_checkable
class Loss(Protocol):
    """A named, unweighted auxiliary term: ``loss(x, q, indices, codebook, valid) -> (B,)``.

    ``x`` carries its gradient to the encoder; ``q`` carries one to the codebook's parameters only
    when the codebook is trained by gradient (and not frozen); ``codebook`` is the quantizer's
    :class:`Codebook` (an implicit one for lookup-free methods; None where a method has none). The
    result holds one value per book; the quantizer owns the weight, reduces over books (mean, or
    one term per residual layer) and reports the unweighted term in its loss breakdown.
    """

    @property
    def name(self) -> str:
        """The term's name in the loss breakdown; read-only, so a class attribute
        (``name: ClassVar[str] = "commitment"``) follows the protocol too."""
        ...

    def __call__(
        self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None, valid: Tensor | None
    ) -> Tensor: ...


@runtime_checkable
class Estimator(Protocol):
    """A gradient estimator through the code choice: ``estimator(x, q, indices, codebook) -> (B, N, d)``.

    The value is ``q`` exactly; estimators differ in the gradient that reaches ``x``. An estimator
    whose gradient is the identity (``out - q == x - sg(x)``) sets ``identity_gradient = True`` so
    that residual stacks may sum it over layers in one step.
    """

    @property
    def name(self) -> str:
        """The estimator's registry name; read-only, so a class attribute
        (``name: ClassVar[str] = "straight_through"``) follows the protocol too."""
        ...

    def __call__(self, x: Tensor, q: Tensor, indices: Tensor, codebook: Codebook | None) -> Tensor: ...


@runtime_checkable
class SupportsExportTieCheck(Protocol):
    """Optional Quantizer member: which differing indices of an exported encode are genuine ties.

    ``export_tie_check(x, a, b, tolerance) -> bool tensor shaped like a``: True where ``a`` and ``b``
    agree or are equally good codes for ``x`` within ``tolerance`` (relative). The export layer calls it
    on a float64 copy of the quantizer; without it indices must match exactly.
    """

    def export_tie_check(self, x: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor: ...


@runtime_checkable
class SupportsExportMetadata(Protocol):
    """Optional Quantizer member: JSON-serialisable hyper-parameters embedded in exported artifacts."""

    def export_metadata(self) -> dict[str, Any]: ...


@runtime_checkable
class SupportsBookLayout(Protocol):
    """Optional Quantizer member: where the books (heads, residual layers, groups, codebooks) are in the
    indices, as a :class:`vqcore.book_layout.BookLayout`. Without it, readers of indices (the codebook
    monitor, :mod:`vqcore.metrics`) assume one book when ``num_codebooks == 1``, else a trailing axis of
    ``num_codebooks`` books of ``codebook_size`` codes each."""

    def book_layout(self) -> Any: ...


@runtime_checkable
class ReferenceConverter(Protocol):
    """Rebuilds a module of vector-quantize-pytorch 1.32 (the reference) as a vqcore quantizer.

    Registered under the reference's class name (hook ``register_converters``); :mod:`vqcore.compat`
    looks converters up by ``type(ref).__name__`` and builds ``vqcore.create(quantizer, **kwargs(ref))``.

    - ``quantizer``: the vqcore registry name (or alias) the converter builds;
    - ``kwargs(ref, allow_training_differences)``: the vqcore constructor arguments equivalent to the
      reference module's options; raises ValueError naming every reference option vqcore lacks
      (training-only ones pass when ``allow_training_differences``);
    - ``state_dict(module, ref_state_dict)``: the reference's trained state as ``module``'s state_dict
      (``module`` built from ``kwargs``); a reference key it needs and does not find raises KeyError,
      which :mod:`vqcore.compat` reports as a ValueError naming the key.
    """

    quantizer: str

    def kwargs(self, ref: nn.Module, allow_training_differences: bool = False) -> dict[str, Any]: ...

    def state_dict(self, module: nn.Module, ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]: ...


def check_quantizer_instance(obj: object, origin: str = "factory") -> None:
    """Raise a TypeError naming what is missing when ``obj`` does not follow :class:`Quantizer`."""
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{origin} must build an nn.Module, got {type(obj).__name__}")
    if isinstance(obj, Quantizer):
        return
    members = ("dim", "codebook_size", "num_codebooks", "encode", "decode")
    missing = [name for name in members if not hasattr(obj, name)]
    raise TypeError(
        f"{origin} built {type(obj).__name__}, which does not follow vqcore.protocols.Quantizer: "
        f"missing {', '.join(missing)}"
    )
