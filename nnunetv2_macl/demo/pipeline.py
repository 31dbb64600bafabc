"""``macl_demo`` (``make demo``): the whole MACL workflow on the embedded synthetic dataset.

1. point ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` at folders under ``--workdir``
   (the user's own nnU-Net folders are never read or written) and write a small synthetic 3-D dataset in
   nnU-Net raw format (:mod:`nnunetv2_macl.demo.synthetic`);
2. ``nnUNetv2_plan_and_preprocess -d <id> -c 2d``;
3. MACL pretraining with ``macl_pretrain`` (images only);
4. the stock ``nnUNetv2_train <id> 2d 0 -tr nnUNetTrainerMACL_demo`` (fine-tuning from step 3, found
   through ``nnUNet_extTrainer``) and 5. ``nnUNetv2_train <id> 2d 0 -tr nnUNetTrainerScratch_demo``
   (random initialisation), with identical schedules (:mod:`nnunetv2_macl.trainers.demo_trainers`), on
   fold 0 of nnU-Net's default 5-fold split (``splits_final.json``, written by the first run and read by
   the second: the same split);
6. ``demo.png`` (:mod:`nnunetv2_macl.figures`): the pretraining losses with Lg's chance level, and for a few
   validation cases the slice with the most reference foreground: image, reference, MACL and scratch
   prediction; then the Dice table from both ``fold_0/validation/summary.json``.

The console shows one line per stage (:class:`~nnunetv2_macl.run.subprocess_steps.StageLine`: progress
parsed from the tool's output, elapsed time); each tool's full output goes to ``<workdir>/logs/<tool>.log``.
A failing stage stops the demo with its log path and last 30 lines, exit status 1.

The subprocesses get ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it: on CPU, ``nnUNetv2_train`` and
``macl_pretrain`` use one torch (OpenMP) thread per core, and with the default (spinning) wait policy
every small operation becomes a scheduling round when other processes share the cores: measured on
2 busy cores, the sliding-window prediction of one 16x32x32 case took 21-24 s with spinning threads
and 0.9-1.5 s with passive ones (1.2 s with a single thread).
Defaults (:data:`DEFAULTS`): 20 cases of 24 x 48 x 48, 3 pretraining epochs (batch 16), 8 fine-tuning
epochs x 10 iterations (batch 24 as planned) + 3 validation iterations, for both trainings. Measured
with ``time make demo`` from a fresh clone (existing venv) on 2 CPU cores shared with other jobs (load
average 7-12): 7 min 28 s wall (3 min 48 s user + 24 s sys CPU); stages: planning/preprocessing 33 s,
pretraining 146 s (~45 s per epoch), nnUNetv2_train 149 s and 114 s (each ~40 s start-up, ~65 s for the
8 epochs, ~20 s final validation), figure 2 s. On idle cores one pretraining epoch takes ~11 s.

Python API: :func:`run_demo` (returns a dict with both Dice values and the paths).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_macl.run.subprocess_steps import (
    LABEL_WIDTH, StageLine, StepError, find_executable, macl_pretrain_progress, nnunet_train_progress, read_summary,
    run_quiet, subprocess_env, temporary_environ)

DemoError = StepError  # the demo's name for a failed step

MARKER = "macl_demo.json"
DEFAULT_WORKDIR = "demo_output"
DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "MACLSynthetic"
CONFIGURATION = "2d"
PLANS = "nnUNetPlans"
FOLD = 0
MACL_TRAINER = "nnUNetTrainerMACL_demo"
SCRATCH_TRAINER = "nnUNetTrainerScratch_demo"
# read by both demo trainers (nnunetv2_macl/trainers/demo_trainers.py; not imported here, as importing
# the MACL trainer module patches nnU-Net's -pretrained_weights loader in this process)
DEMO_EPOCHS_ENV = "MACL_DEMO_EPOCHS"
DEMO_TRAIN_ITERS_ENV = "MACL_DEMO_TRAIN_ITERS"
DEMO_VAL_ITERS_ENV = "MACL_DEMO_VAL_ITERS"

# Defaults of `make demo` (see the module doc for the measured times). 48 x 48 slices: nnU-Net plans a
# 4-stage 2d U-Net (patch 48 x 48, batch 24) and MACL pretrains on 64 x 64 crops (the smallest that fit
# its divisibility rule); 64 x 64 slices give a 5-stage U-Net and larger pretraining crops. 3 pretraining
# epochs (~11 s each on 2 idle cores, ~45 s at a load average of 10) give demo.png a loss curve and keep
# `make demo` under 8 minutes at that load.
STAGES = 6
FIGURE = "demo.png"
FIGURE_ROWS = 3
DEFAULTS = dict(num_cases=20, shape=(24, 48, 48), pretrain_epochs=3, pretrain_batch_size=16,
                finetune_epochs=8, train_iters=10, val_iters=3)




# ---------------------------------------------------------------------------------------------- helpers
def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _num_processes() -> int:
    return max(1, min(int(os.environ.get("nnUNet_def_n_proc", "0") or 0) or (os.cpu_count() or 1), 8))


def _demo_environ(paths: dict[str, str]) -> dict[str, str]:
    """The variables this process sets while the demo runs (restored afterwards, see :func:`temporary_environ`).

    nnU-Net's process counts default to 8 / a host table: they are capped at this machine's cores
    unless the user set them (nnunetv2 reads ``nnUNet_def_n_proc`` when it is first imported)."""
    cores = str(max(1, min(os.cpu_count() or 1, 8)))
    env = dict(paths)
    for name in ("nnUNet_def_n_proc", "nnUNet_n_proc_DA"):
        env[name] = os.environ.get(name) or cores
    return env


def nnunet_paths(workdir: str | os.PathLike) -> dict[str, str]:
    base = Path(workdir).resolve()
    return {"nnUNet_raw": str(base / "nnUNet_raw"), "nnUNet_preprocessed": str(base / "nnUNet_preprocessed"),
            "nnUNet_results": str(base / "nnUNet_results")}


def _settings(num_cases, shape, pretrain_epochs, pretrain_batch_size, finetune_epochs, train_iters, val_iters,
              device, seed, dataset_id) -> dict:
    return {"num_cases": int(num_cases), "shape": [int(s) for s in shape], "pretrain_epochs": int(pretrain_epochs),
            "pretrain_batch_size": int(pretrain_batch_size), "finetune_epochs": int(finetune_epochs),
            "train_iters": int(train_iters), "val_iters": int(val_iters), "device": str(device), "seed": int(seed),
            "dataset_id": int(dataset_id)}


def _prepare_workdir(workdir: Path, settings: dict, keep: bool) -> dict:
    """Create/clean ``workdir``; return the marker state (``{"settings", "completed"}``).

    The demo only ever deletes what it created: a non-empty folder without the demo's marker file
    is refused. Without ``keep`` an earlier demo run there is removed; with ``keep`` its finished
    steps are reused, provided it was run with the same settings.
    """
    marker = workdir / MARKER
    if workdir.exists() and not workdir.is_dir():
        raise DemoError(f"--workdir {workdir} exists and is not a folder")
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.is_file():
        raise DemoError(f"--workdir {workdir} is not empty and was not created by macl_demo (no {MARKER}); "
                        f"choose an empty or new folder")
    state = {"settings": settings, "completed": []}
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if keep:
            if previous.get("settings") != settings:
                raise DemoError(f"--keep: the earlier demo run in {workdir} used other settings "
                                f"({previous.get('settings')}) than this one ({settings}); run without --keep to "
                                f"start over")
            state["completed"] = list(previous.get("completed", []))
            _say(f"[macl_demo] --keep: reusing the finished steps of the earlier run in {workdir}: "
                 f"{state['completed'] or 'none'}")
        else:
            _say(f"[macl_demo] removing the earlier demo run in {workdir} (use --keep to reuse it)")
            for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "logs", MARKER):
                p = workdir / sub
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    _write_marker(workdir, state)
    return state


def _write_marker(workdir: Path, state: dict) -> None:
    tmp = workdir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, workdir / MARKER)


def _complete(workdir: Path, state: dict, step: str) -> None:
    if step not in state["completed"]:
        state["completed"].append(step)
    _write_marker(workdir, state)


def _fold0_validation_count(num_cases: int) -> int:
    """Validation cases of fold 0 of nnU-Net's 5-fold split (sklearn KFold: the first n % 5 folds get one more)."""
    return num_cases // 5 + (1 if num_cases % 5 else 0)


