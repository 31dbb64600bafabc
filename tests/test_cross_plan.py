"""Fine-tuning with a plan other than the pretraining's: two real nnU-Net 3d_fullres plans of
different depth and kernel sizes (planned by nnU-Net's own planner from synthetic datasets).

Plan A: isotropic 32^3 cases -> 4 stages, [3,3,3] kernels everywhere. Plan B: 8 x 24 x 24 cases at
4 x 1 x 1 mm -> 3 stages, [1,3,3] kernels in the first two stages, strides [1,2,2].
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunetv2_macl.training.checkpoint import save_checkpoint_atomic
from nnunetv2_macl.transfer import IncompatibleCheckpointError, transfer_pretrained_weights
from nnunetv2_macl.transfer.load_pretrained import adapt_kernel

BIN = Path(sys.executable).parent
ID_A, ID_B = 941, 942
CONF = "3d_fullres"


@pytest.fixture(scope="module")
def plans_ab(nnunet_env):
    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset, plan_and_preprocess

    out = {}
    for did, name, shape, spacing, n in ((ID_A, "PlanA", (32, 32, 32), (1.0, 1.0, 1.0), 3),
                                         (ID_B, "PlanB", (8, 24, 24), (4.0, 1.0, 1.0), 5)):
        make_synthetic_dataset(str(nnunet_env["raw"]), dataset_id=did, name=name, num_cases=n, shape=shape,
                               seed=did, spacing=spacing)
        plan_and_preprocess(did, configurations=(CONF,), num_processes=2)
        full = f"Dataset{did}_{name}"
        plans_file = nnunet_env["preprocessed"] / full / "nnUNetPlans.json"
        out[did] = {"id": did, "name": full, "plans_file": plans_file,
                    "arch": json.loads(plans_file.read_text())["configurations"][CONF]["architecture"]["arch_kwargs"]}
    a, b = out[ID_A]["arch"], out[ID_B]["arch"]
    assert a["n_stages"] > b["n_stages"], (a["n_stages"], b["n_stages"])
    assert a["kernel_sizes"][0] == [3, 3, 3] and b["kernel_sizes"][0] == [1, 3, 3], (a, b)
    return out


def _network(plans_file, seed=0):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(str(plans_file)).get_configuration(CONF)
    torch.manual_seed(seed)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, 1, 2, allow_init=True, deep_supervision=True)


def _checkpoint(net, decoder_blocks=2, arch_kwargs=None):
    prefixes = ["encoder."] + [f"decoder.{m}.{i}." for m in ("stages", "transpconvs") for i in range(decoder_blocks)]
    meta = {"decoder_blocks": decoder_blocks, "pretrained_prefixes": prefixes, "input_channels": 1}
    if arch_kwargs is not None:  # the plan it was pretrained with, as MACL pretraining records it
        meta["network_arch_init_kwargs"] = arch_kwargs
    return {"network_weights": {k: v.detach().clone() for k, v in net.state_dict().items()}, "macl": meta}


def _assert_stride_notes(report, ckpt_arch, net_arch):
    """Every encoder stage (from the top) whose stride differs between the two plans is named with both."""
    changed = [s for s in range(min(ckpt_arch["n_stages"], net_arch["n_stages"]))
               if list(ckpt_arch["strides"][s]) != list(net_arch["strides"][s])]
    assert changed, "plans A and B must differ in some encoder stride for this test"
    stride_notes = [n for n in report.notes if "stride" in n]
    assert len(stride_notes) == len(changed), report.notes
    for s, note in zip(changed, stride_notes):
        assert f"encoder stage {s}" in note
        assert str(list(ckpt_arch["strides"][s])) in note and str(list(net_arch["strides"][s])) in note


def test_kernel_adaptation_rules():
    w = torch.randn(4, 2, 3, 3, 3)
    shrunk, how = adapt_kernel(w, (1, 3, 3))
    torch.testing.assert_close(shrunk, w.sum(2, keepdim=True))
    assert "[3, 3, 3] -> [1, 3, 3]" in how
    grown, _ = adapt_kernel(shrunk, (3, 3, 3))
    assert torch.equal(grown[:, :, 1], shrunk[:, :, 0]) and not grown[:, :, 0].any() and not grown[:, :, 2].any()
    # a grown kernel answers every input exactly as the pretrained slice-wise kernel did
    x = torch.randn(1, 2, 5, 8, 8)
    torch.testing.assert_close(torch.nn.functional.conv3d(x, grown, padding=1),
                               torch.nn.functional.conv3d(x, shrunk, padding=(0, 1, 1)))
    t = torch.randn(4, 2, 2, 2, 2)  # transposed conv: kernel = stride
    torch.testing.assert_close(adapt_kernel(t, (1, 2, 2), transposed=True)[0], t.mean(2, keepdim=True))
    one = t[:, :, :1]
    torch.testing.assert_close(adapt_kernel(one, (2, 2, 2), transposed=True)[0], one.repeat(1, 1, 2, 1, 1))
    with pytest.raises(ValueError):
        adapt_kernel(w, (2, 3, 3))


def test_deeper_isotropic_plan_into_shallower_anisotropic_plan(plans_ab):
    a = _network(plans_ab[ID_A]["plans_file"], seed=0)
    ckpt = _checkpoint(a, arch_kwargs=plans_ab[ID_A]["arch"])
    b = _network(plans_ab[ID_B]["plans_file"], seed=1)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    report = transfer_pretrained_weights(b, ckpt, log=None)
    sd, src = b.state_dict(), ckpt["network_weights"]
    n_a, n_b = plans_ab[ID_A]["arch"]["n_stages"], plans_ab[ID_B]["arch"]["n_stages"]

    # [3,3,3] -> [1,3,3] where B's plan has in-plane kernels; equal shapes load unchanged
    k0 = "encoder.stages.0.0.convs.0.conv.weight"
    torch.testing.assert_close(sd[k0], src[k0].sum(2, keepdim=True))
    assert "[3, 3, 3] -> [1, 3, 3]" in report.adapted[k0]
    deep = f"encoder.stages.{n_b - 1}.0.convs.1.conv.weight"
    assert torch.equal(sd[deep], src[deep])
    assert report.encoder_loaded == report.encoder_total
    # decoder stages matched by the encoder stage they join: B's deepest takes A's second deepest
    offset = n_a - n_b
    k = "decoder.stages.0.convs.1.norm.weight"
    ck = k.replace(".0.", f".{offset}.", 1)
    assert torch.equal(sd[k], src[ck]) and f"from {ck}" in report.adapted[k]
    # ... except B's transpconvs.0, which reads B's bottleneck, where A's counterpart read a decoder stage's
    # output: initialisation kept (it used to load because the shapes fit)
    for k in ("decoder.transpconvs.0.weight", "decoder.transpconvs.0.bias"):
        assert torch.equal(sd[k], before[k]) and report.skipped[k].startswith("role differs")
    _assert_stride_notes(report, plans_ab[ID_A]["arch"], plans_ab[ID_B]["arch"])
    # B's decoder stage 1 corresponds to A's stage 2, which MACL did not pretrain (N = 2 -> 0, 1)
    assert torch.equal(sd["decoder.stages.1.convs.0.conv.weight"], before["decoder.stages.1.convs.0.conv.weight"])
    assert report.skipped["decoder.stages.1.convs.0.conv.weight"].startswith("not pretrained")
    # stages A has and B lacks: skipped and listed
    assert any(k.startswith(f"encoder.stages.{n_a - 1}.") for k in report.unused_checkpoint_keys)
    assert any(k.startswith("decoder.stages.0.") for k in report.unused_checkpoint_keys)
    summary = report.summary()
    assert "no counterpart in the network" in summary and "1 encoder stage(s) more" in summary


def test_shallower_plan_into_deeper_plan_keeps_extra_stage_at_init(plans_ab):
    b = _network(plans_ab[ID_B]["plans_file"], seed=0)
    a = _network(plans_ab[ID_A]["plans_file"], seed=1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    ckpt = _checkpoint(b, arch_kwargs=plans_ab[ID_B]["arch"])
    report = transfer_pretrained_weights(a, ckpt, log=None)
    n_a = plans_ab[ID_A]["arch"]["n_stages"]
    extra = f"encoder.stages.{n_a - 1}.0.convs.0.conv.weight"
    assert torch.equal(a.state_dict()[extra], before[extra]) and report.skipped[extra].startswith("missing")
    assert report.skipped["decoder.stages.0.convs.0.conv.weight"].startswith("missing")
    k0 = "encoder.stages.0.0.convs.0.conv.weight"  # [1,3,3] -> [3,3,3]: zero-padded around it
    assert "[1, 3, 3] -> [3, 3, 3]" in report.adapted[k0] and not a.state_dict()[k0][:, :, 0].any()
    assert 0.5 <= report.encoder_loaded / report.encoder_total < 1
    # A's transpconvs.1 reads decoder stage 0's output, B's transpconvs.0 (same skip level) B's bottleneck
    for k in ("decoder.transpconvs.1.weight", "decoder.transpconvs.1.bias"):
        assert torch.equal(a.state_dict()[k], before[k]) and report.skipped[k].startswith("role differs")
    # A's transpconvs.2 <- B's transpconvs.1: both read a decoder stage's output; kernel = stride adapted
    assert "decoder.transpconvs.2.weight" in report.loaded and "from decoder.transpconvs.1.weight" in \
        report.adapted["decoder.transpconvs.2.weight"]
    _assert_stride_notes(report, plans_ab[ID_B]["arch"], plans_ab[ID_A]["arch"])
    # too little fits for the threshold asked: still refused (one of four encoder stages missing)
    with pytest.raises(IncompatibleCheckpointError, match="does not fit"):
        transfer_pretrained_weights(_network(plans_ab[ID_A]["plans_file"]), _checkpoint(b), min_fraction=0.9,
                                    log=None)


@pytest.mark.e2e
def test_pretrain_plan_a_finetune_plan_b_through_nnunetv2_train(plans_ab, nnunet_env, tmp_path):
    """macl_pretrain on A (3d_fullres), then stock nnUNetv2_train on B with A's checkpoint."""
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    env = {**os.environ, "nnUNet_results": str(tmp_path / "results"), "nnUNet_n_proc_DA": "0",
           "nnUNet_extTrainer": ext_trainer_value(os.environ.get("nnUNet_extTrainer")), "PYTHONWARNINGS": "ignore"}
    env.pop("MACL_PRETRAINED", None)
    p = subprocess.run([sys.executable, "-m", "nnunetv2_macl.run.pretrain", "-d", str(ID_A), "-c", CONF, "--device",
                        "cpu", "--epochs", "1", "--batch-size", "2", "--patches-per-case", "1", "--num-workers", "0"],
                       env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = tmp_path / "results" / plans_ab[ID_A]["name"] / f"MACLPretrainer__nnUNetPlans__{CONF}" / \
        "checkpoint_final.pth"
    env["MACL_PRETRAINED"] = str(ckpt)
    p = subprocess.run([str(BIN / "nnUNetv2_train"), str(ID_B), CONF, "0", "-tr", "nnUNetTrainerMACL_1epoch",
                        "-device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                       timeout=600)
    out = p.stdout
    assert p.returncode == 0, out[-4000:]
    assert f"MACL weight transfer from {ckpt}" in out
    assert "encoder.stages.0.0.convs.0.conv.weight: kernel [3, 3, 3] -> [1, 3, 3]" in out
    assert "no counterpart in the network" in out and "encoder stage(s) more" in out
    assert "Multi-level Asymmetric Contrastive Learning" in out and "Positional Contrastive Learning" in out
    fold = tmp_path / "results" / plans_ab[ID_B]["name"] / f"nnUNetTrainerMACL_1epoch__nnUNetPlans__{CONF}" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
