"""Decathlon (MSD) folders into nnU-Net raw format, read in place (no copy of the source).

Shared by ``pretrain/fewlabel_benchmark.py`` and the test suite's real-data fixture.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from nnunetv2_macl.errors import FewLabelError


def _simpleitk_works() -> bool:
    try:
        import SimpleITK as sitk

        sitk.GetImageFromArray(np.zeros((2, 2, 2), dtype=np.float32))
        return True
    except Exception:  # noqa: BLE001 - a stand-in module raises anything
        return False


def convert_msd(raw_msd_folder: str | os.PathLike, dataset_id: int, work: Path, num_processes: int,
                use_simpleitk: bool | None = None) -> str:
    """Convert a Decathlon folder into ``$nnUNet_raw/DatasetXXX_Name`` and return the dataset name.

    The Decathlon folder is read in place: a folder of links in ``work`` gives nnU-Net's converter the
    layout it insists on (``TaskXX_Name``, an ``imagesTs`` folder, ``training``/``test`` keys). Where
    SimpleITK is missing (the GPU kit ships a stand-in), the converter's steps for single-channel 3-D
    images (copy ``X.nii.gz`` to ``X_0000.nii.gz``, copy the labels, rewrite dataset.json) are done here
    and dataset.json selects nnU-Net's ``NibabelIO``.
    """
    src = Path(raw_msd_folder).resolve()
    if not (src / "dataset.json").is_file() or not (src / "imagesTr").is_dir() or not (src / "labelsTr").is_dir():
        raise FewLabelError(f"{src} is not a Decathlon dataset folder (needs dataset.json, imagesTr/, labelsTr/)")
    m = re.fullmatch(r"Task(\d+)_([A-Za-z0-9]+)", src.name)
    task_name = m.group(2) if m else re.sub(r"[^A-Za-z0-9]", "", src.name) or "Dataset"
    staged = work / f"Task{int(m.group(1)) if m else 0:02d}_{task_name}"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (staged / sub).symlink_to(src / sub, target_is_directory=True)
    (staged / "imagesTs").mkdir()
    if (src / "imagesTs").is_dir():
        for f in (src / "imagesTs").iterdir():
            (staged / "imagesTs" / f.name).symlink_to(f)
    dj = json.loads((src / "dataset.json").read_text())
    dj.setdefault("test", [])
    dj.setdefault("training", [])
    (staged / "dataset.json").write_text(json.dumps(dj, indent=1))
    name = f"Dataset{int(dataset_id):03d}_{task_name}"
    if use_simpleitk is None:
        use_simpleitk = _simpleitk_works()
    if use_simpleitk:
        from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset

        convert_msd_dataset(str(staged), overwrite_target_id=int(dataset_id), num_processes=num_processes)
        return name
    import nibabel

    target = Path(os.environ["nnUNet_raw"]) / name
    for sub in ("imagesTr", "imagesTs", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for sub, out in (("imagesTr", "imagesTr"), ("imagesTs", "imagesTs")):
        for f in sorted((staged / sub).glob("*.nii.gz")):
            if f.name.startswith((".", "_")):
                continue
            if len(nibabel.load(str(f)).shape) != 3:
                raise FewLabelError(f"{f}: only single-channel 3-D images can be converted without SimpleITK")
            shutil.copyfile(f, target / out / (f.name[:-7] + "_0000.nii.gz"))
    for f in sorted((staged / "labelsTr").glob("*.nii.gz")):
        if not f.name.startswith((".", "_")):
            shutil.copyfile(f, target / "labelsTr" / f.name)
    dj["labels"] = {v: int(k) for k, v in dj["labels"].items()}
    dj["file_ending"] = ".nii.gz"
    dj["channel_names"] = dj.pop("modality")
    dj.pop("training", None)
    dj.pop("test", None)
    dj["overwrite_image_reader_writer"] = "NibabelIO"
    (target / "dataset.json").write_text(json.dumps(dj, indent=1))
    return name
