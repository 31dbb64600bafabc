"""What a few-label run consists of and where its records lie, shared by ``runner`` and ``report``.

Layout of the output folder ``out`` (``macl_fewlabel``: ``$nnUNet_results/DatasetXXX/macl_fewlabel``)::

    fewlabel.json             settings, dataset and its cases (the marker: --resume reuses only such a folder)
    views/finetune/<name>/    the dataset seen by the fine-tunings, with the protocol's splits_final.json
    views/pretrain/<name>/    the dataset seen by the pretrainings (validation cases left out by default)
    results/<method>/         nnUNet_results of each method: pretraining and trainings
    logs/                     the output of every subprocess
    fewlabel_run_log.json     status of every task (rewritten as they finish)
    report/                   tables, CSV and plots (``report.write_report``)

Every task writes its fingerprint (``fewlabel_task.json``: the package version, the settings that shape
it, its cases) into its folder first. The runner reuses a finished task only with the same fingerprint;
the report shows a run only if its fingerprint is the one the workdir's settings give now.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import nnunetv2_macl
from nnunetv2_macl.errors import StepError
from nnunetv2_macl.fewlabel.pretraining import config_fingerprint
from nnunetv2_macl.fewlabel.settings import Arm, Settings
from nnunetv2_macl.fewlabel.splits import validation_union, write_json
from nnunetv2_macl.run.subprocess_steps import read_summary

MARKER = "fewlabel.json"
RUN_LOG = "fewlabel_run_log.json"
TASK_FILE = "fewlabel_task.json"
OK = ("done", "reused")


def say(msg: str = "") -> None:
    print(f"[fewlabel] {msg}" if msg else "", flush=True)


# ============================================================================================ layout
def results_root(out: Path, method: str) -> Path:
    return Path(out) / "results" / method


def train_root(out: Path, arm: Arm) -> Path:
    """``nnUNet_results`` of ``arm``'s trainings: its method's, or a folder of its own for a start from a
    pretraining snapshot (the same trainer as the final start's, so nnU-Net's folders would collide)."""
    root = results_root(out, arm.method)
    return root if arm.snapshot is None else root / f"snapshot_epoch_{arm.snapshot}"


def run_folder(out: Path, arm: Arm, dataset_name: str, index: int, s: Settings) -> Path:
    return (train_root(out, arm) / dataset_name / f"{arm.trainer}__{s.plans}__{s.configuration}"
            / f"fold_{int(index)}")


def pretrain_folder(out: Path, method: str, dataset_name: str, s: Settings) -> Path:
    from nnunetv2_macl.training.pretrainer import output_folder_name

    return results_root(out, method) / dataset_name / output_folder_name(s.plans, s.configuration)


def start_checkpoint(out: Path, arm: Arm, dataset_name: str, s: Settings) -> Path:
    """The pretraining checkpoint ``arm``'s trainings start from: the final one, or the kept snapshot."""
    from nnunetv2_macl.training.pretrainer import kept_checkpoint_name

    name = "checkpoint_final.pth" if arm.snapshot is None else kept_checkpoint_name(arm.snapshot)
    return pretrain_folder(out, arm.method, dataset_name, s) / name


# ============================================================================================ tasks
@dataclass
class Task:
    key: str
    kind: str                      # "pretrain" | "train"
    method: str
    arm: Arm | None = None
    budget: int | None = None
    fold: int | None = None
    index: int | None = None
    deps: tuple[str, ...] = ()
    status: str = "pending"        # pending | running | done | reused | failed | cut | skipped
    seconds: float | None = None
    message: str = ""
    extra: dict = field(default_factory=dict)


def task_list(s: Settings, plan: dict) -> list[Task]:
    """Pretrainings first, then the trainings fold by fold, budget by budget, arm by arm."""
    tasks = [Task(key=f"pretrain:{m}", kind="pretrain", method=m) for m in s.pretrain_methods()]
    by = {(r["budget"], r["fold"]): r["index"] for r in plan["index"]}
    for f in range(s.folds):
        for budget in s.budgets:
            for arm in s.arms():
                tasks.append(Task(key=f"train:{arm.key}:M{budget}:f{f}", kind="train", method=arm.method, arm=arm,
                                  budget=budget, fold=f, index=by[(budget, f)],
                                  deps=(f"pretrain:{arm.method}",) if arm.pretrained else ()))
    return tasks


def task_folder(task: Task, out: Path, name: str, s: Settings) -> Path:
    if task.kind == "pretrain":
        return pretrain_folder(out, task.method, name, s)
    return run_folder(out, task.arm, name, task.index, s)


def pretrain_cases(s: Settings, plan: dict, all_cases: list[str]) -> list[str]:
    held = set() if s.pretrain_on_all else set(validation_union(plan))
    return [c for c in all_cases if c not in held]


