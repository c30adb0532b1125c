"""BinaryMapper (arXiv 2510.17558): logits (..., bits) -> a one-hot code (..., 2^bits) and its index (...).

Each of ``bits`` logits is a Bernoulli probability ``sigmoid(logit / temperature)``; the sampled bits
(or, deterministic, the signs of the logits) name one of ``2^bits`` codes, returned one-hot. Training
passes gradients straight through to the joint probability of every code,
``G_c = prod_i sigmoid(l_i)^{c_i} sigmoid(-l_i)^{1 - c_i}``; the auxiliary loss
``relu(bits ln 2 - H(bits) - kl_loss_threshold)`` keeps the bits' entropy ``H`` (nats) near the maximum,
i.e. bounds the KL divergence to the uniform prior.

Index layout (vector-quantize-pytorch 1.32.0's): the FIRST bit least significant,
``index = sum_i bit_i 2^i`` (mixed radix of base 2, vqcore.blocks.grid).

As a vqcore quantizer (:class:`vqcore.protocols.Quantizer`): ``dim = bits``, ``codebook_size = 2^bits``;
``encode`` gives the deterministic indices (int64), ``decode`` their one-hot codes (-1 gives zeros); both
export. The quantized output is the one-hot code, not a vector shaped like the input.

Differences from vector-quantize-pytorch 1.32.0, on purpose:
- the deterministic bits are ``logit > 0`` exactly (the reference's ``sigmoid(logit / T) > 0.5`` rounds
  logits within ~1e-7 of 0 to bit 0);
- computations run in float32 with autocast off; the one-hot output is float32 whatever the logits'
  dtype (the reference: float32, or the logits' dtype where the straight-through term promotes it);
- the straight-through output is exactly one-hot (the reference's ``one_hot + G - G.detach()`` rounds),
  and the joint probabilities ``G`` (one per code and position) are computed in the backward only, from
  one matrix product (:class:`JointProbabilityStraightThrough`): the forward holds no (..., 2^bits)
  tensor besides the one-hot output;
- ``temperature`` must be a positive number (or a tensor); ``log_prob`` raises a ValueError when not
  given exactly one of ``indices`` / ``one_hot``; bad constructor arguments raise
  :class:`vqcore.errors.ConfigurationError`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from vqcore.blocks.grid import MAX_LISTED_BITS, digits_to_indices, mixed_radix_basis
from vqcore.blocks.precision import Float32State, float32_region
from vqcore.blocks.validation import check_float, check_indices, check_tensor
from vqcore.errors import ConfigurationError
from vqcore.hookspecs import hookimpl
from vqcore.module import QuantizerModule
from vqcore.protocols import INDEX_DTYPE

NAT = math.log(2)  # one bit, in nats


def binary_entropy(logits: Tensor) -> Tensor:
    """The entropy (nats) of independent Bernoulli bits with these logits, summed over the last axis."""
    prob = logits.sigmoid()
    return -(prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits)).sum(dim=-1)


class JointProbabilityStraightThrough(torch.autograd.Function):
    """``(logits (..., bits), one_hot (..., 2^bits), code_bits (2^bits, bits)) -> one_hot`` exactly, with the
    gradient of the joint probabilities ``G_c = prod_i sigmoid(l_i)^{c_i} sigmoid(-l_i)^{1 - c_i}``.

    ``dG_c / dl_i = G_c (c_i - sigmoid(l_i))``, so the gradient to the logits is
    ``(g G) @ C - sigmoid(l) * sum_c (g G)_c``. ``G`` (one value per code and position) is computed in
    the backward only: the forward keeps just the logits.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, one_hot: Tensor, code_bits: Tensor) -> Tensor:
        ctx.save_for_backward(logits, code_bits)
        return one_hot

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, code_bits = ctx.saved_tensors
        # log G_c = sum_i log sigmoid(-l_i) + sum_i l_i c_i  (log sigmoid(l) - log sigmoid(-l) = l)
        weighted = (F.logsigmoid(-logits).sum(dim=-1, keepdim=True) + logits @ code_bits.t()).exp_()
        weighted.mul_(grad)
        grad_logits = weighted @ code_bits - logits.sigmoid() * weighted.sum(dim=-1, keepdim=True)
        return grad_logits, None, None


