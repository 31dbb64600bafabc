"""Several nnU-Net preprocessed datasets in one pretraining (``macl_pretrain -d 501 502 503``).

The network comes from one plan; every other dataset must have been preprocessed with a
compatible plan (:func:`check_compatible_plans`: same configuration, input channels and
normalisation), so that its slices or patches are what that network expects. Each dataset keeps
its own slice/patch index (positions stay per volume); the datasets are concatenated
(:class:`MultiSourceDataset`, a torch ``ConcatDataset`` that does not look inside the items, so it
works whatever a dataset item holds) and sampled either proportionally to their sizes (every
sample once per epoch) or balanced (each dataset the same share of every epoch,
:class:`BalancedSourceSampler`).
"""
from __future__ import annotations

import bisect
import os
from typing import Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset

from nnunetv2_macl.data.slice_dataset import EpochPermutationSampler
from nnunetv2_macl.errors import IncompatibleDatasetsError

SAMPLING_MODES = ("proportional", "balanced")


def dataset_id_of(dataset_name: str) -> str:
    """The id to put in an nnU-Net command for ``DatasetXXX_Name`` (the name itself if it has none)."""
    return str(int(dataset_name[7:10])) if dataset_name[7:10].isdigit() else dataset_name


def check_compatible_plans(reference_name: str, reference_plans: dict, reference_dataset_json: dict,
                           name: str, plans: dict, dataset_json: dict, configuration: str,
                           plans_identifier: str) -> None:
    """Raise :class:`IncompatibleDatasetsError` (one line: dataset, field, fixing command) unless
    dataset ``name`` was planned with a configuration ``configuration`` whose input channels and
    normalisation equal those of the reference plan (whose network is pretrained)."""
    did, ref_id = dataset_id_of(name), dataset_id_of(reference_name)
    plans_opt = f" -plans_name {plans_identifier}" if plans_identifier != "nnUNetPlans" else ""
    move = (f"nnUNetv2_move_plans_between_datasets -s {ref_id} -t {did} -sp {plans_identifier} -tp "
            f"{plans_identifier} && nnUNetv2_preprocess -d {did} -c {configuration}{plans_opt}")
    configurations = plans.get("configurations") or {}
    if configuration not in configurations:
        raise IncompatibleDatasetsError(
            f"Dataset {name}: its plans {plans_identifier!r} have no configuration {configuration!r} "
            f"(field 'configurations': {sorted(configurations)}). Fix: {move}")
    n_ref = len(reference_dataset_json.get("channel_names") or reference_dataset_json.get("modality") or {})
    n_this = len(dataset_json.get("channel_names") or dataset_json.get("modality") or {})
    if n_ref != n_this:
        raise IncompatibleDatasetsError(
            f"Dataset {name} has {n_this} input channel(s) (field 'channel_names' of its dataset.json), the "
            f"network planned for {reference_name} takes {n_ref}. No nnU-Net command converts channels: "
            f"pretrain {name} separately (fine-tuning adapts the first convolution to other channel counts)")
    for key in ("normalization_schemes", "use_mask_for_norm"):
        if _resolved(reference_plans, configuration, key) != _resolved(plans, configuration, key):
            raise IncompatibleDatasetsError(
                f"Dataset {name}: configuration {configuration!r} of plans {plans_identifier!r} has {key} "
                f"{_resolved(plans, configuration, key)}, the plan of {reference_name} has "
                f"{_resolved(reference_plans, configuration, key)}. Fix: {move}")


def _resolved(plans: dict, configuration: str, key: str):
    """A configuration's value, following nnU-Net's ``inherits_from``."""
    conf = plans["configurations"][configuration]
    seen = set()
    while key not in conf and "inherits_from" in conf and conf["inherits_from"] not in seen:
        seen.add(conf["inherits_from"])
        conf = plans["configurations"][conf["inherits_from"]]
    value = conf.get(key)
    return list(value) if isinstance(value, (list, tuple)) else value


