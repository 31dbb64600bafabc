"""``macl_demo`` end to end on a tiny setting: synthetic dataset -> nnU-Net planning/preprocessing ->
``macl_pretrain`` -> stock ``nnUNetv2_train`` with ``nnUNetTrainerMACL_demo`` and with
``nnUNetTrainerScratch_demo`` (subprocesses) -> both ``fold_0/validation/summary.json``.

The demo uses its own nnU-Net folders under the work folder (not the session's ``nnunet_env``) and
restores this process's environment when it returns; that is checked too.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from nnunetv2_macl.demo import pipeline
from nnunetv2_macl.demo.pipeline import DemoError, run_demo

# 5 cases: the fewest nnU-Net's 5-fold split accepts (fold 0: 4 training, 1 validation case)
TINY = dict(num_cases=5, shape=(16, 32, 32), pretrain_epochs=1, finetune_epochs=1, train_iters=2, val_iters=1,
            pretrain_batch_size=8)
ENV_NAMES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "MACL_PRETRAINED",
             "MACL_DEMO_EPOCHS", "OMP_WAIT_POLICY")


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("macl_demo") / "work"
    before = {k: os.environ.get(k) for k in ENV_NAMES}
    t0 = time.perf_counter()
    result = run_demo(workdir, device="cpu", step_timeout=900, **TINY)
    seconds = time.perf_counter() - t0
    after = {k: os.environ.get(k) for k in ENV_NAMES}
    print(f"tiny demo: {seconds:.0f} s; Dice MACL {result['dice_macl']:.4f}, scratch {result['dice_scratch']:.4f}; "
          f"steps {json.dumps({k: round(v) for k, v in result['timings'].items()})}")
    return {"workdir": workdir.resolve(), "result": result, "env_before": before, "env_after": after}


def test_demo_end_to_end(tiny_demo):
    result, workdir = tiny_demo["result"], tiny_demo["workdir"]
    paths = result["paths"]

    # both validation summaries exist and the Dice values are numbers in [0, 1]
    for key in ("macl", "scratch"):
        summary = Path(paths[f"{key}_summary"])
        assert summary.is_file(), summary
        assert summary == Path(paths[f"{key}_model_folder"]) / "fold_0" / "validation" / "summary.json"
        dice = result[f"dice_{key}"]
        assert isinstance(dice, float) and 0.0 <= dice <= 1.0, (key, dice)
        assert dice == pytest.approx(json.loads(summary.read_text())["foreground_mean"]["Dice"])
        assert set(result["per_class"][key]) == {"organ_a", "organ_b"}
        for v in result["per_class"][key].values():
            assert v != v or 0.0 <= v <= 1.0  # nan only for a class absent from reference and prediction

    # everything under the work folder, in nnU-Net's layout
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert Path(paths[name]) == workdir / name
    ds = "Dataset990_MACLSynthetic"
    assert Path(paths["macl_model_folder"]) == workdir / "nnUNet_results" / ds / "nnUNetTrainerMACL_demo__nnUNetPlans__2d"
    assert Path(paths["scratch_model_folder"]).name == "nnUNetTrainerScratch_demo__nnUNetPlans__2d"
    assert Path(paths["pretrained_checkpoint"]) == \
        workdir / "nnUNet_results" / ds / "MACLPretrainer__nnUNetPlans__2d" / "checkpoint_final.pth"
    assert Path(paths["pretrained_checkpoint"]).is_file()
    assert len(list((workdir / "nnUNet_raw" / ds / "imagesTr").glob("*.nii.gz"))) == TINY["num_cases"]
    assert json.loads(Path(paths["result_json"]).read_text())["dice_macl"] == result["dice_macl"]

    # same split: fold 0 of nnU-Net's splits_final.json, validated on the same case(s)
    splits = json.loads(Path(paths["splits_file"]).read_text())
    assert len(splits) == 5
    assert result["validation_cases"] == sorted(f"{c}.nii.gz" for c in splits[0]["val"])
    assert len(result["validation_cases"]) == 1

    # the MACL run really loaded the pretrained weights; the scratch run did not; same schedule for both
    macl_log = Path(paths["macl_log"]).read_text()
    scratch_log = Path(paths["scratch_log"]).read_text()
    assert "Using trainer 'nnUNetTrainerMACL_demo'" in macl_log
    assert f"MACL weight transfer from {paths['pretrained_checkpoint']}" in macl_log
    assert "Using trainer 'nnUNetTrainerScratch_demo'" in scratch_log
    assert "MACL weight transfer" not in scratch_log
    schedule = "macl_demo schedule: 1 epochs x 2 training / 1 validation iterations"
    assert schedule in macl_log and schedule in scratch_log
    for folder in (paths["macl_model_folder"], paths["scratch_model_folder"]):
        debug = json.loads((Path(folder) / "fold_0" / "debug.json").read_text())
        assert (int(debug["num_epochs"]), int(debug["num_iterations_per_epoch"]),
                int(debug["num_val_iterations_per_epoch"])) == (1, 2, 1)

    # this process's environment is as it was
    assert tiny_demo["env_after"] == tiny_demo["env_before"]


def test_keep_reuses_the_finished_run(tiny_demo, capsys):
    t0 = time.perf_counter()
    again = run_demo(tiny_demo["workdir"], device="cpu", keep=True, **TINY)
    assert time.perf_counter() - t0 < 60
    first = tiny_demo["result"]
    assert (again["dice_macl"], again["dice_scratch"]) == (first["dice_macl"], first["dice_scratch"])
    out = capsys.readouterr().out
    assert out.count("from the earlier run") == 5, out[-3000:]

    # other settings cannot reuse it (and nothing is deleted)
    with pytest.raises(DemoError, match="other settings"):
        run_demo(tiny_demo["workdir"], device="cpu", keep=True, **{**TINY, "finetune_epochs": 2})
    assert Path(first["paths"]["macl_summary"]).is_file()


def test_refuses_foreign_workdir_and_bad_settings(tmp_path, capsys):
    foreign = tmp_path / "not_a_demo"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(DemoError, match="not created by macl_demo"):
        run_demo(foreign, **TINY)
    assert (foreign / "precious.txt").read_text() == "user data"

    # the command line: message and non-zero exit status
    assert pipeline.main(["--workdir", str(foreign)]) == 1
    assert "macl_demo: error:" in capsys.readouterr().err

    with pytest.raises(DemoError, match="num_cases must be >= 5"):
        run_demo(tmp_path / "w", **{**TINY, "num_cases": 3})
    with pytest.raises(DemoError, match="device"):
        run_demo(tmp_path / "w", device="tpu", **TINY)
    assert not (tmp_path / "w").exists()


def test_failing_or_hanging_step_stops_the_demo(tmp_path):
    import sys

    log = tmp_path / "step.log"
    with pytest.raises(DemoError, match="failed with exit status 3") as e:
        pipeline.stream_command([sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], dict(os.environ),
                         "[x]", log, timeout=60)
    assert "about to fail" in str(e.value) and "about to fail" in log.read_text()
    with pytest.raises(DemoError, match="ran longer than 1 s"):
        pipeline.stream_command([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), "[x]", log,
                         timeout=1)