def pretraining_log(pretrain_folder: str | os.PathLike) -> tuple[dict, float | list[float]]:
    """The per-epoch ``logging`` of a finished pretraining (from ``checkpoint_final.pth``, read with
    ``weights_only=True``) and Lg's chance level: the pretrainer's per-epoch ``Lg_chance`` when it logs
    one, else log(2 x batch size - 1) from the run's ``macl_config.json`` (one process)."""
    from nnunetv2_macl.figures import lg_chance
    from nnunetv2_macl.training.checkpoint import CheckpointError, load_checkpoint

    folder = Path(pretrain_folder)
    try:
        logging = load_checkpoint(str(folder / "checkpoint_final.pth")).get("logging") or {}
    except CheckpointError as e:
        raise DemoError(str(e)) from None
    if not logging.get("epoch"):
        raise DemoError(f"{folder / 'checkpoint_final.pth'} has no per-epoch pretraining log")
    chance = logging.get("Lg_chance")
    if chance:
        return logging, [float(c) for c in chance]
    config_file = folder / "macl_config.json"
    if not config_file.is_file():
        raise DemoError(f"{config_file} is missing: cannot tell the batch size behind Lg's chance level")
    return logging, lg_chance(int(json.loads(config_file.read_text())["batch_size"]))


def write_demo_figure(path: Path, pretrain_folder: Path, raw_dataset: Path, runs: dict, plans: dict,
                      max_rows: int = FIGURE_ROWS) -> Path:
    """``demo.png``: the pretraining losses (with Lg's chance level) above, for up to ``max_rows`` validation
    cases, the slice with the most reference foreground: image, reference, MACL and scratch prediction
    (nnU-Net's validation exports), case Dice in brackets."""
    from nnunetv2_macl.figures import plot_losses_and_panels, slice_row

    logging, chance = pretraining_log(pretrain_folder)
    dataset_json = json.loads((raw_dataset / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    names = {"macl": "MACL", "scratch": "scratch"}
    cases = runs["macl"]["validation_cases"]
    picks = [cases[int(i)] for i in np.unique(np.linspace(0, len(cases) - 1, min(max_rows, len(cases))).round())]
    rows = []
    for file in picks:
        case = file[:-len(ending)]
        predictions = {names[k]: Path(runs[k]["model_folder"]) / f"fold_{FOLD}" / "validation" / file for k in names}
        scores = {names[k]: runs[k]["per_case_dice"].get(file, float("nan")) for k in names}
        rows.append(slice_row(raw_dataset / "imagesTr" / f"{case}_0000{ending}", raw_dataset / "labelsTr" / file,
                              predictions, dataset_json, plans.get("transpose_forward", (0, 1, 2)), caption=case,
                              scores=scores))
    label_names = {int(v): k for k, v in dataset_json["labels"].items() if int(v) > 0}
    return plot_losses_and_panels(
        logging, chance, rows, list(names.values()), path,
        title="MACL demo: pretraining, then fold-0 validation slices (foreground Dice % in brackets)",
        losses_title="MACL pretraining loss per epoch", label_names=label_names)


def run_demo(workdir: str | os.PathLike = DEFAULT_WORKDIR, num_cases: int = DEFAULTS["num_cases"],
             shape: Sequence[int] = DEFAULTS["shape"], pretrain_epochs: int = DEFAULTS["pretrain_epochs"],
             finetune_epochs: int = DEFAULTS["finetune_epochs"], device: str = "cpu",
             train_iters: int = DEFAULTS["train_iters"], val_iters: int = DEFAULTS["val_iters"],
             pretrain_batch_size: int = DEFAULTS["pretrain_batch_size"], keep: bool = False, seed: int = 0,
             dataset_id: int = DEMO_DATASET_ID, step_timeout: float | None = None) -> dict:
    """Run the demo (see module doc) and return what it found.

    Returns a dict with ``dice_macl`` / ``dice_scratch`` (foreground mean Dice of fold 0's validation),
    ``per_class`` (``{"macl": {...}, "scratch": {...}}``), ``validation_cases``, ``timings`` (seconds
    per step), ``settings`` and ``paths`` (workdir, the three nnU-Net folders, raw dataset,
    preprocessed dataset, splits file, pretraining folder and checkpoint, both trainer output folders,
    both summary files, the logs of both trainings). Raises :class:`DemoError` when a step fails.
    ``step_timeout`` (seconds) bounds each ``nnUNetv2_train`` subprocess.
    """
    if device not in ("cpu", "cuda"):
        raise DemoError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if len(tuple(shape)) != 3:
        raise DemoError(f"shape must be 3 numbers (z, y, x), got {shape}")
    if int(num_cases) < 5:
        raise DemoError(f"num_cases must be >= 5 for nnU-Net's 5-fold split, got {num_cases}")
    for name, value in (("pretrain_epochs", pretrain_epochs), ("finetune_epochs", finetune_epochs),
                        ("train_iters", train_iters), ("val_iters", val_iters)):
        if int(value) < 1:
            raise DemoError(f"{name} must be >= 1, got {value}")
    if int(pretrain_batch_size) < 2:
        raise DemoError(f"pretrain_batch_size must be >= 2, got {pretrain_batch_size}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DemoError("--device cuda requested but CUDA is not available; use --device cpu")

    workdir = Path(workdir).resolve()
    settings = _settings(num_cases, shape, pretrain_epochs, pretrain_batch_size, finetune_epochs, train_iters,
                         val_iters, device, seed, dataset_id)
    state = _prepare_workdir(workdir, settings, keep)
    paths = nnunet_paths(workdir)
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    # this process (planning) and, inherited, the subprocesses; restored when the demo returns
    with temporary_environ(_demo_environ(paths)):
        return _run_steps(workdir, settings, state, paths, step_timeout)


def _run_steps(workdir: Path, settings: dict, state: dict, paths: dict[str, str],
               step_timeout: float | None) -> dict:
    t_start = time.perf_counter()
    num_cases, shape, device = settings["num_cases"], tuple(settings["shape"]), settings["device"]
    dataset_id, seed = settings["dataset_id"], settings["seed"]
    pretrain_epochs, pretrain_batch_size = settings["pretrain_epochs"], settings["pretrain_batch_size"]
    finetune_epochs, train_iters, val_iters = settings["finetune_epochs"], settings["train_iters"], settings["val_iters"]
    timings: dict[str, float] = {}
    earlier = list(state["completed"])  # --keep: the steps an earlier run finished, in order

    def reuse(step: str, output: Path, label: str) -> bool:
        """--keep: reuse ``step`` when it and every step before it finished earlier and its output is
        there; once a step runs, all later ones run too (the marker then lists only what is valid)."""
        if earlier and earlier[0] == step and output.exists():
            earlier.pop(0)
            _say(f"{label.ljust(LABEL_WIDTH)} reused from the earlier run")
            return True
        if earlier:
            earlier.clear()
            valid = state["completed"][:state["completed"].index(step)] if step in state["completed"] \
                else state["completed"]
            state["completed"] = list(valid)
            _write_marker(workdir, state)
        return False

    _say(f"[macl_demo] all output under {workdir} (its own nnU-Net folders; yours are not used); "
         f"each stage's full output in {workdir / 'logs'}")

    # imports after the environment is set (nnunetv2 reads nnUNet_def_n_proc when first imported)
    from nnunetv2_macl.demo.synthetic import LABELS, make_synthetic_dataset
    from nnunetv2_macl.run.trainer_path import ext_trainer_value
    from nnunetv2_macl.training.pretrainer import output_folder_name

    dataset_name = f"Dataset{int(dataset_id):03d}_{DEMO_DATASET_NAME}"
    raw_dataset = Path(paths["nnUNet_raw"]) / dataset_name
    preprocessed_dataset = Path(paths["nnUNet_preprocessed"]) / dataset_name
    results_dataset = Path(paths["nnUNet_results"]) / dataset_name
    logs = workdir / "logs"
    env = subprocess_env(paths, ext_trainer_value(os.environ.get("nnUNet_extTrainer")))

    # -- 1. dataset ----------------------------------------------------------------------------
    label = f"[1/{STAGES}] synthetic dataset ({num_cases} cases of {'x'.join(str(int(s)) for s in shape)})"
    t0 = time.perf_counter()
    if not reuse("dataset", raw_dataset / "dataset.json", label):
        with StageLine(label):
            make_synthetic_dataset(paths["nnUNet_raw"], dataset_id=dataset_id, name=DEMO_DATASET_NAME,
                                   num_cases=num_cases, shape=tuple(shape), seed=seed)
        _complete(workdir, state, "dataset")
    timings["dataset"] = time.perf_counter() - t0

    # -- 2. plan and preprocess ------------------------------------------------------------------
    label = f"[2/{STAGES}] nnUNetv2_plan_and_preprocess ({CONFIGURATION})"
    t0 = time.perf_counter()
    plans_file = preprocessed_dataset / f"{PLANS}.json"
    if not reuse("preprocess", plans_file, label):
        n = str(_num_processes())
        run_quiet([find_executable("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", CONFIGURATION,
                   "-np", n, "-npfp", n], env, label, logs / "nnUNetv2_plan_and_preprocess.log", step_timeout)
        _complete(workdir, state, "preprocess")
    if not plans_file.is_file():
        raise DemoError(f"nnU-Net planning did not write {plans_file}")
    timings["plan_and_preprocess"] = time.perf_counter() - t0

    # -- 3. MACL pretraining ---------------------------------------------------------------------
    label = f"[3/{STAGES}] macl_pretrain ({pretrain_epochs} epochs, batch {pretrain_batch_size}, no labels)"
    t0 = time.perf_counter()
    pretrain_folder = Path(paths["nnUNet_results"]) / dataset_name / output_folder_name(PLANS, CONFIGURATION)
    checkpoint = pretrain_folder / "checkpoint_final.pth"
    if not reuse("pretrain", checkpoint, label):
        if pretrain_folder.exists():  # an unfinished earlier run (--keep); macl_pretrain would refuse it
            shutil.rmtree(pretrain_folder)
        run_quiet([find_executable("macl_pretrain"), "-d", str(dataset_id), "-c", CONFIGURATION, "-p", PLANS,
                   "--device", device, "--epochs", str(int(pretrain_epochs)), "--batch-size",
                   str(int(pretrain_batch_size)), "--num-workers", "0", "--seed", str(12345 + int(seed)),
                   "--save-every", str(max(1, int(pretrain_epochs)))],
                  env, label, logs / "macl_pretrain.log", step_timeout, macl_pretrain_progress)
        if not checkpoint.is_file():
            raise DemoError(f"macl_pretrain finished without writing {checkpoint}")
        _complete(workdir, state, "pretrain")
    timings["pretrain"] = time.perf_counter() - t0

    # -- 4./5. fine-tuning and scratch with the stock nnUNetv2_train --------------------------------
    train_bin = find_executable("nnUNetv2_train")
    env["MACL_PRETRAINED"] = str(checkpoint)  # explicit: never a checkpoint from elsewhere
    env[DEMO_EPOCHS_ENV] = str(int(finetune_epochs))
    env[DEMO_TRAIN_ITERS_ENV] = str(int(train_iters))
    env[DEMO_VAL_ITERS_ENV] = str(int(val_iters))
    n_val = _fold0_validation_count(num_cases)
    runs = {}
    for step, (key, trainer, what) in enumerate((("macl", MACL_TRAINER, "MACL fine-tuning"),
                                                 ("scratch", SCRATCH_TRAINER, "from scratch")), start=4):
        label = f"[{step}/{STAGES}] nnUNetv2_train, {what} ({finetune_epochs} epochs)"
        model_folder = results_dataset / f"{trainer}__{PLANS}__{CONFIGURATION}"
        summary_file = model_folder / f"fold_{FOLD}" / "validation" / "summary.json"
        log_file = logs / f"nnUNetv2_train_{trainer}.log"
        t0 = time.perf_counter()
        if not reuse(f"train_{key}", summary_file, label):
            if model_folder.exists():
                shutil.rmtree(model_folder)
            run_quiet([train_bin, str(dataset_id), CONFIGURATION, str(FOLD), "-tr", trainer, "-device", device],
                      env, label, log_file, step_timeout, nnunet_train_progress(int(finetune_epochs), n_val))
            _complete(workdir, state, f"train_{key}")
        timings[f"train_{key}"] = time.perf_counter() - t0
        runs[key] = read_summary(summary_file, LABELS)
        runs[key]["model_folder"] = str(model_folder)
        runs[key]["log_file"] = str(log_file)

    if runs["macl"]["validation_cases"] != runs["scratch"]["validation_cases"]:
        raise DemoError(f"the two trainings were validated on different cases ({runs['macl']['validation_cases']} vs "
                        f"{runs['scratch']['validation_cases']}); both must use fold {FOLD} of splits_final.json")

    # -- 6. the figure ----------------------------------------------------------------------------
    label = f"[6/{STAGES}] figure: pretraining losses and validation slices"
    t0 = time.perf_counter()
    figure = workdir / FIGURE
    with StageLine(label):
        write_demo_figure(figure, pretrain_folder, raw_dataset, runs, json.loads(plans_file.read_text()))
    timings["figure"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    splits_file = preprocessed_dataset / "splits_final.json"
    result = {
        "dice_macl": runs["macl"]["foreground_mean_dice"],
        "dice_scratch": runs["scratch"]["foreground_mean_dice"],
        "per_class": {"macl": runs["macl"]["dice_per_class"], "scratch": runs["scratch"]["dice_per_class"]},
        "validation_cases": runs["macl"]["validation_cases"],
        "timings": timings,
        "settings": settings,
        "paths": {
            "workdir": str(workdir), **paths,
            "raw_dataset": str(raw_dataset), "preprocessed_dataset": str(preprocessed_dataset),
            "plans_file": str(plans_file), "splits_file": str(splits_file),
            "pretrain_folder": str(pretrain_folder), "pretrained_checkpoint": str(checkpoint),
            "macl_model_folder": runs["macl"]["model_folder"],
            "scratch_model_folder": runs["scratch"]["model_folder"],
            "macl_summary": runs["macl"]["summary_file"], "scratch_summary": runs["scratch"]["summary_file"],
            "macl_log": runs["macl"]["log_file"], "scratch_log": runs["scratch"]["log_file"],
            "logs": str(logs), "figure": str(figure),
        },
    }
    (workdir / "demo_result.json").write_text(json.dumps(result, indent=2))
    result["paths"]["result_json"] = str(workdir / "demo_result.json")
    print_report(result)
    return result


def print_report(result: dict) -> None:
    p = result["paths"]
    s = result["settings"]
    n_val = len(result["validation_cases"])
    _say("")
    _say("Dice on the validation cases of fold 0 (nnU-Net's validation/summary.json):")
    classes = list(result["per_class"]["macl"])
    header = f"  {'run':<44}{'foreground mean':>16}" + "".join(f"{c:>12}" for c in classes)
    _say(header)
    _say("  " + "-" * (len(header) - 2))
    for key, label in (("macl", f"MACL-pretrained ({MACL_TRAINER})"), ("scratch", f"scratch ({SCRATCH_TRAINER})")):
        dice = result[f"dice_{key}"]
        _say(f"  {label:<44}{dice:>16.4f}" + "".join(f"{result['per_class'][key][c]:>12.4f}" for c in classes))
    _say("")
    _say(f"  Same split for both: fold 0 of nnU-Net's default 5-fold split, {s['num_cases'] - n_val} training / "
         f"{n_val} validation cases. Same schedule for both: {s['finetune_epochs']} epochs x {s['train_iters']} "
         f"iterations; only the initial weights differ. The MACL pretraining ({s['pretrain_epochs']} epochs) used "
         f"the images of all {s['num_cases']} cases, no labels.")
    _say("  A demo-sized run on synthetic data: the numbers show that the pipeline works end to end, "
         "not how much pretraining helps.")
    _say("")
    rows = [("figure", p["figure"]), ("stage logs", p["logs"]), ("pretrained weights", p["pretrained_checkpoint"]),
            ("MACL fine-tuned model", p["macl_model_folder"]), ("scratch model", p["scratch_model_folder"]),
            ("split (fold 0 used)", p["splits_file"]), ("demo result (json)", p.get("result_json", ""))]
    for name, path in rows:
        _say(f"  {name:<24}{path}")
    t = result["timings"]
    _say("")
    _say("  Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
         + f"; total {t['total']:.0f} s")


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="macl_demo",
        description="End-to-end MACL demo on an embedded synthetic dataset: generate it in nnU-Net raw format, "
                    "plan and preprocess (2d), MACL pretraining, then the stock nnUNetv2_train with the MACL "
                    "trainer and from scratch (same split, same schedule), and print both Dice values. "
                    "Uses its own nnUNet_raw/_preprocessed/_results under --workdir.")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help=f"where everything is written (default ./{DEFAULT_WORKDIR}); an earlier demo run there is "
                        f"replaced; a non-empty folder not made by macl_demo is refused")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("--keep", action="store_true",
                   help="keep an earlier demo run in --workdir and reuse its finished steps (same settings only) "
                        "instead of starting over")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args.workdir, device=args.device, keep=args.keep)
    except DemoError as e:
        print(f"\nmacl_demo: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nmacl_demo: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
