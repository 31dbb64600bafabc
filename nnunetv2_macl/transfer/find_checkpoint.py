"""Locate the MACL checkpoint a fine-tuning run uses when none is named explicitly.

The pretraining run (``macl_pretrain -d ID -c CONF -p PLANS``) writes to
``$nnUNet_results/<DatasetXXX_Name>/MACLPretrainer__<plans>__<configuration>/checkpoint_final.pth``
(the same ``<trainer>__<plans>__<configuration>`` layout nnU-Net uses for its own trainers).
Pretrainer variants (``MACLPretrainer_<something>``, e.g. a PCL or SimCLR baseline) live next to
it; they are candidates too, so that a default that is ambiguous is reported instead of guessed.

A pretraining over several datasets (``macl_pretrain -d 501 502``) lives under the first one and
lists all of them in its ``pretraining_datasets.json``; the lookup for any of those datasets finds
it there. To fine-tune on a dataset the pretraining did not see, name the checkpoint explicitly with
``MACL_PRETRAINED=/path/to/checkpoint_final.pth`` (the plans may differ: see ``load_pretrained``).
"""
from __future__ import annotations

import glob
import json
import os
from nnunetv2_macl.errors import CheckpointNotFoundError

PRETRAINER_NAME = "MACLPretrainer"
FINAL_CHECKPOINT = "checkpoint_final.pth"
LATEST_CHECKPOINT = "checkpoint_latest.pth"


def candidate_folders(results_root: str, dataset_name: str, plans_identifier: str, configuration: str) -> list[str]:
    """All ``MACLPretrainer*__<plans>__<configuration>`` folders of the dataset, sorted."""
    base = os.path.join(results_root, dataset_name)
    pattern = os.path.join(glob.escape(base), f"{PRETRAINER_NAME}*__{glob.escape(plans_identifier)}__"
                                              f"{glob.escape(configuration)}")
    return sorted(p for p in glob.glob(pattern) if os.path.isdir(p))


def folders_trained_on(results_root: str, dataset_name: str, plans_identifier: str, configuration: str) -> list[str]:
    """``MACLPretrainer*__<plans>__<configuration>`` folders of *other* datasets whose
    ``pretraining_datasets.json`` lists ``dataset_name`` (multi-dataset pretrainings), sorted."""
    from nnunetv2_macl.data.multi_dataset import DATASETS_FILE

    pattern = os.path.join(glob.escape(results_root), "*", f"{PRETRAINER_NAME}*__{glob.escape(plans_identifier)}__"
                                                           f"{glob.escape(configuration)}", DATASETS_FILE)
    found = []
    for listing in sorted(glob.glob(pattern)):
        folder = os.path.dirname(listing)
        if os.path.basename(os.path.dirname(folder)) == dataset_name:
            continue  # the dataset's own folders are candidates anyway
        try:
            with open(listing) as f:
                names = [d.get("dataset_name") for d in json.load(f).get("datasets", [])]
        except (OSError, ValueError, AttributeError):
            continue  # not ours or unreadable: it cannot claim this dataset
        if dataset_name in names:
            found.append(folder)
    return found


def find_default_checkpoint(dataset_name: str, plans_identifier: str, configuration: str) -> str:
    """Return the absolute path of the one ``checkpoint_final.pth`` of a MACL pretraining of this dataset.

    Raises :class:`CheckpointNotFoundError` (a ``FileNotFoundError``) when ``nnUNet_results`` is not
    set, when no finished pretraining exists (the message says how to run one, or to set
    ``MACL_PRETRAINED``; an unfinished one with only ``checkpoint_latest.pth`` is named), and when
    several candidates exist (all are listed).
    """
    results_root = os.environ.get("nnUNet_results")
    how = (f"Run the pretraining first: `macl_pretrain -d {dataset_name} -c {configuration} -p {plans_identifier}`, "
           f"or name a checkpoint explicitly with MACL_PRETRAINED=/path/to/{FINAL_CHECKPOINT} "
           f"(needed for cross-dataset transfer, where the lookup by dataset cannot find it).")
    if not results_root:
        raise CheckpointNotFoundError(
            f"Cannot look up the default MACL checkpoint: the environment variable nnUNet_results is not set. {how}")
    folders = candidate_folders(results_root, dataset_name, plans_identifier, configuration)
    folders += folders_trained_on(results_root, dataset_name, plans_identifier, configuration)
    finals = [os.path.abspath(os.path.join(f, FINAL_CHECKPOINT)) for f in folders
              if os.path.isfile(os.path.join(f, FINAL_CHECKPOINT))]
    expected = os.path.join(results_root, dataset_name,
                            f"{PRETRAINER_NAME}__{plans_identifier}__{configuration}", FINAL_CHECKPOINT)
    if len(finals) == 1:
        return finals[0]
    if not finals:
        latest = [os.path.abspath(os.path.join(f, LATEST_CHECKPOINT)) for f in folders
                  if os.path.isfile(os.path.join(f, LATEST_CHECKPOINT))]
        unfinished = ""
        if latest:
            unfinished = (" Found only unfinished pretraining checkpoint(s): " + ", ".join(latest) +
                          " (finish it, e.g. by resuming the pretraining, or set MACL_PRETRAINED to one of them).")
        raise CheckpointNotFoundError(
            f"No MACL pretraining checkpoint found for {dataset_name} (plans {plans_identifier}, "
            f"configuration {configuration}); expected {expected}.{unfinished} {how}")
    listing = "\n  ".join(finals)
    raise CheckpointNotFoundError(
        f"Several MACL pretraining checkpoints match {dataset_name} (plans {plans_identifier}, configuration "
        f"{configuration}); choose one with MACL_PRETRAINED=/path/to/{FINAL_CHECKPOINT}:\n  {listing}")
