"""Run the few-label protocol: one pretraining per method, one ``nnUNetv2_train`` per (arm, budget, fold).

The folder layout, the tasks, their fingerprints and the run log are in :mod:`~nnunetv2_macl.fewlabel.records`.
With ``resume`` a finished task with the same fingerprint is reused, an unfinished one continues from
its last checkpoint (``--c``), anything else starts over.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from nnunetv2_macl.errors import FewLabelError, StepError
from nnunetv2_macl.fewlabel.pretraining import pretrain_arguments
from nnunetv2_macl.fewlabel.records import (MARKER, OK, RUN_LOG, TASK_FILE, Task, check_validation_cases,
                                            pretrain_cases, pretrain_folder, recorded_fingerprint, results_root, say,
                                            start_checkpoint, train_root,
                                            task_fingerprint, task_folder, task_list, write_run_log)
from nnunetv2_macl.fewlabel.report import write_report
from nnunetv2_macl.fewlabel.settings import Settings, same_data, validate
from nnunetv2_macl.fewlabel.splits import make_splits, write_json, write_splits
from nnunetv2_macl.fewlabel.views import finetune_view, pretrain_view
from nnunetv2_macl.run.subprocess_steps import find_executable, stream_command, subprocess_env


# ============================================================================================ resume
def plan_resume(tasks: list[Task], out: Path, name: str, s: Settings, plan: dict, cases: list[str],
                resume: bool, file_ending: str | None = None) -> None:
    """Mark tasks whose results are there and fit as "reused", those that can continue with ``--c``.

    Split indices are positions (``m_index * n_folds + fold``), so adding a budget or a fold moves a
    training to another ``fold_X``; a run recorded with a task's fingerprint elsewhere is moved to the
    task's folder first (its cases are in the fingerprint, so it is the same training)."""
    if resume:
        relocate_runs([t for t in tasks if t.kind == "train"], out, name, s, plan, cases)
    for t in tasks:
        folder = task_folder(t, out, name, s)
        fp = task_fingerprint(t, s, plan, cases)
        same = resume and recorded_fingerprint(folder) == fp
        finished = (folder / "checkpoint_final.pth").is_file() if t.kind == "pretrain" else \
            (folder / "validation" / "summary.json").is_file()
        if same and finished and (t.kind == "pretrain" or _validation_ok(t, folder, plan, file_ending)):
            t.status = "reused"
        elif same and any((folder / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_final.pth")):
            t.extra["continue"] = True
        t.extra["fingerprint"] = fp


def relocate_runs(tasks: list[Task], out: Path, name: str, s: Settings, plan: dict, cases: list[str]) -> list[str]:
    """Move every recorded training whose fingerprint belongs to another task's folder there (two phases,
    so that runs can swap places); returns the moves made, as "old -> new"."""
    wanted = {json.dumps(task_fingerprint(t, s, plan, cases), sort_keys=True): task_folder(t, out, name, s)
              for t in tasks}
    found: dict[Path, Path] = {}
    for parent in {f.parent for f in wanted.values()}:
        for folder in parent.glob("fold_*") if parent.is_dir() else ():
            fp = recorded_fingerprint(folder)
            target = wanted.get(json.dumps(fp, sort_keys=True)) if fp is not None else None
            if target is not None and target != folder:
                found[folder] = target
    staged = []
    for folder, target in found.items():
        tmp = folder.with_name(folder.name + ".relocating")
        folder.rename(tmp)
        staged.append((tmp, target))
    moves = []
    for tmp, target in staged:
        if target.exists():
            shutil.rmtree(target)  # holds another setting's run (else it would have been staged as well)
        tmp.rename(target)
        moves.append(f"{tmp.name[:-len('.relocating')]} -> {target.name}")
        say(f"--resume: moved the run of {target.parent.name}/{moves[-1]} (split indices changed)")
    return moves


def _validation_ok(task: Task, folder: Path, plan: dict, file_ending: str | None) -> bool:
    try:
        check_validation_cases(task, folder, plan, file_ending)  # the ending: case names may hold dots
        return True
    except StepError:
        return False


# ============================================================================================ running
def processes_per_job(jobs: int) -> int:
    """nnU-Net worker processes of each concurrent run: ``nnUNet_n_proc_DA`` for one job at a time, else
    the cores shared out (one core per job for the training process itself), at most 8."""
    cores = os.cpu_count() or 1
    if jobs == 1:
        return max(1, int(os.environ.get("nnUNet_n_proc_DA") or min(8, cores)))
    return max(1, min(8, (cores - jobs) // jobs))


def execute(task: Task, s: Settings, out: Path, name: str, env0: dict, timeout: float | None, procs: int) -> None:
    from nnunetv2_macl.trainers.benchmark_trainers import (BENCH_BATCH_ENV, BENCH_EPOCHS_ENV, BENCH_ITERS_ENV,
                                                           BENCH_SAVE_EVERY_ENV, BENCH_SEED_ENV, BENCH_VAL_ITERS_ENV)
    from nnunetv2_macl.trainers.schedules import (FREEZE_EPOCHS_ENV, PEAK_LR_ENV, PRETRAINED_LR_FACTOR_ENV,
                                                  WARMUP_EPOCHS_ENV)

    env = dict(env0)
    env["nnUNet_results"] = str(results_root(out, task.method) if task.kind == "pretrain" else train_root(out, task.arm))
    env["nnUNet_def_n_proc"] = env["nnUNet_n_proc_DA"] = str(procs)
    logs = out / "logs"
    folder = task_folder(task, out, name, s)
    cont = bool(task.extra.get("continue"))
    if not cont and folder.is_dir():
        shutil.rmtree(folder)  # another setting or an attempt that cannot continue: start over
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / TASK_FILE, task.extra["fingerprint"])
    if task.kind == "pretrain":
        env["nnUNet_preprocessed"] = str(out / "views" / "pretrain")
        # the same arguments the pretraining fingerprint was resolved from (records.pretrain_fingerprint)
        cmd = [find_executable("macl_pretrain"), *pretrain_arguments(s, task.method)] + (["--c"] if cont else [])
        stream_command(cmd, env, f"[pretrain {task.method}]", logs / f"pretrain_{task.method}.log", timeout,
                       caller="fewlabel")
        if not (folder / "checkpoint_final.pth").is_file():
            raise StepError(f"macl_pretrain --method {task.method} finished without writing {folder}/checkpoint_final.pth")
        return
    env["nnUNet_preprocessed"] = str(out / "views" / "finetune")
    env.update({BENCH_EPOCHS_ENV: str(s.finetune_epochs), BENCH_ITERS_ENV: str(s.iters),
                BENCH_VAL_ITERS_ENV: str(s.val_iters), BENCH_SEED_ENV: str(s.seed),
                BENCH_SAVE_EVERY_ENV: str(s.save_every),
                BENCH_BATCH_ENV: "" if s.finetune_batch_size is None else str(s.finetune_batch_size),
                WARMUP_EPOCHS_ENV: "" if s.warmup_epochs is None else str(s.warmup_epochs),
                PEAK_LR_ENV: "" if s.warmup_peak_lr is None else repr(float(s.warmup_peak_lr)),
                FREEZE_EPOCHS_ENV: "" if s.freeze_epochs is None else str(s.freeze_epochs),
                PRETRAINED_LR_FACTOR_ENV: "" if s.pretrained_lr_factor is None else repr(float(s.pretrained_lr_factor))})
    env.pop("MACL_PRETRAINED", None)
    if task.arm.pretrained:
        start = start_checkpoint(out, task.arm, name, s)
        if not start.is_file():  # a snapshot: the pretraining reused may predate its --keep-epochs
            raise StepError(f"{task.arm.key}: {start} is not there: the pretraining in {start.parent} was made "
                            f"without --keep-epochs {task.arm.snapshot} (which does not change its fingerprint, so "
                            f"--resume reused it); remove that folder for --resume to pretrain again")
        env["MACL_PRETRAINED"] = str(start)
    cmd = [find_executable("nnUNetv2_train"), str(s.dataset_id), s.configuration, str(task.index), "-tr",
           task.arm.trainer, "-p", s.plans, "-device", s.device] + (["--c"] if cont else [])
    tag = f"[{task.arm.key} M={task.budget} f{task.fold}]"
    stream_command(cmd, env, tag, logs / f"train_{task.arm.key}_M{task.budget}_f{task.fold}.log", timeout,
                   caller="fewlabel")
    if not (folder / "validation" / "summary.json").is_file():
        raise StepError(f"nnUNetv2_train finished without writing {folder}/validation/summary.json")


def run_tasks(tasks: list[Task], jobs: int, execute_one, check=None, deadline: float | None = None,
              hard_deadline: float | None = None, on_change=None) -> None:
    """Run ``tasks`` (in list order of priority) ``jobs`` at a time, each once its dependencies are done.

    ``execute_one(task, timeout)`` runs one (raises on failure; ``timeout`` = seconds left before the hard
    deadline, or None); ``check(task)`` validates a finished one. Deadlines are ``time.perf_counter()``
    values: after ``deadline`` nothing is started; a task whose kind took longer (median of the finished
    ones) than is left before ``hard_deadline`` is not started; one that the hard deadline stops is
    "cut". A failure marks the task "failed" and its dependants "skipped"; the others go on.
    ``on_change()`` is called whenever statuses change.
    """
    by_key = {t.key: t for t in tasks}
    running: dict = {}
    on_change = on_change or (lambda: None)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while True:
            for t in tasks:  # a dependency that will never be there: skip
                bad = [d for d in t.deps if by_key[d].status in ("failed", "cut", "skipped")]
                if t.status == "pending" and bad:
                    t.status, t.message = "skipped", f"{bad[0]} {by_key[bad[0]].status}"
            pending = [t for t in tasks if t.status == "pending"]
            if deadline is not None and time.perf_counter() >= deadline:  # --deadline-min 0: start none
                for t in pending:
                    t.status, t.message = "cut", "not started: past the deadline for starting runs"
                pending = []
            while len(running) < jobs:
                ready = [t for t in pending if all(by_key[d].status in OK for d in t.deps)]
                if not ready:
                    break
                t = ready[0]
                pending.remove(t)
                durations = [x.seconds for x in tasks if x.kind == t.kind and x.status == "done"]
                left = None if hard_deadline is None else hard_deadline - time.perf_counter()
                if left is not None and durations and float(np.median(durations)) > left:
                    t.status = "cut"
                    t.message = (f"not started: a {t.kind} takes ~{np.median(durations):.0f} s, only "
                                 f"{max(left, 0):.0f} s were left before the hard deadline")
                    continue
                t.status = "running"
                t.extra["t0"] = time.perf_counter()
                running[pool.submit(execute_one, t, None if left is None else max(1.0, left))] = t
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
                    say(f"{t.key} finished in {t.seconds:.0f} s")
                except Exception as e:  # noqa: BLE001 - one run's failure must not stop the others
                    t.message = f"{type(e).__name__}: " + " ".join(str(e).split())[:2000]
                    if hard_deadline is not None and time.perf_counter() >= hard_deadline - 1.0 and \
                            "ran longer than" in t.message:
                        t.status, t.message = "cut", "stopped at the hard deadline"
                        say(f"{t.key} stopped at the hard deadline after {t.seconds:.0f} s")
                    else:
                        t.status = "failed"
                        say(f"{t.key} FAILED after {t.seconds:.0f} s: {t.message[:500]}")


# ============================================================================================ the protocol
def prepare_out(out: Path, s: Settings, resume: bool) -> None:
    """Refuse a foreign folder; without ``resume`` (or for other data) clear an earlier run."""
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise FewLabelError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise FewLabelError(f"{out} is not empty and was not made by the few-label protocol (no {MARKER}); "
                            f"choose an empty or new folder")
    if marker.is_file():
        previous = Settings.from_dict(json.loads(marker.read_text()).get("settings", {}))
        keep = resume and same_data(previous, s)
        say(f"--resume: reusing what fits in {out}" if keep else
            f"removing the earlier few-label run in {out}" + (" (other data)" if resume else
                                                              " (--resume would reuse what it finished)"))
        if not keep:
            for sub in ("views", "results", "logs", "report", RUN_LOG):
                p = out / sub
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_protocol(out: str | os.PathLike, s: Settings, dataset_name: str, source_preprocessed: str | os.PathLike,
                 raw_dataset: str | os.PathLike | None = None, resume: bool = False, report: bool = True) -> dict:
    """Splits, views, pretrainings and trainings of ``s`` on the preprocessed dataset folder
    ``source_preprocessed`` (never written), then the report. Returns the report's result (or, with
    ``report=False``, ``{"run_log": ..., "plan": ...}``). A failing task is recorded and the others go on."""
    from nnunetv2_macl.run.trainer_path import ext_trainer_value
    from nnunetv2_macl.data.slice_dataset import list_cases

    validate(s)
    if s.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise FewLabelError("--device cuda requested but CUDA is not available; use --device cpu")
    t_start = time.perf_counter()
    out = Path(out).resolve()
    source = Path(source_preprocessed).resolve()
    plans_file = source / f"{s.plans}.json"
    if not plans_file.is_file():
        raise FewLabelError(f"{plans_file} does not exist: plan and preprocess the dataset first "
                            f"(nnUNetv2_plan_and_preprocess -d {s.dataset_id} -c {s.configuration})")
    plans = json.loads(plans_file.read_text())
    if s.configuration not in plans["configurations"]:
        raise FewLabelError(f"configuration {s.configuration!r} is not in {plans_file}")
    data_identifier = plans["configurations"][s.configuration].get("data_identifier",
                                                                   f"{s.plans}_{s.configuration}")
    if not (source / data_identifier).is_dir() or not (source / "gt_segmentations").is_dir():
        raise FewLabelError(f"{source} has no preprocessed {s.configuration} data with labels ({data_identifier}/, "
                            f"gt_segmentations/): run nnUNetv2_preprocess -d {s.dataset_id} -c {s.configuration}")
    prepare_out(out, s, resume)
    _, cases = list_cases(str(source / data_identifier))
    plan = make_splits(cases, s.budgets, s.folds, s.split, s.n_val, s.seed, s.n_splits)
    views = out / "views"
    write_splits(finetune_view(source, views / "finetune"), plan)
    pre_cases = pretrain_cases(s, plan, cases)
    if s.pretrain_methods():
        pretrain_view(source, views / "pretrain", data_identifier, pre_cases)
    # the cases let the report recompute every task's fingerprint from this file alone
    write_json(out / MARKER, {"settings": s.to_dict(), "dataset": dataset_name, "source": str(source),
                              "raw": None if raw_dataset is None else str(Path(raw_dataset).resolve()),
                              "num_cases": len(cases), "pretrain_cases": len(pre_cases), "cases": list(cases)})
    say(f"{len(cases)} cases; {len(plan['splits'])} split entries; validation: {len(plan['index'][0]['val'])} "
        f"cases ({s.split}); pretraining on {len(pre_cases)} cases")

    tasks = task_list(s, plan)
    ending = json.loads((source / "dataset.json").read_text()).get("file_ending")
    plan_resume(tasks, out, dataset_name, s, plan, pre_cases, resume, ending)
    env0 = subprocess_env({"nnUNet_raw": os.environ.get("nnUNet_raw") or str(out / "views" / "_no_raw")},
                          ext_trainer_value(os.environ.get("nnUNet_extTrainer")))
    procs = s.procs or processes_per_job(s.jobs)
    say(f"{sum(t.kind == 'train' for t in tasks)} trainings, {sum(t.kind == 'pretrain' for t in tasks)} "
        f"pretrainings ({sum(t.status == 'reused' for t in tasks)} reused); {s.jobs} at a time on {s.device}")
    run_tasks(tasks, s.jobs, lambda t, timeout: execute(t, s, out, dataset_name, env0, timeout, procs),
              check=lambda t: check_validation_cases(t, task_folder(t, out, dataset_name, s), plan, ending)
              if t.kind == "train" else None,
              deadline=None if s.deadline_min is None else t_start + 60.0 * s.deadline_min,
              hard_deadline=None if s.hard_deadline_min is None else t_start + 60.0 * s.hard_deadline_min,
              on_change=lambda: write_run_log(out, tasks))
    run_log = write_run_log(out, tasks)
    if not report:
        return {"run_log": run_log, "plan": plan}
    return write_report(out, timings={"runs": time.perf_counter() - t_start})
