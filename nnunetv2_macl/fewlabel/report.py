"""Tables, CSV and plots of a few-label run, from its files alone (``write_report``).

Only runs that finished (status done/reused in the run log) and were validated on exactly the
protocol's validation cases enter a table; every other run is listed in the caption with the reason.
Per (budget, arm): mean and sample sd over the folds (= different draws of the training sets over the
same validation set) that every arm completed, and the paired difference to scratch.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import shlex
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_macl.errors import FewLabelError, MACLUserError, StepError
from nnunetv2_macl.fewlabel import curves
from nnunetv2_macl.fewlabel.pretraining import split_extra
from nnunetv2_macl.fewlabel.records import (MARKER, OK, TASK_FILE, Task, check_validation_cases, fingerprint_diff,
                                            pretrain_cases, pretrain_folder, read_run_log, recorded_fingerprint,
                                            run_folder, say,
                                            task_fingerprint, task_list)
from nnunetv2_macl.fewlabel.settings import METHOD_LABELS, Arm, Settings
from nnunetv2_macl.fewlabel.splits import read_splits, write_json
from nnunetv2_macl.run.subprocess_steps import read_summary

REPORT_DIR = "report"
SHOWN_KEYS = 3  # differing fingerprint keys named in the caption per excluded run


# ============================================================================================ collecting
def collect_runs(out: Path, dataset_name: str, s: Settings, plan: dict, run_log: list[dict],
                 labels: dict[str, int] | None = None, file_ending: str | None = None,
                 cases: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """``(rows, excluded)``: one row per training that finished (run log), was made with the settings of
    ``s`` (its recorded fingerprint is the one ``s`` and this code give; ``cases``: every case of the
    dataset, for the pretraining's part) and was validated on the protocol's validation cases;
    ``excluded`` names every other training with the reason."""
    status = {r["key"]: r for r in run_log}
    pre_cases = None if cases is None else pretrain_cases(s, plan, cases)
    rows, excluded = [], []
    for t in task_list(s, plan):
        if t.kind != "train":
            continue
        rec = plan["index"][t.index]
        folder = run_folder(out, t.arm, dataset_name, t.index, s)
        logged = status.get(t.key)
        if logged is None or logged["status"] not in OK:
            excluded.append({"key": t.key, "reason": "not run" if logged is None else
                             logged["status"] + (f" ({logged['message'][:120]})" if logged.get("message") else "")})
            continue
        other = _other_settings(t, folder, s, plan, pre_cases)
        if other:
            excluded.append({"key": t.key, "reason": other})
            continue
        summary = folder / "validation" / "summary.json"
        try:
            check_validation_cases(t, folder, plan, file_ending)
            r = read_summary(summary, labels)
        except StepError as e:
            excluded.append({"key": t.key, "reason": " ".join(str(e).split())[:300]})
            continue
        rows.append({"arm": t.arm.key, "label": t.arm.label, "method": t.method, "recipe": t.arm.recipe,
                     "budget": rec["budget"], "fold": rec["fold"], "index": rec["index"], "n_train": len(rec["train"]),
                     "n_val": len(r["validation_cases"]), "dice_mean": r["foreground_mean_dice"],
                     **{f"dice_{k}": v for k, v in r["dice_per_class"].items()},
                     "train_seconds": logged.get("seconds"), "summary_file": str(summary),
                     "folder": str(folder), "per_case": _per_case_dice(summary)})
    return rows, excluded


def _other_settings(task: Task, folder: Path, s: Settings, plan: dict, pre_cases: list[str] | None) -> str:
    """Why the run in ``folder`` was not made with the workdir's settings ("" when it was): its recorded
    fingerprint against the one the settings and this code give (version, every pretraining setting)."""
    try:
        want = task_fingerprint(task, s, plan, pre_cases)
    except MACLUserError as e:  # e.g. a pretraining option this code no longer accepts
        return f"its settings cannot be resolved by this code: {' '.join(str(e).split())[:200]}"
    got = recorded_fingerprint(folder)
    if got is None:
        return f"made with other settings: none recorded (no {folder.name}/{TASK_FILE})"
    keys = fingerprint_diff(want, got)
    if not keys:
        return ""
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return f"made with other settings: {', '.join(keys[:SHOWN_KEYS])}{more}"


# ============================================================================================ tables
def _per_case_dice(summary_file: Path) -> dict[str, float]:
    """Foreground-mean Dice of each validation case (nan-mean over classes, as nnU-Net averages)."""
    data = json.loads(Path(summary_file).read_text())
    out = {}
    for c in data.get("metric_per_case", []):
        vals = [float(v["Dice"]) for v in c.get("metrics", {}).values() if v.get("Dice") is not None]
        vals = [v for v in vals if not math.isnan(v)]
        out[Path(c["reference_file"]).name] = float(np.mean(vals)) if vals else float("nan")
    return out


def _class_names(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith("dice_") and k != "dice_mean" and k[5:] not in names:
                names.append(k[5:])
    return names


def complete_folds(rows: list[dict], arms: Sequence[str], budget: int) -> list[int]:
    """Folds of ``budget`` for which every arm that has any result at ``budget`` has one. An arm with none
    (not run yet, or every run failed) gets an empty row instead of emptying the others' (adding a start to a
    workdir, or one measured at fewer budgets, leaves the finished comparison readable)."""
    have = [f for f in ({r["fold"] for r in rows if r["arm"] == m and r["budget"] == budget} for m in arms) if f]
    return sorted(set.intersection(*have)) if have else []


def aggregate(rows: list[dict], arms: Sequence[Arm], budgets: Sequence[int]) -> list[dict]:
    """Per (budget, arm): mean and sample sd over folds of every Dice column and the paired
    difference to scratch (foreground mean). Only folds that every method completed at that budget
    count (like is compared with like; a run cut by a deadline leaves its fold out for all methods);
    ``n_folds``/``folds`` say which, ``excluded_folds`` which runs of this method were left out."""
    cols = ["mean"] + _class_names(rows)
    out = []
    for b in budgets:
        folds = complete_folds(rows, [a.key for a in arms], b)
        for arm in arms:
            m = arm.key
            mine = [r for r in rows if r["arm"] == m and r["budget"] == b]
            sel = [r for r in mine if r["fold"] in folds]
            rec: dict = {"budget": b, "arm": m, "label": arm.label, "method": arm.method, "n_folds": len(sel), "folds": sorted(r["fold"] for r in sel),
                         "excluded_folds": sorted(r["fold"] for r in mine if r["fold"] not in folds)}
            for c in cols:
                vals = np.array([r.get(f"dice_{c}", float("nan")) for r in sel], dtype=float)
                finite = vals[~np.isnan(vals)]
                rec[f"dice_{c}_mean"] = float(finite.mean()) if finite.size else None
                rec[f"dice_{c}_sd"] = float(finite.std(ddof=1)) if finite.size > 1 else None
            if m != "scratch" and any(a.key == "scratch" for a in arms):
                scratch_rows = [r for r in rows if r["arm"] == "scratch" and r["budget"] == b]
                scratch = {r["fold"]: r["dice_mean"] for r in scratch_rows}
                diffs = [r["dice_mean"] - scratch[r["fold"]] for r in sel if r["fold"] in scratch]
                diffs = [d for d in diffs if math.isfinite(d)]  # nan: no foreground in reference and prediction
                rec["delta_vs_scratch_mean"] = float(np.mean(diffs)) if diffs else None
                rec["delta_vs_scratch_sd"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
                rec["delta_n_folds"] = len(diffs)
                rec["cases_above_scratch"], rec["cases_paired"] = cases_above(sel, scratch_rows)
            out.append(rec)
    return out


def cases_above(mine: Sequence[dict], scratch: Sequence[dict]) -> tuple[int, int]:
    """``(above, paired)``: of the (fold, validation case) pairs that both a start's runs ``mine`` and scratch's
    runs of the same folds scored (finite Dice), how many the start scored higher. A mean over a few cases can
    hinge on one case: this says whether a difference is broad or carried by a few."""
    theirs = {r["fold"]: r.get("per_case") or {} for r in scratch}
    pairs = [(v, theirs[r["fold"]][c]) for r in mine if r["fold"] in theirs
             for c, v in (r.get("per_case") or {}).items() if c in theirs[r["fold"]]]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    return sum(a > b for a, b in pairs), len(pairs)


# ============================================================================================ writing
def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    text = f"{100 * v:.2f}"
    if sd is not None and not math.isnan(sd):
        text += f" ± {100 * sd:.2f}"
    return text


def _above(r: dict) -> str:
    """``"k / n"``: validation cases (over the paired folds) on which a start beat scratch."""
    if r["arm"] == "scratch" or not r.get("cases_paired"):
        return "–"
    return f"{r['cases_above_scratch']} / {r['cases_paired']}"


def markdown_table(agg: list[dict], class_names: Sequence[str]) -> str:
    """One row per (budget, arm); a column per class in ``class_names`` (pass none for a dataset with one
    foreground class, whose Dice is the foreground mean)."""
    head = ["M", "method", "folds", "Dice mean (%)"] + [f"{c} (%)" for c in class_names] + \
        ["Δ mean vs scratch (pp)", "cases above scratch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in agg:
        if r["n_folds"] == 0:
            cells = [str(r["budget"]), r["label"], "0"] + ["–"] * (len(head) - 3)
        else:
            if r["arm"] == "scratch":
                delta = "(reference)"
            elif r.get("delta_vs_scratch_mean") is None:
                delta = "–"
            else:
                d, sd = r["delta_vs_scratch_mean"], r.get("delta_vs_scratch_sd")
                delta = f"{100 * d:+.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")
            cells = [str(r["budget"]), r["label"], str(r["n_folds"]),
                     _pct(r["dice_mean_mean"], r["dice_mean_sd"])] + \
                    [_pct(r.get(f"dice_{c}_mean"), r.get(f"dice_{c}_sd")) for c in class_names] + [delta, _above(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csvs(rows: list[dict], agg: list[dict], class_names: Sequence[str], report: Path) -> tuple[Path, Path]:
    report.mkdir(parents=True, exist_ok=True)
    runs_csv, summary_csv = report / "fewlabel_runs.csv", report / "fewlabel_summary.csv"
    cols = ["arm", "method", "recipe", "budget", "fold", "index", "n_train", "n_val", "dice_mean"] + \
        [f"dice_{c}" for c in class_names] + ["train_seconds", "summary_file"]
    with open(runs_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["budget"], r["arm"], r["fold"])):
            w.writerow(r)
    cols = ["budget", "arm", "method", "n_folds", "dice_mean_mean", "dice_mean_sd"] + \
        [f"dice_{c}_{x}" for c in class_names for x in ("mean", "sd")] + \
        ["delta_vs_scratch_mean", "delta_vs_scratch_sd", "delta_n_folds", "cases_above_scratch", "cases_paired"]
    with open(summary_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in agg:
            w.writerow({k: ("" if v is None else v) for k, v in r.items() if k != "label"})
    return runs_csv, summary_csv


def plot_dice_vs_budget(agg: list[dict], arms: Sequence[Arm], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunetv2_macl.figures import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    budgets = sorted({r["budget"] for r in agg})
    for i, arm in enumerate(arms):
        sel = [r for r in agg if r["arm"] == arm.key and r["dice_mean_mean"] is not None]
        if not sel:
            continue
        x = np.array([r["budget"] for r in sel], dtype=float) * (1 + 0.015 * (i - (len(arms) - 1) / 2))
        y = np.array([100 * r["dice_mean_mean"] for r in sel])
        e = np.array([100 * (r["dice_mean_sd"] or 0.0) for r in sel])
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=arm.label)
    ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("labeled training cases M")
    ax.set_ylabel("validation Dice, foreground mean (%)")
    ax.set_title(title or "Few-label fine-tuning (mean ± sd over folds)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no arm has a result yet (all excluded): an empty plot, no legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)




# ============================================================================================ report
def caption(s: Settings, info: dict, plan: dict, excluded: list[dict], agg: list[dict],
            class_names: Sequence[str] = ()) -> str:
    """The table's caption: data, validation, splits, schedules, pretraining (with ``--pretrain-extra``),
    and every run left out with the reason. ``class_names``: the foreground classes of the runs."""
    meta = plan["meta"]
    n_val = sorted({len(r["val"]) for r in plan["index"]})
    n_val_text = "/".join(map(str, n_val))
    plans = info["plans"]["configurations"][s.configuration]
    if meta["scheme"] == "heldout":
        val_text = (f"{n_val_text} validation cases, the same for every fold and M, in no training set (held out "
                    f"from {meta['num_cases']} cases, seed {meta['seed']})")
    else:
        val_text = (f"{n_val_text} validation cases per fold: the held-out part of a {meta['n_splits']}-fold "
                    f"partition of {meta['num_cases']} cases (nnU-Net's generate_crossval_split, seed {meta['seed']})"
                    + (f", at most {meta['n_val']}" if meta.get("n_val") else ""))
    batch = (f"{s.finetune_batch_size} (the plans say {plans['batch_size']})" if s.finetune_batch_size
             else f"{plans['batch_size']} (the plans')")
    recipes = sorted({a.recipe for a in s.arms()})
    one_class = (f" (one foreground class, {class_names[0]}: the mean is its Dice)" if len(class_names) == 1
                 else "")
    lines = [
        f"Dataset {info['dataset']}, nnU-Net `{s.configuration}` ({s.plans}); validation Dice = foreground mean"
        f"{one_class} of nnU-Net's full validation (`fold_X/validation/summary.json`) on {val_text}; mean ± sample "
        f"sd over the folds; 'Δ' = paired difference to scratch on the same folds (percentage points); 'cases above scratch' = "
        f"validation cases, counted once per paired fold, on which the start's Dice is higher than scratch's.",
        f"Training sets: {s.folds} fold(s) = different seeded draws of nested sets (M = "
        f"{', '.join(map(str, meta['budgets']))}; the M cases of a smaller budget are among those of a larger "
        f"one); identical for every method.",
        f"Fine-tuning: stock `nnUNetv2_train` with the benchmark trainers, {s.finetune_epochs} epochs x {s.iters} "
        f"iterations (= {s.finetune_epochs * s.iters} iterations) of batch {batch}, seed {s.seed}, device "
        f"{s.device}; recipe(s): " + "; ".join(_recipe_text(r, s) for r in recipes) + ".",
    ]
    pre = s.pretrain_methods()
    if pre:
        labels = ", ".join(METHOD_LABELS.get(m, m) for m in pre)
        extra = " ".join(["", *map(shlex.quote, split_extra(s.pretrain_extra))])
        lines.append(
            f"Pretraining ({labels}): `macl_pretrain --method <m>{extra}`, {s.pretrain_epochs} epoch(s), batch "
            f"{s.pretrain_batch_size}, once per method, no labels, on the images of {info.get('pretrain_cases')} "
            f"cases: " + ("the validation cases INCLUDED (--pretrain-on-all, as the paper did)." if s.pretrain_on_all
                          else "the validation cases EXCLUDED."))
    missing = [f"{r['label']} M={r['budget']}" for r in agg if r["n_folds"] == 0]
    if missing:
        lines.append("No result at all (an empty row, left out of the others' common folds): " + ", ".join(missing) + ".")
    left_out = [f"{r['label']} M={r['budget']} fold {f}" for r in agg for f in r.get("excluded_folds", [])]
    if left_out:
        lines.append("Finished but left out because another arm has no result on that fold: "
                     + ", ".join(left_out) + " (in fewlabel_runs.csv).")
    if excluded:
        lines.append("Not in the table: " + "; ".join(f"{e['key']}: {e['reason']}" for e in excluded) + ".")
    return "\n".join(f"- {x}" for x in lines)


def _recipe_text(recipe: str, s: Settings) -> str:
    if recipe == "stock":
        return "stock = nnU-Net's SGD lr 1e-2, poly decay"
    if recipe == "rescale":
        return ("rescale = each pretrained convolution before an InstanceNorm scaled to the output spread of nnU-Net's "
                "initialisation on training images (same function), then the stock recipe")
    from nnunetv2_macl.trainers.schedules import FREEZE_FRACTION, PROTECT_PEAK_LR, WARMUP_FRACTION, WARMUP_PEAK_LR

    w = s.warmup_epochs or max(1, round(WARMUP_FRACTION * s.finetune_epochs))
    if recipe == "protect":
        f = round(FREEZE_FRACTION * s.finetune_epochs) if s.freeze_epochs is None else s.freeze_epochs
        factor = 1.0 if s.pretrained_lr_factor is None else s.pretrained_lr_factor
        return (f"protect = pretrained parts frozen for {f} epoch(s) while the new parts warm up to lr "
                f"{s.warmup_peak_lr or PROTECT_PEAK_LR:g}, then all parts warm up over {w} epoch(s), then poly decay"
                + (f"; pretrained lr x {factor:g}" if factor != 1.0 else ""))
    return f"warmup = linear warm-up over {w} epoch(s) to lr {s.warmup_peak_lr or WARMUP_PEAK_LR:g}, then poly decay"


def read_info(out: Path) -> tuple[Settings, dict, dict]:
    """Settings, dataset information (name, plans, dataset.json, raw folder) and splits of a run folder."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        raise FewLabelError(f"{out} holds no few-label run (no {MARKER})")
    info = json.loads(marker.read_text())
    s = Settings.from_dict(info["settings"])
    view = Path(out) / "views" / "finetune" / info["dataset"]
    if not (view / "splits_index.json").is_file():
        raise FewLabelError(f"{out}: the splits were not written (no {view}/splits_index.json)")
    info["plans"] = json.loads((view / f"{s.plans}.json").read_text())
    info["dataset_json"] = json.loads((view / "dataset.json").read_text())
    return s, info, read_splits(view)


