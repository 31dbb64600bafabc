"""The two lines at the top of README.md, run as written on two tiny synthetic datasets.

    macl_pretrain -d 501                                   # self-supervised, no labels
    nnUNetv2_train 502 2d 0 -tr nnUNetTrainerMACL          # fine-tune from those weights

Nothing a user would not have: ``nnUNet_extTrainer`` and ``MACL_PRETRAINED`` are removed from the
environment (the installed startup hook must find the trainer; the default lookup must find 501's
pretraining for 502). Only what a CPU test needs is appended to the README's words: ``--epochs 1
--batch-size 8 --num-workers 0 --device cpu`` to the pretraining, ``-device cpu`` to the training;
``nnUNetTrainerMACL`` runs its real schedule and is stopped once its first epoch has ended.

Plus fast tests of the pieces: the startup hook (keeps a user's entries, appends once, can be switched
off) and the cross-dataset lookup (one fitting pretraining / several / a network that does not fit).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnunetv2_macl.demo.synthetic import make_synthetic_dataset
from nnunetv2_macl.errors import CheckpointNotFoundError
from nnunetv2_macl.run.subprocess_steps import find_executable, run_quiet
from nnunetv2_macl.startup_hook import EXT_TRAINER, SWITCH, TRAINERS_DIR, register_trainers
from nnunetv2_macl.transfer.find_checkpoint import choose_default_checkpoint

README = Path(__file__).parents[1] / "README.md"
SHAPE = (16, 32, 32)  # z, y, x: the smallest volumes nnU-Net plans a 2d U-Net for that MACL can crop
PRETRAIN_TEST_FLAGS = ["--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]
TRAIN_TEST_FLAGS = ["-device", "cpu"]


def readme_first_block() -> list[list[str]]:
    """The commands of README.md's first code block, comments dropped."""
    block = re.search(r"```\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert block, "README.md has no code block"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines()
            if shlex.split(line, comments=True)]


def test_first_block_is_the_mission():
    assert readme_first_block() == [["macl_pretrain", "-d", "501"],
                                    ["nnUNetv2_train", "502", "2d", "0", "-tr", "nnUNetTrainerMACL"]]


# ----------------------------------------------------------------------------------------------- startup hook
def test_register_trainers_keeps_user_entries_appends_once_and_switches_off():
    env = {EXT_TRAINER: "/my/trainers"}
    assert register_trainers(env)
    assert env[EXT_TRAINER] == os.pathsep.join(["/my/trainers", TRAINERS_DIR])
    register_trainers(env)  # a child process runs the hook again: not appended twice
    assert env[EXT_TRAINER].split(os.pathsep) == ["/my/trainers", TRAINERS_DIR]
    fresh = {}
    assert register_trainers(fresh) and fresh[EXT_TRAINER] == TRAINERS_DIR
    for off in ("0", "false", "No", " off "):
        env = {SWITCH: off, EXT_TRAINER: "/my/trainers"}
        assert not register_trainers(env)
        assert env[EXT_TRAINER] == "/my/trainers"
    assert Path(TRAINERS_DIR, "nnUNetTrainerMACL.py").is_file()


def _fresh_python(code: str, **env_changes: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (EXT_TRAINER, SWITCH)}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_installed_hook_runs_at_interpreter_start():
    """The package's .pth is installed (pip install -e . / a wheel) and runs in every new interpreter."""
    code = "import os; print(os.environ.get('nnUNet_extTrainer'))"
    got = _fresh_python(code)
    assert got == TRAINERS_DIR, (
        f"a fresh interpreter has nnUNet_extTrainer={got!r}: the startup hook nnunetv2_macl-trainers.pth is not "
        f"installed in {sys.prefix}; reinstall the package (pip install -e .)")
    assert _fresh_python(code, nnUNet_extTrainer="/mine") == os.pathsep.join(["/mine", TRAINERS_DIR])
    assert _fresh_python(code, MACL_REGISTER_TRAINERS="0") == "None"


