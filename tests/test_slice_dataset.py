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
