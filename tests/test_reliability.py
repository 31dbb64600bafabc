"""User errors of ``macl_pretrain``: one clear line ``macl_pretrain: error: ...`` on stderr, exit code 2,
no traceback, and nothing written (no output folder, no partial file) for errors found before
training; checkpoint problems (unsafe pickle, corrupt, other architecture, channels), non-finite
losses and failed saves leave the previous checkpoint exactly as it was.

``main(argv)`` runs in-process on CPU. The datasets are small copies of ``tiny_dataset`` in nnU-Net's
.npz layout (8 slices per case) with a narrow network (features 8..64), so that the few tests that
train run for seconds.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_macl.run.pretrain import main
from nnunetv2_macl.training.checkpoint import load_checkpoint
from test_pretrain_length import RunStopped

SMALL_FEATURES = [8, 16, 32, 64]
OUT = "MACLPretrainer__nnUNetPlans__2d"


# -- helpers ------------------------------------------------------------------------------------
def make_dataset(env: dict, tiny: dict, dataset_id: int, *, cases: int = 1, slices: int = 8, channels: int = 1,
                 features=SMALL_FEATURES, empty: bool = False) -> dict:
    """A preprocessed dataset (.npz layout) built from the first slices of tiny_dataset's cases with
    tiny_dataset's plans (narrow network); nothing to plan or preprocess."""
    import blosc2

    name = f"Dataset{dataset_id:03d}_Rel{dataset_id}"
    root = Path(env["preprocessed"]) / name
    if root.exists():
        shutil.rmtree(root)
    plans = json.loads(Path(tiny["plans_file"]).read_text())
    plans["dataset_name"] = name
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = list(features)
    data_folder = root / plans["configurations"]["2d"]["data_identifier"]
    data_folder.mkdir(parents=True)
    (root / "nnUNetPlans.json").write_text(json.dumps(plans))
    dataset_json = json.loads((Path(tiny["preprocessed"]) / "dataset.json").read_text())
    dataset_json["channel_names"] = {str(c): "MRI" for c in range(channels)}
    (root / "dataset.json").write_text(json.dumps(dataset_json))
    src = sorted(p for p in Path(tiny["data_folder"]).glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    for i in range(0 if empty else cases):
        arr = np.asarray(blosc2.open(urlpath=str(src[i % len(src)]), mode="r")[:], dtype=np.float32)
        arr = np.concatenate([arr[:, :slices]] * channels, axis=0)
        np.savez(data_folder / f"case_{i:03d}.npz", data=arr)
    results = Path(env["results"]) / name
    if results.exists():
        shutil.rmtree(results)
    return {"id": dataset_id, "name": name, "root": root, "data_folder": data_folder, "output": results / OUT}


def args_for(dataset, *extra: str, epochs: int = 1) -> list[str]:
    return ["-d", str(dataset["id"] if isinstance(dataset, dict) else dataset), "--device", "cpu", "--epochs",
            str(epochs), "--batch-size", "4", "--num-workers", "0", "--decoder-blocks", "1", "--seed", "3", *extra]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (and folder) under ``roots`` with the hash of its content."""
    out = {}
    for root in roots:
        if not Path(root).exists():
            continue
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_error(capsys, argv: list[str], *fragments: str, before_training: bool = True) -> str:
    """Run main(argv); assert exit code 2 and exactly one error line holding ``fragments``; return it."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("macl_pretrain: error: ")]
    assert len(errors) == 1, err[-3000:]
    if before_training:
        assert lines == errors, err[-3000:]  # nothing else on stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def no_tmp_files(folder: Path) -> bool:
    return not [p for p in Path(folder).rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def trained(nnunet_env, tiny_dataset):
    """Epoch 1 of a 3-epoch pretraining of the small dataset (cut there, as a kill would); its
    checkpoint_latest.pth is copied by --c tests, which continue its schedule (a finished run could
    not be continued: its learning rate has reached 0)."""
    from test_pretrain_length import stop_after

    ds = make_dataset(nnunet_env, tiny_dataset, 950)
    with pytest.MonkeyPatch.context() as mp:
        stop_after(mp, 1)
        with pytest.raises(RunStopped):
            main(args_for(ds, "--save-every", "1", epochs=3))
    ds["checkpoint"] = (ds["output"] / "checkpoint_latest.pth").read_bytes()
    assert load_checkpoint(str(ds["output"] / "checkpoint_latest.pth"))["macl"]["epoch"] == 1
    return ds


def place_checkpoint(ds: dict, data: bytes) -> Path:
    ds["output"].mkdir(parents=True, exist_ok=True)
    path = ds["output"] / "checkpoint_latest.pth"
    path.write_bytes(data)
    return path


# -- errors found before training: nothing is written ---------------------------------------------
def test_console_script_prints_one_line_and_exits_2(nnunet_env):
    """The real entry point in its own process: no traceback, one line, exit code 2."""
    before = snapshot(nnunet_env["results"])
    proc = subprocess.run([sys.executable, "-m", "nnunetv2_macl.run.pretrain", *args_for(979)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=dict(os.environ), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("macl_pretrain: error: Unknown dataset '979'")
    assert snapshot(nnunet_env["results"]) == before


@pytest.mark.parametrize("argv,expected", [
    (["--threshold", "abc"], "argument --threshold: invalid float value: 'abc'"),
    (["--lambdas", "1,2"], "argument --lambdas: expected 3 comma-separated numbers"),
])
def test_bad_option_values_one_line(nnunet_env, capsys, argv, expected):
    before = snapshot(nnunet_env["results"])
    with pytest.raises(SystemExit) as exc:
        main([*args_for(979), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("macl_pretrain: error: ") and expected in err, err
    assert snapshot(nnunet_env["results"]) == before


@pytest.mark.parametrize("dataset", ["979", "Dataset979_DoesNotExist"])
def test_unknown_dataset(nnunet_env, capsys, dataset):
    before = snapshot(nnunet_env["results"])
    run_error(capsys, args_for(dataset), f"Unknown dataset '{dataset}'")
    assert snapshot(nnunet_env["results"]) == before


def test_dataset_not_preprocessed_for_configuration(nnunet_env, tiny_dataset, capsys):
    ds = make_dataset(nnunet_env, tiny_dataset, 951)  # plans hold 3d_fullres, only 2d data exists
    assert "3d_fullres" in json.loads((ds["root"] / "nnUNetPlans.json").read_text())["configurations"]
    before = snapshot(nnunet_env["results"], ds["root"])
    run_error(capsys, [*args_for(ds), "-c", "3d_fullres"], "not preprocessed for configuration '3d_fullres'",
              "Run: nnUNetv2_preprocess -d 951 -c 3d_fullres")
    assert snapshot(nnunet_env["results"], ds["root"]) == before
    assert not (Path(nnunet_env["results"]) / ds["name"]).exists()


@pytest.mark.parametrize("option,expected", [
    (["-p", "nnUNetResEncUNetMPlans"], "Unknown plans 'nnUNetResEncUNetMPlans'"),
    (["-c", "2d_bogus"], "Unknown configuration '2d_bogus'"),
])
def test_unknown_plans_or_configuration(nnunet_env, tiny_dataset, capsys, option, expected):
    ds = make_dataset(nnunet_env, tiny_dataset, 951)
    before = snapshot(nnunet_env["results"])
    line = run_error(capsys, [*args_for(ds), *option], expected)
    assert "available" in line
    assert snapshot(nnunet_env["results"]) == before


@pytest.mark.parametrize("variable", ["nnUNet_preprocessed", "nnUNet_results"])
def test_nnunet_environment_variable_unset(nnunet_env, tiny_dataset, capsys, monkeypatch, variable):
    ds = make_dataset(nnunet_env, tiny_dataset, 951)
    before = snapshot(nnunet_env["results"])
    monkeypatch.delenv(variable)
    run_error(capsys, args_for(ds), f"Environment variable {variable} is not set")
    assert snapshot(nnunet_env["results"]) == before


def test_batch_size_below_two(nnunet_env, tiny_dataset, capsys):
    ds = make_dataset(nnunet_env, tiny_dataset, 951)
    before = snapshot(nnunet_env["results"])
    run_error(capsys, [*args_for(ds), "--batch-size", "1"], "--batch-size must be >= 2")
    assert snapshot(nnunet_env["results"]) == before


def test_single_slice_volumes_refused_for_positions_accepted_for_simclr(nnunet_env, tiny_dataset, capsys):
    ds = make_dataset(nnunet_env, tiny_dataset, 952, cases=4, slices=1)
    before = snapshot(nnunet_env["results"])
    run_error(capsys, args_for(ds), "single slice", "positions are undefined", "--method simclr")
    assert snapshot(nnunet_env["results"]) == before
    assert not ds["output"].parent.exists()
    # SimCLR positives (the other view of the same slice) do not need positions: accepted
    assert main([*args_for(ds), "--method", "simclr"]) == 0
    ckpt = load_checkpoint(str(ds["output"] / "checkpoint_final.pth"))
    assert ckpt["macl"]["method"] == "simclr" and ckpt["macl"]["epoch"] == 1


def test_crop_too_small_for_network_stride_and_lambda(nnunet_env, tiny_dataset, capsys):
    ds = make_dataset(nnunet_env, tiny_dataset, 951)
    before = snapshot(nnunet_env["results"])
    # N = 1: lambda = 1/2, total stride 8 -> each axis a multiple of 16, dominant bottleneck > 1 voxel
    run_error(capsys, [*args_for(ds), "--crop-size", "16,16"], "Crop [16, 16] is too small",
              "stride x 1/lambda = [16, 16]")
    assert snapshot(nnunet_env["results"]) == before


@pytest.mark.parametrize("threshold", ["0", "1.5", "-0.1"])
def test_threshold_outside_unit_interval(nnunet_env, tiny_dataset, capsys, threshold):
    ds = make_dataset(nnunet_env, tiny_dataset, 951)
    before = snapshot(nnunet_env["results"])
    run_error(capsys, [*args_for(ds), f"--threshold={threshold}"], "--threshold must be in (0, 1]")
    assert snapshot(nnunet_env["results"]) == before


def test_empty_dataset(nnunet_env, tiny_dataset, capsys):
    ds = make_dataset(nnunet_env, tiny_dataset, 953, empty=True)
    before = snapshot(nnunet_env["results"])
    run_error(capsys, args_for(ds), "Empty dataset", str(ds["data_folder"]))
    assert snapshot(nnunet_env["results"]) == before


def test_output_folder_not_writable(nnunet_env, tiny_dataset, capsys, monkeypatch):
    ds = make_dataset(nnunet_env, tiny_dataset, 951)
    results = str(nnunet_env["results"])
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # chmod is no use as root: the results tree is "read-only"
        if str(path).startswith(results) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    before = snapshot(nnunet_env["results"])
    run_error(capsys, args_for(ds), "Output folder", str(ds["output"]), "not writable")
    assert snapshot(nnunet_env["results"]) == before


def test_output_folder_under_a_regular_file(nnunet_env, tiny_dataset, capsys, monkeypatch, tmp_path):
    ds = make_dataset(nnunet_env, tiny_dataset, 951)
    blocker = tmp_path / "results_is_a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("nnUNet_results", str(blocker / "results"))
    run_error(capsys, args_for(ds), "cannot be created", f"{blocker} exists and is not a folder")
    assert blocker.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [blocker]


def test_existing_checkpoint_without_continue(trained, capsys):
    before = snapshot(trained["output"])
    run_error(capsys, args_for(trained), "already holds a pretraining checkpoint", "use --c")
    assert snapshot(trained["output"]) == before


# -- checkpoints on --c: refused, nothing changed ---------------------------------------------------
class _CreatesMarker:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do (run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_crafted_pickle_checkpoint_is_refused(nnunet_env, tiny_dataset, trained, capsys, tmp_path):
    ds = make_dataset(nnunet_env, tiny_dataset, 954)
    marker = tmp_path / "code_was_executed"
    crafted = {"network_weights": {}, "macl": _CreatesMarker(marker), "optimizer": {}}
    tmp = tmp_path / "crafted.pth"
    torch.save(crafted, tmp)
    path = place_checkpoint(ds, tmp.read_bytes())
    before = snapshot(ds["output"].parent)
    run_error(capsys, [*args_for(ds), "--c"], f"Refusing to load {path}", "could execute code",
              "Only weights_only checkpoints are accepted")
    assert not marker.exists()
    assert snapshot(ds["output"].parent) == before
    # the file really is malicious: an unsafe load runs its code
    torch.load(tmp, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_or_truncated_checkpoint(nnunet_env, tiny_dataset, trained, capsys, damage):
    ds = make_dataset(nnunet_env, tiny_dataset, 955)
    good = trained["checkpoint"]
    data = {"truncated": good[: len(good) // 2], "garbage": bytes(range(256)) * 64, "empty": b""}[damage]
    path = place_checkpoint(ds, data)
    before = snapshot(ds["output"].parent)
    run_error(capsys, [*args_for(ds), "--c"], f"Checkpoint {path} is corrupt or truncated")
    assert snapshot(ds["output"].parent) == before


def test_checkpoint_of_another_architecture(nnunet_env, tiny_dataset, trained, capsys):
    ds = make_dataset(nnunet_env, tiny_dataset, 956, features=[16, 32, 64, 128])
    place_checkpoint(ds, trained["checkpoint"])
    before = snapshot(ds["output"].parent)
    line = run_error(capsys, [*args_for(ds), "--c"], "checkpoint of another architecture",
                     "features_per_stage: checkpoint [8, 16, 32, 64] vs this run [16, 32, 64, 128]",
                     "first mismatched keys: encoder.stages.0.0.convs.0.conv.weight (checkpoint [8, 1, 3, 3] vs "
                     "network [16, 1, 3, 3])")
    assert "and" in line.split("first mismatched keys:")[1]  # the first few keys, then a count
    assert snapshot(ds["output"].parent) == before


def test_input_channel_mismatch_on_resume(nnunet_env, tiny_dataset, trained, capsys):
    ds = make_dataset(nnunet_env, tiny_dataset, 957, channels=2)
    place_checkpoint(ds, trained["checkpoint"])
    before = snapshot(ds["output"].parent)
    run_error(capsys, [*args_for(ds), "--c"], "input-channel mismatch",
              "pretrained on 1 input channel(s), the data of this run has 2", "no rule to adapt")
    assert snapshot(ds["output"].parent) == before


# -- during training: the last good checkpoint survives ------------------------------------------
def test_nan_loss_stops_and_keeps_last_good_checkpoint(nnunet_env, tiny_dataset, trained, capsys, monkeypatch):
    from nnunetv2_macl.losses.multilevel import MultiLevelContrastiveLoss
    from nnunetv2_macl.training.pretrainer import MACLPretrainer

    ds = make_dataset(nnunet_env, tiny_dataset, 958)
    latest = place_checkpoint(ds, trained["checkpoint"])  # epoch 1 done; --c continues with epoch 2
    state = {"poison": False}
    real_epoch_start, real_forward = MACLPretrainer.on_epoch_start, MultiLevelContrastiveLoss.forward

    def on_epoch_start(self):
        state["poison"] = self.current_epoch == 1  # the 2nd epoch: from its first step on, Ld is NaN
        real_epoch_start(self)

    def forward(self, outputs, positions, content=None):
        total, logged = real_forward(self, outputs, positions, content)
        if state["poison"]:
            total = total + float("nan")
            logged = {**logged, "Ld": torch.full_like(logged["Ld"], float("nan"))}
        return total, logged

    monkeypatch.setattr(MACLPretrainer, "on_epoch_start", on_epoch_start)
    monkeypatch.setattr(MultiLevelContrastiveLoss, "forward", forward)
    run_error(capsys, [*args_for(ds, "--save-every", "1", epochs=3), "--c"],
              "Non-finite loss at epoch 2/3, iteration 1/2 (global step 2): Ld = nan",
              f"the last good checkpoint {latest} is kept", before_training=False)
    assert state["poison"] and latest.read_bytes() == trained["checkpoint"]  # byte-identical
    assert load_checkpoint(str(latest))["macl"]["epoch"] == 1
    assert not (ds["output"] / "checkpoint_final.pth").exists()
    assert no_tmp_files(ds["output"])


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_disk_full_during_save_keeps_previous_checkpoint(nnunet_env, tiny_dataset, trained, capsys, monkeypatch,
                                                         failing):
    ds = make_dataset(nnunet_env, tiny_dataset, 959)
    latest = place_checkpoint(ds, trained["checkpoint"])  # epoch 1; --c trains epoch 2, then saves
    state = {"calls": 0}
    real_save, real_replace = torch.save, os.replace

    def disk_full() -> None:
        state["calls"] += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"half a checkpoint")  # a partial temporary file exists when the disk fills up
        disk_full()

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".pth"):
            disk_full()
        return real_replace(src, dst, *args, **kwargs)

    if failing == "torch.save":
        monkeypatch.setattr(torch, "save", save)
    else:
        monkeypatch.setattr(os, "replace", replace)
    run_error(capsys, [*args_for(ds, "--save-every", "1", epochs=3), "--c"],
              f"Could not write checkpoint {latest} (No space left on device)",
              "the previous checkpoint_latest.pth is unchanged", "no partial file", before_training=False)
    assert state["calls"] == 1
    assert latest.read_bytes() == trained["checkpoint"]  # byte-identical
    assert not (ds["output"] / "checkpoint_final.pth").exists()
    assert no_tmp_files(ds["output"]), sorted(p.name for p in ds["output"].iterdir())
