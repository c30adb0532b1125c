"""FSP, finite scalar perturbation (arXiv 2602.17133): x (..., dim) -> quantized (..., dim), indices (...).

Each scalar of ``project_in(x)`` is mapped to ``[0, 1]`` by a CDF activation ``p = F(z)`` (tanh, sigmoid,
normal, laplace or cauchy) and quantized to the centre of one of ``L_i`` equal bins,
``q = (floor(p L_i) + 0.5) / L_i``; the output is ``(q - 0.5) * sqrt(12)`` (unit variance for uniform
``p``), or ``F^-1(q)`` with ``need_inv_act=True``, then ``project_out``. Training perturbs instead of
quantizing, with probability ``1 - quantize_rate`` per scalar: ``p + u / (2 L_i)``, ``u`` uniform in
``[-1, 1)`` (kept where it stays inside ``(0, 1)``). Gradients: straight through the bin choice, to the CDF
(or, with ``need_inv_act``, the identity to ``z``). ``norm_loss`` pulls the batch's mean, variance,
skewness and kurtosis of ``z`` to the targets of the ``vector_norm`` preset.

Index layout (vector-quantize-pytorch 1.32.0's): mixed radix with the FIRST dimension least significant,
``index = sum_i digit_i * basis_i``, ``basis = cumprod([1, L_0, L_1, ...])`` (vqcore.blocks.grid).

Layouts: features on the last axis with any leading axes, or on axis 1 with ``channel_first=True``
(``(b, dim, ...)``: sequences, images, video); indices drop the feature axis.

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- quantization runs in float32 with autocast off, whatever the input's dtype (the reference computes in
  the input's dtype, fp16 included); the projections run in their own dtype and ``quantized`` comes back
  in the input's dtype;
- forward's indices are int32, as the reference's (its tests assert that dtype), computed exactly in
  int64 integer arithmetic (the reference sums float digits, inexact above 2^24 codes); ``codebook_size``
  must therefore fit int32. ``encode`` returns int64 like every vqcore quantizer;
- the straight-through estimators leave values exact: eval and training outputs equal
  ``indices_to_codes(indices)`` bit for bit (the reference's ``p + (q - p).detach()`` rounds);
- the laplace CDF and its inverse are computed branch by branch (``e^z / 2`` below 0, ``1 - e^-z / 2``
  above), with the analytic derivative at 0 (the reference's ``sign(z)`` form has derivative 0 there) and
  more accurate tails; at a bin edge an index may differ from the reference's by that rounding;
- ``indices_to_codes``' clamp ``eps`` defaults to forward's (float32 epsilon), not 1e-6, so that decoding
  reproduces forward for any levels; ``decode`` / ``indices_to_codes`` reject indices outside
  ``[0, codebook_size)`` (-1 included) with a ValueError;
- a ``vector_norm`` term of weight 0 is left out of ``norm_loss`` (``"none"`` gives exactly 0, also for
  one token, whose variance is NaN);
- levels are ints >= 2; bad arguments raise :class:`vqcore.errors.ConfigurationError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vqcore.blocks.grid import check_levels, digits_to_indices, indices_to_digits, mixed_radix_basis
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.projection import project_from, project_into, projection_pair
from vqcore.blocks.validation import check_float, check_indices, check_positive_int, check_tensor
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import INDEX_DTYPE

FORWARD_INDEX_DTYPE = torch.int32  # the reference's
FLOAT32_EPS = torch.finfo(torch.float32).eps  # forward's default clamp: quantization runs in float32
UNIT_VARIANCE_SCALE = 0.28867513459481287  # sqrt(1/12): the standard deviation of U(0, 1)
_SQRT2 = math.sqrt(2.0)

# -- CDF activations: (-inf, inf) -> (0, 1), and their inverses ---------------------------------------


def tanh_act(z: Tensor) -> Tensor:
    return (torch.tanh(z) + 1.0) / 2.0


def tanh_inv_act(p: Tensor) -> Tensor:
    return torch.arctanh(p * 2.0 - 1.0)


def sigmoid_act(z: Tensor) -> Tensor:
    return torch.sigmoid(z)


def sigmoid_inv_act(p: Tensor) -> Tensor:
    return torch.logit(p)


def normal_act(z: Tensor) -> Tensor:
    return (1.0 + torch.erf(z / _SQRT2)) / 2.0


def normal_inv_act(p: Tensor) -> Tensor:
    return torch.erfinv(2.0 * p - 1.0) * _SQRT2


def laplace_act(z: Tensor) -> Tensor:
    """``e^z / 2`` below 0, ``1 - e^-z / 2`` from 0 on: one exp of a non-positive argument (no overflow),
    and autograd's derivative is ``e^-|z| / 2`` everywhere, 1/2 at 0 included."""
    below = z < 0
    half_tail = torch.exp(torch.where(below, z, -z)) * 0.5
    return torch.where(below, half_tail, 1.0 - half_tail)


