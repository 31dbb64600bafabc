"""Validation slices as the paper's Fig. 3: image, reference and each arm's prediction."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np


def _read_volume(path: Path, transpose_forward: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """A NIfTI volume in nnU-Net's (SimpleITK) axis order, then nnU-Net's transpose_forward: axis 0 is
    the axis the 2d configuration slices. nibabel only (the GPU kit has no SimpleITK)."""
    import nibabel

    arr = np.asanyarray(nibabel.load(str(path)).dataobj)
    arr = np.transpose(arr, tuple(range(arr.ndim))[::-1])  # nibabel (x, y, z) -> (z, y, x)
    return np.transpose(arr, tuple(transpose_forward))


def overlay_figure(ds: dict, plan: dict, rows: list[dict], folders: dict, budget: int, path: Path,
                   n_cases: int = 3, fold: int = 0) -> Path | None:
    """Image, reference and each arm's validation prediction on one slice of ``n_cases`` validation
    cases of ``fold`` at budget M (the slice with the most reference foreground); per-case Dice in the
    titles. ``folders``: ``{(arm label, split index): run folder}`` of the runs in the table. Returns
    ``None`` when no arm has predictions for that (M, fold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rec = next((r for r in plan["index"] if r["budget"] == budget and r["fold"] == fold), None)
    if rec is None:
        return None
    ending = ds["dataset_json"].get("file_ending", ".nii.gz")
    runs = {label: folders[(label, rec["index"])] for label, _ in folders if (label, rec["index"]) in folders}
    have = [label for label, folder in runs.items() if (folder / "validation" / f"{rec['val'][0]}{ending}").is_file()]
    if not have:
        return None
    val = rec["val"]
    picks = [val[int(i)] for i in np.unique(np.linspace(0, len(val) - 1, min(n_cases, len(val))).round())]
    per_case = {r["label"]: r["per_case"] for r in rows if r["index"] == rec["index"]}
    tf = ds["plans"].get("transpose_forward", [0, 1, 2])
    n_labels = max(int(v) for v in ds["dataset_json"]["labels"].values() if isinstance(v, (int, float)))
    colours = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33"]
    cmap = ListedColormap([(0, 0, 0, 0)] + [colours[i % len(colours)] for i in range(n_labels)])
    ncol = 2 + len(have)
    fig, axes = plt.subplots(len(picks), ncol, figsize=(2.1 * ncol, 2.2 * len(picks)), dpi=110, squeeze=False)
    for row, case in enumerate(picks):
        image = _read_volume(ds["raw"] / "imagesTr" / f"{case}_0000{ending}", tf).astype(np.float32)
        ref = _read_volume(ds["raw"] / "labelsTr" / f"{case}{ending}", tf).round().astype(np.int16)
        z = int(np.argmax((ref > 0).reshape(ref.shape[0], -1).sum(1)))
        lo, hi = np.percentile(image[z], (1, 99))
        panels = [("image", None), ("reference", ref[z])]
        for m in have:
            pred = _read_volume(runs[m] / "validation" / f"{case}{ending}", tf)
            d = per_case.get(m, {}).get(f"{case}{ending}")
            label = m + ("" if d is None or math.isnan(d) else f" ({100 * d:.1f})")
            panels.append((label, pred[z].round().astype(np.int16)))
        for col, (title, seg) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            if seg is not None:
                ax.imshow(np.ma.masked_equal(seg, 0), cmap=cmap, vmin=0, vmax=n_labels, alpha=0.55,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if row == 0 or col >= 2 else "", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{case}\nslice {z}", fontsize=7)
    fig.suptitle(f"Validation slices, M={budget}, fold {fold} (case Dice % in brackets)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
