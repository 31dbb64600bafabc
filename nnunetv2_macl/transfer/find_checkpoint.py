"""Locate the MACL checkpoint a fine-tuning run uses when none is named explicitly.

The pretraining run (``macl_pretrain -d ID -c CONF -p PLANS``) writes to
``$nnUNet_results/<DatasetXXX_Name>/MACLPretrainer__<plans>__<configuration>/checkpoint_final.pth``
(the same ``<trainer>__<plans>__<configuration>`` layout nnU-Net uses for its own trainers).
Pretrainer variants (``MACLPretrainer_<something>``, e.g. a PCL or SimCLR baseline) live next to
it; they are candidates too, so that a default that is ambiguous is reported instead of guessed.

A pretraining over several datasets (``macl_pretrain -d 501 502``) lives under the first one and
lists all of them in its ``pretraining_datasets.json``; the lookup for any of those datasets finds
it there.

When neither exists, the pretraining is on another dataset: the main use (pretrain on a pool of
unlabeled scans, 501; fine-tune on the labelled set, 502). The lookup then takes the one finished
``MACLPretrainer*__<plans>__<configuration>`` of *any* dataset in ``nnUNet_results`` whose network
fits this training: the same input channels and the same network class (read from the checkpoint's
``macl`` metadata with ``weights_only=True``). Plans that differ otherwise (patch size, stages,
kernels) go through the cross-plan transfer and its report (``load_pretrained``). Several fitting
ones are an error that lists them; ``MACL_PRETRAINED=/path/to/checkpoint_final.pth`` chooses.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

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


@dataclass
class CheckpointChoice:
    """The checkpoint the default lookup chose, why, and the folders it searched (for the one-line log)."""

    path: str
    reason: str
    looked_in: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"MACL: fine-tuning from {self.path} ({self.reason}; looked in {', '.join(self.looked_in)})"


def other_dataset_folders(results_root: str, dataset_name: str, plans_identifier: str,
                          configuration: str) -> list[str]:
    """``MACLPretrainer*__<plans>__<configuration>`` folders of every dataset but ``dataset_name``, sorted."""
    pattern = os.path.join(glob.escape(results_root), "*", f"{PRETRAINER_NAME}*__{glob.escape(plans_identifier)}__"
                                                           f"{glob.escape(configuration)}")
    return sorted(p for p in glob.glob(pattern)
                  if os.path.isdir(p) and os.path.basename(os.path.dirname(p)) != dataset_name)


def network_mismatch(checkpoint_path: str, input_channels: int | None,
                     network_arch_class_name: str | None) -> str | None:
    """Why the pretraining's network cannot be this training's (None: it fits). Reads ``weights_only``."""
    from nnunetv2_macl.transfer.load_pretrained import load_weights_only

    try:
        meta = load_weights_only(checkpoint_path).get("macl")
    except Exception as e:  # unreadable or not a checkpoint: it cannot be chosen silently
        return f"unreadable ({type(e).__name__})"
    if not isinstance(meta, dict):
        return "no MACL metadata"
    theirs = meta.get("input_channels")
    if input_channels is not None and theirs is not None and int(theirs) != int(input_channels):
        return f"{theirs} input channel(s), this training has {input_channels}"
    arch = meta.get("network_arch_class_name")
    if network_arch_class_name and arch and arch.rsplit(".", 1)[-1] != network_arch_class_name.rsplit(".", 1)[-1]:
        return f"network {arch.rsplit('.', 1)[-1]}, this training builds {network_arch_class_name.rsplit('.', 1)[-1]}"
    return None


def choose_default_checkpoint(dataset_name: str, plans_identifier: str, configuration: str,
                              input_channels: int | None = None,
                              network_arch_class_name: str | None = None) -> CheckpointChoice:
    """The one finished MACL pretraining a fine-tuning of ``dataset_name`` uses when none is named.

    In order: a pretraining of this dataset (or a multi-dataset one that lists it); else the one of
    another dataset whose network fits (``input_channels``, ``network_arch_class_name``; ``None``
    skips that check). Raises :class:`CheckpointNotFoundError` (a ``FileNotFoundError``) when
    ``nnUNet_results`` is not set, when nothing fits (the message says where it looked, why each
    candidate was refused, and how to run a pretraining or set ``MACL_PRETRAINED``; an unfinished
    pretraining with only ``checkpoint_latest.pth`` is named), and when several fit (all are listed).
    """
    results_root = os.environ.get("nnUNet_results")
    how = (f"Run the pretraining first: `macl_pretrain -d {dataset_name} -c {configuration} -p {plans_identifier}` "
           f"(or on another dataset with the same configuration and plans name), or name a checkpoint explicitly "
           f"with MACL_PRETRAINED=/path/to/{FINAL_CHECKPOINT}.")
    if not results_root:
        raise CheckpointNotFoundError(
            f"Cannot look up the default MACL checkpoint: the environment variable nnUNet_results is not set. {how}")
    what = f"(plans {plans_identifier}, configuration {configuration})"
    own_pattern = os.path.join(results_root, dataset_name, f"{PRETRAINER_NAME}*__{plans_identifier}__{configuration}")
    other_pattern = os.path.join(results_root, "*", f"{PRETRAINER_NAME}*__{plans_identifier}__{configuration}")
    folders = candidate_folders(results_root, dataset_name, plans_identifier, configuration)
    folders += folders_trained_on(results_root, dataset_name, plans_identifier, configuration)
    finals = [os.path.abspath(os.path.join(f, FINAL_CHECKPOINT)) for f in folders
              if os.path.isfile(os.path.join(f, FINAL_CHECKPOINT))]
    if len(finals) == 1:
        return CheckpointChoice(finals[0], f"the one finished pretraining of {dataset_name} {what}", [own_pattern])
    if len(finals) > 1:
        listing = "\n  ".join(finals)
        raise CheckpointNotFoundError(
            f"Several MACL pretraining checkpoints match {dataset_name} {what}; nothing was trained. "
            f"Choose one with MACL_PRETRAINED=/path/to/{FINAL_CHECKPOINT}:\n  {listing}")
    latest = [os.path.abspath(os.path.join(f, LATEST_CHECKPOINT)) for f in folders
              if os.path.isfile(os.path.join(f, LATEST_CHECKPOINT))]
    if latest:  # this dataset's own pretraining is under way: another dataset's must not be taken instead
        raise CheckpointNotFoundError(
            f"No finished MACL pretraining of {dataset_name} {what}: found only unfinished pretraining "
            f"checkpoint(s): {', '.join(latest)} (finish it, e.g. by resuming the pretraining, or set "
            f"MACL_PRETRAINED to one of them).")

    fitting, refused = [], []
    for folder in other_dataset_folders(results_root, dataset_name, plans_identifier, configuration):
        final = os.path.abspath(os.path.join(folder, FINAL_CHECKPOINT))
        if not os.path.isfile(final):
            if os.path.isfile(os.path.join(folder, LATEST_CHECKPOINT)):
                refused.append(f"{folder} (unfinished: only {LATEST_CHECKPOINT})")
            continue
        why = network_mismatch(final, input_channels, network_arch_class_name)
        (refused.append(f"{final} ({why})") if why else fitting.append(final))
    looked_in = [own_pattern, other_pattern]
    if len(fitting) == 1:
        source = os.path.basename(os.path.dirname(os.path.dirname(fitting[0])))
        return CheckpointChoice(fitting[0], f"no pretraining of {dataset_name}; the one finished pretraining "
                                            f"{what} whose network fits, from {source}", looked_in)
    if len(fitting) > 1:
        listing = "\n  ".join(fitting)
        raise CheckpointNotFoundError(
            f"No pretraining of {dataset_name}, and several MACL pretrainings of other datasets fit it {what}; "
            f"nothing was trained. Choose one with MACL_PRETRAINED=/path/to/{FINAL_CHECKPOINT}:\n  {listing}")
    refusals = (" Refused: " + "; ".join(refused) + ".") if refused else ""
    raise CheckpointNotFoundError(
        f"No MACL pretraining checkpoint found for {dataset_name} {what}; looked in {own_pattern} and "
        f"{other_pattern}.{refusals} {how}")


def find_default_checkpoint(dataset_name: str, plans_identifier: str, configuration: str,
                            input_channels: int | None = None, network_arch_class_name: str | None = None) -> str:
    """The path :func:`choose_default_checkpoint` chooses (same arguments, same errors)."""
    return choose_default_checkpoint(dataset_name, plans_identifier, configuration, input_channels,
                                     network_arch_class_name).path
