"""nnunetv2_macl.figures: the segmentation panels and the pretraining-loss panel (fast, no training)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunetv2_macl import figures
from nnunetv2_macl.figures import (CLASS_COLOURS, label_colour, lg_chance, plot_losses_and_panels,
                                   plot_pretraining_losses, plot_segmentation_panels, slice_row)


def _png_pixels(path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(str(path))


def _rows(shapes, n_classes, methods, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for shape in shapes:
        ref = np.zeros(shape, dtype=np.int16)
        for k in range(1, n_classes + 1):  # one block per class
            ref[(k - 1) * 2:(k - 1) * 2 + 2, :] = k
        rows.append({"image": rng.normal(size=shape).astype(np.float32), "reference": ref,
                     "predictions": {m: np.roll(ref, i + 1, axis=0) for i, m in enumerate(methods)},
                     "caption": f"case {shape}", "scores": {methods[0]: 0.5}})
    return rows


def test_lg_chance_is_log_2b_minus_1():
    assert lg_chance(16) == pytest.approx(math.log(31))
    assert lg_chance(8, num_processes=2) == pytest.approx(math.log(31))
    with pytest.raises(ValueError):
        lg_chance(0)


def test_fixed_colour_per_class():
    assert label_colour(1) == CLASS_COLOURS[0] and label_colour(2) == CLASS_COLOURS[1]
    assert label_colour(len(CLASS_COLOURS) + 1) == CLASS_COLOURS[0]
    from matplotlib.colors import to_rgba

    seg = np.array([[0, 1], [2, 7]])
    rgba = figures._label_rgba(seg)
    assert rgba[0, 0, 3] == 0  # background transparent
    for (y, x), k in {(0, 1): 1, (1, 0): 2, (1, 1): 7}.items():
        np.testing.assert_allclose(rgba[y, x, :3], to_rgba(label_colour(k))[:3], atol=1e-6)
        assert rgba[y, x, 3] == pytest.approx(figures.OVERLAY_ALPHA)


@pytest.mark.parametrize("methods,n_classes", [(["MACL", "scratch"], 2), (["scratch", "MACL", "PCL", "SimCLR"], 5)])
def test_segmentation_panels_any_methods_classes_and_sizes(tmp_path, methods, n_classes):
    rows = _rows([(24, 40), (32, 32), (17, 51)], n_classes, methods)
    out = plot_segmentation_panels(rows, methods, tmp_path / "sub" / "panels.png", title="t",
                                   label_names={1: "organ_a"})
    pixels = _png_pixels(out)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 100 * (2 + len(methods))
    assert not list(tmp_path.glob("sub/*.tmp.png"))
    # every class colour appears somewhere (overlay over a grey image keeps the hue)
    for k in range(1, n_classes + 1):
        from matplotlib.colors import to_rgb

        r, g, b = to_rgb(label_colour(k))
        grey = np.linspace(0, 1, 11)[:, None]
        blends = (1 - figures.OVERLAY_ALPHA) * grey + figures.OVERLAY_ALPHA * np.array([[r, g, b]])
        dist = np.abs(pixels[..., None, :3] - blends[None, None]).max(-1).min(-1)
        assert (dist < 0.06).sum() > 20, f"colour of class {k} not found"


def test_long_method_names_wrap_instead_of_running_into_the_next_panel(tmp_path):
    """The Heart overlay's four arms: titles such as "MACL (rescale, paper transfer) (74.7)" are wider than a panel
    at font size 8; they wrap onto whole-word lines that fit, the score stays, and the panels get taller."""
    methods = ["scratch", "MACL (stock, encoder only)", "MACL (rescale, paper transfer)", "MACL (rescale, encoder only)"]
    rows = _rows([(24, 40), (32, 32)], 1, methods)
    for row in rows:
        row["scores"] = {m: 0.7 + 0.01 * i for i, m in enumerate(methods)}
    title = figures.panel_title(methods[2], 0.747)
    assert title == "MACL (rescale, paper\ntransfer) (74.7)"
    assert figures.panel_title("scratch", 0.704) == "scratch (70.4)" and figures.panel_title("A", None) == "A"
    assert figures.panel_title("x" * 30, float("nan")) == "x" * 30  # a long word stays whole, no score
    assert figures.title_lines(rows, methods) == 2 and figures.title_lines(rows, methods[:1]) == 1
    assert figures.panel_rows_height(rows, methods[:1]) == pytest.approx(2 * 2.0)
    assert figures.panel_rows_height(rows, methods) == pytest.approx(2 * 2.15)  # room for the second title line

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1.9 * 6 + 1.2, figures.panel_rows_height(rows, methods)), dpi=110)
    axes = figures.draw_segmentation_panels(fig, fig.add_gridspec(1, 1)[0], rows, methods)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for r in range(len(rows)):
        boxes = [axes[r, c].title.get_window_extent(renderer) for c in range(2, 6)]
        assert all(b.x1 <= n.x0 for b, n in zip(boxes, boxes[1:])), [(b.x0, b.x1) for b in boxes]
        assert axes[r, 4].get_title() == "MACL (rescale, paper\ntransfer) (" + f"{100 * rows[r]['scores'][methods[2]]:.1f})"
    plt.close(fig)
    out = plot_segmentation_panels(rows, methods, tmp_path / "wrapped.png", title="t")
    assert _png_pixels(out).shape[0] > 2 * 200


def test_segmentation_panels_refuse_bad_rows(tmp_path):
    rows = _rows([(16, 16)], 2, ["A"])
    with pytest.raises(ValueError, match="no prediction for"):
        plot_segmentation_panels(rows, ["A", "B"], tmp_path / "x.png")
    rows[0]["predictions"]["A"] = np.zeros((8, 16))
    with pytest.raises(ValueError, match="shape"):
        plot_segmentation_panels(rows, ["A"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rows"):
        plot_segmentation_panels([], ["A"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_pretraining_losses_with_chance_line():
    plt = figures._pyplot()
    logging = {"epoch": [0, 1, 2], "Lg": [3.6, 3.2, 3.0], "Ld": [3.0, 2.5, 2.0], "LER": [0.4, 0.3, 0.2],
               "total": [5.1, 4.5, 4.0], "lr": [0.1, 0.05, 0.0]}
    fig, ax = plt.subplots()
    plot_pretraining_losses(ax, logging, lg_chance(16))
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert {"total", "Lg", "Ld", "LER"} <= set(lines)
    chance = [ln for name, ln in lines.items() if name.startswith("Lg at chance")]
    assert len(chance) == 1 and np.allclose(chance[0].get_ydata(), math.log(31))
    np.testing.assert_allclose(lines["Lg"].get_xdata(), [1, 2, 3])
    # a per-epoch chance (the pretrainer's "Lg_chance") and a one-epoch log
    fig2, ax2 = plt.subplots()
    plot_pretraining_losses(ax2, {"epoch": [0], "Lg": [3.4]}, [3.43])
    assert [ln.get_label() for ln in ax2.get_lines()][-1].startswith("Lg at chance")
    with pytest.raises(ValueError, match="values for 3 epochs"):
        plot_pretraining_losses(ax, logging, [1.0, 2.0])
    with pytest.raises(ValueError, match="no epochs"):
        plot_pretraining_losses(ax, {"epoch": []}, None)
    plt.close("all")


def test_slice_row_reads_nnunet_files_and_picks_the_fullest_slice(tmp_path):
    import SimpleITK as sitk  # a required dependency (setup.py): fail, not skip, without it
    image = np.random.default_rng(0).normal(size=(6, 12, 10)).astype(np.float32)
    ref = np.zeros((6, 12, 10), np.uint8)
    ref[2, 2:5, 2:5] = 1
    ref[4, 1:9, 1:9] = 2  # the fullest slice: 4
    pred = np.roll(ref, 1, axis=2)
    for arr, name in ((image, "c_0000.nii.gz"), (ref, "ref.nii.gz"), (pred, "pred.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / name))
    dataset_json = {"file_ending": ".nii.gz", "channel_names": {"0": "MRI"},
                    "labels": {"background": 0, "a": 1, "b": 2}}
    row = slice_row(tmp_path / "c_0000.nii.gz", tmp_path / "ref.nii.gz", {"M": tmp_path / "pred.nii.gz"},
                    dataset_json, caption="c", scores={"M": 0.8})
    np.testing.assert_allclose(row["image"], image[4], rtol=1e-6)
    np.testing.assert_array_equal(row["reference"], ref[4])
    np.testing.assert_array_equal(row["predictions"]["M"], pred[4])
    assert row["caption"] == "c\nslice 4"
    # transpose_forward: axis 0 becomes the former last axis
    row_t = slice_row(tmp_path / "c_0000.nii.gz", tmp_path / "ref.nii.gz", {"M": tmp_path / "pred.nii.gz"},
                      dataset_json, transpose_forward=(2, 0, 1))
    assert row_t["image"].shape == (6, 12)
    out = plot_losses_and_panels({"epoch": [0, 1], "Lg": [3.5, 3.4], "total": [4, 3.9]}, 3.0, [row, row], ["M"],
                                 tmp_path / "both.png", title="demo")
    assert _png_pixels(out).shape[0] > 300
