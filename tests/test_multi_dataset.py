"""One pretraining over several nnU-Net datasets (``macl_pretrain -d A B``): compatibility checks,
balanced/proportional sampling, per-volume positions, checkpoint records and the default lookup."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from nnunetv2_macl.data.multi_dataset import (
    BalancedSourceSampler, IncompatibleDatasetsError, MultiSourceDataset, check_compatible_plans, make_sampler,
    source_shares)
from nnunetv2_macl.data.slice_dataset import EpochPermutationSampler, PretrainSliceDataset
from nnunetv2_macl.training.checkpoint import load_checkpoint

ID_SECOND = 943  # a second 2d dataset, planned by nnU-Net on its own (other shape)


@pytest.fixture(scope="module")
def second_dataset(nnunet_env, tiny_dataset):
    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset, plan_and_preprocess

    make_synthetic_dataset(str(nnunet_env["raw"]), dataset_id=ID_SECOND, name="MACLMultiB", num_cases=3,
                           shape=(10, 40, 36), seed=5)
    plan_and_preprocess(ID_SECOND, configurations=("2d",), num_processes=2)
    name = f"Dataset{ID_SECOND}_MACLMultiB"
    pre = nnunet_env["preprocessed"] / name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    return {"id": ID_SECOND, "name": name, "preprocessed": pre, "plans": plans,
            "data_folder": pre / plans["configurations"]["2d"]["data_identifier"]}


def test_balanced_sampler_shares_and_determinism():
    sizes = [30, 6, 12]
    s = BalancedSourceSampler(sizes, seed=3)
    s.set_epoch(2)
    order = list(s)
    assert len(order) == len(s) == sum(sizes) and order == list(s)  # same (seed, epoch) -> same order
    counts = Counter(0 if i < 30 else 1 if i < 36 else 2 for i in order)
    assert sorted(counts.values()) == [16, 16, 16]
    assert set(range(30, 36)) <= set(order)  # the small dataset is revisited, every sample used
    s.set_epoch(3)
    assert list(s) != order
    ranks = [list(BalancedSourceSampler(sizes, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == sum(sizes) // 2
    assert source_shares(sizes, "proportional") == [30 / 48, 6 / 48, 12 / 48]
    assert source_shares(sizes, "balanced") == [1 / 3] * 3


def test_multi_source_dataset_keeps_positions_per_volume(tiny_dataset, second_dataset):
    a = PretrainSliceDataset(str(tiny_dataset["data_folder"]), [32, 32], seed=0)
    b = PretrainSliceDataset(str(second_dataset["data_folder"]), [32, 32], seed=0)
    multi = MultiSourceDataset([tiny_dataset["name"], second_dataset["name"]], [a, b])
    assert len(multi) == len(a) + len(b) and multi.num_channels == 1
    k = len(a) + 3  # 4th slice of b's first volume
    item, ref = multi[k], b[3]
    assert all(torch.equal(x, y) for x, y in zip(item, ref))  # items pass through whatever they hold
    assert float(item[1]) == pytest.approx(4 / b.slice_index[b.case_index == 0].size)
    multi.set_epoch(5)
    assert a.epoch == b.epoch == 5
    assert isinstance(make_sampler(multi, "balanced", 0), BalancedSourceSampler)
    assert isinstance(make_sampler(multi, "proportional", 0), EpochPermutationSampler)


def test_incompatible_plans_name_dataset_field_and_fix(tiny_dataset, second_dataset):
    ref_plans = json.loads(Path(tiny_dataset["plans_file"]).read_text())
    ref_json = json.loads((Path(tiny_dataset["preprocessed"]) / "dataset.json").read_text())
    other_json = json.loads((second_dataset["preprocessed"] / "dataset.json").read_text())
    args = (tiny_dataset["name"], ref_plans, ref_json, second_dataset["name"])
    check_compatible_plans(*args, second_dataset["plans"], other_json, "2d", "nnUNetPlans")  # compatible

    ct = json.loads(json.dumps(second_dataset["plans"]))
    ct["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization"]
    with pytest.raises(IncompatibleDatasetsError) as e:
        check_compatible_plans(*args, ct, other_json, "2d", "nnUNetPlans")
    msg = str(e.value)
    assert second_dataset["name"] in msg and "normalization_schemes" in msg and "\n" not in msg
    assert f"nnUNetv2_move_plans_between_datasets -s {tiny_dataset['id']} -t {ID_SECOND}" in msg
    assert f"nnUNetv2_preprocess -d {ID_SECOND} -c 2d" in msg

    two = dict(other_json, channel_names={"0": "T1", "1": "T2"})
    with pytest.raises(IncompatibleDatasetsError, match="2 input channel.*'channel_names'"):
        check_compatible_plans(*args, second_dataset["plans"], two, "2d", "nnUNetPlans")
    no2d = json.loads(json.dumps(second_dataset["plans"]))
    del no2d["configurations"]["2d"]
    with pytest.raises(IncompatibleDatasetsError, match="no configuration '2d'.*Fix: nnUNetv2_move_plans"):
        check_compatible_plans(*args, no2d, other_json, "2d", "nnUNetPlans")


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "nnunetv2_macl.run.pretrain", *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=env, timeout=600)


@pytest.mark.e2e
def test_pretraining_over_two_datasets(tiny_dataset, second_dataset, nnunet_env, tmp_path, monkeypatch):
    env = {**os.environ, "nnUNet_results": str(tmp_path / "results")}
    # an incompatible dataset is refused before anything is written
    bad = nnunet_env["preprocessed"] / "Dataset944_MACLMultiCT"
    shutil.copytree(second_dataset["preprocessed"], bad, dirs_exist_ok=True)
    plans = json.loads((bad / "nnUNetPlans.json").read_text())
    plans["dataset_name"] = bad.name
    plans["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization"]
    (bad / "nnUNetPlans.json").write_text(json.dumps(plans))
    p = _cli(["-d", str(tiny_dataset["id"]), "944", "--device", "cpu", "--epochs", "1"], env)
    assert p.returncode == 2 and "Dataset944_MACLMultiCT" in p.stderr and "normalization_schemes" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "results").exists()

    p = _cli(["-d", str(tiny_dataset["id"]), str(ID_SECOND), "--device", "cpu", "--epochs", "1", "--batch-size", "8",
              "--num-workers", "0", "--sampling", "balanced"], env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "results" / tiny_dataset["name"] / "MACLPretrainer__nnUNetPlans__2d"
    ckpt = load_checkpoint(str(out / "checkpoint_final.pth"))
    datasets = ckpt["macl"]["datasets"]
    assert [d["dataset_name"] for d in datasets] == [tiny_dataset["name"], second_dataset["name"]]
    assert [d["share"] for d in datasets] == [0.5, 0.5] and datasets[0]["samples"] > datasets[1]["samples"] > 0
    assert ckpt["format"] == "nnunetv2_macl.pretraining" and ckpt["format_version"] == 2
    assert any("Multi-level Asymmetric" in c for c in ckpt["citation"])
    assert ckpt["macl"]["config"]["sampling"] == "balanced"
    log = next(out.glob("training_log_*.txt")).read_text()
    assert f"{second_dataset['name']} {datasets[1]['samples']} samples, share 50.0%" in log

    # the default lookup finds it for both datasets (the second one's results folder holds nothing)
    from nnunetv2_macl.transfer.find_checkpoint import find_default_checkpoint

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    for name in (tiny_dataset["name"], second_dataset["name"]):
        assert find_default_checkpoint(name, "nnUNetPlans", "2d") == str(out / "checkpoint_final.pth")
    assert not (tmp_path / "results" / second_dataset["name"]).exists()

    # -o and --plans-from: the network from the second dataset's plan
    other = tmp_path / "elsewhere"
    p = _cli(["-d", str(tiny_dataset["id"]), str(ID_SECOND), "--plans-from", str(ID_SECOND), "-o", str(other),
              "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--num-workers", "0"], env)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = load_checkpoint(str(other / "checkpoint_final.pth"))["macl"]
    assert meta["dataset_name"] == second_dataset["name"]
    assert meta["network_arch_init_kwargs"] == second_dataset["plans"]["configurations"]["2d"]["architecture"][
        "arch_kwargs"]
    shares = [d["share"] for d in meta["datasets"]]
    assert sum(shares) == pytest.approx(1) and shares[0] > shares[1]  # proportional to slices by default
