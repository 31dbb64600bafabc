"""3-D configurations (patch positions, per-axis lambda, the losses in 3-D) and nnU-Net's residual
encoder presets (ResidualEncoderUNet with its stem): shapes, pretraining and transfer, on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_macl.data.slice_dataset import PretrainPatchDataset
from nnunetv2_macl.losses import MultiLevelContrastiveLoss
from nnunetv2_macl.model.macl_network import (
    MACLNetwork, crop_problems, downsampling_factors, fitting_crop_size, pretrained_prefixes, required_divisor)
from nnunetv2_macl.training.checkpoint import load_checkpoint

RESENC_ID = 972
RESENC_PLANS = "nnUNetResEncUNetMPlans"
UNLABELED_3D_ID = 971
STEM_KEY = "encoder.stem.convs.0.conv.weight"


def build_network(plans: dict, configuration: str, seed: int = 0, in_channels: int = 1, heads: int = 3):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"][configuration]["architecture"]
    torch.manual_seed(seed)
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  in_channels, heads, allow_init=True, deep_supervision=True)


def run_cli(module: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env={**os.environ, **(env or {})}, timeout=900)


def expected_lambda(plans: dict, configuration: str, n: int) -> list[float]:
    strides = np.array(plans["configurations"][configuration]["architecture"]["arch_kwargs"]["strides"])
    return [1.0 / float(p) for p in np.prod(strides[len(strides) - n:], axis=0)]


def check_shapes(macl: MACLNetwork, crop, batch: int = 2) -> dict:
    """One training-mode forward/backward: Z_l (dominant decoder output) and Z~_l (auxiliary pixel
    projection) have the same shape; Y matches down(Y~); the losses are finite with (N, D) positions."""
    ndim = len(crop)
    x = torch.randn(batch, 1, *crop)
    macl.train()
    out = macl(x, x.flip(-1), x, x.flip(-2))
    assert out["dense_dominant"].shape == out["dense_auxiliary"].shape
    assert out["dense_dominant"].shape[1] == macl.dense_channels
    assert tuple(out["dense_dominant"].shape[2:]) == tuple(c // t for c, t in zip(
        crop, np.prod(np.array([[int(s) for s in st] for st in macl.network.encoder.strides]), axis=0)))
    assert out["bottleneck_dominant"].shape == macl.down(out["bottleneck_auxiliary"]).shape
    positions = torch.rand(batch, ndim) if ndim == 3 else torch.rand(batch)
    total, parts = MultiLevelContrastiveLoss()(out, positions)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    return out


# ============================================================================================ 3-D
def test_3d_lambda_divisor_and_shapes(tiny_dataset_3d):
    plans = json.loads(Path(tiny_dataset_3d["plans_file"]).read_text())
    net = build_network(plans, "3d_fullres")
    strides = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"]
    total = np.prod(np.array(strides), axis=0)
    for n in (1, 2):
        lam = downsampling_factors(net, n)
        assert lam == expected_lambda(plans, "3d_fullres", n)
        assert required_divisor(net, n) == [int(round(t / l)) for t, l in zip(total, lam)]
    macl = MACLNetwork(net, decoder_blocks=2)
    assert len(macl.scale) == 3 and macl.scale == expected_lambda(plans, "3d_fullres", 2)
    # the tiny plan is anisotropic in its last stage ([1, 2, 2]): lambda differs per axis
    assert len(set(macl.scale)) > 1, macl.scale
    crop = fitting_crop_size(net, 2, tiny_dataset_3d["shape"])
    assert crop_problems(net, 2, crop) == []
    check_shapes(macl, crop)
    # the pretrained part got gradients, the decoder stage after N did not
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    assert net.decoder.stages[1].convs[0].conv.weight.grad.abs().sum() > 0
    assert net.decoder.stages[2].convs[0].conv.weight.grad is None


def test_crop_rules():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = PlainConvUNet(1, 6, (8, 8, 8, 8, 8, 8), torch.nn.Conv3d, 3, (1, 2, 2, 2, 2, 2), 1, 2, 1,
                        norm_op=torch.nn.InstanceNorm3d)
    d = required_divisor(net, 2)
    assert d == [128, 128, 128]
    # a 128^3 patch would give a 1-voxel dominant bottleneck: one axis is doubled (not all three: 8x)
    assert fitting_crop_size(net, 2, (128, 128, 128)) == [256, 128, 128]
    assert fitting_crop_size(net, 2, (160, 128, 112)) == [256, 128, 128]
    assert crop_problems(net, 2, (128, 128, 128)) and not crop_problems(net, 2, (128, 256, 128))
    assert "multiple of 128" in crop_problems(net, 2, (96, 128, 128))[0]


def test_patch_positions_are_patch_centres(tiny_dataset_3d):
    folder = str(tiny_dataset_3d["data_folder"])
    for patch in ([16, 64, 64], [8, 16, 12], [5, 7, 9]):
        ds = PretrainPatchDataset(folder, patch, patches_per_case=6, seed=3)
        assert len(ds) == 6 * len(ds.identifiers)
        for k in range(0, len(ds), 5):
            image, position, content = ds[k]
            assert tuple(image.shape) == (1, *patch) and position.shape == (3,)
            assert tuple(content.shape) == (1, *patch)
            # padding (outside the volume) is zero in the image and marked 0 in the content mask
            assert bool((image[content == 0] == 0).all()) and content.max() == 1
            shape = ds.shapes[k // ds.patches_per_case]
            centre = ds.centre(k)
            assert all(0 <= c < s for c, s in zip(centre, shape))
            torch.testing.assert_close(position, torch.tensor([(c + 1) / s for c, s in zip(centre, shape)]))
            assert bool(((position > 0) & (position <= 1)).all())
            volume = np.asarray(ds._array(ds.identifiers[k // ds.patches_per_case]))
            # voxel p // 2 of the patch is the centre voxel of the volume, and its neighbourhood matches
            mid = tuple(p // 2 for p in patch)
            assert image[(0, *mid)].item() == pytest.approx(float(volume[(0, *centre)]))
            lo = [max(0, c - p // 2) for c, p in zip(centre, patch)]
            hi = [min(s, c - p // 2 + p) for c, s, p in zip(centre, shape, patch)]
            off = [a - (c - p // 2) for a, c, p in zip(lo, centre, patch)]
            inside = image[(0, *(slice(o, o + b - a) for o, a, b in zip(off, lo, hi)))].numpy()
            np.testing.assert_array_equal(inside, volume[(0, *(slice(a, b) for a, b in zip(lo, hi)))])
            # outside the volume: zero padding
            assert float(image.abs().sum()) == pytest.approx(float(np.abs(inside).sum()), rel=1e-5)
        # same (seed, epoch, k) -> same patch; another epoch -> other centres
        a, pa, _ = ds[1]
        b, pb, _ = ds[1]
        assert torch.equal(a, b) and torch.equal(pa, pb)
        before = [ds.centre(k) for k in range(len(ds))]
        ds.set_epoch(1)
        assert [ds.centre(k) for k in range(len(ds))] != before


def _unlabeled_copy(src: dict, preprocessed_root: Path, new_id: int, num_cases: int, plans: str = "nnUNetPlans") -> str:
    """The first cases of ``src`` (configuration data folder only, no _seg files) as a new dataset id."""
    name = f"Dataset{new_id:03d}_Unlabeled3D"
    dst = preprocessed_root / name
    if dst.exists():
        shutil.rmtree(dst)
    data = Path(src["data_folder"])
    (dst / data.name).mkdir(parents=True)
    for f in ("dataset.json", f"{plans}.json", "dataset_fingerprint.json"):
        if (Path(src["preprocessed"]) / f).exists():
            shutil.copy(Path(src["preprocessed"]) / f, dst / f)
    p = json.loads((dst / f"{plans}.json").read_text())
    p["dataset_name"] = name
    (dst / f"{plans}.json").write_text(json.dumps(p))
    cases = sorted(f.name[:-5] for f in data.glob("*.b2nd") if not f.name.endswith("_seg.b2nd"))
    for case in cases[:num_cases]:
        shutil.copy(data / f"{case}.b2nd", dst / data.name / f"{case}.b2nd")
    return name


def _trainer(dataset_id, configuration: str, plans: str, name: str = "nnUNetTrainerMACL_paperTransfer"):
    """The paper's hand-over by default here: these tests check that the decoder stages arrive too."""
    from nnunetv2.run.run_training import get_trainer_from_args

    return get_trainer_from_args(str(dataset_id), configuration, 0, name, plans, False, device=torch.device("cpu"))


