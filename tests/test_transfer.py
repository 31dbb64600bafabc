"""Transfer of MACL checkpoints into nnU-Net networks (nnunetv2_macl.transfer) and the trainer's lookup.

Checkpoints are built here in the documented MACL format from ``get_network_from_plans`` state dicts
(with every tensor perturbed, so that "loaded" is distinguishable from "initialised alike").
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_macl.training.checkpoint import CheckpointError, save_checkpoint_atomic
from nnunetv2_macl.transfer import (
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
    TransferReport,
    find_default_checkpoint,
    load_weights_only,
    safe_load_pretrained_weights,
    transfer_pretrained_weights,
)
from nnunetv2_macl.transfer.load_pretrained import unwrap_network

FIRST_CONV = "encoder.stages.0.0.convs.0.conv.weight"


# ----------------------------------------------------------------------------------------------- helpers
def _arch(plans_file, configuration="2d"):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(plans_file))
    cm = pm.get_configuration(configuration)
    return pm, cm


def build_network(plans_file, configuration="2d", input_channels=1, num_heads=3, seed=0,
                  arch_class=None, arch_kwargs=None):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    _, cm = _arch(plans_file, configuration)
    torch.manual_seed(seed)
    return get_network_from_plans(arch_class or cm.network_arch_class_name,
                                  arch_kwargs or cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, input_channels, num_heads,
                                  allow_init=True, deep_supervision=True)


def resenc_kwargs(plans_file, configuration="2d"):
    """The plans' PlainConvUNet kwargs turned into ResidualEncoderUNet kwargs (another architecture)."""
    _, cm = _arch(plans_file, configuration)
    kw = dict(cm.network_arch_init_kwargs)
    kw["n_blocks_per_stage"] = [1] * kw["n_stages"]
    kw.pop("n_conv_per_stage")
    return "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", kw


def macl_checkpoint(network, plans_file, configuration="2d", decoder_blocks=2, input_channels=1,
                    arch_class=None, arch_kwargs=None, dataset_name=None, perturb_seed=123):
    """A checkpoint in the documented MACL format around ``network`` (every tensor perturbed)."""
    pm, cm = _arch(plans_file, configuration)
    g = torch.Generator().manual_seed(perturb_seed)
    sd = {}
    for k, v in network.state_dict().items():
        sd[k] = v.clone() + (torch.randn(v.shape, generator=g) if v.is_floating_point() else 0)
    # aliases must stay identical (one tensor under several keys)
    net_sd = network.state_dict(keep_vars=True)
    first = {}
    for k, t in net_sd.items():
        first.setdefault(id(t), k)
        sd[k] = sd[first[id(t)]]
    prefixes = ["encoder."] + [f"decoder.stages.{i}." for i in range(decoder_blocks)] + \
        [f"decoder.transpconvs.{i}." for i in range(decoder_blocks)]
    return {
        "network_weights": sd,
        "macl": {
            "plans_identifier": pm.plans_name, "configuration": configuration,
            "dataset_name": dataset_name or pm.dataset_name,
            "network_arch_class_name": arch_class or cm.network_arch_class_name,
            "network_arch_init_kwargs": arch_kwargs or cm.network_arch_init_kwargs,
            "network_arch_init_kwargs_req_import": list(cm.network_arch_init_kwargs_req_import),
            "input_channels": input_channels, "decoder_blocks": decoder_blocks,
            "pretrained_prefixes": prefixes, "lambda": [0.25, 0.25], "loss_weights": [1.0, 0.5, 1.0],
            "threshold": 0.1, "tau": 0.1, "method": "macl", "epochs": 1, "epoch": 1,
            "package_version": "0.1.0",
        },
        "heads": {},
    }


def _snapshot(network):
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _is_pretrained_key(k: str, n: int = 2) -> bool:
    return k.startswith("encoder.") or k.startswith("decoder.encoder.") or any(
        k.startswith(f"decoder.stages.{i}.") or k.startswith(f"decoder.transpconvs.{i}.") for i in range(n))


@pytest.fixture(scope="module")
def plans_file(tiny_dataset):
    return tiny_dataset["plans_file"]


