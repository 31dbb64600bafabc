"""The few-label protocol package (``nnunetv2_macl.fewlabel``) and ``macl_fewlabel``.

Fast: splits (held-out cases never trained on, nesting, determinism), the read-only dataset views,
task scheduling, the report's filtering (failed runs and runs validated on other cases never enter a
table) and caption, the warm-up recipe, and learning-curve parsing on the log of a real tiny nnU-Net
training. ``e2e``: ``macl_fewlabel`` on the tiny synthetic dataset through the real CLIs, then --resume.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunetv2_macl
from nnunetv2_macl.errors import FewLabelError, MACLUserError, StepError
from nnunetv2_macl.fewlabel import records
from nnunetv2_macl.fewlabel import report as rp
from nnunetv2_macl.fewlabel import runner
from nnunetv2_macl.fewlabel.curves import learning_curve, parse_training_log, read_training_logs
from nnunetv2_macl.fewlabel.settings import Arm, Settings, parse_arm
from nnunetv2_macl.fewlabel.splits import make_splits, read_splits, validation_union, write_json, write_splits
from nnunetv2_macl.fewlabel.views import finetune_view, pretrain_view

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IDS = [f"case_{i:03d}" for i in range(37)]


# ------------------------------------------------------------------------------------------------ splits
def test_heldout_split_never_trains_on_validation_cases_and_nests():
    budgets, n_folds = (2, 4, 10, 20), 3
    plan = make_splits(list(reversed(IDS)), budgets, n_folds, "heldout", n_val=8, seed=12345)
    val = set(plan["index"][0]["val"])
    assert len(val) == 8 and len(plan["splits"]) == len(plan["index"]) == len(budgets) * n_folds
    for rec in plan["index"]:
        assert rec["index"] == budgets.index(rec["budget"]) * n_folds + rec["fold"]
        assert plan["splits"][rec["index"]] == {"train": rec["train"], "val": rec["val"]}
        assert set(rec["val"]) == val                                         # one validation set for all
        assert len(rec["train"]) == rec["budget"] == len(set(rec["train"]))
        assert not set(rec["train"]) & val                                    # never trained on
    for f in range(n_folds):
        recs = sorted((r for r in plan["index"] if r["fold"] == f), key=lambda r: r["budget"])
        for small, big in zip(recs, recs[1:]):
            assert big["train"][:small["budget"]] == small["train"]           # nested
    draws = {tuple(r["train"]) for r in plan["index"] if r["budget"] == 20}
    assert len(draws) == n_folds                                              # folds = different draws
    assert validation_union(plan) == sorted(val)
    # deterministic and independent of the input order; the seed matters
    assert make_splits(IDS, budgets, n_folds, "heldout", 8, 12345) == plan
    other = make_splits(IDS, budgets, n_folds, "heldout", 8, 7)
    assert other["index"][0]["val"] != plan["index"][0]["val"]
    # more folds or budgets do not change the existing draws
    more = make_splits(IDS, budgets, n_folds + 1, "heldout", 8, 12345)
    assert all(any(r["train"] == m["train"] and r["fold"] == m["fold"] for m in more["index"]) for r in plan["index"])


def test_kfold_split_is_the_earlier_benchmarks():
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    plan = make_splits(IDS, (2, 4), 2, "kfold", n_val=None, seed=12345, n_splits=5)
    reference = generate_crossval_split(sorted(IDS), seed=12345, n_splits=5)
    for rec in plan["index"]:
        assert rec["val"] == sorted(reference[rec["fold"]]["val"])
        assert set(rec["train"]) <= set(reference[rec["fold"]]["train"])
    capped = make_splits(IDS, (2, 4), 2, "kfold", n_val=3, seed=12345, n_splits=5)
    assert all(len(r["val"]) == 3 and set(r["val"]) <= set(full["val"]) and r["train"] == full["train"]
               for r, full in zip(capped["index"], plan["index"]))


def test_splits_with_one_or_two_labelled_cases():
    """A small dataset (20 cases, 8 held out) with budgets of 1 and 2 cases over three draws."""
    cases = [f"la_{i:03d}" for i in range(20)]
    plan = make_splits(cases, (1, 2), 3, "heldout", n_val=8, seed=12345)
    val = set(plan["index"][0]["val"])
    assert len(val) == 8 and len(plan["splits"]) == 2 * 3
    for rec in plan["index"]:
        assert set(rec["val"]) == val and len(rec["train"]) == rec["budget"] and not set(rec["train"]) & val
    for f in range(3):
        one, two = (next(r for r in plan["index"] if r["fold"] == f and r["budget"] == m) for m in (1, 2))
        assert two["train"][:1] == one["train"]                               # nested
    assert len({tuple(r["train"]) for r in plan["index"] if r["budget"] == 2}) > 1   # the draws differ
    kfold = make_splits(cases, (1, 2), 3, "kfold", n_val=None, seed=12345, n_splits=5)
    for rec in kfold["index"]:
        assert len(rec["val"]) == 4 and len(rec["train"]) == rec["budget"] and not set(rec["train"]) & set(rec["val"])
    # the defaults (40 held out, M up to 20) do not fit: the errors say what to change
    with pytest.raises(FewLabelError, match=r"--val-cases must be below the 20 cases, got 40 \(e.g. --val-cases"):
        make_splits(cases, (4, 10, 20), 2, "heldout", n_val=40)
    with pytest.raises(FewLabelError, match="M=13 exceeds the 12 cases .* lower --budgets or --val-cases"):
        make_splits(cases, (1, 13), 1, "heldout", n_val=8)


def test_split_errors_are_user_errors(tmp_path):
    with pytest.raises(FewLabelError, match="exceeds"):
        make_splits(IDS[:10], (4, 9), 1, "heldout", n_val=4)
    with pytest.raises(FewLabelError, match="increasing"):
        make_splits(IDS, (4, 2), 1)
    with pytest.raises(FewLabelError, match="val-cases"):
        make_splits(IDS[:10], (2,), 1, "heldout", n_val=10)
    assert issubclass(FewLabelError, MACLUserError)
    plan = make_splits(IDS, (2, 4), 2, "heldout", n_val=5)
    write_splits(tmp_path, plan)
    assert json.loads((tmp_path / "splits_final.json").read_text()) == plan["splits"]   # what nnU-Net reads
    assert read_splits(tmp_path) == json.loads(json.dumps(plan))


def test_arms_and_settings():
    assert parse_arm("scratch", "warmup") == Arm("scratch", "stock")         # scratch: stock unless asked
    assert parse_arm("macl", "warmup") == Arm("macl", "warmup")
    assert parse_arm("scratch:warmup").trainer == "nnUNetTrainerScratch_warmup_bench"
    assert parse_arm("pcl").trainer == "nnUNetTrainerMACL_bench" and parse_arm("macl:warmup").key == "macl_warmup"
    with pytest.raises(FewLabelError, match="byol"):
        parse_arm("byol")
    with pytest.raises(FewLabelError, match="recipe"):
        parse_arm("macl:cosine")
    enc = parse_arm("macl@encoder")
    assert enc == Arm("macl", "stock", "encoder") and enc.key == "macl_encoder" and "encoder only" in enc.label
    assert enc.trainer == "nnUNetTrainerMACL_encoder_bench"
    assert parse_arm("macl:warmup@encoder").trainer == "nnUNetTrainerMACL_warmup_encoder_bench"
    # the plain macl arm is the paper's hand-over whatever nnUNetTrainerMACL's default; its label says so, and a
    # pretrained start names its recipe even when stock (nnUNetTrainerMACL's own is rescale)
    assert parse_arm("macl").label == "MACL (stock, paper transfer)" and parse_arm("pcl").label == "PCL (stock)"
    assert parse_arm("scratch").label == "scratch" and parse_arm("scratch:warmup").label == "scratch (warmup)"
    assert parse_arm("macl:rescale@encoder").label == "MACL (rescale, encoder only)"
    assert parse_arm("macl:warmup@encoder").label == "MACL (warmup, encoder only)"
    with pytest.raises(FewLabelError, match="pretrained method"):
        parse_arm("scratch@encoder")
    with pytest.raises(FewLabelError, match="transfer"):
        parse_arm("macl@decoder")
    assert Settings(methods=("scratch", "macl@encoder")).pretrain_methods() == ["macl"]
    s = Settings(methods=("scratch", "macl:warmup", "pcl"))
    assert s.pretrain_methods() == ["macl", "pcl"]


def test_snapshot_arms_parse_and_are_checked_against_the_kept_epochs():
    """``macl@encoder~16``: the start is the pretraining's snapshot at epoch 16; only a kept epoch before
    the last is accepted, and only for a pretrained method."""
    from nnunetv2_macl.fewlabel.settings import validate

    snap = parse_arm("macl@encoder~16")
    assert snap == Arm("macl", "stock", "encoder", 16) and snap.key == "macl_encoder_e16"
    assert snap.trainer == parse_arm("macl@encoder").trainer                  # the same fine-tuning, another start
    assert snap.label == "MACL (stock, encoder only, pretraining epoch 16)"
    assert parse_arm("macl:warmup~4").key == "macl_warmup_e4" and parse_arm("macl").snapshot is None
    for bad, match in (("scratch~4", "pretraining epoch"), ("macl~x", "positive number"), ("macl~0", "positive"),
                       ("macl~4@encoder", "positive number")):
        with pytest.raises(FewLabelError, match=match):
            parse_arm(bad)
    with pytest.raises(FewLabelError, match="keeps no checkpoint of epoch 2"):
        validate(Settings(methods=("scratch", "macl@encoder~2"), pretrain_epochs=4))
    with pytest.raises(FewLabelError, match="not a snapshot of a 4-epoch"):
        validate(Settings(methods=("scratch", "macl@encoder~4"), pretrain_epochs=4,
                          pretrain_extra="--keep-epochs 2,4"))
    validate(Settings(methods=("scratch", "macl@encoder", "macl@encoder~2"), pretrain_epochs=4,
                      pretrain_extra="--keep-epochs 2"))


def test_a_snapshot_arm_trains_in_its_own_folder_and_leaves_the_other_fingerprints_as_they_were():
    """Adding ``macl@encoder~2`` to a workdir must not reset its runs: the other trainings' fingerprints
    are unchanged; the snapshot's training differs from the final start's in its folder, its fingerprint
    (the epoch) and its start (the kept checkpoint)."""
    kw = dict(budgets=(2,), folds=1, pretrain_epochs=4, pretrain_extra="--keep-epochs 2")
    cases = [f"case_{i:03d}" for i in range(20)]
    plain = Settings(methods=("scratch", "macl@encoder"), **kw)
    both = Settings(methods=("scratch", "macl@encoder", "macl@encoder~2"), **kw)
    plan = make_splits(cases, plain.budgets, plain.folds, "heldout", 5, plain.seed)
    pre = records.pretrain_cases(plain, plan, cases)

    def fps(s):
        return {t.key: records.task_fingerprint(t, s, plan, pre) for t in records.task_list(s, plan)}

    a, b = fps(plain), fps(both)
    assert all(b[k] == v for k, v in a.items())
    final, snap = b["train:macl_encoder:M2:f0"], b["train:macl_encoder_e2:M2:f0"]
    assert records.fingerprint_diff(final, snap) == ["snapshot_epoch"] and snap["snapshot_epoch"] == 2
    arm_final, arm_snap = parse_arm("macl@encoder"), parse_arm("macl@encoder~2")
    out = Path("/out")
    folder_final = records.run_folder(out, arm_final, "D", 3, both)
    folder_snap = records.run_folder(out, arm_snap, "D", 3, both)
    assert folder_final != folder_snap and folder_final.parts[-2:] == folder_snap.parts[-2:]
    assert records.train_root(out, arm_final) == records.results_root(out, "macl")
    pre_folder = records.pretrain_folder(out, "macl", "D", both)
    assert records.start_checkpoint(out, arm_final, "D", both) == pre_folder / "checkpoint_final.pth"
    assert records.start_checkpoint(out, arm_snap, "D", both) == pre_folder / "checkpoint_epoch_2.pth"


def test_a_snapshot_missing_from_a_reused_pretraining_fails_with_what_to_do(tmp_path):
    """--keep-epochs is not in the pretraining's fingerprint, so a reused pretraining may lack the snapshot:
    that training fails naming the file and the remedy, before nnU-Net starts."""
    s = Settings(methods=("scratch", "macl@encoder~2"), budgets=(2,), pretrain_epochs=4,
                 pretrain_extra="--keep-epochs 2")
    plan = make_splits([f"case_{i:03d}" for i in range(12)], s.budgets, s.folds, "heldout", 4, s.seed)
    task = next(t for t in records.task_list(s, plan) if t.kind == "train" and t.arm.snapshot)
    task.extra["fingerprint"] = {}
    with pytest.raises(StepError, match=r"checkpoint_epoch_2\.pth is not there.*--keep-epochs 2.*remove that folder"):
        runner.execute(task, s, tmp_path, "D", dict(os.environ), None, 1)


def test_the_pretraining_length_report(tmp_path):
    """With snapshot arms the report plots Dice against the start's pretraining epoch, scratch as the
    reference, and tables it beside the pretraining's losses at those epochs."""
    out, name = tmp_path / "out", "Dataset981_Fake"
    s = Settings(dataset_id=981, budgets=(2,), folds=2, methods=("scratch", "macl@encoder", "macl@encoder~1"),
                 n_val=3, iters=5, finetune_epochs=2, pretrain_epochs=2, pretrain_extra="--keep-epochs 1")

    def dice(t):  # scratch 70 / 71, the snapshot +1, the final start +3 (folds 0 / 1)
        gain = 0.0 if t.method == "scratch" else (0.01 if t.arm.snapshot else 0.03)
        return {"1": 0.7 + gain + 0.01 * t.fold}

    plan, tasks = make_workdir(out, name, s, [f"case_{i}" for i in range(12)], {"structure": 1}, dice)
    records.write_run_log(out, tasks)
    pre = records.pretrain_folder(out, "macl", name, s)
    pre.mkdir(parents=True)
    # logged as the pretrainer logs: epoch index 0 is the row of snapshot 1 (test_pretrain_length checks that)
    torch.save({"logging": {"epoch": [0, 1], "Lg": [3.0, 2.0], "Lg_chance": [4.0, 4.0], "Ld": [2.5, 2.0],
                            "LER": [0.1, 0.02]}, "macl": {"epochs": 2}}, pre / "checkpoint_final.pth")
    result = rp.write_report(out)
    md = (out / "report" / "fewlabel_table.md").read_text()
    assert "snapshot at epoch E of the 2-epoch pretraining, not an E-epoch pretraining" in md
    assert "| MACL (stock, encoder only) | 1 | 2 | 71.50 ± 0.71 | +1.00 ± 0.00 | 0.750 | 2.500 | 0.1000 |" in md
    assert "| MACL (stock, encoder only) | 2 | 2 | 73.50 ± 0.71 | +3.00 ± 0.00 | 0.500 | 2.000 | 0.0200 |" in md
    assert "| scratch | – | 2 | 70.50 ± 0.71 | (reference) |" in md
    (plot,) = result["paths"]["pretraining_length"]
    assert plot.endswith("fewlabel_pretraining_length_M2.png") and Path(plot).read_bytes()[:8] == PNG_MAGIC
    plain = Settings(**{**s.to_dict(), "methods": ("scratch", "macl@encoder")})
    assert rp.pretraining_length(out, name, plain, result["summary"], out / "report") == ([], "")


