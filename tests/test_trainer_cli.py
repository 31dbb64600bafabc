"""End to end through stock nnU-Net: ``nnUNetv2_train -tr nnUNetTrainerMACL_1epoch`` and ``nnUNetv2_predict``.

The trainer is found only through ``nnUNet_extTrainer`` (as set by ``macl_trainer_path``); the MACL
checkpoint is built here in the documented format from ``get_network_from_plans`` (with perturbed
weights). Each run writes into its own ``nnUNet_results`` so that nothing collides with other tests.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnunetv2_macl.training.checkpoint import save_checkpoint_atomic
from nnunetv2_macl.transfer import load_weights_only

BIN = Path(sys.executable).parent
TRAINER = "nnUNetTrainerMACL_1epoch"


def _network(plans_file, arch_class=None, arch_kwargs=None, seed=0):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(str(plans_file)).get_configuration("2d")
    torch.manual_seed(seed)
    net = get_network_from_plans(arch_class or cm.network_arch_class_name, arch_kwargs or cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3, allow_init=True,
                                 deep_supervision=True)
    return net, cm


def _macl_checkpoint(plans_file, dataset_name, arch_class=None, arch_kwargs=None, decoder_blocks=2):
    net, cm = _network(plans_file, arch_class, arch_kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    prefixes = ["encoder."] + [f"decoder.{m}.{i}." for m in ("stages", "transpconvs") for i in range(decoder_blocks)]
    return {
        "network_weights": net.state_dict(),
        "macl": {"plans_identifier": "nnUNetPlans", "configuration": "2d", "dataset_name": dataset_name,
                 "network_arch_class_name": arch_class or cm.network_arch_class_name,
                 "network_arch_init_kwargs": arch_kwargs or cm.network_arch_init_kwargs,
                 "network_arch_init_kwargs_req_import": list(cm.network_arch_init_kwargs_req_import),
                 "input_channels": 1, "decoder_blocks": decoder_blocks, "pretrained_prefixes": prefixes,
                 "lambda": [0.25, 0.25], "loss_weights": [1.0, 0.5, 1.0], "threshold": 0.1, "tau": 0.1,
                 "method": "macl", "epochs": 1, "epoch": 1, "package_version": "0.1.0"},
        "heads": {},
    }


pytestmark = pytest.mark.e2e  # stock nnUNetv2_train / _predict as subprocesses


@pytest.fixture(scope="module")
def cli(tiny_dataset, nnunet_env, tmp_path_factory):
    """Environment for the subprocesses and the checkpoints they use."""
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    base = tmp_path_factory.mktemp("trainer_cli")
    plans_file = tiny_dataset["plans_file"]
    good = base / "macl_checkpoint_final.pth"
    save_checkpoint_atomic(_macl_checkpoint(plans_file, tiny_dataset["name"]), str(good))

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    kw = dict(PlansManager(str(plans_file)).get_configuration("2d").network_arch_init_kwargs)
    kw["n_blocks_per_stage"] = [1] * kw["n_stages"]
    kw.pop("n_conv_per_stage")
    bad = base / "resenc_checkpoint_final.pth"
    save_checkpoint_atomic(_macl_checkpoint(plans_file, tiny_dataset["name"],
                                            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                                            kw), str(bad))
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(nnunet_env["raw"]), "nnUNet_preprocessed": str(nnunet_env["preprocessed"]),
        "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2",
        "nnUNet_extTrainer": ext_trainer_value(os.environ.get("nnUNet_extTrainer")),
        "PYTHONWARNINGS": "ignore",
    })
    env.pop("MACL_PRETRAINED", None)
    return {"base": base, "good": good, "bad": bad, "env": env, "dataset": tiny_dataset}


def _run(args, env, timeout=600):
    t0 = time.perf_counter()
    p = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, encoding="utf-8", errors="replace", timeout=timeout)
    return p.returncode, p.stdout, time.perf_counter() - t0


def _results_env(cli, name, **extra):
    env = dict(cli["env"])
    env["nnUNet_results"] = str(cli["base"] / name)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_train_validate_predict(cli, monkeypatch):
    ds = cli["dataset"]
    env = _results_env(cli, "results_train", MACL_PRETRAINED=cli["good"])
    rc, out, secs = _run(["nnUNetv2_train", str(ds["id"]), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    assert rc == 0, out[-4000:]
    assert f"Using trainer '{TRAINER}'" in out
    assert f"MACL weight transfer from {cli['good']}" in out
    m = re.search(r"loaded (\d+) of (\d+) tensors \(encoder (\d+)/(\d+),", out)
    assert m and m.group(3) == m.group(4) and int(m.group(1)) < int(m.group(2)), out[-4000:]
    model_dir = Path(env["nnUNet_results"]) / ds["name"] / f"{TRAINER}__{ds['plans']}__2d"
    fold = model_dir / "fold_0"
    assert (fold / "validation" / "summary.json").is_file()
    json.loads((fold / "validation" / "summary.json").read_text())
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"MACL weight transfer from {cli['good']}" in log and "not pretrained" in log
    print(f"nnUNetv2_train {TRAINER}: {secs:.1f} s")

    # nnU-Net's own checkpoint is readable weights_only (numpy scalars through the explicit allow-list)
    ck = load_weights_only(str(fold / "checkpoint_final.pth"))
    assert ck["trainer_name"] == TRAINER and "network_weights" in ck

    # nnUNetTrainerMACL.load_checkpoint (used by --c / --val) reads it weights_only too, in-process here
    # (a --val subprocess would mostly measure nnU-Net's process spawning)
    trainer = _trainer_in_process(cli, env, monkeypatch)
    trainer.load_checkpoint(str(fold / "checkpoint_final.pth"))
    assert trainer.current_epoch == ck["current_epoch"] == 1
    for k, v in trainer.network.state_dict().items():
        assert torch.equal(v, ck["network_weights"][k])

    # stock prediction with this model on two raw images
    inp = cli["base"] / "predict_in"
    inp.mkdir(exist_ok=True)
    for f in sorted((ds["raw"] / "imagesTr").glob("*_0000.nii.gz"))[:2]:
        shutil.copy(f, inp / f.name)
    outp = cli["base"] / "predict_out"
    rc, out, secs = _run(["nnUNetv2_predict", "-i", str(inp), "-o", str(outp), "-d", str(ds["id"]), "-c", "2d",
                          "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1",
                          "--disable_progress_bar"], env)
    assert rc == 0, out[-4000:]
    preds = sorted(p.name for p in outp.glob("*.nii.gz"))
    assert preds == sorted(f.name.replace("_0000", "") for f in inp.glob("*.nii.gz")), out[-2000:]
    print(f"nnUNetv2_predict: {secs:.1f} s")


def _trainer_in_process(cli, env, monkeypatch):
    from nnunetv2.run.run_training import get_trainer_from_args

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(k, env[k])
    ds = cli["dataset"]
    return get_trainer_from_args(str(ds["id"]), "2d", 0, TRAINER, ds["plans"], True, device=torch.device("cpu"))


def test_foreign_architecture_checkpoint_fails_naming_keys(cli):
    ds = cli["dataset"]
    env = _results_env(cli, "results_bad", MACL_PRETRAINED=cli["bad"])
    rc, out, secs = _run(["nnUNetv2_train", str(ds["id"]), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    assert rc != 0
    assert "IncompatibleCheckpointError" in out, out[-4000:]
    assert "encoder.stages.0.0.convs.0.conv.weight (missing in checkpoint)" in out
    assert "ResidualEncoderUNet" in out
    fold = Path(env["nnUNet_results"]) / ds["name"] / f"{TRAINER}__{ds['plans']}__2d" / "fold_0"
    assert not (fold / "checkpoint_final.pth").exists()
    print(f"refused in {secs:.1f} s")


def test_missing_default_checkpoint_fails_with_instructions(cli):
    ds = cli["dataset"]
    env = _results_env(cli, "results_none")
    rc, out, _ = _run(["nnUNetv2_train", str(ds["id"]), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    assert rc != 0
    assert f"macl_pretrain -d {ds['name']} -c 2d -p {ds['plans']}" in out and "MACL_PRETRAINED" in out, out[-3000:]


def test_pretrained_weights_flag_with_partial_checkpoint(cli):
    """nnU-Net's -pretrained_weights with an encoder(+1 decoder stage)-only file: no crash, reported, no lookup."""
    ds = cli["dataset"]
    full = load_weights_only(str(cli["good"]))
    partial = {"network_weights": {k: v for k, v in full["network_weights"].items()
                                   if k.startswith(("encoder.", "decoder.encoder.", "decoder.stages.0."))}}
    path = cli["base"] / "partial.pth"
    save_checkpoint_atomic(partial, str(path))
    env = _results_env(cli, "results_partial")  # no MACL_PRETRAINED, no default checkpoint
    rc, out, secs = _run(["nnUNetv2_train", str(ds["id"]), "2d", "0", "-tr", TRAINER, "-device", "cpu",
                          "-pretrained_weights", str(path)], env)
    assert rc == 0, out[-4000:]
    assert f"MACL weight transfer from {path}" in out
    # nnUNetTrainerMACL's encoder-only hand-over applies to the flag's file too
    assert "encoder-only transfer" in out and "weights were given with -pretrained_weights" in out
    fold = Path(env["nnUNet_results"]) / ds["name"] / f"{TRAINER}__{ds['plans']}__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    print(f"-pretrained_weights run: {secs:.1f} s")


