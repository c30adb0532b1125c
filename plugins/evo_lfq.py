"""EvoLFQ: an encoder, an LFQ and a decoder, with a genetic search over the LFQ's code bits.

``forward(x)`` runs ``decoder(lfq(encoder(x)).quantized)`` and returns :class:`Return`
``(reconstructed, indices, entropy_aux_loss)``. The search treats a code as a gene of bits: ``encode(x)``
gives the bits of the codes the LFQ chooses for ``encoder(x)`` (``(..., num_codebooks * bits)``, 0/1 or
with ``return_signs=True`` -1/+1), ``decode_bits(bits)`` decodes any bits (0/1 or signs) back through
the LFQ's codes and the decoder. ``evolve(fitness_fn, ...)`` is a generator: each generation scores the
population with ``fitness_fn(decoded, genes) -> (pop_size,)`` (higher is better), keeps the
``elitism_count`` best genes, fills the rest with children of tournament-selected parents (uniform
crossover, then bit flips at ``mutation_rate``), and yields :class:`Result` ``(pop_bits, best_gene,
best_fitness, best_decoded)``: the next population, and the best gene scored so far with its fitness
(and its decoding with ``return_best_decoded=True``).

Bits read the LFQ's index most significant bit first, codebook after codebook: the gene of a token is
the concatenation, over its codebooks, of the bits of ``index`` from ``2^(bits-1)`` down to ``1``, which
are the signs of its code in codebook space (before the LFQ's output projection). The LFQ is used
through its public API (``forward``, ``encode``, ``codebook_size``, ``num_codebooks`` and
``keep_num_codebooks_dim``), and ``decode_bits`` through the unchecked body of ``indices_to_codes``
(``LFQ.decode_tokens``, which skips the value check: the indices it builds from bits are always in range).

Not a :class:`vqcore.protocols.Quantizer`, so not registered (``vqcore.create`` does not build it, and
the export layer does not take it): it wraps the user's encoder and decoder, its forward returns the
decoder's reconstruction rather than a quantized input, its ``encode`` returns bits rather than indices,
and a config cannot record arbitrary modules. Its LFQ is a quantizer and exports on its own
(``vqcore.export`` on ``model.lfq``). Nor is there a reference converter, for the same reason; convert
the LFQ and keep the modules::

    EvoLFQ(ref.encoder, ref.decoder, lfq=vqcore.compat.from_reference(ref.lfq), pop_size=ref.pop_size)

A reference EvoLFQ ``state_dict`` loads strictly (its LFQ's ``mask`` buffer holds bit weights, not state,
and is dropped when the LFQ has no such entry).

Differences from vector-quantize-pytorch 1.32.0, on purpose:

- ``encode`` gives the bits of the chosen codes (before the LFQ's output projection and rotation), always
  channel-last ``(..., num_codebooks * bits)`` (images too); the reference thresholds the projected
  output, which are not the code's bits when the LFQ projects or rotates;
- ``evolve`` reports the best gene of the population it scored (the reference takes the gene at the
  same row of the next, re-ordered population);
- bad arguments raise :class:`~vqcore.errors.ConfigurationError` (a ValueError that is also the
  reference's AssertionError) naming what was expected; an ``lfq`` together with LFQ options is refused
  (the reference ignores the options); ``shape`` defaults to one gene ``(num_codebooks * bits,)``;
  ``fitness_fn`` must give one score per gene.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vqcore.blocks.validation import check_tensor
from vqcore.errors import ConfigurationError
from vqcore.plugins.lfq import LFQ


class Return(NamedTuple):
    """``forward``'s result: the decoder's output, the LFQ's indices and its entropy aux loss."""

    reconstructed: Any
    indices: Tensor
    entropy_aux_loss: Tensor