# ------------------------------------------------------------------------------------------------ views
def test_views_link_and_never_write_the_source(tmp_path):
    src = tmp_path / "pre" / "Dataset977_V"
    (src / "nnUNetPlans_2d").mkdir(parents=True)
    (src / "gt_segmentations").mkdir()
    for f, text in (("dataset.json", "{}"), ("nnUNetPlans.json", "{}"), ("splits_final.json", "[\"user's\"]")):
        (src / f).write_text(text)
    for c in ("a", "b", "c"):
        for ext in (".b2nd", "_seg.b2nd", ".pkl"):
            (src / "nnUNetPlans_2d" / f"{c}{ext}").write_text(c)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    ft = finetune_view(src, tmp_path / "views" / "ft")
    assert (ft / "nnUNetPlans_2d").is_symlink() and not (ft / "splits_final.json").exists()
    write_splits(ft, make_splits(IDS, (2,), 1, "heldout", 3))
    pre = pretrain_view(src, tmp_path / "views" / "pre", "nnUNetPlans_2d", ["a", "c"])
    assert sorted(p.name for p in (pre / "nnUNetPlans_2d").iterdir()) == sorted(
        f"{c}{e}" for c in "ac" for e in (".b2nd", "_seg.b2nd", ".pkl"))
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before   # the source is untouched
    with pytest.raises(FewLabelError, match="no preprocessed files"):
        pretrain_view(src, tmp_path / "views" / "pre", "nnUNetPlans_2d", ["a", "zz"])


