"""Parts (a) and (b) in one pass: probes trained on the training slices, then one pass over the
validation cases per network that feeds the variance decomposition and the probes' Dice."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nnunetv2_macl.diagnosis.data import Case, images_on_canvas, labels_on_canvas, select_slices
from nnunetv2_macl.diagnosis.networks import PRE_NORM, slice_features
from nnunetv2_macl.diagnosis.probes import DiceAccumulator, probe_predict, train_linear_probe
from nnunetv2_macl.diagnosis.variance import VarianceDecomposition, content_cells, summarise_decomposition


@dataclass
class FeatureRun:
    """One network (pretrained or random) with the probes trained on its features."""

    name: str
    network: nn.Module
    down: Callable[[torch.Tensor], torch.Tensor]
    full: dict[str, VarianceDecomposition] = field(default_factory=dict)
    dominant: dict[str, VarianceDecomposition] = field(default_factory=dict)
    probes: dict[str, nn.Module] = field(default_factory=dict)
    dice: dict[str, DiceAccumulator] = field(default_factory=dict)


def run_feature_parts(runs: Sequence[FeatureRun], train_cases: Sequence[Case], val_cases: Iterable[Case],
                      stages: Sequence[str], n_decoder: int, canvas: tuple[int, int], num_classes: int,
                      do_variance: bool, do_probe: bool, probe_iters: int, probe_lr: float, probe_batch: int,
                      probe_dice: bool, seed: int, val_quota: int | None, chunk: int,
                      say: Callable[[str], None] = print) -> dict:
    """Parts (a) and (b): probes trained first (on the training slices), then one pass over the
    validation cases per network that feeds the decomposition and the probes' Dice."""
    timings: dict[str, float] = {}
    if do_probe:
        t0 = time.perf_counter()
        train_images = torch.cat([images_on_canvas(c, np.arange(c.num_slices), canvas) for c in train_cases])
        train_labels = torch.cat([labels_on_canvas(c, np.arange(c.num_slices), canvas) for c in train_cases])
        for run in runs:
            feats = slice_features(run.network, train_images, n_decoder, chunk)
            for si, stage in enumerate(stages):
                run.probes[stage] = train_linear_probe(feats[stage], train_labels, num_classes, probe_iters,
                                                       probe_lr, probe_batch, seed=seed * 1000 + si,
                                                       use_dice=probe_dice)
                run.dice[stage] = DiceAccumulator(num_classes)
            del feats
            say(f"(b) probes trained on {run.name} features ({len(stages)} stages, {train_images.shape[0]} slices)")
        timings["probe_training_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    variance_stages = [*stages, *(s + PRE_NORM for s in stages)]
    for run in runs:
        for stage in variance_stages:
            run.full[stage] = VarianceDecomposition()
        bottleneck = f"encoder.stages.{len(run.network.encoder.stages) - 1}"
        for stage in stages:  # what the pretraining's dense and equivariance losses saw
            if stage.startswith("decoder") or stage == bottleneck:
                run.dominant[stage] = VarianceDecomposition()
    num_val = 0
    for case in val_cases:
        num_val += 1
        slices = select_slices(case.num_slices, val_quota)
        positions = (slices + 1) / case.num_slices
        images = images_on_canvas(case, slices, canvas)
        reference = case.seg[slices]
        for run in runs:
            feats = slice_features(run.network, images, n_decoder, chunk, pre_norm=do_variance)
            if do_variance:
                for stage in variance_stages:
                    f = feats[stage]
                    h, w = content_cells(case.slice_shape, canvas, f.shape[-2:])
                    run.full[stage].add(f[..., :h, :w], positions)
            for stage in stages:
                f = feats[stage]
                if do_probe:
                    pred = probe_predict(run.probes[stage], f, canvas)[:, :case.slice_shape[0], :case.slice_shape[1]]
                    run.dice[stage].add_volume(case.identifier, pred.numpy(), reference)
            if do_variance and run.dominant:
                small = torch.cat([run.down(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])
                dom = slice_features(run.network, small, n_decoder, chunk)
                for stage in run.dominant:
                    f = dom[stage]
                    # measured on the full-resolution canvas grid: the small input spans the same canvas
                    h, w = content_cells(case.slice_shape, canvas, f.shape[-2:])
                    run.dominant[stage].add(f[..., :h, :w], positions)
        say(f"    validation case {num_val}: {case.identifier} ({len(slices)} slices)")
    timings["validation_pass_s"] = time.perf_counter() - t0
    out: dict = {"timings": timings, "num_val_cases": num_val}
    if do_variance:
        out["variance"] = {run.name: {"full_resolution": {s: summarise_decomposition(run.full[s].result())
                                                          for s in variance_stages},
                                      "dominant_branch": {s: summarise_decomposition(d.result())
                                                          for s, d in run.dominant.items()}}
                           for run in runs}
    if do_probe:
        out["probe"] = {run.name: {s: run.dice[s].result() for s in stages} for run in runs}
    return out
