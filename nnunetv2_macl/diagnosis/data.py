"""Labeled 2-D slices of nnU-Net preprocessed cases for the decoder hand-over diagnosis.

Cases are read through nnU-Net's dataset classes (``infer_dataset_class`` via
:func:`nnunetv2_macl.data.slice_dataset.list_cases`), image and ``_seg`` arrays only: no ``.pkl`` is
unpickled. Slices of different sizes are put on one canvas (padded at the bottom/right, so that cell j
of a strided map keeps its place on pixel stride*j).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_macl.data.slice_dataset import list_cases, open_case_array
from nnunetv2_macl.errors import DatasetError


@dataclass
class Case:
    """One preprocessed case: image (C, Z, Y, X) float32 and labels (Z, Y, X) int64 with nnU-Net's -1
    (outside the nonzero mask) turned into background, as its training pipeline does."""

    identifier: str
    image: np.ndarray
    seg: np.ndarray

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[1])

    @property
    def slice_shape(self) -> tuple[int, int]:
        return int(self.image.shape[2]), int(self.image.shape[3])


@lru_cache(maxsize=16)
def _dataset_class(data_folder: str) -> type:
    return list_cases(data_folder)[0]


def read_case(data_folder: str, identifier: str) -> Case:
    """Image and labels of one case from nnU-Net's preprocessed data folder.

    The labels are the ``_seg`` arrays of the preprocessed grid; ``gt_segmentations`` is in the raw
    geometry and would not align with the preprocessed slices."""
    dataset_class = _dataset_class(os.path.abspath(data_folder))
    image = np.asarray(open_case_array(dataset_class, data_folder, identifier, "data")[:], dtype=np.float32)
    try:
        seg = np.asarray(open_case_array(dataset_class, data_folder, identifier, "seg")[:])
    except DatasetError:
        raise DatasetError(f"case {identifier} has no labels ({identifier}_seg) in {data_folder}: this "
                           f"diagnosis needs a labeled, preprocessed dataset") from None
    if image.ndim != 4 or seg.ndim != 4 or seg.shape[1:] != image.shape[1:]:
        raise ValueError(f"case {identifier}: image {image.shape} and labels {seg.shape} are not (C, Z, Y, X) alike")
    seg = seg[0].astype(np.int64)
    seg[seg < 0] = 0
    return Case(identifier, image, seg)


def case_slice_shape(data_folder: str, identifier: str) -> tuple[int, int]:
    """(Y, X) of a case's slices, read from the array header (the data stays on disk)."""
    shape = open_case_array(_dataset_class(os.path.abspath(data_folder)), data_folder, identifier, "data").shape
    return int(shape[-2]), int(shape[-1])


def parse_case_list(value: str) -> list[str]:
    """A file (one identifier per line or comma separated; a JSON list works too) or a comma list."""
    if os.path.isfile(value):
        text = Path(value).read_text().strip()
        if text.startswith("["):
            return [str(c) for c in json.loads(text)]
        return [c.strip() for c in re.split(r"[,\n]", text) if c.strip() and not c.strip().startswith("#")]
    return [c.strip() for c in value.split(",") if c.strip()]


def cases_from_fewlabel(workdir: str, budget: int, fold: int) -> tuple[list[str], list[str]]:
    """(training, validation) cases of budget M and fold f of a ``macl_fewlabel`` workdir
    (its ``views/finetune/<dataset>/splits_index.json``; a folder holding that file directly works too)."""
    from nnunetv2_macl.fewlabel.splits import read_splits

    root = Path(workdir)
    candidates = [root] if (root / "splits_index.json").is_file() else \
        sorted(p.parent for p in root.glob("views/finetune/*/splits_index.json"))
    if not candidates:
        raise FileNotFoundError(f"no splits_index.json in {root} or {root}/views/finetune/*/")
    if len(candidates) > 1:
        raise ValueError(f"several split files under {root}: {[str(c) for c in candidates]}; pass one folder")
    plan = read_splits(candidates[0])
    for row in plan["index"]:
        if int(row["budget"]) == int(budget) and int(row["fold"]) == int(fold):
            return list(row["train"]), list(row["val"])
    have = sorted({(int(r["budget"]), int(r["fold"])) for r in plan["index"]})
    raise ValueError(f"no split for budget {budget}, fold {fold} in {candidates[0]} (has (budget, fold): {have})")


def select_slices(num_slices: int, quota: int | None) -> np.ndarray:
    """Every slice, or ``quota`` evenly spaced ones (for ``--max-val-slices``)."""
    if quota is None or quota >= num_slices:
        return np.arange(num_slices)
    return np.unique(np.round(np.linspace(0, num_slices - 1, max(1, quota))).astype(int))


def pad_to(x: torch.Tensor, shape: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the last two axes at the end (bottom/right) to ``shape``: cell j keeps its place."""
    ph, pw = int(shape[0]) - x.shape[-2], int(shape[1]) - x.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} to {tuple(shape)}")
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


def labels_on_canvas(case: Case, slices: np.ndarray, canvas: Sequence[int]) -> torch.Tensor:
    """Labels (S, *canvas) of the chosen slices; -1 on the padding."""
    seg = torch.from_numpy(case.seg[slices])
    return pad_to(seg, canvas, value=-1)


def images_on_canvas(case: Case, slices: np.ndarray, canvas: Sequence[int]) -> torch.Tensor:
    """Images (S, C, *canvas) of the chosen slices; 0 on the padding."""
    img = torch.from_numpy(np.ascontiguousarray(case.image[:, slices].transpose(1, 0, 2, 3)))
    return pad_to(img, canvas)
