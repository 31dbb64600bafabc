"""The project's figures, one implementation each (used by ``macl_demo`` and the few-label benchmark).

- :func:`plot_segmentation_panels`: rows of 2-D slices; columns image, reference, then one column per
  method's prediction, each label drawn over the image in a fixed colour per class (the paper's Fig. 3).
- :func:`plot_pretraining_losses`: the pretraining loss components per epoch on a given axes, with the
  chance level of Lg.
- :func:`plot_losses_and_panels`: both in one figure (``demo_output/demo.png``).
- :func:`slice_row`: one panel row read from nnU-Net files (image, reference and predictions of one case)
  with nnU-Net's own reader, on the slice with the most reference foreground.

A row is a dict ``{"image": 2-D array, "reference": 2-D int array, "predictions": {method: 2-D int array},
"caption": optional str, "scores": optional {method: float}}``; the arrays of a row share one shape, rows may
differ in shape. Label 0 is background (not drawn); label k >= 1 has colour ``CLASS_COLOURS[(k - 1) % 10]``
in every panel and every figure.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# label k >= 1 -> CLASS_COLOURS[(k - 1) % len]: matplotlib's tab10, clearly apart on a grey image
CLASS_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22",
                 "#8c564b", "#7f7f7f")
LOSS_STYLES = {"total": ("k", 2.5), "Lg": ("#1f77b4", 1.8), "Ld": ("#d62728", 1.8), "LER": ("#2ca02c", 1.8)}
OVERLAY_ALPHA = 0.55
PANEL_TITLE_CHARS = 24  # what a 1.9-inch panel holds at font size 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def lg_chance(batch_size: int, num_processes: int = 1) -> float:
    """Lg when all embeddings are equal: every anchor's softmax over its 2B - 1 others is uniform, so each
    positive contributes -log(1 / (2B - 1)); B = batch size x number of processes (the negatives)."""
    from nnunetv2_macl.training.diagnostics import contrastive_chance

    b = int(batch_size) * int(num_processes)
    if b < 1:
        raise ValueError(f"batch size x processes must be >= 1, got {b}")
    return contrastive_chance(2 * b)


def label_colour(label: int) -> str:
    """The fixed colour of label ``label`` (>= 1)."""
    return CLASS_COLOURS[(int(label) - 1) % len(CLASS_COLOURS)]


def _label_rgba(seg: np.ndarray) -> np.ndarray:
    """(H, W, 4) image: each label > 0 in its colour at OVERLAY_ALPHA, background transparent."""
    from matplotlib.colors import to_rgba

    seg = np.asarray(seg)
    rgba = np.zeros(seg.shape + (4,), dtype=np.float32)
    for k in np.unique(seg):
        if k <= 0:
            continue
        rgba[seg == k] = (*to_rgba(label_colour(int(k)))[:3], OVERLAY_ALPHA)
    return rgba


def _check_rows(rows: Sequence[Mapping], method_names: Sequence[str]) -> None:
    if not rows:
        raise ValueError("no rows to plot")
    for i, row in enumerate(rows):
        image, ref = np.asarray(row["image"]), np.asarray(row["reference"])
        if image.ndim != 2:
            raise ValueError(f"row {i}: image must be 2-D, got shape {image.shape}")
        missing = [m for m in method_names if m not in row.get("predictions", {})]
        if missing:
            raise ValueError(f"row {i}: no prediction for {missing}")
        for name, arr in [("reference", ref)] + [(m, np.asarray(row["predictions"][m])) for m in method_names]:
            if arr.shape != image.shape:
                raise ValueError(f"row {i}: {name} has shape {arr.shape}, the image {image.shape}")


def panel_title(name: str, score: float | None = None) -> str:
    """``name (score %)`` on lines of at most ``PANEL_TITLE_CHARS`` characters (whole words), so that the titles of
    neighbouring panels never run into each other ("MACL (rescale, paper transfer) (74.7)" takes two lines)."""
    text = name if score is None or not math.isfinite(score) else f"{name} ({100 * score:.1f})"
    return textwrap.fill(text, PANEL_TITLE_CHARS, break_long_words=False, break_on_hyphens=False)


def title_lines(rows: Sequence[Mapping], method_names: Sequence[str]) -> int:
    """The most lines any prediction panel's title takes (:func:`panel_title`), at least 1."""
    return max([1] + [panel_title(m, (row.get("scores") or {}).get(m)).count("\n") + 1
                      for row in rows for m in method_names])


