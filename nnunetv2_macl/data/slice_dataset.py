"""Slices (2-D configurations) and patches (3-D configurations) of nnU-Net preprocessed cases,
each with its normalised position, for position-based contrastive pretraining (PCL / MACL).

Cases are read through nnU-Net's own dataset classes (``infer_dataset_class``: blosc2 ``.b2nd`` or
the older ``.npz``/``.npy`` layout). Only image data is opened: never the ``_seg`` files (they may
not exist for unlabeled data) and never the ``.pkl`` properties (no unpickling is needed).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from nnunetv2.training.dataloading.nnunet_dataset import (
    infer_dataset_class, nnUNetDatasetBlosc2, nnUNetDatasetNumpy)
from nnunetv2_macl.errors import DatasetError


def open_case_array(dataset_class: type, folder: str, identifier: str, part: str = "data"):
    """Open one array of a case: its image (``part="data"``) or its labels (``"seg"``), memory-mapped where
    the layout allows. Never the ``.pkl`` properties (nnU-Net's ``load_case`` would unpickle them)."""
    if part not in ("data", "seg"):
        raise ValueError(f"part must be 'data' or 'seg', got {part!r}")
    name = identifier if part == "data" else identifier + "_seg"
    try:
        if dataset_class is nnUNetDatasetBlosc2:
            import blosc2
            blosc2.set_nthreads(1)
            kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}
            return blosc2.open(urlpath=os.path.join(folder, name + ".b2nd"), mode="r",
                               dparams={"nthreads": 1}, **kwargs)
        if dataset_class is nnUNetDatasetNumpy:
            npy = os.path.join(folder, name + ".npy")
            if os.path.isfile(npy):
                return np.load(npy, mmap_mode="r")
            with np.load(os.path.join(folder, identifier + ".npz"), allow_pickle=False) as f:
                return f[part]
    except Exception as e:  # noqa: BLE001 - blosc2/numpy raise many types for unreadable files
        msg = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        what = "" if part == "data" else " (labels)"
        raise DatasetError(f"Cannot read preprocessed case {identifier!r}{what} in {folder} ({type(e).__name__}: "
                           f"{msg[:200]}); rerun nnU-Net's preprocessing for this dataset") from None
    raise DatasetError(f"Unsupported nnU-Net dataset class {dataset_class.__name__}")


def _open_image(dataset_class: type, folder: str, identifier: str):
    """Open only the image array of a case (memory-mapped where the layout allows)."""
    return open_case_array(dataset_class, folder, identifier, "data")


def list_cases(folder: str) -> tuple[type, list[str]]:
    """nnU-Net's dataset class for ``folder`` and its case identifiers (sorted)."""
    if not os.path.isdir(folder):
        raise DatasetError(f"Preprocessed data folder does not exist: {folder}")
    files = [f for f in os.listdir(folder) if f.endswith((".b2nd", ".npz", ".npy"))]
    if not files:
        raise DatasetError(f"Empty dataset: no preprocessed cases (.b2nd/.npz) in {folder}; run nnU-Net's "
                           f"preprocessing (nnUNetv2_preprocess) for this dataset and configuration")
    # _seg files may have been removed (unlabeled data): nnU-Net's inference only needs image files
    try:
        dataset_class = infer_dataset_class(folder)
    except (AssertionError, KeyError, IndexError):
        endings = sorted({f.rsplit(".", 1)[-1] for f in os.listdir(folder) if "." in f})
        raise DatasetError(f"Cannot tell the nnU-Net data layout of {folder}: expected only .b2nd (or only .npz) "
                           f"case files besides .pkl/.npy, found endings {endings}; remove foreign files") from None
    identifiers = sorted(dataset_class.get_identifiers(folder))
    if not identifiers:
        raise DatasetError(f"Empty dataset: no preprocessed cases in {folder}")
    return dataset_class, identifiers


