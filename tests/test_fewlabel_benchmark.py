"""The few-label benchmark runner (``pretrain/fewlabel_benchmark.py``).

Fast: the nested splits and their fold-index map; tables, CSVs and plots from fake nnU-Net
``summary.json`` files and predictions; the conversion of a Decathlon folder without SimpleITK (the
GPU kit's case); the benchmark trainers' schedule variables. Slow (~3-5 min on 2 busy cores): one
``cpu-smoke`` run of the CLI end to end (synthetic data, pretraining, 4 stock ``nnUNetv2_train`` runs).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain" / "fewlabel_benchmark.py"


def _load():
    name = "fewlabel_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


fb = _load()

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ splits
def test_splits_nested_disjoint_sizes_and_index_map(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ids = [f"case_{i:03d}" for i in range(37)]
    budgets, n_folds = (2, 4, 10, 20), 3
    plan = fb.make_fewlabel_splits(list(reversed(ids)), budgets, n_folds, n_splits=5, seed=12345)
    splits, index = plan["splits"], plan["index"]
    assert len(splits) == len(index) == len(budgets) * n_folds
    reference = generate_crossval_split(sorted(ids), seed=12345, n_splits=5)  # nnU-Net's default 5 folds
    for rec in index:
        i, m, f = rec["index"], rec["budget"], rec["fold"]
        assert i == budgets.index(m) * n_folds + f == fb.split_index(budgets.index(m), f, n_folds)
        assert splits[i] == {"train": rec["train"], "val": rec["val"]}
        assert len(rec["train"]) == m == len(set(rec["train"]))
        assert not set(rec["train"]) & set(rec["val"])                       # disjoint from validation
        assert sorted(rec["val"]) == sorted(reference[f]["val"])              # = nnU-Net's fold f held-out part
        assert set(rec["train"]) <= set(reference[f]["train"])
    for f in range(n_folds):
        recs = sorted((r for r in index if r["fold"] == f), key=lambda r: r["budget"])
        assert len({tuple(r["val"]) for r in recs}) == 1                      # same validation for every M
        for small, big in zip(recs, recs[1:]):
            assert big["train"][:small["budget"]] == small["train"]           # nested (a prefix)
    vals = [set(next(r["val"] for r in index if r["fold"] == f)) for f in range(n_folds)]
    assert all(not (a & b) for k, a in enumerate(vals) for b in vals[k + 1:])  # folds' validation disjoint
    # deterministic, and independent of the input order
    assert fb.make_fewlabel_splits(ids, budgets, n_folds, 5, 12345) == plan
    assert fb.make_fewlabel_splits(ids, budgets, n_folds, 5, 7)["index"][0]["train"] != index[0]["train"]

    capped = fb.make_fewlabel_splits(ids, budgets, n_folds, 5, 12345, max_val_cases=3)
    for rec, full in zip(capped["index"], index):
        assert len(rec["val"]) == 3 and set(rec["val"]) <= set(full["val"]) and rec["train"] == full["train"]

    splits_file, index_file = fb.write_fewlabel_splits(tmp_path / "pre", plan)
    assert json.loads(splits_file.read_text()) == splits                     # what nnU-Net's do_split reads
    saved = json.loads(index_file.read_text())
    assert saved["index"] == index and saved["meta"]["budgets"] == list(budgets)


def test_splits_refuse_bad_budgets():
    ids = [f"c{i}" for i in range(10)]
    with pytest.raises(fb.BenchmarkError, match="exceeds"):
        fb.make_fewlabel_splits(ids, (4, 9), 1, n_splits=5)  # 8 training cases per fold
    with pytest.raises(fb.BenchmarkError, match="increasing"):
        fb.make_fewlabel_splits(ids, (4, 2), 1)
    with pytest.raises(fb.BenchmarkError, match="n_folds"):
        fb.make_fewlabel_splits(ids, (2,), 6, n_splits=5)


def test_settings_validation():
    s = fb.settings_for("cpu-smoke")
    assert s.methods == ("scratch", "macl") and s.budgets == (2, 4) and s.device == "cpu"
    with pytest.raises(fb.BenchmarkError, match="--raw"):
        fb.settings_for("gpu")
    with pytest.raises(fb.BenchmarkError, match="methods"):
        fb.settings_for("cpu-smoke", methods=("scratch", "byol"))
    with pytest.raises(fb.BenchmarkError, match="folds"):
        fb.settings_for("cpu-smoke", folds=6)
    g = fb.settings_for("gpu", raw="/data/Task04_Hippocampus")
    assert g.budgets == (4, 10, 20) and set(g.methods) == set(fb.METHODS) and g.device == "cuda"


def test_resume_keeps_what_the_settings_allow():
    base = fb.settings_for("cpu-smoke")
    assert fb.reusable(base, fb.settings_for("cpu-smoke", jobs=1, deadline_min=3.0)) == "all"
    assert fb.reusable(base, fb.settings_for("cpu-smoke", finetune_epochs=9)) == "pretraining"
    assert fb.reusable(base, fb.settings_for("cpu-smoke", budgets=(2, 3))) == "pretraining"
    assert fb.reusable(base, fb.settings_for("cpu-smoke", pretrain_epochs=3)) == "dataset"
    assert fb.reusable(base, fb.settings_for("cpu-smoke", num_cases=12)) == "nothing"


# ------------------------------------------------------------------------------------------------ scheduling
def _tasks(methods=("scratch", "macl"), budgets=(2, 4), folds=1):
    return fb._task_list(fb.Settings(methods=methods, budgets=budgets, folds=folds))


def test_task_order_and_dependencies():
    tasks = _tasks(("scratch", "macl", "pcl"), (4, 10), 2)
    assert [t.key for t in tasks[:2]] == ["pretrain:macl", "pretrain:pcl"]
    trains = [(t.fold, t.budget, t.method, t.index) for t in tasks[2:]]
    assert trains[:3] == [(0, 4, "scratch", 0), (0, 4, "macl", 0), (0, 4, "pcl", 0)]  # fold by fold, M by M
    assert trains[3][:2] == (0, 10) and trains[3][3] == 2 and trains[-1] == (1, 10, "pcl", 3)
    assert all(t.deps == (f"pretrain:{t.method}",) for t in tasks[2:] if t.method != "scratch")
    assert all(t.deps == () for t in tasks if t.method == "scratch")


def test_run_tasks_failure_skips_dependants_and_runs_in_parallel():
    tasks = _tasks()
    active, peak = [0], [0]
    import threading

    lock = threading.Lock()

    def execute(t, timeout):
        assert timeout is None
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        if t.kind == "pretrain":
            raise fb.DemoError("macl_pretrain failed with exit status 2")

    changes = []
    fb.run_tasks(tasks, 2, execute, on_change=lambda: changes.append(1))
    status = {t.key: t.status for t in tasks}
    assert status == {"pretrain:macl": "failed", "train:scratch:M2:f0": "done", "train:macl:M2:f0": "skipped",
                      "train:scratch:M4:f0": "done", "train:macl:M4:f0": "skipped"}
    assert "exit status 2" in tasks[0].message and "pretrain:macl failed" in tasks[2].message
    assert peak[0] == 2 and changes  # the pretraining and a scratch run side by side


def test_run_tasks_deadlines_cut_and_record():
    # nothing starts after the deadline
    tasks = _tasks(("scratch",), (2, 4, 8))
    t0 = time.perf_counter()
    fb.run_tasks(tasks, 1, lambda t, timeout: time.sleep(0.3), deadline=t0 + 0.1)
    assert [t.status for t in tasks] == ["done", "cut", "cut"]
    assert "deadline" in tasks[1].message

    # a run that would not end before the hard deadline (median of finished runs) is not started
    tasks = _tasks(("scratch",), (2, 4, 8))
    timeouts = []

    def execute(t, timeout):
        timeouts.append(timeout)
        time.sleep(1.2)

    fb.run_tasks(tasks, 1, execute, hard_deadline=time.perf_counter() + 3.0)  # 3.0 s, 1.8 s, 0.6 s left
    assert [t.status for t in tasks] == ["done", "done", "cut"], [t.message for t in tasks]
    assert timeouts[0] == pytest.approx(3.0, abs=0.3) and timeouts[1] < timeouts[0] - 1.0
    assert "hard deadline" in tasks[2].message

    # a run stopped at the hard deadline (the streamed subprocess's timeout) is cut, not failed
    tasks = _tasks(("scratch",), (2,))

    def stopped(t, timeout):
        time.sleep(timeout)
        raise fb.DemoError(f"`nnUNetv2_train ...` ran longer than {timeout:.0f} s and was stopped")

    fb.run_tasks(tasks, 1, stopped, hard_deadline=time.perf_counter() + 1.0)
    assert tasks[0].status == "cut" and tasks[0].message == "stopped at the hard deadline"


def test_report_only_marks_unfinished_runs_as_cut(fake_run):
    workdir, ds, s, plan = fake_run
    (workdir / fb.MARKER).write_text(json.dumps({"settings": s.to_dict(), "prepared": True}))
    tasks = fb._task_list(s)
    for t in tasks:
        t.status = "done" if t.kind == "train" else t.status
    tasks[-1].status = "running"
    fb._write_run_log(workdir, tasks)
    result = fb.report_only(workdir)
    log = {r["key"]: r for r in result["run_log"]}
    assert log[tasks[-1].key]["status"] == "cut" and "runner stopped" in log[tasks[-1].key]["message"]
    assert (workdir / "report" / "fewlabel_table.md").is_file() and len(result["runs"]) == 8


# ------------------------------------------------------------------------------------------------ report
def _nifti(arr: np.ndarray, path: Path) -> None:
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    # arrays are given in nnU-Net's (z, y, x) order; nibabel stores (x, y, z)
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), np.eye(4)), str(path))


def _summary(cases: list[str], dice: dict[str, float], per_case_offset: float = 0.0) -> dict:
    per_case = [{"reference_file": f"/raw/labelsTr/{c}.nii.gz", "prediction_file": f"/x/{c}.nii.gz",
                 "metrics": {k: {"Dice": v + per_case_offset * (j - 1)} for k, v in dice.items()}}
                for j, c in enumerate(cases)]
    return {"foreground_mean": {"Dice": float(np.mean(list(dice.values())))},
            "mean": {k: {"Dice": v} for k, v in dice.items()}, "metric_per_case": per_case}


@pytest.fixture
def fake_run(tmp_path):
    """A workdir as the runner leaves it: raw images/labels, splits, summary.json + predictions."""
    workdir = tmp_path / "bench"
    name = "Dataset981_Fake"
    raw = workdir / "nnUNet_raw" / name
    pre = workdir / "nnUNet_preprocessed" / name
    ids = [f"case_{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    for i, c in enumerate(ids):
        img = rng.normal(size=(5, 12, 10)).astype(np.float32)
        lab = np.zeros((5, 12, 10), np.uint8)
        lab[1 + i % 3, 2:6, 2:5] = 1
        lab[1 + i % 3, 7:10, 5:9] = 2
        _nifti(img, raw / "imagesTr" / f"{c}_0000.nii.gz")
        _nifti(lab, raw / "labelsTr" / f"{c}.nii.gz")
    dataset_json = {"labels": {"background": 0, "anterior": 1, "posterior": 2}, "file_ending": ".nii.gz",
                    "channel_names": {"0": "MRI"}, "numTraining": len(ids)}
    plans = {"transpose_forward": [0, 1, 2], "configurations": {"2d": {"batch_size": 12, "data_identifier": "x"}}}
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    s = fb.Settings(dataset="synthetic", dataset_id=981, budgets=(2, 4), n_splits=4, folds=2,
                    methods=("scratch", "macl"), overlay_cases=2)
    plan = fb.make_fewlabel_splits(ids, s.budgets, s.folds, s.n_splits, s.seed)
    fb.write_fewlabel_splits(pre, plan)
    ds = {"name": name, "raw": raw, "preprocessed": pre, "plans": plans, "dataset_json": dataset_json}
    # Dice: scratch 0.60/0.70 (M=2) and 0.70/0.80 (M=4) per class; MACL +0.04 on fold 0, +0.02 on fold 1
    for rec in plan["index"]:
        for m in s.methods:
            base = 0.6 if rec["budget"] == 2 else 0.7
            gain = 0.0 if m == "scratch" else (0.04 if rec["fold"] == 0 else 0.02)
            folder = fb.run_folder(workdir, m, name, rec["index"]) / "validation"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(
                _summary(rec["val"], {"1": base + gain, "2": base + 0.1 + gain}, per_case_offset=0.01)))
            for c in rec["val"]:
                lab = np.zeros((5, 12, 10), np.uint8)
                lab[1:4, 2:6, 2:4] = 1
                _nifti(lab, folder / f"{c}.nii.gz")
    return workdir, ds, s, plan


def test_report_from_fake_summaries(fake_run):
    workdir, ds, s, plan = fake_run
    run_log = [{"key": "train:macl:M4:f1", "kind": "train", "method": "macl", "budget": 4, "fold": 1, "index": 3,
                "status": "done", "seconds": 12.5, "message": ""}]
    result = fb.write_report(workdir, ds, s, plan, run_log=run_log)
    report = workdir / "report"

    with open(report / "fewlabel_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8
    assert set(runs[0]) >= {"method", "budget", "fold", "index", "dice_mean", "dice_anterior", "dice_posterior"}
    r = next(r for r in runs if r["method"] == "macl" and r["budget"] == "4" and r["fold"] == "1")
    assert float(r["dice_anterior"]) == pytest.approx(0.72) and float(r["dice_mean"]) == pytest.approx(0.77)
    assert r["index"] == "3" and float(r["train_seconds"]) == 12.5

    with open(report / "fewlabel_summary.csv") as f:
        summary = {(int(r["budget"]), r["method"]): r for r in csv.DictReader(f)}
    m2 = summary[(2, "macl")]
    assert int(m2["n_folds"]) == 2
    assert float(m2["dice_mean_mean"]) == pytest.approx(0.68)              # (0.69 + 0.67) / 2
    assert float(m2["dice_mean_sd"]) == pytest.approx(np.std([0.69, 0.67], ddof=1))
    assert float(m2["dice_anterior_mean"]) == pytest.approx(0.63)
    assert float(m2["delta_vs_scratch_mean"]) == pytest.approx(0.03)
    assert float(summary[(4, "scratch")]["dice_posterior_mean"]) == pytest.approx(0.8)

    md = (report / "fewlabel_table.md").read_text()
    assert "| M | method | folds | Dice mean (%) | anterior (%) | posterior (%) | Δ mean vs scratch (pp) |" in md
    assert "| 2 | MACL | 2 | 68.00 ± 1.41 | 63.00 ± 1.41 | 73.00 ± 1.41 | +3.00 ± 1.41 |" in md
    assert "| 4 | scratch | 2 | 75.00 ± 0.00 | 70.00 ± 0.00 | 80.00 ± 0.00 | (reference) |" in md
    assert "no labels" in md and "validation cases included" in md

    for png in [report / "fewlabel_dice_vs_M.png", report / "fewlabel_overlay_M2.png",
                report / "fewlabel_overlay_M4.png"]:
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, png
    assert sorted(result["paths"]["overlays"]) == sorted(str(report / f"fewlabel_overlay_M{m}.png") for m in (2, 4))
    saved = json.loads((report / "fewlabel_result.json").read_text())
    assert saved["table_markdown"] in md and len(saved["runs"]) == 8


def test_report_compares_only_complete_folds(fake_run):
    """A run missing (cut by the deadline) removes its fold from that budget's comparison for all methods."""
    workdir, ds, s, plan = fake_run
    missing = next(r for r in plan["index"] if r["budget"] == 4 and r["fold"] == 1)
    (fb.run_folder(workdir, "macl", ds["name"], missing["index"]) / "validation" / "summary.json").unlink()
    run_log = [{"key": "train:macl:M4:f1", "kind": "train", "method": "macl", "budget": 4, "fold": 1,
                "index": missing["index"], "status": "cut", "seconds": None, "message": "not started: deadline"}]
    result = fb.write_report(workdir, ds, s, plan, run_log=run_log)
    agg = {(r["budget"], r["method"]): r for r in result["summary"]}
    assert agg[(4, "scratch")]["n_folds"] == agg[(4, "macl")]["n_folds"] == 1
    assert agg[(4, "scratch")]["excluded_folds"] == [1]
    assert agg[(2, "macl")]["n_folds"] == 2
    assert agg[(4, "macl")]["dice_mean_sd"] is None                         # one fold: no spread
    md = (workdir / "report" / "fewlabel_table.md").read_text()
    assert "| 4 | MACL | 1 | 79.00 | 74.00 | 84.00 | +4.00 |" in md
    assert "train:macl:M4:f1 cut" in md and "scratch M=4 fold 1" in md