# ------------------------------------------------------------------------------------------------ scheduling
def _tasks(methods=("scratch", "macl"), budgets=(2, 4), folds=1):
    s = Settings(methods=methods, budgets=budgets, folds=folds)
    return records.task_list(s, make_splits(IDS, budgets, folds, "heldout", 5))


def test_task_order_and_dependencies():
    tasks = _tasks(("scratch", "macl", "pcl:warmup"), (4, 10), 2)
    assert [t.key for t in tasks[:2]] == ["pretrain:macl", "pretrain:pcl"]
    trains = [(t.fold, t.budget, t.arm.key, t.index) for t in tasks[2:]]
    assert trains[:3] == [(0, 4, "scratch", 0), (0, 4, "macl", 0), (0, 4, "pcl_warmup", 0)]
    assert trains[3][:2] == (0, 10) and trains[3][3] == 2 and trains[-1] == (1, 10, "pcl_warmup", 3)
    assert all(t.deps == (f"pretrain:{t.method}",) for t in tasks[2:] if t.method != "scratch")


def test_run_tasks_failure_skips_dependants_and_runs_in_parallel():
    tasks = _tasks()
    active, peak, lock = [0], [0], threading.Lock()

    def execute(t, timeout):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        if t.kind == "pretrain":
            raise StepError("macl_pretrain failed with exit status 2")

    runner.run_tasks(tasks, 2, execute)
    assert {t.key: t.status for t in tasks} == {"pretrain:macl": "failed", "train:scratch:M2:f0": "done",
                                                "train:macl:M2:f0": "skipped", "train:scratch:M4:f0": "done",
                                                "train:macl:M4:f0": "skipped"}
    assert "exit status 2" in tasks[0].message and peak[0] == 2


def test_run_tasks_deadlines_cut():
    tasks = _tasks(("scratch",), (2, 4, 8))
    runner.run_tasks(tasks, 1, lambda t, timeout: time.sleep(0.3), deadline=time.perf_counter() + 0.1)
    assert [t.status for t in tasks] == ["done", "cut", "cut"] and "deadline" in tasks[1].message


def test_deadline_zero_starts_nothing_however_fast_the_staging():
    """``--deadline-min 0`` (deadline = the start) stages and reports only; a small positive one could still
    start the first run when staging took less than it (it did: 0.01 min started a 25-minute training)."""
    tasks = _tasks(("scratch",), (2, 4))
    started: list[str] = []
    runner.run_tasks(tasks, 1, lambda t, timeout: started.append(t.key), deadline=time.perf_counter())
    assert started == [] and {t.status for t in tasks} == {"cut"}


# ------------------------------------------------------------------------------------------------ report
def _summary(cases, dice):
    per_case = [{"reference_file": f"/gt/{c}.nii.gz", "prediction_file": f"/x/{c}.nii.gz",
                 "metrics": {k: {"Dice": v} for k, v in dice.items()}} for c in cases]
    return {"foreground_mean": {"Dice": float(np.mean(list(dice.values())))},
            "mean": {k: {"Dice": v} for k, v in dice.items()}, "metric_per_case": per_case}


def make_workdir(out: Path, name: str, s: Settings, cases: list[str], labels: dict[str, int],
                 dice) -> tuple[dict, list]:
    """An output folder as the runner leaves it: marker (with the dataset's cases), view with splits,
    and per training its fingerprint (as ``runner.execute`` writes it), summary and training log (the
    format nnU-Net writes, one pseudo-Dice per foreground class). ``dice(task)``: ``{label: Dice}``.
    Returns the plan and the tasks, all "done" (the caller writes the run log)."""
    plan = make_splits(cases, s.budgets, s.folds, s.split, s.n_val, s.seed)
    view = out / "views" / "finetune" / name
    view.mkdir(parents=True)
    write_splits(view, plan)
    (view / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **labels}, "file_ending": ".nii.gz"}))
    (view / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {"batch_size": 12}}}))
    pre_cases = records.pretrain_cases(s, plan, cases)
    write_json(out / records.MARKER, {"settings": s.to_dict(), "dataset": name, "raw": None,
                                      "pretrain_cases": len(pre_cases), "cases": list(cases)})
    tasks = records.task_list(s, plan)
    n_classes = len(labels)
    for t in tasks:
        t.status, t.seconds = "done", 10.0
        if t.kind != "train":
            continue
        folder = records.run_folder(out, t.arm, name, t.index, s)
        (folder / "validation").mkdir(parents=True)
        write_json(folder / records.TASK_FILE, records.task_fingerprint(t, s, plan, pre_cases))
        summary = _summary(plan["splits"][t.index]["val"], dice(t))
        (folder / "validation" / "summary.json").write_text(json.dumps(summary))
        (folder / "training_log_2026_1_1_00_00_00.txt").write_text("".join(
            f"2026-01-01 00:00:0{e}.0: \n2026-01-01 00:00:0{e}.1: Epoch {e} \n"
            f"2026-01-01 00:00:0{e}.2: Current learning rate: 0.01 \n2026-01-01 00:00:0{e}.3: train_loss -0.{e + 1} \n"
            f"2026-01-01 00:00:0{e}.4: val_loss -0.{e + 2} \n2026-01-01 00:00:0{e}.5: Pseudo dice ["
            + ", ".join(f"np.float32(0.{e + 3 + 2 * k})" for k in range(n_classes)) + "] \n" for e in range(2)))
    return plan, tasks


@pytest.fixture
def fake_out(tmp_path):
    """Two foreground classes, M in {2, 4}, two folds, scratch and MACL (made by :func:`make_workdir`)."""
    out, name = tmp_path / "out", "Dataset981_Fake"
    s = Settings(dataset_id=981, budgets=(2, 4), folds=2, methods=("scratch", "macl"), n_val=3, iters=5,
                 finetune_epochs=2, pretrain_epochs=1)

    def dice(t):
        base = 0.6 if t.budget == 2 else 0.7
        gain = 0.0 if t.method == "scratch" else (0.04 if t.fold == 0 else 0.02)
        return {"1": base + gain, "2": base + 0.1 + gain}

    plan, tasks = make_workdir(out, name, s, [f"case_{i}" for i in range(12)], {"anterior": 1, "posterior": 2}, dice)
    return out, name, s, plan, tasks


