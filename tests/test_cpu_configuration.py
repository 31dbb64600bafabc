"""``macl_cpu_plan`` / :func:`add_cpu_configuration`: a CPU-sized 2-D configuration beside the native one.

A synthetic dataset of its own (6 cases of 8x48x48 at 1 mm, fingerprinted and planned, not preprocessed),
so that adding configurations never changes the plans other tests read; every test starts from the plans
nnU-Net wrote. At 2 mm the slices are 24x24; the tests use a 32x32 patch and batch 4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_macl.planning import CpuPlanError, add_cpu_configuration

DATASET_ID = 966  # not used by other tests
NAME = "Dataset966_CpuPlan"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cpu_dataset(nnunet_env):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset

    make_synthetic_dataset(str(nnunet_env["raw"]), dataset_id=DATASET_ID, name="CpuPlan", num_cases=6,
                           shape=(8, 48, 48), seed=0)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=False, clean=True, verbose=False,
                         show_progress_bar=False)
    plan_experiments([DATASET_ID])
    plans_file = nnunet_env["preprocessed"] / NAME / "nnUNetPlans.json"
    return {"plans_file": plans_file, "pristine": plans_file.read_text(), "env": nnunet_env}


@pytest.fixture
def ds(cpu_dataset):
    cpu_dataset["plans_file"].write_text(cpu_dataset["pristine"])
    return cpu_dataset


def _plans(ds) -> dict:
    return json.loads(ds["plans_file"].read_text())


def _configuration(ds, name: str) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(_plans(ds)).get_configuration(name).configuration


def test_configuration_is_planned_by_nnunet_beside_the_native_one(ds):
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    d = add_cpu_configuration(DATASET_ID, in_plane_spacing=2.0, patch_size=32, batch_size=4)
    plans = _plans(ds)
    entry = plans["configurations"]["2d_cpu"]
    assert entry["inherits_from"] == "2d" and entry["data_identifier"] == "nnUNetPlans_2d_cpu"
    assert plans["configurations"]["2d"] == json.loads(ds["pristine"])["configurations"]["2d"]  # native untouched
    cfg, native = _configuration(ds, "2d_cpu"), _configuration(ds, "2d")
    assert cfg["spacing"] == [2.0, 2.0] and cfg["patch_size"] == [32, 32] and cfg["batch_size"] == 4
    assert cfg["median_image_size_in_voxels"] == [24.0, 24.0]  # 48 voxels of 1 mm at 2 mm
    for key in ("normalization_schemes", "use_mask_for_norm", "resampling_fn_data", "batch_dice", "preprocessor_name"):
        assert cfg[key] == native[key], key
    # the topology nnU-Net's own planner utility gives for that spacing and patch
    _, strides, kernels, patch, _ = get_pool_and_conv_props([2.0, 2.0], [32, 32], 4, 999999)
    arch = cfg["architecture"]["arch_kwargs"]
    assert [list(s) for s in strides] == arch["strides"] and [list(k) for k in kernels] == arch["kernel_sizes"]
    assert arch["n_stages"] == len(strides) == d["n_stages"] and list(patch) == [32, 32]
    assert arch["features_per_stage"] == [min(32 * 2 ** i, 512) for i in range(arch["n_stages"])]
    assert len(arch["n_conv_per_stage"]) == arch["n_stages"] and len(arch["n_conv_per_stage_decoder"]) == arch["n_stages"] - 1


def test_network_is_buildable_from_the_configuration(ds):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    add_cpu_configuration(DATASET_ID, in_plane_spacing=2.0, patch_size=32, batch_size=4)
    cm = PlansManager(str(ds["plans_file"])).get_configuration("2d_cpu")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3, allow_init=True, deep_supervision=True)
    with torch.no_grad():
        out = net(torch.zeros(cm.batch_size, 1, *cm.patch_size))
    assert len(out) == cm.network_arch_init_kwargs["n_stages"] - 1
    assert tuple(out[0].shape) == (4, 3, 32, 32)


def test_defaults_are_2p5_mm_128_batch_16(ds):
    d = add_cpu_configuration(DATASET_ID)
    assert (d["configuration"], d["spacing"], d["patch_size"], d["batch_size"]) == ("2d_cpu", [2.5, 2.5], [128, 128], 16)
    assert d["n_stages"] == 6  # 128 -> 4 at the bottleneck, as nnU-Net plans a 128x128 patch


def test_max_stages_drops_the_deepest_stages_and_fits_the_macl_crop(ds):
    """A 128 x 128 patch: nnU-Net plans 6 stages (stride 32), which makes MACL's crop (N = 2) 256 x 128;
    capped at 5 stages the network keeps nnU-Net's first 5 and the crop is the patch."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_macl.model.macl_network import fitting_crop_size

    full = add_cpu_configuration(DATASET_ID, patch_size=128, name="deep")
    capped = add_cpu_configuration(DATASET_ID, patch_size=128, name="capped", max_stages=5)
    assert full["n_stages"] == 6 and capped["n_stages"] == 5
    assert capped["features_per_stage"] == full["features_per_stage"][:5] and capped["strides"] == full["strides"][:5]
    crops = {}
    for name in ("deep", "capped"):
        cm = PlansManager(str(ds["plans_file"])).get_configuration(name)
        kwargs = cm.network_arch_init_kwargs
        assert all(len(v) == kwargs["n_stages"] - ("_decoder" in k) for k, v in kwargs.items() if isinstance(v, list))
        net = get_network_from_plans(cm.network_arch_class_name, kwargs, cm.network_arch_init_kwargs_req_import, 1, 2,
                                     allow_init=True, deep_supervision=True)
        crops[name] = fitting_crop_size(net, 2, cm.patch_size)
    assert sorted(crops["deep"]) == [128, 256] and crops["capped"] == [128, 128]
    with pytest.raises(CpuPlanError, match="max stages must be >= 2"):
        add_cpu_configuration(DATASET_ID, name="bad", max_stages=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset=968), "unknown dataset"),
    (dict(base_configuration="3d_fullres"), "only 2-D configurations are supported"),
    (dict(base_configuration="3d_lowres"), "no '3d_lowres' configuration"),
    (dict(patch_size=36), "multiple of [8, 8]"),
    (dict(name="a__b"), "without '__'"),
    (dict(name="2d"), "already exists"),
    (dict(in_plane_spacing=0.0), "must be > 0"),
    (dict(batch_size=0), "batch size must be >= 1"),
    (dict(patch_size=(32, 32, 32)), "1 or 2 values"),
])
def test_clear_errors_leave_the_plans_alone(ds, kwargs, message):
    args = dict(dataset=DATASET_ID, in_plane_spacing=2.0, patch_size=32, batch_size=4)
    args.update(kwargs)
    with pytest.raises(CpuPlanError) as e:
        add_cpu_configuration(**args)
    assert message in str(e.value)
    assert ds["plans_file"].read_text() == ds["pristine"]


