"""The embedded synthetic dataset generator and the dataset fixtures built on it."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_macl.demo.synthetic import make_synthetic_dataset, synthesize_case


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _load_all(folder: Path):
    imgs = sorted((folder / "imagesTr").glob("*.nii.gz"))
    labs = sorted((folder / "labelsTr").glob("*.nii.gz"))
    return [_read(p) for p in imgs], [_read(p) for p in labs]


def test_writes_nnunet_raw_layout(tmp_path):
    folder = Path(make_synthetic_dataset(str(tmp_path), dataset_id=42, name="Tiny", num_cases=3,
                                         shape=(8, 16, 20), num_channels=2, spacing=(3.0, 1.0, 0.5)))
    assert folder == tmp_path / "Dataset042_Tiny"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        f"synth_{i:03d}_{c:04d}.nii.gz" for i in range(3) for c in range(2)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"synth_{i:03d}.nii.gz" for i in range(3)]
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"]["0"] == "MRI" and len(ds["channel_names"]) == 2
    assert ds["labels"] == {"background": 0, "organ_a": 1, "organ_b": 2}
    assert ds["numTraining"] == 3 and ds["file_ending"] == ".nii.gz"
    img = sitk.ReadImage(str(folder / "imagesTr" / "synth_000_0000.nii.gz"))
    assert img.GetSize() == (20, 16, 8)  # SimpleITK is x, y, z
    assert img.GetSpacing() == pytest.approx((0.5, 1.0, 3.0))
    lab = sitk.ReadImage(str(folder / "labelsTr" / "synth_000.nii.gz"))
    assert lab.GetPixelID() == sitk.sitkUInt8


def test_without_labels(tmp_path):
    folder = Path(make_synthetic_dataset(str(tmp_path), num_cases=2, shape=(6, 12, 12), with_labels=False))
    assert not (folder / "labelsTr").exists()
    assert len(list((folder / "imagesTr").glob("*.nii.gz"))) == 2


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(num_cases=3, shape=(10, 24, 24))
    a = _load_all(Path(make_synthetic_dataset(str(tmp_path / "a"), seed=7, **kw)))
    b = _load_all(Path(make_synthetic_dataset(str(tmp_path / "b"), seed=7, **kw)))
    c = _load_all(Path(make_synthetic_dataset(str(tmp_path / "c"), seed=8, **kw)))
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a[0], c[0]))
    # case i does not depend on how many cases are generated
    np.testing.assert_array_equal(synthesize_case(7, 1, (10, 24, 24))[1], a[1][1])


def test_labels_and_slice_dependence():
    for i in range(6):
        img, lab = synthesize_case(0, i, (24, 48, 48))
        assert img.dtype == np.float32 and lab.dtype == np.uint8 and img.shape == (1, 24, 48, 48)
        assert set(np.unique(lab)) == {0, 1, 2}
        area = [(lab[z] > 0).sum() for z in range(lab.shape[0])]
        assert max(area) > 0 and min(area) < max(area) / 2  # slice position matters
        # organs differ in intensity from each other and from the background
        m0, m1, m2 = (float(img[0][lab == k].mean()) for k in range(3))
        assert m1 > m0 and m2 > m0 and abs(m2 - m1) > 0.05 * m2


def test_intensities_vary_between_cases():
    scales = [float(np.percentile(synthesize_case(0, i, (12, 32, 32))[0], 99)) for i in range(8)]
    assert max(scales) / min(scales) > 3
    ratios = []
    for i in range(8):
        img, lab = synthesize_case(0, i, (12, 32, 32))
        ratios.append(float(img[0][lab == 2].mean() / img[0][lab == 1].mean()))
    assert np.std(ratios) > 0.05  # per-case organ contrast, not just a global scale


def _check_preprocessed(info, expected_configuration):
    assert info["plans"] == "nnUNetPlans"
    assert info["configuration"] == expected_configuration
    assert (info["preprocessed"] / "nnUNetPlans.json").is_file()
    plans = json.loads((info["preprocessed"] / "nnUNetPlans.json").read_text())
    assert expected_configuration in plans["configurations"]
    assert info["data_folder"] == info["preprocessed"] / f"nnUNetPlans_{expected_configuration}"
    b2nd = [p for p in info["data_folder"].glob("*.b2nd") if not p.name.endswith("_seg.b2nd")]
    assert len(b2nd) == info["num_cases"]
    assert (info["raw"] / "dataset.json").is_file()


def test_tiny_dataset_fixture(tiny_dataset, nnunet_env):
    assert tiny_dataset["id"] == 990 and tiny_dataset["name"] == "Dataset990_MACLSynthetic"
    assert tiny_dataset["raw"] == nnunet_env["raw"] / "Dataset990_MACLSynthetic"
    assert tiny_dataset["preprocessed"] == nnunet_env["preprocessed"] / "Dataset990_MACLSynthetic"
    _check_preprocessed(tiny_dataset, "2d")
    from nnunetv2.paths import nnUNet_preprocessed
    assert Path(nnUNet_preprocessed) == nnunet_env["preprocessed"]


def test_tiny_dataset_3d_fixture(tiny_dataset_3d):
    _check_preprocessed(tiny_dataset_3d, "3d_fullres")


@pytest.mark.realdata
def test_hippocampus_fixture(hippocampus_dataset):
    assert hippocampus_dataset["name"] == "Dataset504_Hippocampus"
    assert hippocampus_dataset["num_cases"] == 200
    _check_preprocessed(hippocampus_dataset, "2d")
