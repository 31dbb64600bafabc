"""Learning curves from nnU-Net's own training logs: validation pseudo-Dice against training iterations.

nnU-Net writes, per epoch, ``Epoch E``, ``Current learning rate: ...``, ``train_loss``, ``val_loss`` and
``Pseudo dice [per class]`` into ``training_log_*.txt`` of the fold folder (a training continued with
``--c`` adds a new file; later lines win). The pseudo-Dice is computed on ``num_val_iterations`` random
validation patches per epoch; the curve's last point is nnU-Net's full validation (``summary.json``,
every validation case), marked differently.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_LR = re.compile(r": Current learning rate: ([0-9.eE+-]+)")
_LOSS = re.compile(r": (train_loss|val_loss) (\S+)")
_DICE = re.compile(r": Pseudo dice \[(.*)\]")
_NUMBER = re.compile(r"(?:np\.float\d+\()?(nan|[-+]?[0-9.]+(?:[eE][-+]?\d+)?)\)?")


def parse_training_log(text: str) -> dict[int, dict]:
    """``{epoch: {"lr", "train_loss", "val_loss", "pseudo_dice" (per class), "mean_pseudo_dice"}}`` of
    the epochs the text completes (an epoch counts once its pseudo-Dice line is there)."""
    epochs: dict[int, dict] = {}
    current: dict | None = None
    for line in text.splitlines():
        m = _EPOCH.search(line)
        if m:
            current = {"epoch": int(m.group(1))}
            continue
        if current is None:
            continue
        if (m := _LR.search(line)):
            current["lr"] = float(m.group(1))
        elif (m := _LOSS.search(line)):
            current[m.group(1)] = float(m.group(2))
        elif (m := _DICE.search(line)):
            values = [float(v) for v in _NUMBER.findall(m.group(1))]
            current["pseudo_dice"] = values
            finite = [v for v in values if not math.isnan(v)]
            current["mean_pseudo_dice"] = float(np.mean(finite)) if finite else float("nan")
            epochs[current["epoch"]] = current
    return epochs


def read_training_logs(fold_folder: str | Path) -> dict[int, dict]:
    """All ``training_log_*.txt`` of a fold folder in the order written (the names hold the time)."""
    merged: dict[int, dict] = {}
    for f in sorted(Path(fold_folder).glob("training_log_*.txt")):
        merged.update(parse_training_log(f.read_text(errors="replace")))
    return merged


def learning_curve(fold_folder: str | Path, iters_per_epoch: int) -> dict:
    """``{"iterations": [...], "pseudo_dice": [...], "train_loss": [...], "final_iterations", "final_dice"}``:
    one point per logged epoch at ``(epoch + 1) * iters_per_epoch`` iterations; the final point is the
    full validation's foreground-mean Dice (None while the training has not finished)."""
    epochs = read_training_logs(fold_folder)
    keys = sorted(epochs)
    curve = {"iterations": [(e + 1) * int(iters_per_epoch) for e in keys],
             "pseudo_dice": [epochs[e]["mean_pseudo_dice"] for e in keys],
             "train_loss": [epochs[e].get("train_loss", float("nan")) for e in keys],
             "lr": [epochs[e].get("lr", float("nan")) for e in keys], "final_iterations": None, "final_dice": None}
    summary = Path(fold_folder) / "validation" / "summary.json"
    if summary.is_file():
        curve["final_dice"] = float(json.loads(summary.read_text())["foreground_mean"]["Dice"])
        curve["final_iterations"] = (keys[-1] + 1) * int(iters_per_epoch) if keys else None
    return curve


def plot_learning_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """One line per arm (mean over its folds of the pseudo-Dice at each iteration count, a band for the
    spread when several), the full validations as larger markers at the end. ``curves``: arm label ->
    list of :func:`learning_curve` results (one per fold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunetv2_macl.figures import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for i, (label, runs) in enumerate(curves.items()):
        runs = [r for r in runs if r["iterations"]]
        if not runs:
            continue
        colour = f"C{i % 10}"
        averaged, running = mean_curve_runs(runs)
        n = min(len(r["iterations"]) for r in averaged)
        x = np.array(averaged[0]["iterations"][:n], dtype=float)
        y = np.array([r["pseudo_dice"][:n] for r in averaged], dtype=float) * 100
        ax.plot(x, np.nanmean(y, 0), color=colour, lw=1.3, label=f"{label} (pseudo-Dice, {len(averaged)} run(s))")
        if len(averaged) > 1:
            ax.fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), color=colour, alpha=0.15, lw=0)
        for r in running:  # beside the mean, never in it: a partial run would cut the mean short
            ax.plot(r["iterations"], np.asarray(r["pseudo_dice"], dtype=float) * 100, color=colour, lw=0.8, ls="--")
        if running:
            ax.plot([], [], color=colour, lw=0.8, ls="--", label=f"{label}, {len(running)} run(s) still going")
        finals = [(r["final_iterations"], 100 * r["final_dice"]) for r in runs if r["final_dice"] is not None]
        if finals:
            fx, fy = zip(*finals)
            ax.scatter(fx, fy, color=colour, marker="D", s=36, edgecolor="black", zorder=3)
    ax.scatter([], [], color="grey", marker="D", edgecolor="black", label="full validation (summary.json)")
    ax.set_xlabel("fine-tuning iterations")
    ax.set_ylabel("validation Dice, foreground mean (%)")
    ax.set_title(title or "Learning curves", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def mean_curve_runs(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(averaged, running)``: the runs a mean curve is made of (the finished ones, or every run while
    none has finished) and the unfinished runs left out of it (``finished`` False in the curve)."""
    finished = [r for r in runs if r.get("finished", True)]
    if not finished:
        return list(runs), []
    return finished, [r for r in runs if not r.get("finished", True)]


def last_quarter_gain(curve: dict, window: int = 5) -> float | None:
    """Plateau check: mean pseudo-Dice of the last ``window`` epochs minus that of the ``window`` epochs
    ending at three quarters of the run (EMA-free, so noisy; a gain below ~0.01 says "flat"). None when
    the curve has fewer than ``2 * window`` epochs."""
    y = np.asarray(curve["pseudo_dice"], dtype=float)
    if y.size < 2 * window:
        return None
    q = int(round(0.75 * y.size))
    return float(np.nanmean(y[-window:]) - np.nanmean(y[max(0, q - window):q]))