# ------------------------------------------------------------------ weights precedence and resuming (--c)
PROBE_TRAINER = "nnUNetTrainerMACL_probe"
PROBE_SOURCE = '''
import os
import torch
from nnunetv2_macl.trainers.nnUNetTrainerMACL import nnUNetTrainerMACL_1epoch


class nnUNetTrainerMACL_probe(nnUNetTrainerMACL_1epoch):
    """Test-only: 2 short epochs, checkpoint_latest after each; writes the network's weights as they are
    when training starts to $MACL_TEST_PROBE; $MACL_TEST_INTERRUPT stops the run before epoch 2. Stock recipe:
    it compares the weights that arrive with the file's (the rescale recipe scales them; tested on its own)."""

    finetune_recipe = "stock"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def on_train_start(self):
        super().on_train_start()
        net = self.network._orig_mod if hasattr(self.network, "_orig_mod") else self.network
        torch.save({k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, os.environ["MACL_TEST_PROBE"])

    def on_epoch_start(self):
        if self.current_epoch == 1 and os.environ.get("MACL_TEST_INTERRUPT"):
            raise RuntimeError("simulated interruption before epoch 2")
        super().on_epoch_start()
'''


@pytest.fixture(scope="module")
def probe(cli):
    """The CLI environment plus a test-only trainer folder on nnUNet_extTrainer, and a second checkpoint."""
    folder = cli["base"] / "probe_trainers"
    folder.mkdir(exist_ok=True)
    (folder / "probe_trainer.py").write_text(PROBE_SOURCE)
    env = dict(cli["env"])
    env["nnUNet_extTrainer"] = os.pathsep.join([env["nnUNet_extTrainer"], str(folder)])
    env["nnUNet_n_proc_DA"] = "0"  # in-process data loading: an interrupted run leaves no worker behind
    other = cli["base"] / "other_checkpoint_final.pth"
    ck = load_weights_only(str(cli["good"]))
    ck["network_weights"] = {k: v + 0.5 for k, v in ck["network_weights"].items()}
    save_checkpoint_atomic(ck, str(other))
    return {**cli, "env": env, "other": other}