def panel_rows_height(rows: Sequence[Mapping], method_names: Sequence[str]) -> float:
    """Inches for the panel rows: 2.0 a row, plus room for each title line beyond the first."""
    return (2.0 + 0.15 * (title_lines(rows, method_names) - 1)) * len(rows)


def draw_segmentation_panels(fig, area, rows: Sequence[Mapping], method_names: Sequence[str],
                             label_names: Mapping[int, str] | None = None) -> np.ndarray:
    """Draw the panel grid into ``area`` (a matplotlib SubplotSpec of ``fig``); returns the axes
    (rows x (2 + methods)). The image is shown between its 1st and 99th percentile."""
    _check_rows(rows, method_names)
    ncol = 2 + len(method_names)
    titled_rows = any(row.get("scores") for row in rows)  # every row then has titles (the scores)
    lines = title_lines(rows, method_names)
    grid = area.subgridspec(len(rows), ncol, wspace=0.04,
                            hspace=(0.3 + 0.15 * (lines - 1)) if titled_rows else 0.08)
    axes = np.empty((len(rows), ncol), dtype=object)
    labels_seen: set[int] = set()
    for r, row in enumerate(rows):
        image = np.asarray(row["image"], dtype=np.float32)
        lo, hi = np.percentile(image, (1, 99)) if image.size else (0.0, 1.0)
        scores = row.get("scores") or {}
        panels = [("image", None), ("reference", row["reference"])]
        for m in method_names:
            panels.append((panel_title(m, scores.get(m)), row["predictions"][m]))
        for c, (title, seg) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            axes[r, c] = ax
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            if seg is not None:
                seg = np.asarray(seg).round().astype(np.int64)
                labels_seen.update(int(k) for k in np.unique(seg) if k > 0)
                ax.imshow(_label_rgba(seg), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or (c >= 2 and scores):
                ax.set_title(title, fontsize=8)
            if c == 0 and row.get("caption"):
                ax.set_ylabel(str(row["caption"]), fontsize=7)
    if labels_seen:
        from matplotlib.patches import Patch

        names = dict(label_names or {})
        handles = [Patch(color=label_colour(k), label=names.get(k, f"label {k}")) for k in sorted(labels_seen)]
        axes[0, -1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    return axes


def save_figure(fig, path: str | os.PathLike, title: str | None = None) -> Path:
    """Add the title, write atomically (a reader never sees half a PNG) and close the figure."""
    try:
        if title:
            fig.suptitle(title, fontsize=10)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, bbox_inches="tight")
        os.replace(tmp, path)
        return path
    finally:
        _pyplot().close(fig)


def plot_segmentation_panels(rows: Sequence[Mapping], method_names: Sequence[str], path: str | os.PathLike,
                             title: str | None = None, label_names: Mapping[int, str] | None = None) -> Path:
    """Rows of slices: image, reference and each method's prediction (label overlays in fixed class colours).

    ``rows``: see the module doc; ``method_names``: the prediction columns, in this order (any number);
    ``label_names``: ``{label: name}`` for the legend; ``scores`` in a row are shown in brackets as %.
    Writes ``path`` (PNG) and returns it."""
    _check_rows(rows, method_names)  # before a figure exists
    plt = _pyplot()
    ncol = 2 + len(method_names)
    extra = 0.15 * (title_lines(rows, method_names) - 1)  # the first row's wrapped titles stay below the title
    height = panel_rows_height(rows, method_names) + (0.4 if title else 0.1) + extra
    fig = plt.figure(figsize=(1.9 * ncol + 1.2, height), dpi=110)
    draw_segmentation_panels(fig, fig.add_gridspec(1, 1, top=(0.93 if title else 0.98) - extra / height)[0], rows,
                             method_names, label_names)
    return save_figure(fig, path, title)


def plot_pretraining_losses(ax, logging: Mapping[str, Sequence[float]],
                            chance: float | Sequence[float] | None = None) -> None:
    """Lg, Ld, LER and the total per epoch (the pretrainer's ``logging`` dict: ``epoch`` 0-based and one value
    per epoch for each loss; absent components are skipped), and Lg's chance level as a dashed line
    (a number, one value per epoch, or ``None`` for none): Lg at that line means the image-level
    embeddings do not tell slices apart."""
    epochs = [int(e) + 1 for e in logging.get("epoch", [])]
    if not epochs:
        raise ValueError("the pretraining log has no epochs")
    marker = "o" if len(epochs) <= 20 else None
    for key, (colour, width) in LOSS_STYLES.items():
        values = logging.get(key)
        if values is None or len(values) == 0:
            continue
        if len(values) != len(epochs):
            raise ValueError(f"logging[{key!r}] has {len(values)} values for {len(epochs)} epochs")
        ax.plot(epochs, values, color=colour, linewidth=width, marker=marker, markersize=3, label=key)
    if chance is not None:
        levels = [float(chance)] * len(epochs) if np.isscalar(chance) else [float(c) for c in chance]
        if len(levels) != len(epochs):
            raise ValueError(f"chance has {len(levels)} values for {len(epochs)} epochs")
        xs = epochs if len(epochs) > 1 else [epochs[0] - 0.5, epochs[0] + 0.5]
        ys = levels if len(epochs) > 1 else levels * 2
        # on top and in grey: a stuck Lg lies exactly on it
        ax.plot(xs, ys, color="0.35", linestyle=(0, (4, 3)), linewidth=1.4, zorder=5,
                label=f"Lg at chance, log(2B-1) = {levels[-1]:.2f}")
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("loss")
    if len(epochs) <= 20:
        ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def plot_losses_and_panels(logging: Mapping[str, Sequence[float]], chance: float | Sequence[float] | None,
                           rows: Sequence[Mapping], method_names: Sequence[str], path: str | os.PathLike,
                           title: str | None = None, losses_title: str = "MACL pretraining",
                           label_names: Mapping[int, str] | None = None) -> Path:
    """The pretraining losses (top) above the segmentation panels (below); writes ``path``."""
    _check_rows(rows, method_names)  # before a figure exists
    plt = _pyplot()
    ncol = 2 + len(method_names)
    width = 1.9 * ncol + 1.2
    loss_height, panels_height = 2.6, panel_rows_height(rows, method_names)
    fig = plt.figure(figsize=(width, loss_height + panels_height + 0.6), dpi=110)
    outer = fig.add_gridspec(2, 1, height_ratios=[loss_height, panels_height], hspace=0.2, top=0.92)
    top = outer[0].subgridspec(1, 3, width_ratios=[0.08, 0.62, 0.30])
    ax = fig.add_subplot(top[0, 1])
    plot_pretraining_losses(ax, logging, chance)
    ax.set_title(losses_title, fontsize=9)
    draw_segmentation_panels(fig, outer[1], rows, method_names, label_names)
    return save_figure(fig, path, title)


def slice_row(image_file: str | os.PathLike, reference_file: str | os.PathLike,
              prediction_files: Mapping[str, str | os.PathLike], dataset_json: Mapping,
              transpose_forward: Sequence[int] = (0, 1, 2), caption: str | None = None,
              scores: Mapping[str, float] | None = None) -> dict:
    """One panel row from nnU-Net files of one case: channel 0 of ``image_file``, the reference and each
    method's prediction (all read with the reader nnU-Net uses for this dataset), transposed with the plans'
    ``transpose_forward`` so that axis 0 is the axis nnU-Net's 2d configuration slices; the slice with the
    most reference foreground (the middle one if there is none). The caption gets " slice z" appended."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints which reader it picked
        reader = determine_reader_writer_from_dataset_json(dict(dataset_json), str(image_file))()
    tf = tuple(int(a) for a in transpose_forward)
    image = np.transpose(reader.read_images([str(image_file)])[0][0], tf)
    reference = np.transpose(reader.read_seg(str(reference_file))[0][0], tf)
    predictions = {}
    for name, f in prediction_files.items():
        pred = np.transpose(reader.read_seg(str(f))[0][0], tf)
        if pred.shape != reference.shape:
            raise ValueError(f"{f}: shape {pred.shape} differs from the reference {reference.shape}")
        predictions[name] = pred
    foreground = (reference > 0).reshape(reference.shape[0], -1).sum(1)
    z = int(np.argmax(foreground)) if foreground.any() else reference.shape[0] // 2
    label = f"{caption}\nslice {z}" if caption else f"slice {z}"
    return {"image": image[z], "reference": reference[z].round().astype(np.int16),
            "predictions": {k: v[z].round().astype(np.int16) for k, v in predictions.items()},
            "caption": label, "scores": dict(scores or {})}
