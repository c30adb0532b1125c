"""Per-code statistics of a batch (vqcore.blocks.stats): counts and sums per code and book, checked by hand
and against explicit loops."""

from __future__ import annotations

import torch

from vqcore.blocks.stats import bincount_per_book, sum_per_code


def test_counts_and_sums_by_hand():
    indices = torch.tensor([[0, 2, 2, 0, 2], [1, 1, 1, 0, 0]])
    x = torch.tensor(
        [
            [[1.0, 0.0], [2.0, 1.0], [3.0, 1.0], [4.0, -1.0], [5.0, 0.5]],
            [[1.0, 1.0], [1.0, 2.0], [1.0, 3.0], [-1.0, 0.0], [0.0, -1.0]],
        ]
    )
    assert bincount_per_book(indices, 3).tolist() == [[2.0, 0.0, 3.0], [2.0, 3.0, 0.0]]
    sums = sum_per_code(x, indices, 3)
    assert sums.tolist() == [
        [[5.0, -1.0], [0.0, 0.0], [10.0, 2.5]],
        [[-1.0, -1.0], [3.0, 6.0], [0.0, 0.0]],
    ]
    weight = torch.tensor([[1.0, 0.0, 0.5, 1.0, 1.0], [0.0, 1.0, 1.0, 2.0, 0.0]])
    assert bincount_per_book(indices, 3, weight).tolist() == [[2.0, 0.0, 1.5], [2.0, 2.0, 0.0]]
    assert sum_per_code(x, indices, 3, weight).tolist() == [
        [[5.0, -1.0], [0.0, 0.0], [6.5, 1.0]],
        [[-2.0, 0.0], [2.0, 5.0], [0.0, 0.0]],
    ]


def test_bincount_and_sum_per_book_match_loops():
    torch.manual_seed(0)
    books, n, k, d = 3, 17, 5, 4
    indices = torch.randint(k, (books, n))
    x = torch.randn(books, n, d)
    weight = (torch.rand(books, n) > 0.3).float()
    counts = bincount_per_book(indices, k, weight)
    sums = sum_per_code(x, indices, k, weight)
    assert counts.shape == (books, k) and counts.dtype == torch.float32
    assert sums.shape == (books, k, d)
    for b in range(books):
        for c in range(k):
            sel = (indices[b] == c) & (weight[b] > 0)
            assert counts[b, c].item() == sel.sum().item()
            torch.testing.assert_close(sums[b, c], x[b][sel].sum(0))
    # unweighted: counts sum to n per book
    assert torch.equal(bincount_per_book(indices, k).sum(-1), torch.full((books,), float(n)))


def test_output_shapes_do_not_depend_on_the_data():
    """A code no token chose still has its row (zero), also the last one: no data-dependent sizes."""
    indices = torch.zeros(2, 3, dtype=torch.int64)
    assert bincount_per_book(indices, 4).tolist() == [[3.0, 0.0, 0.0, 0.0]] * 2
    assert sum_per_code(torch.ones(2, 3, 1), indices, 4).tolist() == [[[3.0], [0.0], [0.0], [0.0]]] * 2
    empty = torch.zeros(2, 0, dtype=torch.int64)
    assert bincount_per_book(empty, 4).shape == (2, 4)
    assert sum_per_code(torch.ones(2, 0, 5), empty, 4).shape == (2, 4, 5)


def test_sums_add_tokens_in_their_order():
    """On the CPU the rows are added in token order: 1e8 + 1 rounds to 1e8 in float32, so the order
    (1e8, 1, -1e8) sums to 0 where (1e8, -1e8, 1) gives 1."""
    x = torch.tensor([[[1e8], [1.0], [-1e8]]])
    indices = torch.zeros(1, 3, dtype=torch.int64)
    assert sum_per_code(x, indices, 1).item() == 0.0
    assert sum_per_code(x[:, [0, 2, 1]], indices, 1).item() == 1.0
