"""LER leaves out the bottleneck cells that are mostly zero padding, exactly as Ld does (issue 27).

Where the slice is smaller than the crop, the padding layout is nearly the same in every slice; an LER
that centres and compares over padded cells can be lowered by reproducing that layout, without looking at
the image. With a content mask the channel means and the L1 run over content cells only: cells whose
area-averaged content is below one half on the dominant bottleneck grid (``content_cells``, Ld's rule).
"""
from __future__ import annotations

import math

import pytest
import torch

from nnunetv2_macl.losses import MultiLevelContrastiveLoss
from nnunetv2_macl.losses.dense_contrastive import content_cells
from nnunetv2_macl.losses.equivariance import equivariance_loss, pair_cells
from nnunetv2_macl.training.diagnostics import ler_references

N, C = 3, 8
CROP = (64, 64)
SMALL = (4, 4)  # dominant grid: cell j on crop pixel 16 j
LARGE = (8, 8)  # auxiliary grid, k = 2


def padded_content(boxes) -> torch.Tensor:
    """(N, 1, *CROP) content mask: 1 inside each sample's (y0, y1, x0, x1) box, 0 elsewhere."""
    content = torch.zeros(len(boxes), 1, *CROP)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        content[i, 0, y0:y1, x0:x1] = 1
    return content


# a centred 32 x 32 slice (3 content cells), a 48 x 24 one off centre (3), and one filling the crop
BOXES = [(16, 48, 16, 48), (0, 48, 20, 44), (0, 64, 0, 64)]


def _maps(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, *SMALL, generator=g), torch.randn(N, C, *LARGE, generator=g)


def _hand_paired(y_tilde: torch.Tensor) -> torch.Tensor:
    """down() for k = 2, written out: dominant cell j <- mean of auxiliary cells 2j-1 .. 2j+1 that exist."""
    out = torch.empty(y_tilde.shape[0], y_tilde.shape[1], *SMALL, dtype=y_tilde.dtype)
    for i in range(SMALL[0]):
        for j in range(SMALL[1]):
            rows = slice(max(2 * i - 1, 0), min(2 * i + 2, LARGE[0]))
            cols = slice(max(2 * j - 1, 0), min(2 * j + 2, LARGE[1]))
            out[:, :, i, j] = y_tilde[:, :, rows, cols].mean(dim=(2, 3))
    return out


def reference_ler(y: torch.Tensor, paired: torch.Tensor, cells: torch.Tensor) -> float:
    """Centre each channel over the sample's content cells, L2-normalise each cell's channel vector, L1
    summed over channels / sqrt(C), mean over the content cells of the samples with at least two."""
    total, count = 0.0, 0
    for n in range(y.shape[0]):
        m = cells[n].reshape(-1)
        if int(m.sum()) < 2:
            continue
        a = y[n].double().reshape(C, -1)[:, m]
        b = paired[n].double().reshape(C, -1)[:, m]
        a = a - a.mean(dim=1, keepdim=True)
        b = b - b.mean(dim=1, keepdim=True)
        a = a / a.norm(dim=0, keepdim=True)
        b = b / b.norm(dim=0, keepdim=True)
        total += float((a - b).abs().sum()) / math.sqrt(C)
        count += int(m.sum())
    return total / count if count else 0.0


def _free_auxiliary(cells: torch.Tensor) -> torch.Tensor:
    """(N, 1, *LARGE) bool: auxiliary cells in no window of a content dominant cell."""
    probe = torch.ones(N, 1, *LARGE, requires_grad=True)
    (pair_cells(probe, SMALL).reshape(N, -1) * cells.float()).sum().backward()
    return probe.grad == 0


