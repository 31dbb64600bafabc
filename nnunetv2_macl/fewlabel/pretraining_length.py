"""Dice against pretraining length: one pretraining's kept snapshots (``--keep-epochs``, arms such as
``macl@encoder~16``) and its final checkpoint, each fine-tuned, with scratch as the reference line, beside
that pretraining's own losses per epoch.

A snapshot at epoch E of an N-epoch pretraining is not an E-epoch pretraining: the cosine learning rate
spans all N epochs, so at E < N it has not yet decayed. The figure and the table say so.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from nnunetv2_macl.fewlabel.settings import Arm


def length_points(agg: Sequence[Mapping], arms: Sequence[Arm], pretrain_epochs: int,
                  budget: int) -> dict[str, list[dict]]:
    """Per start that has snapshot arms (same method, recipe and transfer; the label of its final arm):
    one point per pretraining epoch with a result at ``budget``: ``epoch``, Dice ``mean``/``sd`` over folds,
    ``n_folds`` and the paired difference to scratch (``delta``/``delta_sd``), sorted by epoch."""
    groups: dict[tuple, list[Arm]] = {}
    for a in arms:
        if a.pretrained:
            groups.setdefault((a.method, a.recipe, a.transfer), []).append(a)
    by_arm = {r["arm"]: r for r in agg if r["budget"] == budget}
    out: dict[str, list[dict]] = {}
    for (method, recipe, transfer), members in groups.items():
        if all(a.snapshot is None for a in members):
            continue
        points = []
        for a in members:
            r = by_arm.get(a.key)
            if r is None or r.get("dice_mean_mean") is None:
                continue
            points.append({"epoch": a.snapshot if a.snapshot is not None else int(pretrain_epochs), "arm": a.key,
                           "mean": r["dice_mean_mean"], "sd": r.get("dice_mean_sd"), "n_folds": r["n_folds"],
                           "folds": r.get("folds", []), "delta": r.get("delta_vs_scratch_mean"),
                           "delta_sd": r.get("delta_vs_scratch_sd")})
        out[Arm(method, recipe, transfer).label] = sorted(points, key=lambda p: p["epoch"])
    return out


def scratch_reference(agg: Sequence[Mapping], budget: int) -> dict | None:
    """Scratch's Dice at ``budget`` (mean, sd, folds), or None when it has no result."""
    r = next((r for r in agg if r["arm"] == "scratch" and r["budget"] == budget), None)
    if r is None or r.get("dice_mean_mean") is None:
        return None
    return {"mean": r["dice_mean_mean"], "sd": r.get("dice_mean_sd"), "n_folds": r["n_folds"], "folds": r["folds"]}


def pretraining_log(folder: str | os.PathLike) -> dict | None:
    """The per-epoch log of the pretraining in ``folder`` (its final checkpoint, else its latest; loaded with
    ``weights_only=True``), or None when neither is there."""
    from nnunetv2_macl.training.checkpoint import load_checkpoint

    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = Path(folder) / name
        if path.is_file():
            ckpt = load_checkpoint(str(path))
            return {"logging": ckpt["logging"], "epochs": ckpt["macl"]["epochs"], "file": str(path)}
    return None


def completed_epochs(logging: Mapping) -> list[int]:
    """The pretraining's log row i as "after E epochs", the numbering of ``--keep-epochs`` snapshots: the
    pretrainer logs each epoch under its 0-based index, so the row of snapshot E is the one logged as E - 1."""
    return [int(e) + 1 for e in logging.get("epoch") or []]


