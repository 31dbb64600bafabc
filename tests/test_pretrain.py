"""End-to-end MACL pretraining on CPU through the real ``macl_pretrain`` CLI, on a preprocessed
dataset whose segmentation files were removed (pretraining must never need labels)."""
from __future__ import annotations

import json
import os
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunetv2_macl.training.checkpoint import load_checkpoint


def make_unlabeled_copy(src: dict, preprocessed_root: Path, new_id: int, num_cases: int) -> str:
    """Copy the first ``num_cases`` preprocessed cases of ``src`` into a new dataset id, without
    any ``_seg`` file."""
    name = f"Dataset{new_id:03d}_NoSeg{new_id}"
    dst = preprocessed_root / name
    if dst.exists():
        shutil.rmtree(dst)
    src_folder = Path(src["preprocessed"])
    (dst / src["data_folder"].name).mkdir(parents=True)
    for f in ("dataset.json", "nnUNetPlans.json", "dataset_fingerprint.json"):
        if (src_folder / f).exists():
            shutil.copy(src_folder / f, dst / f)
    plans = json.loads((dst / "nnUNetPlans.json").read_text())
    plans["dataset_name"] = name
    (dst / "nnUNetPlans.json").write_text(json.dumps(plans))
    cases = sorted(p.name[:-5] for p in Path(src["data_folder"]).glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    for case in cases[:num_cases]:
        shutil.copy(Path(src["data_folder"]) / f"{case}.b2nd", dst / src["data_folder"].name / f"{case}.b2nd")
    assert not list(dst.rglob("*_seg*"))
    return name


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnunetv2_macl.run.pretrain", *args], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.e2e
def test_two_epoch_pretraining_without_labels(tiny_dataset, nnunet_env):
    name = make_unlabeled_copy(tiny_dataset, Path(nnunet_env["preprocessed"]), 992, num_cases=3)
    proc = run_cli(["-d", "992", "--device", "cpu", "--epochs", "2", "--batch-size", "8", "--num-workers", "0",
                    "--seed", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(nnunet_env["results"]) / name / "MACLPretrainer__nnUNetPlans__2d"
    for f in ("checkpoint_latest.pth", "checkpoint_final.pth", "progress.png", "macl_config.json"):
        assert (out / f).is_file(), f
    logs = list(out.glob("training_log_*.txt"))
    assert len(logs) == 1 and "Epoch 2/2" in logs[0].read_text()

    ckpt = load_checkpoint(str(out / "checkpoint_final.pth"))
    meta = ckpt["macl"]
    assert meta["epoch"] == 2 and meta["decoder_blocks"] == 2 and meta["lambda"] == [0.25, 0.25]
    assert meta["plans_identifier"] == "nnUNetPlans" and meta["configuration"] == "2d"
    assert meta["loss_weights"] == [1.0, 0.5, 1.0] and meta["threshold"] == 0.1 and meta["tau"] == 0.1
    log = ckpt["logging"]
    for key in ("Lg", "Ld", "LER"):
        assert len(log[key]) == 2
    assert log["total"][1] < log["total"][0], log["total"]

    # network_weights load strictly into the network nnU-Net builds for fine-tuning
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    net = get_network_from_plans(meta["network_arch_class_name"], meta["network_arch_init_kwargs"],
                                 meta["network_arch_init_kwargs_req_import"], meta["input_channels"], 3,
                                 deep_supervision=True)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(ckpt["network_weights"], strict=True)
    # the encoder was trained (differs from a fresh init), the segmentation heads were not used
    enc_key = "encoder.stages.0.0.convs.0.conv.weight"
    assert not torch.equal(ckpt["network_weights"][enc_key], fresh[enc_key])
    assert "Epoch 1/2" in proc.stdout and "checkpoint_final.pth" in proc.stdout
    assert logs[0].read_text().count("diagnostics on 8 fixed real samples: pooled-descriptor cosine") == 2
    assert len(log["Lg_chance"]) == 2 and len(log["cos_projection"]) == 2

    # the collapse diagnostic a user runs on a checkpoint (and on the untrained network with --init)
    printed = {}
    for extra in ([], ["--init"]):
        diag = subprocess.run([sys.executable, "-m", "nnunetv2_macl.run.diagnose", str(out / "checkpoint_final.pth"),
                               *extra], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
        assert diag.returncode == 0, diag.stderr[-3000:]
        found = re.search(r"projection cosine ([0-9.]+) \| Lg ([0-9.]+) vs chance log\(2B-1\) = ([0-9.]+) .*"
                          r"\| Ld ([0-9.]+) vs chance ([0-9.]+) .*\| LER (n/a|[0-9.]+)", diag.stdout)
        assert found, diag.stdout
        printed[bool(extra)] = [float(v) for v in found.groups()[:-1]]
        # the tiny slices (1/8 of the crop) leave no cell of LER's bottleneck grid mostly image: it says so
        assert found.group(6) == "n/a" and "LER contributes nothing" in diag.stdout, diag.stdout
        assert printed[bool(extra)][2] == pytest.approx(math.log(15), abs=1e-4)  # B = 8
    # on the checkpoint: the diagnostics its last epoch logged (same fixed batch, same seed)
    assert printed[False][0] == pytest.approx(log["cos_projection"][-1], abs=1e-4)
    # the untrained network is another network: its values differ
    assert printed[True][0] != pytest.approx(printed[False][0], abs=1e-3)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["pcl", "simclr"])
def test_baseline_methods_run_and_record_method(tiny_dataset, nnunet_env, method):
    name = make_unlabeled_copy(tiny_dataset, Path(nnunet_env["preprocessed"]), 995 if method == "pcl" else 996, 2)
    proc = run_cli(["-d", name, "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--num-workers", "0",
                    "--method", method])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(str(Path(nnunet_env["results"]) / name / "MACLPretrainer__nnUNetPlans__2d" /
                               "checkpoint_final.pth"))
    assert ckpt["macl"]["method"] == method and ckpt["macl"]["decoder_blocks"] == 0
    assert ckpt["logging"]["Ld"] == [0.0] and ckpt["logging"]["LER"] == [0.0] and ckpt["logging"]["Lg"][0] > 0
