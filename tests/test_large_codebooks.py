"""Large codebooks: bounded memory in the search, the training step and k-means, found
by recording every tensor the operations allocate (no tokens x codes matrix over the search's budget, no
copy of the codebook but the one the EMA statistics need), and the results those bounded paths give."""

from __future__ import annotations

import torch
from helpers import LargestAllocation, brute_nearest, generator

from vqcore import VectorQuantize
from vqcore.blocks.distance import DEFAULT_CHUNK_BYTES
from vqcore.blocks.kmeans import kmeans

MiB = 2**20


def test_eval_search_of_a_codebook_larger_than_the_budget_copies_nothing_of_its_size():
    """2^16 codes of 128 features (32 MiB, twice the 16 MiB budget): the search packs a block of codes at a
    time and never allocates more than the budget; the indices are the brute force's."""
    vq = VectorQuantize(dim=128, codebook_size=2**16).eval()
    x = torch.randn(1, 300, 128, generator=generator(0))
    with torch.no_grad(), LargestAllocation() as seen:
        _, indices, _ = vq(x)
    codebook_bytes = 2**16 * 128 * 4
    assert seen.largest <= DEFAULT_CHUNK_BYTES < codebook_bytes
    codes = vq.codebook.unsqueeze(0)
    assert torch.equal(indices, brute_nearest(x, codes))


def test_training_step_makes_one_codebook_sized_tensor_the_batch_sums():
    """The EMA step lerps the statistics and recomputes the codes in place: of a training step's allocations
    only the per-code sums of the batch are as large as the codebook (2^16 codes of 128 features, 32 MiB;
    the search's score blocks stay within its 16 MiB budget)."""
    torch.manual_seed(0)
    vq = VectorQuantize(dim=128, codebook_size=2**16, decay=0.5).train()
    x = torch.randn(1, 256, 128, requires_grad=True)
    vq(x)
    before = vq.codebook.clone()
    with LargestAllocation() as seen:
        quantized, indices, loss = vq(x)
        (quantized.sum() + loss.sum()).backward()
    codebook_bytes = 2**16 * 128 * 4
    assert [size for size in seen.sizes if size > DEFAULT_CHUNK_BYTES] == [codebook_bytes]
    # the codes the batch chose moved, the others only by the Laplace smoothing of their shrunk counts
    chosen = torch.zeros(2**16, dtype=torch.bool)
    chosen[indices.flatten()] = True
    moved = (vq.codebook - before).norm(dim=-1)
    assert moved[chosen].min() > moved[~chosen].max()


def test_dead_code_expiry_writes_the_replaced_codes_in_place():
    """A step in which most codes expire (2^16 codes, 256 tokens): the batch sums and the drawn replacement
    vectors are the two codebook-sized tensors; every code that expired holds a batch vector."""
    torch.manual_seed(0)
    vq = VectorQuantize(dim=128, codebook_size=2**16, threshold_ema_dead_code=2).train()
    x = torch.randn(1, 256, 128)
    vq(x)
    with LargestAllocation() as seen:
        vq(x)
    codebook_bytes = 2**16 * 128 * 4
    assert [size for size in seen.sizes if size > DEFAULT_CHUNK_BYTES] == [codebook_bytes, codebook_bytes]
    codes = vq.codebook.reshape(-1, 128)
    replaced = vq.codebook_module.cluster_size.reshape(-1) == 2
    assert replaced.sum() > 2**15
    # each replaced code is one of the batch's tokens
    distance = torch.cdist(codes[replaced], x[0], compute_mode="donot_use_mm_for_euclid_dist").amin(-1)
    assert distance.max() == 0


def test_kmeans_builds_no_tokens_x_seeds_matrix():
    """2^14 tokens into 2^12 codes: each of the 8 seeding rounds draws 512 seeds, and a (tokens x seeds)
    matrix would be 32 MiB; the search's 16 MiB budget bounds every allocation instead."""
    x = torch.randn(1, 2**14, 8, generator=generator(1))
    with LargestAllocation() as seen:
        means, counts = kmeans(x, 2**12, 2, generator=generator(2))
    assert 2**14 * 512 * 4 > DEFAULT_CHUNK_BYTES >= seen.largest
    assert means.shape == (1, 2**12, 8) and counts.sum() == 2**14 and means.isfinite().all()
    # every mean is a seed token or the mean of the tokens assigned to it: the means span the data
    assert (means.amin(1) >= x.amin(1)).all() and (means.amax(1) <= x.amax(1)).all()