def write_report(out: str | os.PathLike, timings: dict | None = None) -> dict:
    """Collect the finished runs of ``out`` and write into ``out/report``: ``fewlabel_runs.csv``,
    ``fewlabel_summary.csv``, ``fewlabel_table.md`` (table + caption), ``fewlabel_dice_vs_M.png``,
    ``fewlabel_curves_M<M>.png`` (learning curves), ``fewlabel_curves.json``, ``fewlabel_overlay_M<M>.png``
    (when the raw images are there) and ``fewlabel_result.json``."""
    out = Path(out).resolve()
    s, info, plan = read_info(out)
    report = out / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    dj = info["dataset_json"]
    labels = {k: int(v) for k, v in dj["labels"].items() if isinstance(v, (int, float))}
    run_log = read_run_log(out)
    # markers written before the case list was recorded give no pretraining fingerprint: such runs are
    # older than the version in the fingerprints anyway, and left out for it
    rows, excluded = collect_runs(out, info["dataset"], s, plan, run_log, labels, dj.get("file_ending"),
                                  info.get("cases"))
    classes = _class_names(rows)
    arms = s.arms()
    agg = aggregate(rows, arms, s.budgets)
    runs_csv, summary_csv = write_csvs(rows, agg, classes, report)
    title = f"{info['dataset']}: {s.folds} fold(s), {s.finetune_epochs}x{s.iters} it fine-tuning"
    plot = plot_dice_vs_budget(agg, arms, report / "fewlabel_dice_vs_M.png", title)
    curve_plots, curve_data = learning_curves(out, info["dataset"], s, plan, run_log, report)
    overlays = []
    raw = Path(info["raw"]) if info.get("raw") else None
    if raw is not None and (raw / "imagesTr").is_dir():
        from nnunetv2_macl.fewlabel.overlay import overlay_figure

        ds = {"raw": raw, "dataset_json": dj, "plans": info["plans"]}
        folders = {(r["label"], r["index"]): Path(r["folder"]) for r in rows}
        for b in s.budgets:
            p = overlay_figure(ds, plan, rows, folders, b, report / f"fewlabel_overlay_M{b}.png", s.overlay_cases)
            if p is not None:
                overlays.append(str(p))
    table = markdown_table(agg, classes if len(classes) > 1 else [])  # one class: its column is the mean's
    text = caption(s, info, plan, excluded, agg, classes)
    length_plots, length_text = pretraining_length(out, info["dataset"], s, agg, report)
    md = report / "fewlabel_table.md"
    md.write_text(f"{table}\n\n{text}\n\n{plateau_table(json.loads(curve_data.read_text()))}\n{length_text}")
    previous = report / "fewlabel_result.json"
    old_timings = json.loads(previous.read_text()).get("timings", {}) if previous.is_file() else {}
    result = {
        "settings": s.to_dict(), "dataset": info["dataset"], "written": datetime.datetime.now().astimezone().isoformat(),
        "machine": machine_description(s.device), "runs": [{k: v for k, v in r.items() if k != "per_case"} for r in rows],
        "excluded": excluded, "summary": agg, "run_log": run_log, "timings": dict(timings or old_timings),
        "table_markdown": table, "caption": text,
        "paths": {"report": str(report), "runs_csv": str(runs_csv), "summary_csv": str(summary_csv),
                  "table_md": str(md), "plot": str(plot), "curves": curve_plots, "curves_json": str(curve_data),
                  "overlays": overlays, "pretraining_length": length_plots,
                  "splits_final": str(out / "views" / "finetune" / info["dataset"] / "splits_final.json"),
                  "result_json": str(report / "fewlabel_result.json")},
    }
    write_json(report / "fewlabel_result.json", result)
    return result


