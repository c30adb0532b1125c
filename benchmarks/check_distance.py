"""Correctness checks for vqcore.blocks.distance after performance work
(run: .venv/bin/python benchmarks/check_distance.py).

- ``nearest`` equals a float64 brute-force argmin on random data, tokens whose best and second-best
  scores are closer than 1e-4 (relative) excluded, for unchunked, chunked (several chunk sizes, a short
  last chunk), multi-book, strided-input and cosine cases, and the one-block (traced) path agrees;
- exact ties go to the lowest index in every chunking; indices are int64;
- inputs that require grad work in grad mode and inference mode, and from another thread;
- the sliced squared norms are bitwise those of ``codes.pow(2).sum(-1)``.
"""

from __future__ import annotations

import threading

import torch

import vqcore.blocks.distance as D


def brute(x: torch.Tensor, codes: torch.Tensor, cosine: bool):
    x64, c64 = x.double(), codes.double()
    scores = -(x64 @ c64.transpose(1, 2)) if cosine else torch.cdist(x64, c64).pow(2)
    top2 = scores.topk(2, dim=-1, largest=False)
    gap = top2.values[..., 1] - top2.values[..., 0]
    clear = gap > 1e-4 * scores.abs().amax(-1).clamp(min=1)
    return top2.indices[..., 0], clear


def check_against_brute_force() -> int:
    torch.manual_seed(0)
    shapes = [
        (1, 100, 37, 6),
        (2, 257, 37, 6),
        (3, 1000, 129, 16),
        (1, 8192, 1024, 64),
        (1, 513, 8192, 32),
        (2, 50, 3, 1),
        (1, 300, 65536, 64),
    ]
    tokens = 0
    for books, n, size, dim in shapes:
        for cosine in (False, True):
            for chunk_bytes in (D.DEFAULT_CHUNK_BYTES, 64, 4 * size * books * 7 + 3, 10**9):
                x = (
                    torch.randn(books, n, dim) * 3
                    if n % 2
                    else (torch.randn(books, dim, n) * 3).transpose(1, 2)
                )
                codes = torch.randn(books, size, dim)
                if cosine:
                    x, codes = D.l2norm(x), D.l2norm(codes)
                idx = D.nearest(x, codes, cosine=cosine, chunk_bytes=chunk_bytes)
                assert idx.dtype == torch.int64 and idx.shape == (books, n)
                expected, clear = brute(x, codes, cosine)
                assert dim == 1 or clear.float().mean() > 0.9
                assert not ((idx != expected) & clear).any(), (books, n, size, dim, cosine, chunk_bytes)
                traced = D.is_tracing
                D.is_tracing = lambda: True  # the one-block path taken under export / compile
                try:
                    assert torch.equal(D.nearest(x, codes, cosine=cosine, chunk_bytes=chunk_bytes), idx)
                finally:
                    D.is_tracing = traced
                tokens += idx.numel()
    return tokens


def check_ties_and_modes() -> None:
    codes = torch.randn(1, 64, 8)
    codes = torch.cat([codes, codes], 1)  # every code twice: the first copy must win
    x = codes[:, torch.randint(64, (500,))]
    for chunk_bytes in (D.DEFAULT_CHUNK_BYTES, 64, 1000):
        assert (D.nearest(x, codes, cosine=False, chunk_bytes=chunk_bytes) < 64).all()

    x, codes = torch.randn(1, 5000, 16), torch.randn(1, 300, 16)
    expected = D.nearest(x, codes, cosine=False, chunk_bytes=10**9)
    grad_x = x.clone().requires_grad_()
    got = D.nearest(grad_x, codes, cosine=False, chunk_bytes=4096)  # out= with an input that requires grad
    assert torch.equal(got, expected) and not got.requires_grad
    with torch.inference_mode():
        assert torch.equal(D.nearest(x, codes, cosine=False, chunk_bytes=4096), expected)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(idx=D.nearest(x, codes, cosine=False, chunk_bytes=4096))
    )
    thread.start()
    thread.join()
    assert torch.equal(result["idx"], expected)


def check_sliced_norms() -> None:
    for books, size, dim in [
        (1, 65536, 64),
        (1, 8192, 256),
        (3, 1000, 17),
        (2, 37, 6),
        (1, 70000, 3),
        (4, 4096, 512),
        (1, 300, 5000),
        (2, 65536, 256),
    ]:
        for scale in (1.0, 1e3):
            codes = torch.randn(books, size, dim) * scale
            for c in (codes, codes.transpose(1, 2).contiguous().transpose(1, 2)):
                assert torch.equal(D._sq_norms(c), c.pow(2).sum(-1)), (books, size, dim)


def main() -> None:
    torch.set_num_threads(2)
    tokens = check_against_brute_force()
    check_ties_and_modes()
    check_sliced_norms()
    print(f"vqcore.blocks.distance OK ({tokens} tokens against float64 brute force)")


if __name__ == "__main__":
    main()
