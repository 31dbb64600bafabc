"""Run the stock nnU-Net / MACL command-line tools as subprocesses, the way a user would: one
environment for them, live output with a prefix plus a log file, a timeout, and nnU-Net's
validation ``summary.json`` read back. Shared by ``macl_demo`` and ``pretrain/fewlabel_benchmark.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from nnunetv2_macl.errors import StepError


def _say(msg: str = "") -> None:
    print(msg, flush=True)


_PROGRESS_BAR = re.compile(r"\d+/\d+ \[[0-9:<?]+")


@contextlib.contextmanager
def temporary_environ(values: dict[str, str]):
    """Set environment variables for the duration of the demo and restore the previous values, so that
    :func:`run_demo` called from other code (e.g. a test session) leaves its environment as it was."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def subprocess_env(paths: dict[str, str], ext_trainer: str) -> dict[str, str]:
    """Environment of the ``macl_pretrain`` / ``nnUNetv2_train`` subprocesses."""
    env = dict(os.environ)
    env.update(paths)
    env["nnUNet_extTrainer"] = ext_trainer
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see module doc
    env["PYTHONUNBUFFERED"] = "1"  # stream the output as it comes
    return env


def find_executable(name: str) -> str:
    """The console script of this environment (next to the running interpreter), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise StepError(f"`{name}` was not found next to {sys.executable} nor on PATH; is nnunetv2 installed in "
                        f"this environment?")
    return found


def stream_command(cmd: list[str], env: dict, prefix: str, log_file: Path, timeout: float | None) -> float:
    """Run ``cmd``, pass its output through line by line (prefixed) and into ``log_file``.

    Returns the wall time; raises :class:`StepError` on a non-zero exit status or a timeout.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _say(f"[macl_demo] $ {' '.join(cmd)}")
    _say(f"[macl_demo]   (output below prefixed with '{prefix}', also in {log_file})")
    t0 = time.perf_counter()
    last_progress = -1e9
    tail: list[str] = []
    with open(log_file, "w", buffering=1) as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
        timed_out = threading.Event()

        def _kill_on_timeout() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout, _kill_on_timeout) if timeout is not None else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                line = line.rstrip()
                tail = (tail + [line])[-40:]
                if _PROGRESS_BAR.search(line):  # tqdm redraws: one every 15 s is enough on screen
                    if time.perf_counter() - last_progress < 15.0:
                        continue
                    last_progress = time.perf_counter()
                if line.strip():
                    print(f"{prefix} {line}", flush=True)
            rc = proc.wait()
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
    secs = time.perf_counter() - t0
    if timed_out.is_set():
        raise StepError(f"`{' '.join(cmd)}` ran longer than {timeout:.0f} s and was stopped; see {log_file}")
    if rc != 0:
        last = "\n".join(tail[-15:])
        raise StepError(f"`{' '.join(cmd)}` failed with exit status {rc} after {secs:.0f} s; full output in "
                        f"{log_file}. Last lines:\n{last}")
    return secs


def read_summary(summary_file: str | os.PathLike, labels: dict[str, int] | None = None) -> dict:
    """Dice from nnU-Net's ``validation/summary.json``: foreground mean, per class (by label name when
    ``labels`` is given) and the validation cases."""
    path = Path(summary_file)
    if not path.is_file():
        raise StepError(f"{path} was not written; the training did not finish its validation")
    summary = json.loads(path.read_text())
    try:
        fg = float(summary["foreground_mean"]["Dice"])
        names = {str(v): k for k, v in (labels or {}).items()}
        per_class = {names.get(str(k), str(k)): float(v["Dice"]) for k, v in summary["mean"].items()}
        cases = sorted(Path(c["reference_file"]).name for c in summary.get("metric_per_case", []))
    except (KeyError, TypeError, ValueError) as e:
        raise StepError(f"{path} does not look like an nnU-Net validation summary ({e!r})") from None
    return {"foreground_mean_dice": fg, "dice_per_class": per_class, "validation_cases": cases,
            "summary_file": str(path)}


# ---------------------------------------------------------------------------------------------- the demo