def pretraining_length(out: Path, dataset_name: str, s: Settings, agg: list[dict], report: Path) -> tuple[list[str], str]:
    """With snapshot arms (``macl@encoder~16``): per budget, ``fewlabel_pretraining_length_M<M>.png`` and its
    table (returned as markdown, empty without such arms); the losses are those of the first such start's
    pretraining."""
    from nnunetv2_macl.fewlabel import pretraining_length as pl

    arms = s.arms()
    snap = [a for a in arms if a.snapshot is not None]
    if not snap:
        return [], ""
    log = pl.pretraining_log(pretrain_folder(out, snap[0].method, dataset_name, s))
    plots, parts = [], []
    for b in s.budgets:
        points, scratch = pl.length_points(agg, arms, s.pretrain_epochs, b), pl.scratch_reference(agg, b)
        plots.append(str(pl.plot_dice_vs_pretraining_epochs(
            points, scratch, log, b, s.pretrain_epochs, report / f"fewlabel_pretraining_length_M{b}.png",
            f"{dataset_name}: pretraining length at M = {b} (snapshots of one {s.pretrain_epochs}-epoch run)")))
        parts.append(pl.length_table(points, scratch, log, b, s.pretrain_epochs))
    return plots, "\n" + "\n\n".join(parts) + "\n"