# ------------------------------------------------------------------------------------------------ data, trainers
def test_convert_msd_without_simpleitk(tmp_path, monkeypatch):
    """The GPU kit has no SimpleITK: the fallback does what nnU-Net's MSD converter does for 3-D images."""
    src = tmp_path / "Task04_Tiny"
    for i in range(3):
        _nifti(np.full((4, 5, 6), i, np.float32), src / "imagesTr" / f"tiny_{i:03d}.nii.gz")
        _nifti(np.zeros((4, 5, 6), np.uint8), src / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    (src / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior"},
        "numTraining": 3, "training": [{"image": "./imagesTr/tiny_000.nii.gz"}]}))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    name = fb.convert_msd(src, 7, tmp_path / "staging", num_processes=1, use_simpleitk=False)
    assert name == "Dataset007_Tiny"
    out = tmp_path / "raw" / name
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"tiny_{i:03d}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"tiny_{i:03d}.nii.gz" for i in range(3)]
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "Anterior": 1} and dj["channel_names"] == {"0": "MRI"}
    assert dj["file_ending"] == ".nii.gz" and dj["overwrite_image_reader_writer"] == "NibabelIO"
    assert "training" not in dj and "modality" not in dj
    assert (src / "dataset.json").read_text().count("modality") == 1  # the source is never written