class BinaryMapperOutput(NamedTuple):
    """``one_hot`` (..., 2^bits) float32; ``aux_kl_loss`` float32 (a scalar, or (...) unreduced)."""

    one_hot: Tensor
    aux_kl_loss: Tensor


class BinaryMapperOutputWithIndices(NamedTuple):
    """``return_indices=True``: ``indices`` (...) int64 too."""

    one_hot: Tensor
    indices: Tensor
    aux_kl_loss: Tensor


class BinaryMapper(QuantizerModule, Float32State):
    """Logits (..., bits) -> one-hot codes (..., 2^bits) — see the module docstring.

    ``deterministic_on_eval``: eval takes the signs of the logits instead of sampling (the default samples
    in eval too, as the reference does).
    """

    # non-persistent buffers
    power_two: Tensor  # (bits,) int64: 1, 2, 4, ...
    codes: Tensor  # (2^bits, bits) bool: the bits of every index
    code_bits: Tensor  # (2^bits, bits) float32: the same, for the straight-through product

    def __init__(self, bits: int = 1, kl_loss_threshold: float = NAT, deterministic_on_eval: bool = False):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"bits must be an int, got {type(bits).__name__} ({bits!r})")
        if not 1 <= bits <= MAX_LISTED_BITS:
            raise ConfigurationError(
                f"bits must be in [1, {MAX_LISTED_BITS}] (the one-hot output has 2^bits entries), got {bits}"
            )
        if isinstance(kl_loss_threshold, bool) or not isinstance(kl_loss_threshold, (int, float)):
            raise TypeError(f"kl_loss_threshold must be a number, got {kl_loss_threshold!r}")
        self.bits = bits
        self.num_codes = 2**bits
        self.kl_loss_threshold = float(kl_loss_threshold)
        self.deterministic_on_eval = bool(deterministic_on_eval)
        self.num_codebooks = 1
        power_two = torch.tensor(mixed_radix_basis([2] * bits), dtype=INDEX_DTYPE)
        codes = (torch.arange(self.num_codes).unsqueeze(-1) & power_two) != 0
        self.register_buffer("power_two", power_two, persistent=False)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("code_bits", codes.float(), persistent=False)

    # -- protocol ------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.bits

    @property
    def codebook_size(self) -> int:
        return self.num_codes

    def _logits(self, logits: Tensor) -> Tensor:
        check_float(logits, "logits")
        if logits.ndim < 1 or logits.shape[-1] != self.bits:
            raise ValueError(
                f"logits must have a last dimension of {self.bits}, got shape {tuple(logits.shape)}"
            )
        return logits.float()

    def bits_to_indices(self, bits: Tensor) -> Tensor:
        """Bits (..., bits) (bool or 0/1) -> int64 indices (...), first bit least significant."""
        return digits_to_indices(bits, self.power_two)

    def indices_to_bits(self, indices: Tensor) -> Tensor:
        """Int indices (...) -> bool bits (..., bits), first bit least significant."""
        return (indices.unsqueeze(-1).to(INDEX_DTYPE) & self.power_two) != 0

    def indices_to_one_hot(self, indices: Tensor, allow_dropped: bool = True) -> Tensor:
        """Int indices (...) -> float32 one-hot (..., 2^bits); -1 gives zeros where ``allow_dropped``
        (otherwise every index must be in range: forward's)."""
        one_hot = torch.zeros((*indices.shape, self.num_codes), device=indices.device)
        if not allow_dropped:
            return one_hot.scatter_(-1, indices.unsqueeze(-1), 1.0)
        hot = (indices >= 0).unsqueeze(-1).float()
        return one_hot.scatter(-1, indices.clamp_min(0).unsqueeze(-1), hot)

    def encode(self, logits: Tensor) -> Tensor:
        """Logits (..., bits) -> the deterministic int64 indices (...): the signs of the logits."""
        with float32_region(logits.device.type):
            return self.bits_to_indices(self._logits(logits) > 0)

    def decode(self, indices: Tensor) -> Tensor:
        """Indices (...) in ``[0, 2^bits)`` or -1 -> one-hot codes (..., 2^bits) float32 (-1: zeros)."""
        check_indices(indices, self.num_codes)
        return self.indices_to_one_hot(indices)

    # -- the reference's API --------------------------------------------------------------------------
    def binary_entropy(self, logits: Tensor) -> Tensor:
        return binary_entropy(logits)

    def calc_aux_loss(self, logits: Tensor, reduce_aux_kl_loss: bool = True) -> Tensor:
        """``relu(bits ln 2 - H - kl_loss_threshold)`` per position (...), or its mean."""
        with float32_region(logits.device.type):
            kl_div = self.bits * NAT - binary_entropy(self._logits(logits))
            aux_kl_loss = F.relu(kl_div - self.kl_loss_threshold)
        return aux_kl_loss.mean() if reduce_aux_kl_loss else aux_kl_loss

    def log_prob(
        self,
        logits: Tensor,
        *,
        indices: Tensor | None = None,
        one_hot: Tensor | None = None,
        sum_bits: bool = True,
    ) -> Tensor:
        """The log-probability of the codes ``indices`` (or ``one_hot``'s argmax) under ``logits``: (...),
        or per bit (..., bits) with ``sum_bits=False``."""
        if (indices is None) == (one_hot is None):
            raise ValueError("log_prob takes either indices or one_hot (exactly one of them)")
        if one_hot is not None:
            indices = check_tensor(one_hot, "one_hot").argmax(dim=-1)
        indices = cast(Tensor, indices)  # one of the two, checked above
        check_indices(indices, self.num_codes, allow_dropped=False)
        with float32_region(logits.device.type):
            logits = self._logits(logits)
            if indices.shape != logits.shape[:-1]:
                raise ValueError(
                    f"indices must have the logits' shape without the bits axis, {tuple(logits.shape[:-1])}, "
                    f"got {tuple(indices.shape)}"
                )
            log_probs = torch.where(
                self.indices_to_bits(indices), F.logsigmoid(logits), F.logsigmoid(-logits)
            )
        return log_probs.sum(dim=-1) if sum_bits else log_probs

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        logits: Tensor,
        temperature: float | Tensor = 1.0,
        straight_through: bool | None = None,
        calc_aux_loss: bool | None = None,
        deterministic: bool | None = None,
        return_indices: bool = False,
        reduce_aux_kl_loss: bool = True,
    ) -> BinaryMapperOutput | BinaryMapperOutputWithIndices:
        if not isinstance(temperature, Tensor) and (
            isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
        ):
            raise ValueError(f"temperature must be a number > 0 (or a tensor), got {temperature!r}")
        if deterministic is None:
            deterministic = self.deterministic_on_eval and not self.training
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss
        with float32_region(logits.device.type):
            flat = self._logits(logits)
            if deterministic:
                bits = flat > 0
            else:  # the global generator, drawn as the reference draws it
                bits = (flat / temperature).sigmoid().bernoulli()
            indices = self.bits_to_indices(bits)
            if straight_through and flat.requires_grad:
                one_hot = JointProbabilityStraightThrough.apply(
                    flat, self.indices_to_one_hot(indices), self.code_bits
                )
            else:
                one_hot = self.indices_to_one_hot(indices, allow_dropped=False)
            if calc_aux_loss:
                aux_kl_loss = self.calc_aux_loss(flat, reduce_aux_kl_loss=reduce_aux_kl_loss)
            else:
                aux_kl_loss = torch.zeros((), device=logits.device)
        if return_indices:
            return BinaryMapperOutputWithIndices(one_hot, indices, aux_kl_loss)
        return BinaryMapperOutput(one_hot, aux_kl_loss)

    def export_metadata(self) -> dict[str, Any]:
        """Hyper-parameters for exported artifacts (vqcore.protocols.SupportsExportMetadata)."""
        return {"bits": self.bits, "bit_order": "first bit least significant", "decoded": "one-hot"}

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, kl_loss_threshold={self.kl_loss_threshold}, "
            f"deterministic_on_eval={self.deterministic_on_eval}"
        )


@hookimpl
def register_quantizers(register):
    register(
        "binary_mapper",
        BinaryMapper,
        aliases=("BinaryMapper",),
        summary="Bernoulli bits of logits -> one-hot codes (KL-bounded, straight-through)",
    )
