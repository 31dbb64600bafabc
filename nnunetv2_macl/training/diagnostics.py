"""Collapse diagnostics for contrastive pretraining: is the image-level loss learning anything?

A contrastive loss whose embeddings are all equal sits at its chance value: for SupCon over M
samples every anchor's denominator holds M - 1 equal terms, so each positive contributes
log(M - 1), i.e. Lg = log(2B - 1) for B images in two views, whatever the positives are. The
mean pairwise cosine of the pooled descriptors and of the projections shows where the per-image
information is lost (METHOD.md, "The global descriptor").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

COLLAPSE_MARGIN = 0.02  # an epoch whose Lg is within 2 % of chance is reported as collapsed


def contrastive_chance(num_samples: int) -> float:
    """SupCon / NT-Xent value when all ``num_samples`` embeddings are equal: log(num_samples - 1)."""
    if num_samples < 2:
        raise ValueError(f"a contrastive loss needs at least 2 samples, got {num_samples}")
    return math.log(num_samples - 1)


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of ``x`` (N, D)."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) vectors, got {tuple(x.shape)}")
    f = F.normalize(x.detach().float(), dim=1)
    sim = f @ f.T
    n = f.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def is_collapsed(lg: float, chance: float, margin: float = COLLAPSE_MARGIN) -> bool:
    """Lg within ``margin`` (relative) of its chance value: the value a batch of equal embeddings gives."""
    return abs(lg - chance) <= margin * chance


def diagnostic_indices(case_index, batch_size: int, seed: int = 0) -> list[int]:
    """A fixed batch of sample indices spread over as many volumes as possible (one sample per
    volume while volumes last), the same every epoch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    case_index = np.asarray(case_index)
    cases = rng.permutation(np.unique(case_index))
    picked: list[int] = []
    while len(picked) < min(batch_size, len(case_index)):
        for c in cases:
            options = np.setdiff1d(np.flatnonzero(case_index == c), picked)
            if len(options):
                picked.append(int(rng.choice(options)))
            if len(picked) == batch_size:
                break
    return picked


@torch.no_grad()
def embedding_diagnostics(macl, loss, images: torch.Tensor, positions: torch.Tensor, content: torch.Tensor | None,
                          spatial_transform, seed: int = 0) -> dict[str, float]:
    """Collapse measures on one batch of real samples, with the training views (T_var drawn from a
    fixed seed, so epochs compare):

    - cos_descriptor: mean pairwise cosine of the pooled image-level descriptors (auxiliary branch);
    - cos_projection: the same for the projections Z~g;
    - Lg and Lg_chance = log(2B - 1) on this batch, and Ld and LER where the run uses them (so that
      ``macl_diagnose --init`` against the final checkpoint shows each objective falling);
    - bottleneck_abs: mean absolute auxiliary bottleneck activation (what fine-tuning receives; LER
      must not shrink it).
    """
    generator = torch.Generator().manual_seed(seed)
    v1 = spatial_transform(images, generator=generator)
    v2 = spatial_transform(images, generator=generator)
    was_training = macl.training
    macl.eval()  # the heads' BatchNorm uses its running statistics and is not updated by this batch
    try:
        need = ("global", "descriptors", "equivariance") + (("dense",) if loss.weights[1] > 0 else ())
        out = macl(images, v1, images, v2, need=need)
    finally:
        macl.train(was_training)
    _, components = loss(out, positions, content)
    result = {
        "cos_descriptor": mean_pairwise_cosine(out["descriptor_auxiliary"]),
        "cos_projection": mean_pairwise_cosine(out["global_auxiliary"]),
        "Lg": float(loss.global_loss(out["global_dominant"], out["global_auxiliary"], positions)),
        "Lg_chance": contrastive_chance(2 * images.shape[0]),
        "bottleneck_abs": float(out["bottleneck_auxiliary"].float().abs().mean()),
    }
    result.update({name: float(components[name]) for name, w in zip(("Ld", "LER"), loss.weights[1:]) if w > 0})
    return result


def format_diagnostics(d: dict[str, float]) -> str:
    others = "".join(f" | {name} {d[name]:.4f}" for name in ("Ld", "LER") if name in d)
    return (f"pooled-descriptor cosine {d['cos_descriptor']:.4f} | projection cosine {d['cos_projection']:.4f} | "
            f"Lg {d['Lg']:.4f} vs chance log(2B-1) = {d['Lg_chance']:.4f} ({d['Lg'] / d['Lg_chance']:.3f} x){others} | "
            f"mean |bottleneck| {d['bottleneck_abs']:.4f}")
