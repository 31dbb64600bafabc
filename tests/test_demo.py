"""``macl_demo`` end to end on a tiny setting: synthetic dataset -> nnU-Net planning/preprocessing ->
``macl_pretrain`` -> stock ``nnUNetv2_train`` with ``nnUNetTrainerMACL_demo`` and with
``nnUNetTrainerScratch_demo`` (subprocesses) -> both ``fold_0/validation/summary.json``.

The demo uses its own nnU-Net folders under the work folder (not the session's ``nnunet_env``) and
restores this process's environment when it returns; that is checked too.
"""
from __future__ import annotations

import contextlib
import io
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
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        result = run_demo(workdir, device="cpu", step_timeout=900, **TINY)
    seconds = time.perf_counter() - t0
    after = {k: os.environ.get(k) for k in ENV_NAMES}
    print(f"tiny demo: {seconds:.0f} s; Dice MACL {result['dice_macl']:.4f}, scratch {result['dice_scratch']:.4f}; "
          f"steps {json.dumps({k: round(v) for k, v in result['timings'].items()})}")
    return {"workdir": workdir.resolve(), "result": result, "env_before": before, "env_after": after,
            "console": console.getvalue()}


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
    macl_log = Path(paths["macl_log"]).read_text(encoding="utf-8")
    scratch_log = Path(paths["scratch_log"]).read_text(encoding="utf-8")
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


def test_quiet_console_logs_and_figure(tiny_demo):
    """One console line per stage and the closing table; each tool's output in its log; demo.png."""
    console, paths = tiny_demo["console"], tiny_demo["result"]["paths"]
    lines = console.splitlines()
    for stage in range(1, pipeline.STAGES + 1):
        hits = [ln for ln in lines if ln.startswith(f"[{stage}/{pipeline.STAGES}] ")]
        assert len(hits) == 1 and " done in " in hits[0], (stage, console)
    assert len(lines) < 40, console  # no tool output on the console
    assert "Epoch" not in console and "nnUNetPlans_2d" not in console  # nnU-Net's own chatter is in the logs
    logs = Path(paths["logs"])
    assert sorted(p.name for p in logs.iterdir()) == sorted([
        "nnUNetv2_plan_and_preprocess.log", "macl_pretrain.log", "nnUNetv2_train_nnUNetTrainerMACL_demo.log",
        "nnUNetv2_train_nnUNetTrainerScratch_demo.log"])
    assert "Epoch 0" in Path(paths["macl_log"]).read_text(encoding="utf-8")
    assert str(logs) in console
    # the figure: written, its path printed, large enough to hold the loss panel and one row of four slices
    figure = Path(paths["figure"])
    assert figure == tiny_demo["workdir"] / "demo.png" and str(figure) in console
    import matplotlib.image as mpimg

    height, width = mpimg.imread(str(figure)).shape[:2]
    assert height > 400 and width > 500


def test_lg_chance_from_the_pretraining_run(tiny_demo):
    """Without the pretrainer's per-epoch "Lg_chance", the chance level comes from macl_config.json."""
    import math

    logging, chance = pipeline.pretraining_log(Path(tiny_demo["result"]["paths"]["pretrain_folder"]))
    assert len(logging["epoch"]) == TINY["pretrain_epochs"] and len(logging["Lg"]) == TINY["pretrain_epochs"]
    if "Lg_chance" in logging:
        assert chance == [float(c) for c in logging["Lg_chance"]]
    else:
        assert chance == pytest.approx(math.log(2 * TINY["pretrain_batch_size"] - 1))


def test_keep_reuses_the_finished_run(tiny_demo, capsys):
    t0 = time.perf_counter()
    again = run_demo(tiny_demo["workdir"], device="cpu", keep=True, **TINY)
    assert time.perf_counter() - t0 < 60
    first = tiny_demo["result"]
    assert (again["dice_macl"], again["dice_scratch"]) == (first["dice_macl"], first["dice_scratch"])
    out = capsys.readouterr().out
    assert out.count("reused from the earlier run") == 5, out[-3000:]
    assert Path(again["paths"]["figure"]).is_file()

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


