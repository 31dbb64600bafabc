"""Few-label benchmark: nnU-Net fine-tuned from scratch vs from MACL / PCL / SimCLR pretraining.

The low-label protocol of the paper, on nnU-Net's own training:

1. the dataset is written in nnU-Net raw format (``cpu-smoke``: the embedded synthetic dataset of
   :mod:`nnunetv2_macl.demo.synthetic`; ``gpu``/real data: a Decathlon folder such as
   ``Task04_Hippocampus``, converted with nnU-Net's MSD converter), planned and preprocessed (``2d``);
2. splits: a K-fold partition of all cases (nnU-Net's own ``generate_crossval_split``, seed 12345, so
   with K = 5 the validation cases of fold f are those of nnU-Net's default fold f). Fold f validates
   on its held-out cases (the same for every label budget M); its training set for budget M is the
   first M cases of the fold's training pool in a seeded order, so the sets are nested (the M=4 cases
   are among the M=10 cases, ...). Each (M, fold) is one entry of ``splits_final.json`` at nnU-Net
   fold index ``m_index * n_folds + f``; ``splits_index.json`` beside it maps the indices back;
3. every pretraining method runs ONCE with ``macl_pretrain --method macl|pcl|simclr`` on the images
   of all cases (no labels; the validation cases' images are included, as is usual for this
   protocol), each in its own ``nnUNet_results`` root (``workdir/results/<method>``);
4. for every (fold, M) and method, the stock ``nnUNetv2_train ID 2d INDEX -tr TRAINER -device ...``
   with the pair of :mod:`nnunetv2_macl.trainers.benchmark_trainers` (identical schedule and seed,
   only the initial weights differ), in ``workdir/results/<method>``;
5. nnU-Net's ``fold_<INDEX>/validation/summary.json`` files are collected into ``report/``:
   ``fewlabel_runs.csv`` (one row per training), ``fewlabel_summary.csv`` and ``fewlabel_table.md``
   (Dice per class and foreground mean, mean and sd over folds, per M and method, paired difference
   to scratch), ``fewlabel_dice_vs_M.png`` and ``fewlabel_overlay_M<M>.png`` (image, reference and
   every method's prediction on a few validation slices, as the paper's Fig. 3), and
   ``fewlabel_result.json`` (settings, timings, what was cut or failed).

Profiles (every setting can be overridden on the command line):

- ``cpu-smoke``: 10 synthetic cases of 16x32x32, M in {2, 4}, 1 fold, scratch + macl, 1 pretraining
  epoch, 2 x 4 fine-tuning iterations. Checks the pipeline and the tables in minutes on 2 CPU cores,
  not the gain from pretraining.
- ``gpu``: Task04_Hippocampus (``--raw``), 2d, M in {4, 10, 20}, scratch + macl + pcl + simclr,
  10 pretraining epochs (batch 64), 15 x 20 fine-tuning iterations of the plans' batch (281), 4 runs
  at a time, up to 5 folds: as many as the deadlines allow (runs start fold by fold, none after
  ``--deadline-min`` 5.5 or when it would not end before ``--hard-deadline-min`` 7.5, which also stops
  runs still going; the report lists what was cut, and only folds that every method finished enter
  the table). Sized for about 10 minutes on one H100; see ``pretrain/run_gpu_benchmark.sh``.
- ``cpu-real``: Task04_Hippocampus on 2 CPU cores (~25 min): M in {4, 10}, 1 fold, scratch + macl,
  1 pretraining epoch, 25 x 10 fine-tuning iterations of batch 32 (``MACL_BENCH_BATCH``; the plans'
  281 would take ~14 s an iteration), 10 validation cases.

Usage (the default workdir is ``work_dirs/fewlabel_<profile>``, git-ignored)::

    python pretrain/fewlabel_benchmark.py --profile cpu-smoke
    python pretrain/fewlabel_benchmark.py --profile cpu-real --raw ../shared/data/Task04_Hippocampus
    bash pretrain/run_gpu_benchmark.sh          # = --profile gpu --device cuda, with the GPU kit's data
    python pretrain/fewlabel_benchmark.py --profile gpu --raw /data/Task04_Hippocampus --folds 5 \\
        --deadline-min 60 --hard-deadline-min 90 --workdir work_dirs/fewlabel_gpu_long
    python pretrain/fewlabel_benchmark.py --workdir work_dirs/fewlabel_gpu --report-only

``--resume`` keeps what an earlier run in the same workdir finished and the new settings allow (the
dataset; the pretraining checkpoints when only fine-tuning settings changed; finished trainings).
``--report-only`` rebuilds the report from the files (also after the runner was stopped from outside).

Seeds: stock nnU-Net trainings are not seeded; the benchmark trainers seed python/numpy/torch in the
training process (``MACL_BENCH_SEED``), so scratch and fine-tuned networks share the initialisation of
every part that is not pretrained, but nnU-Net's augmentation workers are unseeded and cuDNN is not
deterministic: two runs of the same setting differ a little, which the spread over folds includes.

Python API: :func:`make_fewlabel_splits`, :func:`write_fewlabel_splits`, :func:`run_benchmark`,
:func:`collect_runs`, :func:`aggregate`, :func:`write_report` (tables and plots from the
``summary.json`` files alone), :func:`overlay_figure`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

# The demo's helpers: subprocess environment, console-script lookup, streamed output with a timeout,
# temporarily set environment variables, reading nnU-Net's summary.json.
from nnunetv2_macl.run.subprocess_steps import StepError as DemoError
from nnunetv2_macl.run.subprocess_steps import find_executable as _find_executable
from nnunetv2_macl.run.subprocess_steps import read_summary, subprocess_env as _subprocess_env
from nnunetv2_macl.run.subprocess_steps import stream_command as _stream, temporary_environ as _temporary_environ

CONFIGURATION = "2d"
PLANS = "nnUNetPlans"
METHODS = ("scratch", "macl", "pcl", "simclr")
PRETRAIN_METHODS = ("macl", "pcl", "simclr")
SCRATCH_TRAINER = "nnUNetTrainerScratch_bench"
PRETRAINED_TRAINER = "nnUNetTrainerMACL_bench"
MARKER = "fewlabel_benchmark.json"
REPORT_DIR = "report"
METHOD_LABELS = {"scratch": "scratch", "macl": "MACL", "pcl": "PCL", "simclr": "SimCLR"}

PROFILES: dict[str, dict] = {
    # tiny; the pipeline and the tables, not the gain (measured in tests/test_fewlabel_benchmark.py)
    "cpu-smoke": dict(dataset="synthetic", num_cases=10, shape=(16, 32, 32), dataset_id=981, budgets=(2, 4),
                      n_splits=5, folds=1, methods=("scratch", "macl"), pretrain_epochs=1, pretrain_batch_size=8,
                      finetune_epochs=2, iters=4, val_iters=1, finetune_batch_size=None, max_val_cases=None,
                      device="cpu", jobs=2, procs=1, pretrain_workers=0, deadline_min=None, hard_deadline_min=None,
                      overlay_cases=2),
    # the measurement; see the estimate in pretrain/run_gpu_benchmark.sh
    "gpu": dict(dataset="msd", raw=None, dataset_id=504, budgets=(4, 10, 20), n_splits=5, folds=5,
                methods=("scratch", "macl", "pcl", "simclr"), pretrain_epochs=10, pretrain_batch_size=64,
                finetune_epochs=15, iters=20, val_iters=5, finetune_batch_size=None, max_val_cases=None,
                device="cuda", jobs=4, procs=None, pretrain_workers=3, deadline_min=5.5, hard_deadline_min=7.5,
                overlay_cases=3),
    # a CPU-sized look at the real data (2 cores: ~25 min, see docs/RESULTS.md): 1 fold, M in {4, 10},
    # 1 pretraining epoch (446 steps), 250 fine-tuning iterations of batch 32 (not the plans' 281), 10
    # validation cases
    "cpu-real": dict(dataset="msd", raw=None, dataset_id=504, budgets=(4, 10), n_splits=5, folds=1,
                     methods=("scratch", "macl"), pretrain_epochs=1, pretrain_batch_size=16, finetune_epochs=25,
                     iters=10, val_iters=2, finetune_batch_size=32, max_val_cases=10, device="cpu", jobs=1, procs=None,
                     pretrain_workers=0, deadline_min=None, hard_deadline_min=None, overlay_cases=3),
}


class BenchmarkError(RuntimeError):
    """A setting is invalid or a step failed; the message says which."""


def _say(msg: str = "") -> None:
    print(f"[fewlabel] {msg}" if msg else "", flush=True)


# ============================================================================================ settings
@dataclass
class Settings:
    dataset: str = "synthetic"             # "synthetic" | "msd"
    raw: str | None = None                 # Decathlon folder (dataset="msd")
    dataset_id: int = 981
    num_cases: int = 10                    # synthetic only
    shape: tuple[int, int, int] = (16, 32, 32)  # synthetic only
    budgets: tuple[int, ...] = (2, 4)
    n_splits: int = 5
    folds: int = 1
    methods: tuple[str, ...] = ("scratch", "macl")
    pretrain_epochs: int = 1
    pretrain_batch_size: int = 8
    pretrain_workers: int = 0
    finetune_epochs: int = 2
    iters: int = 4
    val_iters: int = 1
    finetune_batch_size: int | None = None  # None: the plans' batch size (stock nnU-Net)
    max_val_cases: int | None = None
    device: str = "cpu"
    jobs: int = 1
    procs: int | None = None               # nnU-Net worker processes per run (None: processes_per_job)
    seed: int = 12345
    deadline_min: float | None = None       # no run is launched after this many minutes
    hard_deadline_min: float | None = None  # runs still going at this time are stopped
    overlay_cases: int = 3
    profile: str = "custom"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)

    def fingerprint(self) -> dict:
        """What must match for --resume to reuse finished trainings (timing/parallelism knobs excluded)."""
        d = self.to_dict()
        for k in ("jobs", "procs", "deadline_min", "hard_deadline_min", "overlay_cases", "profile", "pretrain_workers"):
            d.pop(k)
        return d


_DATASET_KEYS = ("dataset", "raw", "dataset_id", "num_cases", "shape")
_PRETRAIN_KEYS = _DATASET_KEYS + ("pretrain_epochs", "pretrain_batch_size", "seed")


def reusable(previous: Settings, current: Settings) -> str:
    """What ``--resume`` can keep of a run made with ``previous``: "all" (same settings), "pretraining"
    (dataset and pretraining checkpoints; the fine-tuning settings changed), "dataset" or "nothing"."""
    p, c = previous.to_dict(), current.to_dict()
    if any(p.get(k) != c.get(k) for k in _DATASET_KEYS):
        return "nothing"
    if any(p.get(k) != c.get(k) for k in _PRETRAIN_KEYS):
        return "dataset"
    return "all" if previous.fingerprint() == current.fingerprint() else "pretraining"


def settings_for(profile: str, **overrides) -> Settings:
    if profile not in PROFILES:
        raise BenchmarkError(f"unknown profile {profile!r} (available: {sorted(PROFILES)})")
    d = dict(PROFILES[profile])
    d.update({k: v for k, v in overrides.items() if v is not None})
    d["profile"] = profile
    s = Settings.from_dict(d)
    validate_settings(s)
    return s


def validate_settings(s: Settings) -> None:
    if s.dataset not in ("synthetic", "msd"):
        raise BenchmarkError(f"dataset must be 'synthetic' or 'msd', got {s.dataset!r}")
    if s.dataset == "msd" and not s.raw:
        raise BenchmarkError("the real-data profile needs --raw (a Decathlon folder, e.g. "
                             "../shared/data/Task04_Hippocampus)")
    if not s.methods or any(m not in METHODS for m in s.methods) or len(set(s.methods)) != len(s.methods):
        raise BenchmarkError(f"methods must be distinct names from {METHODS}, got {s.methods}")
    if not s.budgets or any(int(m) < 1 for m in s.budgets) or list(s.budgets) != sorted(set(s.budgets)):
        raise BenchmarkError(f"budgets must be distinct positive numbers in increasing order, got {s.budgets}")
    if s.n_splits < 2:
        raise BenchmarkError(f"n_splits must be >= 2, got {s.n_splits}")
    if not 1 <= s.folds <= s.n_splits:
        raise BenchmarkError(f"folds must be in 1..n_splits ({s.n_splits}), got {s.folds}")
    if s.device not in ("cpu", "cuda"):
        raise BenchmarkError(f"device must be 'cpu' or 'cuda', got {s.device!r}")
    for name in ("pretrain_epochs", "pretrain_batch_size", "finetune_epochs", "iters", "val_iters", "jobs"):
        if int(getattr(s, name)) < 1:
            raise BenchmarkError(f"{name} must be >= 1, got {getattr(s, name)}")
    for name in ("finetune_batch_size", "procs"):
        if getattr(s, name) is not None and int(getattr(s, name)) < 1:
            raise BenchmarkError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.max_val_cases is not None and s.max_val_cases < 1:
        raise BenchmarkError(f"max_val_cases must be >= 1, got {s.max_val_cases}")


# ============================================================================================ splits
def make_fewlabel_splits(case_ids: Sequence[str], budgets: Sequence[int], n_folds: int, n_splits: int = 5,
                         seed: int = 12345, max_val_cases: int | None = None) -> dict:
    """Nested few-label splits (see module doc).

    Returns ``{"splits": [{"train": [...], "val": [...]}, ...]`` (nnU-Net's ``splits_final.json``;
    entry ``m_index * n_folds + f`` is budget ``budgets[m_index]`` on fold ``f``), ``"index"`` (one
    record per entry: index, budget, fold, train, val) and ``"meta"``}. The validation cases of fold f
    are the held-out part f of ``generate_crossval_split(sorted(case_ids), seed, n_splits)`` (capped to
    the first ``max_val_cases`` of a seeded order if given); the training set of budget M is the first M
    cases of that fold's training part in the order ``np.random.default_rng([seed, f]).permutation``.
    """
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        raise BenchmarkError("case identifiers are not unique")
    budgets = [int(m) for m in budgets]
    if not budgets or budgets != sorted(set(budgets)) or budgets[0] < 1:
        raise BenchmarkError(f"budgets must be distinct positive numbers in increasing order, got {budgets}")
    if not 2 <= n_splits <= len(ids):
        raise BenchmarkError(f"n_splits must be in 2..{len(ids)} (the number of cases), got {n_splits}")
    if not 1 <= n_folds <= n_splits:
        raise BenchmarkError(f"n_folds must be in 1..{n_splits}, got {n_folds}")
    partition = generate_crossval_split(ids, seed=seed, n_splits=n_splits)
    splits: list[dict] = [None] * (len(budgets) * n_folds)  # type: ignore[list-item]
    index: list[dict] = []
    for f in range(n_folds):
        val = sorted(str(c) for c in partition[f]["val"])
        if max_val_cases is not None and len(val) > max_val_cases:
            order = np.random.default_rng([seed, f, 1]).permutation(len(val))
            val = sorted(val[i] for i in order[:max_val_cases])
        pool = sorted(str(c) for c in partition[f]["train"])
        pool = [pool[i] for i in np.random.default_rng([seed, f]).permutation(len(pool))]
        if budgets[-1] > len(pool):
            raise BenchmarkError(f"budget M={budgets[-1]} exceeds the {len(pool)} training cases of fold {f} "
                                 f"({len(ids)} cases, {n_splits}-fold partition)")
        for mi, m in enumerate(budgets):
            i = mi * n_folds + f
            train = pool[:m]
            splits[i] = {"train": list(train), "val": list(val)}
            index.append({"index": i, "budget": m, "fold": f, "train": list(train), "val": list(val)})
    index.sort(key=lambda r: r["index"])
    meta = {"num_cases": len(ids), "budgets": budgets, "n_folds": int(n_folds), "n_splits": int(n_splits),
            "seed": int(seed), "max_val_cases": max_val_cases,
            "rule": "index = m_index * n_folds + fold; val = held-out part of a K-fold partition (nnU-Net's "
                    "generate_crossval_split); train = first M of the fold's training part in a seeded order "
                    "(nested over M)"}
    return {"splits": splits, "index": index, "meta": meta}


def split_index(budget_index: int, fold: int, n_folds: int) -> int:
    return int(budget_index) * int(n_folds) + int(fold)


def write_fewlabel_splits(preprocessed_dataset_folder: str | os.PathLike, plan: dict) -> tuple[Path, Path]:
    """Write ``splits_final.json`` (read by nnU-Net) and ``splits_index.json`` (the mapping) into the
    preprocessed dataset folder; returns both paths."""
    folder = Path(preprocessed_dataset_folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits_file, index_file = folder / "splits_final.json", folder / "splits_index.json"
    _write_json(splits_file, plan["splits"])
    _write_json(index_file, {"meta": plan["meta"], "index": plan["index"]})
    return splits_file, index_file


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ============================================================================================ dataset
def _simpleitk_works() -> bool:
    try:
        import SimpleITK as sitk

        sitk.GetImageFromArray(np.zeros((2, 2, 2), dtype=np.float32))
        return True
    except Exception:  # noqa: BLE001 - a stand-in module raises anything
        return False


def convert_msd(raw_msd_folder: str | os.PathLike, dataset_id: int, work: Path, num_processes: int,
                use_simpleitk: bool | None = None) -> str:
    """Convert a Decathlon folder into ``$nnUNet_raw/DatasetXXX_Name`` and return the dataset name.

    The Decathlon folder is read in place: a folder of links in ``work`` gives nnU-Net's converter the
    layout it insists on (``TaskXX_Name``, an ``imagesTs`` folder, ``training``/``test`` keys). Where
    SimpleITK is missing (the GPU kit ships a stand-in), the converter's steps for single-channel 3-D
    images (copy ``X.nii.gz`` to ``X_0000.nii.gz``, copy the labels, rewrite dataset.json) are done here
    and dataset.json selects nnU-Net's ``NibabelIO``.
    """
    src = Path(raw_msd_folder).resolve()
    if not (src / "dataset.json").is_file() or not (src / "imagesTr").is_dir() or not (src / "labelsTr").is_dir():
        raise BenchmarkError(f"{src} is not a Decathlon dataset folder (needs dataset.json, imagesTr/, labelsTr/)")
    m = re.fullmatch(r"Task(\d+)_([A-Za-z0-9]+)", src.name)
    task_name = m.group(2) if m else re.sub(r"[^A-Za-z0-9]", "", src.name) or "Dataset"
    staged = work / f"Task{int(m.group(1)) if m else 0:02d}_{task_name}"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (staged / sub).symlink_to(src / sub, target_is_directory=True)
    (staged / "imagesTs").mkdir()
    if (src / "imagesTs").is_dir():
        for f in (src / "imagesTs").iterdir():
            (staged / "imagesTs" / f.name).symlink_to(f)
    dj = json.loads((src / "dataset.json").read_text())
    dj.setdefault("test", [])
    dj.setdefault("training", [])
    (staged / "dataset.json").write_text(json.dumps(dj, indent=1))
    name = f"Dataset{int(dataset_id):03d}_{task_name}"
    if use_simpleitk is None:
        use_simpleitk = _simpleitk_works()
    if use_simpleitk:
        from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset

        convert_msd_dataset(str(staged), overwrite_target_id=int(dataset_id), num_processes=num_processes)
        return name
    import nibabel

    target = Path(os.environ["nnUNet_raw"]) / name
    for sub in ("imagesTr", "imagesTs", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for sub, out in (("imagesTr", "imagesTr"), ("imagesTs", "imagesTs")):
        for f in sorted((staged / sub).glob("*.nii.gz")):
            if f.name.startswith((".", "_")):
                continue
            if len(nibabel.load(str(f)).shape) != 3:
                raise BenchmarkError(f"{f}: only single-channel 3-D images can be converted without SimpleITK")
            shutil.copyfile(f, target / out / (f.name[:-7] + "_0000.nii.gz"))
    for f in sorted((staged / "labelsTr").glob("*.nii.gz")):
        if not f.name.startswith((".", "_")):
            shutil.copyfile(f, target / "labelsTr" / f.name)
    dj["labels"] = {v: int(k) for k, v in dj["labels"].items()}
    dj["file_ending"] = ".nii.gz"
    dj["channel_names"] = dj.pop("modality")
    dj.pop("training", None)
    dj.pop("test", None)
    dj["overwrite_image_reader_writer"] = "NibabelIO"
    (target / "dataset.json").write_text(json.dumps(dj, indent=1))
    return name


def prepare_dataset(s: Settings, workdir: Path) -> dict:
    """Raw dataset, plans and 2d preprocessing in ``workdir``; returns names and paths."""
    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset, plan_and_preprocess

    nproc = max(1, int(os.environ.get("nnUNet_def_n_proc", "2")))
    if s.dataset == "synthetic":
        make_synthetic_dataset(os.environ["nnUNet_raw"], dataset_id=s.dataset_id, name="FewLabelSynthetic",
                               num_cases=s.num_cases, shape=tuple(s.shape), seed=0)
        name = f"Dataset{int(s.dataset_id):03d}_FewLabelSynthetic"
    else:
        name = convert_msd(s.raw, s.dataset_id, workdir / "msd_staging", nproc)
    plan_and_preprocess(int(s.dataset_id), configurations=(CONFIGURATION,), num_processes=nproc)
    return dataset_paths(workdir, name)


def dataset_paths(workdir: Path, name: str) -> dict:
    pre = workdir / "nnUNet_preprocessed" / name
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dj = json.loads((pre / "dataset.json").read_text())
    return {"name": name, "raw": workdir / "nnUNet_raw" / name, "preprocessed": pre, "plans": plans,
            "dataset_json": dj, "data_folder": pre / plans["configurations"][CONFIGURATION]["data_identifier"]}


def case_identifiers(raw_dataset: Path, dataset_json: dict) -> list[str]:
    ending = dataset_json.get("file_ending", ".nii.gz")
    return sorted(f.name[:-len(ending)] for f in (raw_dataset / "labelsTr").iterdir() if f.name.endswith(ending))


# ============================================================================================ layout
def results_root(workdir: Path, method: str) -> Path:
    return Path(workdir) / "results" / method


def trainer_for(method: str) -> str:
    return SCRATCH_TRAINER if method == "scratch" else PRETRAINED_TRAINER


def run_folder(workdir: Path, method: str, dataset_name: str, index: int) -> Path:
    return results_root(workdir, method) / dataset_name / f"{trainer_for(method)}__{PLANS}__{CONFIGURATION}" / \
        f"fold_{int(index)}"


def pretrain_checkpoint(workdir: Path, method: str, dataset_name: str) -> Path:
    from nnunetv2_macl.training.pretrainer import output_folder_name

    return results_root(workdir, method) / dataset_name / output_folder_name(PLANS, CONFIGURATION) / \
        "checkpoint_final.pth"


# ============================================================================================ running
@dataclass
class Task:
    key: str
    kind: str                      # "pretrain" | "train"
    method: str
    budget: int | None = None
    fold: int | None = None
    index: int | None = None
    deps: tuple[str, ...] = ()
    status: str = "pending"        # pending | done | reused | failed | cut | skipped
    seconds: float | None = None
    message: str = ""
    extra: dict = field(default_factory=dict)


def _prepare_workdir(workdir: Path, s: Settings, resume: bool) -> dict:
    marker = workdir / MARKER
    if workdir.exists() and not workdir.is_dir():
        raise BenchmarkError(f"--workdir {workdir} exists and is not a folder")
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.is_file():
        raise BenchmarkError(f"--workdir {workdir} is not empty and was not made by this benchmark (no {MARKER}); "
                             f"choose an empty or new folder")
    state = {"settings": s.to_dict(), "prepared": False}
    if marker.is_file():
        previous = json.loads(marker.read_text())
        keep = reusable(Settings.from_dict(previous.get("settings", {})), s) if resume else "nothing"
        remove = {"all": [], "pretraining": [REPORT_DIR], "dataset": ["results", "logs", REPORT_DIR],
                  "nothing": ["nnUNet_raw", "nnUNet_preprocessed", "results", "logs", REPORT_DIR, "msd_staging"]}[keep]
        if keep == "pretraining":  # the trainings go, the pretraining checkpoints stay
            remove += [str(p.relative_to(workdir)) for p in (workdir / "results").glob("*/*/nnUNetTrainer*")]
        if resume:
            _say(f"--resume: keeping {'everything finished' if keep == 'all' else keep} in {workdir}"
                 + (" (other settings)" if keep != "all" else ""))
        else:
            _say(f"removing the earlier benchmark run in {workdir} (--resume would reuse what it finished)")
        for sub in remove:
            if (workdir / sub).is_dir():
                shutil.rmtree(workdir / sub)
        if keep != "all" and (workdir / RUN_LOG).is_file():
            (workdir / RUN_LOG).unlink()
        if keep != "nothing":
            state["prepared"] = bool(previous.get("prepared"))
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json(marker, state)
    return state


def _base_env(workdir: Path) -> dict[str, str]:
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    paths = {"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
             "nnUNet_results": str(workdir / "results" / "_unused")}
    return _subprocess_env(paths, ext_trainer_value(os.environ.get("nnUNet_extTrainer")))


def processes_per_job(jobs: int) -> int:
    """nnU-Net worker processes (augmentation, export) of each concurrent run: the environment's
    ``nnUNet_n_proc_DA`` for one job at a time, else the cores shared out (one core per job for the
    training process itself), at most 8."""
    cores = os.cpu_count() or 1
    if jobs == 1:
        return max(1, int(os.environ.get("nnUNet_n_proc_DA") or min(8, cores)))
    return max(1, min(8, (cores - jobs) // jobs))


def _task_list(s: Settings) -> list[Task]:
    tasks = [Task(key=f"pretrain:{m}", kind="pretrain", method=m) for m in s.methods if m in PRETRAIN_METHODS]
    for f in range(s.folds):
        for mi, budget in enumerate(s.budgets):
            for m in s.methods:
                deps = (f"pretrain:{m}",) if m in PRETRAIN_METHODS else ()
                tasks.append(Task(key=f"train:{m}:M{budget}:f{f}", kind="train", method=m, budget=budget, fold=f,
                                  index=split_index(mi, f, s.folds), deps=deps))
    return tasks


def _execute(task: Task, s: Settings, workdir: Path, ds: dict, env0: dict, timeout: float | None,
             per_job_procs: int) -> None:
    env = dict(env0)
    env["nnUNet_results"] = str(results_root(workdir, task.method))
    env["nnUNet_def_n_proc"] = str(per_job_procs)
    env["nnUNet_n_proc_DA"] = str(per_job_procs)
    logs = workdir / "logs"
    if task.kind == "pretrain":
        ckpt = pretrain_checkpoint(workdir, task.method, ds["name"])
        if ckpt.parent.is_dir():
            shutil.rmtree(ckpt.parent)  # an unfinished earlier attempt
        cmd = [_find_executable("macl_pretrain"), "-d", str(s.dataset_id), "-c", CONFIGURATION, "-p", PLANS,
               "--method", task.method, "--device", s.device, "--epochs", str(s.pretrain_epochs),
               "--batch-size", str(s.pretrain_batch_size), "--num-workers", str(s.pretrain_workers),
               "--seed", str(s.seed), "--save-every", str(s.pretrain_epochs)]
        _stream(cmd, env, f"[pretrain {task.method}]", logs / f"pretrain_{task.method}.log", timeout)
        if not ckpt.is_file():
            raise DemoError(f"macl_pretrain --method {task.method} finished without writing {ckpt}")
        task.extra["checkpoint"] = str(ckpt)
        return
    from nnunetv2_macl.trainers.benchmark_trainers import (BENCH_BATCH_ENV, BENCH_EPOCHS_ENV, BENCH_ITERS_ENV,
                                                           BENCH_SEED_ENV, BENCH_VAL_ITERS_ENV)

    env.update({BENCH_EPOCHS_ENV: str(s.finetune_epochs), BENCH_ITERS_ENV: str(s.iters),
                BENCH_VAL_ITERS_ENV: str(s.val_iters), BENCH_SEED_ENV: str(s.seed),
                BENCH_BATCH_ENV: "" if s.finetune_batch_size is None else str(s.finetune_batch_size)})
    if task.method in PRETRAIN_METHODS:
        env["MACL_PRETRAINED"] = str(pretrain_checkpoint(workdir, task.method, ds["name"]))
    else:
        env.pop("MACL_PRETRAINED", None)
    folder = run_folder(workdir, task.method, ds["name"], task.index)
    if folder.is_dir():
        shutil.rmtree(folder)  # an unfinished earlier attempt: start it over (not nnU-Net's --c)
    cmd = [_find_executable("nnUNetv2_train"), str(s.dataset_id), CONFIGURATION, str(task.index), "-tr",
           trainer_for(task.method), "-device", s.device]
    tag = f"[{task.method} M={task.budget} f{task.fold}]"
    _stream(cmd, env, tag, logs / f"train_{task.method}_M{task.budget}_f{task.fold}.log", timeout)
    summary = folder / "validation" / "summary.json"
    if not summary.is_file():
        raise DemoError(f"nnUNetv2_train finished without writing {summary}")


def run_tasks(tasks: list[Task], jobs: int, execute, check=None, deadline: float | None = None,
              hard_deadline: float | None = None, on_change=None) -> None:
    """Run ``tasks`` (in list order of priority) ``jobs`` at a time, each once its dependencies are done.

    ``execute(task, timeout)`` runs one (raises on failure; ``timeout`` = seconds left before the hard
    deadline, or None); ``check(task)`` validates a finished one. Deadlines are ``time.perf_counter()``
    values: after ``deadline`` nothing is started; a task whose kind took longer (median of the finished
    ones) than is left before ``hard_deadline`` is not started; one that the hard deadline stops is
    "cut". A failure marks the task "failed" and its dependants "skipped"; the others go on. Statuses are
    set on the tasks; ``on_change()`` is called whenever they change.
    """
    by_key = {t.key: t for t in tasks}
    ok = ("done", "reused")
    running: dict = {}
    on_change = on_change or (lambda: None)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while True:
            for t in tasks:  # a dependency that will never be there: skip
                bad = [d for d in t.deps if by_key[d].status in ("failed", "cut", "skipped")]
                if t.status == "pending" and bad:
                    t.status, t.message = "skipped", f"{bad[0]} {by_key[bad[0]].status}"
            pending = [t for t in tasks if t.status == "pending"]
            now = time.perf_counter()
            if deadline is not None and now > deadline:
                for t in pending:
                    t.status, t.message = "cut", "not started: past the deadline for starting runs"
                pending = []
            while len(running) < jobs:
                ready = [t for t in pending if all(by_key[d].status in ok for d in t.deps)]
                if not ready:
                    break
                t = ready[0]
                pending.remove(t)
                durations = [x.seconds for x in tasks if x.kind == t.kind and x.status == "done"]
                left = None if hard_deadline is None else hard_deadline - time.perf_counter()
                if left is not None and durations and float(np.median(durations)) > left:
                    t.status = "cut"
                    t.message = (f"not started: a {t.kind} takes ~{np.median(durations):.0f} s, only {max(left, 0):.0f} s "
                                 f"were left before the hard deadline")
                    continue
                t.status = "running"
                t.extra["t0"] = time.perf_counter()
                running[pool.submit(execute, t, None if left is None else max(1.0, left))] = t
            on_change()
            if not running:
                for t in pending:
                    t.status, t.message = "skipped", "dependencies never finished"
                on_change()
                return
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                t = running.pop(fut)
                t.seconds = time.perf_counter() - t.extra.pop("t0")
                try:
                    fut.result()
                    if check is not None:
                        check(t)
                    t.status = "done"
                    _say(f"{t.key} finished in {t.seconds:.0f} s")
                except Exception as e:  # noqa: BLE001 - one run's failure must not stop the others
                    t.message = f"{type(e).__name__}: " + " ".join(str(e).split())[:2000]
                    if hard_deadline is not None and time.perf_counter() >= hard_deadline - 1.0 and \
                            "ran longer than" in t.message:
                        t.status, t.message = "cut", "stopped at the hard deadline"
                        _say(f"{t.key} stopped at the hard deadline after {t.seconds:.0f} s")
                    else:
                        t.status = "failed"
                        _say(f"{t.key} FAILED after {t.seconds:.0f} s: {t.message[:500]}")


RUN_LOG = "fewlabel_run_log.json"


def _write_run_log(workdir: Path, tasks: list[Task]) -> list[dict]:
    """The state of every task, rewritten as tasks finish, so that ``--report-only`` can say what was
    cut when the runner itself is stopped (e.g. by an outer time limit)."""
    log = [{"key": t.key, "kind": t.kind, "method": t.method, "budget": t.budget, "fold": t.fold, "index": t.index,
            "status": t.status, "seconds": None if t.seconds is None else round(t.seconds, 1), "message": t.message}
           for t in tasks]
    _write_json(Path(workdir) / RUN_LOG, log)
    return log


def _check_validation_cases(task: Task, ds: dict, plan: dict, workdir: Path) -> None:
    """nnU-Net silently falls back to a random split for a fold index it does not find: refuse that."""
    summary = run_folder(workdir, task.method, ds["name"], task.index) / "validation" / "summary.json"
    got = read_summary(summary)["validation_cases"]
    ending = ds["dataset_json"].get("file_ending", ".nii.gz")
    want = sorted(c + ending for c in plan["splits"][task.index]["val"])
    if got != want:
        raise DemoError(f"{summary} was validated on other cases than split {task.index} of splits_final.json "
                        f"({len(got)} vs {len(want)} cases)")


def run_benchmark(workdir: str | os.PathLike, settings: Settings, resume: bool = False) -> dict:
    """Run the benchmark (module doc) and write the report; returns ``fewlabel_result.json``'s content.

    nnU-Net's path variables point into ``workdir`` while it runs (restored on return); the user's own
    nnU-Net folders are never read or written. Raises :class:`BenchmarkError` for bad settings; a
    failing pretraining or training is recorded (``run_log``) and the others go on.
    """
    s = settings
    validate_settings(s)
    if s.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchmarkError("--device cuda requested but CUDA is not available; use --device cpu")
    t_start = time.perf_counter()
    started = datetime.datetime.now().astimezone()
    workdir = Path(workdir).resolve()
    state = _prepare_workdir(workdir, s, resume)
    values = {"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
              "nnUNet_results": str(workdir / "results" / "_unused")}
    cores = str(max(1, min(os.cpu_count() or 1, 8)))
    for name in ("nnUNet_def_n_proc", "nnUNet_n_proc_DA"):  # nnU-Net's defaults assume 8+ cores
        values[name] = os.environ.get(name) or cores
    for sub in ("nnUNet_raw", "nnUNet_preprocessed"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    with _temporary_environ(values):
        return _run(workdir, s, state, resume, t_start, started)


def _run(workdir: Path, s: Settings, state: dict, resume: bool, t_start: float, started) -> dict:
    timings: dict[str, float] = {}

    # -- dataset, plans, preprocessing ---------------------------------------------------------------
    t0 = time.perf_counter()
    name = None
    if state["prepared"]:
        found = sorted((workdir / "nnUNet_preprocessed").glob(f"Dataset{int(s.dataset_id):03d}_*"))
        name = found[0].name if found and (found[0] / f"{PLANS}.json").is_file() else None
    if name is None:
        _say(f"preparing the dataset ({s.dataset}) in {workdir}")
        ds = prepare_dataset(s, workdir)
        state["prepared"] = True
        _write_json(workdir / MARKER, state)
    else:
        ds = dataset_paths(workdir, name)
        _say(f"--resume: reusing {ds['preprocessed']}")
    timings["prepare"] = time.perf_counter() - t0
    cases = case_identifiers(ds["raw"], ds["dataset_json"])
    plan = make_fewlabel_splits(cases, s.budgets, s.folds, s.n_splits, s.seed, s.max_val_cases)
    splits_file, index_file = write_fewlabel_splits(ds["preprocessed"], plan)
    _say(f"{len(cases)} cases; wrote {splits_file} ({len(plan['splits'])} entries) and {index_file}")
    for r in plan["index"]:
        _say(f"  index {r['index']:>2}: M={r['budget']:<3} fold {r['fold']}: {len(r['train'])} training / "
             f"{len(r['val'])} validation cases")

    # -- pretraining and fine-tuning, scheduled --------------------------------------------------------
    env0 = _base_env(workdir)
    tasks = _task_list(s)
    if resume:
        for t in tasks:
            if t.kind == "pretrain" and pretrain_checkpoint(workdir, t.method, ds["name"]).is_file():
                t.status = "reused"
            elif t.kind == "train" and (run_folder(workdir, t.method, ds["name"], t.index) / "validation" /
                                        "summary.json").is_file():
                t.status = "reused"
    per_job = s.procs or processes_per_job(s.jobs)
    _say(f"{sum(t.kind == 'train' for t in tasks)} trainings, {sum(t.kind == 'pretrain' for t in tasks)} "
         f"pretrainings; {s.jobs} at a time ({per_job} data processes each) on {s.device}")
    run_tasks(tasks, s.jobs, lambda t, timeout: _execute(t, s, workdir, ds, env0, timeout, per_job),
              check=lambda t: _check_validation_cases(t, ds, plan, workdir) if t.kind == "train" else None,
              deadline=None if s.deadline_min is None else t_start + 60.0 * s.deadline_min,
              hard_deadline=None if s.hard_deadline_min is None else t_start + 60.0 * s.hard_deadline_min,
              on_change=lambda: _write_run_log(workdir, tasks))
    timings["runs"] = time.perf_counter() - t_start - timings["prepare"]

    # -- report ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    run_log = _write_run_log(workdir, tasks)
    result = write_report(workdir, ds, s, plan, run_log=run_log, timings=timings, started=started)
    result["timings"]["report"] = time.perf_counter() - t0
    result["timings"]["total"] = time.perf_counter() - t_start
    _write_json(Path(result["paths"]["result_json"]), result)
    _print_summary(result)
    return result


# ============================================================================================ collecting
def collect_runs(workdir: Path, dataset_name: str, plan: dict, methods: Sequence[str],
                 labels: dict[str, int] | None = None) -> list[dict]:
    """One row per (method, index) whose ``summary.json`` exists: budget, fold, foreground-mean Dice
    and Dice per class (by label name)."""
    rows = []
    for m in methods:
        for rec in plan["index"]:
            summary = run_folder(workdir, m, dataset_name, rec["index"]) / "validation" / "summary.json"
            if not summary.is_file():
                continue
            r = read_summary(summary, labels)
            per_case = _per_case_dice(summary)
            rows.append({"method": m, "budget": rec["budget"], "fold": rec["fold"], "index": rec["index"],
                         "n_train": len(rec["train"]), "n_val": len(rec["val"]), "dice_mean": r["foreground_mean_dice"],
                         **{f"dice_{k}": v for k, v in r["dice_per_class"].items()},
                         "summary_file": str(summary), "per_case": per_case})
    return rows


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


def complete_folds(rows: list[dict], methods: Sequence[str], budget: int) -> list[int]:
    """Folds of ``budget`` for which every method has a result."""
    have = [{r["fold"] for r in rows if r["method"] == m and r["budget"] == budget} for m in methods]
    return sorted(set.intersection(*have)) if have else []


def aggregate(rows: list[dict], methods: Sequence[str], budgets: Sequence[int]) -> list[dict]:
    """Per (budget, method): mean and sample sd over folds of every Dice column and the paired
    difference to scratch (foreground mean). Only folds that every method completed at that budget
    count (like is compared with like; a run cut by a deadline leaves its fold out for all methods);
    ``n_folds``/``folds`` say which, ``excluded_folds`` which runs of this method were left out."""
    cols = ["mean"] + _class_names(rows)
    out = []
    for b in budgets:
        folds = complete_folds(rows, methods, b)
        for m in methods:
            mine = [r for r in rows if r["method"] == m and r["budget"] == b]
            sel = [r for r in mine if r["fold"] in folds]
            rec: dict = {"budget": b, "method": m, "n_folds": len(sel), "folds": sorted(r["fold"] for r in sel),
                         "excluded_folds": sorted(r["fold"] for r in mine if r["fold"] not in folds)}
            for c in cols:
                vals = np.array([r.get(f"dice_{c}", float("nan")) for r in sel], dtype=float)
                finite = vals[~np.isnan(vals)]
                rec[f"dice_{c}_mean"] = float(finite.mean()) if finite.size else None
                rec[f"dice_{c}_sd"] = float(finite.std(ddof=1)) if finite.size > 1 else None
            if m != "scratch" and "scratch" in methods:
                scratch = {r["fold"]: r["dice_mean"] for r in rows if r["method"] == "scratch" and r["budget"] == b}
                diffs = [r["dice_mean"] - scratch[r["fold"]] for r in sel if r["fold"] in scratch]
                rec["delta_vs_scratch_mean"] = float(np.mean(diffs)) if diffs else None
                rec["delta_vs_scratch_sd"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
                rec["delta_n_folds"] = len(diffs)
            out.append(rec)
    return out


# ============================================================================================ writing
def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    text = f"{100 * v:.2f}"
    if sd is not None and not math.isnan(sd):
        text += f" ± {100 * sd:.2f}"
    return text


def markdown_table(agg: list[dict], class_names: Sequence[str]) -> str:
    head = ["M", "method", "folds", "Dice mean (%)"] + [f"{c} (%)" for c in class_names] + ["Δ mean vs scratch (pp)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in agg:
        if r["n_folds"] == 0:
            cells = [str(r["budget"]), METHOD_LABELS.get(r["method"], r["method"]), "0"] + ["–"] * (len(head) - 3)
        else:
            if r["method"] == "scratch":
                delta = "(reference)"
            elif r.get("delta_vs_scratch_mean") is None:
                delta = "–"
            else:
                d, sd = r["delta_vs_scratch_mean"], r.get("delta_vs_scratch_sd")
                delta = f"{100 * d:+.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")
            cells = [str(r["budget"]), METHOD_LABELS.get(r["method"], r["method"]), str(r["n_folds"]),
                     _pct(r["dice_mean_mean"], r["dice_mean_sd"])] + \
                    [_pct(r.get(f"dice_{c}_mean"), r.get(f"dice_{c}_sd")) for c in class_names] + [delta]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csvs(rows: list[dict], agg: list[dict], class_names: Sequence[str], report: Path) -> tuple[Path, Path]:
    report.mkdir(parents=True, exist_ok=True)
    runs_csv, summary_csv = report / "fewlabel_runs.csv", report / "fewlabel_summary.csv"
    cols = ["method", "budget", "fold", "index", "n_train", "n_val", "dice_mean"] + \
        [f"dice_{c}" for c in class_names] + ["train_seconds", "summary_file"]
    with open(runs_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["budget"], METHODS.index(r["method"]), r["fold"])):
            w.writerow(r)
    cols = ["budget", "method", "n_folds", "dice_mean_mean", "dice_mean_sd"] + \
        [f"dice_{c}_{x}" for c in class_names for x in ("mean", "sd")] + \
        ["delta_vs_scratch_mean", "delta_vs_scratch_sd", "delta_n_folds"]
    with open(summary_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in agg:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return runs_csv, summary_csv


def plot_dice_vs_budget(agg: list[dict], methods: Sequence[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    budgets = sorted({r["budget"] for r in agg})
    for i, m in enumerate(methods):
        sel = [r for r in agg if r["method"] == m and r["dice_mean_mean"] is not None]
        if not sel:
            continue
        x = np.array([r["budget"] for r in sel], dtype=float) * (1 + 0.015 * (i - (len(methods) - 1) / 2))
        y = np.array([100 * r["dice_mean_mean"] for r in sel])
        e = np.array([100 * (r["dice_mean_sd"] or 0.0) for r in sel])
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"{METHOD_LABELS.get(m, m)}")
    ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("labeled training cases M")
    ax.set_ylabel("validation Dice, foreground mean (%)")
    ax.set_title(title or "Few-label fine-tuning (mean ± sd over folds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _read_volume(path: Path, transpose_forward: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """A NIfTI volume in nnU-Net's (SimpleITK) axis order, then nnU-Net's transpose_forward: axis 0 is
    the axis the 2d configuration slices. nibabel only (the GPU kit has no SimpleITK)."""
    import nibabel

    arr = np.asanyarray(nibabel.load(str(path)).dataobj)
    arr = np.transpose(arr, tuple(range(arr.ndim))[::-1])  # nibabel (x, y, z) -> (z, y, x)
    return np.transpose(arr, tuple(transpose_forward))


def overlay_figure(workdir: Path, ds: dict, plan: dict, rows: list[dict], methods: Sequence[str], budget: int,
                   path: Path, n_cases: int = 3, fold: int = 0) -> Path | None:
    """Image, reference and each method's validation prediction on one slice of ``n_cases`` validation
    cases of ``fold`` at budget M (the slice with the most reference foreground); per-case Dice in the
    titles. Returns ``None`` when no method has predictions for that (M, fold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rec = next((r for r in plan["index"] if r["budget"] == budget and r["fold"] == fold), None)
    if rec is None:
        return None
    ending = ds["dataset_json"].get("file_ending", ".nii.gz")
    have = [m for m in methods if (run_folder(workdir, m, ds["name"], rec["index"]) / "validation" /
                                   f"{rec['val'][0]}{ending}").is_file()]
    if not have:
        return None
    val = rec["val"]
    picks = [val[int(i)] for i in np.unique(np.linspace(0, len(val) - 1, min(n_cases, len(val))).round())]
    per_case = {r["method"]: r["per_case"] for r in rows if r["index"] == rec["index"]}
    tf = ds["plans"].get("transpose_forward", [0, 1, 2])
    n_labels = max(int(v) for v in ds["dataset_json"]["labels"].values() if isinstance(v, (int, float)))
    colours = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33"]
    cmap = ListedColormap([(0, 0, 0, 0)] + [colours[i % len(colours)] for i in range(n_labels)])
    ncol = 2 + len(have)
    fig, axes = plt.subplots(len(picks), ncol, figsize=(2.1 * ncol, 2.2 * len(picks)), dpi=110, squeeze=False)
    for row, case in enumerate(picks):
        image = _read_volume(ds["raw"] / "imagesTr" / f"{case}_0000{ending}", tf).astype(np.float32)
        ref = _read_volume(ds["raw"] / "labelsTr" / f"{case}{ending}", tf).round().astype(np.int16)
        z = int(np.argmax((ref > 0).reshape(ref.shape[0], -1).sum(1)))
        lo, hi = np.percentile(image[z], (1, 99))
        panels = [("image", None), ("reference", ref[z])]
        for m in have:
            pred = _read_volume(run_folder(workdir, m, ds["name"], rec["index"]) / "validation" / f"{case}{ending}", tf)
            d = per_case.get(m, {}).get(f"{case}{ending}")
            label = METHOD_LABELS.get(m, m) + ("" if d is None or math.isnan(d) else f" ({100 * d:.1f})")
            panels.append((label, pred[z].round().astype(np.int16)))
        for col, (title, seg) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            if seg is not None:
                ax.imshow(np.ma.masked_equal(seg, 0), cmap=cmap, vmin=0, vmax=n_labels, alpha=0.55,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if row == 0 or col >= 2 else "", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{case}\nslice {z}", fontsize=7)
    fig.suptitle(f"Validation slices, M={budget}, fold {fold} (case Dice % in brackets)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _caption(s: Settings, ds: dict, plan: dict, run_log: list[dict] | None, agg: list[dict] | None = None) -> str:
    meta = plan["meta"]
    n_val = sorted({len(r["val"]) for r in plan["index"]})
    pre = [m for m in s.methods if m in PRETRAIN_METHODS]
    lines = [
        f"Dataset {ds['name']} ({meta['num_cases']} cases), nnU-Net `{CONFIGURATION}` ({PLANS}); "
        f"validation Dice from nnU-Net's `fold_X/validation/summary.json` (all held-out cases of the fold, "
        f"{'/'.join(map(str, n_val))} per fold), as mean ± sample sd over the folds run; "
        f"'Δ' is the paired difference to scratch on the same folds (percentage points).",
        f"Splits: {meta['n_splits']}-fold partition of all cases (nnU-Net's generate_crossval_split, seed "
        f"{meta['seed']}); {s.folds} fold(s); training sets nested over M = {', '.join(map(str, meta['budgets']))} "
        f"(first M of a seeded order of the fold's training part); identical for every method.",
        f"Fine-tuning: stock `nnUNetv2_train` with `{PRETRAINED_TRAINER}` / `{SCRATCH_TRAINER}`, "
        f"{s.finetune_epochs} epochs x {s.iters} iterations of batch "
        + (f"{s.finetune_batch_size} (MACL_BENCH_BATCH; the plans say "
           f"{ds['plans']['configurations'][CONFIGURATION]['batch_size']})" if s.finetune_batch_size else
           f"{ds['plans']['configurations'][CONFIGURATION]['batch_size']} (the plans')")
        + f", seed {s.seed}, device {s.device}; nnU-Net's default is 1000 x 250 iterations.",
    ]
    if pre:
        lines.append(
            f"Pretraining ({', '.join(METHOD_LABELS[m] for m in pre)}): `macl_pretrain --method <m>`, "
            f"{s.pretrain_epochs} epoch(s), batch {s.pretrain_batch_size}, once per method on the images of all "
            f"{meta['num_cases']} cases, validation cases included, no labels (standard for this protocol: "
            f"pretraining never sees a label).")
    excluded = [f"{METHOD_LABELS.get(r['method'], r['method'])} M={r['budget']} fold {f}"
                for r in (agg or []) for f in r.get("excluded_folds", [])]
    if excluded:
        lines.append("Finished but left out because another method has no result on that fold: "
                     + ", ".join(excluded) + " (in fewlabel_runs.csv).")
    if run_log:
        bad = [r for r in run_log if r["status"] not in ("done", "reused")]
        if bad:
            lines.append("Not in the table (cut or failed): " + "; ".join(
                f"{r['key']} {r['status']}" + (f" ({r['message'][:120]})" if r["message"] else "") for r in bad) + ".")
    return "\n".join(f"- {x}" for x in lines)


def write_report(workdir: str | os.PathLike, ds: dict, s: Settings, plan: dict, run_log: list[dict] | None = None,
                 timings: dict | None = None, started: datetime.datetime | None = None) -> dict:
    """Collect the ``summary.json`` files and write CSVs, markdown, plots and ``fewlabel_result.json``
    into ``workdir/report``. Needs nothing but the summaries (and, for the overlays, the predictions
    and the raw images)."""
    workdir = Path(workdir)
    report = workdir / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    labels = {k: int(v) for k, v in ds["dataset_json"]["labels"].items() if isinstance(v, (int, float))}
    rows = collect_runs(workdir, ds["name"], plan, s.methods, labels)
    seconds = {(r["method"], r["index"]): r["seconds"] for r in (run_log or []) if r["kind"] == "train"}
    for r in rows:
        r["train_seconds"] = seconds.get((r["method"], r["index"]))
    classes = [c for c in _class_names(rows)]
    agg = aggregate(rows, s.methods, s.budgets)
    runs_csv, summary_csv = write_csvs(rows, agg, classes, report)
    plot = plot_dice_vs_budget(agg, s.methods, report / "fewlabel_dice_vs_M.png",
                               f"{ds['name']}: {s.folds} fold(s), {s.finetune_epochs}x{s.iters} it fine-tuning")
    overlays = []
    for b in s.budgets:
        p = overlay_figure(workdir, ds, plan, rows, s.methods, b, report / f"fewlabel_overlay_M{b}.png",
                           n_cases=s.overlay_cases)
        if p is not None:
            overlays.append(str(p))
    table = markdown_table(agg, classes)
    caption = _caption(s, ds, plan, run_log, agg)
    md = report / "fewlabel_table.md"
    md.write_text(f"{table}\n\n{caption}\n")
    result = {
        "settings": s.to_dict(), "dataset": ds["name"], "started": started.isoformat() if started else None,
        "machine": machine_description(s.device), "runs": [{k: v for k, v in r.items() if k != "per_case"}
                                                           for r in rows],
        "summary": agg, "run_log": run_log or [], "timings": dict(timings or {}),
        "table_markdown": table, "caption": caption,
        "paths": {"report": str(report), "runs_csv": str(runs_csv), "summary_csv": str(summary_csv),
                  "table_md": str(md), "plot": str(plot), "overlays": overlays,
                  "splits_final": str(ds["preprocessed"] / "splits_final.json"),
                  "splits_index": str(ds["preprocessed"] / "splits_index.json"),
                  "result_json": str(report / "fewlabel_result.json")},
    }
    _write_json(report / "fewlabel_result.json", result)
    return result


def machine_description(device: str) -> str:
    text = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores"
    if device == "cuda":
        try:
            import torch

            text += f", {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001
            pass
    return text


def _print_summary(result: dict) -> None:
    _say("")
    _say("=" * 90)
    _say(f"results ({result['dataset']}):")
    print(result["table_markdown"], flush=True)
    print(result["caption"], flush=True)
    _say("written:")
    for k, v in result["paths"].items():
        _say(f"  {k:<14}{v}")
    t = result["timings"]
    if t:
        _say("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))


def report_only(workdir: str | os.PathLike) -> dict:
    """Rebuild the report of an earlier (possibly cut) run in ``workdir`` from its files."""
    workdir = Path(workdir).resolve()
    marker = workdir / MARKER
    if not marker.is_file():
        raise BenchmarkError(f"{workdir} holds no few-label benchmark run (no {MARKER})")
    s = Settings.from_dict(json.loads(marker.read_text())["settings"])
    found = sorted((workdir / "nnUNet_preprocessed").glob(f"Dataset{int(s.dataset_id):03d}_*"))
    if not found or not (found[0] / "splits_index.json").is_file():
        raise BenchmarkError(f"{workdir}: the dataset was not prepared (no splits_index.json)")
    ds = dataset_paths(workdir, found[0].name)
    idx = json.loads((ds["preprocessed"] / "splits_index.json").read_text())
    plan = {"splits": json.loads((ds["preprocessed"] / "splits_final.json").read_text()), **idx}
    run_log, timings = None, {}
    if (workdir / RUN_LOG).is_file():
        run_log = json.loads((workdir / RUN_LOG).read_text())
        for r in run_log:  # the runner was stopped while these were pending or running
            if r["status"] in ("pending", "running"):
                r["status"], r["message"] = "cut", f"runner stopped while {r['status']}"
    previous = workdir / REPORT_DIR / "fewlabel_result.json"
    if previous.is_file():
        timings = json.loads(previous.read_text()).get("timings", {})
    result = write_report(workdir, ds, s, plan, run_log=run_log, timings=timings)
    _print_summary(result)
    return result


# ============================================================================================ CLI
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fewlabel_benchmark",
        description="Few-label benchmark: nested label budgets M per fold, nnU-Net fine-tuning from scratch and "
                    "from MACL/PCL/SimCLR pretraining with identical splits, seeds and schedule; writes CSV, a "
                    "markdown table, a Dice-vs-M plot and validation overlays to WORKDIR/report.")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu-smoke",
                   help="cpu-smoke (synthetic, minutes on a CPU), gpu (Task04_Hippocampus, ~10 min on one GPU) or "
                        "cpu-real (Task04_Hippocampus, CPU-sized)")
    p.add_argument("--workdir", default=None, help="everything goes here (default work_dirs/fewlabel_<profile>)")
    p.add_argument("--raw", help="Decathlon dataset folder (gpu, cpu-real), default $MACL_GPU_DATA or "
                                 "../shared/data/Task04_Hippocampus beside the repository")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--budgets", type=_ints, help="label budgets M, e.g. 4,10,20")
    p.add_argument("--folds", type=int, help="folds to run (the first F of the K-fold partition)")
    p.add_argument("--n-splits", type=int, help="K of the K-fold partition (default 5)")
    p.add_argument("--methods", type=_names, help="subset of scratch,macl,pcl,simclr")
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--pretrain-batch-size", type=int)
    p.add_argument("--pretrain-workers", type=int, help="data loading processes of each pretraining")
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--iters", type=int, help="training iterations per fine-tuning epoch")
    p.add_argument("--val-iters", type=int, help="validation iterations per epoch (pseudo Dice only)")
    p.add_argument("--finetune-batch-size", type=int,
                   help="fine-tuning batch size (MACL_BENCH_BATCH); default: the plans' (stock nnU-Net)")
    p.add_argument("--max-val-cases", type=int, help="validate on at most this many held-out cases per fold")
    p.add_argument("--num-cases", type=int, help="synthetic profile: number of cases")
    p.add_argument("--dataset-id", type=int)
    p.add_argument("--jobs", type=int, help="pretrainings/trainings at a time (GPU: several share the device)")
    p.add_argument("--procs", type=int, help="nnU-Net worker processes (augmentation, export) per run")
    p.add_argument("--seed", type=int)
    p.add_argument("--deadline-min", type=float, help="launch no run after this many minutes (cut runs are listed)")
    p.add_argument("--hard-deadline-min", type=float, help="stop runs still going at this many minutes")
    p.add_argument("--overlay-cases", type=int)
    p.add_argument("--resume", action="store_true",
                   help="reuse what an earlier run in --workdir finished and these settings allow: the dataset "
                        "(same data), the pretraining checkpoints (same pretraining settings), the trainings (same "
                        "settings otherwise)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report of the run in --workdir")
    return p


def default_raw() -> str | None:
    """``$MACL_GPU_DATA`` (set by the GPU kit's activate.sh), else ``../shared/data/Task04_Hippocampus``
    beside the repository, if it exists."""
    for cand in (os.environ.get("MACL_GPU_DATA"), Path(__file__).resolve().parents[2] / "shared/data/Task04_Hippocampus"):
        if cand and (Path(cand) / "dataset.json").is_file():
            return str(Path(cand).resolve())
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.raw is None and PROFILES[args.profile]["dataset"] == "msd":
        args.raw = default_raw()
    workdir = args.workdir or f"work_dirs/fewlabel_{args.profile.replace('-', '_')}"
    try:
        if args.report_only:
            report_only(workdir)
            return 0
        s = settings_for(args.profile, raw=os.path.abspath(args.raw) if args.raw else None, device=args.device, budgets=args.budgets, folds=args.folds,
                         n_splits=args.n_splits, methods=args.methods, pretrain_epochs=args.pretrain_epochs,
                         pretrain_batch_size=args.pretrain_batch_size, pretrain_workers=args.pretrain_workers,
                         finetune_epochs=args.finetune_epochs, iters=args.iters, val_iters=args.val_iters,
                         finetune_batch_size=args.finetune_batch_size, procs=args.procs,
                         max_val_cases=args.max_val_cases, num_cases=args.num_cases, dataset_id=args.dataset_id,
                         jobs=args.jobs, seed=args.seed, deadline_min=args.deadline_min,
                         hard_deadline_min=args.hard_deadline_min, overlay_cases=args.overlay_cases)
        result = run_benchmark(workdir, s, resume=args.resume)
    except (BenchmarkError, DemoError) as e:
        print(f"fewlabel_benchmark: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("fewlabel_benchmark: interrupted", file=sys.stderr, flush=True)
        return 130
    failed = [r for r in result["run_log"] if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