def test_benchmark_trainer_schedule_from_env(monkeypatch):
    from nnunetv2_macl.trainers import benchmark_trainers as bt

    for var in (bt.BENCH_EPOCHS_ENV, bt.BENCH_ITERS_ENV, bt.BENCH_VAL_ITERS_ENV, bt.BENCH_SEED_ENV, bt.BENCH_BATCH_ENV):
        monkeypatch.delenv(var, raising=False)
    assert bt.bench_schedule() == (50, 50, 10) and bt.bench_seed() == 12345 and bt.bench_batch_size() is None
    monkeypatch.setenv(bt.BENCH_EPOCHS_ENV, "3")
    monkeypatch.setenv(bt.BENCH_ITERS_ENV, "7")
    monkeypatch.setenv(bt.BENCH_BATCH_ENV, "32")
    assert bt.bench_schedule() == (3, 7, 10) and bt.bench_batch_size() == 32
    monkeypatch.setenv(bt.BENCH_ITERS_ENV, "0")
    with pytest.raises(ValueError, match="MACL_BENCH_ITERS"):
        bt.bench_schedule()
    # both public names are nnU-Net trainers with the same schedule code
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_macl.trainers.nnUNetTrainerMACL import nnUNetTrainerMACL

    assert issubclass(bt.nnUNetTrainerMACL_bench, nnUNetTrainerMACL)
    assert issubclass(bt.nnUNetTrainerScratch_bench, nnUNetTrainer)
    assert not issubclass(bt.nnUNetTrainerScratch_bench, nnUNetTrainerMACL)