def learning_curves(out: Path, dataset_name: str, s: Settings, plan: dict, run_log: list[dict],
                    report: Path) -> tuple[list[str], Path]:
    """Per budget, every arm's learning curves (folds that have a training log; a run still going shows
    its curve so far, its final point only once its full validation is in the table's sense done)."""
    status = {r["key"]: r["status"] for r in run_log}
    data, plots = {}, []
    for b in s.budgets:
        per_arm: dict[str, list[dict]] = {}
        for t in task_list(s, plan):
            if t.kind != "train" or t.budget != b:
                continue
            c = curves.learning_curve(run_folder(out, t.arm, dataset_name, t.index, s), s.iters)
            c["finished"] = status.get(t.key) in OK
            if not c["finished"]:
                c["final_dice"] = c["final_iterations"] = None
            if c["iterations"]:
                per_arm.setdefault(t.arm.label, []).append({**c, "fold": t.fold})
        if per_arm:
            path = report / f"fewlabel_curves_M{b}.png"
            curves.plot_learning_curves(per_arm, path, f"{dataset_name}, M={b}: validation Dice vs fine-tuning "
                                                       f"iterations (batch {s.finetune_batch_size or 'of the plans'})")
            plots.append(str(path))
            data[str(b)] = per_arm
    path = report / "fewlabel_curves.json"
    write_json(path, data)
    return plots, path