# ----------------------------------------------------------------------------------------------- transfer
def test_transfer_loads_encoder_and_pretrained_decoder_stages_only(plans_file, tmp_path):
    src = build_network(plans_file, seed=0)
    ckpt = macl_checkpoint(src, plans_file, decoder_blocks=2)
    path = tmp_path / "ckpt.pth"
    save_checkpoint_atomic(ckpt, str(path))

    net = build_network(plans_file, seed=1)
    before = _snapshot(net)
    logged = []
    report = transfer_pretrained_weights(net, str(path), log=logged.append)
    after = net.state_dict()

    assert isinstance(report, TransferReport)
    n_stages = len(net.decoder.stages)
    assert n_stages > 2, "plans must give a decoder deeper than the pretrained part for this test"
    for k, v in after.items():
        if _is_pretrained_key(k):
            assert torch.equal(v, ckpt["network_weights"][k]), f"{k} was not loaded"
        else:
            assert torch.equal(v, before[k]), f"{k} changed although it was not pretrained"
            assert not torch.equal(v, ckpt["network_weights"][k])
    # counting: every tensor once (aliases collapsed), loaded + skipped = all
    canonical = {id(t) for t in net.state_dict(keep_vars=True).values()}
    assert len(report.loaded) + len(report.skipped) == len(canonical)
    assert report.encoder_loaded == report.encoder_total > 0
    assert all(k.startswith(("encoder.", "decoder.stages.0.", "decoder.stages.1.", "decoder.transpconvs.0.",
                             "decoder.transpconvs.1.")) for k in report.loaded)
    reasons = report.skipped_by_reason()
    assert set(reasons) == {"not pretrained"}
    seg = [k for k in report.skipped if "seg_layers" in k]
    assert seg and all("segmentation head" in report.skipped[k] for k in seg)
    untrained = [k for k in report.skipped if k.startswith(f"decoder.stages.{n_stages - 1}.")]
    assert untrained and all("outside the checkpoint's pretrained prefixes" in report.skipped[k] for k in untrained)
    assert report.adapted == {}
    # the report was logged
    assert len(logged) == 1 and f"loaded {len(report.loaded)} of {len(canonical)} tensors" in logged[0]
    assert str(path) in logged[0] and "seg_layers" in logged[0]


def test_encoder_only_transfer_keeps_the_decoder_at_initialisation(plans_file):
    src = build_network(plans_file, seed=0)
    ckpt = macl_checkpoint(src, plans_file, decoder_blocks=2)
    net = build_network(plans_file, seed=1)
    before = _snapshot(net)
    report = transfer_pretrained_weights(net, ckpt, log=None, scope="encoder")
    after = net.state_dict()
    for k, v in after.items():
        if k.startswith(("encoder.", "decoder.encoder.")):
            assert torch.equal(v, ckpt["network_weights"][k]), f"{k} was not loaded"
        else:  # the pretrained decoder stages as well: initialisation kept
            assert torch.equal(v, before[k]), f"{k} changed in an encoder-only transfer"
    assert report.encoder_loaded == report.encoder_total > 0 and not any(k.startswith("decoder.") for k in report.loaded)
    assert all("encoder-only transfer" in report.skipped[k] for k in report.skipped if k.startswith("decoder.stages.0."))
    assert any("encoder-only" in n for n in report.notes)
    with pytest.raises(ValueError, match="scope"):
        transfer_pretrained_weights(build_network(plans_file, seed=1), ckpt, log=None, scope="decoder")

def test_transfer_unwraps_torch_compile_and_reads_bare_state_dict(plans_file):
    src = build_network(plans_file, seed=0)
    ckpt = macl_checkpoint(src, plans_file)
    net = build_network(plans_file, seed=1)
    wrapped = torch.compile(net)  # OptimizedModule: keys live under _orig_mod
    assert unwrap_network(wrapped) is net
    # a bare state_dict with wrapper prefixes (DDP 'module.' + compile '_orig_mod.'), no MACL metadata:
    bare = {"module._orig_mod." + k: v for k, v in ckpt["network_weights"].items()}
    report = transfer_pretrained_weights(wrapped, bare, log=None)
    # no metadata: nnU-Net semantics, everything except the segmentation layers is transferred
    assert all("seg_layers" in k for k in report.skipped)
    assert torch.equal(net.state_dict()["decoder.stages.2.convs.0.conv.weight"],
                       ckpt["network_weights"]["decoder.stages.2.convs.0.conv.weight"])


@pytest.mark.parametrize("other", ["resenc", "wider"])
def test_other_architecture_is_refused_naming_keys(plans_file, other):
    _, cm = _arch(plans_file)
    if other == "resenc":
        arch_class, kw = resenc_kwargs(plans_file)
        expected_key = FIRST_CONV  # PlainConvUNet key absent from a ResEnc checkpoint
    else:
        arch_class, kw = cm.network_arch_class_name, dict(cm.network_arch_init_kwargs)
        kw["features_per_stage"] = [2 * f for f in kw["features_per_stage"]]
        expected_key = FIRST_CONV  # present, but twice as many filters
    src = build_network(plans_file, arch_class=arch_class, arch_kwargs=kw)
    ckpt = macl_checkpoint(src, plans_file, arch_class=arch_class, arch_kwargs=kw)
    net = build_network(plans_file, seed=1)
    before = _snapshot(net)
    with pytest.raises(IncompatibleCheckpointError) as ei:
        transfer_pretrained_weights(net, ckpt, log=None)
    msg = str(ei.value)
    assert expected_key in msg and "First mismatched keys" in msg
    assert ("missing in checkpoint" in msg) if other == "resenc" else ("vs network" in msg)
    for k, v in net.state_dict().items():  # refused before touching anything
        assert torch.equal(v, before[k])


