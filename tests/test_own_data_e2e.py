"""The README's "Your own data" path, end to end through the real command-line tools, on a tiny folder of
unlabeled scans (NIfTI files and one DICOM series) and a tiny labeled dataset:

    macl_prepare_unlabeled -> nnUNetv2_plan_and_preprocess -> macl_pretrain
    -> nnUNetv2_plan_and_preprocess --no_pp + nnUNetv2_move_plans_between_datasets + nnUNetv2_preprocess (labeled set,
       same plans) -> nnUNetv2_train -tr nnUNetTrainerMACL_1epoch (MACL_PRETRAINED) -> nnUNetv2_predict

Each tool runs as a subprocess with its output in a log under the test's folder (shown, last 30 lines, when
a step fails). Its own nnU-Net folders; the session's are not touched.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # a required dependency (setup.py): missing, this module must fail, not skip

from nnunetv2_macl.demo.synthetic import LABELS, make_synthetic_dataset, synthesize_case  # noqa: E402
from nnunetv2_macl.run.subprocess_steps import find_executable, run_quiet  # noqa: E402
from test_unlabeled import SPACING, write_dicom_series  # noqa: E402

POOL_ID, POOL_NAME = 601, "MyPool"
LABELED_ID, LABELED_NAME = 602, "MyLabeled"
SHAPE = (16, 32, 32)  # z, y, x: the smallest volumes nnU-Net plans a 2d U-Net for that MACL can crop
SPACING_ZYX = tuple(reversed(SPACING))
TRAINER = "nnUNetTrainerMACL_1epoch"  # nnUNetTrainerMACL's schedule, 1 epoch x 10 iterations
README = Path(__file__).parents[1] / "README.md"


def _scan(seed: int, index: int) -> np.ndarray:
    """An unlabeled MRI-like scan: the demo generator's image, in int16 as a scanner writes it."""
    image, _ = synthesize_case(seed, index, SHAPE)
    return np.round(image[0] / image[0].max() * 3000).astype(np.int16)