def plateau_table(curve_data: dict) -> str:
    """Per budget and arm: the pseudo-Dice gained in the last quarter of the fine-tuning (mean over folds;
    :func:`~nnunetv2_macl.fewlabel.curves.last_quarter_gain`), the plateau check of the protocol."""
    lines = ["| M | arm | runs | pseudo-Dice gain in the last quarter (pp) |", "|---|---|---|---:|"]
    for budget, per_arm in curve_data.items():
        for label, runs in per_arm.items():
            runs = [r for r in runs if r.get("finished", True)]  # a run still going has no last quarter yet
            gains = [g for g in (curves.last_quarter_gain(r) for r in runs) if g is not None]
            cell = (f"{100 * float(np.mean(gains)):+.2f}" if gains else
                    "– (run too short)" if runs else "– (no finished run)")
            lines.append(f"| {budget} | {label} | {len(runs)} | {cell} |")
    return "Learning curves (`fewlabel_curves_M<M>.png`): plateau check, last 5 epochs vs the 5 before 3/4 of the run\n\n" \
        + "\n".join(lines)


def machine_description(device: str) -> str:
    text = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores"
    if device == "cuda":
        try:
            import torch

            text += f", {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - a description only
            pass
    return text


def print_summary(result: dict) -> None:
    say("")
    say("=" * 90)
    say(f"results ({result['dataset']}):")
    print(result["table_markdown"], flush=True)
    print(result["caption"], flush=True)
    say("written:")
    for k, v in result["paths"].items():
        say(f"  {k:<14}{v}")
    if result["timings"]:
        say("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items()))
