"""RandomProjectionQuantizer: x (b, n, dim) -> indices (b, n, num_codebooks), or (b, n) for one codebook.

BEST-RQ (arXiv 2202.01855) / USM (arXiv 2303.01037) targets for masked prediction: per codebook ``h``,
``z_h = LayerNorm(x) @ P_h`` with a frozen Xavier-normal projection ``P_h (dim, codebook_dim)``, and the
target is the code of a frozen random unit-norm codebook ``C_h (codebook_size, codebook_dim)`` with the
highest cosine similarity to ``z_h``. Nothing is ever trained or updated; the module's only tensors are
the two buffers ``rand_projs (H, dim, codebook_dim)`` and ``codebooks (H, codebook_size, codebook_dim)``.

API:
- ``rpq(x)`` / ``rpq.encode(x)`` -> indices (the targets); the same in train and eval mode.
- ``rpq(x, indices=targets)`` -> the multi-softmax cross-entropy (0-dim) of the quantizer's own cosine
  logits of ``x`` against ``targets`` (reference-compatible; ``ignore_index=-1``).
- ``rpq.loss(logits, targets)`` -> the same multi-softmax cross-entropy for a model's predictions
  ``logits (b, n, H, K)`` (``(b, n, K)`` for one codebook): one softmax per codebook, mean over the
  (token, codebook) pairs whose target is not -1. This is the masked-prediction loss of BEST-RQ.
- ``rpq.decode(indices)`` -> the chosen codebook vectors ``(b, n, H, codebook_dim)`` (``(b, n, codebook_dim)``
  for one codebook). A random projection has no inverse, so there is no decode to the input space.

Differences from vector-quantize-pytorch 1.32.0, on purpose: no inner VectorQuantize, so no unintended
``Linear(H·cd -> H²·cd)`` (268M parameters at the README's settings) and per-codebook codes of size
``codebook_dim``; each projection is Xavier-normal for its own ``(dim, codebook_dim)`` shape;
``seed=`` makes the buffers deterministic; the codebook search is chunked (bounded memory).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vqcore.blocks.distance import is_tie, l2norm, nearest
from vqcore.blocks.layout import TokenLayout
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.validation import check_indices, check_positive_int, check_tensor
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule


class RandomProjectionQuantizer(Float32State, QuantizerModule):
    """x (b, n, dim) -> indices (b, n, H) int64 (or (b, n) when H == 1) — see the module docstring.

    Targets are computed in float32 whatever the context: autocast is off inside, and the frozen buffers
    stay float32 under ``.half()`` / ``.bfloat16()`` (so a cast model keeps producing the same targets).
    """

    # frozen buffers
    rand_projs: Tensor  # (H, dim, codebook_dim)
    codebooks: Tensor  # (H, codebook_size, codebook_dim), unit vectors

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int,
        num_codebooks: int = 1,
        norm: bool = True,
        seed: int | None = None,
    ):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(codebook_size, "codebook_size")
        check_positive_int(codebook_dim, "codebook_dim")
        check_positive_int(num_codebooks, "num_codebooks")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.dim, self.codebook_dim, self.heads = dim, codebook_dim, num_codebooks
        self.norm = norm
        self.layout = TokenLayout("sequence", dim)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        std = math.sqrt(2.0 / (dim + codebook_dim))  # Xavier normal for each (dim, codebook_dim) projection
        projs = torch.randn(num_codebooks, dim, codebook_dim, generator=generator) * std
        codes = l2norm(torch.randn(num_codebooks, codebook_size, codebook_dim, generator=generator))
        self.register_buffer("rand_projs", projs)
        self.register_buffer("codebooks", codes)

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    @property
    def num_codebooks(self) -> int:
        return self.heads

    def project(self, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """x (b, n, dim) -> projected features (H, b*n, codebook_dim) in ``dtype`` (float32; LayerNorm,
        then P_h)."""
        tokens, _ = self.layout.to_tokens(x)
        with float32_region(x.device.type):  # under autocast the GEMM ran in bf16: other targets
            flat = tokens.reshape(-1, self.dim).to(dtype)
            if self.norm:
                flat = F.layer_norm(flat, (self.dim,))
            return torch.matmul(flat, self.rand_projs.to(dtype))  # (H, b*n, cd)

    def _shape_indices(self, indices: Tensor, x: Tensor) -> Tensor:
        """(H, b*n) -> (b, n, H) or (b, n) (and (b, H) / (b,) for (b, dim) input)."""
        tokens, spatial = self.layout.to_tokens(x)
        out = indices.transpose(0, 1).reshape(tokens.shape[0], tokens.shape[1], self.heads)
        if self.heads == 1:
            out = out.squeeze(-1)
        return self.layout.indices_from_tokens(out, spatial)

    def encode(self, x: Tensor) -> Tensor:
        """x -> target indices (int64): the nearest (cosine) frozen code of each projection."""
        with torch.no_grad(), float32_region(x.device.type):
            z = self.project(x)
            # argmax of the cosine similarity == argmin of -z.c over unit codes (|z| does not change it)
            return self._shape_indices(nearest(z, self.codebooks, cosine=True), x)

    def logits(self, x: Tensor) -> Tensor:
        """Cosine similarities (b, n, H, K) (``(b, n, K)`` for one codebook) between projections and codes."""
        tokens, _ = self.layout.to_tokens(x)
        with float32_region(x.device.type):
            sims = torch.matmul(l2norm(self.project(x)), self.codebooks.transpose(1, 2))  # (H, b*n, K)
        sims = sims.transpose(0, 1).reshape(tokens.shape[0], tokens.shape[1], self.heads, self.codebook_size)
        return sims.squeeze(2) if self.heads == 1 else sims

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Multi-softmax cross-entropy: logits (b, n, H, K) (or (b, n, K) for H == 1) against targets
        (b, n, H) (or (b, n)); one softmax per codebook; targets of -1 (unmasked / padding) are ignored."""
        check_tensor(logits, "logits")
        check_tensor(targets, "targets")
        k = self.codebook_size
        if logits.shape[-1] != k or tuple(logits.shape[:-1]) != tuple(targets.shape):
            raise ValueError(
                f"logits must be targets' shape + ({k},): got logits {tuple(logits.shape)}, "
                f"targets {tuple(targets.shape)}"
            )
        if self.heads > 1 and (targets.ndim < 1 or targets.shape[-1] != self.heads):
            raise ValueError(
                f"targets must end with a codebook axis of {self.heads}, got {tuple(targets.shape)}"
            )
        check_indices(targets, k, "targets")
        return F.cross_entropy(logits.reshape(-1, k).float(), targets.reshape(-1).long(), ignore_index=-1)

    def decode(self, indices: Tensor) -> Tensor:
        """indices (b, n, H) / (b, n) -> the chosen codes (b, n, H, codebook_dim) / (b, n, codebook_dim);
        -1 gives zeros. These live in the projected space: there is no inverse to the input space."""
        check_tensor(indices, "indices")
        if self.heads > 1 and (indices.ndim < 2 or indices.shape[-1] != self.heads):
            raise ValueError(
                f"indices must end with a codebook axis of {self.heads}, got {tuple(indices.shape)}"
            )
        check_indices(indices, self.codebook_size)
        idx = indices.long() if self.heads > 1 else indices.long().unsqueeze(-1)
        offsets = torch.arange(self.heads, device=idx.device) * self.codebook_size
        flat = self.codebooks.reshape(-1, self.codebook_dim)
        codes = F.embedding(idx.clamp(min=0) + offsets, flat).masked_fill((idx < 0).unsqueeze(-1), 0.0)
        return codes if self.heads > 1 else codes.squeeze(-2)

    def forward(self, x: Tensor, indices: Tensor | None = None) -> Tensor:
        """x -> indices; with ``indices`` (targets) -> the cross-entropy of this module's own logits of x."""
        if indices is None:
            return self.encode(x)
        return self.loss(self.logits(x), indices)

    def export_tie_check(self, x: Tensor, a: Tensor, b: Tensor, tolerance: float) -> Tensor:
        """See vqcore.protocols.SupportsExportTieCheck: cosine scores of the projections in float64."""
        z = l2norm(self.project(x, torch.float64))  # (H, T, cd)
        codes = self.codebooks.double()
        ha, hb = (i.reshape(-1, self.heads).transpose(0, 1).long() for i in (a, b))
        ok = ha == hb
        for h, t in (~ok).nonzero().tolist():
            ok[h, t] = is_tie(
                z[h, t], codes[h, ha[h, t]], codes[h, hb[h, t]], cosine=True, tolerance=tolerance
            )
        return ok.transpose(0, 1).reshape(a.shape)

    def export_metadata(self) -> dict[str, object]:
        """Hyper-parameters embedded in exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {"codebook_dim": self.codebook_dim, "heads": self.heads, "layout": self.layout.kind}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_codebooks={self.heads}, codebook_dim={self.codebook_dim}, "
            f"codebook_size={self.codebook_size}, norm={self.norm}"
        )


@hookimpl
def register_quantizers(register):
    register(
        "rpq",
        RandomProjectionQuantizer,
        aliases=("random_projection", "RandomProjectionQuantizer"),
        summary="BEST-RQ random-projection targets: frozen projections and cosine codebooks",
    )
