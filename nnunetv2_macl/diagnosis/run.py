"""The whole decoder hand-over diagnosis as one function: read the cases, build the networks, run the
chosen parts and write ``decoder_diagnosis.json`` / ``.md`` / ``_finetune.png``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from nnunetv2_macl.diagnosis.data import Case, case_slice_shape, images_on_canvas, read_case, select_slices
from nnunetv2_macl.diagnosis.features import FeatureRun, run_feature_parts
from nnunetv2_macl.diagnosis.finetune import CLIP_GRAD_NORM, FINETUNE_STARTS, evaluate_networks, finetune_trace
from nnunetv2_macl.diagnosis.networks import (
    START_NAMES, build_network, canvas_for, dominant_down, load_checkpoint_dict, load_setup, loaded_decoder_stages,
    network_from_checkpoint, stage_names, total_stride)
from nnunetv2_macl.diagnosis.probes import FG_OVERSAMPLE
from nnunetv2_macl.diagnosis.report import findings, markdown_report, plot_finetune, to_json, write_atomic
from nnunetv2_macl.diagnosis.stage_stats import stage_statistics
from nnunetv2_macl.diagnosis.variance import POSITION_BINS
from nnunetv2_macl.model.macl_network import downsampling_factors

#: the parts: (a) variance decomposition (E4), (b) linear probes (E3), (c) fine-tuning trace (E2),
#: e1 the decoder stages at iteration 0 (E1)
PARTS = ("a", "b", "c", "e1")
#: the issue's experiment names for the parts
PART_ALIASES = {"e4": "a", "e3": "b", "e2": "c", "e1": "e1"}


def parse_parts(value: str) -> list[str]:
    """A comma list of parts (a, b, c, e1, or the experiment names E1..E4) -> part names; ValueError otherwise."""
    parts = []
    for p in (p.strip().lower() for p in value.split(",")):
        if p:
            p = PART_ALIASES.get(p, p)
            if p not in PARTS:
                raise ValueError(f"unknown part {p!r}: choose from {', '.join(PARTS)} (or E1..E4)")
            parts.append(p)
    if not parts:
        raise ValueError("no part given")
    return parts


def run_diagnosis(checkpoint_path: str, preprocessed: str, train_ids: Sequence[str], val_ids: Sequence[str],
                  out_dir: str, configuration: str = "2d", plans_identifier: str = "nnUNetPlans", seed: int = 12345,
                  parts: Sequence[str] = PARTS, max_val_slices: int | None = None, probe_iters: int = 300,
                  probe_lr: float = 1e-2, probe_batch: int = 16, probe_dice: bool = True, finetune_iters: int = 150,
                  finetune_batch: int = 32, finetune_eval: bool = True, chunk: int = 32, plot: bool = True,
                  say: Callable[[str], None] = print, poly_iters: int = 1000, iters_per_epoch: int = 25,
                  starts: Sequence[str] = FINETUNE_STARTS, augment: bool = True) -> dict:
    """Everything the command line does, as a function; returns the result dict (also written to ``out_dir``)."""
    t_start = time.perf_counter()
    parts = set(parts)
    unknown = set(starts) - set(START_NAMES)
    if unknown:
        raise ValueError(f"unknown starts {sorted(unknown)}: choose from {', '.join(START_NAMES)}")
    setup = load_setup(preprocessed, configuration, plans_identifier)
    if not train_ids or not val_ids:
        raise ValueError("training and validation cases are both needed")
    if set(train_ids) & set(val_ids):
        raise ValueError(f"cases in both training and validation: {sorted(set(train_ids) & set(val_ids))}")
    ckpt = load_checkpoint_dict(checkpoint_path)
    meta = ckpt.get("macl") or {}
    train_cases = [read_case(setup.data_folder, c) for c in train_ids]

    pretrained, report = network_from_checkpoint(setup, ckpt, "pretrained", seed)
    # the reference for questions about the handed-over decoder stages: the same pretrained encoder with
    # nnU-Net's initialisation of the decoder (the default start), not a network that is random throughout
    encoder_net, _ = network_from_checkpoint(setup, ckpt, "encoder", seed)
    random_net = build_network(setup, seed)
    dec_stages = loaded_decoder_stages(report)
    n_decoder = (max(dec_stages) + 1) if dec_stages else 0
    decoder_blocks = int(meta.get("decoder_blocks", n_decoder))
    lam = downsampling_factors(pretrained, decoder_blocks)
    # validation cases are streamed later; only their slice sizes are read here
    slice_shapes = [c.slice_shape for c in train_cases] + [case_slice_shape(setup.data_folder, c) for c in val_ids]
    canvas = canvas_for(pretrained, decoder_blocks, slice_shapes, setup.patch_size)
    quota = None if max_val_slices is None else max(1, int(max_val_slices) // len(val_ids))
    stages = stage_names(pretrained, dec_stages)
    pretrained.eval()
    encoder_net.eval()
    random_net.eval()
    result: dict = {
        "checkpoint": os.path.abspath(checkpoint_path), "preprocessed": os.path.abspath(preprocessed),
        "configuration": configuration, "plans_identifier": plans_identifier, "seed": seed,
        "train_cases": list(train_ids), "val_cases": list(val_ids), "val_slice_quota": quota,
        "pretrained_decoder_stages": dec_stages, "decoder_blocks": decoder_blocks, "lambda": lam,
        "checkpoint_lambda": meta.get("lambda"), "canvas": list(canvas), "total_stride": total_stride(pretrained),
        "patch_size": setup.patch_size, "num_classes": setup.num_classes, "stages": stages,
        "transfer": {"loaded": len(report.loaded), "skipped": len(report.skipped), "notes": list(report.notes)},
        "definitions": {
            "spatial_fraction": "mean over live channels of spatial/total; spatial = cell-weighted mean over slices of "
                                "the within-slice variance, across = cell-weighted variance over slices of the slice "
                                "mean, total = spatial + across (content cells only)",
            "position_share": f"mean over live channels of the share of 'across' explained by {POSITION_BINS} bins of "
                              f"the slice position (i+1)/n",
            "dice": "foreground Dice per class per validation volume on the preprocessed grid, mean over volumes "
                    "(class absent from reference and prediction skipped); dice_global pools all voxels",
            "clip_fraction": f"share of the fine-tuning iterations whose total gradient norm before clipping exceeds "
                             f"{CLIP_GRAD_NORM:g} (where nnU-Net's clipping scales the step down)"},
        "timings": {},
    }
    if meta.get("lambda") is not None and [round(float(x), 6) for x in meta["lambda"]] != [round(x, 6) for x in lam]:
        say(f"note: the checkpoint's lambda {meta['lambda']} differs from this plan's {lam}")

    def val_stream() -> Iterable[Case]:
        for c in val_ids:
            yield read_case(setup.data_folder, c)

    if "e1" in parts:
        t0 = time.perf_counter()
        measured = list(range(len(pretrained.decoder.stages)))

        def val_slices():
            for case in val_stream():
                yield images_on_canvas(case, select_slices(case.num_slices, quota), canvas), case.slice_shape

        result["stage_statistics"] = stage_statistics({"pretrained": pretrained, "encoder": encoder_net},
                                                      val_slices(), measured, chunk)
        result["stage_statistics_settings"] = (
            "Iteration 0 (eval mode) on the validation slices, content cells only: the hand-over ('pretrained') "
            "against the encoder-only start ('encoder'); every decoder stage, the handed-over ones and the rest.")
        result["timings"]["stage_statistics_s"] = time.perf_counter() - t0
        say(f"(E1) decoder stages {measured} measured at iteration 0")
    if parts & {"a", "b"}:
        say(f"(a/b) stages {stages}; canvas {canvas}; {len(val_ids)} validation cases")
        runs = [FeatureRun("pretrained", pretrained, dominant_down(pretrained, decoder_blocks)),
                FeatureRun("encoder", encoder_net, dominant_down(encoder_net, decoder_blocks)),
                FeatureRun("random", random_net, dominant_down(random_net, decoder_blocks))]
        feat = run_feature_parts(runs, train_cases, val_stream(), stages, n_decoder, canvas, setup.num_classes,
                                 "a" in parts, "b" in parts, probe_iters, probe_lr, probe_batch, probe_dice, seed,
                                 quota, chunk, say)
        result["timings"].update(feat.pop("timings"))
        result.update(feat)
        result["probe_settings"] = (f"{probe_iters} Adam steps, lr {probe_lr}, batch {probe_batch} whole slices "
                                    f"({FG_OVERSAMPLE:.0%} forced foreground), loss "
                                    f"{'cross-entropy + soft Dice' if probe_dice else 'cross-entropy'}")
    if "c" in parts:
        t0 = time.perf_counter()
        ft = finetune_trace(setup, ckpt, train_cases, finetune_iters, finetune_batch, seed, starts=starts,
                            poly_iters=poly_iters, iters_per_epoch=iters_per_epoch, augment=augment,
                            pretrained_stages=dec_stages, say=say)
        result["timings"]["finetune_s"] = time.perf_counter() - t0
        aug = next(iter(ft.values()))["augmentation"] if ft else None
        crops = (f"crops of the initial patch {aug['initial_patch_size']} through nnU-Net's training transforms "
                 f"(rotation {[round(r, 3) for r in aug['rotation']]} rad, mirror axes {aug['mirror_axes']}; seeded "
                 f"per iteration) to {setup.patch_size}" if aug else
                 f"augmentation-free crops of {setup.patch_size}")
        result["finetune_settings"] = (f"nnU-Net's loss (DC_and_CE_loss, deep supervision) and SGD (lr 1e-2, "
                                       + (f"poly decay per epoch of {iters_per_epoch} iterations over {poly_iters}, "
                                          if poly_iters > 0 else "constant, ") +
                                       f"momentum 0.99, nesterov, weight decay 3e-5, gradient clipping at "
                                       f"{CLIP_GRAD_NORM:g}); batch {finetune_batch} {crops} ({FG_OVERSAMPLE:.0%} "
                                       f"forced foreground), the same draws for every start; seed {seed}")
        if finetune_eval:
            t0 = time.perf_counter()
            result["finetune_validation"] = evaluate_networks({k: v["network"] for k, v in ft.items()}, val_stream(),
                                                              canvas, setup.num_classes, quota, chunk)
            result["timings"]["finetune_validation_s"] = time.perf_counter() - t0
        result["finetune"] = {k: {kk: vv for kk, vv in v.items() if kk != "network"} for k, v in ft.items()}
    result["seconds"] = time.perf_counter() - t_start
    result["findings"] = findings(result)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "decoder_diagnosis.json", json.dumps(to_json(result), indent=1))
    write_atomic(out / "decoder_diagnosis.md", markdown_report(result))
    if plot and result.get("finetune"):
        plot_finetune(result["finetune"], out / "decoder_diagnosis_finetune.png")
    return result


def set_threads(threads: int | None) -> None:
    """torch's thread count: ``threads``, else ``OMP_NUM_THREADS`` when set."""
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
