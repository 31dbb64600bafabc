"""The image-level loss must be able to learn on nnU-Net's InstanceNorm networks: the descriptor,
the shared PCL/SimCLR head, the chance value and the collapse diagnostics (issue: pretraining that
learns). The real-data proof is in docs/RESULTS.md."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from nnunetv2_macl.losses import equivariance_loss, masked_supcon_loss, position_positive_mask
from nnunetv2_macl.losses.dense_contrastive import content_cells
from nnunetv2_macl.model.projectors import GlobalDescriptor
from nnunetv2_macl.training.diagnostics import (
    contrastive_chance, diagnostic_indices, embedding_diagnostics, is_collapsed, mean_pairwise_cosine)

from test_ablations import one_step


def _instance_normalised_maps(n: int = 8, c: int = 16, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 5
    return nn.functional.leaky_relu(nn.InstanceNorm2d(c)(x), 0.01)


def test_average_pool_of_instance_normalised_maps_is_nearly_image_independent_max_pool_is_not():
    maps = _instance_normalised_maps()
    spatial_spread = torch.flatten(maps, 2).std(dim=2).mean()
    avg = GlobalDescriptor(16, "avg")(maps)
    mx = GlobalDescriptor(16, "max")(maps)
    assert avg.std(dim=0).mean() < 0.25 * spatial_spread
    assert mx.std(dim=0).mean() > 0.25 * spatial_spread
    assert mean_pairwise_cosine(avg) > mean_pairwise_cosine(mx)


def test_attention_pooling_is_a_weighted_mean():
    pool = GlobalDescriptor(3, "attention")
    constant = torch.full((2, 3, 4, 4), 2.5)
    torch.testing.assert_close(pool(constant), torch.full((2, 3), 2.5))
    x = torch.randn(2, 3, 4, 4)
    out = pool(x)
    assert bool(((out >= x.flatten(2).amin(2) - 1e-6) & (out <= x.flatten(2).amax(2) + 1e-6)).all())
    with pytest.raises(ValueError, match="pooling"):
        GlobalDescriptor(3, "median")


def test_chance_value_is_the_loss_of_identical_embeddings():
    for b in (2, 5, 16):
        features = torch.ones(2 * b, 8)
        positions = torch.linspace(0.05, 0.95, b).repeat(2)
        loss = masked_supcon_loss(features, position_positive_mask(positions, 0.1))
        assert loss.item() == pytest.approx(contrastive_chance(2 * b), rel=1e-5)
    assert contrastive_chance(32) == pytest.approx(math.log(31))
    assert is_collapsed(math.log(31) * 0.985, math.log(31)) and not is_collapsed(math.log(31) * 0.9, math.log(31))
    assert not is_collapsed(math.log(31) * 2, math.log(31))  # far above chance (e.g. at init): not that state


def dense_chance_reference(cells: torch.Tensor, contrast: str) -> float:
    """Ld of equal features (every similarity ties) from the content cells (N, S) alone: an anchor with k
    tied terms in its denominator and a positive contributes log(k).

    - "slices" (eq. 12): at a location with n valid slices, 2 n rows; each anchor has its other view as a
      positive and 2 n - 1 terms; mean over the locations that have a valid slice;
    - "locations": all valid rows of both branches, but an anchor leaves out itself and the same cell of the
      other slices (both branches); mean over the valid anchors (no cell is drawn when all fit).
    """
    n, s = cells.shape
    if contrast == "slices":
        values = [math.log(2 * k - 1) for k in cells.sum(0).tolist() if k > 0]
    else:
        rows = 2 * int(cells.sum())
        values = [math.log(rows - 1 - 2 * (int(cells[:, loc].sum()) - 1))
                  for i in range(n) for loc in range(s) if cells[i, loc] for _ in range(2)]
    return sum(values) / len(values)


def test_mean_pairwise_cosine():
    assert mean_pairwise_cosine(torch.ones(4, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(3)) == pytest.approx(0.0, abs=1e-7)


def test_diagnostic_batch_spreads_over_volumes():
    case_index = [0] * 10 + [1] * 3 + [2] * 5
    picked = diagnostic_indices(case_index, 4, seed=1)
    assert len(set(picked)) == 4
    assert {case_index[i] for i in picked} == {0, 1, 2}
    assert picked == diagnostic_indices(case_index, 4, seed=1)


@pytest.mark.parametrize("method", ["pcl", "simclr"])
def test_pcl_and_simclr_share_one_projection_head(tiny_dataset, tmp_path, method):
    trainer, components, changed = one_step(tiny_dataset, tmp_path, method=method)
    macl = trainer.macl
    assert macl.global_head_auxiliary is None
    assert not any(k.startswith("global_head_auxiliary.") for k in macl.state_dict())
    images = torch.randn(3, 1, *trainer.crop_size)
    out = macl(images, images, images, images, need=("global",))
    torch.testing.assert_close(out["global_dominant"], out["global_auxiliary"])  # same views, same head
    assert any(k.startswith("global_head_dominant.") for k in changed)


def test_macl_keeps_two_heads(tiny_dataset, tmp_path):
    trainer, _, changed = one_step(tiny_dataset, tmp_path)
    assert trainer.macl.global_head_auxiliary is not None
    assert any(k.startswith("global_head_auxiliary.") for k in changed)
    assert any(k.startswith("global_head_dominant.") for k in changed)


def test_epoch_end_logs_chance_diagnostics_and_warns_at_chance(tiny_dataset, tmp_path):
    trainer, _, _ = one_step(tiny_dataset, tmp_path)
    trainer.on_train_start()
    chance = trainer.lg_chance()
    assert chance == pytest.approx(math.log(2 * trainer.config.batch_size - 1))
    trainer.on_epoch_start()
    trainer.on_epoch_end({"Lg": chance, "Ld": 1.0, "LER": 0.1, "total": 2.0}, 1)
    trainer.on_epoch_start()
    trainer.on_epoch_end({"Lg": 0.5 * chance, "Ld": 1.0, "LER": 0.1, "total": 2.0}, 1)
    log = open(trainer.log_file).read()
    assert log.count("image-level loss at chance: the embeddings have collapsed") == 1
    assert len(re.findall(r"pooled-descriptor cosine [0-9.]+ \| projection cosine [0-9.]+", log)) == 2
    logged = trainer.logging
    assert logged["Lg_chance"] == [pytest.approx(chance)] * 2
    # the logged diagnostics are those of the fixed batch, the same in both epochs (no step in between)
    d = trainer.compute_diagnostics()
    for key in ("cos_descriptor", "cos_projection", "bottleneck_abs"):
        assert logged[key] == [pytest.approx(d[key], rel=1e-5)] * 2, key
    assert f"projection cosine {d['cos_projection']:.4f}" in log
    # each loss's share of the total, from the epoch means and the weights (1, 0.5, 1)
    assert f"shares of the total: Lg {chance / 2.0:.1%}, Ld {0.5 * 1.0 / 2.0:.1%}, LER {0.1 / 2.0:.1%}" in log
    assert (tmp_path / "out" / "progress.png").is_file()


def test_progress_plot_draws_the_chance_line():
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    from nnunetv2_macl.training.progress import plot_loss_curves

    logging = {"epoch": [0, 1], "total": [3, 2], "Lg": [3.4, 3.0], "Ld": [2, 1.5], "LER": [0.1, 0.05],
               "Lg_chance": [math.log(31)] * 2}
    fig, ax = plt.subplots()
    plot_loss_curves(ax, logging)
    chance_lines = [line for line in ax.lines if "chance" in line.get_label()]
    assert len(chance_lines) == 1 and list(chance_lines[0].get_ydata()) == [math.log(31)] * 2
    plt.close(fig)


def test_diagnostics_use_the_batch_statistics_and_leave_the_run_untouched(tiny_dataset, tmp_path):
    """Diagnostics run the heads as a training step does (BatchNorm on the batch's statistics), so they
    mean the same at initialisation, where the running statistics are 0/1, and after training. They
    neither update the running statistics nor consume the run's random numbers. LER over every cell: the
    tiny slices leave no bottleneck cell mostly image (LER n/a with the content mask, tests/test_ler_padding.py)."""
    trainer, _, _ = one_step(tiny_dataset, tmp_path, ler_content_mask=False)
    norms = [m for m in trainer.macl.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms
    buffers = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    rng = torch.random.get_rng_state()
    first = trainer.compute_diagnostics()
    assert torch.equal(torch.random.get_rng_state(), rng)
    for m, saved in zip(norms, buffers):
        for k, v in m.state_dict().items():
            assert torch.equal(v, saved[k]), k
    for m in norms:  # running statistics far from the batch's: evaluation mode would change every value
        m.running_mean.add_(5.0)
        m.running_var.mul_(9.0)
    second = trainer.compute_diagnostics()
    for key in ("cos_projection", "Lg", "Ld", "LER"):
        assert second[key] == pytest.approx(first[key], rel=1e-5), key
    # each objective next to its reference, each reference against its definition, computed here
    images, positions, content = trainer._diagnostic_batch
    b = images.shape[0]
    assert first["Lg_chance"] == pytest.approx(math.log(2 * b - 1), rel=1e-9)  # SupCon over 2B tied samples
    with torch.no_grad():  # T_fix: the dense maps and bottlenecks of the batch itself (no BatchNorm on this path)
        maps = trainer.macl(images, images, images, images, need=("dense", "equivariance"))
    cells = content_cells(content, maps["dense_dominant"].shape[2:])
    assert 0 < int(cells.sum()) < cells.numel()  # the diagnostic batch holds padded cells
    assert first["Ld_chance"] == pytest.approx(dense_chance_reference(cells, "slices"), rel=1e-5)
    # LER_unpaired: LER between each dominant map and another sample's auxiliary map (here without a content
    # mask; how LER masks padding is tests/test_ler_padding.py's)
    assert first["LER_samples"] == 1.0
    unmasked = embedding_diagnostics(trainer.macl, trainer.loss, images, positions, None, trainer.spatial_transform,
                                     seed=trainer.config.seed)
    y, y_tilde = maps["bottleneck_dominant"], maps["bottleneck_auxiliary"]
    other = [(i - 1) % b for i in range(b)]
    assert all(j != i for i, j in enumerate(other))
    paired, unpaired = float(equivariance_loss(y, y_tilde)), float(equivariance_loss(y, y_tilde[other]))
    assert unmasked["LER"] == pytest.approx(paired, rel=1e-5)
    assert unmasked["LER_unpaired"] == pytest.approx(unpaired, rel=1e-5)
    assert unmasked["Lg_chance"] == first["Lg_chance"]
    trainer.macl.eval()
    with torch.no_grad():
        out = trainer.macl(images, images, images, images, need=("global",))
    assert mean_pairwise_cosine(out["global_auxiliary"]) != pytest.approx(first["cos_projection"], abs=1e-3)


def test_dense_chance_follows_the_contrast_and_the_padding(tiny_dataset, tmp_path):
    """With --dense-contrast locations, Ld's chance value is that of the locations contrast on the content
    cells (each anchor ties with every other valid row but the same cell of the other slices), not eq. 12's
    log(2B - 1)."""
    trainer, _, _ = one_step(tiny_dataset, tmp_path, dense_contrast="locations")
    d = trainer.compute_diagnostics()
    images, _, content = trainer._diagnostic_batch
    with torch.no_grad():
        grid = trainer.macl(images, images, images, images, need=("dense",))["dense_dominant"].shape[2:]
    cells = content_cells(content, grid)
    assert cells.shape[1] <= trainer.config.dense_locations  # every cell enters: nothing drawn
    expected = dense_chance_reference(cells, "locations")
    assert d["Ld_chance"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(dense_chance_reference(cells, "slices"), rel=1e-3)
    assert d["Lg_chance"] == pytest.approx(math.log(2 * images.shape[0] - 1), rel=1e-9)