def test_existing_configuration_needs_overwrite(ds):
    add_cpu_configuration(DATASET_ID, 2.0, 32, 4)
    with pytest.raises(CpuPlanError, match="already exists"):
        add_cpu_configuration(DATASET_ID, 2.0, 32, 8)
    assert _configuration(ds, "2d_cpu")["batch_size"] == 4
    add_cpu_configuration(DATASET_ID, 2.0, 32, 8, overwrite=True)
    assert _configuration(ds, "2d_cpu")["batch_size"] == 8


def test_console_entry_point(ds, capsys):
    from nnunetv2_macl.run.cpu_plan import main

    assert main(["-d", str(DATASET_ID), "--spacing", "2", "--patch", "32", "--batch-size", "4", "-c", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "added cpu (inherits 2d): spacing [2.0, 2.0] mm, patch [32, 32], batch 4" in out
    assert f"nnUNetv2_preprocess -d {DATASET_ID} -plans_name nnUNetPlans -c cpu" in out
    assert main(["-d", str(DATASET_ID), "-c", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("macl_cpu_plan: error: configuration 'cpu' already exists")


@pytest.mark.e2e
def test_stock_preprocess_and_train_accept_it(ds, tmp_path):
    """``nnUNetv2_preprocess -c 2d_cpu`` and ``nnUNetv2_train ... 2d_cpu 0`` unchanged (1 epoch of 2 iterations)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    add_cpu_configuration(DATASET_ID, 2.0, 32, 4)
    env = dict(os.environ, nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", nnUNet_results=str(tmp_path),
               nnUNet_extTrainer=ext_trainer_value(os.environ.get("nnUNet_extTrainer")), PYTHONWARNINGS="ignore",
               MACL_DEMO_EPOCHS="1", MACL_DEMO_TRAIN_ITERS="2", MACL_DEMO_VAL_ITERS="1")
    run = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
               timeout=600)
    p = subprocess.run([str(BIN / "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", "2d_cpu", "-np", "1"], **run)
    assert p.returncode == 0, p.stdout[-3000:]
    folder = ds["plans_file"].parent / "nnUNetPlans_2d_cpu"
    dataset = infer_dataset_class(str(folder))(str(folder))
    assert len(dataset.identifiers) == 6
    data, seg, *_ = dataset.load_case(dataset.identifiers[0])
    assert tuple(np.asarray(data).shape) == (1, 8, 24, 24)  # slices kept, in-plane resampled to 2 mm

    p = subprocess.run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d_cpu", "0", "-tr", "nnUNetTrainerScratch_demo",
                        "-device", "cpu"], **run)
    assert p.returncode == 0, p.stdout[-3000:]
    fold = tmp_path / NAME / "nnUNetTrainerScratch_demo__nnUNetPlans__2d_cpu" / "fold_0"
    assert (fold / "validation" / "summary.json").is_file()
    assert "'batch_size': 4" in next(fold.glob("training_log_*.txt")).read_text()