def test_partial_overlap_below_min_fraction_is_refused(plans_file):
    src = build_network(plans_file, seed=0)
    ckpt = macl_checkpoint(src, plans_file)
    enc = [k for k in ckpt["network_weights"] if k.startswith("encoder.")]
    # keep only the first 30% of the encoder tensors
    keep = set(enc[: int(0.3 * len(enc))])
    ckpt["network_weights"] = {k: v for k, v in ckpt["network_weights"].items()
                               if k in keep or not k.startswith(("encoder.", "decoder.encoder."))}
    net = build_network(plans_file, seed=1)
    with pytest.raises(IncompatibleCheckpointError, match="missing in checkpoint"):
        transfer_pretrained_weights(net, ckpt, log=None)
    # the same checkpoint is accepted with a lower threshold, and the gaps are reported
    report = transfer_pretrained_weights(net, ckpt, min_fraction=0.2, log=None)
    assert 0 < report.encoder_loaded < report.encoder_total
    assert "missing in checkpoint" in report.skipped_by_reason()


@pytest.mark.parametrize("in_pre,in_new", [(4, 1), (1, 3)])
def test_input_channel_adaptation_plain(plans_file, in_pre, in_new):
    src = build_network(plans_file, input_channels=in_pre, seed=0)
    ckpt = macl_checkpoint(src, plans_file, input_channels=in_pre)
    net = build_network(plans_file, input_channels=in_new, seed=1)
    logged = []
    report = transfer_pretrained_weights(net, ckpt, log=logged.append)
    w_pre = ckpt["network_weights"][FIRST_CONV]
    w_new = net.state_dict()[FIRST_CONV]
    assert list(report.adapted) == [FIRST_CONV]
    assert f"{in_pre} -> {in_new}" in report.adapted[FIRST_CONV] and f"{in_pre} -> {in_new}" in logged[0]
    assert FIRST_CONV in report.loaded and not report.skipped_by_reason().get("shape mismatch")
    if in_new < in_pre:
        expected = w_pre.mean(1, keepdim=True).repeat(1, in_new, 1, 1)
    else:
        expected = w_pre[:, [i % in_pre for i in range(in_new)]] * (in_pre / in_new)
    torch.testing.assert_close(w_new, expected)
    assert report.encoder_loaded == report.encoder_total


def test_input_channel_adaptation_resenc_stem(plans_file):
    """ResEnc's first conv is ``encoder.stem...``: found generically, not by name."""
    arch_class, kw = resenc_kwargs(plans_file)
    src = build_network(plans_file, input_channels=4, arch_class=arch_class, arch_kwargs=kw)
    ckpt = macl_checkpoint(src, plans_file, input_channels=4, arch_class=arch_class, arch_kwargs=kw)
    net = build_network(plans_file, input_channels=1, seed=1, arch_class=arch_class, arch_kwargs=kw)
    report = transfer_pretrained_weights(net, ckpt, log=None)
    key = "encoder.stem.convs.0.conv.weight"
    assert list(report.adapted) == [key]
    torch.testing.assert_close(net.state_dict()[key], ckpt["network_weights"][key].mean(1, keepdim=True))


# ----------------------------------------------------------------------------------------------- depth, roles, strides
def _kwargs_with_depth(plans_file, delta: int) -> dict:
    """The plans' PlainConvUNet kwargs with one encoder stage removed (delta = -1) or appended (+1)."""
    _, cm = _arch(plans_file)
    kw = dict(cm.network_arch_init_kwargs)
    per_stage = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage")
    if delta < 0:
        for k in per_stage:
            kw[k] = list(kw[k])[:-1]
        kw["n_conv_per_stage_decoder"] = list(kw["n_conv_per_stage_decoder"])[:-1]
    else:  # one more stage below the bottleneck, built like the deepest one
        for k in per_stage:
            kw[k] = list(kw[k]) + [kw[k][-1]]
        kw["n_conv_per_stage_decoder"] = list(kw["n_conv_per_stage_decoder"]) + [kw["n_conv_per_stage_decoder"][-1]]
    kw["n_stages"] += delta
    return kw


def _stage_input_columns(net, stage: int) -> tuple[slice, slice]:
    """(upsampled, skip) input channels of ``net.decoder.stages[stage]``, found by running the network:
    the block of the stage's input that equals the encoder skip it joins."""
    captured = {}
    n_enc = len(net.encoder.stages)
    hooks = [net.decoder.stages[stage].register_forward_pre_hook(lambda m, a: captured.__setitem__("in", a[0])),
             net.encoder.stages[n_enc - 2 - stage].register_forward_hook(
                 lambda m, a, out: captured.__setitem__("skip", out))]
    with torch.no_grad():
        net.eval()(torch.randn(1, net.encoder.stages[0][0].convs[0].conv.in_channels, 32, 32))
    for h in hooks:
        h.remove()
    c = captured["skip"].shape[1]
    assert captured["in"].shape[1] == 2 * c
    if torch.equal(captured["in"][:, c:], captured["skip"]):
        return slice(0, c), slice(c, 2 * c)
    assert torch.equal(captured["in"][:, :c], captured["skip"])
    return slice(c, 2 * c), slice(0, c)