def case_shapes(dataset_class: type, folder: str, identifiers: Sequence[str]) -> tuple[int, list[tuple[int, ...]]]:
    """Channel count and spatial (Z, Y, X) shape of every case, checking that all are 4-D, non-empty
    and have the same number of channels."""
    num_channels = None
    shapes = []
    for identifier in identifiers:
        arr = _open_image(dataset_class, folder, identifier)
        if arr.ndim != 4:
            raise DatasetError(f"Case {identifier}: expected a (C, Z, Y, X) array, got shape {tuple(arr.shape)}")
        if num_channels is None:
            num_channels = int(arr.shape[0])
        elif int(arr.shape[0]) != num_channels:
            raise DatasetError(f"Case {identifier} has {int(arr.shape[0])} channels, the first case "
                               f"{identifiers[0]} has {num_channels}")
        if any(int(d) < 1 for d in arr.shape[1:]):
            raise DatasetError(f"Case {identifier} is empty (shape {tuple(arr.shape)})")
        shapes.append(tuple(int(d) for d in arr.shape[1:]))
    return num_channels, shapes


def _fit(arr: np.ndarray, crop: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random crop where larger than ``crop``, centred zero padding where smaller (last len(crop) axes).

    Returns the fitted array and its content mask (1, *crop): 1 where it holds image, 0 on padding."""
    nd = len(crop)
    spatial = arr.shape[-nd:]
    slices = [slice(None)] * (arr.ndim - nd)
    pads = [(0, 0)] * (arr.ndim - nd)
    for size, c in zip(spatial, crop):
        if size > c:
            start = int(rng.integers(0, size - c + 1))
            slices.append(slice(start, start + c))
            pads.append((0, 0))
        else:
            slices.append(slice(None))
            before = (c - size) // 2
            pads.append((before, c - size - before))
    out = arr[tuple(slices)]
    content = np.ones((1,) + out.shape[-nd:], dtype=np.float32)
    if any(p != (0, 0) for p in pads):
        out = np.pad(out, pads)
        content = np.pad(content, [(0, 0)] + pads[-nd:])
    return out, content


class PretrainSliceDataset(Dataset):
    """Every 2-D slice of every case, along the axis nnU-Net's 2-D configuration slices (axis 0 of
    the preprocessed (transposed) array), with position p = (i + 1) / n_slices.

    Item k -> (image (C, *crop) float32, position (1,) float32, content (1, *crop) float32: 1 on
    image, 0 on the zero padding of slices smaller than the crop). Where a slice is larger than the
    crop, the crop offset is drawn once per volume and epoch, from a generator seeded by (seed, epoch,
    volume): all slices of one volume in an epoch (and so in a batch) show the same window, and the
    dense loss's location s is the same anatomy in slices whose positions make them positives
    (METHOD.md). A resumed run sees the same data.

    Single-slice cases have no defined position and are refused unless ``allow_single_slice``
    (instance positives, i.e. SimCLR, never look at positions; such a slice gets position 1).
    """

    def __init__(self, folder: str, crop_size: Sequence[int], identifiers: Sequence[str] | None = None,
                 seed: int = 0, allow_single_slice: bool = False) -> None:
        self.folder = folder
        self.dataset_class, all_ids = list_cases(folder)
        self.identifiers = list(identifiers) if identifiers is not None else all_ids
        self.crop_size = [int(c) for c in crop_size]
        self.seed = seed
        self.epoch = 0
        self._arrays: dict[str, object] = {}  # opened lazily per worker process
        case_index, slice_index, positions = [], [], []
        self.num_channels, shapes = case_shapes(self.dataset_class, folder, self.identifiers)
        for ci, (identifier, shape) in enumerate(zip(self.identifiers, shapes)):
            n = shape[0]
            if n < 2 and not allow_single_slice:
                raise DatasetError(
                    f"Case {identifier} has a single slice along the slicing axis: slice positions are undefined, "
                    f"so position-based positives (MACL/PCL) cannot be formed. Remove such cases or pretrain with "
                    f"SimCLR positives (instance positives only, positions unused): --method simclr")
            case_index.append(np.full(n, ci))
            slice_index.append(np.arange(n))
            positions.append((np.arange(n) + 1) / n)
        self.case_index = np.concatenate(case_index)
        self.slice_index = np.concatenate(slice_index)
        self.positions = np.concatenate(positions).astype(np.float32)

    def __len__(self) -> int:
        return len(self.case_index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _array(self, identifier: str):
        arr = self._arrays.get(identifier)
        if arr is None:
            arr = _open_image(self.dataset_class, self.folder, identifier)
            self._arrays[identifier] = arr
        return arr

    def __getstate__(self):  # open handles are not sent to worker processes
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __getitem__(self, k: int):
        volume = int(self.case_index[k])
        identifier = self.identifiers[volume]
        z = int(self.slice_index[k])
        image = np.asarray(self._array(identifier)[:, z], dtype=np.float32)
        rng = np.random.default_rng((self.seed, self.epoch, volume))  # one crop offset per volume and epoch
        image, content = _fit(image, self.crop_size, rng)
        return (torch.from_numpy(np.ascontiguousarray(image)), torch.tensor([self.positions[k]]),
                torch.from_numpy(content))


class PretrainPatchDataset(Dataset):
    """3-D patches of nnU-Net preprocessed cases with their normalised centre coordinates as
    positions (beyond the paper: positives are patches within the threshold on every axis).

    ``patches_per_case`` patches per case and epoch. A patch is centred exactly on a voxel c drawn
    uniformly over the volume (zero padding where it reaches outside, as nnU-Net's own patch
    sampling allows), so its position ``(c + 1) / shape`` per axis (axis order of the preprocessed,
    transposed array, as ``PretrainSliceDataset``'s slice position is along axis 0) always
    describes the centre of what the patch shows, also near the borders and when the patch is
    larger than the volume. The centre is drawn from a generator seeded by (seed, epoch, k).

    Item k -> (image (C, *patch) float32, position (3,) float32 in (0, 1], content (1, *patch)
    float32: 1 inside the volume, 0 on the padding).
    """

    def __init__(self, folder: str, patch_size: Sequence[int], identifiers: Sequence[str] | None = None,
                 patches_per_case: int = 4, seed: int = 0) -> None:
        self.folder = folder
        self.dataset_class, all_ids = list_cases(folder)
        self.identifiers = list(identifiers) if identifiers is not None else all_ids
        self.patch_size = [int(p) for p in patch_size]
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise DatasetError(f"3-D patches need three positive sizes, got {list(patch_size)}")
        if int(patches_per_case) < 1:
            raise DatasetError(f"patches_per_case must be >= 1, got {patches_per_case}")
        self.patches_per_case = int(patches_per_case)
        self.seed = seed
        self.epoch = 0
        self._arrays: dict[str, object] = {}
        self.num_channels, self.shapes = case_shapes(self.dataset_class, folder, self.identifiers)

    def __len__(self) -> int:
        return len(self.identifiers) * self.patches_per_case

    set_epoch = PretrainSliceDataset.set_epoch
    _array = PretrainSliceDataset._array
    __getstate__ = PretrainSliceDataset.__getstate__

    def centre(self, k: int) -> list[int]:
        """The voxel (per axis) that item ``k`` of the current epoch is centred on."""
        shape = self.shapes[int(k) // self.patches_per_case]
        rng = np.random.default_rng((self.seed, self.epoch, int(k)))
        return [int(rng.integers(0, s)) for s in shape]

    def __getitem__(self, k: int):
        ci = int(k) // self.patches_per_case
        identifier = self.identifiers[ci]
        shape = self.shapes[ci]
        centre = self.centre(k)
        # the window [c - p//2, c - p//2 + p) per axis: its voxel p//2 is the centre; the part inside
        # the volume is read, the rest is zero padding
        start = [c - p // 2 for c, p in zip(centre, self.patch_size)]
        lo = [max(0, a) for a in start]
        hi = [min(s, a + p) for s, a, p in zip(shape, start, self.patch_size)]
        arr = self._array(identifier)
        image = np.asarray(arr[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))], dtype=np.float32)
        pads = [(0, 0)] + [(a - s0, s0 + p - b) for a, b, s0, p in zip(lo, hi, start, self.patch_size)]
        content = np.ones((1,) + image.shape[1:], dtype=np.float32)
        if any(p != (0, 0) for p in pads):
            image = np.pad(image, pads)
            content = np.pad(content, pads)
        position = [(c + 1) / s for c, s in zip(centre, shape)]
        return (torch.from_numpy(np.ascontiguousarray(image)), torch.tensor(position, dtype=torch.float32),
                torch.from_numpy(content))


class EpochPermutationSampler(torch.utils.data.Sampler):
    """Every index exactly once per epoch, in an order fixed by (seed, epoch); with ``rank``/
    ``world_size`` each process takes an interleaved share (a distributed sampler that stays
    deterministic across resumes)."""

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        usable = (self.length // self.world_size) * self.world_size
        return iter(order[self.rank:usable:self.world_size])

    def __len__(self) -> int:
        return self.length // self.world_size