def laplace_inv_act(p: Tensor) -> Tensor:
    """``log(2p)`` below 1/2, ``-log(2 (1 - p))`` from 1/2 on (derivative ``1 / min(p, 1 - p)``)."""
    below = p < 0.5
    log_tail = torch.log(torch.where(below, p, 1.0 - p) * 2.0)
    return torch.where(below, log_tail, -log_tail)


def cauchy_act(z: Tensor) -> Tensor:
    return torch.arctan(z) / torch.pi + 0.5


def cauchy_inv_act(p: Tensor) -> Tensor:
    return torch.tan((p - 0.5) * torch.pi)


Activation = Callable[[Tensor], Tensor]

CDF_ACTIVATIONS: dict[str, tuple[Activation, Activation]] = {
    "tanh": (tanh_act, tanh_inv_act),
    "sigmoid": (sigmoid_act, sigmoid_inv_act),
    "normal": (normal_act, normal_inv_act),
    "laplace": (laplace_act, laplace_inv_act),
    "cauchy": (cauchy_act, cauchy_inv_act),
}


def build_cdf_act(act_name: str) -> tuple[Activation, Activation]:
    """``(cdf, inverse cdf)`` of a registered activation name."""
    if act_name not in CDF_ACTIVATIONS:
        raise ConfigurationError(f"act_name must be one of {list(CDF_ACTIVATIONS)}, got {act_name!r}")
    return CDF_ACTIVATIONS[act_name]


# -- VectorNorm: statistical regularization of the latents ---------------------------------------------