def test_report_table_spread_and_caption(fake_out):
    out, name, s, plan, tasks = fake_out
    records.write_run_log(out, tasks)
    result = rp.write_report(out)
    report = out / "report"
    with open(report / "fewlabel_summary.csv") as f:
        summary = {(int(r["budget"]), r["arm"]): r for r in csv.DictReader(f)}
    m2 = summary[(2, "macl")]
    assert int(m2["n_folds"]) == 2 and float(m2["dice_mean_mean"]) == pytest.approx(0.68)
    assert float(m2["dice_mean_sd"]) == pytest.approx(np.std([0.69, 0.67], ddof=1))
    assert float(m2["delta_vs_scratch_mean"]) == pytest.approx(0.03)
    md = (report / "fewlabel_table.md").read_text()
    assert "| 2 | MACL (stock, paper transfer) | 2 | 68.00 ± 1.41 | 63.00 ± 1.41 | 73.00 ± 1.41 | +3.00 ± 1.41 | 6 / 6 |" in md
    assert int(m2["cases_above_scratch"]) == 6 and int(m2["cases_paired"]) == 6  # 3 validation cases x 2 folds
    assert "on 3 validation cases, the same for every fold and M, in no training set" in md
    assert "on the images of 9 cases: the validation cases EXCLUDED" in md and "Not in the table" not in md
    for p in [result["paths"]["plot"], *result["paths"]["curves"]]:
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
    curves = json.loads((report / "fewlabel_curves.json").read_text())
    c = curves["2"]["MACL (stock, paper transfer)"][0]
    assert c["iterations"] == [5, 10] and c["pseudo_dice"] == pytest.approx([0.4, 0.5])   # mean of the classes
    assert c["final_iterations"] == 10 and c["final_dice"] == pytest.approx(0.69)
    assert "pseudo-Dice gain in the last quarter" in md and "| 2 | MACL (stock, paper transfer) | 2 | – (run too short) |" in md


def test_last_quarter_gain():
    from nnunetv2_macl.fewlabel.curves import last_quarter_gain

    flat = {"pseudo_dice": [0.1 * min(e, 10) / 10 for e in range(40)]}       # rises, then flat
    rising = {"pseudo_dice": [e / 40 for e in range(40)]}
    assert last_quarter_gain(flat) == pytest.approx(0.0) and last_quarter_gain(rising) == pytest.approx(0.25)
    assert last_quarter_gain({"pseudo_dice": [0.5] * 9}) is None


def test_a_run_still_going_stays_out_of_the_mean_curve_and_the_plateau_check(tmp_path):
    """A partial run would cut an arm's mean curve short and fake a last-quarter gain: it is drawn apart."""
    from nnunetv2_macl.fewlabel.curves import mean_curve_runs, plot_learning_curves
    from nnunetv2_macl.fewlabel.report import plateau_table

    def run(values, finished):
        return {"iterations": [25 * (e + 1) for e in range(len(values))], "pseudo_dice": values, "finished": finished,
                "final_iterations": None, "final_dice": None}

    done = run([0.1 * min(e, 10) / 10 for e in range(40)], True)      # flat last quarter
    going = run([e / 40 for e in range(12)], False)                    # rising, 12 epochs so far
    assert mean_curve_runs([done, going]) == ([done], [going])
    assert mean_curve_runs([going]) == ([going], [])                   # nothing finished yet: show progress
    md = plateau_table({"4": {"scratch": [done, going]}, "20": {"MACL": [going]}})
    assert "| 4 | scratch | 1 | +0.00 |" in md and "| 20 | MACL | 0 | – (no finished run) |" in md
    path = plot_learning_curves({"scratch": [done, going]}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_failed_runs_and_other_validation_cases_never_enter_a_table(fake_out):
    out, name, s, plan, tasks = fake_out
    failed = next(t for t in tasks if t.key == "train:macl:M4:f1")
    failed.status, failed.message = "failed", "StepError: exit status 1"            # its summary.json exists
    other = next(t for t in tasks if t.key == "train:scratch:M2:f1")
    summary = records.run_folder(out, other.arm, name, other.index, s) / "validation" / "summary.json"
    summary.write_text(json.dumps(_summary(["case_0", "case_1", "case_2", "case_3"], {"1": 0.99, "2": 0.99})))
    records.write_run_log(out, tasks)
    result = rp.write_report(out)
    keys = {(r["arm"], r["budget"], r["fold"]) for r in result["runs"]}
    assert ("macl", 4, 1) not in keys and ("scratch", 2, 1) not in keys and len(keys) == 6
    assert {e["key"] for e in result["excluded"]} == {failed.key, other.key}
    agg = {(r["budget"], r["arm"]): r for r in result["summary"]}
    assert agg[(4, "scratch")]["n_folds"] == agg[(4, "macl")]["n_folds"] == 1      # like with like
    assert agg[(2, "macl")]["excluded_folds"] == [1]
    md = (out / "report" / "fewlabel_table.md").read_text()
    assert "train:macl:M4:f1: failed" in md and "validated on other cases" in md
    # a start with no result at a budget (here: both its runs failed) empties only its own row
    for t in tasks:
        if t.key == "train:macl:M4:f0":
            t.status, t.message = "failed", "StepError: exit status 1"
    records.write_run_log(out, tasks)
    agg = {(r["budget"], r["arm"]): r for r in rp.write_report(out)["summary"]}
    assert agg[(4, "scratch")]["n_folds"] == 2 and agg[(4, "macl")]["n_folds"] == 0
    assert agg[(2, "macl")]["n_folds"] == 1                                          # M = 2 is as before
    md = (out / "report" / "fewlabel_table.md").read_text()
    assert "| 4 | MACL (stock, paper transfer) | 0 |" in md and "No result at all" in md and "M=4" in md
    for t in tasks:
        if t.key == "train:macl:M4:f0":
            t.status, t.message = "done", ""
    assert "0.99" not in (out / "report" / "fewlabel_runs.csv").read_text()
    # what was running: "running" while its runner is alive (--report-only during a measurement), "cut" after
    failed.status = "running"
    records.write_run_log(out, tasks)
    log_file = out / records.RUN_LOG
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        log = json.loads(log_file.read_text())
        for r in log:
            r["runner"] = f"{socket.gethostname()}:{proc.pid}"
        log_file.write_text(json.dumps(log))
        assert f"train:macl:M4:f1: running (the runner (pid {proc.pid}) is still going)" in rp.write_report(out)["caption"]
    finally:
        proc.kill()
        proc.wait()
    assert "train:macl:M4:f1: cut (runner stopped while running)" in rp.write_report(out)["caption"]


def _nifti(arr: np.ndarray, path: Path) -> None:
    """``arr`` in nnU-Net's axis order (z, y, x), written as nibabel expects (x, y, z)."""
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), np.eye(4)), str(path))