def _decoder_index_keys(net, kind: str, i: int) -> list[str]:
    """The keys of ``decoder.{kind}.{i}``, each tensor once (nnU-Net exposes some under two keys)."""
    seen, keys = set(), []
    for k, t in net.state_dict(keep_vars=True).items():
        if k.startswith(f"decoder.{kind}.{i}.") and id(t) not in seen:
            seen.add(id(t))
            keys.append(k)
    return keys


def test_deeper_checkpoint_matches_decoder_tensors_by_role(plans_file):
    """Checkpoint one stage deeper, paper hand-over (encoder + decoder stages 0..N-1 of the checkpoint)."""
    kw = _kwargs_with_depth(plans_file, +1)
    src = build_network(plans_file, seed=0, arch_kwargs=kw)
    n_blocks = 3  # the checkpoint's decoder stages 0..2: the network's stages 0 and 1 have pretrained counterparts
    ckpt = macl_checkpoint(src, plans_file, decoder_blocks=n_blocks, arch_kwargs=kw)
    w = ckpt["network_weights"]
    net = build_network(plans_file, seed=1)
    before = _snapshot(net)
    logged = []
    report = transfer_pretrained_weights(net, ckpt, log=logged.append, scope="pretrained")
    after = net.state_dict()
    assert len(net.decoder.stages) == len(src.decoder.stages) - 1 == n_blocks

    # the network's transpconvs.0 reads the bottleneck; the checkpoint's transpconvs.1 (same resolution, same
    # shape) reads decoder stage 0's output: refused, initialisation kept
    refused = {k for k, r in report.skipped.items() if r.startswith("role differs")}
    assert refused == set(_decoder_index_keys(net, "transpconvs", 0)) and refused
    for k in refused:
        assert torch.equal(after[k], before[k])
        assert w[k.replace("transpconvs.0.", "transpconvs.1.")].shape == after[k].shape  # it would have fitted
        assert "reads the bottleneck here" in report.skipped[k] and "decoder-stage output" in report.skipped[k]
        assert f"skipped {k}: role differs" in logged[0]
    # transpconvs.1 reads decoder stage 0's output on both sides: taken from the checkpoint's transpconvs.2
    for k in _decoder_index_keys(net, "transpconvs", 1):
        assert k in report.loaded and torch.equal(after[k], w[k.replace("transpconvs.1.", "transpconvs.2.")])
    # stage 1 <- checkpoint stage 2, every tensor as it is (its input is [upsampled decoder output, skip] on both)
    for k in _decoder_index_keys(net, "stages", 1):
        assert torch.equal(after[k], w[k.replace("stages.1.", "stages.2.", 1)]), k
    # stage 0 <- checkpoint stage 1: the input convolution takes the skip channels only
    first = "decoder.stages.0.convs.0.conv.weight"
    up, skip = _stage_input_columns(net, 0)
    assert torch.equal(after[first][:, skip], w["decoder.stages.1.convs.0.conv.weight"][:, skip])
    assert torch.equal(after[first][:, up], before[first][:, up])
    assert "kept at initialisation" in report.adapted[first] and "role differs" in report.adapted[first]
    for k in _decoder_index_keys(net, "stages", 0):
        if k != first:
            assert torch.equal(after[k], w[k.replace("stages.0.", "stages.1.", 1)]), k
    # the checkpoint's stage 3 was not pretrained (N = 3): the network's stage 2 keeps its initialisation
    for k in _decoder_index_keys(net, "stages", 2) + _decoder_index_keys(net, "transpconvs", 2):
        assert torch.equal(after[k], before[k]) and report.skipped[k].startswith("not pretrained")
    assert report.encoder_loaded == report.encoder_total
    assert not [n for n in report.notes if "stride" in n]  # same strides on the stages both have