def test_the_mask_is_lds_rule_on_the_dominant_grid():
    content = padded_content(BOXES)
    cells = content_cells(content, SMALL)
    # the centred 32 x 32 slice (pixels 16..47): per axis, the window 8..24 of pixel 16 holds 9/17 content,
    # that of pixel 32 all, that of pixel 48 (40..56) 8/17; in 2-D the fractions multiply (9/17)^2 < 1/2
    assert cells[0].reshape(SMALL).int().tolist() == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert cells.sum(dim=1).tolist() == [3, 3, 16]
    y, y_tilde = _maps()
    assert equivariance_loss(y, y_tilde, content=content).item() == pytest.approx(
        equivariance_loss(y, y_tilde, cells=cells).item(), abs=1e-7)
    assert equivariance_loss(y, y_tilde, cells=cells.reshape(N, *SMALL).float()).item() == pytest.approx(
        equivariance_loss(y, y_tilde, cells=cells).item(), abs=1e-7)
    with pytest.raises(ValueError, match="not both"):
        equivariance_loss(y, y_tilde, content=content, cells=cells)
    with pytest.raises(ValueError, match="cells must have shape"):
        equivariance_loss(y, y_tilde, cells=cells[:, :5])


def test_values_in_padded_cells_do_not_change_the_masked_loss():
    content = padded_content(BOXES)
    cells = content_cells(content, SMALL)
    y, y_tilde = _maps()
    padded = ~cells.reshape(N, 1, *SMALL)
    free = _free_auxiliary(cells)
    assert padded.any() and free.any()
    g = torch.Generator().manual_seed(5)
    y2 = torch.where(padded, 1e3 * torch.randn(y.shape, generator=g) + 7.0, y)
    y2[0, :, 0, 0] = float("inf")  # not even inf or nan leaks through
    y2[1, :, 3, 0] = float("nan")
    y_tilde2 = torch.where(free, -50.0 * torch.randn(y_tilde.shape, generator=g), y_tilde)
    masked = equivariance_loss(y, y_tilde, content=content).item()
    assert equivariance_loss(y2, y_tilde2, content=content).item() == pytest.approx(masked, abs=1e-6)
    # without the mask the padded cells count: in the means and in the average
    y3 = torch.where(padded, 1e3 * torch.randn(y.shape, generator=g) + 7.0, y)
    assert abs(equivariance_loss(y3, y_tilde2).item() - equivariance_loss(y, y_tilde).item()) > 0.01
    assert abs(equivariance_loss(y, y_tilde).item() - masked) > 1e-3


@pytest.mark.parametrize("same_size", [False, True])
def test_masked_loss_equals_the_written_out_reference(same_size):
    content = padded_content(BOXES)
    cells = content_cells(content, SMALL)
    y, y_tilde = _maps(seed=3)
    if same_size:
        y_tilde = y_tilde[:, :, ::2, ::2].contiguous() + 0.3 * y
        paired = y_tilde
    else:
        paired = _hand_paired(y_tilde)
    expected = reference_ler(y, paired, cells)
    assert 0.3 < expected < 2.0
    assert equivariance_loss(y, y_tilde, content=content).item() == pytest.approx(expected, rel=1e-5)


def test_all_ones_mask_is_the_unmasked_loss_and_no_mask_is_unchanged():
    y, y_tilde = _maps(seed=4)
    unmasked = equivariance_loss(y, y_tilde)
    ones = torch.ones(N, 1, *CROP)
    assert equivariance_loss(y, y_tilde, content=ones).item() == pytest.approx(unmasked.item(), rel=1e-6)
    assert equivariance_loss(y, y_tilde, cells=torch.ones(N, *SMALL, dtype=torch.bool)).item() == pytest.approx(
        unmasked.item(), rel=1e-6)
    # None: the former loss, formula for formula (mean over every location)
    paired = _hand_paired(y_tilde)

    def directions(t):
        flat = t.flatten(2)
        return torch.nn.functional.normalize(flat - flat.mean(dim=2, keepdim=True), dim=1)

    former = (directions(y) - directions(paired)).abs().sum(dim=1).mean() / math.sqrt(C)
    assert unmasked.item() == pytest.approx(former.item(), rel=1e-6)


