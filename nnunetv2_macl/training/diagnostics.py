"""Collapse diagnostics for contrastive pretraining: is the image-level loss learning anything?

A contrastive loss whose embeddings are all equal sits at its chance value: for SupCon over M
samples every anchor's denominator holds M - 1 equal terms, so each positive contributes
log(M - 1), i.e. Lg = log(2B - 1) for B images in two views, whatever the positives are. The
mean pairwise cosine of the pooled descriptors and of the projections shows where the per-image
information is lost (METHOD.md, "The global descriptor").
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from nnunetv2_macl.losses.dense_contrastive import content_cells
from nnunetv2_macl.losses.equivariance import equivariance_cells, equivariance_loss
from nnunetv2_macl.training.distributed import process_local_statistics

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


@contextlib.contextmanager
def batch_statistics_without_update(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in training mode (BatchNorm normalises with the batch's own statistics, as in every
    training step) and put every BatchNorm's running statistics back afterwards.

    Evaluation mode would use the running statistics instead, which are 0/1 at initialisation: the
    image-level head is then nearly the identity without its centring, and a diagnostic at
    initialisation would not mean what it means after training (on one batch of 16 slices at init,
    eval mode gave projection cosine 0.976, train mode 0.331).

    The statistics are this process's batch's, also under torchrun with global BatchNorm: diagnostics run
    on the main process alone, and a global reduction would wait for processes that never call it."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running_", "num_batches"))}
             for m in norms]
    was_training = module.training
    module.train()
    try:
        with process_local_statistics(module):
            yield
    finally:
        module.train(was_training)
        for m, state in zip(norms, saved):
            for k, v in state.items():
                getattr(m, k).copy_(v)


def ler_references(y: torch.Tensor, y_tilde: torch.Tensor, content: torch.Tensor | None) -> tuple[float, float]:
    """(LER, LER_unpaired) on one batch: LER as the loss computes it, and LER between each dominant map
    and the auxiliary map of the previous sample (what unrelated maps give).

    With a content mask, the training loss's mask is used (the dominant grid's cells that are mostly
    padding are left out); the unpaired pair of samples i and i - 1 is compared on the cells that are
    content in both, so that neither reference can be met by matching the padding layout, which is
    nearly the same in every slice. A value with no sample of two such cells to compare is nan."""
    if content is None:
        return float(equivariance_loss(y, y_tilde)), float(equivariance_loss(y, y_tilde.roll(1, dims=0)))
    cells = content_cells(content.to(y.device), y.shape[2:])
    values = []
    for shifted, mask in ((y_tilde, cells), (y_tilde.roll(1, dims=0), cells & cells.roll(1, dims=0))):
        usable = bool(equivariance_cells(mask, y.shape[0], y.shape[2:]).any())
        values.append(float(equivariance_loss(y, shifted, cells=mask)) if usable else float("nan"))
    return values[0], values[1]


def ler_sample_share(y: torch.Tensor, content: torch.Tensor | None) -> float:
    """The share of samples that LER compares: those with at least two content cells on the dominant
    bottleneck grid of ``y`` (1.0 without a content mask). 0 means LER contributes nothing at this crop."""
    if content is None:
        return 1.0
    cells = equivariance_cells(content_cells(content.to(y.device), y.shape[2:]), y.shape[0], y.shape[2:])
    return float(cells.any(dim=1).float().mean())


@torch.no_grad()
def embedding_diagnostics(macl, loss, images: torch.Tensor, positions: torch.Tensor, content: torch.Tensor | None,
                          spatial_transform, seed: int = 0) -> dict[str, float]:
    """Collapse measures on one batch of real samples, with the training views (T_var drawn from a
    fixed seed, so epochs compare):

    - cos_descriptor: mean pairwise cosine of the pooled image-level descriptors (auxiliary branch);
    - cos_projection: the same for the projections Z~g;
    - Lg and Lg_chance = log(2B - 1) on this batch;
    - Ld and Ld_chance (the same loss on equal features: every similarity ties, whatever the masks)
      where the run uses Ld; LER and LER_unpaired (LER between each dominant map and the auxiliary map
      of another sample: what unrelated maps give; both over content cells, :func:`ler_references`)
      where the run uses LER; so that ``macl_diagnose
      --init`` against the final checkpoint shows each objective against its own reference;
    - bottleneck_abs: mean absolute auxiliary bottleneck activation (what fine-tuning receives; LER
      must not shrink it).

    Mode: training mode, i.e. the heads' BatchNorm normalises with this batch's statistics as in a
    training step, without updating its running statistics (:func:`batch_statistics_without_update`);
    the values then mean the same at initialisation and after training.
    """
    generator = torch.Generator().manual_seed(seed)
    v1 = spatial_transform(images, generator=generator)
    v2 = spatial_transform(images, generator=generator)
    # the dense loss's sampled cells come from the global RNG: keep the diagnostic from consuming it
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with batch_statistics_without_update(macl):
            need = ("global", "descriptors", "equivariance") + (("dense",) if loss.weights[1] > 0 else ())
            out = macl(images, v1, images, v2, need=need)
        result = {
            "cos_descriptor": mean_pairwise_cosine(out["descriptor_auxiliary"]),
            "cos_projection": mean_pairwise_cosine(out["global_auxiliary"]),
            "Lg": float(loss.global_loss(out["global_dominant"], out["global_auxiliary"], positions)),
            "Lg_chance": contrastive_chance(2 * images.shape[0]),
            "bottleneck_abs": float(out["bottleneck_auxiliary"].float().abs().mean()),
        }
        if loss.weights[1] > 0:
            z, z_tilde = out["dense_dominant"], out["dense_auxiliary"]
            torch.manual_seed(seed)
            result["Ld"] = float(loss.dense_loss(z, z_tilde, positions, content))
            torch.manual_seed(seed)
            result["Ld_chance"] = float(loss.dense_loss(torch.ones_like(z), torch.ones_like(z_tilde), positions,
                                                        content))
        if loss.weights[2] > 0:
            y, y_tilde = out["bottleneck_dominant"], out["bottleneck_auxiliary"]
            result["LER"], result["LER_unpaired"] = ler_references(y, y_tilde, loss.ler_content(content))
            result["LER_samples"] = ler_sample_share(y, loss.ler_content(content))
    finally:
        torch.random.set_rng_state(rng)
    return result


def format_diagnostics(d: dict[str, float]) -> str:
    others = ""
    if "Ld" in d:
        others += f" | Ld {d['Ld']:.4f} vs chance {d['Ld_chance']:.4f} ({d['Ld'] / d['Ld_chance']:.3f} x)"
    if "LER" in d:
        share = d.get("LER_samples", 1.0)
        if share == 0 or not math.isfinite(d["LER"]):
            others += (" | LER n/a: no sample has two bottleneck cells that are mostly image at this crop, so LER "
                       "contributes nothing (--ler-all-cells compares every cell)")
        else:
            others += f" | LER {d['LER']:.4f} vs unpaired maps {d['LER_unpaired']:.4f}"
            if share < 1:
                others += f" (on the {share:.0%} of samples with two content cells)"
    return (f"pooled-descriptor cosine {d['cos_descriptor']:.4f} | projection cosine {d['cos_projection']:.4f} | "
            f"Lg {d['Lg']:.4f} vs chance log(2B-1) = {d['Lg_chance']:.4f} ({d['Lg'] / d['Lg_chance']:.3f} x){others} | "
            f"mean |bottleneck| {d['bottleneck_abs']:.4f} (heads' BatchNorm on the batch's statistics)")