# ------------------------------------------------------------------------------------------------ end to end
def test_cpu_smoke_cli_end_to_end(tmp_path):
    """``fewlabel_benchmark.py --profile cpu-smoke``: 10 synthetic cases of 16x32x32, M in {2, 4}, 1 fold,
    scratch + MACL (1 pretraining epoch, 2 x 4 fine-tuning iterations), through the real CLIs."""
    workdir = tmp_path / "smoke"
    env = dict(os.environ)
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("nnUNet_n_proc_DA", "2")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "MACL_PRETRAINED"):
        env.pop(var, None)  # the runner sets its own; nothing from the session may leak in
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(SCRIPT), "--profile", "cpu-smoke", "--workdir", str(workdir)],
                       env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=1200)
    secs = time.perf_counter() - t0
    print(f"cpu-smoke end to end: {secs:.0f} s")
    report = workdir / "report"
    if p.returncode != 0:  # say which run failed and why before the output's tail
        log = workdir / fb.RUN_LOG
        bad = [r for r in json.loads(log.read_text()) if r["status"] != "done"] if log.is_file() else "no run log"
        pytest.fail(f"exit status {p.returncode}; runs not done: {bad}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    for f in ("fewlabel_runs.csv", "fewlabel_summary.csv", "fewlabel_table.md", "fewlabel_dice_vs_M.png",
              "fewlabel_overlay_M2.png", "fewlabel_overlay_M4.png", "fewlabel_result.json"):
        assert (report / f).is_file(), f
    for f in ("fewlabel_dice_vs_M.png", "fewlabel_overlay_M2.png", "fewlabel_overlay_M4.png"):
        assert (report / f).read_bytes()[:8] == PNG_MAGIC
    result = json.loads((report / "fewlabel_result.json").read_text())
    assert [r["status"] for r in result["run_log"]] == ["done"] * 5, result["run_log"]
    runs = result["runs"]
    assert sorted((r["method"], r["budget"]) for r in runs) == [("macl", 2), ("macl", 4), ("scratch", 2),
                                                                 ("scratch", 4)]
    for r in runs:
        assert 0.0 <= r["dice_mean"] <= 1.0 and {"dice_organ_a", "dice_organ_b"} <= set(r)
        assert r["n_train"] == r["budget"] and r["n_val"] == 2
    # every training used its split: fold index = m_index * n_folds + fold, validation as written
    pre = Path(result["paths"]["splits_final"]).parent
    index = json.loads((pre / "splits_index.json").read_text())["index"]
    assert [(r["index"], r["budget"], r["fold"]) for r in index] == [(0, 2, 0), (1, 4, 0)]
    for r in runs:
        summary = json.loads(Path(r["summary_file"]).read_text())
        val = sorted(Path(c["reference_file"]).name[:-7] for c in summary["metric_per_case"])
        assert val == index[r["index"]]["val"]
        assert f"fold_{r['index']}" in r["summary_file"] and f"/results/{r['method']}/" in r["summary_file"]
    # the MACL runs loaded the pretrained weights, the scratch runs did not
    logs = workdir / "logs"
    macl_log = (logs / "train_macl_M2_f0.log").read_text()
    assert "pretrain" in (logs / "pretrain_macl.log").read_text().lower()
    assert "MACLPretrainer__nnUNetPlans__2d/checkpoint_final.pth" in macl_log
    assert "few-label benchmark schedule: 2 epochs x 4 training" in macl_log
    assert "MACLPretrainer" not in (logs / "train_scratch_M2_f0.log").read_text()
    md = (report / "fewlabel_table.md").read_text()
    assert md.count("| 2 |") == 2 and md.count("| 4 |") == 2 and "MACL" in md and "scratch" in md
