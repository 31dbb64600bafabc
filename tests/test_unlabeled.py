"""macl_prepare_unlabeled: unlabeled NIfTI / NRRD / DICOM scans -> nnU-Net raw dataset with a body
(CT) or foreground (MRI) mask, accepted by nnU-Net's planning/preprocessing and by macl_pretrain."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # a required dependency (setup.py): missing, this module must fail, not skip

from nnunetv2_macl.data.prepare_unlabeled import (  # noqa: E402
    UnlabeledDataError, find_image_sources, prepare_unlabeled_dataset)

SPACING = (0.9, 0.9, 2.5)  # ITK order (x, y, z)


# ------------------------------------------------------------------------------------------ synthetic scans
def ct_like(seed: int, shape=(10, 48, 48)):
    """int16 HU volume (numpy z, y, x): air -1000, body 0-50 HU elliptic cylinder with two lungs
    (-850, enclosed in-plane) and a spine (700), and a separate table (100 HU) below the body.
    Returns (volume, body incl. lungs, table)."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, y), np.linspace(-1, 1, x), indexing="ij")
    body2d = (yy / 0.62) ** 2 + (xx / (0.8 + 0.05 * seed)) ** 2 <= 1
    lungs2d = body2d & ((((yy + 0.05) / 0.3) ** 2 + ((np.abs(xx) - 0.38) / 0.22) ** 2) <= 1)
    bone2d = ((yy - 0.38) / 0.12) ** 2 + (xx / 0.12) ** 2 <= 1
    table2d = (yy > 0.78) & (yy < 0.9) & (np.abs(xx) < 0.9)
    vol = -1000.0 + rng.normal(0, 10, shape)
    body, lungs, bone, table = (np.broadcast_to(m, shape) for m in (body2d, lungs2d, bone2d, table2d))
    vol[body] = rng.uniform(0, 50, int(body.sum()))
    vol[lungs] = -850 + rng.normal(0, 20, int(lungs.sum()))
    vol[bone] = 700
    vol[table] = 100
    return np.round(vol).astype(np.int16), body, table


def mri_like(seed: int, shape=(10, 40, 40)):
    """float32 volume: near-zero noisy background, an ellipsoid-ish head with two tissue classes and a
    smooth bias. Returns (volume, object mask)."""
    rng = np.random.default_rng(100 + seed)
    z, y, x = shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, z), np.linspace(-1, 1, y), np.linspace(-1, 1, x), indexing="ij")
    obj = (zz / 1.6) ** 2 + (yy / 0.7) ** 2 + (xx / 0.6) ** 2 <= 1
    inner = (zz / 1.2) ** 2 + (yy / 0.4) ** 2 + (xx / 0.35) ** 2 <= 1
    vol = np.abs(rng.normal(0, 8, shape))
    vol[obj] = 400 + rng.normal(0, 20, int(obj.sum()))
    vol[inner] = 700 + rng.normal(0, 20, int(inner.sum()))
    vol *= 1 + 0.2 * yy
    return vol.astype(np.float32), obj