def test_failing_or_hanging_step_stops_the_demo(tmp_path, capsys):
    import sys

    log = tmp_path / "step.log"
    script = "for i in range(50): print('line', i)\nraise SystemExit(3)"
    with pytest.raises(DemoError, match="failed with exit status 3") as e:
        pipeline.run_quiet([sys.executable, "-c", script], dict(os.environ), "[x/6] failing stage", log, timeout=60)
    message = str(e.value)
    assert str(log) in message
    # the last 30 lines of the output, not more
    assert "line 49" in message and "line 20" in message and "line 19" not in message
    assert "line 0" in log.read_text(encoding="utf-8")
    out = capsys.readouterr().out
    assert "[x/6] failing stage" in out and "FAILED after" in out, out
    with pytest.raises(DemoError, match="ran longer than 1 s"):
        pipeline.run_quiet([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), "[x]", log,
                           timeout=1)


def test_stage_progress_parsers():
    from nnunetv2_macl.run.subprocess_steps import macl_pretrain_progress, nnunet_train_progress

    train = nnunet_train_progress(8, 4)
    assert train("2026-11-28 02:58:58.903375: Epoch 0") == "epoch 1/8"
    assert train("2026-11-28 02:58:58.903535: Current learning rate: 0.01") is None
    assert train("2026-11-28 02:58:42.474178: predicting synth_013") == "validation 1/4"
    assert train("2026-11-28 02:58:44.474178: predicting synth_016") == "validation 2/4"
    assert macl_pretrain_progress("epoch 2/5:  40%|####      | 12/30 [00:04<00:06, loss=4.1]") == "epoch 2/5 40%"
    assert macl_pretrain_progress("2026-11-28 03:00:00.000000: Epoch 2/5: total 4.1 | Lg 3.2") == "epoch 2/5 done"


def test_stage_line_on_a_terminal_and_in_a_log():
    from nnunetv2_macl.run.subprocess_steps import StageLine

    class Tty(io.StringIO):
        def isatty(self):
            return True

    log = io.StringIO()
    with StageLine("[1/2] stage", stream=log) as stage:
        stage.update("epoch 1/2")
    assert log.getvalue().count("\n") == 1 and "[1/2] stage" in log.getvalue() and "done in" in log.getvalue()
    assert "\r" not in log.getvalue()
    tty = Tty()
    with pytest.raises(KeyError):
        with StageLine("[2/2] stage", stream=tty) as stage:
            stage.update("epoch 2/2")
            raise KeyError("boom")
    text = tty.getvalue()
    assert "\r" in text and "epoch 2/2" in text and text.rstrip().endswith(text.rstrip().split("\r")[-1])
    assert "FAILED after" in text.split("\r")[-1] and text.endswith("\n")


