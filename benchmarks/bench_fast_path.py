"""Every VectorQuantize option on the fast path: each option's training step against its own floor, the
residual stacks against theirs, and the quantizer of audiolm-pytorch's SoundStream against the reference.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fast_path.py            # every case (~6 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_fast_path.py --only cosine,rvq

A floor is what a training step with the option must at least compute, written the plain way (one GEMM over
all tokens, fresh temporaries): the code choice under ``no_grad`` (distances, argmin), the gather, the
option's own arithmetic, the straight-through estimator and the backward of ``out.sum()``. It has no
commitment loss, no EMA update and no statistics, which vqcore's step computes as well. Every case runs on
(8, 1024, 256) tokens with 1024 codes (ResidualVQ: (4, 1024, 256), 8 layers) and carries the target
"vqcore <= 1.3x floor"; ``audiolm`` carries "vqcore no slower than the reference".

Timing, noise handling, the table and the command line come from harness.py; benchmarks/README.md
describes the method.
"""

from __future__ import annotations

import sys

import harness
import torch
import torch.nn.functional as F
from harness import Config, Impl, Row, build, mark_targets, run_case, train_call

SHAPE = (8, 1024, 256)
RVQ_SHAPE = (4, 1024, 256)
BASE = dict(dim=256, codebook_size=1024)
FLOOR = 1.3


def nearest_rows(x: torch.Tensor, codes: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """The floor's code choice for x (..., d) among codes (K, d): one GEMM and one argmin."""
    flat = x.reshape(-1, x.shape[-1])
    if cosine:
        return (flat @ codes.T).argmax(-1).view(x.shape[:-1])
    return (codes.pow(2).sum(-1) - 2 * flat @ codes.T).argmin(-1).view(x.shape[:-1])


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): x rotated onto q's direction and scaled to its norm, the
    rotation and scale treated as constants."""
    x_norm, q_norm = x.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    e, u = x / x_norm.clamp(min=1e-6), (q / q_norm.clamp(min=1e-6)).detach()
    r = F.normalize(e + u, dim=-1).detach()
    e_ = e.detach()
    rotated = x - 2 * (x * r).sum(-1, keepdim=True) * r + 2 * (x * e_).sum(-1, keepdim=True) * u
    return rotated * (q_norm / x_norm.clamp(min=1e-6)).detach()


def floor_step(x: torch.Tensor, codes: torch.Tensor, option: str, module, learnable: torch.Tensor) -> None:
    """One floor training step of ``option`` (see the module docstring); ``learnable`` is the learnable
    option's codebook (a leaf that takes the gradient of the codebook loss)."""
    leaf = x.detach().requires_grad_(True)
    h = leaf
    if option == "codebook_dim":
        h = module.project_in(leaf)
    if option in ("heads_shared", "heads_separate"):
        h = h.unflatten(-1, (8, -1))
    if option == "cosine":
        h = F.normalize(h, dim=-1)
    with torch.no_grad():
        if option == "heads_separate":  # one codebook per head: (heads, K, d)
            idx = torch.stack([nearest_rows(h[..., i, :], codes[i]) for i in range(8)], -1)
            q = codes[torch.arange(8), idx]
        elif option == "gumbel":
            flat = h.reshape(-1, h.shape[-1])
            dist = (flat.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1) - 2 * flat @ codes.T).clamp(
                min=0
            )
            noise = -torch.log(-torch.log(torch.rand_like(dist).clamp(min=1e-20)).clamp(min=1e-20))
            q = codes[(noise - dist.sqrt()).argmax(-1)].view(h.shape)
        else:
            idx = nearest_rows(h, codes, cosine=option == "cosine")
            q = codes[idx]
    if option == "learnable":
        q = learnable[idx]
        out = straight_through(h, q.detach()) + F.mse_loss(q, h.detach())
    elif option == "rotation_trick":
        out = rotate(h, q)
    else:
        out = straight_through(h, q)
    if option == "masked":
        out = torch.where(MASK.unsqueeze(-1), out, leaf)
    if option in ("heads_shared", "heads_separate"):
        out = out.flatten(-2)
    if option == "codebook_dim":
        out = module.project_out(out)
    out.sum().backward()


MASK = torch.rand(SHAPE[:2], generator=torch.Generator().manual_seed(5)) > 0.25


OPTIONS = {
    "defaults": {},
    "cosine": dict(use_cosine_sim=True),
    "codebook_dim": dict(codebook_dim=16),
    "heads_shared": dict(heads=8, codebook_dim=32),
    "heads_separate": dict(heads=8, codebook_dim=32, separate_codebook_per_head=True),
    "masked": {},
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "rotation_trick": dict(rotation_trick=True),
    "gumbel": dict(stochastic_sample_codes=True, sample_codebook_temp=1.0),
}