def write_image(arr: np.ndarray, path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin((-20.0, -20.0, 10.0))
    sitk.WriteImage(img, str(path), True)


def write_dicom_series(arr: np.ndarray, folder: Path, series: str = "1") -> None:
    """int16 HU volume as a CT DICOM series, one file per slice, minimal tags (SimpleITK's recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    uid = "1.2.826.0.1.3680043.2.1125.99." + series
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(img.GetDepth()):
        s = img[:, :, i]
        position = "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, i)))
        for tag, value in (("0008|0060", "CT"), ("0010|0010", "Synthetic^CT"), ("0020|000d", uid + ".1"),
                           ("0020|000e", uid + ".2"), ("0008|0018", f"{uid}.3.{i}"), ("0020|0013", str(i + 1)),
                           ("0008|0008", "ORIGINAL\\PRIMARY\\AXIAL"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0032", position), ("0018|0050", str(SPACING[2])), ("0028|1052", "0"),
                           ("0028|1053", "1")):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{i:04d}.dcm"))
        writer.Execute(s)


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def run_module(module: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, encoding="utf-8",
                          errors="replace",
                          env=dict(os.environ), timeout=600)


# ------------------------------------------------------------------------------------------ CT end to end
@pytest.mark.e2e
def test_ct_nifti_nrrd_dicom_to_nnunet_and_pretraining(nnunet_env, tmp_path):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)
    from nnunetv2_macl.training.checkpoint import load_checkpoint

    scans = tmp_path / "scans"
    (scans / "nested").mkdir(parents=True)
    volumes = {}
    vol, body, table = ct_like(0)
    write_image(vol, scans / "a_patient.nii.gz")
    volumes["a_patient.nii.gz"] = (vol, body, table)
    vol, body, table = ct_like(1)
    write_image(vol, scans / "nested" / "b_patient.nrrd")
    volumes[os.path.join("nested", "b_patient.nrrd")] = (vol, body, table)
    vol, body, table = ct_like(2)
    write_dicom_series(vol, scans / "c_dicom")
    volumes["c_dicom"] = (vol, body, table)
    (scans / "notes.txt").write_text("not an image")

    proc = run_module("nnunetv2_macl.run.prepare_unlabeled", ["-i", str(scans), "-d", "973", "-n", "CTPool"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Wrote 3 case(s)" in proc.stdout and "nnUNetv2_plan_and_preprocess -d 973" in proc.stdout
    folder = Path(nnunet_env["raw"]) / "Dataset973_CTPool"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"CTPool_{i:03d}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"CTPool_{i:03d}.nii.gz" for i in range(3)]
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "body": 1}
    assert dj["file_ending"] == ".nii.gz" and dj["numTraining"] == 3
    sources = json.loads((folder / "macl_sources.json").read_text())
    assert sources["ignored_files"] == ["notes.txt"]

    for case in sources["cases"]:
        key = next(k for k in volumes if case["source"].startswith(k))
        vol, body, table = volumes[key]
        image = read(folder / "imagesTr" / f"{case['case']}_0000.nii.gz")
        mask = read(folder / "labelsTr" / f"{case['case']}.nii.gz")
        np.testing.assert_array_equal(image, vol)  # the HU values survive NIfTI, NRRD and DICOM
        assert set(np.unique(mask)) == {0, 1}
        assert mask[body].mean() > 0.99, f"{key}: body (lungs included) not covered"
        assert mask[~body].mean() < 0.01, f"{key}: air/table inside the body mask"
        assert mask[table].sum() == 0, f"{key}: table is not the largest component, must be dropped"
        img = sitk.ReadImage(str(folder / "imagesTr" / f"{case['case']}_0000.nii.gz"))
        np.testing.assert_allclose(img.GetSpacing(), SPACING, rtol=1e-5)

    # nnU-Net accepts it (integrity check on), and CT normalisation gets body statistics
    extract_fingerprints([973], num_processes=2, check_dataset_integrity=True, clean=True, verbose=False,
                         show_progress_bar=False)
    plans_identifier = plan_experiments([973])
    preprocess([973], plans_identifier=plans_identifier, configurations=("2d",), num_processes=(2,),
               verbose=False, show_progress_bar=False)
    pre = Path(nnunet_env["preprocessed"]) / "Dataset973_CTPool"
    fg = json.loads((pre / "dataset_fingerprint.json").read_text())["foreground_intensity_properties_per_channel"]["0"]
    body_values = np.concatenate([v[b] for v, b, _ in volumes.values()]).astype(float)
    assert abs(fg["mean"] - body_values.mean()) < 50, (fg, body_values.mean())
    assert fg["percentile_99_5"] >= 650 and fg["percentile_00_5"] > -950  # bone in, air (-1000) out
    plans = json.loads((pre / f"{plans_identifier}.json").read_text())
    assert plans["configurations"]["2d"]["normalization_schemes"] == ["CTNormalization"]

    proc = run_module("nnunetv2_macl.run.pretrain", ["-d", "973", "-c", "2d", "--device", "cpu", "--epochs", "1",
                                                     "--batch-size", "8", "--num-workers", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = Path(nnunet_env["results"]) / "Dataset973_CTPool" / "MACLPretrainer__nnUNetPlans__2d" / \
        "checkpoint_final.pth"
    meta = load_checkpoint(str(ckpt))["macl"]
    assert meta["dataset_name"] == "Dataset973_CTPool" and meta["epoch"] == 1


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "macl_prepare_unlabeled"
    assert script.is_file(), "run: pip install -e . --no-deps (setup.py console_scripts)"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, encoding="utf-8", timeout=120)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "--modality" in text and "Multi-channel inputs are out of scope" in text


# ------------------------------------------------------------------------------------------ MRI
def test_mri_foreground_mask_with_worker_processes(nnunet_env, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    scans = tmp_path / "mri"
    scans.mkdir()
    objects = {}
    for i, ext in enumerate((".nii.gz", ".mha")):
        vol, obj = mri_like(i)
        write_image(vol, scans / f"subject{i}{ext}")
        objects[f"subject{i}{ext}"] = obj
    result = prepare_unlabeled_dataset(str(scans), 974, "MRPool", modality="mri", num_processes=2, log=None)
    folder = Path(result.folder)
    assert folder == Path(nnunet_env["raw"]) / "Dataset974_MRPool"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI"} and dj["labels"] == {"background": 0, "foreground": 1}
    for case in result.cases:
        obj = objects[case.source]
        mask = read(folder / "labelsTr" / f"{case.case}.nii.gz")
        assert mask[obj].mean() > 0.97 and mask[~obj].mean() < 0.02, case
    verify_dataset_integrity(str(folder), num_processes=1)  # nnU-Net's own check (raises on problems)


# ------------------------------------------------------------------------------------------ errors
def _no_partial_left(raw: Path) -> None:
    assert not [p for p in raw.iterdir() if p.name.startswith(".Dataset")], "temporary folder left behind"


def test_clear_errors(nnunet_env, tmp_path):
    raw = Path(nnunet_env["raw"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnlabeledDataError, match="Input folder is empty"):
        prepare_unlabeled_dataset(str(empty), 975, "Err", log=None)
    with pytest.raises(UnlabeledDataError, match="does not exist"):
        prepare_unlabeled_dataset(str(tmp_path / "missing"), 975, "Err", log=None)
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "readme.md").write_text("x")
    with pytest.raises(UnlabeledDataError, match="No images found.*readme.md"):
        prepare_unlabeled_dataset(str(only_text), 975, "Err", log=None)

    # an unreadable file is named; the good case converted before it leaves nothing behind
    bad = tmp_path / "bad"
    bad.mkdir()
    write_image(ct_like(0)[0], bad / "a_good.nii.gz")
    (bad / "b_broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(UnlabeledDataError, match="Cannot read b_broken.nii.gz"):
        prepare_unlabeled_dataset(str(bad), 975, "Err", num_processes=1, log=None)
    assert not (raw / "Dataset975_Err").exists()
    _no_partial_left(raw)
    bad_dcm = tmp_path / "bad_dcm"
    bad_dcm.mkdir()
    (bad_dcm / "slice1.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(UnlabeledDataError, match="Unreadable DICOM.*slice1.dcm"):
        find_image_sources(str(bad_dcm))

    # multi-channel / 4-D / 2-D / single slice: refused, naming the file
    odd = tmp_path / "odd"
    odd.mkdir()
    vec = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(odd / "rgb.nii.gz"))
    with pytest.raises(UnlabeledDataError, match="rgb.nii.gz has 3 components.*out of scope"):
        prepare_unlabeled_dataset(str(odd), 975, "Err", log=None)
    (odd / "rgb.nii.gz").unlink()
    frame = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(odd / "t.nii.gz"))
    with pytest.raises(UnlabeledDataError, match="t.nii.gz is 4-D.*out of scope"):
        prepare_unlabeled_dataset(str(odd), 975, "Err", log=None)
    (odd / "t.nii.gz").unlink()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(odd / "flat.nrrd"))
    with pytest.raises(UnlabeledDataError, match="flat.nrrd is 2-D"):
        prepare_unlabeled_dataset(str(odd), 975, "Err", log=None)
    _no_partial_left(raw)

    # CT without anything above -500 HU: empty body mask, with a hint
    air = tmp_path / "air"
    air.mkdir()
    write_image(np.full((4, 8, 8), -1000, np.int16), air / "air.nii.gz")
    with pytest.raises(UnlabeledDataError, match="air.nii.gz: the body mask is empty.*--modality MRI"):
        prepare_unlabeled_dataset(str(air), 975, "Err", log=None)

    # the dataset id exists (here: the tiny dataset's folder of an earlier step), bad ids and names
    write_image(ct_like(0)[0], odd / "ok.nii.gz")
    (odd / "flat.nrrd").unlink()
    (raw / "Dataset976_Taken").mkdir()
    with pytest.raises(UnlabeledDataError, match="Dataset id 976 already exists.*Dataset976_Taken"):
        prepare_unlabeled_dataset(str(odd), 976, "Other", log=None)
    with pytest.raises(UnlabeledDataError, match="1..999"):
        prepare_unlabeled_dataset(str(odd), 0, "Other", log=None)
    with pytest.raises(UnlabeledDataError, match="Dataset name"):
        prepare_unlabeled_dataset(str(odd), 977, "my data", log=None)

    # the command line: one line on stderr, exit code 2
    proc = run_module("nnunetv2_macl.run.prepare_unlabeled", ["-i", str(empty), "-d", "975", "-n", "Err"])
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("macl_prepare_unlabeled: error: Input folder is empty")
    assert "Traceback" not in proc.stderr