def test_shallower_checkpoint_matches_decoder_tensors_by_role(plans_file):
    """Checkpoint one stage shallower, paper hand-over with N = 2 (all of the checkpoint's decoder stages)."""
    kw = _kwargs_with_depth(plans_file, -1)
    src = build_network(plans_file, seed=0, arch_kwargs=kw)
    ckpt = macl_checkpoint(src, plans_file, decoder_blocks=len(src.decoder.stages), arch_kwargs=kw)
    w = ckpt["network_weights"]
    net = build_network(plans_file, seed=1)
    before = _snapshot(net)
    logged = []
    report = transfer_pretrained_weights(net, ckpt, log=logged.append, scope="pretrained")
    after = net.state_dict()
    assert len(net.decoder.stages) == len(src.decoder.stages) + 1 == 3

    # the network's stage 0 joins the encoder stage the checkpoint used as its bottleneck: nothing to take
    for k in _decoder_index_keys(net, "stages", 0) + _decoder_index_keys(net, "transpconvs", 0):
        assert torch.equal(after[k], before[k]) and report.skipped[k].startswith("missing in checkpoint")
    # transpconvs.1 reads decoder stage 0's output here, the checkpoint's transpconvs.0 its bottleneck
    refused = {k for k, r in report.skipped.items() if r.startswith("role differs")}
    assert refused == set(_decoder_index_keys(net, "transpconvs", 1)) and refused
    for k in refused:
        assert torch.equal(after[k], before[k])
        assert w[k.replace("transpconvs.1.", "transpconvs.0.")].shape == after[k].shape
        assert "decoder-stage output" in report.skipped[k] and "the bottleneck in the checkpoint" in report.skipped[k]
        assert f"skipped {k}: role differs" in logged[0]
    first = "decoder.stages.1.convs.0.conv.weight"
    up, skip = _stage_input_columns(net, 1)
    assert torch.equal(after[first][:, skip], w["decoder.stages.0.convs.0.conv.weight"][:, skip])
    assert torch.equal(after[first][:, up], before[first][:, up])
    for k in _decoder_index_keys(net, "stages", 1):
        if k != first:
            assert torch.equal(after[k], w[k.replace("stages.1.", "stages.0.", 1)]), k
    # stage 2 and transpconvs.2 read decoder outputs on both sides: everything taken
    for k in _decoder_index_keys(net, "stages", 2) + _decoder_index_keys(net, "transpconvs", 2):
        ck = k.replace(".2.", ".1.", 1)
        assert k in report.loaded and torch.equal(after[k], w[ck]) and f"from {ck}" in report.adapted[k]
    assert 0.5 <= report.encoder_loaded / report.encoder_total < 1


def test_equal_depth_takes_every_pretrained_decoder_tensor_unchanged(plans_file):
    """No offset, no role change: the split of the input convolution must not happen."""
    src = build_network(plans_file, seed=0)
    ckpt = macl_checkpoint(src, plans_file, decoder_blocks=len(src.decoder.stages))
    net = build_network(plans_file, seed=1)
    report = transfer_pretrained_weights(net, ckpt, log=None)
    for k, v in net.state_dict().items():
        if "seg_layers" not in k:
            assert torch.equal(v, ckpt["network_weights"][k]), k
    assert report.adapted == {} and not any(r.startswith("role differs") for r in report.skipped.values())


def test_changed_encoder_stride_loads_with_a_note(plans_file):
    _, cm = _arch(plans_file)
    net_strides = [list(s) for s in cm.network_arch_init_kwargs["strides"]]
    stage = 2
    assert net_strides[stage] == [2, 2], "plans must downsample stage 2 in both axes for this test"
    kw = dict(cm.network_arch_init_kwargs)
    kw["strides"] = [list(s) for s in net_strides]
    kw["strides"][stage] = [1, 2]  # the checkpoint's plan kept the first axis at this stage
    src = build_network(plans_file, seed=0, arch_kwargs=kw)
    ckpt = macl_checkpoint(src, plans_file, arch_kwargs=kw)
    net = build_network(plans_file, seed=1)
    logged = []
    report = transfer_pretrained_weights(net, ckpt, log=logged.append)

    stride_notes = [n for n in report.notes if "stride" in n]
    assert len(stride_notes) == 1, report.notes
    assert f"encoder stage {stage}" in stride_notes[0] and "[1, 2]" in stride_notes[0] and "[2, 2]" in stride_notes[0]
    assert stride_notes[0] in logged[0]
    # the stage's kernels load as they are (same shape, same filter)
    for k, v in net.state_dict().items():
        if k.startswith(f"encoder.stages.{stage}."):
            assert torch.equal(v, ckpt["network_weights"][k]) and k not in report.adapted
    assert report.encoder_loaded == report.encoder_total

    # an nnU-Net checkpoint records its plan in init_args: the same note
    nnunet_style = {"network_weights": ckpt["network_weights"],
                    "init_args": {"configuration": "2d", "plans": {"configurations": {
                        "2d": {"architecture": {"arch_kwargs": kw}}}}}}
    report = transfer_pretrained_weights(build_network(plans_file, seed=1), nnunet_style, log=None)
    assert [n for n in report.notes if "stride" in n and f"encoder stage {stage}" in n]
    # a plain state dict (or metadata without the plan) cannot tell: no comparison, no error, and since a
    # transposed-convolution kernel (= stride) had to be adapted, the report says that strides are unknown
    for bare in (ckpt["network_weights"],
                 {"network_weights": ckpt["network_weights"],
                  "macl": {k: v for k, v in ckpt["macl"].items() if k != "network_arch_init_kwargs"}}):
        report = transfer_pretrained_weights(build_network(plans_file, seed=1), bare, log=None)
        assert not any(f"encoder stage {stage}" in n for n in report.notes)
        assert any("could not be compared" in n for n in report.notes)
        assert any("transposed convolution" in how for how in report.adapted.values())