def test_samples_without_two_content_cells_are_left_out_finitely():
    y, y_tilde = _maps(seed=6)
    y.requires_grad_(True)
    y_tilde.requires_grad_(True)
    # sample 0 all padding, sample 1 one content cell (nothing to centre), sample 2 full
    content = padded_content([(0, 0, 0, 0), (24, 41, 24, 41), (0, 64, 0, 64)])
    cells = content_cells(content, SMALL)
    assert cells.sum(dim=1).tolist() == [0, 1, 16]
    loss = equivariance_loss(y, y_tilde, content=content)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(equivariance_loss(y[2:], y_tilde[2:]).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(y.grad).all() and torch.isfinite(y_tilde.grad).all()
    assert (y.grad[:2] == 0).all() and (y_tilde.grad[:2] == 0).all()
    # no sample left: 0, with a graph and zero (finite) gradients
    y.grad = y_tilde.grad = None
    empty = equivariance_loss(y, y_tilde, content=torch.zeros(N, 1, *CROP))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert (y.grad == 0).all() and (y_tilde.grad == 0).all()


def test_gradient_is_zero_on_padded_cells():
    content = padded_content(BOXES)
    cells = content_cells(content, SMALL)
    y, y_tilde = _maps(seed=7)
    y.requires_grad_(True)
    y_tilde.requires_grad_(True)
    equivariance_loss(y, y_tilde, content=content).backward()
    padded = ~cells.reshape(N, *SMALL)
    per_cell = y.grad.abs().sum(dim=1)  # (N, *SMALL)
    assert (per_cell[padded] == 0).all()
    assert (per_cell[~padded] > 0).all()
    free = _free_auxiliary(cells)[:, 0]
    aux = y_tilde.grad.abs().sum(dim=1)
    assert (aux[free] == 0).all() and (aux[~free] > 0).all()


def test_multilevel_loss_passes_the_content_mask_to_ler():
    content = padded_content(BOXES)
    y, y_tilde = _maps(seed=8)
    loss = MultiLevelContrastiveLoss((0.0, 0.0, 1.0))
    outputs = {"bottleneck_dominant": y, "bottleneck_auxiliary": y_tilde}
    _, with_mask = loss(outputs, None, content)
    _, without = loss(outputs, None)
    assert with_mask["LER"].item() == pytest.approx(equivariance_loss(y, y_tilde, content=content).item(), rel=1e-6)
    assert without["LER"].item() == pytest.approx(equivariance_loss(y, y_tilde).item(), rel=1e-6)
    assert abs(with_mask["LER"].item() - without["LER"].item()) > 1e-3


def test_ler_all_cells_switch_gives_the_unmasked_loss_and_reaches_the_cli():
    from nnunetv2_macl.run.pretrain import build_parser, config_from_args

    content = padded_content(BOXES)
    y, y_tilde = _maps(seed=10)
    outputs = {"bottleneck_dominant": y, "bottleneck_auxiliary": y_tilde}
    _, all_cells = MultiLevelContrastiveLoss((0.0, 0.0, 1.0), ler_content_mask=False)(outputs, None, content)
    assert all_cells["LER"].item() == pytest.approx(equivariance_loss(y, y_tilde).item(), rel=1e-6)
    _, masked = MultiLevelContrastiveLoss((0.0, 0.0, 1.0))(outputs, None, content)
    assert abs(masked["LER"].item() - all_cells["LER"].item()) > 1e-3
    assert config_from_args(build_parser().parse_args(["-d", "1"])).ler_content_mask is True
    assert config_from_args(build_parser().parse_args(["-d", "1", "--ler-all-cells"])).ler_content_mask is False


def test_unpaired_reference_is_blind_to_a_shared_padding_layout():
    """Maps that agree only on the padding (the same vector there in every slice) and are unrelated on the
    image: without the mask even the unpaired reference looks 'equivariant'; with it, it is chance."""
    g = torch.Generator().manual_seed(9)
    n = 8
    content = padded_content([(16, 48, 8, 56)] * n)  # 5 content cells of 16
    cells = content_cells(content, SMALL).reshape(n, 1, *SMALL)
    layout = torch.randn(1, 64, *SMALL, generator=g) * 5
    y = torch.where(cells, torch.randn(n, 64, *SMALL, generator=g), layout)
    y_tilde = torch.where(cells, torch.randn(n, 64, *SMALL, generator=g), layout)  # same grid: compared as is
    paired, unpaired = ler_references(y, y_tilde, content)
    assert unpaired == pytest.approx(2 / math.sqrt(math.pi), abs=0.1)  # unrelated maps
    assert paired == pytest.approx(2 / math.sqrt(math.pi), abs=0.1)
    assert equivariance_loss(y, y_tilde.roll(1, dims=0)).item() < 0.8  # the padding layout lowered it
    # the unpaired reference compares cells that are content in both samples
    mixed = padded_content([(16, 48, 8, 56), (0, 64, 0, 64)] * (n // 2))
    both = content_cells(mixed, SMALL)
    _, unpaired = ler_references(y, y_tilde, mixed)
    expected = equivariance_loss(y, y_tilde.roll(1, dims=0), cells=both & both.roll(1, dims=0)).item()
    assert unpaired == pytest.approx(expected, rel=1e-6)
    # nothing to compare: nan, not a value that reads as 'equivariant'
    assert all(math.isnan(v) for v in ler_references(y, y_tilde, torch.zeros(n, 1, *CROP)))
    assert ler_references(y, y_tilde, None) == (pytest.approx(equivariance_loss(y, y_tilde).item()),
                                                pytest.approx(equivariance_loss(y, y_tilde.roll(1, 0)).item()))


def test_the_pretrainer_gives_ler_the_batch_content_mask(tiny_dataset, tmp_path, monkeypatch):
    """One CPU step on slices of 32 x 32 in a 64 x 64 crop: LER receives the batch's content mask, and the
    diagnostics' LER references the same mask."""
    import json

    import nnunetv2_macl.losses.multilevel as multilevel
    import nnunetv2_macl.training.diagnostics as diagnostics
    from nnunetv2_macl.training.config import MACLConfig
    from nnunetv2_macl.training.pretrainer import MACLPretrainer

    with open(tiny_dataset["plans_file"]) as f:
        plans = json.load(f)
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    arch.update(n_stages=4, features_per_stage=[4, 8, 8, 16], kernel_sizes=[[3, 3]] * 4,
                strides=[[1, 1]] + [[2, 2]] * 3, n_conv_per_stage=[1] * 4, n_conv_per_stage_decoder=[1] * 3)
    with open(tiny_dataset["preprocessed"] / "dataset.json") as f:
        dataset_json = json.load(f)
    cfg = MACLConfig(epochs=1, batch_size=4, num_workers=0, decoder_blocks=1, crop_size=[64, 64])
    trainer = MACLPretrainer(plans, "2d", dataset_json, str(tiny_dataset["preprocessed"]), str(tmp_path / "out"),
                             cfg, torch.device("cpu"))
    trainer.initialize()
    calls = []
    real = multilevel.equivariance_loss

    def spy(y, y_tilde, content=None, cells=None):
        value = real(y, y_tilde, content, cells)
        calls.append((y.detach(), y_tilde.detach(), content, value.detach()))
        return value

    monkeypatch.setattr(multilevel, "equivariance_loss", spy)
    trainer.on_epoch_start()
    trainer._iteration = 0
    images, positions, content = next(iter(trainer.dataloader))
    assert content.min() == 0  # the slices (32 x 32 here) are padded into the crop
    components = trainer.train_step(images, positions, content)
    assert len(calls) == 1
    y, y_tilde, seen, value = calls[0]
    assert seen is not None and torch.equal(seen.cpu(), content)
    assert tuple(y.shape[2:]) == (4, 4)  # crop / (k = 2 x stride 8)
    cells = content_cells(content, y.shape[2:])
    assert 2 <= int(cells[0].sum()) < 16
    assert float(components["LER"]) == pytest.approx(float(value), rel=1e-6)
    assert float(value) == pytest.approx(float(equivariance_loss(y, y_tilde, cells=cells)), rel=1e-5)
    assert abs(float(value) - float(equivariance_loss(y, y_tilde))) > 1e-4

    masks = []
    real_diag = diagnostics.equivariance_loss

    def spy_diag(y, y_tilde, content=None, cells=None):
        masks.append(cells)
        return real_diag(y, y_tilde, content, cells)

    monkeypatch.setattr(diagnostics, "equivariance_loss", spy_diag)
    d = trainer.compute_diagnostics()
    _, _, diag_content = trainer._diagnostic_batch
    diag_cells = content_cells(diag_content, (4, 4))
    assert len(masks) == 2 and torch.equal(masks[0], diag_cells)
    assert torch.equal(masks[1], diag_cells & diag_cells.roll(1, dims=0))
    assert math.isfinite(d["LER"]) and math.isfinite(d["LER_unpaired"])
