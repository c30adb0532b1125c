"""Explicit codebooks trained by exponential moving averages (VQ-VAE-2, SoundStream).

``EMACodebook`` holds ``books`` independent codebooks of ``size`` codes of ``dim`` features:
x (B, N, d) -> indices (B, N) with B == books. Statistics are float32 buffers:

- ``embed``        (B, K, d)  the codes (an ``nn.Parameter`` when ``learnable``, e.g. for the
                              orthogonal regulariser)
- ``cluster_size`` (B, K)     EMA of assignment counts
- ``embed_avg``    (B, K, d)  EMA of the sums of assigned vectors
- ``initted``      ()         whether k-means initialisation ran

EMA step (per book, counts ``c_k``, sums ``s_k``, decay ``γ``, Laplace ``ε``)::

    cluster_size <- γ cluster_size + (1 - γ) c
    embed_avg    <- γ embed_avg    + (1 - γ) s
    n = Σ_k cluster_size_k ;  smoothed_k = (cluster_size_k + ε) / (n + K ε) · n
    embed_k = embed_avg_k / smoothed_k            (then l2-normalised for cosine codebooks)

Tokens marked invalid (masked, or non-finite) contribute to nothing: they are excluded by weight,
so a NaN in a batch never reaches the statistics.

Codes in use. ``embed`` holds the trained codes; the search and the lookup may use codes derived from it:

- ``vq_bridge`` (FVQ, arXiv 2509.10140): a module applied to the whole codebook, ``codes = vq_bridge(embed)``
  (learnable codes, no EMA: the bridge and the codes learn from the quantizer's losses);
- ``affine`` (affine re-parameterisation): ``codes = (c - codebook_mean) * batch_std / codebook_std +
  batch_mean`` for the (bridged) codes ``c``, from EMA statistics of the batches (``batch_mean``,
  ``batch_variance``: per feature over the valid tokens, all-reduced with ``sync_affine``) and of the codes
  (``codebook_mean``, ``codebook_variance``), taken in :meth:`EMACodebook.prepare_` (training-mode forwards
  only); the first step initialises them (``codebook_*_needs_init``), and until then the transform is the
  identity. The EMA step and dead-code expiry see the inputs through the inverse transform (the space of
  ``embed``).

:func:`codes_held` computes them once for a block of searches and lookups (one forward).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.blocks.certified import CERTIFIED_DTYPES, nearest_certified
from vqcore.blocks.distance import (
    DEFAULT_CHUNK_BYTES,
    PreparedCodes,
    fused_search_applies,
    gumbel_sample,
    l2norm,
    nearest,
    prepare_codes,
    similarity,
)
from vqcore.blocks.distributed import (
    all_reduce_max_,
    all_reduce_sum_,
    broadcast_,
    global_pool_draw,
    should_sync,
)
from vqcore.blocks.distributed import rank as dist_rank
from vqcore.blocks.kmeans import kmeans
from vqcore.blocks.precision import Float32State, float32_method, float32_region
from vqcore.blocks.stats import bincount_per_book, sum_per_code
from vqcore.blocks.validation import check_positive_int, is_tracing
from vqcore.errors import ConfigurationError
from vqcore.protocols import Codebook

# EMACodebook -> (key, weakref to embed, PreparedCodes): the packed codes of the fused CPU search
_SEARCH_CACHE: weakref.WeakKeyDictionary[
    EMACodebook, tuple[tuple[int, int, int], weakref.ref[Tensor], PreparedCodes]
] = weakref.WeakKeyDictionary()

# ``step_weight`` of an EMA step: a (B, K) or (K,) tensor, or a callable ``(sums, counts) -> weight``; sums
# (B, K, d) is None when only the usage counts take the step (``codes=False``)
StepWeight = Tensor | Callable[[Tensor | None, Tensor], Tensor]


class EMACodebook(Float32State):
    """``books`` codebooks of ``size`` codes: nearest-code search, EMA update, k-means, dead-code expiry."""

    float32_parameters = True  # dtype casts leave the state float32, ``embed`` included when learnable

    # state (buffers, ``embed`` a parameter when learnable), see the module docstring
    embed: Tensor
    cluster_size: Tensor
    embed_avg: Tensor
    initted: Tensor
    # non-persistent buffers, registered on the first accumulating step (see update)
    pending_counts: Tensor
    pending_sums: Tensor
    # with ``affine`` (see the module docstring): (books, 1, dim) statistics and their () init flags
    batch_mean: Tensor
    batch_variance: Tensor
    codebook_mean: Tensor
    codebook_variance: Tensor
    codebook_mean_needs_init: Tensor
    codebook_variance_needs_init: Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        books: int = 1,
        cosine: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        ema: bool = True,
        learnable: bool = False,
        sync_kmeans: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        manual_ema: bool = False,
        vq_bridge: nn.Module | None = None,
        affine: bool = False,
        affine_batch_decay: float = 0.99,
        affine_codebook_decay: float = 0.9,
        sync_affine: bool = False,
        search_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_positive_int(size, "codebook_size")
        check_positive_int(dim, "codebook dim")
        check_positive_int(books, "books")
        check_positive_int(kmeans_iters, "kmeans_iters", minimum=0)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        _check_derived_codes(
            cosine, ema, learnable, manual_ema, vq_bridge, affine, affine_batch_decay, affine_codebook_decay
        )
        self.cosine, self.decay, self.eps = cosine, float(decay), float(eps)
        self.kmeans_init, self.kmeans_iters, self.sync_kmeans = kmeans_init, kmeans_iters, sync_kmeans
        self.ema = bool(ema)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.chunk_bytes = chunk_bytes
        if search_dtype not in CERTIFIED_DTYPES:
            raise ValueError(
                f"search_dtype must be one of {sorted(map(str, CERTIFIED_DTYPES - {None}))} or None, "
                f"got {search_dtype!r}"
            )
        # on CUDA, the certified low-precision search (vqcore.blocks.certified): a bfloat16 GEMM, the
        # float32 search's indices; one host sync per search. None: the float32 search everywhere
        self.search_dtype = search_dtype

        embed = torch.empty(books, size, dim)
        nn.init.kaiming_uniform_(embed.view(books * size, dim), a=math.sqrt(5))
        if cosine:
            embed = l2norm(embed)
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(books, size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self._initted_seen = (
            not kmeans_init
        )  # host-side cache of ``initted`` once it is True (see needs_init)
        self._has_pending = False  # accumulated EMA statistics waiting for the next step (see update)
        # manual_ema: training steps only accumulate the EMA statistics; update_ema() takes the step
        self.manual_ema = bool(manual_ema)
        self.vq_bridge = vq_bridge  # a submodule (its state_dict keys ``vq_bridge.*``) or None
        self.affine = bool(affine)
        self.sync_affine = bool(sync_affine)
        self.affine_batch_decay, self.affine_codebook_decay = (
            float(affine_batch_decay),
            float(affine_codebook_decay),
        )
        if affine:
            for name, value in (("batch_mean", 0.0), ("batch_variance", 1.0)):
                self.register_buffer(name, torch.full((books, 1, dim), value))
            for name, value in (("codebook_mean", 0.0), ("codebook_variance", 1.0)):
                self.register_buffer(name, torch.full((books, 1, dim), value))
                self.register_buffer(f"{name}_needs_init", torch.tensor(True))
        self.derived_codes = vq_bridge is not None or self.affine  # codes in use != embed
        self._held: Tensor | None = None  # the codes in use, while codes_held() computes them once

    # -- protocol ----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.embed.shape[1]

    @property
    def dim(self) -> int:
        return self.embed.shape[2]

    @property
    def books(self) -> int:
        return self.embed.shape[0]

    @property
    def codes(self) -> Tensor:
        """(books, size, dim), the codes in use: ``embed`` itself (an ``nn.Parameter`` when learnable: its
        ``.grad`` is the codebook's gradient), or the codes derived from it with ``vq_bridge`` / ``affine``
        (differentiable with respect to ``embed`` and the bridge's parameters)."""
        if not self.derived_codes:
            return self.embed
        return self._held if self._held is not None else self.derive_codes(self.embed)

    def derive_codes(self, embed: Tensor) -> Tensor:
        """Trained codes (books, size, dim) -> the codes in use: :meth:`bridged`, then the affine transform
        (the identity until its statistics exist)."""
        codes = self.bridged(embed)
        if self.affine:
            shift_from, scale, shift_to = self._affine_parts()
            codes = (codes - shift_from) * scale + shift_to
        return codes

    def bridged(self, embed: Tensor) -> Tensor:
        """``vq_bridge(embed)`` in the bridge's own dtype with autocast off, float32 out (``embed`` itself
        without a bridge)."""
        bridge = self.vq_bridge
        if bridge is None:
            return embed
        first = next(bridge.parameters(), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        with float32_region(embed.device.type):
            return bridge(embed.to(dtype)).float()

    def _affine_parts(self, inverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, s, b)`` (books, 1, dim) with ``codes = (c - a) * s + b``: ``(codebook_mean, batch_std /
        codebook_std, batch_mean)``, or the inverse ``(batch_mean, codebook_std / batch_std,
        codebook_mean)``; ``(0, 1, 0)`` until the statistics are initialised (no branch: export-safe)."""
        ready = ~(self.codebook_mean_needs_init | self.codebook_variance_needs_init)
        codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
        zero, one = torch.zeros((), device=ready.device), torch.ones((), device=ready.device)
        source, target = (
            (self.batch_mean, self.codebook_mean) if inverse else (self.codebook_mean, self.batch_mean)
        )
        scale = codebook_std / batch_std if inverse else batch_std / codebook_std
        return (
            torch.where(ready, source, zero),
            torch.where(ready, scale, one),
            torch.where(ready, target, zero),
        )

    def untransform(self, x: Tensor) -> Tensor:
        """Inputs x (B, N, dim) as the search sees them -> the space of ``embed``: the inverse of the affine
        transform (the identity without ``affine``). The EMA step and dead-code expiry work there."""
        if not self.affine:
            return x
        shift_from, scale, shift_to = self._affine_parts(inverse=True)
        return (x - shift_from) * scale + shift_to

    @contextlib.contextmanager
    def holding_codes(self) -> Iterator[None]:
        """Within the block, the codes in use are computed once (``vq_bridge`` runs once per forward, not per
        search and lookup), with the grad mode at entry; nested blocks reuse the outer one's codes."""
        if not self.derived_codes or self._held is not None:
            yield
            return
        self._held = self.derive_codes(self.embed)
        try:
            yield
        finally:
            self._held = None

    @property
    def trained_by_gradient(self) -> bool:
        """Learnable codes without EMA steps: the quantizer's losses train them."""
        return isinstance(self.embed, nn.Parameter) and not self.ema

    @float32_method
    def logits(self, x: Tensor) -> Tensor:
        """Similarities (B, N, size), higher is nearer: ``-||x - c||`` (``x . c`` for cosine codebooks),
        differentiable with respect to x; a full (tokens x codes) tensor (for soft assignments)."""
        return similarity(x, self.codes.detach(), cosine=self.cosine)

    def set_codes_(self, codes: Tensor) -> None:
        """Replace the codes (books, size, dim); the EMA statistics follow (``embed_avg = codes *
        cluster_size``) and k-means counts as done. Refused where the codes in use are derived
        (``vq_bridge``, ``affine``): assign the trained codes, ``embed``, yourself there."""
        if self.derived_codes:
            raise TypeError(
                "the codes in use are derived from the trained codes (vq_bridge / affine_param): they cannot "
                "be assigned; write the trained codes, codebook_module.embed, instead"
            )
        with torch.no_grad():
            self.embed.copy_(codes.reshape(self.embed.shape))
            self.embed_avg.copy_(self.embed * self.cluster_size.unsqueeze(-1))
            self.initted.fill_(True)
        self._initted_seen = True

    @float32_method
    def nearest(self, x: Tensor) -> Tensor:
        """x (B, N, d) float32 -> indices (B, N) int64."""
        if self.search_dtype is not None and x.device.type == "cuda" and not is_tracing():
            return nearest_certified(
                x,
                self.codes.detach(),
                cosine=self.cosine,
                low_dtype=self.search_dtype,
                chunk_bytes=self.chunk_bytes,
            )
        if self.derived_codes:  # no packed-codes cache: these codes change with the bridge and statistics
            return nearest(x, self.codes.detach(), cosine=self.cosine, chunk_bytes=self.chunk_bytes)
        codes = self.embed.detach()
        prepared = self._prepared_codes(codes) if fused_search_applies(x, codes) else None
        return nearest(x, codes, cosine=self.cosine, chunk_bytes=self.chunk_bytes, prepared=prepared)

    def _prepared_codes(self, codes: Tensor) -> PreparedCodes:
        """The codes packed for the fused CPU search, kept while ``embed`` is the same tensor at the same
        version: every write to it (EMA step, k-means, expiry, load_state_dict, an optimizer step on a
        learnable codebook) is an in-place op that bumps the version. Kept outside the module (deepcopy and
        pickling never see it)."""
        key = (id(self.embed), self.embed._version, self.chunk_bytes)
        cached = _SEARCH_CACHE.get(self)
        if cached is None or cached[0] != key or cached[1]() is not self.embed:
            prepared = prepare_codes(codes, cosine=self.cosine, chunk_bytes=self.chunk_bytes)
            cached = _SEARCH_CACHE[self] = (key, weakref.ref(self.embed), prepared)
        return cached[2]

    @float32_method
    def sample(self, x: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
        """Gumbel-sampled indices (B, N); ``temperature`` 0 means :meth:`nearest`."""
        if temperature <= 0:
            return self.nearest(x)
        return gumbel_sample(
            x,
            self.codes.detach(),
            cosine=self.cosine,
            temperature=temperature,
            generator=generator,
            chunk_bytes=self.chunk_bytes,
        )

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (B, N) in [0, K) -> codes (B, N, d); one gather into the flat (B*K, d) table."""
        table = self.codes
        books, size, dim = table.shape
        offsets = torch.arange(books, device=indices.device).unsqueeze(1) * size
        return nn.functional.embedding(indices + offsets, table.reshape(books * size, dim))

    # -- training state ----------------------------------------------------------------------------
    def needs_init(self) -> bool:
        """Whether k-means initialisation is still to run.

        Reads the ``initted`` buffer (a host sync, and a torch.compile graph break) only until it has been
        seen True; from then on a Python flag answers, so a compiled training step after initialisation has
        no break. Loading a state dict refreshes the flag, so a loaded ``initted = False`` is honoured.
        """
        if self._initted_seen:
            return False
        self._initted_seen = bool(self.initted)
        return not self._initted_seen

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        if self.affine and isinstance(state_dict, dict):
            # vector-quantize-pytorch registers its batch statistics only on its first forward: a state_dict
            # of a reference codebook whose statistics were never initialised lacks them (they are unused)
            flag = state_dict.get(f"{prefix}codebook_mean_needs_init")
            if flag is not None and bool(flag):
                for name in ("batch_mean", "batch_variance"):
                    state_dict.setdefault(f"{prefix}{name}", self.get_buffer(name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted_seen = bool(self.initted)  # loading is eager: read the loaded flag here, not in forward

    def prepare_(self, x: Tensor, valid: Tensor | None = None, *, sync: bool = False) -> None:
        """Before a training batch's search: k-means initialisation, once (see :meth:`init_`); then, with
        ``affine``, the step of the affine statistics (:meth:`update_affine_`)."""
        if self.kmeans_init and self.needs_init():
            self.init_(x, valid, sync=sync, sync_kmeans=self.sync_kmeans)
        if self.affine:
            self.update_affine_(x, valid, sync=should_sync(self.sync_affine))

    @torch.no_grad()
    @float32_method
    def update_affine_(self, x: Tensor, valid: Tensor | None = None, sync: bool = False) -> None:
        """One EMA step of the affine statistics: ``batch_*`` from the valid tokens of x (B, N, dim), per
        book and feature (variance unbiased=False), ``codebook_*`` from the codes before the transform;
        decays ``affine_batch_decay`` / ``affine_codebook_decay``:
        ``stat <- decay * stat + (1 - decay) * new``, the first step with tokens sets them. Under ``sync``
        the batch statistics are those of every rank's tokens together (sums and counts all-reduced, then
        the squared deviations from the global mean)."""
        valid = _finite_tokens(x, valid)
        keep = valid.unsqueeze(-1)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        kept = torch.where(keep, x, zero)
        count = valid.sum(-1, keepdim=True).unsqueeze(-1).to(x.dtype)  # (B, 1, 1)
        sums = all_reduce_sum_(torch.cat([kept.sum(1, keepdim=True), count], -1), sync)
        count = sums[..., -1:]
        mean = sums[..., :-1] / count.clamp(min=1)
        deviation = all_reduce_sum_(torch.where(keep, x - mean, zero).pow(2).sum(1, keepdim=True), sync)
        variance = deviation / count.clamp(min=1)
        seen = count > 0  # (B, 1, 1): books without any valid token keep their batch statistics
        first = self.codebook_mean_needs_init | self.codebook_variance_needs_init
        codes = self.bridged(self.embed.detach())
        updates = (
            ("batch_mean", mean, self.affine_batch_decay, seen),
            ("batch_variance", variance, self.affine_batch_decay, seen),
            ("codebook_mean", codes.mean(1, keepdim=True), self.affine_codebook_decay, None),
            (
                "codebook_variance",
                codes.var(1, unbiased=False, keepdim=True),
                self.affine_codebook_decay,
                None,
            ),
        )
        for name, new, decay, where in updates:
            old = self.get_buffer(name)
            value = torch.where(first, new, old * decay + new * (1 - decay))
            old.copy_(value if where is None else torch.where(where, value, old))
        started = seen.any()
        self.codebook_mean_needs_init.copy_(self.codebook_mean_needs_init & ~started)
        self.codebook_variance_needs_init.copy_(self.codebook_variance_needs_init & ~started)

    @torch.no_grad()
    @float32_method
    def init_(
        self, x: Tensor, valid: Tensor | None = None, sync: bool = False, sync_kmeans: bool = True
    ) -> bool:
        """k-means on the batch, if not done yet; returns whether it ran.

        ``valid`` (B, N) marks tokens that count. Empty clusters keep a data point as their code and
        get a pseudo-count of 1 (like a fresh code), never a zero vector. Under ``sync``: with
        ``sync_kmeans`` k-means runs on the global batch (seeds from every rank's tokens, statistics
        summed); without, rank 0 runs it on its own batch and broadcasts the result (fewer collectives).
        Either way every rank ends with the same codebook.
        """
        if bool(self.initted):
            return False
        valid = _finite_tokens(x, valid)
        # every book needs a token (on some rank, or on rank 0 without sync_kmeans); wait for a batch that
        # has them. The decision is taken on a shared count so that every rank takes it alike.
        local_only = sync and not sync_kmeans
        tokens_per_book = valid.sum(-1).float()
        if local_only:
            broadcast_(tokens_per_book, sync)
        else:
            all_reduce_sum_(tokens_per_book, sync)
        if not bool((tokens_per_book > 0).all()):
            return False
        if local_only:
            means = x.new_empty(self.embed.shape)
            counts = x.new_empty(self.cluster_size.shape)
            if dist_rank() == 0:
                means, counts = kmeans(
                    x.nan_to_num(), self.size, self.kmeans_iters, cosine=self.cosine, valid=valid
                )
            broadcast_(means, sync)
            broadcast_(counts, sync)
        else:
            means, counts = kmeans(
                x.nan_to_num(), self.size, self.kmeans_iters, cosine=self.cosine, valid=valid, sync=sync
            )
        counts = torch.where(counts > 0, counts, torch.ones_like(counts))
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(means * counts.unsqueeze(-1))
        self._recompute_embed()
        self.initted.fill_(True)
        self._initted_seen = True
        return True

    @torch.no_grad()
    @float32_method
    def update(
        self,
        x: Tensor,
        indices: Tensor,
        valid: Tensor | None = None,
        sync: bool = False,
        codes: bool = True,
        step_weight: StepWeight | None = None,
        accumulate: bool = False,
    ) -> Tensor | None:
        """One EMA step from tokens x (B, N, d) assigned to indices (B, N); returns the (B, K) mask of codes
        a zero ``step_weight`` froze (None without weights).

        ``codes=False``: only the usage counts (``cluster_size``) take the step, for dead-code expiry of a
        codebook that is trained otherwise (by gradient); ``embed_avg`` and ``embed`` are left alone.

        ``step_weight`` (B, K) (or (K,)), or a callable ``(sums (B, K, d), counts (B, K)) -> weight``, scales
        each code's step: ``stat <- lerp(stat, batch_stat, (1 - decay) * w)``. A code with weight 0 is
        frozen: its statistics and its vector stay exactly as they are (the other codes' Laplace smoothing
        does not move it).

        ``accumulate``: this batch's counts and sums are only added to pending totals, and the next
        non-accumulating call folds them into its own before its step: several micro-batches of gradient
        accumulation then make one EMA step, as their concatenation would (collectives run then, once).
        """
        valid = _finite_tokens(x, valid)
        counts = bincount_per_book(indices, self.size, valid.to(torch.float32))
        if codes:
            x = torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        if accumulate:
            self._add_pending(counts, sum_per_code(x.float(), indices, self.size) if codes else None)
            return None
        # the (B, K, d) sums are passed without a name here, so that the step can free them before it
        # recomputes the codes (2^18 codes of 256 features: 256 MiB)
        return self._ema_step(
            counts, sum_per_code(x.float(), indices, self.size) if codes else None, sync, step_weight
        )

    @torch.no_grad()
    def update_ema(self, *, sync: bool | None = None, step_weight: StepWeight | None = None) -> None:
        """The EMA step from the statistics accumulated since the last one (every training step of a
        ``manual_ema`` codebook, or steps with ``accumulate``), as one step on their concatenated batches,
        then the codes recomputed. Nothing accumulated: nothing changes. ``sync`` (None: an initialised
        process group of more than one rank) all-reduces the statistics: every rank must call it."""
        if not self.ema:
            raise ValueError(
                "update_ema: this codebook takes no EMA steps (ema_update=False, or trained by gradient)"
            )
        with float32_region(self.embed.device.type):
            self._ema_step(
                torch.zeros_like(self.cluster_size),
                torch.zeros_like(self.embed_avg),
                should_sync(sync),
                step_weight,
            )

    def _ema_step(
        self, counts: Tensor, sums: Tensor | None, sync: bool, step_weight: StepWeight | None
    ) -> Tensor | None:
        """The EMA step (see :meth:`update`) from this batch's counts and sums plus the pending ones."""
        counts, sums = self._take_pending(counts, sums)
        counts = all_reduce_sum_(counts, sync)
        sums = None if sums is None else all_reduce_sum_(sums, sync)
        # a book that saw no valid token (all masked / non-finite, on every rank) keeps its state: an empty
        # batch carries no information, and decaying it would drive n to 0 (embed = 0/0 with decay 0). Its
        # step is 0, and lerp with weight 0 returns the state as it was: no mask, no host read.
        seen = counts.sum(-1, keepdim=True) > 0
        step = (1.0 - self.decay) * seen.to(torch.float32)  # (B, 1)
        frozen = None
        if step_weight is not None:
            weight = step_weight(sums, counts) if callable(step_weight) else step_weight
            weight = weight.to(device=counts.device, dtype=torch.float32)
            frozen = ((1.0 - self.decay) * weight == 0).expand_as(counts)
            step = step * weight
        self.cluster_size.lerp_(counts, step)
        if sums is None:  # codes=False: only the usage counts take the step
            return frozen
        self.embed_avg.lerp_(sums, step.unsqueeze(-1))  # in place: no codebook-sized temporary
        del sums
        self._recompute_embed(seen, frozen)
        return frozen

    def _add_pending(self, counts: Tensor, sums: Tensor | None) -> None:
        if getattr(self, "pending_counts", None) is None:  # allocated on first use (non-persistent buffers)
            self.register_buffer("pending_counts", torch.zeros_like(counts), persistent=False)
            self.register_buffer("pending_sums", torch.zeros_like(self.embed_avg), persistent=False)
        self.pending_counts.add_(counts)
        if sums is not None:
            self.pending_sums.add_(sums)
        self._has_pending = True

    def _take_pending(self, counts: Tensor, sums: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """This batch's statistics plus the accumulated ones (which are then cleared)."""
        if not self._has_pending:  # a host-side flag: no device read on the EMA step's hot path
            return counts, sums
        counts = counts + self.pending_counts
        sums = None if sums is None else sums + self.pending_sums
        self.pending_counts.zero_()
        self.pending_sums.zero_()
        self._has_pending = False
        return counts, sums

    def train_step_(
        self,
        x: Tensor,
        indices: Tensor,
        valid: Tensor | None = None,
        *,
        sync: bool = False,
        step_weight: StepWeight | None = None,
        accumulate: bool = False,
        ema: bool | None = None,
    ) -> None:
        """What a training batch does to the codebook: the EMA step (``ema``, default the codebook's;
        otherwise, with expiry on, only the usage counts expiry reads), then dead-code expiry. An
        ``accumulate`` batch only adds to the pending statistics (see :meth:`update`), and so does every
        EMA step of a ``manual_ema`` codebook (:meth:`update_ema` takes the step; expiry still runs);
        codes frozen by a zero ``step_weight`` never expire. With ``affine`` both work on
        :meth:`untransform` of x."""
        ema = self.ema if ema is None else bool(ema)
        if not ema and self.threshold_ema_dead_code <= 0:
            return
        x = self.untransform(x)
        frozen = self.update(
            x,
            indices,
            valid,
            sync,
            codes=ema,
            step_weight=step_weight,
            accumulate=accumulate or (ema and self.manual_ema),
        )
        if not accumulate:
            self.expire_(x, valid, sync=sync, protect=frozen)

    def _recompute_embed(self, books: Tensor | None = None, frozen: Tensor | None = None) -> None:
        """embed = embed_avg / smoothed cluster sizes, for every book or where ``books`` (B, 1) is True,
        except for ``frozen`` (B, K) codes, which keep their vectors.

        In place, without a codebook-sized temporary (2^18 codes of 256 features are 256 MiB): a kept code
        is divided by infinity (``embed * 1 + embed_avg / inf`` is exactly ``embed``) and an updated one
        multiplied by 0 first (``embed * 0 + embed_avg / smoothed``), in one ``addcdiv_``."""
        n = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n
        keep = None if books is None else ~books.expand_as(self.cluster_size)
        if frozen is not None:
            keep = frozen if keep is None else keep | frozen
        # written in place under no_grad: bumps the version (the search cache sees it)
        embed = self.embed.detach()
        if keep is None:
            torch.div(self.embed_avg, smoothed.unsqueeze(-1), out=embed)
        else:
            embed.mul_(keep.unsqueeze(-1).to(embed.dtype))
            divisor = torch.where(keep, float("inf"), smoothed)
            embed.addcdiv_(self.embed_avg, divisor.unsqueeze(-1))
        if self.cosine:  # l2norm in place; a kept code is divided by 1
            norm = embed.norm(dim=-1).clamp_min(1e-12)
            embed.div_((norm if keep is None else torch.where(keep, 1.0, norm)).unsqueeze(-1))

    @torch.no_grad()
    @float32_method
    def expire_(
        self,
        x: Tensor,
        valid: Tensor | None = None,
        sync: bool = False,
        generator: torch.Generator | None = None,
        protect: Tensor | None = None,
    ) -> Tensor:
        """Replace codes whose ``cluster_size`` fell below the threshold with batch vectors.

        Replaced codes get ``embed = v``, ``cluster_size = threshold`` and ``embed_avg = v * threshold``
        (so that the next EMA step starts from the new code). Returns the (B, K) bool mask of replaced
        codes. Replacements are drawn from the GLOBAL batch: under ``sync`` rank 0 draws positions in the
        concatenation (rank order) of every rank's valid tokens, so every rank installs the same vectors,
        equal to those one process draws on the concatenated batch (see
        :func:`vqcore.blocks.distributed.global_pool_draw`). A book without any valid token on any rank keeps
        its codes.
        """
        if self.threshold_ema_dead_code <= 0:
            return torch.zeros_like(self.cluster_size, dtype=torch.bool)
        expired = self.cluster_size < self.threshold_ema_dead_code
        if protect is not None:  # (B, K) codes that must not be replaced (frozen by a zero EMA weight)
            expired = expired & ~protect
        # cluster sizes are identical on every rank (synced EMA), but the branch below runs collectives:
        # take it on an agreed flag, and rank 0's mask, so that no state drift can ever hang a job
        any_expired = all_reduce_max_(expired.any().reshape(1).to(torch.int32), sync)
        if not bool(any_expired.item()):
            return torch.zeros_like(expired)
        expired = broadcast_(expired.to(torch.uint8), sync).bool()
        valid = _finite_tokens(x, valid)

        def draw(total: int, count: int) -> Tensor:
            if total >= count:
                return torch.randperm(total, generator=generator, device="cpu")[:count]
            return torch.randint(total, (count,), generator=generator, device="cpu")

        vectors, expired = global_pool_draw(x, valid, expired, draw, sync)
        # only the replaced rows are written, a budget's worth at a time: no codebook-sized temporary besides
        # the drawn vectors (the host has read the mask above already)
        books, codes = expired.nonzero(as_tuple=True)
        rows = max(1, self.chunk_bytes // (4 * self.dim))
        embed = self.embed.detach()  # written in place: bumps the version (the search cache sees it)
        for start in range(0, books.numel(), rows):
            where = books[start : start + rows], codes[start : start + rows]
            chosen = vectors[where]
            if self.cosine:
                chosen = l2norm(chosen)
            embed[where] = chosen
            self.embed_avg[where] = chosen * self.threshold_ema_dead_code
        self.cluster_size.masked_fill_(expired, self.threshold_ema_dead_code)
        return expired

    def extra_repr(self) -> str:
        kind = "cosine" if self.cosine else "euclidean"
        training = (
            "gradient" if self.trained_by_gradient else f"ema, decay={self.decay}" if self.ema else "frozen"
        )
        extras = [name for name, on in (("manual_ema", self.manual_ema), ("affine", self.affine)) if on]
        return ", ".join(
            [f"books={self.books}, size={self.size}, dim={self.dim}, {kind}, {training}", *extras]
        )


def _check_derived_codes(
    cosine: bool,
    ema: bool,
    learnable: bool,
    manual_ema: bool,
    vq_bridge: object,
    affine: bool,
    affine_batch_decay: float,
    affine_codebook_decay: float,
) -> None:
    """The EMACodebook options of VectorQuantize's codebook-training keywords, checked together (the
    messages name VectorQuantize's keywords)."""
    if vq_bridge is not None:
        if not isinstance(vq_bridge, nn.Module):
            raise TypeError(f"vq_bridge must be an nn.Module or None, got {type(vq_bridge).__name__}")
        if ema:
            raise ConfigurationError(
                "vq_bridge trains the codes through the bridge by gradient: it cannot take EMA steps; "
                "leave ema_update unset (or False) with vq_bridge"
            )
        if not learnable:
            raise ConfigurationError(
                "vq_bridge needs learnable codes: leave learnable_codebook unset (or True) with vq_bridge"
            )
    if affine:
        if cosine:
            raise ConfigurationError(
                "affine_param is for euclidean codebooks (it re-centres and re-scales the codes): "
                "use_cosine_sim=True does not support it; pass use_cosine_sim=False or affine_param=False"
            )
        for name, decay in (
            ("affine_param_batch_decay", affine_batch_decay),
            ("affine_param_codebook_decay", affine_codebook_decay),
        ):
            if not 0.0 <= decay <= 1.0:
                raise ConfigurationError(f"{name} must be in [0, 1], got {decay}")
    if manual_ema and not ema:
        raise ConfigurationError(
            "manual_ema_update defers the EMA step of an EMA codebook: with ema_update=False (or a codebook "
            "trained by gradient) there is none; pass manual_ema_update=False or ema_update=True"
        )


_NO_HOLD = contextlib.nullcontext()


def codes_held(codebook: Codebook) -> contextlib.AbstractContextManager[None]:
    """The codebook's ``holding_codes()`` block where its codes in use are derived (computed once in the
    block), a no-op otherwise (and for codebooks without one)."""
    if not getattr(codebook, "derived_codes", False):
        return _NO_HOLD
    return codebook.holding_codes()  # type: ignore[attr-defined]


def _finite_tokens(x: Tensor, valid: Tensor | None) -> Tensor:
    """(B, N) bool: tokens that are unmasked and whose features sum to a finite value.

    A NaN or Inf feature makes the sum non-finite, so this is ``isfinite(x).all(-1)`` but for tokens of
    finite features so large that their sum overflows float32 (|x| near 1e38): they are left out too,
    since summed into the EMA statistics they would overflow them. One reduction instead of three
    elementwise passes (benchmarks/README.md has the measurement).
    """
    finite = torch.isfinite(x.sum(-1))
    return finite if valid is None else finite & valid


def build_codebook(
    codebook: str | Codebook, *, size: int, dim: int, books: int = 1, **kwargs: Any
) -> Codebook:
    """The codebook a quantizer uses: a registered name built with ``size``, ``dim``, ``books`` and
    ``kwargs``, or a :class:`~vqcore.protocols.Codebook` object (no kwargs), checked against the protocol
    and the quantizer's sizes."""
    if isinstance(codebook, str):
        from vqcore.registry import get_registry

        built = (
            get_registry().get_entry(codebook, "codebook").create(size=size, dim=dim, books=books, **kwargs)
        )
        origin = f"codebook {codebook!r}"
    else:
        if kwargs:
            raise ValueError(
                f"codebook_kwargs {sorted(kwargs)} are for a codebook given by name, not an object"
            )
        built, origin = codebook, f"codebook {type(codebook).__name__}"
    if not isinstance(built, Codebook):
        members = ("size", "dim", "books", "codes", "cosine", "trained_by_gradient", "nearest", "lookup")
        missing = [m for m in (*members, "prepare_", "train_step_") if not hasattr(built, m)]
        raise TypeError(f"{origin} does not follow vqcore.protocols.Codebook: missing {', '.join(missing)}")
    if not isinstance(built, nn.Module):
        raise TypeError(f"{origin} must be an nn.Module (its state saves and moves with the quantizer)")
    got, want = (built.size, built.dim, built.books), (size, dim, books)
    if got != want:
        raise ValueError(
            f"{origin} has (size, dim, books) = {got}; the quantizer needs {want} "
            "(codebook_size, codebook_dim, one book per head with separate codebooks)"
        )
    return built
