"""Embedded synthetic dataset: a tiny nnU-Net v2 raw dataset that needs no download.

Each case is a 3D volume with two ellipsoid "organs" whose centre, radii and in-plane orientation
drift smoothly along axis 0, so a 2D slice looks different depending on where it lies in the
volume (the slice position carries information, as MACL assumes for real scans). Each organ has
its own intensity per case; a smooth multiplicative bias field, gaussian noise and a per-case
global intensity scale (spanning two orders of magnitude) make the intensities behave like
uncalibrated MRI, so per-case normalisation (nnU-Net's z-score for "MRI" channels) is needed.

Usage::

    path = make_synthetic_dataset(os.environ["nnUNet_raw"], dataset_id=990)
    plan_and_preprocess(990, configurations=("2d",))

Everything is deterministic given ``seed``: case ``i`` draws from ``np.random.default_rng([seed, i])``,
so the first cases do not change when ``num_cases`` grows.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

LABELS = {"background": 0, "organ_a": 1, "organ_b": 2}


def _case_id(i: int) -> str:
    return f"synth_{i:03d}"


def _organ_mask(zn: np.ndarray, yn: np.ndarray, xn: np.ndarray, rng: np.random.Generator,
                side: float) -> np.ndarray:
    """Boolean mask of one ellipsoid-like organ on normalised coordinates in [-1, 1].

    The organ spans a random interval of axis 0; its in-plane centre follows a quadratic path,
    its in-plane radii and rotation angle change linearly/sinusoidally with the slice position.
    ``side`` (-1 or +1) puts the organ in the left or right half so the two rarely overlap.
    """
    cz = rng.uniform(-0.3, 0.3)
    rz = rng.uniform(0.5, 0.8)
    cy0 = rng.uniform(-0.25, 0.25)
    cx0 = side * rng.uniform(0.3, 0.5)
    cy1, cy2 = rng.uniform(-0.2, 0.2, size=2)
    cx1 = rng.uniform(-0.15, 0.15)
    ry0 = rng.uniform(0.22, 0.36)
    rx0 = rng.uniform(0.15, 0.26)
    amp_r = rng.uniform(0.1, 0.4)
    theta0 = rng.uniform(0, np.pi)
    theta1 = rng.uniform(-0.8, 0.8)

    t = (zn - cz) / rz  # position along the organ's own axis, [-1, 1] inside
    cy = cy0 + cy1 * zn + cy2 * zn ** 2
    cx = cx0 + cx1 * zn
    # radii shrink towards the poles (ellipsoid) and breathe along axis 0
    profile = np.sqrt(np.clip(1.0 - t ** 2, 0.0, None))
    breathe = 1.0 + amp_r * np.sin(np.pi * zn)
    ry = ry0 * breathe * profile + 1e-6
    rx = rx0 * breathe * profile + 1e-6
    theta = theta0 + theta1 * zn
    dy, dx = yn - cy, xn - cx
    u = np.cos(theta) * dy + np.sin(theta) * dx
    v = -np.sin(theta) * dy + np.cos(theta) * dx
    return ((u / ry) ** 2 + (v / rx) ** 2 <= 1.0) & (np.abs(t) < 1.0)


def _bias_field(zn: np.ndarray, yn: np.ndarray, xn: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field exp(sum of a few low-frequency cosines), roughly 0.7-1.4."""
    log_field = np.zeros(np.broadcast_shapes(zn.shape, yn.shape, xn.shape), dtype=np.float64)
    for _ in range(3):
        fz, fy, fx = rng.uniform(0.2, 1.0, size=3)
        pz, py, px = rng.uniform(0, 2 * np.pi, size=3)
        log_field += rng.uniform(0.05, 0.12) * np.cos(np.pi * fz * zn + pz) * np.cos(np.pi * fy * yn + py) \
            * np.cos(np.pi * fx * xn + px)
    return np.exp(log_field)