# ----------------------------------------------------------------------------------------------- safety
class _WritesFile:
    """Unpickling this runs ``exec`` and writes a marker file (what a malicious checkpoint could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_pickled_payload_is_refused_and_not_executed(plans_file, tmp_path):
    marker = tmp_path / "side_effect.txt"
    src = build_network(plans_file, seed=0)
    ckpt = macl_checkpoint(src, plans_file)
    ckpt["macl"]["payload"] = _WritesFile(str(marker))
    path = tmp_path / "evil.pth"
    torch.save(ckpt, str(path))
    net = build_network(plans_file, seed=1)
    before = _snapshot(net)

    with pytest.raises(CheckpointError, match="Refusing to load"):
        transfer_pretrained_weights(net, str(path), log=None)
    with pytest.raises(CheckpointError):
        safe_load_pretrained_weights(net, str(path))  # what nnUNetv2_train -pretrained_weights now calls
    with pytest.raises(CheckpointError):
        load_weights_only(str(path))  # what nnUNetTrainerMACL.load_checkpoint uses
    assert not marker.exists(), "the pickled payload was executed"
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

    # the payload is live: an unsafe load (what nnU-Net's own loader does) executes it
    torch.load(str(path), weights_only=False)
    assert marker.read_text() == "pwned"


def test_numpy_allow_list_is_minimal(tmp_path):
    ok = {"network_weights": {"w": torch.ones(2)}, "logging": {"mean_fg_dice": [np.float64(0.5), np.float32(1)]},
          "_best_ema": np.float64(0.25), "init_args": {"device": torch.device("cpu")}}
    save_checkpoint_atomic(ok, str(tmp_path / "ok.pth"))
    got = load_weights_only(str(tmp_path / "ok.pth"))
    assert float(got["_best_ema"]) == 0.25 and float(got["logging"]["mean_fg_dice"][1]) == 1.0
    torch.save({"network_weights": {}, "arr": np.zeros(3)}, str(tmp_path / "arr.pth"))
    with pytest.raises(CheckpointError, match="Refusing to load"):
        load_weights_only(str(tmp_path / "arr.pth"))


# ----------------------------------------------------------------------------------------------- lookup
def _touch_ckpt(folder: Path, name="checkpoint_final.pth") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(b"x")
    return p


def test_default_lookup_none_one_several(tmp_path, monkeypatch):
    ds, plans, conf = "Dataset123_Foo", "nnUNetPlans", "2d"
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    with pytest.raises(CheckpointNotFoundError) as ei:
        find_default_checkpoint(ds, plans, conf)
    msg = str(ei.value)
    assert f"macl_pretrain -d {ds} -c {conf} -p {plans}" in msg and "MACL_PRETRAINED" in msg
    # an unfinished pretraining is named
    latest = _touch_ckpt(tmp_path / ds / f"MACLPretrainer__{plans}__{conf}", "checkpoint_latest.pth")
    with pytest.raises(CheckpointNotFoundError, match="unfinished") as ei:
        find_default_checkpoint(ds, plans, conf)
    assert str(latest) in str(ei.value)
    # exactly one
    one = _touch_ckpt(tmp_path / ds / f"MACLPretrainer__{plans}__{conf}")
    _touch_ckpt(tmp_path / ds / f"MACLPretrainer__{plans}__3d_fullres")  # other configuration: ignored
    _touch_ckpt(tmp_path / ds / f"nnUNetTrainer__{plans}__{conf}")  # not a pretraining: ignored
    assert find_default_checkpoint(ds, plans, conf) == str(one)
    # several
    two = _touch_ckpt(tmp_path / ds / f"MACLPretrainer_pcl__{plans}__{conf}")
    with pytest.raises(CheckpointNotFoundError, match="Several") as ei:
        find_default_checkpoint(ds, plans, conf)
    assert str(one) in str(ei.value) and str(two) in str(ei.value)
    monkeypatch.delenv("nnUNet_results")
    with pytest.raises(CheckpointNotFoundError, match="nnUNet_results is not set"):
        find_default_checkpoint(ds, plans, conf)


# ----------------------------------------------------------------------------------------------- trainer, cross-dataset
DATASET_B = 961  # not used by other tests (990-994, 971, 972, 980, 504 are)
PLANS_B = "nnUNetPlansFrom990"


@pytest.fixture(scope="module")
def dataset_b(tiny_dataset, nnunet_env):
    """A second synthetic dataset (other seed and shape) with dataset A's plans moved over, preprocessed."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets
    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset

    make_synthetic_dataset(str(nnunet_env["raw"]), dataset_id=DATASET_B, name="MACLTransferB", num_cases=4,
                           shape=(12, 40, 36), seed=7)
    extract_fingerprints([DATASET_B], num_processes=2, check_dataset_integrity=False, clean=True, verbose=False,
                         show_progress_bar=False)
    move_plans_between_datasets(tiny_dataset["id"], DATASET_B, tiny_dataset["plans"], PLANS_B)
    name = f"Dataset{DATASET_B}_MACLTransferB"
    # nnU-Net's planning step normally puts dataset.json there; we skipped planning B on purpose
    shutil.copy(nnunet_env["raw"] / name / "dataset.json", nnunet_env["preprocessed"] / name / "dataset.json")
    preprocess([DATASET_B], plans_identifier=PLANS_B, configurations=("2d",), num_processes=(2,), verbose=False,
               show_progress_bar=False)
    return {"id": DATASET_B, "name": name, "plans": PLANS_B}


