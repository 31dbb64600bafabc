"""The networks the diagnosis compares: nnU-Net's network for the plans, at nnU-Net's initialisation
(one seed for all, so that every start begins from identical weights) and with a checkpoint handed over.

Starts (:data:`START_NAMES`), all built on ``build_network(setup, seed)``:

* ``scratch``: nnU-Net's initialisation;
* ``encoder``: the checkpoint's encoder (transfer scope ``"encoder"``), decoder at initialisation;
* ``pretrained``: the paper's hand-over (scope ``"pretrained"``: encoder and decoder stages 1..N);
* ``pretrained_norms_reset``: the hand-over with every decoder InstanceNorm's weight set to 1 and bias to 0;
* ``stage0_only``: the encoder and decoder stage 0 only (scope ``"pretrained"`` over the checkpoint's
  pretrained prefixes restricted to the encoder and ``decoder.{stages,transpconvs}.0``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nnunetv2_macl.model.macl_network import (
    MACLNetwork, decoder_stage_outputs, encoder_strides, fitting_crop_size)
from nnunetv2_macl.transfer.load_pretrained import (
    ENCODER_PREFIX, TransferReport, load_weights_only, pretrained_prefixes_from_meta, transfer_pretrained_weights)

#: start name -> transfer scope (None: no transfer)
START_SCOPES: dict[str, str | None] = {"scratch": None, "encoder": "encoder", "pretrained": "pretrained",
                                       "pretrained_norms_reset": "pretrained", "stage0_only": "pretrained"}
START_NAMES = tuple(START_SCOPES)
PRE_NORM = "@pre-norm"  # suffix of a stage's last convolution output, before its InstanceNorm


@dataclass
class Setup:
    """The nnU-Net objects a fine-tuning of this dataset would build."""

    plans_manager: object
    configuration_manager: object
    label_manager: object
    dataset_json: dict
    num_input_channels: int
    data_folder: str

    @property
    def num_classes(self) -> int:
        return int(self.label_manager.num_segmentation_heads)

    @property
    def patch_size(self) -> list[int]:
        return [int(p) for p in self.configuration_manager.patch_size]


def load_setup(preprocessed: str, configuration: str = "2d", plans_identifier: str = "nnUNetPlans") -> Setup:
    """Plans, configuration, labels and data folder of a preprocessed dataset (2d only)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = os.path.join(preprocessed, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} does not exist (plan and preprocess the dataset first)")
    if configuration != "2d":
        raise ValueError(f"this diagnosis works on slices: configuration must be '2d', got {configuration!r}")
    dataset_json = json.loads(Path(preprocessed, "dataset.json").read_text())
    pm = PlansManager(plans_file)
    cm = pm.get_configuration(configuration)
    lm = pm.get_label_manager(dataset_json)
    if lm.has_regions:
        raise ValueError("region-based labels are not supported by this diagnosis")
    data_folder = os.path.join(preprocessed, cm.data_identifier)
    if not os.path.isdir(data_folder):
        raise FileNotFoundError(f"{data_folder} does not exist (nnUNetv2_preprocess -c {configuration})")
    return Setup(pm, cm, lm, dataset_json, int(determine_num_input_channels(pm, cm, dataset_json)), data_folder)


def build_network(setup: Setup, seed: int) -> nn.Module:
    """The network nnUNetTrainer builds (deep supervision on), initialised by nnU-Net after
    ``torch.manual_seed(seed)``: every start of one seed begins from identical weights."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cm = setup.configuration_manager
    torch.manual_seed(seed)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, setup.num_input_channels,
                                  setup.num_classes, allow_init=True, deep_supervision=True)


def load_checkpoint_dict(path: str) -> dict:
    """A ``macl_pretrain`` checkpoint, read with ``weights_only=True``."""
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise ValueError(f"{path} is not a macl_pretrain checkpoint (no 'network_weights')")
    return ckpt


def network_from_checkpoint(setup: Setup, checkpoint: dict, scope: str, seed: int) -> tuple[nn.Module, TransferReport]:
    """Fine-tuning's start: nnU-Net's initialisation, then the checkpoint's tensors of ``scope``."""
    net = build_network(setup, seed)
    report = transfer_pretrained_weights(net, checkpoint, log=None, scope=scope)
    return net, report


