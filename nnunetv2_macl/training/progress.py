"""progress.png in the manner of nnU-Net's: the loss components per epoch, lr and epoch time."""
from __future__ import annotations

import os


def plot_progress(logging: dict[str, list], path: str) -> None:
    """Plot total, Lg, Ld and LER (top), lr (middle) and epoch time (bottom) against the epoch."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    epochs = [e + 1 for e in logging["epoch"]]
    if not epochs:
        return
    fig, axes = plt.subplots(3, 1, figsize=(12, 14))
    ax = axes[0]
    for key, style in (("total", "k-"), ("Lg", "b-"), ("Ld", "r-"), ("LER", "g-")):
        ax.plot(epochs, logging[key], style, label=key, linewidth=3 if key == "total" else 2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("MACL pretraining loss (L = l1 Lg + l2 Ld + l3 LER)")
    ax.legend(loc="upper right")
    axes[1].plot(epochs, logging["lr"], "b-", linewidth=2)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("learning rate (end of epoch)")
    axes[2].plot(epochs, logging["epoch_time"], "b-", linewidth=2)
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("epoch time [s]")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