def masked_call(module, x: torch.Tensor):
    module.train()

    def call():
        leaf = x.detach().requires_grad_(True)
        quantized, _, loss = module(leaf, mask=MASK)
        (quantized.sum() + loss.sum()).backward()

    return call


def option_case(option: str):
    def run(cfg: Config) -> list[Row]:
        torch.manual_seed(0)
        x = torch.randn(*SHAPE)
        kwargs = dict(BASE, **OPTIONS[option])
        ours = build("vqcore", "VectorQuantize", **kwargs)
        reference = build(
            "reference", "VectorQuantize", **dict(kwargs, rotation_trick=option == "rotation_trick")
        )
        codes = ours.codebook.detach().clone()
        if option != "heads_separate":
            codes = codes.reshape(-1, codes.shape[-1])
        learnable = codes.clone().requires_grad_(True)
        call = masked_call if option == "masked" else train_call
        impls = [
            Impl("vqcore", call(ours, x)),
            Impl("reference", call(reference, x)),
            Impl(f"floor ({option})", lambda: floor_step(x, codes, option, ours, learnable)),
        ]
        rows = run_case(f"{option} train x(8,1024,256) K=1024", impls, cfg, reps=9, warmup=2)
        return mark_targets(rows, ref=None, floor=FLOOR)

    return run


def residual_floor(module, x: torch.Tensor, layers_of):
    """Per layer one GEMM + argmin + gather + subtraction under no_grad, the straight-through estimator of
    the sum of the codes, and the backward of its sum."""
    books = [
        layer.codebook.detach().reshape(-1, layer.codebook.shape[-1]).clone() for layer in layers_of(module)
    ]
    groups = len(books) // 8

    def call():
        leaf = x.detach().requires_grad_(True)
        parts = leaf.chunk(groups, dim=-1)
        outs = []
        for g, part in enumerate(parts):
            with torch.no_grad():
                r, total = part.reshape(-1, part.shape[-1]), 0
                for book in books[g * 8 : (g + 1) * 8]:
                    code = book[torch.addmm(book.pow(2).sum(-1), r, book.T, alpha=-2).argmin(-1)]
                    r = r - code
                    total = total + code
            outs.append(straight_through(part, total.view(part.shape)))
        torch.cat(outs, -1).sum().backward()

    return call


def residual_case(cls: str, groups: int):
    def run(cfg: Config) -> list[Row]:
        torch.manual_seed(0)
        x = torch.randn(*RVQ_SHAPE)
        kwargs = dict(BASE, num_quantizers=8, **({"groups": groups} if groups > 1 else {}))
        if groups > 1:
            kwargs["dim"] = 256
        ours = build("vqcore", cls, **kwargs)

        def layers_of(module):
            if groups > 1:
                return [layer for rvq in module.rvqs for layer in rvq.layers]
            return list(module.layers)

        impls = [
            Impl("vqcore", train_call(ours, x)),
            Impl("reference", train_call(build("reference", cls, **dict(kwargs, rotation_trick=False)), x)),
            Impl("floor (8 x GEMM+argmin+gather+sub, STE backward)", residual_floor(ours, x, layers_of)),
        ]
        name = "rvq" if groups == 1 else f"grouped rvq G={groups}"
        rows = run_case(f"{name} train Q=8 x(4,1024,256) K=1024", impls, cfg, reps=9, warmup=2)
        return mark_targets(rows, ref=None, floor=FLOOR)

    return run


AUDIOLM = dict(
    dim=512,
    codebook_size=1024,
    num_quantizers=12,
    groups=1,
    decay=0.95,
    kmeans_init=True,
    threshold_ema_dead_code=2,
    quantize_dropout=True,
    quantize_dropout_cutoff_index=1,
    stochastic_sample_codes=True,
    rotation_trick=True,
)


def case_audiolm(cfg: Config) -> list[Row]:
    """audiolm-pytorch's SoundStream quantizer settings: (4, 256, 512) frames, a training step after the
    k-means initialisation."""
    torch.manual_seed(0)
    x = torch.randn(4, 256, 512)
    impls = []
    for lib in ("vqcore", "reference"):
        module = build(lib, "GroupedResidualVQ", **AUDIOLM)
        call = train_call(module, x)
        call()  # k-means on the first batch
        impls.append(Impl(lib, call))
    rows = run_case(
        "audiolm soundstream GRVQ 12 x 1024, dim 512, train x(4,256,512)", impls, cfg, reps=9, warmup=2
    )
    return harness.target_no_slower(rows)


CASES = {
    **{option: option_case(option) for option in OPTIONS},
    "rvq": residual_case("ResidualVQ", 1),
    "grvq": residual_case("GroupedResidualVQ", 2),
    "audiolm": case_audiolm,
}


if __name__ == "__main__":
    sys.exit(
        harness.main(__doc__.split("\n")[0], CASES, results_name="fast_path_latest", default_wait_s=30.0)
    )
