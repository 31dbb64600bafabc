"""Bring pretrained filters back to the output spread of nnU-Net's initialisation, keeping the function.

Why (issue 29, docs/RESULTS.md): in nnU-Net's blocks an InstanceNorm follows every convolution, so scaling a
filter (and its bias) by c > 0 changes nothing downstream: same function, same gradient at every activation.
What the scale changes is how fast fine-tuning moves the filter: its gradient scales by 1/c and its size by c,
so its step relative to its size by 1/c^2. On real Hippocampus slices the convolutions a 2-epoch MACL
pretraining hands over put out 3-6 x the spread of nnU-Net's initialisation before their norm (bottleneck 3.0 /
5.2 against 0.8; the handed-over decoder stages 2.6-5.9 against 0.8-0.9): under nnU-Net's learning rate they
move 1/9 to 1/36 as fast, relative to themselves, as the fresh filters beside them, which is one reason the
hand-over stays where the pretraining left it. Rescaling each pretrained filter to the initial spread, measured
on a batch of real inputs (a learned filter matches its input, so its weight norm, 1.2-3 x, says only part of
it), keeps the function and gives those filters nnU-Net's effective learning rate back.

The spreads are measured on at least ``MIN_CALIBRATION_IMAGES`` training images: one batch of a 2-D plan (batch
12-49), several of a 3-D plan (batch 2), so that one batch's content does not set the scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from nnunetv2_macl.transfer.load_pretrained import unwrap_network

MIN_CALIBRATION_IMAGES = 16  # the spreads are measured on at least this many training images ...
MAX_CALIBRATION_BATCHES = 8  # ... drawn in at most this many batches


def normalised_convolutions(mod: nn.Module) -> dict[str, str | None]:
    """Weight key -> bias key (None without bias) of every convolution whose output an InstanceNorm normalises
    next (nnU-Net's ``ConvDropoutNormReLU``: ``.conv``, optional dropout, ``.norm``; also with the LeakyReLU
    first, which is positively homogeneous). Scaling such a convolution's filter k and its bias k by c > 0
    changes nothing downstream: the norm divides the channel by its own spread (up to its eps)."""
    out: dict[str, str | None] = {}
    for name, m in mod.named_modules():
        conv, norm = getattr(m, "conv", None), getattr(m, "norm", None)
        if isinstance(conv, nn.modules.conv._ConvNd) and not isinstance(conv, nn.modules.conv._ConvTransposeNd) \
                and isinstance(norm, nn.modules.instancenorm._InstanceNorm):
            prefix = f"{name}.conv." if name else "conv."
            out[prefix + "weight"] = prefix + "bias" if conv.bias is not None else None
    return out


@dataclass
class Calibration:
    """What :func:`calibrate_to_reference` did: per layer (weight key) the mean spread before and after, and
    the reference's."""

    layers: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # key -> (before, after, reference)
    images: int = 0  # how many training images the spreads were measured on

    def summary(self) -> str:
        if not self.layers:
            return "calibration: no pretrained convolution followed by an InstanceNorm; nothing rescaled"
        factors = sorted(ref / max(before, 1e-12) for before, _, ref in self.layers.values())
        return (f"calibration: {len(self.layers)} pretrained convolutions rescaled to the output spread of nnU-Net's "
                f"initialisation on {self.images} training images (same function); factor median {factors[len(factors) // 2]:.3f}, "
                f"range {factors[0]:.3f}..{factors[-1]:.3f}")


def draw_calibration_batches(next_batch: Callable[[], torch.Tensor], min_images: int = MIN_CALIBRATION_IMAGES,
                             max_batches: int = MAX_CALIBRATION_BATCHES) -> list[torch.Tensor]:
    """Batches from ``next_batch()`` until they hold ``min_images`` images or ``max_batches`` were drawn."""
    batches = [next_batch()]
    while sum(len(b) for b in batches) < min_images and len(batches) < max_batches:
        batches.append(next_batch())
    return batches


def _spreads(network: nn.Module, keys: Iterable[str], batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per key, the RMS over all the batches' images of each output channel's spatial std, before the norm."""
    modules = dict(network.named_modules())
    device = next(network.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for key in keys:
        conv = modules[key[: -len(".weight")]]

        def hook(_module, _inputs, output, key=key):
            var = output.detach().float().flatten(2).var(dim=2).sum(dim=0)
            sums[key] = var if key not in sums else sums[key] + var

        hooks.append(conv.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                network(batch.to(device))
    finally:
        for h in hooks:
            h.remove()
    images = sum(len(b) for b in batches)
    return {k: (v / images).sqrt() for k, v in sums.items()}


@torch.no_grad()
def calibrate_to_reference(network: nn.Module, reference: nn.Module, batch: torch.Tensor | Sequence[torch.Tensor],
                           keys: Iterable[str] | None = None) -> Calibration:
    """Scale, in place, each filter (and bias) of ``network``'s normalised convolutions ``keys`` (weight keys of
    :func:`normalised_convolutions`; default all) so that its output spread before the norm on ``batch`` (one
    tensor or several: the spread is over all their images) equals the mean spread of the same layer in
    ``reference`` (the same architecture at nnU-Net's initialisation).
    One forward pass each: rescaling a layer leaves every later layer's input as it was (the norm removes the
    scale), so all layers are measured at once. Both networks run in eval mode for the measurement (no dropout)
    and are left in the mode they were in."""
    net, ref = unwrap_network(network), unwrap_network(reference)
    convs = normalised_convolutions(net)
    wanted = [k for k in (convs if keys is None else keys) if k in convs]
    result = Calibration()
    if not wanted:
        return result
    modes = net.training, ref.training
    net.eval(), ref.eval()
    try:
        batches = [batch] if isinstance(batch, torch.Tensor) else list(batch)
        before = _spreads(net, wanted, batches)
        target = _spreads(ref, wanted, batches)
        params = dict(net.named_parameters())
        for key in wanted:
            goal = target[key].mean().to(before[key].device)
            factor = goal / before[key].clamp_min(1e-6 * max(goal.item(), 1e-12))
            weight = params[key]
            weight.mul_(factor.to(weight.dtype).view(-1, *([1] * (weight.ndim - 1))))
            if convs[key] is not None:
                params[convs[key]].mul_(factor.to(weight.dtype))
        after = _spreads(net, wanted, batches)
        result.images = sum(len(b) for b in batches)
        result.layers = {k: (before[k].mean().item(), after[k].mean().item(), target[k].mean().item()) for k in wanted}
    finally:
        net.train(modes[0]), ref.train(modes[1])
    return result


__all__ = ["Calibration", "calibrate_to_reference", "draw_calibration_batches", "normalised_convolutions",
           "MIN_CALIBRATION_IMAGES"]