def restrict_to_decoder_stages(checkpoint: dict, stages: Iterable[int]) -> dict:
    """A shallow copy of ``checkpoint`` whose pretrained prefixes keep the encoder and only the decoder
    stages ``stages`` (with their transposed convolutions): what the ``pretrained`` transfer scope of
    the copy hands over. The tensors are shared, not copied."""
    meta = checkpoint.get("macl") if isinstance(checkpoint.get("macl"), dict) else None
    prefixes = pretrained_prefixes_from_meta(meta)
    if prefixes is None:
        raise ValueError("the checkpoint records no pretrained prefixes (no 'macl' block): cannot restrict its "
                         "decoder stages")
    wanted = {int(j) for j in stages}
    kept = []
    for p in prefixes:
        m = re.match(r"^decoder\.(?:stages|transpconvs)\.(\d+)\.$", p)
        if m is None and (p.startswith(ENCODER_PREFIX) or p.startswith("decoder.encoder.")):
            kept.append(p)
        elif m is not None and int(m.group(1)) in wanted:
            kept.append(p)
    out = dict(checkpoint)
    out["macl"] = {**meta, "pretrained_prefixes": kept}
    return out


def decoder_instance_norms(network: nn.Module) -> dict[str, nn.Module]:
    """Every InstanceNorm of the decoder's stages, by name. ``decoder.encoder`` (an alias of the encoder)
    is left out: its norms are the encoder's."""
    return {f"decoder.stages.{name}": m for name, m in network.decoder.stages.named_modules()
            if isinstance(m, nn.modules.instancenorm._InstanceNorm)}


@torch.no_grad()
def reset_decoder_norms(network: nn.Module) -> int:
    """Set every decoder-stage InstanceNorm's affine weight to 1 and bias to 0 (nnU-Net's initialisation
    of them); returns how many norms were reset."""
    norms = decoder_instance_norms(network)
    for m in norms.values():
        if m.weight is not None:
            m.weight.fill_(1.0)
        if m.bias is not None:
            m.bias.zero_()
    return len(norms)


def build_start(setup: Setup, checkpoint: dict | None, start: str, seed: int,
                pretrained_stages: Sequence[int] | None = None) -> tuple[nn.Module, TransferReport | None]:
    """The network of one start (:data:`START_NAMES`) and its transfer report (None for ``scratch``).

    ``pretrained_stages``: the decoder stages the hand-over loads (for ``stage0_only``, whose stage 0 must
    be one of them); read from a ``pretrained`` transfer when not given."""
    if start not in START_SCOPES:
        raise ValueError(f"start must be one of {START_NAMES}, got {start!r}")
    if start == "scratch":
        return build_network(setup, seed), None
    if checkpoint is None:
        raise ValueError(f"start {start!r} needs a checkpoint")
    if start == "stage0_only":
        if pretrained_stages is None:
            pretrained_stages = loaded_decoder_stages(network_from_checkpoint(setup, checkpoint, "pretrained", seed)[1])
        if 0 not in pretrained_stages:
            raise ValueError("start 'stage0_only': the checkpoint did not pretrain decoder stage 0")
        checkpoint = restrict_to_decoder_stages(checkpoint, [0])
    net, report = network_from_checkpoint(setup, checkpoint, START_SCOPES[start], seed)
    if start == "pretrained_norms_reset":
        report.notes.append(f"{reset_decoder_norms(net)} decoder InstanceNorms reset to weight 1, bias 0")
    return net, report


def loaded_decoder_stages(report: TransferReport) -> list[int]:
    """Indices j of ``decoder.stages.j`` that a transfer report loaded (the pretrained decoder stages)."""
    found = {int(m.group(1)) for k in report.loaded if (m := re.match(r"^decoder\.stages\.(\d+)\.", k))}
    return sorted(found)