@pytest.mark.parametrize("labels", [{"heart": 1}, {"anterior": 1, "posterior": 2}], ids=["one-class", "two-classes"])
def test_report_with_one_or_two_labelled_cases_and_any_number_of_classes(tmp_path, labels):
    """M in {1, 2} on 20 cases (8 held out), three draws: table, CSV, curves, Dice-vs-M plot and the overlay
    of validation slices for one foreground class and for two."""
    out, name = tmp_path / "out", "Dataset982_Small"
    s = Settings(dataset_id=982, budgets=(1, 2), folds=3, methods=("scratch", "macl@encoder"), n_val=8, iters=5,
                 finetune_epochs=2, overlay_cases=2)
    rng = np.random.default_rng(0)
    made: dict = {}                                                          # (arm, M, fold) -> {label: Dice}

    def dice(t):
        made[(t.arm.key, t.budget, t.fold)] = d = {str(v): float(rng.uniform(0.3, 0.9)) for v in labels.values()}
        return d

    plan, tasks = make_workdir(out, name, s, [f"la_{i:03d}" for i in range(20)], labels, dice)
    # raw images, references and the fold-0 runs' predictions, for the overlay
    raw = tmp_path / "raw"
    fold0 = next(r for r in plan["index"] if r["fold"] == 0)
    for case in fold0["val"]:
        ref = np.zeros((4, 16, 16), np.uint8)
        for k, v in enumerate(labels.values()):
            ref[1:3, 3 + 5 * k:6 + 5 * k, 4:10] = v
        _nifti(rng.normal(size=ref.shape).astype(np.float32), raw / "imagesTr" / f"{case}_0000.nii.gz")
        _nifti(ref, raw / "labelsTr" / f"{case}.nii.gz")
        for t in tasks:
            if t.kind == "train" and t.fold == 0:
                _nifti(np.roll(ref, t.budget, axis=2), records.run_folder(out, t.arm, name, t.index, s) / "validation"
                       / f"{case}.nii.gz")
    marker = json.loads((out / records.MARKER).read_text())
    write_json(out / records.MARKER, {**marker, "raw": str(raw)})
    records.write_run_log(out, tasks)
    result = rp.write_report(out)

    assert result["excluded"] == [] and len(result["runs"]) == 2 * 2 * 3
    agg = {(r["budget"], r["arm"]): r for r in result["summary"]}
    for b in (1, 2):
        fg = {a: [np.mean(list(made[(a, b, f)].values())) for f in range(3)] for a in ("scratch", "macl_encoder")}
        got = agg[(b, "macl_encoder")]
        assert got["n_folds"] == 3 and got["dice_mean_mean"] == pytest.approx(np.mean(fg["macl_encoder"]))
        assert got["dice_mean_sd"] == pytest.approx(np.std(fg["macl_encoder"], ddof=1))
        assert got["delta_vs_scratch_mean"] == pytest.approx(np.mean(np.subtract(fg["macl_encoder"], fg["scratch"])))
        for cls, v in labels.items():
            assert got[f"dice_{cls}_mean"] == pytest.approx(np.mean([made[("macl_encoder", b, f)][str(v)]
                                                                    for f in range(3)]))
    header = result["table_markdown"].splitlines()[0]
    # one class: its Dice is the foreground mean, so the table has no second copy of it; the caption says so
    assert [c for c in labels if f"{c} (%)" in header] == ([] if len(labels) == 1 else list(labels))
    assert ("one foreground class, heart" in result["caption"]) == (len(labels) == 1)
    with open(result["paths"]["runs_csv"]) as f:
        runs = list(csv.DictReader(f))
    assert all(float(r[f"dice_{c}"]) == pytest.approx(made[(r["arm"], int(r["budget"]), int(r["fold"]))][str(v)])
               for r in runs for c, v in labels.items())
    curves = json.loads(Path(result["paths"]["curves_json"]).read_text())
    assert sorted(curves) == ["1", "2"]
    assert all(len(runs) == 3 for per_arm in curves.values() for runs in per_arm.values())
    logged = [np.mean([float(f"0.{e + 3 + 2 * k}") for k in range(len(labels))]) for e in range(2)]  # make_workdir
    assert curves["1"]["scratch"][0]["pseudo_dice"] == pytest.approx(logged)
    assert len(result["paths"]["overlays"]) == 2
    for p in [result["paths"]["plot"], *result["paths"]["curves"], *result["paths"]["overlays"]]:
        assert Path(p).read_bytes()[:8] == PNG_MAGIC, p


def test_a_fold_without_foreground_leaves_the_difference_to_scratch_defined():
    """nnU-Net's Dice is nan where reference and prediction are both empty: that fold has no difference."""
    arms = [parse_arm("scratch"), parse_arm("macl@encoder")]
    rows = [{"arm": a.key, "budget": 1, "fold": f, "dice_mean": d}
            for a, per_fold in zip(arms, ([0.5, 0.6], [0.55, float("nan")])) for f, d in enumerate(per_fold)]
    agg = {r["arm"]: r for r in rp.aggregate(rows, arms, [1])}
    assert agg["macl_encoder"]["delta_vs_scratch_mean"] == pytest.approx(0.05)
    assert agg["macl_encoder"]["delta_n_folds"] == 1 and agg["macl_encoder"]["dice_mean_mean"] == pytest.approx(0.55)
    assert "nan" not in rp.markdown_table(list(agg.values()), [])


def test_cases_above_scratch_pairs_each_case_with_scratch_on_its_own_fold():
    """A mean can hinge on one case: the count pairs case by case, fold by fold, and skips what scratch lacks."""
    scratch = [{"fold": 0, "per_case": {"a": 0.5, "b": 0.7, "c": 0.9}}, {"fold": 1, "per_case": {"a": 0.6, "b": 0.6}}]
    mine = [{"fold": 0, "per_case": {"a": 0.9, "b": 0.6, "c": float("nan")}},   # above on a, below on b, c unscored
            {"fold": 1, "per_case": {"a": 0.61, "b": 0.6, "d": 0.99}},          # above on a, tie on b, d not in scratch
            {"fold": 2, "per_case": {"a": 1.0}}]                                # no scratch on fold 2
    assert rp.cases_above(mine, scratch) == (2, 4)
    assert rp.cases_above(mine, []) == (0, 0)
    arms = [parse_arm("scratch"), parse_arm("macl@encoder")]
    rows = [{"arm": "scratch", "budget": 1, "dice_mean": 0.7, **r} for r in scratch[:1]] + \
           [{"arm": "macl_encoder", "budget": 1, "dice_mean": 0.75, **r} for r in mine[:1]]
    agg = rp.aggregate(rows, arms, [1])
    table = rp.markdown_table(agg, [])
    assert "| +5.00 | 1 / 2 |" in table and "| (reference) | – |" in table


# ------------------------------------------------------------------------------------------------ fingerprints
def _fingerprints(**settings) -> dict[str, dict]:
    s = Settings(methods=("scratch", "macl@encoder", "pcl"), budgets=(2,), folds=1, **settings)
    cases = [f"case_{i:03d}" for i in range(20)]
    plan = make_splits(cases, s.budgets, s.folds, "heldout", 5, s.seed)
    pre = records.pretrain_cases(s, plan, cases)
    return {t.key: records.task_fingerprint(t, s, plan, pre) for t in records.task_list(s, plan)}


def test_fingerprints_hold_the_version_and_the_resolved_pretraining(monkeypatch):
    from nnunetv2_macl.fewlabel.pretraining import NOT_SHAPING, OFF_SWITCHES
    from nnunetv2_macl.training.config import MACLConfig

    fps = _fingerprints()
    fields = {f.name for f in dataclasses.fields(MACLConfig)}
    switched = {f for _, governed in OFF_SWITCHES.values() for f in governed}
    assert set(NOT_SHAPING) | switched <= fields           # a renamed field would not be left out any more: notice
    assert all(getattr(MACLConfig(), k) == off for k, (off, _) in OFF_SWITCHES.items())  # off by default
    macl, pcl, scratch = fps["train:macl_encoder:M2:f0"], fps["pretrain:pcl"], fps["train:scratch:M2:f0"]
    assert macl["version"] == macl["pretraining"]["version"] == scratch["version"] == nnunetv2_macl.__version__
    assert set(pcl["config"]) == set(macl["pretraining"]["config"]) == fields - set(NOT_SHAPING) - switched
    assert scratch["pretraining"] is None
    assert (pcl["config"]["method"], pcl["config"]["decoder_blocks"]) == ("pcl", 0)     # method switches resolved
    assert macl["pretraining"]["config"]["decoder_blocks"] == MACLConfig().decoder_blocks
    assert fps["pretrain:macl"] == macl["pretraining"]
    # the protocol's pretraining settings are in it, the number of loader processes is not
    assert records.fingerprint_diff(fps["pretrain:macl"], _fingerprints(pretrain_epochs=3)["pretrain:macl"]) == [
        "config.epochs"]
    assert _fingerprints(pretrain_workers=5) == fps
    # another code version: no fingerprint matches
    monkeypatch.setattr(nnunetv2_macl, "__version__", "0.2.0+other")
    other = _fingerprints()
    assert all(records.fingerprint_diff(fps[k], other[k])[:1] == ["version"] for k in fps)


def test_pretrain_extra_enters_the_pretraining_fingerprint_through_the_config():
    fps = _fingerprints()
    lr = _fingerprints(pretrain_extra="--lr 0.01")
    assert records.fingerprint_diff(fps["train:macl_encoder:M2:f0"], lr["train:macl_encoder:M2:f0"]) == [
        "pretraining.config.lr"]
    assert lr["pretrain:pcl"]["config"]["lr"] == 0.01 and lr["train:scratch:M2:f0"] == fps["train:scratch:M2:f0"]
    assert _fingerprints(pretrain_extra="--lr=0.01") == lr                  # the resolved config, not the spelling