# ----------------------------------------------------------------------------------------------- lookup
def _fake_pretraining(results: Path, dataset: str, input_channels: int = 1,
                      arch: str = "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                      folder: str = "MACLPretrainer__nnUNetPlans__2d") -> Path:
    out = results / dataset / folder / "checkpoint_final.pth"
    out.parent.mkdir(parents=True)
    torch.save({"network_weights": {}, "macl": {"input_channels": input_channels,
                                                "network_arch_class_name": arch}}, out)
    return out


def test_lookup_takes_the_one_fitting_pretraining_of_another_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    arch = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    pool = _fake_pretraining(tmp_path, "Dataset501_Pool")
    _fake_pretraining(tmp_path, "Dataset503_TwoChannels", input_channels=2)
    _fake_pretraining(tmp_path, "Dataset504_ResEnc", arch="dynamic_network_architectures.architectures.unet."
                                                           "ResidualEncoderUNet")
    _fake_pretraining(tmp_path, "Dataset505_3d", folder="MACLPretrainer__nnUNetPlans__3d_fullres")
    choice = choose_default_checkpoint("Dataset502_Labelled", "nnUNetPlans", "2d", 1, arch)
    assert choice.path == str(pool)
    assert "Dataset501_Pool" in choice.reason and "no pretraining of Dataset502_Labelled" in choice.reason
    line = choice.summary()
    assert "\n" not in line and str(pool) in line and str(tmp_path / "*") in line

    # nothing fits: the error says where it looked and why each was refused
    with pytest.raises(CheckpointNotFoundError) as ei:
        choose_default_checkpoint("Dataset502_Labelled", "nnUNetPlans", "2d", 3, arch)
    msg = str(ei.value)
    assert "1 input channel(s), this training has 3" in msg and "2 input channel(s), this training has 3" in msg
    assert str(tmp_path / "*") in msg and "macl_pretrain -d Dataset502_Labelled" in msg

    # a second fitting one: an error listing both, nothing chosen
    second = _fake_pretraining(tmp_path, "Dataset506_OtherPool")
    with pytest.raises(CheckpointNotFoundError, match="several") as ei:
        choose_default_checkpoint("Dataset502_Labelled", "nnUNetPlans", "2d", 1, arch)
    assert str(pool) in str(ei.value) and str(second) in str(ei.value)

    # a pretraining of 502 itself wins over the others
    own = _fake_pretraining(tmp_path, "Dataset502_Labelled")
    assert choose_default_checkpoint("Dataset502_Labelled", "nnUNetPlans", "2d", 1, arch).path == str(own)


def test_lookup_does_not_replace_an_unfinished_own_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    _fake_pretraining(tmp_path, "Dataset501_Pool")
    own = tmp_path / "Dataset502_Labelled" / "MACLPretrainer__nnUNetPlans__2d" / "checkpoint_latest.pth"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match="unfinished"):
        choose_default_checkpoint("Dataset502_Labelled", "nnUNetPlans", "2d", 1, None)


# ----------------------------------------------------------------------------------------------- the two lines
def _run_until_first_epoch_ends(cmd: list[str], env: dict, log: Path, timeout: float = 900) -> str:
    """Run ``cmd`` (its whole process group) until nnU-Net logs the end of epoch 0, then stop it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, ended = time.time() + timeout, False
        try:
            while proc.poll() is None and time.time() < deadline:
                if "Epoch time" in log.read_text(encoding="utf-8", errors="replace"):
                    ended = True
                    break
                time.sleep(1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert ended, f"{cmd[0]} did not finish its first epoch (exit {proc.returncode}); log tail:\n{text[-3000:]}"
    return text


@pytest.mark.e2e
def test_readme_first_block_pretrains_501_and_fine_tunes_502_from_it(tmp_path):
    paths = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        p.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (EXT_TRAINER, SWITCH, "MACL_PRETRAINED")}
    env.update({k: str(v) for k, v in paths.items()})
    env.update({"OMP_WAIT_POLICY": "PASSIVE", "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2"})
    make_synthetic_dataset(str(paths["nnUNet_raw"]), 501, "Pool", num_cases=5, shape=SHAPE, seed=1)
    make_synthetic_dataset(str(paths["nnUNet_raw"]), 502, "Labelled", num_cases=5, shape=SHAPE, seed=2)
    logs = tmp_path / "logs"
    for dataset in ("501", "502"):  # each planned on its own, as nnU-Net users do
        run_quiet([find_executable("nnUNetv2_plan_and_preprocess"), "-d", dataset, "-c", "2d", "-np", "2",
                   "-npfp", "2"], env, f"plan {dataset}", logs / f"plan_{dataset}.log", timeout=900)

    pretrain, train = readme_first_block()
    run_quiet([find_executable(pretrain[0]), *pretrain[1:], *PRETRAIN_TEST_FLAGS], env, "README line 1",
              logs / "pretrain.log", timeout=900)
    checkpoint = paths["nnUNet_results"] / "Dataset501_Pool" / "MACLPretrainer__nnUNetPlans__2d" / "checkpoint_final.pth"
    assert checkpoint.is_file()

    log = _run_until_first_epoch_ends([find_executable(train[0]), *train[1:], *TRAIN_TEST_FLAGS], env,
                                      logs / "train.log")
    # one line at the start: which checkpoint, why, where the lookup looked
    chosen = [line for line in log.splitlines() if "MACL: fine-tuning from" in line]
    assert len(chosen) == 1, log[-3000:]
    assert str(checkpoint) in chosen[0] and "from Dataset501_Pool" in chosen[0], chosen[0]
    assert str(paths["nnUNet_results"] / "*") in chosen[0], chosen[0]
    assert f"MACL weight transfer from {checkpoint}" in log, log[-3000:]
    assert "Dataset502_Labelled" in log and "nnUNetTrainerMACL" in log