def dominant_down(network: nn.Module, decoder_blocks: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pretraining's ``down()`` of the dominant branch (``MACLNetwork.down``), without touching the
    global RNG (building the wrapper initialises projection heads)."""
    with torch.random.fork_rng(devices=[]):
        wrapper = MACLNetwork(network, decoder_blocks=decoder_blocks)
    return wrapper.down


def total_stride(network: nn.Module) -> list[int]:
    """The encoder's total stride per axis."""
    return [int(s) for s in np.prod(np.array(encoder_strides(network)), axis=0)]


def stage_names(network: nn.Module, decoder_stages: Sequence[int]) -> list[str]:
    """Every encoder stage, then the given decoder stages."""
    n_enc = len(network.encoder.stages)
    return [f"encoder.stages.{i}" for i in range(n_enc)] + [f"decoder.stages.{j}" for j in decoder_stages]


def forward_stages(network: nn.Module, x: torch.Tensor, n_decoder: int) -> dict[str, torch.Tensor]:
    """Every encoder stage output (the last is the bottleneck) and the outputs of decoder stages
    0..n_decoder-1, computed as nnU-Net's decoder does (:func:`decoder_stage_outputs`)."""
    skips = network.encoder(x)
    out = {f"encoder.stages.{i}": s for i, s in enumerate(skips)}
    out.update({f"decoder.stages.{s}": y for s, y in enumerate(decoder_stage_outputs(network, skips, n_decoder))})
    return out


def canvas_for(network: nn.Module, decoder_blocks: int, slice_shapes: Iterable[Sequence[int]],
               minimum: Sequence[int]) -> tuple[int, int]:
    """One slice size for everything: the largest slice and the plan's patch, made a valid MACL crop
    (``fitting_crop_size``: a multiple of 1/lambda x the total stride, so that the dominant branch's maps
    align too, with a dominant bottleneck of more than one cell, which instance norm needs)."""
    h, w = int(minimum[0]), int(minimum[1])
    for sh in slice_shapes:
        h, w = max(h, int(sh[0])), max(w, int(sh[1]))
    crop = fitting_crop_size(network, decoder_blocks, [h, w])
    return int(crop[0]), int(crop[1])


def conv_blocks(stage: nn.Module) -> list[nn.Module]:
    """The conv-norm-nonlin blocks of a stage (dynamic_network_architectures' ConvDropoutNormReLU), in order."""
    return [m for m in stage.modules() if hasattr(m, "conv") and hasattr(m, "norm")]


def last_conv(stage: nn.Module) -> nn.Module:
    """The convolution of a stage's last conv-norm-nonlin block."""
    blocks = conv_blocks(stage)
    if not blocks:
        raise ValueError(f"no convolution block with a norm in {type(stage).__name__}")
    return blocks[-1].conv


@torch.no_grad()
def slice_features(network: nn.Module, images: torch.Tensor, n_decoder: int, chunk: int,
                   pre_norm: bool = False) -> dict[str, torch.Tensor]:
    """Stage outputs (:func:`forward_stages`) of ``images`` in chunks; with ``pre_norm`` also each stage's last
    convolution output before its InstanceNorm (key ``stage + PRE_NORM``): after the norm the across-slice
    variance is small by construction (every slice is normalised per channel), before it is not."""
    parts: dict[str, list[torch.Tensor]] = {}
    hooks = []
    if pre_norm:
        stages = {f"encoder.stages.{i}": s for i, s in enumerate(network.encoder.stages)}
        stages.update({f"decoder.stages.{j}": network.decoder.stages[j] for j in range(n_decoder)})
        for name, stage in stages.items():
            hooks.append(last_conv(stage).register_forward_hook(
                lambda _m, _i, out, key=name + PRE_NORM: parts.setdefault(key, []).append(out.detach().clone())))
    try:
        for i in range(0, images.shape[0], chunk):
            for k, v in forward_stages(network, images[i:i + chunk], n_decoder).items():
                parts.setdefault(k, []).append(v)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in parts.items()}
