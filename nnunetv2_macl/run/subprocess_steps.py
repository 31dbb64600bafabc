"""Run the stock nnU-Net / MACL command-line tools as subprocesses, the way a user would: one
environment for them, live output with a prefix plus a log file, a timeout, and nnU-Net's
validation ``summary.json`` read back. Shared by ``macl_demo`` and ``pretrain/fewlabel_benchmark.py``.
"""
from __future__ import annotations

import contextlib
import json
import math
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


TAIL_LINES = 30  # shown with the error when a step fails
LABEL_WIDTH = 56  # stage labels are padded to this, so that the status column lines up


def _run_logged(cmd: list[str], env: dict, log_file: Path, timeout: float | None, on_line) -> tuple[float, list[str]]:
    """Run ``cmd`` with stdout and stderr into ``log_file``; ``on_line(line)`` sees each output line.

    Returns (wall seconds, last lines); raises :class:`StepError` on a non-zero exit status or a timeout,
    with the log path and its last :data:`TAIL_LINES` lines."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tail: list[str] = []
    with open(log_file, "w", buffering=1, encoding="utf-8", errors="replace") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", bufsize=1)
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
                # tqdm redraws with \r: the last state is the line
                line = line.rstrip().rsplit("\r", 1)[-1]
                tail = (tail + [line])[-TAIL_LINES:]
                on_line(line)
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
        raise StepError(f"`{' '.join(cmd)}` ran longer than {timeout:.0f} s and was stopped; full output in "
                        f"{log_file}. Last lines:\n" + "\n".join(tail))
    if rc != 0:
        raise StepError(f"`{' '.join(cmd)}` failed with exit status {rc} after {secs:.0f} s; full output in "
                        f"{log_file}. Last lines:\n" + "\n".join(tail))
    return secs, tail


def stream_command(cmd: list[str], env: dict, prefix: str, log_file: Path, timeout: float | None,
                   caller: str = "macl_demo") -> float:
    """Run ``cmd``, pass its output through line by line (prefixed) and into ``log_file``; ``caller``
    names the tool in the lines that announce the command.

    Returns the wall time; raises :class:`StepError` on a non-zero exit status or a timeout.
    """
    _say(f"[{caller}] $ {' '.join(cmd)}")
    _say(f"[{caller}]   (output below prefixed with '{prefix}', also in {log_file})")
    last_progress = [-1e9]

    def echo(line: str) -> None:
        if _PROGRESS_BAR.search(line):  # tqdm redraws: one every 15 s is enough on screen
            if time.perf_counter() - last_progress[0] < 15.0:
                return
            last_progress[0] = time.perf_counter()
        if line.strip():
            print(f"{prefix} {line}", flush=True)

    return _run_logged(cmd, env, log_file, timeout, echo)[0]


# ---------------------------------------------------------------------------------------------- quiet stages
_NNUNET_EPOCH = re.compile(r"(?:^|: )Epoch (\d+)\s*$")  # nnUNetTrainer.on_epoch_start, 0-based
_NNUNET_PREDICTING = re.compile(r"predicting (\S+)")  # nnUNetTrainer.perform_actual_validation
_MACL_EPOCH_BAR = re.compile(r"epoch (\d+)/(\d+):\s+(\d+)%")  # macl_pretrain's tqdm bar per epoch
_MACL_EPOCH_DONE = re.compile(r"Epoch (\d+)/(\d+): total")  # MACLPretrainer.on_epoch_end


def nnunet_train_progress(epochs: int, validation_cases: int | None = None):
    """Progress of ``nnUNetv2_train`` from its console lines: "epoch 3/8", then "validation 2/4"."""
    seen: list[str] = []

    def progress(line: str) -> str | None:
        m = _NNUNET_EPOCH.search(line)
        if m:
            return f"epoch {int(m.group(1)) + 1}/{epochs}"
        m = _NNUNET_PREDICTING.search(line)
        if m:
            seen.append(m.group(1))
            return f"validation {len(seen)}" + (f"/{validation_cases}" if validation_cases else "")
        return None

    return progress


def macl_pretrain_progress(line: str) -> str | None:
    """Progress of ``macl_pretrain`` from its console lines: "epoch 1/2 40%", "epoch 1/2 done"."""
    m = _MACL_EPOCH_BAR.search(line)
    if m:
        return f"epoch {m.group(1)}/{m.group(2)} {m.group(3)}%"
    m = _MACL_EPOCH_DONE.search(line)
    if m:
        return f"epoch {m.group(1)}/{m.group(2)} done"
    return None


class StageLine:
    """One console line per stage: "<label> ... <progress> <elapsed>" redrawn in place on a terminal,
    then "<label> ... done in 55 s (<note>)". Not on a terminal (a log, CI), only the finished line."""

    def __init__(self, label: str, stream=None, width: int = LABEL_WIDTH) -> None:
        self.label = label.ljust(width)
        self.stream = stream if stream is not None else sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.progress = ""
        self.t0 = time.perf_counter()
        self._drawn = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "StageLine":
        if self.live:
            self._draw()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            text = f"{self.label} {self.progress:<14} {time.perf_counter() - self.t0:4.0f} s"  # 78 columns
            text = text[:shutil.get_terminal_size().columns - 1]  # a wrapped line cannot be redrawn with \r
            self.stream.write("\r" + text.ljust(self._drawn))
            self.stream.flush()
            self._drawn = len(text)

    def update(self, progress: str | None) -> None:
        if progress:
            self.progress = progress
            if self.live:
                self._draw()

    def finish(self, status: str) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            text = f"{self.label} {status}"
            self.stream.write(("\r" + text.ljust(self._drawn) if self.live else text) + "\n")
            self.stream.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        elapsed = time.perf_counter() - self.t0
        if exc_type is None:
            self.finish(f"done in {elapsed:.0f} s" + (f" ({self.progress})" if self.progress else ""))
        else:
            self.finish(f"FAILED after {elapsed:.0f} s")


def run_quiet(cmd: list[str], env: dict, label: str, log_file: Path, timeout: float | None = None,
              progress=None) -> float:
    """Run ``cmd`` as one stage: all of its output into ``log_file``, one console line (:class:`StageLine`)
    with ``progress(line) -> str | None`` parsed from the output. Returns the wall time; on failure raises
    :class:`StepError` naming the command, the log and its last lines."""
    with StageLine(label) as stage:
        return _run_logged(cmd, env, log_file, timeout,
                           (lambda line: stage.update(progress(line))) if progress else (lambda line: None))[0]


def read_summary(summary_file: str | os.PathLike, labels: dict[str, int] | None = None) -> dict:
    """Dice from nnU-Net's ``validation/summary.json``: foreground mean, per class (by label name when
    ``labels`` is given), the validation cases and each case's mean foreground Dice (``per_case_dice``)."""
    path = Path(summary_file)
    if not path.is_file():
        raise StepError(f"{path} was not written; the training did not finish its validation")
    summary = json.loads(path.read_text())
    try:
        fg = float(summary["foreground_mean"]["Dice"])
        names = {str(v): k for k, v in (labels or {}).items()}
        per_class = {names.get(str(k), str(k)): float(v["Dice"]) for k, v in summary["mean"].items()}
        per_case = {Path(c["reference_file"]).name: _mean_dice(c.get("metrics", {}))
                    for c in summary.get("metric_per_case", [])}
        cases = sorted(per_case)
    except (KeyError, TypeError, ValueError) as e:
        raise StepError(f"{path} does not look like an nnU-Net validation summary ({e!r})") from None
    return {"foreground_mean_dice": fg, "dice_per_class": per_class, "validation_cases": cases,
            "per_case_dice": per_case, "summary_file": str(path)}


def _mean_dice(metrics: dict) -> float:
    """Mean Dice over the foreground classes of one case (nan classes, absent from reference and prediction,
    left out; nan when all are)."""
    values = [float(m["Dice"]) for m in metrics.values() if m.get("Dice") is not None]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")