@pytest.fixture()
def ext_trainer(monkeypatch):
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(os.environ.get("nnUNet_extTrainer")))
    monkeypatch.delenv("MACL_PRETRAINED", raising=False)


@pytest.mark.e2e
def test_3d_pretraining_and_transfer(tiny_dataset_3d, nnunet_env, ext_trainer, monkeypatch):
    name = _unlabeled_copy(tiny_dataset_3d, Path(nnunet_env["preprocessed"]), UNLABELED_3D_ID, num_cases=2)
    proc = run_cli("nnunetv2_macl.run.pretrain", [
        "-d", str(UNLABELED_3D_ID), "-c", "3d_fullres", "--device", "cpu", "--epochs", "1", "--batch-size", "2",
        "--patches-per-case", "2", "--num-workers", "0", "--seed", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(nnunet_env["results"]) / name / "MACLPretrainer__nnUNetPlans__3d_fullres" / "checkpoint_final.pth"
    ckpt = load_checkpoint(str(path))
    meta = ckpt["macl"]
    plans = json.loads(Path(tiny_dataset_3d["plans_file"]).read_text())
    assert meta["configuration"] == "3d_fullres" and meta["epoch"] == 1 and len(meta["crop_size"]) == 3
    assert meta["lambda"] == expected_lambda(plans, "3d_fullres", 2)
    assert all(torch.isfinite(v).all() for v in ckpt["network_weights"].values() if v.is_floating_point())

    # fine-tuning on the labelled 3-D dataset with nnUNetTrainerMACL (cross-dataset: MACL_PRETRAINED)
    monkeypatch.setenv("MACL_PRETRAINED", str(path))
    trainer = _trainer(tiny_dataset_3d["id"], "3d_fullres", "nnUNetPlans")
    trainer.initialize()
    report = trainer.apply_macl_pretrained_weights()
    assert report.encoder_loaded == report.encoder_total > 0
    sd = trainer.network.state_dict()
    w = ckpt["network_weights"]
    for key in ("encoder.stages.0.0.convs.0.conv.weight", "decoder.stages.1.convs.0.conv.weight",
                "decoder.transpconvs.1.weight"):
        assert torch.equal(sd[key], w[key]), key
    assert "decoder.stages.2.convs.0.conv.weight" not in report.loaded  # beyond N = 2: initialisation
    # nnUNetTrainerMACL's default hands over the encoder only: the pretrained decoder stages keep nnU-Net's init
    default = _trainer(tiny_dataset_3d["id"], "3d_fullres", "nnUNetPlans", name="nnUNetTrainerMACL")
    default.initialize()
    report = default.apply_macl_pretrained_weights()
    assert report.encoder_loaded == report.encoder_total > 0
    assert "encoder-only transfer" in report.skipped["decoder.stages.1.convs.0.conv.weight"]
    assert not torch.equal(default.network.state_dict()["decoder.stages.1.convs.0.conv.weight"],
                           w["decoder.stages.1.convs.0.conv.weight"])


# ============================================================================================ ResEnc
@pytest.fixture(scope="module")
def resenc_dataset(nnunet_env):
    """A tiny synthetic dataset planned with nnUNetPlannerResEncM (-> nnUNetResEncUNetMPlans, both 2d and
    3d_fullres in the plans), preprocessed for 2d with -p nnUNetResEncUNetMPlans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)
    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset

    make_synthetic_dataset(str(nnunet_env["raw"]), dataset_id=RESENC_ID, name="ResEncTiny", num_cases=3,
                           shape=(8, 32, 32), seed=5)
    extract_fingerprints([RESENC_ID], num_processes=2, check_dataset_integrity=False, clean=True, verbose=False,
                         show_progress_bar=False)
    assert plan_experiments([RESENC_ID], "nnUNetPlannerResEncM") == RESENC_PLANS
    preprocess([RESENC_ID], plans_identifier=RESENC_PLANS, configurations=("2d",), num_processes=(2,),
               verbose=False, show_progress_bar=False)
    name = f"Dataset{RESENC_ID}_ResEncTiny"
    plans = json.loads((Path(nnunet_env["preprocessed"]) / name / f"{RESENC_PLANS}.json").read_text())
    return {"id": RESENC_ID, "name": name, "plans": plans}


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_resenc_shapes_and_stem(resenc_dataset, configuration):
    plans = resenc_dataset["plans"]
    conf = plans["configurations"][configuration]
    assert conf["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    net = build_network(plans, configuration)
    assert net.encoder.stem is not None
    macl = MACLNetwork(net, decoder_blocks=2)
    assert macl.scale == expected_lambda(plans, configuration, 2)
    assert macl.bottleneck_channels == conf["architecture"]["arch_kwargs"]["features_per_stage"][-1]
    assert macl.pixel_head_auxiliary.layers[1].__class__ is net.encoder.norm_op
    crop = fitting_crop_size(net, 2, conf["patch_size"])
    check_shapes(macl, crop)
    assert net.encoder.stem.convs[0].conv.weight.grad.abs().sum() > 0  # the stem is trained
    keys = net.state_dict().keys()
    stem_keys = [k for k in keys if k.startswith("encoder.stem.")]
    assert stem_keys and all(any(k.startswith(p) for p in pretrained_prefixes(2)) for k in stem_keys)


@pytest.mark.e2e
def test_resenc_pretraining_and_transfer_include_stem(resenc_dataset, nnunet_env, ext_trainer):
    proc = run_cli("nnunetv2_macl.run.pretrain", [
        "-d", str(RESENC_ID), "-c", "2d", "-p", RESENC_PLANS, "--device", "cpu", "--epochs", "1",
        "--batch-size", "8", "--num-workers", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ResidualEncoderUNet" in proc.stdout
    path = Path(nnunet_env["results"]) / resenc_dataset["name"] / f"MACLPretrainer__{RESENC_PLANS}__2d" / \
        "checkpoint_final.pth"
    ckpt = load_checkpoint(str(path))
    assert ckpt["macl"]["network_arch_class_name"].endswith("ResidualEncoderUNet")
    assert ckpt["macl"]["plans_identifier"] == RESENC_PLANS
    w = ckpt["network_weights"]
    stem = [k for k in w if k.startswith("encoder.stem.")]
    assert STEM_KEY in stem and any(k.startswith("decoder.encoder.stem.") for k in w)
    fresh = build_network(resenc_dataset["plans"], "2d", seed=123)
    assert not torch.equal(fresh.state_dict()[STEM_KEY], w[STEM_KEY])

    # transfer through the API ...
    from nnunetv2_macl.transfer.load_pretrained import transfer_pretrained_weights

    report = transfer_pretrained_weights(fresh, str(path), log=None)
    assert STEM_KEY in report.loaded and report.encoder_loaded == report.encoder_total
    assert torch.equal(fresh.state_dict()[STEM_KEY], w[STEM_KEY])
    # ... and through nnUNetTrainerMACL (default checkpoint lookup for this dataset/plans/configuration)
    trainer = _trainer(RESENC_ID, "2d", RESENC_PLANS)
    trainer.initialize()
    report = trainer.apply_macl_pretrained_weights()
    assert report.source == str(path) and STEM_KEY in report.loaded
    sd = trainer.network.state_dict()
    pretrained = [k for k in w if k.startswith(tuple(ckpt["macl"]["pretrained_prefixes"]))]
    assert set(stem) <= set(pretrained)
    for k in pretrained:
        assert torch.equal(sd[k], w[k]), k
    assert "decoder.stages.2.convs.0.conv.weight" not in report.loaded