def test_a_changed_pretraining_default_or_a_new_config_field_changes_the_fingerprint(monkeypatch):
    """The fingerprint follows MACLConfig's fields and macl_pretrain's defaults without being told."""
    from nnunetv2_macl.run import pretrain
    from nnunetv2_macl.training.config import MACLConfig

    before = _fingerprints()

    @dataclasses.dataclass
    class ChangedConfig(MACLConfig):
        momentum: float = MACLConfig().momentum / 2                       # a default changed, no CLI option
        some_new_switch: bool = False                                       # a field added

    monkeypatch.setattr(pretrain, "MACLConfig", ChangedConfig)
    after = _fingerprints()
    assert records.fingerprint_diff(before["train:macl_encoder:M2:f0"], after["train:macl_encoder:M2:f0"]) == [
        "pretraining.config.momentum", "pretraining.config.some_new_switch"]
    assert after["train:scratch:M2:f0"] == before["train:scratch:M2:f0"]


def test_the_pretraining_that_runs_is_the_one_fingerprinted(monkeypatch, tmp_path):
    """The runner's macl_pretrain command, parsed as macl_pretrain parses it, gives the recorded config."""
    from nnunetv2_macl.fewlabel.pretraining import shaping_part
    from nnunetv2_macl.run.pretrain import build_parser, config_from_args
    from nnunetv2_macl.training.config import resolve_method

    out, name = tmp_path / "out", "Dataset981_Fake"
    s = Settings(methods=("scratch", "macl"), budgets=(2,), pretrain_workers=3,
                 pretrain_extra="--lr 0.01 --global-pooling avg --intensity-aug")
    cases = [f"case_{i:03d}" for i in range(12)]
    plan = make_splits(cases, s.budgets, 1, "heldout", 4, s.seed)
    task = records.task_list(s, plan)[0]
    task.extra["fingerprint"] = records.task_fingerprint(task, s, plan, records.pretrain_cases(s, plan, cases))
    folder = records.pretrain_folder(out, "macl", name, s)
    commands = []

    def fake_stream(cmd, env, tag, log, timeout, caller="macl_demo"):
        assert caller == "fewlabel"  # its lines announce macl_fewlabel's commands as its own
        commands.append(cmd)
        (folder / "checkpoint_final.pth").write_bytes(b"")

    monkeypatch.setattr(runner, "stream_command", fake_stream)
    monkeypatch.setattr(runner, "find_executable", lambda exe: exe)
    runner.execute(task, s, out, name, {}, None, 1)
    (cmd,) = commands
    assert cmd[0] == "macl_pretrain" and "--c" not in cmd
    assert cmd[-5:] == ["--lr", "0.01", "--global-pooling", "avg", "--intensity-aug"]
    ran = resolve_method(config_from_args(build_parser().parse_args(cmd[1:]))).to_dict()
    assert (ran["lr"], ran["global_pooling"], ran["intensity_augmentation"]) == (0.01, "avg", True)
    assert ran["num_workers"] == 3                                          # ran with it, not fingerprinted
    recorded = records.recorded_fingerprint(folder)
    assert recorded == task.extra["fingerprint"]
    assert recorded["config"] == shaping_part(ran) and "num_workers" not in recorded["config"]


def test_report_refuses_runs_made_with_other_settings(fake_out, monkeypatch):
    out, name, s, plan, tasks = fake_out
    records.write_run_log(out, tasks)
    by_key = {t.key: t for t in tasks}
    older = by_key["train:scratch:M2:f1"]                                   # recorded by an older version
    f = records.run_folder(out, older.arm, name, older.index, s) / records.TASK_FILE
    write_json(f, {**json.loads(f.read_text()), "version": "0.1.0"})
    bare = by_key["train:macl:M4:f0"]                                       # no fingerprint at all
    (records.run_folder(out, bare.arm, name, bare.index, s) / records.TASK_FILE).unlink()
    result = rp.write_report(out)
    reasons = {e["key"]: e["reason"] for e in result["excluded"]}
    assert reasons[older.key] == "made with other settings: version"
    assert reasons[bare.key].startswith("made with other settings: none recorded") and len(reasons) == 2
    assert not {(r["arm"], r["budget"], r["fold"]) for r in result["runs"]} & {("scratch", 2, 1), ("macl", 4, 0)}
    assert f"{older.key}: made with other settings: version" in result["caption"]
    # the workdir now pretrains with another learning rate: every MACL run is refused, scratch stays
    marker = json.loads((out / records.MARKER).read_text())
    marker["settings"]["pretrain_extra"] = "--lr 0.01"
    write_json(out / records.MARKER, marker)
    result = rp.write_report(out)
    reasons = {e["key"]: e["reason"] for e in result["excluded"]}
    macl = {t.key for t in tasks if t.kind == "train" and t.method == "macl"}
    lr_changed = {k for k, r in reasons.items() if r == "made with other settings: pretraining.config.lr"}
    assert lr_changed == macl - {bare.key}
    assert {r["arm"] for r in result["runs"]} == {"scratch"}
    assert "`macl_pretrain --method <m> --lr 0.01`" in result["caption"]
    # a newer package: nothing made before it is shown
    monkeypatch.setattr(nnunetv2_macl, "__version__", "9.9.9")
    result = rp.write_report(out)
    assert result["runs"] == [] and len(result["excluded"]) == len(macl) * 2
    assert all(e["reason"].startswith("made with other settings: version") for e in result["excluded"]
               if e["key"] != bare.key)


def test_pretrain_extra_is_checked_before_anything_runs():
    from nnunetv2_macl.run.fewlabel import DEFAULTS, build_parser, settings_from_args

    def settings(*argv: str) -> Settings:
        return settings_from_args(build_parser().parse_args(["-d", "1", *argv]), dict(DEFAULTS))

    extra = "--lr 0.01 --global-pooling avg"
    assert settings("--pretrain-extra", extra).pretrain_extra == extra
    assert settings("--pretrain-extra=--intensity-aug").pretrain_extra == "--intensity-aug"  # one option: with "="
    for extra, message in [("--lrr 0.01", "unrecognized arguments: --lrr"), ("--lr", "expected one argument"),
                           ("--global-pooling mean", "invalid choice: 'mean'"), ("7 --lr 0.01", "stray value"),
                           ("--epochs 3", "sets --epochs.*use --pretrain-epochs"), ("--c", "sets --c.*use --resume"),
                           ("--lambdas 0,0,0", "--lambdas must be"), ("--lr '0.01", "No closing quotation"),
                           ("-h", "help")]:
        with pytest.raises(FewLabelError, match=message):
            settings(f"--pretrain-extra={extra}")
    with pytest.raises(FewLabelError, match="--lrr"):                      # also before a pretrained arm is added
        settings("--methods", "scratch", "--pretrain-extra=--lrr 1")


def test_runner_and_report_do_not_import_each_other():
    """No import cycle among the few-label modules (imports inside functions count; TYPE_CHECKING ones not)."""
    import ast

    import nnunetv2_macl.fewlabel as pkg

    folder = Path(pkg.__file__).parent
    graph: dict[str, set[str]] = {}
    for f in folder.glob("*.py"):
        tree = ast.parse(f.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only and node.module:
                if node.module == "nnunetv2_macl.fewlabel":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("nnunetv2_macl.fewlabel."):
                    deps.add(node.module.rsplit(".", 1)[1])
        graph[f.stem] = deps - {f.stem}
    assert "runner" not in graph["report"]

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m, set())] == []


def test_case_identifiers_with_dots(tmp_path):
    """nnU-Net allows dots in case identifiers: the pretraining view and --resume's check of the validation
    cases keep them whole."""
    src = tmp_path / "pre" / "Dataset977_V"
    (src / "nnUNetPlans_2d").mkdir(parents=True)
    (src / "dataset.json").write_text("{}")
    for c in ("sub.01", "sub.02"):
        for ext in (".b2nd", "_seg.b2nd", ".pkl"):
            (src / "nnUNetPlans_2d" / f"{c}{ext}").write_text(c)
    pre = pretrain_view(src, tmp_path / "views", "nnUNetPlans_2d", ["sub.01"])
    assert sorted(p.name for p in (pre / "nnUNetPlans_2d").iterdir()) == ["sub.01.b2nd", "sub.01.pkl",
                                                                           "sub.01_seg.b2nd"]
    out, name = tmp_path / "out", "Dataset977_V"
    cases = [f"sub.{i:02d}" for i in range(10)]
    s = Settings(methods=("scratch",), budgets=(2,), n_val=3)
    plan = make_splits(cases, s.budgets, 1, "heldout", s.n_val, s.seed)
    (task,) = records.task_list(s, plan)
    folder = records.task_folder(task, out, name, s)
    (folder / "validation").mkdir(parents=True)
    write_json(folder / records.TASK_FILE, records.task_fingerprint(task, s, plan, cases))
    (folder / "validation" / "summary.json").write_text(json.dumps(_summary(plan["splits"][0]["val"], {"1": 0.5})))
    runner.plan_resume([task], out, name, s, plan, cases, resume=True, file_ending=".nii.gz")
    assert task.status == "reused"


