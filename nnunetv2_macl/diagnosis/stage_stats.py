"""E1: what the decoder stages hand to fine-tuning at iteration 0, measured on real slices.

Per decoder stage j of nnU-Net's UNetDecoder (stage input = [transpconvs[j](previous), encoder skip]):

* ``norms``: for each InstanceNorm of the stage, mean |weight - 1| and mean |bias| (nnU-Net initialises
  them to 1 and 0);
* ``mean_abs_output``: mean |x| of the stage output;
* ``pre_norm_spread``: per conv-norm-nonlin block, the spread of the convolution's output before its norm (the
  RMS over slices and channels of each channel's std over the slice's cells): the norm divides by it, so a
  filter whose spread is s times a fresh filter's gets 1/s of the weight gradient (``mean``: over the blocks);
* ``fraction_negative_pre_activation``: per conv-norm-nonlin block, the share of the norm's output (the
  LeakyReLU's input) below zero (``last``: the stage's last block);
* ``location_cosine``: the mean cosine similarity between the channel vectors of two different
  locations of one slice's stage output, averaged over slices (1: every location says the same);
* ``input_halves``: the RMS of the upsampled half and of the skip half of the stage input, and their ratio;
* ``seg_logit_std``: the std of ``decoder.seg_layers.j``'s logits (the deep-supervision head on the
  stage), per class over all cells of all slices, averaged over classes.

Every value is taken over the content cells only (:func:`~.variance.content_cells`: slices sit at the top
left of the canvas; the padding is not image).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nnunetv2_macl.diagnosis.networks import conv_blocks
from nnunetv2_macl.diagnosis.variance import content_cells
from nnunetv2_macl.training.diagnostics import mean_pairwise_cosine


def norm_parameters(stage: nn.Module) -> dict[str, dict[str, float]]:
    """Mean |weight - 1| and mean |bias| of every InstanceNorm of ``stage``, by module name."""
    out = {}
    for name, m in stage.named_modules():
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            w = m.weight.detach() if m.weight is not None else torch.ones(m.num_features)
            b = m.bias.detach() if m.bias is not None else torch.zeros(m.num_features)
            out[name] = {"mean_abs_weight_minus_1": float((w - 1).abs().mean()), "mean_abs_bias": float(b.abs().mean())}
    return out


class _StageAccumulator:
    """Running sums of one decoder stage's statistics over slices."""

    def __init__(self, num_blocks: int) -> None:
        self.abs_sum = 0.0
        self.cells = 0
        self.negative = np.zeros(num_blocks)
        self.pre_activation_values = np.zeros(num_blocks)
        self.spread_sq = np.zeros(num_blocks)  # sums of per-slice, per-channel variances before the norm
        self.spread_n = np.zeros(num_blocks)
        self.cosine_sum = 0.0
        self.cosine_slices = 0
        self.up_sq, self.up_n, self.skip_sq, self.skip_n = 0.0, 0, 0.0, 0
        self.logit_sum: np.ndarray | None = None
        self.logit_sq: np.ndarray | None = None
        self.logit_n = 0


