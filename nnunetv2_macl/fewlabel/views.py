"""Read-only views of an nnU-Net preprocessed dataset, so that the protocol never writes into it.

A view is a folder ``<root>/<DatasetXXX_Name>/`` of symbolic links to the entries of the real one
(plans, dataset.json, fingerprint, ``gt_segmentations``, the data folders), used as
``nnUNet_preprocessed=<root>`` by the subprocesses:

- the fine-tuning view adds the protocol's own ``splits_final.json`` (the user's stays untouched);
- the pretraining view links only the given cases in the configuration's data folder, so a
  pretraining can leave the validation cases out.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from nnunetv2_macl.errors import FewLabelError

_OWN_FILES = ("splits_final.json", "splits_index.json")


def _fresh(folder: Path) -> None:
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)  # links only: the real files are never followed
    folder.mkdir(parents=True)


def _link_entries(source: Path, target: Path, skip: Sequence[str]) -> None:
    for entry in sorted(source.iterdir()):
        if entry.name in skip or entry.name in _OWN_FILES:
            continue
        (target / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def finetune_view(source_dataset: str | os.PathLike, view_root: str | os.PathLike) -> Path:
    """``view_root/<name>``: links to every entry of ``source_dataset`` except its split files."""
    source = Path(source_dataset).resolve()
    if not (source / "dataset.json").is_file():
        raise FewLabelError(f"{source} is not an nnU-Net preprocessed dataset folder (no dataset.json)")
    target = Path(view_root) / source.name
    _fresh(target)
    _link_entries(source, target, skip=())
    return target


def pretrain_view(source_dataset: str | os.PathLike, view_root: str | os.PathLike, data_identifier: str,
                  cases: Sequence[str]) -> Path:
    """``view_root/<name>``: like :func:`finetune_view`, but the folder ``data_identifier`` holds links to
    the files of ``cases`` only (``<case>.<ext>`` and ``<case>_seg.<ext>``)."""
    source = Path(source_dataset).resolve()
    data = source / data_identifier
    if not data.is_dir():
        raise FewLabelError(f"{data} does not exist; was the configuration preprocessed?")
    target = Path(view_root) / source.name
    _fresh(target)
    _link_entries(source, target, skip=(data_identifier,))
    (target / data_identifier).mkdir()
    wanted = set(cases)
    found: set[str] = set()
    for f in sorted(data.iterdir()):
        stem = f.name.rsplit(".", 1)[0]  # from the right: case identifiers may hold dots, as nnU-Net allows
        case = stem[:-4] if stem.endswith("_seg") else stem
        if case in wanted:
            (target / data_identifier / f.name).symlink_to(f.resolve())
            found.add(case)
    missing = sorted(wanted - found)
    if missing:
        raise FewLabelError(f"{len(missing)} case(s) have no preprocessed files in {data}, e.g. {missing[:3]}")
    return target