class Result(NamedTuple):
    """One generation of ``evolve``: the next population, the best gene scored so far (a copy), its
    fitness (a float) and its decoding (None unless ``return_best_decoded``)."""

    pop_bits: Tensor
    best_gene: Tensor
    best_fitness: float
    best_decoded: Any


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` and its submodules in eval mode inside the block; each one's mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _int_at_least(value: object, minimum: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _rate(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class EvoLFQ(nn.Module):
    """``decoder(lfq(encoder(x)))`` with a genetic search over the LFQ's code bits (module docstring).

    ``lfq``: a vqcore :class:`~vqcore.plugins.lfq.LFQ`, or None to build one from ``dim``,
    ``codebook_size``, ``num_codebooks`` and ``**lfq_kwargs``. The search's defaults: ``pop_size``
    genes, of which ``elitism_count`` survive each generation, ``tournament_size`` contenders per
    parent, ``mutation_rate`` per bit, ``generations``.
    """

    bit_shifts: Tensor  # (bits,) int64, most significant first
    zero: Tensor

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        lfq: LFQ | None = None,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        num_codebooks: int = 1,
        pop_size: int = 64,
        mutation_rate: float = 0.02,
        tournament_size: int = 2,
        elitism_count: int = 1,
        generations: int = 50,
        **lfq_kwargs: Any,
    ):
        super().__init__()
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            if not callable(module):
                raise TypeError(f"{name} must be a module (a callable), got {type(module).__name__}")
        _int_at_least(pop_size, 2, "pop_size")
        _int_at_least(elitism_count, 0, "elitism_count")
        if pop_size <= elitism_count:
            raise ConfigurationError(
                f"pop_size must be greater than elitism_count, got pop_size={pop_size}, "
                f"elitism_count={elitism_count}"
            )
        _int_at_least(tournament_size, 1, "tournament_size")
        _int_at_least(generations, 0, "generations")
        if lfq is None:
            if dim is None and codebook_size is None:
                raise ConfigurationError(
                    "EvoLFQ needs an lfq instance, or dim and/or codebook_size to build one; got neither"
                )
            lfq = LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, **lfq_kwargs)
        elif not isinstance(lfq, LFQ):
            raise TypeError(f"lfq must be a vqcore LFQ (or None), got {type(lfq).__name__}")
        else:
            given = [
                f"{k}={v!r}" for k, v in (("dim", dim), ("codebook_size", codebook_size)) if v is not None
            ]
            given += [f"num_codebooks={num_codebooks}"] if num_codebooks != 1 else []
            given += [f"{k}={v!r}" for k, v in lfq_kwargs.items()]
            if given:
                raise ConfigurationError(
                    "pass either an lfq or the options to build one, not both; "
                    f"got lfq and {', '.join(given)}"
                )
        self.encoder = encoder
        self.decoder = decoder
        self.lfq = lfq
        self.pop_size = pop_size
        self.mutation_rate = _rate(mutation_rate, "mutation_rate")
        self.tournament_size = tournament_size
        self.elitism_count = elitism_count
        self.generations = generations
        bits = lfq.codebook_size.bit_length() - 1
        self.bits_per_codebook = bits
        self.gene_length = bits * lfq.num_codebooks
        self.register_buffer("bit_shifts", torch.arange(bits - 1, -1, -1), persistent=False)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.register_load_state_dict_pre_hook(_drop_reference_lfq_mask)

    @property
    def device(self) -> torch.device:
        return self.zero.device

    def forward(self, x: Any, **kwargs: Any) -> Return:
        """``kwargs`` go to the LFQ's forward (``inv_temperature``, ``mask``)."""
        quantized, indices, entropy_aux_loss = self.lfq(self.encoder(x), **kwargs)
        return Return(self.decoder(quantized), indices, entropy_aux_loss)

    # -- bits <-> indices -----------------------------------------------------------------------------
    def indices_to_bits(self, indices: Tensor, return_signs: bool = False) -> Tensor:
        """LFQ indices ``(...)`` (``(..., num_codebooks)`` with the codebook axis) -> float bits
        ``(..., num_codebooks * bits)``: 0/1, or -1/+1 with ``return_signs``."""
        if not self.lfq.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        bits = ((indices.unsqueeze(-1) >> self.bit_shifts) & 1).flatten(-2).float()
        return bits * 2 - 1 if return_signs else bits

    def bits_to_indices(self, bits: Tensor) -> Tensor:
        """Bits ``(..., num_codebooks * bits)`` (0/1 or -1/+1: a bit is set where > 0) -> int64 LFQ
        indices ``(...)``, or ``(..., num_codebooks)`` with the codebook axis."""
        check_tensor(bits, "bits")
        if bits.ndim == 0 or bits.shape[-1] != self.gene_length:
            raise ValueError(
                f"bits must end with an axis of {self.gene_length} bits (num_codebooks "
                f"{self.lfq.num_codebooks} x {self.bits_per_codebook} bits), got shape {tuple(bits.shape)}"
            )
        set_bits = (bits > 0).long().unflatten(-1, (self.lfq.num_codebooks, self.bits_per_codebook))
        indices = (set_bits << self.bit_shifts).sum(-1)
        return indices if self.lfq.keep_num_codebooks_dim else indices.squeeze(-1)

    @torch.no_grad()
    def encode(self, x: Any, return_signs: bool = False) -> Tensor:
        """The bits of the codes the LFQ chooses for ``encoder(x)`` (eval mode, no gradient)."""
        with evaluating(self):
            indices = self.lfq.encode(self.encoder(x))
        return self.indices_to_bits(indices, return_signs)

    @torch.no_grad()
    def decode_bits(self, bits: Tensor) -> Any:
        """``decoder(codes)`` of bits ``(..., num_codebooks * bits)``: the codes ``(..., dim)`` the LFQ
        decodes (its output projection applied), eval mode, no gradient."""
        indices = self.bits_to_indices(bits)
        # (1, N, num_codebooks); built from bits, so always in [0, codebook_size): decoded without the
        # public path's value check (a host sync) and -1 handling, same codes as indices_to_codes
        tokens = indices.reshape(1, -1, self.lfq.num_codebooks)
        with evaluating(self):
            codes = self.lfq.decode_tokens(tokens, dropped=False)
            return self.decoder(codes.reshape(*bits.shape[:-1], codes.shape[-1]))

    # -- the genetic search -----------------------------------------------------------------------------
    def init_random_population(
        self,
        pop_size: int | None = None,
        shape: tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
        is_sign: bool = False,
    ) -> Tensor:
        """``(pop_size, *shape)`` random bits (default shape: one gene); -1/+1 with ``is_sign``."""
        pop_size = self.pop_size if pop_size is None else pop_size
        shape = (self.gene_length,) if shape is None else tuple(shape)
        device = self.device if device is None else device
        bits = torch.randint(0, 2, (pop_size, *shape), device=device).float()
        return bits * 2 - 1 if is_sign else bits

    def init_population_from_data(
        self,
        x: Any,
        pop_size: int | None = None,
        mutation_rate: float | None = None,
        is_sign: bool = False,
    ) -> Tensor:
        """The first ``pop_size`` genes of ``encode(x)`` (its samples repeated as needed), mutated."""
        pop_size = self.pop_size if pop_size is None else pop_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        bits = self.encode(x, return_signs=is_sign)
        samples = bits.shape[0]
        if samples < pop_size:
            bits = bits.repeat(-(-pop_size // samples), *([1] * (bits.ndim - 1)))
        bits = bits[:pop_size]
        return self.mutate(bits, mutation_rate, is_sign) if mutation_rate > 0 else bits

    def uniform_crossover(self, parent1: Tensor, parent2: Tensor) -> Tensor:
        """Each bit from either parent with probability 1/2."""
        return torch.where(torch.rand(parent1.shape, device=parent1.device) < 0.5, parent1, parent2)

    def mutate(self, population: Tensor, mutation_rate: float | None = None, is_sign: bool = False) -> Tensor:
        """Each bit flipped with probability ``mutation_rate`` (0 <-> 1, or -1 <-> +1 with ``is_sign``)."""
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand(population.shape, device=population.device) < mutation_rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def tournament_selection(
        self, population: Tensor, fitnesses: Tensor, tournament_size: int | None = None
    ) -> Tensor:
        """``pop_size`` winners, each the fittest of ``tournament_size`` genes drawn at random."""
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        contenders = torch.randint(
            0, population.shape[0], (population.shape[0], tournament_size), device=population.device
        )
        scores = fitnesses.index_select(0, contenders.flatten()).view(contenders.shape)
        winners = contenders.gather(1, scores.argmax(-1, keepdim=True)).squeeze(1)
        return population.index_select(0, winners)

    def fitness_of(self, pop_bits: Tensor, fitness_fn: Callable[..., Any], batch_size: int | None = None):
        """``fitness_fn(decode_bits(pop_bits), pop_bits)`` as a float32 ``(pop_size,)`` tensor; with
        ``batch_size``, the population is decoded that many genes at a time."""
        if batch_size is None:
            decoded = self.decode_bits(pop_bits)
        else:
            _int_at_least(batch_size, 1, "batch_size")
            decoded = torch.cat([self.decode_bits(chunk) for chunk in pop_bits.split(batch_size)])
        fitnesses = fitness_fn(decoded, pop_bits)
        fitnesses = torch.as_tensor(fitnesses, dtype=torch.float32, device=pop_bits.device)
        if fitnesses.shape != (pop_bits.shape[0],):
            raise ValueError(
                f"fitness_fn must return one score per gene, shape ({pop_bits.shape[0]},); "
                f"got shape {tuple(fitnesses.shape)}"
            )
        return fitnesses

    @torch.no_grad()
    def step(
        self,
        pop_bits: Tensor,
        fitness_fn: Callable[..., Any],
        tournament_size: int | None = None,
        mutation_rate: float | None = None,
        elitism_count: int | None = None,
        is_sign: bool = False,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """One generation: ``(next population, fitnesses of pop_bits)``. The next population holds the
        ``elitism_count`` fittest genes first (fittest first), then the children."""
        check_tensor(pop_bits, "pop_bits")
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        elitism_count = self.elitism_count if elitism_count is None else elitism_count
        pop_size = pop_bits.shape[0] if pop_bits.ndim else 0
        if not 0 <= elitism_count < pop_size:
            raise ValueError(
                f"elitism_count must be in [0, pop_size) for a population of {pop_size} genes, "
                f"got {elitism_count}"
            )
        fitnesses = self.fitness_of(pop_bits, fitness_fn, batch_size)
        ranked = torch.argsort(fitnesses, descending=True, stable=True)
        # index_select rather than advanced indexing: the same rows, without the indexing kernel's
        # parallel region (which wakes the thread pool for a population this small)
        elites = pop_bits.index_select(0, ranked[:elitism_count])
        children = pop_size - elitism_count
        contenders = torch.randint(0, pop_size, (children, 2, tournament_size), device=pop_bits.device)
        scores = fitnesses.index_select(0, contenders.flatten()).view(contenders.shape)
        parents = contenders.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)
        both = pop_bits.index_select(0, parents.t().flatten()).unflatten(0, (2, children))
        offspring = self.uniform_crossover(both[0], both[1])
        offspring = self.mutate(offspring, mutation_rate, is_sign)
        return torch.cat([elites, offspring]), fitnesses

    @torch.no_grad()
    def evolve(
        self,
        fitness_fn: Callable[..., Any],
        pop_bits: Tensor | None = None,
        pop_size: int | None = None,
        shape: tuple[int, ...] | None = None,
        generations: int | None = None,
        is_sign: bool = False,
        return_best_decoded: bool = False,
        **step_kwargs: Any,
    ) -> Iterator[Result]:
        """Yields one :class:`Result` per generation (``generations``, default the module's); starts from
        ``pop_bits``, or a random population of ``pop_size`` genes of ``shape``."""
        generations = self.generations if generations is None else generations
        if pop_bits is None:
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)
        best_fitness = float("-inf")
        best_gene: Tensor | None = None
        for _ in range(generations):
            scored = pop_bits
            pop_bits, fitnesses = self.step(scored, fitness_fn, is_sign=is_sign, **step_kwargs)
            top = int(fitnesses.argmax())
            if best_gene is None or fitnesses[top].item() > best_fitness:
                best_fitness = fitnesses[top].item()
                best_gene = scored[top].clone()
            best_decoded = self.decode_bits(best_gene.unsqueeze(0))[0] if return_best_decoded else None
            yield Result(pop_bits, best_gene, best_fitness, best_decoded)


def _drop_reference_lfq_mask(
    module: EvoLFQ, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """Load pre-hook: the reference LFQ saves its bit weights as ``mask``; drop the entry when this LFQ
    has none (the weights are constants, not state)."""
    key = f"{prefix}lfq.mask"
    if key in state_dict and "mask" not in module.lfq.state_dict():
        del state_dict[key]
