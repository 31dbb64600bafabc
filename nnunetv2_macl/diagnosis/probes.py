"""Part (b) / E3: linear probes on frozen stage features, and the Dice measures shared with part (c).

A probe is a 1x1 convolution on the frozen features of a stage -> classes, its logits upsampled
bilinearly to the slice (cell j of stride t sits on pixel t*j, nnU-Net's geometry), trained with
cross-entropy (+ soft Dice) on the training cases' slices (33 % of each batch forced to hold foreground,
as nnU-Net samples)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FG_OVERSAMPLE = 0.33  # nnU-Net's oversample_foreground_percent


def upsample_logits(logits: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of a stride-t map to ``out_size`` pixels with cell j centred on pixel t*j
    (nnU-Net's strided 3x3 convolutions): align_corners=True onto t*(h-1)+1 pixels, then the last cell
    is repeated over the t-1 pixels that follow it."""
    h, w = logits.shape[-2:]
    th, tw = int(out_size[0]) // h, int(out_size[1]) // w
    if th * h != int(out_size[0]) or tw * w != int(out_size[1]):
        raise ValueError(f"output {tuple(out_size)} is not an integer multiple of the map {h}x{w}")
    if th == tw == 1:
        return logits
    up = F.interpolate(logits, size=(th * (h - 1) + 1, tw * (w - 1) + 1), mode="bilinear", align_corners=True)
    return F.pad(up, (0, tw - 1, 0, th - 1), mode="replicate")


def draw_foreground_forced(batch_size: int, fg_fraction: float = FG_OVERSAMPLE) -> list[bool]:
    """nnU-Net's deterministic oversampling: the last samples of a batch must show foreground."""
    return [not i < round(batch_size * (1 - fg_fraction)) for i in range(batch_size)]


def draw_probe_slices(rng: np.random.Generator, batch_size: int, num_slices: int,
                      slices_with_class: dict[int, np.ndarray], fg_fraction: float = FG_OVERSAMPLE) -> np.ndarray:
    """Slice indices of one probe batch: uniform, except the forced ones: a class drawn among the
    present foreground classes, then a slice that holds it."""
    present = [c for c, idx in sorted(slices_with_class.items()) if len(idx)]
    out = []
    for forced in draw_foreground_forced(batch_size, fg_fraction):
        if forced and present:
            c = present[int(rng.integers(len(present)))]
            out.append(int(rng.choice(slices_with_class[c])))
        else:
            out.append(int(rng.integers(num_slices)))
    return np.asarray(out)


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """1 - mean over foreground classes of the batch soft Dice (padding excluded)."""
    onehot = F.one_hot(target.clamp(min=0), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid[:, None].to(probs.dtype)
    p, t = (probs * mask)[:, 1:], (onehot * mask)[:, 1:]
    inter = (p * t).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + t.sum((0, 2, 3))
    return 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, iters: int = 300,
                       lr: float = 1e-2, batch_size: int = 16, seed: int = 0, use_dice: bool = True,
                       fg_fraction: float = FG_OVERSAMPLE) -> nn.Conv2d:
    """A 1x1 convolution from frozen ``features`` (N, C, h, w) to ``num_classes`` logits, upsampled to
    the label grid ``labels`` (N, H, W; -1 marks padding, left out of every loss), trained with Adam on
    cross-entropy (+ soft Dice) for ``iters`` batches of slices drawn by :func:`draw_probe_slices`."""
    features = features.float()
    labels = labels.long()
    n = features.shape[0]
    slices_with_class = {c: torch.nonzero((labels == c).flatten(1).any(1)).flatten().numpy()
                         for c in range(1, num_classes)}
    torch.manual_seed(seed)
    probe = nn.Conv2d(features.shape[1], num_classes, 1)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    rng = np.random.default_rng([seed, 7])
    out_size = labels.shape[-2:]
    for _ in range(int(iters)):
        idx = torch.from_numpy(draw_probe_slices(rng, min(batch_size, max(n, 1)), n, slices_with_class, fg_fraction))
        logits = upsample_logits(probe(features[idx]), out_size)
        target = labels[idx]
        valid = target >= 0
        loss = F.cross_entropy(logits, target, ignore_index=-1)
        if use_dice and num_classes > 1:
            loss = loss + soft_dice_loss(logits.softmax(1), target, valid, num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval()


@torch.no_grad()
def probe_predict(probe: nn.Module, features: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """The probe's class per pixel of ``out_size`` (N, *out_size)."""
    return upsample_logits(probe(features.float()), out_size).argmax(1)


class DiceAccumulator:
    """Foreground Dice per class: per volume (then the mean over volumes; a class absent from reference
    and prediction of a volume is skipped, as nnU-Net's summary does) and global (all voxels pooled)."""

    def __init__(self, num_classes: int) -> None:
        self.classes = list(range(1, num_classes))
        self.per_volume: dict[str, dict[int, float]] = {}
        self.tp = np.zeros(len(self.classes))
        self.fp = np.zeros(len(self.classes))
        self.fn = np.zeros(len(self.classes))

    def add_volume(self, identifier: str, prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> None:
        pred, ref = np.asarray(prediction), np.asarray(reference)
        scores = {}
        for i, c in enumerate(self.classes):
            p, r = pred == c, ref == c
            tp, fp, fn = float((p & r).sum()), float((p & ~r).sum()), float((~p & r).sum())
            self.tp[i] += tp
            self.fp[i] += fp
            self.fn[i] += fn
            scores[c] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) > 0 else float("nan")
        self.per_volume[identifier] = scores

    def result(self) -> dict:
        per_class = {}
        for i, c in enumerate(self.classes):
            vals = [s[c] for s in self.per_volume.values() if np.isfinite(s[c])]
            denom = 2 * self.tp[i] + self.fp[i] + self.fn[i]
            per_class[str(c)] = {"dice_per_volume_mean": float(np.mean(vals)) if vals else float("nan"),
                                 "dice_global": float(2 * self.tp[i] / denom) if denom > 0 else float("nan")}
        means = [v["dice_per_volume_mean"] for v in per_class.values() if np.isfinite(v["dice_per_volume_mean"])]
        globs = [v["dice_global"] for v in per_class.values() if np.isfinite(v["dice_global"])]
        return {"per_class": per_class, "mean_dice": float(np.mean(means)) if means else float("nan"),
                "mean_dice_global": float(np.mean(globs)) if globs else float("nan"),
                "num_volumes": len(self.per_volume)}
