"""2-D slices through the pretraining loader: positions and padding masks."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from nnunetv2_macl.data.slice_dataset import PretrainSliceDataset


def test_slice_i_of_n_carries_position_i_plus_1_over_n_through_the_loader(tiny_dataset):
    folder = str(tiny_dataset["data_folder"])
    probe = PretrainSliceDataset(folder, [1, 1])
    shape = np.asarray(probe._array(probe.identifiers[0])).shape[2:]
    ds = PretrainSliceDataset(folder, list(shape))  # crop = slice: every item is one whole slice
    loader = DataLoader(ds, batch_size=5, shuffle=False, num_workers=0)
    k = 0
    for images, positions, content in loader:
        for image, position in zip(images, positions):
            identifier = ds.identifiers[int(ds.case_index[k])]
            volume = np.asarray(ds._array(identifier))
            n = volume.shape[1]
            matches = [z for z in range(n) if np.array_equal(volume[:, z], image.numpy())]
            assert matches, f"item {k} is no slice of {identifier}"
            z = matches[0]
            assert position.item() == np.float32((z + 1) / n)
            k += 1
        assert bool((content == 1).all())  # no padding when the crop is the slice
    assert k == len(ds)


def test_padding_is_marked_in_the_content_mask(tiny_dataset):
    folder = str(tiny_dataset["data_folder"])
    probe = PretrainSliceDataset(folder, [1, 1])
    h, w = np.asarray(probe._array(probe.identifiers[0])).shape[2:]
    ds = PretrainSliceDataset(folder, [h, 2 * w])  # half of every crop is padding
    image, _, content = ds[0]
    assert tuple(content.shape) == (1, h, 2 * w)
    assert content.mean().item() == 0.5
    assert torch.all(image[:, content[0] == 0] == 0)


def _offset(volume: np.ndarray, z: int, crop: np.ndarray) -> tuple[int, int]:
    """Where ``crop`` (C, h, w) lies in slice z of ``volume`` (C, Z, H, W)."""
    h, w = crop.shape[1:]
    H, W = volume.shape[2:]
    hits = [(a, b) for a in range(H - h + 1) for b in range(W - w + 1)
            if np.array_equal(volume[:, z, a:a + h, b:b + w], crop)]
    assert len(hits) >= 1
    return hits[0]


def test_slices_larger_than_the_crop_share_one_offset_per_volume_and_epoch(tiny_dataset):
    """Heart or abdominal slices are larger than the crop: all slices of one volume get the same window
    in an epoch (so the dense loss's location s is the same anatomy in position positives), volumes and
    epochs get their own."""
    folder = str(tiny_dataset["data_folder"])
    probe = PretrainSliceDataset(folder, [1, 1])
    h, w = np.asarray(probe._array(probe.identifiers[0])).shape[2:]
    crop = [h // 2, w // 2]
    ds = PretrainSliceDataset(folder, crop, seed=3)
    offsets: dict[tuple[int, int], set] = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for k in range(len(ds)):
            image, _, content = ds[k]
            assert bool((content == 1).all())
            volume_index = int(ds.case_index[k])
            volume = np.asarray(ds._array(ds.identifiers[volume_index]))
            if not np.any(image.numpy()):
                continue  # an empty crop fits anywhere
            offsets.setdefault((epoch, volume_index), set()).add(_offset(volume, int(ds.slice_index[k]), image.numpy()))
    assert all(len(found) == 1 for found in offsets.values()), offsets
    assert len({next(iter(v)) for v in offsets.values()}) > 1  # volumes and epochs are not all alike