# ------------------------------------------------------------------------------------------------ recipes
def test_warmup_scheduler_curve(monkeypatch):
    from nnunetv2_macl.trainers.schedules import WarmupPolyLRScheduler, warmup_settings

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPolyLRScheduler(opt, 1e-3, num_epochs=20, warmup_epochs=4)
    lrs = [sched.lr_at(e) for e in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])           # linear rise
    assert lrs[4] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[10] == pytest.approx(1e-3 * (1 - 6 / 16) ** 0.9)
    sched.step(7)
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[7])               # stateless: resume-safe
    monkeypatch.delenv("MACL_FT_PEAK_LR", raising=False)
    monkeypatch.delenv("MACL_FT_WARMUP_EPOCHS", raising=False)
    assert warmup_settings(80) == (1e-3, 4) and warmup_settings(2) == (1e-3, 1)
    monkeypatch.setenv("MACL_FT_PEAK_LR", "0.01")
    monkeypatch.setenv("MACL_FT_WARMUP_EPOCHS", "10")
    assert warmup_settings(80) == (0.01, 10)
    monkeypatch.setenv("MACL_FT_WARMUP_EPOCHS", "80")
    with pytest.raises(ValueError, match="MACL_FT_WARMUP_EPOCHS"):
        warmup_settings(80)