def _write_nifti(arr: np.ndarray, path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def own_data_commands(scans: Path, new_scans: Path, predictions: Path) -> list[list[str]]:
    """The README's commands, with the test's short schedules and process counts."""
    return [
        ["macl_prepare_unlabeled", "-i", str(scans), "-d", str(POOL_ID), "-n", POOL_NAME, "--modality", "MRI"],
        ["nnUNetv2_plan_and_preprocess", "-d", str(POOL_ID), "-c", "2d", "-np", "2", "-npfp", "2"],
        ["macl_pretrain", "-d", str(POOL_ID), "-c", "2d", "--epochs", "1", "--batch-size", "8", "--num-workers", "0",
         "--device", "cpu"],
        ["nnUNetv2_plan_and_preprocess", "-d", str(LABELED_ID), "--no_pp", "-npfp", "2"],
        ["nnUNetv2_move_plans_between_datasets", "-s", str(POOL_ID), "-t", str(LABELED_ID), "-sp", "nnUNetPlans",
         "-tp", "nnUNetPlans"],
        ["nnUNetv2_preprocess", "-d", str(LABELED_ID), "-plans_name", "nnUNetPlans", "-c", "2d", "-np", "2"],
        ["nnUNetv2_train", str(LABELED_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"],
        ["nnUNetv2_predict", "-i", str(new_scans), "-o", str(predictions), "-d", str(LABELED_ID), "-c", "2d", "-f",
         "0", "-tr", TRAINER, "-device", "cpu"],
    ]


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory):
    """Runs the whole path once; returns the folders and the checked commands."""
    base = tmp_path_factory.mktemp("own_data")
    paths = {k: str(base / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p)
    scans, new_scans, predictions, logs = base / "scans", base / "new_scans", base / "predictions", base / "logs"
    # 4 NIfTI scans in sub-folders, one DICOM series (a folder of slice files), and a file to be ignored
    for i in range(4):
        _write_nifti(_scan(1, i), scans / f"patient{i}" / f"scan{i}.nii.gz")
    write_dicom_series(_scan(1, 4), scans / "patient4_dicom")
    (scans / "README.txt").write_text("not an image")

    # no nnUNet_extTrainer: the installed startup hook makes the trainers visible, as the README says
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "MACL_REGISTER_TRAINERS")}
    env.update({**paths, "OMP_WAIT_POLICY": "PASSIVE", "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2"})

    # the team's labeled cases in nnU-Net raw format (5: nnU-Net's 5-fold split), and new scans to segment
    make_synthetic_dataset(paths["nnUNet_raw"], LABELED_ID, LABELED_NAME, num_cases=5, shape=SHAPE, seed=2,
                           spacing=SPACING_ZYX)
    for i in range(2):
        image, _ = synthesize_case(3, i, SHAPE)
        _write_nifti(image[0], new_scans / f"new_{i:03d}_0000.nii.gz")

    checkpoint = (Path(paths["nnUNet_results"]) / f"Dataset{POOL_ID}_{POOL_NAME}" / "MACLPretrainer__nnUNetPlans__2d"
                  / "checkpoint_final.pth")
    commands = own_data_commands(scans, new_scans, predictions)
    for step, cmd in enumerate(commands, start=1):
        step_env = dict(env, MACL_PRETRAINED=str(checkpoint)) if cmd[0] == "nnUNetv2_train" else env
        run_quiet([find_executable(cmd[0]), *cmd[1:]], step_env, f"[{step}/{len(commands)}] {cmd[0]}",
                  logs / f"{step}_{cmd[0]}.log", timeout=900)
    return {"base": base, "paths": paths, "scans": scans, "new_scans": new_scans, "predictions": predictions,
            "logs": logs, "checkpoint": checkpoint, "commands": commands}


@pytest.mark.e2e
def test_own_data_to_segmentations(own_data_run):
    r = own_data_run
    raw = Path(r["paths"]["nnUNet_raw"])
    pool = raw / f"Dataset{POOL_ID}_{POOL_NAME}"
    sources = json.loads((pool / "macl_sources.json").read_text())
    assert len(list((pool / "imagesTr").glob("*.nii.gz"))) == 5, sources
    assert any("patient4_dicom" in json.dumps(v) for v in (sources.values() if isinstance(sources, dict) else sources))

    # the pretraining read the pool's planned 2d data and wrote weights for fine-tuning
    assert r["checkpoint"].is_file()
    from nnunetv2_macl.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(str(r["checkpoint"]))
    assert ckpt["macl"]["configuration"] == "2d"

    # the labeled dataset was planned with the pool's plans: the same network
    pre = Path(r["paths"]["nnUNet_preprocessed"])
    pool_plans = json.loads((pre / pool.name / "nnUNetPlans.json").read_text())
    labeled_plans = json.loads((pre / f"Dataset{LABELED_ID}_{LABELED_NAME}" / "nnUNetPlans.json").read_text())
    assert labeled_plans["configurations"]["2d"]["architecture"] == pool_plans["configurations"]["2d"]["architecture"]
    assert labeled_plans["configurations"]["2d"]["patch_size"] == pool_plans["configurations"]["2d"]["patch_size"]

    # fine-tuning started from the pretrained weights (the transfer report) and finished its validation
    log = (r["logs"] / "7_nnUNetv2_train.log").read_text(encoding="utf-8")
    assert f"MACL weight transfer from {r['checkpoint']}" in log, log[-3000:]
    fold = (Path(r["paths"]["nnUNet_results"]) / f"Dataset{LABELED_ID}_{LABELED_NAME}"
            / f"{TRAINER}__nnUNetPlans__2d" / "fold_0")
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "validation" / "summary.json").is_file()

    # nnUNetv2_predict wrote one segmentation per new scan, on the scan's grid, with the dataset's labels
    for image_file in sorted(r["new_scans"].glob("*_0000.nii.gz")):
        out = r["predictions"] / image_file.name.replace("_0000.nii.gz", ".nii.gz")
        assert out.is_file(), sorted(p.name for p in r["predictions"].iterdir())
        seg, img = sitk.ReadImage(str(out)), sitk.ReadImage(str(image_file))
        assert seg.GetSize() == img.GetSize()
        np.testing.assert_allclose(seg.GetSpacing(), img.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= set(LABELS.values())


def test_readme_shows_these_commands():
    """The README's "Your own data" section runs the same tools in the same order."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Your own data\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README has no '## Your own data' section"
    section = m.group(1)
    block = re.search(r"```\n(.*?)```", section, flags=re.S)
    assert block, "no code block in the README's 'Your own data' section"
    code = "\n".join(line.split("#")[0] for line in block.group(1).splitlines())  # without comments
    tools = re.findall(r"\b((?:macl|nnUNetv2)_[a-z_]+)\b", code)
    wanted = [cmd[0] for cmd in own_data_commands(Path("scans"), Path("new_scans"), Path("predictions"))]
    assert [t for t in tools if t != "macl_trainer_path"] == wanted, tools
    for flag in ("-tr nnUNetTrainerMACL", "MACL_PRETRAINED=", "-sp nnUNetPlans -tp nnUNetPlans", "--no_pp",
                 "-plans_name nnUNetPlans", "--modality"):
        assert flag in code, flag