def _dice_by_hand(prediction, reference, label: int) -> float:
    """2 TP / (2 TP + FP + FN) of one label; nan when it is in neither (nnU-Net's rule)."""
    p, r = prediction == label, reference == label
    tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def test_reported_dice_is_recomputed_from_the_exported_segmentations(tiny_demo):
    """The Dice the demo reports (result, demo_result.json, the closing table) is that of the segmentations the
    fine-tuned networks exported, recomputed here against the raw labels; each run reports its own."""
    import math

    import numpy as np
    import SimpleITK as sitk

    from nnunetv2_macl.demo.synthetic import LABELS

    result, paths = tiny_demo["result"], tiny_demo["result"]["paths"]
    raw = Path(paths["raw_dataset"])
    saved = json.loads(Path(paths["result_json"]).read_text())
    names = {name: value for name, value in LABELS.items() if value > 0}
    assert set(names) == {"organ_a", "organ_b"}
    by_hand = {}
    for key in ("macl", "scratch"):
        per_class = {name: [] for name in names}
        for case in result["validation_cases"]:
            pred_img = sitk.ReadImage(str(Path(paths[f"{key}_model_folder"]) / "fold_0" / "validation" / case))
            ref_img = sitk.ReadImage(str(raw / "labelsTr" / case))
            pred, ref = sitk.GetArrayFromImage(pred_img), sitk.GetArrayFromImage(ref_img)
            assert pred.shape == ref.shape == tuple(TINY["shape"]), (key, case)
            assert pred_img.GetSpacing() == pytest.approx(ref_img.GetSpacing())
            assert set(np.unique(pred).tolist()) <= set(LABELS.values()), (key, case)
            assert all((ref == v).any() for v in names.values())  # every organ in every reference
            for name, value in names.items():
                per_class[name].append(_dice_by_hand(pred, ref, value))
        classes = {name: float(np.nanmean(v)) for name, v in per_class.items()}
        by_hand[key] = (float(np.mean(list(classes.values()))), classes)
        fg, classes = by_hand[key]
        assert math.isfinite(fg)
        assert result[f"dice_{key}"] == pytest.approx(fg, abs=1e-9), key
        assert saved[f"dice_{key}"] == pytest.approx(fg, abs=1e-9), key
        for name in names:
            assert result["per_class"][key][name] == pytest.approx(classes[name], abs=1e-9), (key, name)
            assert saved["per_class"][key][name] == pytest.approx(classes[name], abs=1e-9), (key, name)

    # the closing table prints each run's own numbers in its own row: foreground mean, organ_a, organ_b
    lines = tiny_demo["console"].splitlines()
    header = next(ln for ln in lines if "foreground mean" in ln)
    assert header.split()[-2:] == ["organ_a", "organ_b"]
    for key, row_name in (("macl", "MACL-pretrained (nnUNetTrainerMACL_demo)"),
                          ("scratch", "scratch (nnUNetTrainerScratch_demo)")):
        rows = [ln for ln in lines if ln.strip().startswith(row_name)]
        assert len(rows) == 1, (row_name, tiny_demo["console"])
        printed = [float(v) for v in rows[0].strip()[len(row_name):].split()]
        fg, classes = by_hand[key]
        assert printed == pytest.approx([fg, classes["organ_a"], classes["organ_b"]], abs=5e-5 + 1e-12), rows[0]


def test_only_the_macl_run_starts_from_the_pretrained_encoder(tiny_demo):
    """After the demo's fine-tuning the MACL run's encoder filters still point close to where the pretrained
    ones do (each filter compared as a unit vector: the rescale recipe scales it by a positive factor), the
    scratch run's are another random initialisation (~sqrt 2): a demo that did not transfer, or transferred into
    both runs, fails."""
    import math

    import torch

    paths = tiny_demo["result"]["paths"]
    pretrained = torch.load(paths["pretrained_checkpoint"], map_location="cpu", weights_only=False)["network_weights"]
    keys = [k for k, v in pretrained.items() if k.startswith("encoder.") and v.is_floating_point() and v.ndim >= 2]
    assert len(keys) > 5

    def unit_filters(w: torch.Tensor) -> torch.Tensor:
        w = w.float().flatten(1)
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def distance(model_folder: str) -> float:
        weights = torch.load(Path(model_folder) / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                             weights_only=False)["network_weights"]
        assert set(keys) <= set(weights)
        moved = sum(float((unit_filters(weights[k]) - unit_filters(pretrained[k])).square().sum()) for k in keys)
        return math.sqrt(moved / sum(pretrained[k].shape[0] for k in keys))

    macl, scratch = distance(paths["macl_model_folder"]), distance(paths["scratch_model_folder"])
    # measured: MACL 0.12 (the rescaled filters fine-tune at nnU-Net's pace, so they turn more than the stock
    # recipe's 1e-6), scratch 1.42 (unrelated directions: sqrt 2)
    assert macl < 0.3 and scratch > 1.0, (macl, scratch)


def test_figure_is_a_picture(tiny_demo):
    """demo.png holds drawn panels, not an empty canvas: many distinct colours, and both dark and light pixels."""
    import matplotlib.image as mpimg
    import numpy as np

    picture = mpimg.imread(tiny_demo["result"]["paths"]["figure"])[..., :3]
    colours = np.unique((picture.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colours) > 50
    luminance = picture.mean(-1)
    assert (luminance < 0.2).mean() > 0.001 and (luminance > 0.9).mean() > 0.2