def batch_stats(batch: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-feature mean, unbiased variance, skewness and excess kurtosis of ``batch`` (N, D) over N."""
    variance, mean = torch.var_mean(batch, dim=0, unbiased=True)
    z_scores = (batch - mean) / variance.sqrt().clamp_min(eps)
    squared = z_scores * z_scores
    skewness = (squared * z_scores).mean(dim=0)
    kurtosis = (squared * squared).mean(dim=0) - 3.0
    return mean, variance, skewness, kurtosis


VECTOR_NORM_PRESETS: dict[str, dict[str, float]] = {
    "none": dict(l1_weight=0.0, l2_weight=0.0, l3_weight=0.0, l4_weight=0.0),
    "var": dict(l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0),
    "kurt": dict(
        l1_target=0.0,
        l1_weight=0.1,
        l2_target=1.0,
        l2_weight=0.07,
        l3_target=0.0,
        l3_weight=0.06,
        l4_target=0.0,
        l4_weight=0.05,
    ),
    # the variances of the standard logistic-like distributions the activations assume
    "var_tanh": dict(
        l1_target=0.0, l1_weight=0.1, l2_target=0.8225, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0
    ),
    "var_sigmoid": dict(
        l1_target=0.0, l1_weight=0.1, l2_target=3.29, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0
    ),
    "var_laplace": dict(
        l1_target=0.0, l1_weight=0.1, l2_target=2.0, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0
    ),
}


class VectorNorm(nn.Module):
    """``norm_loss = sum_k w_k mean((stat_k - target_k)^2)`` over the batch's mean (k=1), variance (2),
    skewness (3) and excess kurtosis (4) per feature; returns ``(norm_loss, {"mean", "variance",
    "skewness", "kurtosis"})``. No state."""

    def __init__(
        self,
        l1_target: float = 0.0,
        l1_weight: float = 0.1,
        l2_target: float = 1.0,
        l2_weight: float = 0.07,
        l3_target: float = 0.0,
        l3_weight: float = 0.06,
        l4_target: float = 0.0,
        l4_weight: float = 0.05,
        eps: float = 1e-8,
    ):
        super().__init__()
        self.l1_target, self.l1_weight = l1_target, l1_weight
        self.l2_target, self.l2_weight = l2_target, l2_weight
        self.l3_target, self.l3_weight = l3_target, l3_weight
        self.l4_target, self.l4_weight = l4_target, l4_weight
        self.eps = eps

    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if z.shape[0] < 2:  # the unbiased variance (and all it standardises) needs two tokens: no loss,
            zero = z.sum(0) * 0  # rather than the NaN that would poison the step; (D,) zeros, connected to z
            mean = z.mean(0) if z.shape[0] else zero
            return zero.sum(), {"mean": mean, "variance": zero, "skewness": zero, "kurtosis": zero}
        stats = batch_stats(z, self.eps)
        terms = [
            ((stat - target) ** 2).mean() * weight
            for stat, target, weight in zip(stats, self.targets, self.weights)
            if weight != 0  # a zero weight adds exactly nothing (not NaN for the NaN stats of one token)
        ]
        norm_loss = sum(terms[1:], terms[0]) if terms else z.new_zeros(())
        return norm_loss, dict(zip(("mean", "variance", "skewness", "kurtosis"), stats))

    @property
    def targets(self) -> tuple[float, float, float, float]:
        return self.l1_target, self.l2_target, self.l3_target, self.l4_target

    @property
    def weights(self) -> tuple[float, float, float, float]:
        return self.l1_weight, self.l2_weight, self.l3_weight, self.l4_weight

    @classmethod
    def build(cls, name: str) -> VectorNorm:
        """The module of a preset name (:data:`VECTOR_NORM_PRESETS`)."""
        if name not in VECTOR_NORM_PRESETS:
            raise ConfigurationError(f"vector_norm must be one of {list(VECTOR_NORM_PRESETS)}, got {name!r}")
        return cls(**VECTOR_NORM_PRESETS[name])

    def extra_repr(self) -> str:
        return ", ".join(
            f"l{k}=({getattr(self, f'l{k}_target')}, {getattr(self, f'l{k}_weight')})" for k in range(1, 5)
        )


# -- FSP ------------------------------------------------------------------------------------------------


class FSPOutput(NamedTuple):
    """``quantized``: the input's shape and dtype; ``indices`` int32 (the input's shape without the feature
    axis); ``norm_loss`` float32 scalar; ``other_info``: ``level_indices`` (float digits, indices' shape +
    (len(levels),)), ``norm_info`` (the batch statistics) and, when training perturbs,
    ``p_accept_prob`` (the fraction of perturbations kept inside (0, 1))."""

    quantized: Tensor
    indices: Tensor
    norm_loss: Tensor
    other_info: dict[str, Any]


def _constructor_check(check: Callable[[], Any]) -> Any:
    """``check()``, its ValueError re-raised as a ConfigurationError (a constructor argument)."""
    try:
        return check()
    except ConfigurationError:
        raise
    except ValueError as err:
        raise ConfigurationError(str(err)) from None


class FSP(QuantizerModule, Float32State):
    """Finite scalar perturbation — see the module docstring.

    ``dim`` defaults to ``len(levels)``; another value adds Linear projections in and out
    (``projection_has_bias``). ``quantize_rate`` in [0, 1]: the probability that a training scalar is
    quantized rather than perturbed (eval always quantizes). ``vector_norm``: a preset name of
    :data:`VECTOR_NORM_PRESETS`.
    """

    # non-persistent buffers, (D,) each
    level_counts: Tensor  # float32 L_i
    half_bin: Tensor  # float32 1 / (2 L_i), the largest perturbation
    level_counts_long: Tensor  # int64 L_i
    basis: Tensor  # int64 place values

    def __init__(
        self,
        levels: list[int] | tuple[int, ...],
        dim: int | None = None,
        channel_first: bool = False,
        projection_has_bias: bool = True,
        act_name: str = "tanh",
        quantize_rate: float = 0.0,
        need_inv_act: bool = False,
        vector_norm: str = "var_tanh",
    ):
        super().__init__()
        levels = _constructor_check(lambda: check_levels(levels, allow_two=True))
        if isinstance(quantize_rate, bool) or not isinstance(quantize_rate, (int, float)):
            raise TypeError(f"quantize_rate must be a number in [0, 1], got {quantize_rate!r}")
        if not 0.0 <= quantize_rate <= 1.0:
            raise ConfigurationError(f"quantize_rate must be in [0.0, 1.0], got {quantize_rate}")
        size = math.prod(levels)
        if size > torch.iinfo(FORWARD_INDEX_DTYPE).max:
            raise ConfigurationError(
                f"FSP's indices are int32: the product of levels must be < 2^31, got {size} for {levels}"
            )
        self.act_func, self.inv_act_func = build_cdf_act(act_name)
        self.vector_norm = VectorNorm.build(vector_norm)
        self.levels = list(levels)
        self.codebook_dim = len(levels)
        self.dim = (
            self.codebook_dim if dim is None else _constructor_check(lambda: check_positive_int(dim, "dim"))
        )
        self.channel_first = bool(channel_first)
        self.act_name = act_name
        self.need_inv_act = bool(need_inv_act)
        self.quantize_rate = float(quantize_rate)
        self.codebook_size = size
        self.num_codebooks = 1

        counts = torch.tensor(levels, dtype=torch.int32)
        self.register_buffer("level_counts", counts.float(), persistent=False)
        self.register_buffer("half_bin", 1.0 / (counts * 2), persistent=False)
        self.register_buffer("level_counts_long", counts.long(), persistent=False)
        self.register_buffer(
            "basis", torch.tensor(mixed_radix_basis(levels), dtype=INDEX_DTYPE), persistent=False
        )

        self.has_projections = self.dim != self.codebook_dim
        self.project_in, self.project_out = projection_pair(
            self.dim, self.codebook_dim, enabled=self.has_projections, bias=projection_has_bias
        )

    # -- layout --------------------------------------------------------------------------------------
    def _latents(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        """x -> (latents (N, codebook_dim) float32 after project_in, the feature-last shape of x)."""
        check_float(x, "x")
        axis = 1 if self.channel_first else -1
        if x.ndim < (2 if self.channel_first else 1) or x.shape[axis] != self.dim:
            where = "second (channel-first: (batch, dim, ...))" if self.channel_first else "last"
            raise ValueError(
                f"x must have {self.dim} features on its {where} axis, got shape {tuple(x.shape)}"
            )
        if self.channel_first:
            x = x.movedim(1, -1)
        return project_into(self.project_in, x.reshape(-1, self.dim)), x.shape

    def _restore(self, tokens: Tensor, shape: torch.Size) -> Tensor:
        """(N, dim) -> the input's layout (``shape`` is feature-last)."""
        out = tokens.reshape(shape)
        return out.movedim(-1, 1) if self.channel_first else out

    # -- the reference's building blocks ----------------------------------------------------------------
    def quantize_act_value(self, act_z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """``p`` in [0, 1] -> (bin centres, straight-through gradient to ``p`` when it has one; float
        digits ``floor(min(p, 1 - eps) L)``)."""
        level_indices = self._level_indices(act_z, eps)
        centres = (level_indices + 0.5) / self.level_counts
        if act_z.requires_grad:
            centres = centres + (act_z - act_z.detach())
        return centres, level_indices

    def _level_indices(self, act_z: Tensor, eps: float) -> Tensor:
        """The bins of ``p`` in [0, 1]: float digits ``floor(min(p, 1 - eps) L)``."""
        return (act_z.clamp_max(1.0 - eps) * self.level_counts).floor()

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        """Digits (..., len(levels)) -> int32 indices (...), forward's dtype."""
        check_tensor(level_indices, "level_indices")
        if level_indices.ndim < 1 or level_indices.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"level_indices must end with an axis of {self.codebook_dim} digits, "
                f"got shape {tuple(level_indices.shape)}"
            )
        return digits_to_indices(level_indices, self.basis).to(FORWARD_INDEX_DTYPE)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Indices (...) in ``[0, codebook_size)`` -> int64 digits (..., len(levels))."""
        check_indices(indices, self.codebook_size, allow_dropped=False)
        return indices_to_digits(indices, self.basis, self.level_counts_long)

    def indices_to_act_value(self, indices: Tensor) -> Tensor:
        """Indices (...) -> the bin centres in [0, 1] (..., len(levels)) float32."""
        return (self.indices_to_level_indices(indices).float() + 0.5) / self.level_counts

    def _latent_output(self, centres: Tensor, eps: float) -> Tensor:
        """Bin centres (or perturbed values) -> latents before project_out."""
        if self.need_inv_act:
            return self.inv_act_func(centres.clamp(eps, 1.0 - eps))
        return (centres - 0.5) / UNIT_VARIANCE_SCALE

    # -- inference paths ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """x -> int64 indices (the input's shape without the feature axis)."""
        with float32_region(x.device.type):
            z, shape = self._latents(x)
            indices = digits_to_indices(self._level_indices(self.act_func(z), FLOAT32_EPS), self.basis)
        return indices.reshape(shape[:-1])

    def indices_to_codes(self, indices: Tensor, eps: float | None = None) -> Tensor:
        """Indices (...) -> codes in the input's layout (after project_out), equal to forward's output."""
        eps = FLOAT32_EPS if eps is None else eps
        check_tensor(indices, "indices")
        if self.channel_first and indices.ndim < 1:
            raise ValueError("channel-first indices must have a batch axis, got a 0-d tensor")
        with float32_region(indices.device.type):
            latents = self._latent_output(self.indices_to_act_value(indices), eps)
            codes = project_from(self.project_out, latents)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def decode(self, indices: Tensor) -> Tensor:
        """:meth:`indices_to_codes` (vqcore.protocols.Quantizer)."""
        return self.indices_to_codes(indices)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, z: Tensor, eps: float | None = None) -> FSPOutput:
        eps = FLOAT32_EPS if eps is None else eps
        with float32_region(z.device.type):
            latents, shape = self._latents(z)
            norm_loss, norm_info = self.vector_norm(latents)
            act_z = self.act_func(latents)
            centres, level_indices = self.quantize_act_value(act_z, eps)
            other_info: dict[str, Any] = {}
            if self.training and self.quantize_rate < 1.0:
                # two draws from the global generator, as the reference makes them: the perturbation, then
                # the perturb-or-quantize selector (drawn at rate 0 too)
                proposal = act_z + self.half_bin * (torch.rand_like(act_z) * 2.0 - 1.0)
                accept = (proposal > 0.0) & (proposal < 1.0)
                other_info["p_accept_prob"] = accept.float().mean()
                perturbed = torch.where(accept, proposal, act_z)
                perturb = torch.rand_like(act_z) > self.quantize_rate
                centres = torch.where(perturb, perturbed, centres)
            if self.need_inv_act:
                out = self._latent_output(centres.detach(), eps)
                if latents.requires_grad:  # identity gradient to the latents
                    out = out + (latents - latents.detach())
            else:
                out = self._latent_output(centres, eps)
            out = project_from(self.project_out, out)
            indices = digits_to_indices(level_indices, self.basis).to(FORWARD_INDEX_DTYPE)
        other_info = {
            "level_indices": level_indices.reshape(*shape[:-1], self.codebook_dim),
            "norm_info": norm_info,
            **other_info,
        }
        quantized = self._restore(out, shape).to(z.dtype)
        return FSPOutput(quantized, indices.reshape(shape[:-1]), norm_loss, other_info)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {
            "codebook_dim": self.codebook_dim,
            "levels": list(self.levels),
            "channel_first": self.channel_first,
            "act_name": self.act_name,
            "need_inv_act": self.need_inv_act,
        }

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, codebook_size={self.codebook_size}, dim={self.dim}, "
            f"act_name={self.act_name!r}, need_inv_act={self.need_inv_act}, "
            f"quantize_rate={self.quantize_rate}"
        )


@hookimpl
def register_quantizers(register):
    register(
        "fsp",
        FSP,
        aliases=("FSP", "finite_scalar_perturbation"),
        summary="finite scalar perturbation: CDF-activated bins, perturbed in training",
    )