class MultiSourceDataset(ConcatDataset):
    """Datasets of several nnU-Net datasets, concatenated; items are passed through unchanged.

    ``names[i]`` names dataset ``i``; ``set_epoch`` reaches every part (their crops are seeded by
    their own (seed, epoch, local index)). All parts must have the same number of channels.
    """

    def __init__(self, names: Sequence[str], datasets: Sequence[Dataset]) -> None:
        if len(names) != len(datasets) or not datasets:
            raise ValueError("one name per dataset, at least one dataset")
        super().__init__(list(datasets))
        self.names = list(names)
        channels = {n: getattr(d, "num_channels", None) for n, d in zip(names, datasets)}
        if len(set(channels.values())) > 1:
            raise IncompatibleDatasetsError(f"The datasets have different numbers of channels in their preprocessed "
                                            f"data: {channels}")
        self.num_channels = next(iter(channels.values()))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for d in self.datasets:
            d.set_epoch(epoch)

    @property
    def sizes(self) -> list[int]:
        return [len(d) for d in self.datasets]

    def source_of(self, index: int) -> int:
        return bisect.bisect_right(self.cumulative_sizes, int(index))


def source_shares(sizes: Sequence[int], sampling: str) -> list[float]:
    """Expected fraction of each epoch's samples drawn from each dataset."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if sampling == "balanced":
        return [1.0 / len(sizes)] * len(sizes)
    total = sum(sizes)
    return [s / total for s in sizes]


class BalancedSourceSampler(torch.utils.data.Sampler):
    """Each dataset the same share of every epoch (epoch length = total size, as proportional).

    Per dataset, ``length / D`` local indices are taken from permutations of that dataset repeated
    as needed (small datasets are revisited, large ones subsampled, never the same index twice
    before all were used), then all are shuffled together; the order is a function of
    (seed, epoch). With ``rank``/``world_size`` each process takes an interleaved share, as
    :class:`~nnunetv2_macl.data.slice_dataset.EpochPermutationSampler` does.
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"every dataset needs at least one sample, got sizes {self.sizes}")
        self.offsets = [0]
        for s in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + s)
        self.length = sum(self.sizes)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        d = len(self.sizes)
        quota = [self.length // d + (1 if i < self.length % d else 0) for i in range(d)]
        chosen = []
        for size, offset, q in zip(self.sizes, self.offsets, quota):
            reps = -(-q // size)
            local = torch.cat([torch.randperm(size, generator=g) for _ in range(reps)])[:q]
            chosen.append(local + offset)
        order = torch.cat(chosen)[torch.randperm(self.length, generator=g)].tolist()
        usable = (self.length // self.world_size) * self.world_size
        return iter(order[self.rank:usable:self.world_size])

    def __len__(self) -> int:
        return self.length // self.world_size


def make_sampler(dataset: Dataset, sampling: str, seed: int, rank: int = 0, world_size: int = 1):
    """The epoch sampler for ``dataset``: every sample once per epoch (``proportional``), or each
    source dataset an equal share (``balanced``, only meaningful for a :class:`MultiSourceDataset`)."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if sampling == "balanced" and isinstance(dataset, MultiSourceDataset) and len(dataset.datasets) > 1:
        return BalancedSourceSampler(dataset.sizes, seed, rank, world_size)
    return EpochPermutationSampler(len(dataset), seed, rank, world_size)


def describe_sources(dataset: Dataset, names: Sequence[str], sampling: str) -> list[dict]:
    """``[{dataset_name, samples, share}]`` for the checkpoint and the log (share of an epoch)."""
    sizes = dataset.sizes if isinstance(dataset, MultiSourceDataset) else [len(dataset)]
    shares = source_shares(sizes, sampling)
    return [{"dataset_name": n, "samples": int(s), "share": round(float(f), 6)}
            for n, s, f in zip(names, sizes, shares)]


DATASETS_FILE = "pretraining_datasets.json"


def datasets_file(output_folder: str) -> str:
    """The file in a pretraining's output folder that lists every dataset it was trained on (read by
    the fine-tuning's default checkpoint lookup)."""
    return os.path.join(output_folder, DATASETS_FILE)
