"""EvoLFQ: the return structures, bits <-> indices (most significant bit first, codebook after codebook),
encode / decode_bits against hand-computed codes and the eval forward, the genetic search (elites, the
best gene of the scored population, chunked decoding), errors, and reference state dicts and outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqcore import LFQ, EvoLFQ
from vqcore.errors import ConfigurationError
from vqcore.plugins.evo_lfq import Result, Return


def _identity(dim=3, codebook_size=8, **kwargs):
    return EvoLFQ(nn.Identity(), nn.Identity(), lfq=LFQ(dim=dim, codebook_size=codebook_size), **kwargs)


def test_return_structures_are_named_tuples_with_the_references_fields():
    assert Return._fields == ("reconstructed", "indices", "entropy_aux_loss")
    assert Result._fields == ("pop_bits", "best_gene", "best_fitness", "best_decoded")


def test_forward_decodes_the_lfq_output():
    torch.manual_seed(1)
    encoder, decoder = nn.Linear(5, 6), nn.Linear(6, 5)
    model = EvoLFQ(encoder, decoder, dim=6, codebook_size=16, num_codebooks=2)
    assert model.lfq.num_codebooks == 2 and model.gene_length == 8
    x = torch.randn(2, 7, 5)
    out = model(x)
    quantized, indices, aux = model.lfq(encoder(x))
    torch.testing.assert_close(out.reconstructed, decoder(quantized))
    assert torch.equal(out.indices, indices) and out.indices.shape == (2, 7, 2)
    torch.testing.assert_close(out.entropy_aux_loss, aux)
    # a (batch, dim) latent gives (batch, ...) indices, as the reference's
    assert model(torch.randn(3, 5)).indices.shape == (3, 2)


def test_encode_gives_the_code_bits_most_significant_first():
    model = _identity()
    x = torch.tensor([[0.5, -1.0, 2.0], [-0.1, -0.2, 0.3]])  # signs + - +, - - +
    assert model.lfq.encode(x).tolist() == [5, 1]
    assert model.encode(x).tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    assert model.encode(x, return_signs=True).tolist() == [[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]]
    two = EvoLFQ(nn.Identity(), nn.Identity(), lfq=LFQ(dim=4, codebook_size=4, num_codebooks=2))
    bits = two.encode(torch.tensor([[[1.0, -1.0, -1.0, 1.0]]]))  # codebook 0: 10, codebook 1: 01
    assert bits.tolist() == [[[1.0, 0.0, 0.0, 1.0]]]
    assert two.bits_to_indices(bits).tolist() == [[[2, 1]]]


def test_bits_and_indices_round_trip_over_every_code():
    for lfq in (LFQ(dim=4, codebook_size=16), LFQ(dim=6, codebook_size=8, num_codebooks=2)):
        model = EvoLFQ(nn.Identity(), nn.Identity(), lfq=lfq)
        every = torch.arange(lfq.codebook_size)
        indices = every if lfq.num_codebooks == 1 else torch.stack([every, every.flip(0)], -1)
        for signs in (False, True):
            assert torch.equal(model.bits_to_indices(model.indices_to_bits(indices, signs)), indices)


def test_decode_bits_is_the_eval_forward_of_the_chosen_codes():
    torch.manual_seed(2)
    model = EvoLFQ(nn.Linear(5, 7), nn.Linear(7, 5), dim=7, codebook_size=8, num_codebooks=2)
    model.train()
    x = torch.randn(3, 4, 5)
    bits = model.encode(x)
    assert bits.shape == (3, 4, 6) and model.training and model.lfq.training  # modes restored
    torch.testing.assert_close(model.decode_bits(bits), model.eval()(x).reconstructed)
    torch.testing.assert_close(model.decode_bits(bits * 2 - 1), model.decode_bits(bits))  # signs read too
    # one gene (no leading axes) decodes to one output
    torch.testing.assert_close(model.decode_bits(bits[0, 0]), model.decode_bits(bits[:1, :1])[0, 0])


def test_decode_bits_gives_the_lfq_codes():
    model = _identity()
    bits = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert model.decode_bits(bits).tolist() == [[1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]]


def test_image_latents_give_channel_last_bits():
    model = EvoLFQ(nn.Identity(), nn.Identity(), lfq=LFQ(dim=3, codebook_size=8))
    x = torch.randn(2, 3, 4, 5)  # (b, dim, h, w)
    bits = model.encode(x)
    assert bits.shape == (2, 4, 5, 3)
    assert torch.equal(bits, (x.movedim(1, -1) > 0).float())
    torch.testing.assert_close(model.decode_bits(bits), model.eval()(x).reconstructed.movedim(1, -1))


def test_population_from_data_repeats_the_samples():
    model = _identity(pop_size=5)
    x = torch.tensor([[0.5, -1.0, 2.0], [-0.1, -0.2, 0.3]])
    population = model.init_population_from_data(x, mutation_rate=0.0)
    assert population.tolist() == [[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1], [1, 0, 1]]
    assert model.init_population_from_data(x, pop_size=1, mutation_rate=0.0, is_sign=True).tolist() == [
        [1, -1, 1]
    ]
    flipped = model.init_population_from_data(x, pop_size=2, mutation_rate=1.0)
    assert flipped.tolist() == [[0, 1, 0], [1, 1, 0]]


def test_mutate_and_crossover():
    model = _identity()
    genes = torch.tensor([[1.0, -1.0, 1.0]])
    assert model.mutate(genes, 1.0, is_sign=True).tolist() == [[-1.0, 1.0, -1.0]]
    assert model.mutate(genes, 0.0, is_sign=True).tolist() == genes.tolist()
    zeros, ones = torch.zeros(64, 3), torch.ones(64, 3)
    child = model.uniform_crossover(zeros, ones)
    assert ((child == 0) | (child == 1)).all() and 0 < child.mean() < 1


def _weights_fitness(weights):
    def fitness(decoded, genes):
        return ((genes > 0).float() * weights).sum(-1)

    return fitness


def test_step_keeps_the_fittest_genes_first():
    model = _identity(pop_size=4, elitism_count=2, mutation_rate=0.0)
    population = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    next_pop, fitnesses = model.step(population, _weights_fitness(torch.tensor([4.0, 2.0, 1.0])))
    assert fitnesses.tolist() == [1.0, 6.0, 2.0, 5.0]
    assert next_pop[:2].tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    assert next_pop.shape == population.shape
    # children of tournament winners, no mutation: every bit comes from a parent in the population
    assert all(
        any(torch.equal(bit, p[i]) for p in population) for c in next_pop[2:] for i, bit in enumerate(c)
    )


def test_evolve_reports_the_best_scored_gene():
    model = _identity(pop_size=4, elitism_count=1, mutation_rate=1.0)
    # the fittest gene sits in the last row; the next population starts with it (the elite), and all
    # other rows are mutated away from the population
    population = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    results = list(
        model.evolve(
            _weights_fitness(torch.tensor([4.0, 2.0, 1.0])),
            pop_bits=population,
            generations=2,
            return_best_decoded=True,
        )
    )
    assert len(results) == 2
    for result in results:
        assert isinstance(result, Result)
        assert result.best_gene.tolist() == [1.0, 1.0, 1.0] and result.best_fitness == 7.0
        assert result.best_decoded.tolist() == [1.0, 1.0, 1.0]
    results[0].pop_bits.fill_(0)  # the reported gene is a copy
    assert results[0].best_gene.tolist() == [1.0, 1.0, 1.0]
    assert (
        next(model.evolve(_weights_fitness(torch.ones(3)), pop_bits=population, generations=1)).best_decoded
        is None
    )


def test_evolve_finds_a_target_code():
    torch.manual_seed(3)
    model = EvoLFQ(nn.Identity(), nn.Identity(), lfq=LFQ(dim=10, codebook_size=1024), pop_size=32)
    target = torch.randint(0, 2, (10,)).float()

    def fitness(decoded, genes):
        return -(genes != target).sum(-1)  # a list-like of ints works too: converted to float32

    *_, last = model.evolve(fitness, generations=40, mutation_rate=0.05)
    assert last.best_fitness == 0.0 and torch.equal(last.best_gene, target)


def test_batch_size_decodes_in_chunks():
    model = _identity()
    population = model.init_random_population(pop_size=7)
    sizes = []

    def fitness(decoded, genes):
        sizes.append(decoded.shape[0])
        return decoded.sum(-1)

    whole = model.fitness_of(population, fitness)
    chunked = model.fitness_of(population, fitness, batch_size=3)
    assert torch.equal(whole, chunked) and sizes == [7, 7]
    calls = []
    model.decode_bits = lambda bits: calls.append(bits.shape[0]) or bits  # type: ignore[method-assign]
    model.fitness_of(population, fitness, batch_size=3)
    assert calls == [3, 3, 1]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(pop_size=4, elitism_count=4),
            ConfigurationError,
            "pop_size must be greater than elitism_count",
        ),
        (dict(mutation_rate=1.5), ConfigurationError, r"mutation_rate must be a number in \[0, 1\], got 1.5"),
        (dict(tournament_size=0), ConfigurationError, "tournament_size must be an int >= 1, got 0"),
        (dict(codebook_size=8), ConfigurationError, "not both; got lfq and codebook_size=8"),
        (dict(entropy_loss_weight=0.2), ConfigurationError, "got lfq and entropy_loss_weight=0.2"),
    ],
)
def test_bad_configuration(kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        EvoLFQ(nn.Identity(), nn.Identity(), lfq=LFQ(dim=3, codebook_size=8), **kwargs)
    assert isinstance(info.value, AssertionError)  # as the reference's asserts


def test_bad_arguments():
    with pytest.raises(ConfigurationError, match="dim and/or codebook_size"):
        EvoLFQ(nn.Identity(), nn.Identity())
    with pytest.raises(TypeError, match="lfq must be a vqcore LFQ"):
        EvoLFQ(nn.Identity(), nn.Identity(), lfq=nn.Identity())
    model = _identity(pop_size=4)
    with pytest.raises(ValueError, match=r"end with an axis of 3 bits.*got shape \(4, 2\)"):
        model.decode_bits(torch.zeros(4, 2))
    population = model.init_random_population()
    before = population.clone()
    with pytest.raises(ValueError, match=r"one score per gene, shape \(4,\); got shape \(2,\)"):
        model.step(population, lambda decoded, genes: torch.zeros(2))
    with pytest.raises(ValueError, match=r"elitism_count must be in \[0, pop_size\)"):
        model.step(population, lambda decoded, genes: torch.zeros(4), elitism_count=4)
    assert torch.equal(population, before)


def test_lfq_options_reach_the_built_lfq():
    model = EvoLFQ(nn.Identity(), nn.Identity(), dim=6, codebook_size=16, entropy_loss_weight=0.25)
    assert model.lfq.dim == 6 and model.lfq.codebook_size == 16 and model.lfq.entropy_loss_weight == 0.25


def test_reference_state_dict_and_outputs():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(4)
    ref = vqp.EvoLFQ(nn.Linear(5, 6), nn.Linear(6, 5), dim=6, codebook_size=16, pop_size=8).eval()
    mine = EvoLFQ(nn.Linear(5, 6), nn.Linear(6, 5), dim=6, codebook_size=16, pop_size=8).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)  # the reference LFQ's ``mask`` is dropped
    x = torch.randn(2, 9, 5)
    with torch.no_grad():
        want, got = ref(x), mine(x)
    torch.testing.assert_close(got.reconstructed, want.reconstructed)
    assert torch.equal(got.indices, want.indices.long())
    # without projections or rotation the reference's bits are the code bits too
    plain_ref = vqp.EvoLFQ(nn.Identity(), nn.Identity(), lfq=vqp.LFQ(dim=4, codebook_size=16))
    plain = EvoLFQ(nn.Identity(), nn.Identity(), lfq=LFQ(dim=4, codebook_size=16))
    z = torch.randn(3, 5, 4)
    assert torch.equal(plain.encode(z), plain_ref.encode(z))
    torch.testing.assert_close(plain.decode_bits(plain.encode(z)), plain_ref.decode_bits(plain_ref.encode(z)))
