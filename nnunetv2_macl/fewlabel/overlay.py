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
    from nnunetv2_macl.figures import plot_segmentation_panels

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
    panel_rows = []
    for case in picks:
        image = _read_volume(ds["raw"] / "imagesTr" / f"{case}_0000{ending}", tf).astype(np.float32)
        ref = _read_volume(ds["raw"] / "labelsTr" / f"{case}{ending}", tf).round().astype(np.int16)
        z = int(np.argmax((ref > 0).reshape(ref.shape[0], -1).sum(1)))
        predictions, scores = {}, {}
        for m in have:
            predictions[m] = _read_volume(runs[m] / "validation" / f"{case}{ending}", tf)[z].round().astype(np.int16)
            d = per_case.get(m, {}).get(f"{case}{ending}")
            if d is not None and not math.isnan(d):
                scores[m] = d
        panel_rows.append({"image": image[z], "reference": ref[z], "predictions": predictions,
                           "caption": f"{case}\nslice {z}", "scores": scores})
    label_names = {int(v): k for k, v in ds["dataset_json"]["labels"].items() if isinstance(v, (int, float)) and v > 0}
    return plot_segmentation_panels(panel_rows, have, path, label_names=label_names,
                                    title=f"Validation slices, M={budget}, fold {fold} (case Dice % in brackets)")