def _probe_run(probe, name, extra_args=(), **env_extra):
    ds = probe["dataset"]
    env = dict(probe["env"])
    env["nnUNet_results"] = str(probe["base"] / name)
    env.update({k: str(v) for k, v in env_extra.items()})
    rc, out, _ = _run(["nnUNetv2_train", str(ds["id"]), "2d", "0", "-tr", PROBE_TRAINER, "-device", "cpu",
                       *extra_args], env)
    fold = Path(env["nnUNet_results"]) / ds["name"] / f"{PROBE_TRAINER}__{ds['plans']}__2d" / "fold_0"
    return rc, out, fold


KEY = "encoder.stages.0.0.convs.0.conv.weight"


@pytest.mark.e2e
def test_pretrained_weights_flag_wins_over_env_variable(probe):
    """README and code agree: -pretrained_weights FILE wins over MACL_PRETRAINED, and the log says so."""
    probe_file = probe["base"] / "probe_precedence.pth"
    rc, out, fold = _probe_run(probe, "results_precedence", ["-pretrained_weights", str(probe["good"])],
                               MACL_PRETRAINED=probe["other"], MACL_TEST_PROBE=probe_file, MACL_TEST_INTERRUPT=1)
    assert "simulated interruption" in out, out[-3000:]
    start = torch.load(probe_file, weights_only=True)
    good = load_weights_only(str(probe["good"]))["network_weights"]
    other = load_weights_only(str(probe["other"]))["network_weights"]
    assert torch.equal(start[KEY], good[KEY]) and not torch.equal(start[KEY], other[KEY])
    assert f"MACL_PRETRAINED={probe['other']} is ignored (the flag wins)" in out
    assert f"MACL weight transfer from {probe['other']}" not in out


@pytest.mark.e2e
def test_resume_keeps_resumed_weights(probe):
    """nnUNetv2_train --c after an interrupted run: the weights of checkpoint_latest.pth are kept and the
    MACL checkpoint (still named by MACL_PRETRAINED) is not copied over them."""
    first = probe["base"] / "probe_first.pth"
    rc, out, fold = _probe_run(probe, "results_resume", MACL_PRETRAINED=probe["good"], MACL_TEST_PROBE=first,
                               MACL_TEST_INTERRUPT=1)
    assert rc != 0 and "simulated interruption" in out, out[-3000:]
    assert f"MACL weight transfer from {probe['good']}" in out
    latest = load_weights_only(str(fold / "checkpoint_latest.pth"))
    assert latest["current_epoch"] == 1 and not (fold / "checkpoint_final.pth").exists()
    pretrained = load_weights_only(str(probe["good"]))["network_weights"]
    assert not torch.equal(latest["network_weights"][KEY], pretrained[KEY])  # epoch 1 changed them

    resumed = probe["base"] / "probe_resumed.pth"
    rc, out, fold = _probe_run(probe, "results_resume", ["--c"], MACL_PRETRAINED=probe["good"],
                               MACL_TEST_PROBE=resumed)
    assert rc == 0, out[-4000:]
    assert "weights come from the nnU-Net checkpoint being resumed" in (next(fold.glob("training_log_*.txt"))
                                                                         .read_text() + out)
    assert "MACL weight transfer from" not in out
    start = torch.load(resumed, weights_only=True)
    for k, v in latest["network_weights"].items():
        assert torch.equal(start[k.removeprefix("module.")], v), k
    final = load_weights_only(str(fold / "checkpoint_final.pth"))
    assert final["current_epoch"] == 2