class StageStatistics:
    """E1 statistics of ``decoder_stages`` of one network, fed slice batches with :meth:`add`.

    ``network`` is put in eval mode and run whole (its own forward, deep supervision on); hooks read the
    stage inputs and outputs, the norms' outputs and the segmentation heads' logits."""

    def __init__(self, network: nn.Module, decoder_stages: Sequence[int]) -> None:
        self.network = network
        self.stages = [int(j) for j in decoder_stages]
        decoder = network.decoder
        self.blocks = {j: conv_blocks(decoder.stages[j]) for j in self.stages}
        self.acc = {j: _StageAccumulator(len(self.blocks[j])) for j in self.stages}
        self.up_channels = {j: int(decoder.transpconvs[j].out_channels) for j in self.stages}

    @torch.no_grad()
    def add(self, images: torch.Tensor, slice_shape: Sequence[int], chunk: int = 32) -> None:
        """``images`` (B, C, *canvas): slices of one size ``slice_shape`` at the top left of the canvas."""
        canvas = images.shape[-2:]
        captured: dict[tuple, torch.Tensor] = {}
        decoder = self.network.decoder
        hooks = []
        for j in self.stages:
            hooks.append(decoder.stages[j].register_forward_pre_hook(
                lambda _m, inp, key=("in", j): captured.__setitem__(key, inp[0])))
            hooks.append(decoder.stages[j].register_forward_hook(
                lambda _m, _i, out, key=("out", j): captured.__setitem__(key, out)))
            for b, block in enumerate(self.blocks[j]):
                hooks.append(block.conv.register_forward_hook(
                    lambda _m, _i, out, key=("conv", j, b): captured.__setitem__(key, out)))
                # cloned: nnU-Net's LeakyReLU works in place on the norm's output
                hooks.append(block.norm.register_forward_hook(
                    lambda _m, _i, out, key=("norm", j, b): captured.__setitem__(key, out.detach().clone())))
            if j < len(decoder.seg_layers):
                hooks.append(decoder.seg_layers[j].register_forward_hook(
                    lambda _m, _i, out, key=("seg", j): captured.__setitem__(key, out)))
        self.network.eval()
        try:
            for i in range(0, images.shape[0], chunk):
                captured.clear()
                self.network(images[i:i + chunk])
                for j in self.stages:
                    self._accumulate(j, captured, slice_shape, canvas)
        finally:
            for h in hooks:
                h.remove()

    def _accumulate(self, j: int, captured: dict, slice_shape: Sequence[int], canvas: Sequence[int]) -> None:
        acc = self.acc[j]

        def content(t: torch.Tensor) -> torch.Tensor:
            h, w = content_cells(slice_shape, canvas, t.shape[-2:])
            return t[..., :h, :w].double()

        out = content(captured[("out", j)])
        acc.abs_sum += float(out.abs().sum())
        acc.cells += out.numel()
        for b in range(len(self.blocks[j])):
            pre = content(captured[("norm", j, b)])
            acc.negative[b] += float((pre < 0).sum())
            acc.pre_activation_values[b] += pre.numel()
            conv_out = content(captured[("conv", j, b)]).flatten(2)  # (slices, channels, cells)
            if conv_out.shape[-1] >= 2:
                acc.spread_sq[b] += float(conv_out.var(dim=2, unbiased=False).sum())
                acc.spread_n[b] += conv_out.shape[0] * conv_out.shape[1]
        for s in range(out.shape[0]):
            vectors = out[s].flatten(1).T  # (cells, channels)
            if vectors.shape[0] >= 2:
                acc.cosine_sum += mean_pairwise_cosine(vectors)
                acc.cosine_slices += 1
        stage_input = content(captured[("in", j)])
        up, skip = stage_input[:, :self.up_channels[j]], stage_input[:, self.up_channels[j]:]
        acc.up_sq += float((up ** 2).sum())
        acc.up_n += up.numel()
        acc.skip_sq += float((skip ** 2).sum())
        acc.skip_n += skip.numel()
        if ("seg", j) in captured:
            logits = content(captured[("seg", j)]).transpose(0, 1).flatten(1)  # (classes, cells)
            if acc.logit_sum is None:
                acc.logit_sum = np.zeros(logits.shape[0])
                acc.logit_sq = np.zeros(logits.shape[0])
            acc.logit_sum += logits.sum(1).numpy()
            acc.logit_sq += (logits ** 2).sum(1).numpy()
            acc.logit_n += logits.shape[1]

    def result(self) -> dict[str, dict]:
        """Per stage ``decoder.stages.j`` the statistics of the module docstring."""
        out = {}
        for j in self.stages:
            acc = self.acc[j]
            fractions = [float(n / v) if v else float("nan") for n, v in zip(acc.negative, acc.pre_activation_values)]
            up_rms = float(np.sqrt(acc.up_sq / acc.up_n)) if acc.up_n else float("nan")
            skip_rms = float(np.sqrt(acc.skip_sq / acc.skip_n)) if acc.skip_n else float("nan")
            logit_std = float("nan")
            if acc.logit_n:
                mean = acc.logit_sum / acc.logit_n
                var = np.maximum(acc.logit_sq / acc.logit_n - mean ** 2, 0.0)
                logit_std = float(np.mean(np.sqrt(var)))
            spreads = [float(np.sqrt(s / n)) if n else float("nan") for s, n in zip(acc.spread_sq, acc.spread_n)]
            norms = norm_parameters(self.network.decoder.stages[j])
            out[f"decoder.stages.{j}"] = {
                "norms": norms,
                "norm_mean_abs_weight_minus_1": float(np.mean([v["mean_abs_weight_minus_1"] for v in norms.values()]))
                if norms else float("nan"),
                "norm_mean_abs_bias": float(np.mean([v["mean_abs_bias"] for v in norms.values()])) if norms
                else float("nan"),
                "mean_abs_output": acc.abs_sum / acc.cells if acc.cells else float("nan"),
                "pre_norm_spread": {"blocks": spreads, "mean": float(np.mean(spreads)) if spreads else float("nan")},
                "fraction_negative_pre_activation": {"blocks": fractions, "last": fractions[-1] if fractions
                                                     else float("nan")},
                "location_cosine": acc.cosine_sum / acc.cosine_slices if acc.cosine_slices else float("nan"),
                "input_halves": {"upsampled_channels": self.up_channels[j], "upsampled_rms": up_rms,
                                 "skip_rms": skip_rms,
                                 "upsampled_to_skip": up_rms / skip_rms if skip_rms > 0 else float("nan")},
                "seg_logit_std": logit_std,
                "num_slices": acc.cosine_slices,
            }
        return out


def stage_statistics(networks: dict[str, nn.Module], slices: Iterable[tuple[torch.Tensor, Sequence[int]]],
                     decoder_stages: Sequence[int], chunk: int = 32) -> dict[str, dict]:
    """E1 of several networks on the same slices: ``slices`` yields (images (B, C, *canvas), slice shape)
    per case; returns {network name: :meth:`StageStatistics.result`}."""
    stats = {name: StageStatistics(net, decoder_stages) for name, net in networks.items()}
    for images, slice_shape in slices:
        for s in stats.values():
            s.add(images, slice_shape, chunk)
    return {name: s.result() for name, s in stats.items()}