def test_tiny_warmup_training_log_parses_into_a_learning_curve(tiny_dataset, trainer_env, monkeypatch):
    """A real nnU-Net training (nnUNetTrainerScratch_warmup, 4 epochs x 2 iterations) writes the log the
    curves are read from; its learning rates follow the warm-up recipe."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2_macl.trainers.schedules import WarmupPolyLRScheduler

    monkeypatch.setenv("MACL_FT_WARMUP_EPOCHS", "2")
    monkeypatch.delenv("MACL_FT_PEAK_LR", raising=False)
    trainer = get_trainer_from_args(str(tiny_dataset["id"]), "2d", 0, "nnUNetTrainerScratch_warmup",
                                    tiny_dataset["plans"], False, device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 4, 2, 1
    trainer.run_training()
    curve = learning_curve(trainer.output_folder, iters_per_epoch=2)
    epochs = read_training_logs(trainer.output_folder)
    assert sorted(epochs) == [0, 1, 2, 3] and curve["iterations"] == [2, 4, 6, 8]
    assert all(len(epochs[e]["pseudo_dice"]) == 2 and 0 <= curve["pseudo_dice"][e] <= 1 for e in range(4))
    assert all(np.isfinite(curve["train_loss"]))
    expected = [round(WarmupPolyLRScheduler(trainer.optimizer, 1e-3, 4, 2).lr_at(e), 5) for e in range(4)]
    assert curve["lr"] == pytest.approx(expected) and curve["lr"][0] < curve["lr"][1]
    log = "".join(p.read_text() for p in Path(trainer.output_folder).glob("training_log_*.txt"))
    assert "fine-tuning recipe: warmup" in log
    assert curve["final_dice"] is None                                      # no full validation yet
    assert parse_training_log("no epochs here") == {}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.e2e
def test_macl_fewlabel_on_a_tiny_dataset_then_resume(tiny_dataset, nnunet_env):
    """``macl_fewlabel -d 990`` (8 synthetic cases): 3 validation cases, M = 2, 1 fold, scratch and MACL
    with the warm-up recipe; the user's preprocessed folder stays as it was; --resume reuses everything."""
    pre = tiny_dataset["preprocessed"]
    before = {p: p.stat().st_mtime_ns for p in pre.rglob("*") if p.is_file()}
    env = dict(os.environ)
    env.pop("MACL_PRETRAINED", None)
    args = [sys.executable, "-m", "nnunetv2_macl.run.fewlabel", "-d", str(tiny_dataset["id"]), "--val-cases", "3",
            "--budgets", "2", "--folds", "1", "--methods", "scratch,macl:warmup", "--epochs", "2", "--iters", "2",
            "--val-iters", "1", "--pretrain-epochs", "1", "--pretrain-batch-size", "8", "--pretrain-workers", "0",
            "--device", "cpu", "--procs", "1"]
    p = subprocess.run(args, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = nnunet_env["results"] / tiny_dataset["name"] / "macl_fewlabel"
    result = json.loads((out / "report" / "fewlabel_result.json").read_text())
    assert sorted((r["arm"], r["budget"], r["n_val"], r["n_train"]) for r in result["runs"]) == [
        ("macl_warmup", 2, 3, 2), ("scratch", 2, 3, 2)]
    plan = read_splits(out / "views" / "finetune" / tiny_dataset["name"])
    val = set(plan["index"][0]["val"])
    pre_view = out / "views" / "pretrain" / tiny_dataset["name"] / "nnUNetPlans_2d"
    assert not {f.name.split(".")[0] for f in pre_view.iterdir()} & val      # pretraining excluded them
    assert "MACL (warmup, paper transfer)" in result["table_markdown"] and "3 validation cases" in result["caption"]
    assert "fine-tuning recipe: warmup" in (out / "logs" / "train_macl_warmup_M2_f0.log").read_text()
    assert Path(result["paths"]["curves"][0]).read_bytes()[:8] == PNG_MAGIC
    assert {p: p.stat().st_mtime_ns for p in pre.rglob("*") if p.is_file()} == before   # user's data untouched
    p = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    again = json.loads((out / "report" / "fewlabel_result.json").read_text())
    assert {r["status"] for r in again["run_log"]} == {"reused"}
    assert [r["dice_mean"] for r in again["runs"]] == [r["dice_mean"] for r in result["runs"]]


@pytest.fixture(scope="module")
def one_class_dataset(nnunet_env):
    """10 synthetic cases of 16x32x32 with ONE foreground class (the generator's two merged), planned and
    preprocessed for 2d."""
    import SimpleITK as sitk

    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset, plan_and_preprocess

    folder = Path(make_synthetic_dataset(str(nnunet_env["raw"]), dataset_id=993, name="OneClass", num_cases=10,
                                         shape=(16, 32, 32), seed=1))
    for f in (folder / "labelsTr").glob("*.nii.gz"):
        img = sitk.ReadImage(str(f))
        merged = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 0).astype(np.uint8))
        merged.CopyInformation(img)
        sitk.WriteImage(merged, str(f), True)
    dj = json.loads((folder / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "structure": 1}
    (folder / "dataset.json").write_text(json.dumps(dj, indent=1))
    plan_and_preprocess(993, configurations=("2d",), num_processes=1)
    return {"id": 993, "name": folder.name}


@pytest.mark.e2e
def test_macl_fewlabel_one_class_one_and_two_labelled_cases_with_pretrain_extra(one_class_dataset, nnunet_env):
    """``macl_fewlabel`` on a one-class dataset: 4 held-out cases, M in {1, 2}, scratch and MACL (stock, encoder only)
    pretrained with ``--pretrain-extra "--lr 0.01"``; macl_pretrain ran with the configuration the fingerprint
    holds, and --resume reuses everything."""
    from nnunetv2_macl.fewlabel.pretraining import shaping_part

    env = dict(os.environ)
    env.pop("MACL_PRETRAINED", None)
    args = [sys.executable, "-m", "nnunetv2_macl.run.fewlabel", "-d", str(one_class_dataset["id"]), "--val-cases", "4",
            "--budgets", "1,2", "--folds", "1", "--methods", "scratch,macl@encoder,macl@encoder~1", "--epochs", "2",
            "--iters", "2", "--val-iters", "1", "--pretrain-epochs", "2", "--pretrain-batch-size", "8",
            "--pretrain-workers", "0", "--pretrain-extra", "--lr 0.01 --keep-epochs 1", "--device", "cpu",
            "--procs", "1"]
    p = subprocess.run(args, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = nnunet_env["results"] / one_class_dataset["name"] / "macl_fewlabel"
    result = json.loads((out / "report" / "fewlabel_result.json").read_text())
    assert sorted((r["arm"], r["budget"], r["n_train"], r["n_val"]) for r in result["runs"]) == [
        ("macl_encoder", 1, 1, 4), ("macl_encoder", 2, 2, 4), ("macl_encoder_e1", 1, 1, 4),
        ("macl_encoder_e1", 2, 2, 4), ("scratch", 1, 1, 4), ("scratch", 2, 2, 4)]
    logs = out / "logs"                  # each start from its own checkpoint of the one pretraining
    assert "checkpoint_epoch_1.pth" in (logs / "train_macl_encoder_e1_M1_f0.log").read_text()
    assert "checkpoint_final.pth" in (logs / "train_macl_encoder_M1_f0.log").read_text()
    assert "checkpoint_epoch_1.pth" not in (logs / "train_macl_encoder_M1_f0.log").read_text()
    assert len(result["paths"]["pretraining_length"]) == 2
    assert "| MACL (stock, encoder only) | 1 | 1 |" in (out / "report" / "fewlabel_table.md").read_text()
    assert all(set(k[5:] for k in r if k.startswith("dice_")) == {"mean", "structure"} for r in result["runs"])
    assert "structure (%)" not in result["table_markdown"] and "one foreground class, structure" in result["caption"]
    assert "`macl_pretrain --method <m> --lr 0.01 --keep-epochs 1`" in result["caption"]
    pre = out / "results" / "macl" / one_class_dataset["name"] / "MACLPretrainer__nnUNetPlans__2d"
    ran = json.loads((pre / "macl_config.json").read_text())                # written by macl_pretrain itself
    assert ran["lr"] == 0.01
    assert records.recorded_fingerprint(pre)["config"] == shaping_part(ran)
    p = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, encoding="utf-8",
                       errors="replace", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    again = json.loads((out / "report" / "fewlabel_result.json").read_text())
    assert {r["status"] for r in again["run_log"]} == {"reused"} and len(again["runs"]) == 6


def test_warmup_settings_reset_only_warmup_runs():
    """Trying another warm-up peak or length must not throw away the stock runs of a workdir."""
    cases = [f"case_{i:03d}" for i in range(40)]
    plain = Settings(methods=("scratch", "macl@encoder", "macl:warmup@encoder"), budgets=(4,), folds=1)
    tuned = dataclasses.replace(plain, warmup_peak_lr=0.01, warmup_epochs=3)
    plan = make_splits(cases, plain.budgets, 1, "heldout", 5)
    before = {t.key: records.task_fingerprint(t, plain, plan, cases) for t in records.task_list(plain, plan)}
    after = {t.key: records.task_fingerprint(t, tuned, plan, cases) for t in records.task_list(tuned, plan)}
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["train:macl_warmup_encoder:M4:f0"]
    assert (after[changed[0]]["warmup_peak_lr"], after[changed[0]]["warmup_epochs"]) == (0.01, 3)


def test_resume_moves_runs_when_split_indices_change(tmp_path):
    """Adding a budget shifts the split indices: recorded runs follow their cases to the new fold_X."""
    s_old = Settings(methods=("scratch",), budgets=(4, 20), folds=1)
    s_new = Settings(methods=("scratch",), budgets=(4, 10, 20), folds=1)
    cases = [f"case_{i:03d}" for i in range(40)]
    out, name = tmp_path / "out", "Dataset981_Fake"
    plan_old = make_splits(cases, s_old.budgets, 1, "heldout", 5)
    for t in records.task_list(s_old, plan_old):
        folder = records.task_folder(t, out, name, s_old)
        folder.mkdir(parents=True)
        write_json(folder / records.TASK_FILE, records.task_fingerprint(t, s_old, plan_old, cases))
        (folder / "marker.txt").write_text(f"M={t.budget}")
    plan_new = make_splits(cases, s_new.budgets, 1, "heldout", 5)
    tasks = records.task_list(s_new, plan_new)
    moves = runner.relocate_runs(tasks, out, name, s_new, plan_new, cases)
    assert moves == ["fold_1 -> fold_2"]                                   # M=20 moved from index 1 to 2
    by_budget = {t.budget: records.task_folder(t, out, name, s_new) for t in tasks}
    assert (by_budget[20] / "marker.txt").read_text() == "M=20" and (by_budget[4] / "marker.txt").read_text() == "M=4"
    assert not by_budget[10].exists()                                      # the new budget runs fresh
    runner.plan_resume(tasks, out, name, s_new, plan_new, cases, resume=True)
    assert [t.status for t in tasks] == ["pending"] * 3                    # nothing finished here: none reused


@pytest.mark.e2e
def test_a_fine_tuning_cut_mid_way_continues_from_its_checkpoint(tiny_dataset, nnunet_env, tmp_path):
    """``macl_fewlabel`` killed (process group, SIGKILL, as a session end does) while a fine-tuning is in its
    third epoch: the report built then marks the run unfinished (no table row, no final Dice, status cut);
    ``--resume`` continues it with ``--c`` from nnU-Net's checkpoint, not from epoch 0, and the report
    then holds it as a finished run."""
    import re
    import signal

    env = dict(os.environ)
    env.pop("MACL_PRETRAINED", None)
    out = tmp_path / "fl"
    args = [sys.executable, "-m", "nnunetv2_macl.run.fewlabel", "-d", str(tiny_dataset["id"]), "-o", str(out),
            "--val-cases", "3", "--budgets", "2", "--folds", "1", "--methods", "scratch", "--epochs", "8",
            "--iters", "2", "--val-iters", "1", "--save-every", "1", "--device", "cpu", "--procs", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    started, logs = time.time(), []
    try:
        # nnU-Net prints "Epoch 2" after it has written checkpoint_latest.pth of epoch 1 (save every epoch)
        while time.time() - started < 600 and proc.poll() is None:
            logs = sorted(out.rglob("training_log_*.txt"))
            if logs and re.search(r": Epoch 2\s*$", logs[-1].read_text(errors="replace"), flags=re.MULTILINE):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be cut"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert logs, "no nnU-Net training log appeared"
    fold = logs[-1].parent
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / "checkpoint_final.pth").exists()

    report = [sys.executable, "-m", "nnunetv2_macl.run.fewlabel", "-d", str(tiny_dataset["id"]), "-o", str(out),
              "--report-only"]
    p = subprocess.run(report, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    cut = json.loads((out / "report" / "fewlabel_result.json").read_text())
    assert cut["runs"] == []  # nothing finished: no row in the table
    assert [r["status"] for r in cut["run_log"] if r["key"].startswith("train")] == ["cut"]
    curve = json.loads((out / "report" / "fewlabel_curves.json").read_text())["2"]
    (run,) = [r for runs in curve.values() for r in runs]
    assert run["finished"] is False and run["final_dice"] is None and run["iterations"]

    p = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, encoding="utf-8",
                       errors="replace", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    resumed = [f for f in sorted(fold.glob("training_log_*.txt")) if f not in logs]
    assert resumed, "the resumed run wrote no training log of its own"
    text = resumed[-1].read_text(errors="replace")
    epochs = [int(e) for e in re.findall(r": Epoch (\d+)\s*$", text, flags=re.MULTILINE)]
    assert epochs and 2 <= epochs[0] < 8 and epochs[-1] == 7, epochs  # continued, not from epoch 0
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    done = json.loads((out / "report" / "fewlabel_result.json").read_text())
    assert [(r["arm"], r["budget"]) for r in done["runs"]] == [("scratch", 2)]
    curve = json.loads((out / "report" / "fewlabel_curves.json").read_text())["2"]
    assert [r["finished"] for runs in curve.values() for r in runs] == [True]
