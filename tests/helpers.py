"""Helpers shared by the test files: ``import helpers`` (pytest puts this folder on sys.path, since
tests/ is not a package; the repository root must stay off it, where ``plugins`` and ``export`` would
shadow ``vqcore.plugins`` and ``vqcore.export``).

- module state: :func:`snapshot`, :func:`assert_same_state`, :func:`assert_close_state`,
  :func:`assert_state_finite`;
- references computed the slow, obvious way: :func:`brute_nearest`, :func:`hand_ema`, :func:`hand_orthogonal`;
- EMA codebooks: :func:`set_ema_state`;
- data: :func:`generator`, :func:`blobs`;
- artifacts: :func:`assert_save_load_equal`, :func:`assert_exports_with_parity`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

# -- module state --------------------------------------------------------------------------------------


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``module.state_dict()``, to compare against after a call."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _state(reference: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return reference.state_dict() if isinstance(reference, nn.Module) else reference


def assert_same_state(module: nn.Module, reference: nn.Module | Mapping[str, Tensor], what: str = "") -> None:
    """``module``'s state equals ``reference`` (a module or a :func:`snapshot`) bit for bit, same keys."""
    state, ref = module.state_dict(), _state(reference)
    assert state.keys() == ref.keys(), f"{what}keys differ: {sorted(set(state) ^ set(ref))}"
    for name in state:
        assert torch.equal(state[name], ref[name]), f"{what}{name} differs"


def assert_close_state(module: nn.Module, reference: nn.Module | Mapping[str, Tensor], **tolerance) -> None:
    """``module``'s state equals ``reference``'s within ``torch.testing.assert_close``'s ``tolerance``."""
    state, ref = module.state_dict(), _state(reference)
    assert state.keys() == ref.keys(), f"keys differ: {sorted(set(state) ^ set(ref))}"
    for name in state:
        torch.testing.assert_close(
            state[name], ref[name], msg=lambda m, name=name: f"{name}: {m}", **tolerance
        )


def assert_state_finite(module: nn.Module) -> None:
    """Every floating tensor of ``module``'s state is finite."""
    for name, t in module.state_dict().items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name} is not finite"


# -- references --------------------------------------------------------------------------------------


def brute_nearest(x: Tensor, codes: Tensor, cosine: bool = False) -> Tensor:
    """Index of the nearest code by explicit float64 distances: x (N, d) and codes (K, d) -> (N,), or
    books first, x (B, N, d) and codes (B, K, d) -> (B, N). Cosine: the largest dot product."""
    x64, c64 = x.double(), codes.double()
    if cosine:
        return (x64 @ c64.transpose(-2, -1)).argmax(-1)
    return torch.cdist(x64, c64).argmin(-1)


def hand_ema(
    cluster_size: Sequence[float],
    embed_avg: Sequence[Sequence[float]],
    counts: Sequence[float],
    sums: Sequence[Sequence[float]],
    decay: float,
    eps: float,
    cosine: bool = False,
) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """One EMA step with Laplace smoothing of one book, on plain Python lists:
    ``-> (cluster_size, embed_avg, embed)`` after the step."""
    k = len(cluster_size)
    cs = [decay * cluster_size[i] + (1 - decay) * counts[i] for i in range(k)]
    ea = [[decay * a + (1 - decay) * s for a, s in zip(embed_avg[i], sums[i])] for i in range(k)]
    n = sum(cs)
    smoothed = [(cs[i] + eps) / (n + k * eps) * n for i in range(k)]
    embed = [[v / smoothed[i] for v in ea[i]] for i in range(k)]
    if cosine:
        embed = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in embed]
    return cs, ea, embed


# -- EMA codebooks -----------------------------------------------------------------------------------


def set_ema_state(book: nn.Module, embed, cluster_size, embed_avg) -> None:
    """Overwrite an EMA codebook's ``embed``, ``cluster_size`` and ``embed_avg`` (nested lists or tensors,
    reshaped to the buffers' shapes: one book may be given without its books axis)."""
    with torch.no_grad():
        for name, value in (("embed", embed), ("cluster_size", cluster_size), ("embed_avg", embed_avg)):
            target = getattr(book, name)
            target.copy_(torch.as_tensor(value, dtype=torch.float32).reshape(target.shape))


def hand_orthogonal(codes: Sequence[Sequence[float]]) -> float:
    """The orthogonal regulariser of one book of n codes, on plain Python lists:
    ``sum of squared cosines over all pairs / n^2 - 1/n``."""
    n = len(codes)
    normed = [[v / math.sqrt(sum(u * u for u in c)) for v in c] for c in codes]
    total = sum(sum(p * q for p, q in zip(a, b)) ** 2 for a in normed for b in normed)
    return total / (n * n) - 1.0 / n


# -- data --------------------------------------------------------------------------------------------


def generator(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def blobs(centres: Tensor, per: int, sigma: float, seed: int) -> Tensor:
    """``per`` Gaussian points (std ``sigma``) around each of ``centres`` (k, d), shuffled: (k * per, d)."""
    g = generator(seed)
    points = centres.repeat_interleave(per, 0) + sigma * torch.randn(
        len(centres) * per, centres.shape[1], generator=g
    )
    return points[torch.randperm(len(points), generator=g)]


# -- artifacts -------------------------------------------------------------------------------------------


def assert_save_load_equal(quantizer: nn.Module, x: Tensor, folder: Path) -> None:
    """``vqcore.save`` then ``vqcore.load`` gives a module whose eval forward has the same quantized output
    and indices as ``quantizer``'s."""
    import vqcore

    quantizer.eval()
    vqcore.save(quantizer, folder / "quantizer.safetensors")
    loaded = vqcore.load(folder / "quantizer.safetensors")
    theirs, ours = loaded(x), quantizer(x)
    assert torch.equal(theirs[0], ours[0]) and torch.equal(theirs[1], ours[1])


def assert_exports_with_parity(
    quantizer: nn.Module, x: Tensor, folder: Path, writers: Sequence[str] = ("onnx", "torchscript")
) -> None:
    """The eval ``encode`` (on ``x``) and ``decode`` (on ``encode(x)``) graphs export with verified parity
    through each writer (``onnx``, ``torchscript``, ``pt2``; ONNX needs onnxruntime and onnxscript, and is
    skipped without them)."""
    from vqcore.export import to_onnx, to_pt2, to_torchscript

    if "onnx" in writers:
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    quantizer.eval()
    write = {"onnx": to_onnx, "torchscript": to_torchscript, "pt2": to_pt2}
    for name in writers:
        for graph, example in (("encode", x), ("decode", quantizer.encode(x))):
            result = write[name](quantizer, folder / f"{graph}.{name}", graph=graph, example=example)
            assert result.parity.ok, (name, graph, result.parity)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor an operation inside the block allocated (bytes), ignoring outputs that are
    views of, or written into, an input (in-place and ``out=`` ops allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []  # every allocation, in bytes

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and _storage(t) not in inputs:
                self.sizes.append(
                    t.numel() * t.element_size() if t.is_mkldnn else t.untyped_storage().nbytes()
                )
        return out


def _storage(t: Tensor) -> int:
    """An id of the memory a tensor lives in (opaque oneDNN tensors: the tensor itself)."""
    return id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()


def builtin_methods() -> set:
    """The classes of every quantizer registered by vqcore's own plugins (not third-party ones)."""
    import vqcore

    return {
        vqcore.get_entry(name).factory
        for name in vqcore.list_quantizers()
        if vqcore.get_entry(name).plugin.startswith("vqcore.plugins.")
    }
