"""``pretrain/fewlabel_benchmark.py``: the thin caller of :mod:`nnunetv2_macl.fewlabel` for Hippocampus.

Fast: the profiles (``cpu-real`` keeps the earlier rows' splits and schedule, ``cpu-converge`` is the
protocol), the Decathlon conversion without SimpleITK, the benchmark trainers' variables. ``e2e``: one
``cpu-smoke`` run through the real CLIs (~3 min on 2 busy cores).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_macl.errors import FewLabelError
from nnunetv2_macl.fewlabel.msd import convert_msd
from nnunetv2_macl.fewlabel.settings import Settings
from nnunetv2_macl.run.fewlabel import build_parser, settings_from_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain" / "fewlabel_benchmark.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load():
    spec = importlib.util.spec_from_file_location("fewlabel_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fb = _load()


def _profile_settings(name: str, *argv: str) -> Settings:
    args = build_parser().parse_args(["-d", "1", *argv])
    base = {k: v for k, v in fb.PROFILES[name].items() if k not in ("data", "num_cases", "shape")}
    return settings_from_args(args, base)


def test_profiles():
    real = _profile_settings("cpu-real")
    assert (real.split, real.n_splits, real.n_val, real.folds, real.pretrain_on_all) == ("kfold", 5, 10, 1, True)
    assert (real.finetune_epochs, real.iters, real.finetune_batch_size) == (25, 10, 32)
    assert (real.pretrain_epochs, real.pretrain_batch_size, real.budgets) == (1, 16, (4, 10, 20))
    conv = _profile_settings("cpu-converge")
    assert (conv.split, conv.n_val, conv.pretrain_on_all, conv.budgets) == ("heldout", 40, False, (4, 20))
    assert conv.finetune_epochs * conv.iters == 2000 and conv.finetune_batch_size == 32 and conv.folds >= 2
    assert set(conv.methods) == {"scratch", "macl", "macl@encoder", "pcl", "simclr"}
    # options win over the profile; old option names still work
    s = _profile_settings("cpu-converge", "--methods", "scratch,scratch:warmup", "--finetune-epochs", "120",
                          "--recipe", "warmup", "--pretrain-on-all")
    assert s.methods == ("scratch", "scratch:warmup") and s.finetune_epochs == 120 and s.pretrain_on_all
    assert [a.trainer for a in s.arms()] == ["nnUNetTrainerScratch_bench", "nnUNetTrainerScratch_warmup_bench"]
    # --pretrain-extra reaches the benchmark too, and a typo fails before any data is staged
    assert _profile_settings("cpu-smoke", "--pretrain-extra", "--lr 0.01 --tau 0.2").pretrain_extra == \
        "--lr 0.01 --tau 0.2"
    with pytest.raises(FewLabelError, match="unrecognized arguments: --tua"):
        _profile_settings("cpu-smoke", "--pretrain-extra", "--lr 0.01 --tua 0.2")


def _nifti(arr: np.ndarray, path: Path) -> None:
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), np.eye(4)), str(path))


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
    name = convert_msd(src, 7, tmp_path / "staging", num_processes=1, use_simpleitk=False)
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


@pytest.mark.e2e
def test_cpu_smoke_cli_end_to_end(tmp_path):
    """``fewlabel_benchmark.py --profile cpu-smoke``: 12 synthetic cases (4 held out), M in {2, 4}, scratch +
    MACL (1 pretraining epoch, 2 x 4 fine-tuning iterations), through the real CLIs."""
    workdir = tmp_path / "smoke"
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "MACL_PRETRAINED"):
        env.pop(var, None)  # the runner sets its own; nothing from the session may leak in
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(SCRIPT), "--profile", "cpu-smoke", "--workdir", str(workdir)],
                       env=env, cwd=str(ROOT), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1200)
    print(f"cpu-smoke end to end: {time.perf_counter() - t0:.0f} s")
    out = workdir / "fewlabel"
    if p.returncode != 0:
        log = out / "fewlabel_run_log.json"
        bad = [r for r in json.loads(log.read_text()) if r["status"] != "done"] if log.is_file() else "no run log"
        pytest.fail(f"exit status {p.returncode}; runs not done: {bad}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    report = out / "report"
    for f in ("fewlabel_dice_vs_M.png", "fewlabel_overlay_M2.png", "fewlabel_overlay_M4.png",
              "fewlabel_curves_M2.png", "fewlabel_curves_M4.png"):
        assert (report / f).read_bytes()[:8] == PNG_MAGIC, f
    result = json.loads((report / "fewlabel_result.json").read_text())
    assert [r["status"] for r in result["run_log"]] == ["done"] * 5, result["run_log"]
    assert sorted((r["arm"], r["budget"], r["n_val"]) for r in result["runs"]) == [
        ("macl", 2, 4), ("macl", 4, 4), ("scratch", 2, 4), ("scratch", 4, 4)]
    macl_log = (out / "logs" / "train_macl_M2_f0.log").read_text()
    assert "MACLPretrainer__nnUNetPlans__2d/checkpoint_final.pth" in macl_log
    assert "few-label benchmark schedule: 2 epochs x 4 training" in macl_log
    assert "MACLPretrainer" not in (out / "logs" / "train_scratch_M2_f0.log").read_text()
    assert "4 validation cases" in result["caption"] and "EXCLUDED" in result["caption"]