def _trainer(dataset_id, plans, trainer_name="nnUNetTrainerMACL"):
    from nnunetv2.run.run_training import get_trainer_from_args

    return get_trainer_from_args(str(dataset_id), "2d", 0, trainer_name, plans, False, device=torch.device("cpu"))


def pretrained_for_trainers(dataset: dict, folder: Path, monkeypatch) -> dict:
    """A MACL checkpoint of ``dataset``'s plans (seed 0) saved in ``folder`` and named by ``MACL_PRETRAINED``, as a
    user's pretraining would be; returns the checkpoint (``trainer_env`` in conftest finds the trainers)."""
    ckpt = macl_checkpoint(build_network(dataset["plans_file"], seed=0), dataset["plans_file"])
    path = Path(folder) / "pretrained.pth"
    save_checkpoint_atomic(ckpt, str(path))
    monkeypatch.setenv("MACL_PRETRAINED", str(path))
    return ckpt


def test_cross_dataset_transfer_with_moved_plans(tiny_dataset, dataset_b, trainer_env, monkeypatch):
    # pretrained on A (its plans), fine-tuned on B with A's plans moved to B
    src = build_network(tiny_dataset["plans_file"], seed=0)
    ckpt = macl_checkpoint(src, tiny_dataset["plans_file"], dataset_name=tiny_dataset["name"])
    path = trainer_env / "A_checkpoint_final.pth"
    save_checkpoint_atomic(ckpt, str(path))

    trainer = _trainer(dataset_b["id"], dataset_b["plans"])
    assert type(trainer).__name__ == "nnUNetTrainerMACL"
    trainer.initialize()
    # the default lookup is per dataset: nothing for B
    with pytest.raises(CheckpointNotFoundError, match="MACL_PRETRAINED"):
        trainer.apply_macl_pretrained_weights()
    monkeypatch.setenv("MACL_PRETRAINED", str(path))
    report = trainer.apply_macl_pretrained_weights()
    assert report is trainer.macl_transfer_report and report.source == str(path)
    assert report.encoder_loaded == report.encoder_total
    assert any("dataset_name is 'Dataset990_MACLSynthetic'" in n for n in report.notes)
    sd = trainer.network.state_dict()
    assert torch.equal(sd[FIRST_CONV], ckpt["network_weights"][FIRST_CONV])
    log = Path(trainer.log_file).read_text()
    assert "MACL weight transfer from " + str(path) in log and "skipped" in log


def test_trainer_uses_default_checkpoint_and_refuses_foreign_one(tiny_dataset, trainer_env, monkeypatch):
    plans_file = tiny_dataset["plans_file"]
    src = build_network(plans_file, seed=0)
    default = trainer_env / "results" / tiny_dataset["name"] / f"MACLPretrainer__{tiny_dataset['plans']}__2d" / \
        "checkpoint_final.pth"
    save_checkpoint_atomic(macl_checkpoint(src, plans_file), str(default))
    trainer = _trainer(tiny_dataset["id"], tiny_dataset["plans"], "nnUNetTrainerMACL_1epoch")
    trainer.initialize()
    report = trainer.apply_macl_pretrained_weights()
    assert report.source == str(default) and report.encoder_loaded == report.encoder_total

    arch_class, kw = resenc_kwargs(plans_file)
    bad = trainer_env / "resenc.pth"
    save_checkpoint_atomic(macl_checkpoint(build_network(plans_file, arch_class=arch_class, arch_kwargs=kw),
                                           plans_file, arch_class=arch_class, arch_kwargs=kw), str(bad))
    monkeypatch.setenv("MACL_PRETRAINED", str(bad))
    with pytest.raises(IncompatibleCheckpointError, match="ResidualEncoderUNet"):
        trainer.apply_macl_pretrained_weights()


