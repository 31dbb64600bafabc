"""The diagnosis's report: plain findings read off the numbers, the markdown tables, the fine-tuning
figure and the JSON conversion."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from torch import nn

from nnunetv2_macl.diagnosis.finetune import CLIP_GRAD_NORM, leaves_background_phase
from nnunetv2_macl.diagnosis.networks import PRE_NORM

#: the E1 rows of the report: (label, getter on one stage's statistics)
E1_ROWS = (
    ("norms: mean abs(weight - 1)", lambda s: s["norm_mean_abs_weight_minus_1"]),
    ("norms: mean abs(bias)", lambda s: s["norm_mean_abs_bias"]),
    ("mean abs(output)", lambda s: s["mean_abs_output"]),
    ("spread before the norm, mean over blocks", lambda s: s["pre_norm_spread"]["mean"]),
    ("pre-activation < 0, last block", lambda s: s["fraction_negative_pre_activation"]["last"]),
    ("cosine between locations", lambda s: s["location_cosine"]),
    ("input RMS: upsampled half", lambda s: s["input_halves"]["upsampled_rms"]),
    ("input RMS: skip half", lambda s: s["input_halves"]["skip_rms"]),
    ("input RMS: upsampled / skip", lambda s: s["input_halves"]["upsampled_to_skip"]),
    ("seg_layers logit std", lambda s: s["seg_logit_std"]),
)


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def stage_statistics_findings(result: dict) -> list[str]:
    """E1 lines: each decoder stage of the hand-over against the encoder-only start, at iteration 0."""
    stats = result.get("stage_statistics")
    if not stats or "pretrained" not in stats or "encoder" not in stats:
        return []
    dec = set(result.get("pretrained_decoder_stages", []))
    lines = []
    for stage, p in stats["pretrained"].items():
        e = stats["encoder"][stage]
        j = int(stage.rsplit(".", 1)[1])
        tag = "handed over" if j in dec else "not handed over"
        lines.append(
            f"(E1) {stage} ({tag}), hand-over vs encoder-only: norms mean abs(w-1) {_fmt(p['norm_mean_abs_weight_minus_1'])} "
            f"vs {_fmt(e['norm_mean_abs_weight_minus_1'])}, abs(b) {_fmt(p['norm_mean_abs_bias'])} vs "
            f"{_fmt(e['norm_mean_abs_bias'])}; mean abs(x) {_fmt(p['mean_abs_output'])} vs {_fmt(e['mean_abs_output'])}; "
            f"spread before the norm {_fmt(p['pre_norm_spread']['mean'])} vs {_fmt(e['pre_norm_spread']['mean'])}; "
            f"pre-activation < 0 {_fmt(p['fraction_negative_pre_activation']['last'])} vs "
            f"{_fmt(e['fraction_negative_pre_activation']['last'])}; cosine between locations "
            f"{_fmt(p['location_cosine'])} vs {_fmt(e['location_cosine'])}; input RMS upsampled/skip "
            f"{_fmt(p['input_halves']['upsampled_to_skip'])} vs {_fmt(e['input_halves']['upsampled_to_skip'])}; "
            f"seg_layers.{j} logit std {_fmt(p['seg_logit_std'])} vs {_fmt(e['seg_logit_std'])}.")
    return lines


def findings(result: dict) -> list[str]:
    """Plain statements read off the numbers (the reader judges; thresholds are stated in each line)."""
    lines: list[str] = []
    dec = result.get("pretrained_decoder_stages", [])
    lines += stage_statistics_findings(result)
    var = result.get("variance")
    if var:
        for j in dec:
            s = f"decoder.stages.{j}"
            pre = var["pretrained"]["full_resolution"].get(s, {})
            ref_name = "encoder" if "encoder" in var else "random"
            rnd = var[ref_name]["full_resolution"].get(s, {})
            dom = var["pretrained"]["dominant_branch"].get(s, {})
            sp, sr = pre.get("spatial_fraction", float("nan")), rnd.get("spatial_fraction", float("nan"))
            ref = "the encoder-only start" if ref_name == "encoder" else "random init"
            verdict = (f"spatially flat compared with {ref}" if np.isfinite(sp) and np.isfinite(sr) and sp < 0.5 * sr
                       else f"not flatter than {ref} by 2x")
            lines.append(f"(a) decoder stage {j + 1}: {_fmt(sp)} of its variance is within slices ({ref} "
                         f"{_fmt(sr)}; on the dominant-branch input {_fmt(dom.get('spatial_fraction'))}); slice position "
                         f"explains {_fmt(pre.get('position_share'))} of its across-slice variance ({ref} "
                         f"{_fmt(rnd.get('position_share'))}); {pre.get('dead_channels', 'n/a')} of "
                         f"{pre.get('channels', 'n/a')} channels constant -> {verdict}.")
            before = var["pretrained"]["full_resolution"].get(s + PRE_NORM)
            if before:
                ref_before = var[ref_name]["full_resolution"].get(s + PRE_NORM, {})
                lines.append(f"(a) decoder stage {j + 1} before its InstanceNorm: {_fmt(before.get('spatial_fraction'))} "
                             f"of its variance within slices ({ref} {_fmt(ref_before.get('spatial_fraction'))}), "
                             f"position share {_fmt(before.get('position_share'))} ({ref} "
                             f"{_fmt(ref_before.get('position_share'))}).")
        enc_last = [k for k in var["pretrained"]["full_resolution"] if k.startswith("encoder") and PRE_NORM not in k]
        if enc_last:
            b = enc_last[-1]
            lines.append(f"(a) bottleneck ({b}): spatial fraction {_fmt(var['pretrained']['full_resolution'][b]['spatial_fraction'])}"
                         f" pretrained vs {_fmt(var['random']['full_resolution'][b]['spatial_fraction'])} random.")
    probe = result.get("probe")
    if probe:
        for s in probe["pretrained"]:
            dp, dr = probe["pretrained"][s]["mean_dice"], probe["random"][s]["mean_dice"]
            tag = ""
            if np.isfinite(dp) and np.isfinite(dr):
                tag = (" -> less linearly decodable than random features" if dp < dr - 0.05 else
                       " -> more decodable than random features" if dp > dr + 0.05 else " -> within 0.05 of random")
            if s.startswith("decoder") and "encoder" in probe:  # same encoder, decoder initialised by nnU-Net
                de = probe["encoder"][s]["mean_dice"]
                tag += (f"; encoder-only start {_fmt(de)}" + (
                    " -> the hand-over is less decodable than nnU-Net's own decoder init" if dp < de - 0.05 else
                    " -> the hand-over is more decodable than nnU-Net's own decoder init" if dp > de + 0.05 else
                    " -> within 0.05 of the encoder-only start") if np.isfinite(de) and np.isfinite(dp) else "")
            lines.append(f"(b) probe on {s}: Dice {_fmt(dp)} pretrained vs {_fmt(dr)} random{tag}.")
    ft = result.get("finetune")
    if ft and "pretrained" in ft and "encoder" in ft:
        p, e = ft["pretrained"], ft["encoder"]
        lp, le = float(np.mean(p["loss"])), float(np.mean(e["loss"]))
        others = [k for k in ft if k not in ("pretrained", "encoder")]
        lines.append(f"(c) mean loss over the {len(p['loss'])} iterations: paper hand-over {lp:.4f}, encoder-only {le:.4f}"
                     + "".join(f", {k} {float(np.mean(ft[k]['loss'])):.4f}" for k in others) + ".")
        lines.append(f"(c) share of iterations where the gradient clip at {CLIP_GRAD_NORM:g} bites (total norm before "
                     f"clipping > {CLIP_GRAD_NORM:g}): " + ", ".join(
                         f"{k} {_fmt(v.get('clip_fraction'), 2)}" for k, v in ft.items()) + ".")
        gap = [a - b for a, b in zip(p["windows_of_10"]["loss"], e["windows_of_10"]["loss"])]
        lines.append("(c) loss of the hand-over minus encoder-only, per window of 10 iterations: "
                     + ", ".join(f"{g:+.3f}" for g in gap) + ".")
        ref = p.get("reference_fg_fraction", float("nan"))
        if np.isfinite(ref) and ref > 0:
            half = 0.5 * ref
            its = {k: leaves_background_phase(v["pred_fg_fraction"], half) for k, v in ft.items()}
            lines.append("(c) iteration at which the batch prediction leaves the background-only phase (predicted "
                         f"foreground back at half the reference fraction, {_fmt(half, 4)}): "
                         + ", ".join(f"{k} {'not within ' + str(len(v['loss'])) if its[k] is None else its[k]}"
                                     for k, v in ft.items()) + ".")
        for g in p["grad_norm"]:
            if not g.startswith("decoder") and g != "seg_layers":
                continue
            gp, ge = float(np.mean(p["grad_norm"][g])), float(np.mean(e["grad_norm"][g]))
            lines.append(f"(c) mean gradient norm of {g}: hand-over {gp:.4g}, encoder-only {ge:.4g} (ratio "
                         f"{gp / ge if ge > 0 else float('nan'):.3g}){' [transferred]' if g in p['transferred_groups'] else ''}.")
        ev = result.get("finetune_validation")
        if ev:
            lines.append("(c) validation Dice after the iterations: " + ", ".join(
                f"{k} {_fmt(v['mean_dice'])}" for k, v in ev.items()) + ".")
    return lines


def stage_statistics_markdown(result: dict) -> list[str]:
    """The E1 section: one table per decoder stage, a column per network."""
    stats = result.get("stage_statistics")
    if not stats:
        return []
    names = list(stats)
    dec = set(result.get("pretrained_decoder_stages", []))
    out = ["## (E1) Decoder stages at iteration 0", "", result.get("stage_statistics_settings", ""), ""]
    for stage in stats[names[0]]:
        j = int(stage.rsplit(".", 1)[1])
        out += [f"### {stage} ({'handed over' if j in dec else 'not handed over'})", "",
                "| statistic | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for label, get in E1_ROWS:
            out.append(f"| {label.replace('seg_layers', f'seg_layers.{j}')} | "
                       + " | ".join(_fmt(get(stats[n][stage]), 4) for n in names) + " |")
        out.append("")
    return out


def markdown_report(result: dict) -> str:
    """The whole report as markdown (findings first, then one section per part)."""
    out = ["# Decoder hand-over diagnosis", "",
           f"checkpoint: `{result['checkpoint']}`  ", f"dataset: `{result['preprocessed']}` ({result['configuration']})  ",
           f"training cases ({len(result['train_cases'])}): {', '.join(result['train_cases'])}  ",
           f"validation cases: {len(result['val_cases'])}; slices per case: "
           f"{'all' if result['val_slice_quota'] is None else 'at most ' + str(result['val_slice_quota'])}  ",
           f"pretrained decoder stages: {[j + 1 for j in result['pretrained_decoder_stages']]}; lambda "
           f"{result['lambda']}; canvas {result['canvas']}; seed {result['seed']}", ""]
    out += ["## Findings", ""] + [f"- {line}" for line in findings(result)] + [""]
    out += stage_statistics_markdown(result)
    var = result.get("variance")
    if var:
        out += ["## (a) Within-slice share of the variance", "",
                "spatial fraction = mean over live channels of (mean within-slice variance) / (total variance); "
                "position share = share of the across-slice variance explained by the slice position (10 bins).", "",
                "| stage | pretrained | encoder-only start | random | pretrained, dominant input | random, dominant input | position share pretrained | random | dead channels pre/rand |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s, pre in var["pretrained"]["full_resolution"].items():
            rnd = var["random"]["full_resolution"][s]
            enc = var.get("encoder", {}).get("full_resolution", {}).get(s, {})
            dp = var["pretrained"]["dominant_branch"].get(s, {})
            dr = var["random"]["dominant_branch"].get(s, {})
            out.append(f"| {s} | {_fmt(pre['spatial_fraction'])} | {_fmt(enc.get('spatial_fraction'))} | "
                       f"{_fmt(rnd['spatial_fraction'])} | "
                       f"{_fmt(dp.get('spatial_fraction'))} | {_fmt(dr.get('spatial_fraction'))} | "
                       f"{_fmt(pre['position_share'])} | {_fmt(rnd['position_share'])} | "
                       f"{pre['dead_channels']}/{rnd['dead_channels']} of {pre['channels']} |")
        out.append("")
    probe = result.get("probe")
    if probe:
        out += ["## (b) Linear probe (1x1 conv on frozen features)", "",
                f"{result['probe_settings']}. Dice per volume, mean over volumes (global Dice over all voxels in brackets).", "",
                "| stage | pretrained | encoder-only start | random |", "|---|---|---|---|"]
        for s in probe["pretrained"]:
            p, r = probe["pretrained"][s], probe["random"][s]
            e = probe.get("encoder", {}).get(s, {})
            out.append(f"| {s} | {_fmt(p['mean_dice'])} ({_fmt(p['mean_dice_global'])}) | "
                       f"{_fmt(e.get('mean_dice'))} ({_fmt(e.get('mean_dice_global'))}) | "
                       f"{_fmt(r['mean_dice'])} ({_fmt(r['mean_dice_global'])}) |")
        out.append("")
    ft = result.get("finetune")
    if ft:
        starts = list(ft)
        n = len(next(iter(ft.values()))["loss"])
        out += [f"## (c) First {n} fine-tuning iterations", "", result["finetune_settings"], "",
                "Loss, mean over windows of 10 iterations:", "",
                "| iterations | " + " | ".join(starts) + " |", "|---|" + "---|" * len(starts)]
        for i, _ in enumerate(ft[starts[0]]["windows_of_10"]["loss"]):
            out.append(f"| {10 * i}-{min(10 * i + 9, n - 1)} | " +
                       " | ".join(_fmt(ft[s]["windows_of_10"]["loss"][i], 4) for s in starts) + " |")
        out += ["", "Predicted foreground fraction, mean over windows of 10 (reference "
                f"{_fmt(ft[starts[0]].get('reference_fg_fraction'), 4)}):", "",
                "| iterations | " + " | ".join(starts) + " |", "|---|" + "---|" * len(starts)]
        for i, _ in enumerate(ft[starts[0]]["windows_of_10"]["pred_fg_fraction"]):
            out.append(f"| {10 * i}-{min(10 * i + 9, n - 1)} | " +
                       " | ".join(_fmt(ft[s]["windows_of_10"]["pred_fg_fraction"][i], 4) for s in starts) + " |")
        out += ["", "Gradient L2 norm per group (before clipping), mean over all iterations / first window / last window:", "",
                "| group | " + " | ".join(starts) + " |", "|---|" + "---|" * len(starts)]
        for g in ft[starts[0]]["grad_norm"]:
            cells = []
            for s in starts:
                w = ft[s]["windows_of_10"]["grad_norm"][g]
                mark = "*" if g in ft[s]["transferred_groups"] else ""
                cells.append(f"{np.mean(ft[s]['grad_norm'][g]):.3g} / {w[0]:.3g} / {w[-1]:.3g}{mark}")
            out.append(f"| {g} | " + " | ".join(cells) + " |")
        out.append(f"| clip bites (total > {CLIP_GRAD_NORM:g}), share of iterations | " + " | ".join(
            _fmt(ft[s].get("clip_fraction"), 2) for s in starts) + " |")
        out.append(f"| total (clipped at {CLIP_GRAD_NORM:g}) | " + " | ".join(
            f"{np.mean(ft[s]['grad_norm_total']):.3g} / {ft[s]['windows_of_10']['grad_norm_total'][0]:.3g} / "
            f"{ft[s]['windows_of_10']['grad_norm_total'][-1]:.3g}" for s in starts) + " |")
        out += ["", "(* = taken from the checkpoint by this start)", ""]
        ev = result.get("finetune_validation")
        if ev:
            out += ["Validation Dice after these iterations: " + ", ".join(f"{k} {_fmt(v['mean_dice'])}" for k, v in ev.items()), ""]
    out += [f"Run time: {result['seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items())
            + ")", ""]
    return "\n".join(out)


def plot_finetune(ft: dict, path: str | os.PathLike) -> Path:
    """Loss, predicted foreground fraction, total and per-group gradient norms vs iteration, one line per start."""
    from nnunetv2_macl.figures import _pyplot, save_figure

    plt = _pyplot()
    starts = list(ft)
    groups = list(ft[starts[0]]["grad_norm"])
    panels = ["loss", "pred_fg_fraction", "grad_norm_total"] + groups
    ncol = 4
    nrow = int(math.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 2.8 * nrow), dpi=100, squeeze=False)
    colours = {"scratch": "#7f7f7f", "encoder": "#1f77b4", "pretrained": "#d62728",
               "pretrained_norms_reset": "#ff7f0e", "stage0_only": "#2ca02c"}
    for ax, panel in zip(axes.flat, panels):
        for s in starts:
            y = ft[s][panel] if panel in ft[s] else ft[s]["grad_norm"][panel]
            ax.plot(np.arange(len(y)), y, color=colours.get(s), lw=1.2, label=s)
        ax.set_title(panel if panel in ft[starts[0]] else f"grad norm {panel}", fontsize=9)
        if panel not in ("loss", "pred_fg_fraction"):
            ax.set_yscale("log")
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if panel == "pred_fg_fraction" and np.isfinite(ft[starts[0]].get("reference_fg_fraction", float("nan"))):
            ax.axhline(ft[starts[0]]["reference_fg_fraction"], color="k", ls="--", lw=0.8, label="reference")
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # room for the title
    return save_figure(fig, path, "First fine-tuning iterations: " + ", ".join(starts))


def to_json(obj: object) -> object:
    """``obj`` with numpy values as plain numbers, non-finite floats as None and networks left out."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items() if not isinstance(v, nn.Module)}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