# ============================================================================================ fingerprints
def pretrain_fingerprint(s: Settings, method: str, cases: list[str] | None) -> dict:
    """Package version, data and the full resolved ``macl_pretrain`` configuration (``pretraining``)."""
    return {"version": nnunetv2_macl.__version__, "configuration": s.configuration, "plans": s.plans,
            "cases": None if cases is None else sorted(cases), "config": config_fingerprint(s, method)}


def task_fingerprint(task: Task, s: Settings, plan: dict, cases: list[str] | None) -> dict:
    """What shapes ``task``'s result, as JSON gives it back (``cases``: the pretraining's cases)."""
    if task.kind == "pretrain":
        return _as_json(pretrain_fingerprint(s, task.method, cases))
    entry = plan["splits"][task.index]
    warm = task.arm.recipe in ("warmup", "protect")  # the knobs shape their recipe's runs only: the stock runs stay
    protect = task.arm.recipe == "protect"
    return _as_json({
        "version": nnunetv2_macl.__version__, "trainer": task.arm.trainer, "epochs": s.finetune_epochs,
        "iters": s.iters, "val_iters": s.val_iters, "batch_size": s.finetune_batch_size, "seed": s.seed,
        "warmup_epochs": s.warmup_epochs if warm else None, "warmup_peak_lr": s.warmup_peak_lr if warm else None,
        "train": entry["train"], "val": entry["val"],
        "pretraining": pretrain_fingerprint(s, task.method, cases) if task.arm.pretrained else None,
        # only when set: the fingerprints of the trainings from a final checkpoint stay what they were
        **({"snapshot_epoch": task.arm.snapshot} if task.arm.snapshot is not None else {}),
        **({"freeze_epochs": s.freeze_epochs, "pretrained_lr_factor": s.pretrained_lr_factor} if protect else {})})


def _as_json(data: dict) -> dict:
    """Tuples as lists etc., so that a fingerprint compares equal to its recorded copy."""
    return json.loads(json.dumps(data, default=str))


def recorded_fingerprint(folder: Path) -> dict | None:
    f = Path(folder) / TASK_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def fingerprint_diff(expected: dict, recorded: dict) -> list[str]:
    """The dotted keys (``pretraining.config.lr``) whose values differ, in ``expected``'s order, then the
    keys only ``recorded`` has."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    want, got = flat(expected), flat(recorded)
    missing = object()
    keys = list(want) + [k for k in got if k not in want]
    return [k for k in keys if want.get(k, missing) != got.get(k, missing)]


# ============================================================================================ checks
def check_validation_cases(task: Task, folder: Path, plan: dict, file_ending: str | None) -> None:
    """nnU-Net silently falls back to a random split for a fold index it does not find: refuse that."""
    summary = folder / "validation" / "summary.json"
    got = sorted(read_summary(summary)["validation_cases"])
    want = sorted(plan["splits"][task.index]["val"])
    stems = sorted(c[: -len(file_ending)] if file_ending and c.endswith(file_ending) else c.split(".", 1)[0]
                   for c in got)
    if stems != want:
        raise StepError(f"validated on other cases than split {task.index} of splits_final.json ({len(got)} vs "
                        f"{len(want)} cases; nnU-Net falls back to a random split for a fold it does not find): "
                        f"{summary}")


# ============================================================================================ run log
def write_run_log(out: Path, tasks: list[Task]) -> list[dict]:
    """The state of every task, rewritten as tasks finish, so that a report can say what was cut or
    failed even when the runner itself was stopped (``runner``: host and pid of the writing process)."""
    runner = f"{socket.gethostname()}:{os.getpid()}"
    log = [{"key": t.key, "kind": t.kind, "method": t.method, "arm": t.arm.key if t.arm else None,
            "budget": t.budget, "fold": t.fold, "index": t.index, "status": t.status,
            "seconds": None if t.seconds is None else round(t.seconds, 1), "message": t.message,
            "runner": runner} for t in tasks]
    write_json(Path(out) / RUN_LOG, log)
    return log


def runner_alive(runner: str | None) -> bool:
    """Whether the process that wrote a run log entry (``host:pid``) is still running on this host."""
    host, _, pid = str(runner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def read_run_log(out: Path) -> list[dict]:
    """The run log. Tasks pending or running are reported as "cut" when their runner has stopped, and
    keep their status (with the runner's pid) while it is still going, e.g. for ``--report-only``
    during a long measurement."""
    f = Path(out) / RUN_LOG
    if not f.is_file():
        return []
    log = json.loads(f.read_text())
    for r in log:
        if r["status"] in ("pending", "running"):
            if runner_alive(r.get("runner")):
                r["message"] = f"the runner (pid {str(r['runner']).rpartition(':')[2]}) is still going"
            else:
                r["status"], r["message"] = "cut", f"runner stopped while {r['status']}"
    return log