def test_pretrained_weights_flag_path_is_safe_and_wins(tiny_dataset, trainer_env):
    """``maybe_load_checkpoint(..., pretrained_weights_file)`` (nnUNetv2_train -pretrained_weights) in-process."""
    import nnunetv2.run.run_training as rt

    trainer = _trainer(tiny_dataset["id"], tiny_dataset["plans"])  # importing the trainer installs the loader
    assert rt.load_pretrained_weights is safe_load_pretrained_weights
    src = build_network(tiny_dataset["plans_file"], seed=0)
    ckpt = macl_checkpoint(src, tiny_dataset["plans_file"])
    # partial: encoder + decoder stage 0 only, no metadata (nnU-Net's loader would assert on the first absent key)
    partial = {"network_weights": {k: v for k, v in ckpt["network_weights"].items()
                                   if k.startswith(("encoder.", "decoder.encoder.", "decoder.stages.0.",
                                                    "decoder.transpconvs.0."))}}
    path = trainer_env / "partial.pth"
    save_checkpoint_atomic(partial, str(path))
    rt.maybe_load_checkpoint(trainer, False, False, str(path))
    # no MACL_PRETRAINED and no default checkpoint: the -pretrained_weights weights are used, no lookup
    report = trainer.apply_macl_pretrained_weights()
    assert report is not None and report.source == str(path)
    # nnUNetTrainerMACL hands over the encoder only, from the flag's file too; its paper-transfer variant more
    key = "decoder.stages.0.convs.0.conv.weight"
    assert "encoder-only transfer" in report.skipped[key] and report.encoder_loaded == report.encoder_total
    assert not torch.equal(trainer.network.state_dict()[key], ckpt["network_weights"][key])
    paper = _trainer(tiny_dataset["id"], tiny_dataset["plans"], "nnUNetTrainerMACL_paperTransfer")
    rt.maybe_load_checkpoint(paper, False, False, str(path))
    report = paper.apply_macl_pretrained_weights()
    assert key in report.loaded and "missing in checkpoint" in report.skipped_by_reason()
    assert torch.equal(paper.network.state_dict()[key], ckpt["network_weights"][key])


def test_paper_schedule_optimizer(tiny_dataset, trainer_env):
    trainer = _trainer(tiny_dataset["id"], tiny_dataset["plans"], "nnUNetTrainerMACL_paperSchedule")
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.num_epochs == 100
    lrs = []
    for epoch in range(trainer.num_epochs):
        trainer.lr_scheduler.step(epoch)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(5e-6)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[50] == pytest.approx(5e-6 + 0.5 * (5e-4 - 5e-6) * (1 + np.cos(np.pi * 50 / 99)))
    # the log names the optimiser that runs, not nnU-Net's SGD
    text = trainer.recipe_description()
    assert "Adam" in text and "0.0005" in text and "SGD" not in text


def test_macl_trainer_path_output(monkeypatch, capsys):
    from nnunetv2_macl.run import trainer_path

    folder = trainer_path.trainers_dir()
    assert os.path.isfile(os.path.join(folder, "nnUNetTrainerMACL.py"))
    monkeypatch.setenv("nnUNet_extTrainer", "/some/other")
    assert trainer_path.main([]) == 0
    assert capsys.readouterr().out.strip() == f"export nnUNet_extTrainer=/some/other{os.pathsep}{folder}"
    monkeypatch.setenv("nnUNet_extTrainer", folder)  # not appended twice
    trainer_path.main([])
    assert capsys.readouterr().out.strip() == f"export nnUNet_extTrainer={folder}"


# ----------------------------------------------------------------------------------------------- identity
def test_checkpoint_identity_citation_and_format_version(plans_file):
    from nnunetv2_macl.transfer.identity import CHECKPOINT_FORMAT_VERSION, checkpoint_identity

    src = build_network(plans_file, seed=0)
    v1 = macl_checkpoint(src, plans_file)  # a MACL checkpoint written before format versions
    report = transfer_pretrained_weights(build_network(plans_file, seed=1), v1, log=None)
    assert report.format_version == 1 and "Multi-level Asymmetric Contrastive Learning" in report.citation
    current = {**checkpoint_identity(), **v1}
    report = transfer_pretrained_weights(build_network(plans_file, seed=1), current, log=None)
    assert report.format_version == CHECKPOINT_FORMAT_VERSION and "Positional Contrastive Learning" in report.citation
    plain = {"network_weights": v1["network_weights"]}  # e.g. nnU-Net's own checkpoint: nothing to cite
    assert transfer_pretrained_weights(build_network(plans_file, seed=1), plain, log=None).citation == ""
    newer = {**current, "format_version": CHECKPOINT_FORMAT_VERSION + 1}
    with pytest.raises(IncompatibleCheckpointError, match="Upgrade nnunetv2_macl"):
        transfer_pretrained_weights(build_network(plans_file, seed=1), newer, log=None)