def _pct(v: float | None, sd: float | None = None, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    text = f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"
    return text + (f" ± {100 * sd:.2f}" if sd is not None and math.isfinite(sd) else "")


def length_table(points: Mapping[str, list[dict]], scratch: Mapping | None, log: Mapping | None, budget: int,
                 pretrain_epochs: int) -> str:
    """Markdown: one row per (start, pretraining epoch) with Dice, the difference to scratch and the
    pretraining's Lg / chance, Ld and LER at that epoch (from ``log``, when given)."""
    logging = (log or {}).get("logging") or {}
    epochs = completed_epochs(logging)

    def losses(epoch: int) -> list[str]:
        if epoch not in epochs:
            return ["–"] * 3
        i = epochs.index(epoch)
        chance = (logging.get("Lg_chance") or [None] * len(epochs))[i]
        lg = f"{logging['Lg'][i] / chance:.3f}" if chance else "–"
        return [lg, f"{logging['Ld'][i]:.3f}", f"{logging['LER'][i]:.4f}"]

    lines = [f"Dice against pretraining epochs at M = {budget} (a snapshot at epoch E of the {pretrain_epochs}-epoch "
             f"pretraining, not an E-epoch pretraining: its cosine learning rate had not decayed)", "",
             "| start | pretraining epoch | folds | Dice mean (%) | Δ vs scratch (pp) | Lg / chance | Ld | LER |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if scratch is not None:
        lines.append(f"| scratch | – | {scratch['n_folds']} | {_pct(scratch['mean'], scratch['sd'])} | (reference) "
                     f"| – | – | – |")
    for label, pts in points.items():
        for p in pts:
            lines.append(f"| {label} | {p['epoch']} | {p['n_folds']} | {_pct(p['mean'], p['sd'])} | "
                         f"{_pct(p['delta'], p['delta_sd'], signed=True)} | " + " | ".join(losses(p["epoch"])) + " |")
    return "\n".join(lines)


def plot_dice_vs_pretraining_epochs(points: Mapping[str, list[dict]], scratch: Mapping | None, log: Mapping | None,
                                    budget: int, pretrain_epochs: int, path: str | os.PathLike,
                                    title: str = "") -> Path:
    """Left: Dice (mean ± sd over folds) against the pretraining epoch of the start, scratch as a line with
    its fold spread as a band. Right: the pretraining's Lg / chance (chance = 1), Ld and LER per epoch
    (Ld and LER relative to epoch 1, log scale), the fine-tuned epochs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunetv2_macl.figures import LOSS_STYLES, save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    marked = sorted({p["epoch"] for pts in points.values() for p in pts})
    for label, pts in points.items():
        if pts:
            left.errorbar([p["epoch"] for p in pts], [100 * p["mean"] for p in pts],
                          yerr=[100 * (p["sd"] or 0.0) for p in pts], marker="o", capsize=3,
                          label=f"{label}; folds {'/'.join(str(p['n_folds']) for p in pts)}")
    if scratch is not None:
        m, sd = 100 * scratch["mean"], 100 * (scratch["sd"] or 0.0)
        left.axhline(m, color="k", lw=1.2, label=f"scratch ({scratch['n_folds']} folds)")
        if sd:
            left.axhspan(m - sd, m + sd, color="k", alpha=0.1)
    left.set_xlabel(f"pretraining epoch of the start (snapshots of one {pretrain_epochs}-epoch run)")
    left.set_ylabel(f"validation Dice at M = {budget}, foreground mean (%)")
    if marked:
        left.set_xticks(marked)
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=7)
    logging = (log or {}).get("logging") or {}
    if logging.get("epoch"):
        ep = completed_epochs(logging)
        chance = logging.get("Lg_chance") or []
        if len(chance) == len(ep) and all(c for c in chance):
            colour, width = LOSS_STYLES["Lg"]
            right.plot(ep, [lg / c for lg, c in zip(logging["Lg"], chance)], color=colour, lw=width, label="Lg / chance")
            right.axhline(1.0, color=colour, ls="--", lw=1, label="chance (equal embeddings)")
        for key in ("Ld", "LER"):
            first = logging[key][0]
            if first and math.isfinite(first):
                colour, width = LOSS_STYLES[key]
                right.plot(ep, [v / first for v in logging[key]], color=colour, lw=width, label=f"{key} / epoch 1")
        for e in marked:
            right.axvline(e, color="0.6", ls=":", lw=1)
        right.set_yscale("log")
        right.set_xlabel("pretraining epoch")
        right.set_ylabel("loss (relative)")
        right.grid(alpha=0.3, which="both")
        right.legend(fontsize=7)
    else:
        right.set_axis_off()
        right.text(0.5, 0.5, "no pretraining log", ha="center", va="center")
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the title
    return save_figure(fig, path, title or f"Pretraining length, M = {budget}")
