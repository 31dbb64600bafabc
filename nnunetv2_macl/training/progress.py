"""progress.png in the manner of nnU-Net's: the loss components per epoch with the chance value of
Lg, the collapse diagnostics, lr and epoch time."""
from __future__ import annotations

import math


def _finite(values: list) -> bool:
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def plot_loss_curves(ax, logging: dict[str, list]) -> None:
    """total, Lg, Ld, LER per epoch with Lg's chance value log(2B-1) under Lg (the shared loss panel of
    :mod:`nnunetv2_macl.figures`; logs of older versions have no chance values and get no line)."""
    from nnunetv2_macl.figures import plot_pretraining_losses

    chance = logging.get("Lg_chance") or []
    usable = len(chance) == len(logging["epoch"]) and all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in chance)
    plot_pretraining_losses(ax, logging, chance if usable else None)


def plot_progress(logging: dict[str, list], path: str) -> None:
    """Loss components with Lg's chance line (top), collapse diagnostics, lr and epoch time."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    from nnunetv2_macl.figures import save_figure

    epochs = [e + 1 for e in logging["epoch"]]
    if not epochs:
        return
    fig, axes = plt.subplots(4, 1, figsize=(12, 18))
    plot_loss_curves(axes[0], logging)
    axes[0].set_title("MACL pretraining loss (L = l1 Lg + l2 Ld + l3 LER)")
    ax = axes[1]
    for key, style, label in (("cos_descriptor", "m-", "pooled descriptors"), ("cos_projection", "c-", "projections")):
        values = logging.get(key) or []
        if len(values) == len(epochs) and _finite(values):
            ax.plot(epochs, values, style, linewidth=2, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean pairwise cosine\n(1 = collapsed)")
    ax.set_title("collapse diagnostics on a fixed batch of real samples")
    if ax.lines:
        ax.legend(loc="upper right")
    axes[2].plot(epochs, logging["lr"], "b-", linewidth=2, marker="o", markersize=3)  # visible for 1 epoch too
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate (end of epoch)")
    axes[3].plot(epochs, logging["epoch_time"], "b-", linewidth=2, marker="o", markersize=3)
    axes[3].set_xlabel("epoch")
    axes[3].set_ylabel("epoch time [s]")
    fig.tight_layout()
    save_figure(fig, path)