def synthesize_case(seed: int, index: int, shape: Sequence[int] = (24, 48, 48),
                    num_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image float32 [C, Z, Y, X], label uint8 [Z, Y, X])`` for case ``index``."""
    rng = np.random.default_rng([int(seed), int(index)])
    z, y, x = (int(s) for s in shape)
    zn = np.linspace(-1, 1, z)[:, None, None]
    yn = np.linspace(-1, 1, y)[None, :, None]
    xn = np.linspace(-1, 1, x)[None, None, :]

    side = 1.0 if rng.random() < 0.5 else -1.0
    mask_a = _organ_mask(zn, yn, xn, rng, side)
    mask_b = _organ_mask(zn, yn, xn, rng, -side)
    label = np.zeros((z, y, x), dtype=np.uint8)
    label[mask_a] = LABELS["organ_a"]
    label[mask_b] = LABELS["organ_b"]  # organ_b wins where they touch

    # a soft body outline so the background is not flat
    body = ((yn / 0.95) ** 2 + (xn / 0.95) ** 2 <= 1.0) * np.ones_like(zn)
    global_scale = float(np.exp(rng.uniform(np.log(50.0), np.log(5000.0))))
    images = np.empty((num_channels, z, y, x), dtype=np.float32)
    for c in range(num_channels):
        tissue = rng.uniform(0.25, 0.45)
        int_a = rng.uniform(0.55, 0.85)
        int_b = rng.uniform(0.9, 1.3)
        vol = 0.02 + tissue * body
        vol = np.where(label == 1, int_a, vol)
        vol = np.where(label == 2, int_b, vol)
        vol = vol * _bias_field(zn, yn, xn, rng)
        vol = vol + rng.normal(0.0, rng.uniform(0.02, 0.06), size=vol.shape)
        channel_scale = global_scale * rng.uniform(0.7, 1.3)
        images[c] = np.clip(vol, 0.0, None) * channel_scale
    return images, label


def _channel_names(num_channels: int) -> dict:
    return {str(c): ("MRI" if c == 0 else f"MRI{c}") for c in range(num_channels)}


def make_synthetic_dataset(raw_root: str, dataset_id: int = 990, name: str = "MACLSynthetic",
                           num_cases: int = 12, shape: tuple[int, int, int] = (24, 48, 48),
                           num_channels: int = 1, with_labels: bool = True, seed: int = 0,
                           spacing=(1.0, 1.0, 1.0), file_ending=".nii.gz") -> str:
    """Write ``raw_root/DatasetXXX_Name/`` in nnU-Net v2 raw layout and return that folder.

    ``shape`` and ``spacing`` are in numpy axis order (axis 0 first); SimpleITK receives the
    spacing reversed (x, y, z) as usual. Images go to ``imagesTr/<case>_<CCCC><file_ending>``
    (float32), labels to ``labelsTr/<case><file_ending>`` (uint8, values 0/1/2). With
    ``with_labels=False`` no ``labelsTr`` is written (an unlabeled pool; nnU-Net cannot plan it).
    An existing folder of the same name is overwritten file by file.
    """
    import SimpleITK as sitk

    if len(shape) != 3:
        raise ValueError(f"shape must be 3D (z, y, x), got {shape}")
    folder = os.path.join(str(raw_root), f"Dataset{int(dataset_id):03d}_{name}")
    images_dir = os.path.join(folder, "imagesTr")
    labels_dir = os.path.join(folder, "labelsTr")
    os.makedirs(images_dir, exist_ok=True)
    if with_labels:
        os.makedirs(labels_dir, exist_ok=True)
    itk_spacing = tuple(float(s) for s in reversed(tuple(spacing)))

    def _write(arr: np.ndarray, path: str) -> None:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(itk_spacing)
        sitk.WriteImage(img, path, True)

    for i in range(int(num_cases)):
        images, label = synthesize_case(seed, i, shape, num_channels)
        case = _case_id(i)
        for c in range(num_channels):
            _write(images[c], os.path.join(images_dir, f"{case}_{c:04d}{file_ending}"))
        if with_labels:
            _write(label, os.path.join(labels_dir, f"{case}{file_ending}"))

    dataset_json = {
        "name": name,
        "description": "MACL embedded synthetic dataset (nnunetv2_macl.demo.synthetic)",
        "channel_names": _channel_names(num_channels),
        "labels": dict(LABELS),
        "numTraining": int(num_cases),
        "file_ending": file_ending,
        "synthetic": {"seed": int(seed), "shape": [int(s) for s in shape],
                      "spacing": [float(s) for s in spacing]},
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder


def plan_and_preprocess(dataset_id: int, configurations=("2d",), num_processes: int = 2,
                        verify: bool = False) -> None:
    """Fingerprint, plan (default ``ExperimentPlanner`` -> ``nnUNetPlans``) and preprocess.

    Uses nnU-Net's python API with the environment's ``nnUNet_raw`` / ``nnUNet_preprocessed``.
    Configurations missing from the plans (e.g. ``3d_lowres`` for small images) are skipped by
    nnU-Net with an INFO line. Must be called under an ``if __name__ == "__main__":`` guard in
    scripts (nnU-Net uses spawned worker processes).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)

    configurations = tuple(configurations)
    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=verify,
                         clean=True, verbose=False, show_progress_bar=False)
    plans_identifier = plan_experiments([dataset_id])
    preprocess([dataset_id], plans_identifier=plans_identifier, configurations=configurations,
               num_processes=(num_processes,) * len(configurations), verbose=False,
               show_progress_bar=False)
