"""Why does handing the MACL-pretrained decoder stages to nnU-Net fine-tuning lose against the encoder only?

Three measurements on a labeled nnU-Net preprocessed dataset (2d), for one ``macl_pretrain`` checkpoint:

(a) Variance decomposition of every stage the pretraining trained (encoder stage outputs incl. the
    bottleneck; decoder stages 1..N), pretrained against the encoder-only start (the same pretrained
    encoder, nnU-Net's initialisation of the decoder: the reference for the decoder stages) and against
    the same architecture at random initialisation (same seed). Every stage is also measured before its
    last InstanceNorm (``<stage>@pre-norm``: the last convolution's output), where the across-slice
    variance is not normalised away slice by slice. Per channel, the variance of a feature over all content cells of all validation slices
    splits exactly into ``spatial`` (the mean over slices of the within-slice variance, weighted by the
    slice's number of cells) plus ``across`` (the weighted variance over slices of the slice's spatial
    mean). Reported: ``spatial_fraction`` = mean over live channels of spatial / total, and
    ``position_share`` = mean over live channels of the share of the across-slice variance explained by
    the slice position (10 position bins, eta^2). Done on the full-resolution slice (what fine-tuning
    feeds) and on the dominant-branch input ``MACLNetwork.down(slice)`` (what the pretraining loss saw).
(b) Linear probe: a 1x1 convolution on the frozen features of each stage -> classes, logits upsampled
    bilinearly to the slice (cell j of stride t sits on pixel t*j, nnU-Net's geometry), trained with
    cross-entropy (+ soft Dice) on the training cases' slices (33 % of each batch forced to hold
    foreground, as nnU-Net samples), evaluated as foreground Dice per class on every (or
    ``--max-val-slices``) slices of the validation cases, per volume then averaged over volumes
    (nnU-Net's convention; a class absent from reference and prediction is skipped), plus the global
    Dice over all voxels.
(c) The first K fine-tuning iterations from three starts built with the same seed: ``scratch``,
    ``encoder`` (scope="encoder") and ``pretrained`` (scope="pretrained", the paper's hand-over), with
    nnU-Net's own loss (``nnUNetTrainer._build_loss``: DC_and_CE_loss in a DeepSupervisionWrapper),
    optimiser (SGD 1e-2, momentum 0.99, nesterov, weight decay 3e-5; nnU-Net's poly decay per epoch,
    lr (1 - epoch / epochs)^0.9, over the few-label protocol's schedule: ``--poly-iters`` 1,000
    iterations of ``--iters-per-epoch`` 25 by default; 0 keeps the rate constant) and gradient clipping
    (norm 12), on augmentation-free random crops of the plan's patch size with the same draws for
    every start. Logged per iteration: loss, the gradient L2 norm of each parameter group (before
    clipping), the fraction of pixels predicted foreground and the hard foreground Dice of the batch.

Usage::

    python pretrain/decoder_diagnosis.py --checkpoint CKPT/checkpoint_final.pth \\
        --preprocessed $nnUNet_preprocessed/Dataset504_Hippocampus \\
        --train-cases hippocampus_001,hippocampus_003,... --val-cases val_cases.txt --out diag/
    python pretrain/decoder_diagnosis.py --checkpoint CKPT --preprocessed DIR \\
        --fewlabel-workdir $nnUNet_results/Dataset504_Hippocampus/macl_fewlabel --budget 4 --fold 0 --out diag/

Writes ``decoder_diagnosis.json``, ``decoder_diagnosis.md`` and (part c) ``decoder_diagnosis_finetune.png``
in ``--out``. CPU-friendly: ``--max-val-slices``, ``--probe-iters``, ``--finetune-iters``; torch uses
``OMP_NUM_THREADS`` threads (``--threads`` overrides).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

START_NAMES = ("scratch", "encoder", "pretrained")
POSITION_BINS = 10
FG_OVERSAMPLE = 0.33  # nnU-Net's oversample_foreground_percent
CLIP_GRAD_NORM = 12.0  # nnUNetTrainer.train_step
LIVE_VARIANCE = 1e-10  # channels whose total variance is below this are constant ("dead")


# =====================================================================================================
# data
# =====================================================================================================
@dataclass
class Case:
    """One preprocessed case: image (C, Z, Y, X) float32 and labels (Z, Y, X) int64 with nnU-Net's -1
    (outside the nonzero mask) turned into background, as its training pipeline does."""

    identifier: str
    image: np.ndarray
    seg: np.ndarray

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[1])

    @property
    def slice_shape(self) -> tuple[int, int]:
        return int(self.image.shape[2]), int(self.image.shape[3])


def _read_array(folder: str, name: str, npz_key: str) -> np.ndarray:
    b2nd = os.path.join(folder, name + ".b2nd")
    if os.path.isfile(b2nd):
        import blosc2

        return np.asarray(blosc2.open(urlpath=b2nd, mode="r")[:])
    npy = os.path.join(folder, name + ".npy")
    if os.path.isfile(npy):
        return np.load(npy, allow_pickle=False)
    base = name[:-4] if name.endswith("_seg") else name
    npz = os.path.join(folder, base + ".npz")
    if os.path.isfile(npz):
        with np.load(npz, allow_pickle=False) as f:
            return f[npz_key]
    raise FileNotFoundError(f"no {name}.b2nd / .npy / .npz in {folder}")


def read_case(data_folder: str, identifier: str) -> Case:
    """Image and labels of one case from nnU-Net's preprocessed data folder (no .pkl is unpickled).

    The labels are the ``_seg`` arrays of the preprocessed grid; ``gt_segmentations`` is in the raw
    geometry and would not align with the preprocessed slices."""
    image = _read_array(data_folder, identifier, "data").astype(np.float32)
    try:
        seg = _read_array(data_folder, identifier + "_seg", "seg")
    except FileNotFoundError:
        raise FileNotFoundError(f"case {identifier} has no labels ({identifier}_seg) in {data_folder}: this "
                                f"diagnosis needs a labeled, preprocessed dataset") from None
    if image.ndim != 4 or seg.ndim != 4 or seg.shape[1:] != image.shape[1:]:
        raise ValueError(f"case {identifier}: image {image.shape} and labels {seg.shape} are not (C, Z, Y, X) alike")
    seg = seg[0].astype(np.int64)
    seg[seg < 0] = 0
    return Case(identifier, image, seg)


def parse_case_list(value: str) -> list[str]:
    """A file (one identifier per line or comma separated; a JSON list works too) or a comma list."""
    if os.path.isfile(value):
        text = Path(value).read_text().strip()
        if text.startswith("["):
            return [str(c) for c in json.loads(text)]
        return [c.strip() for c in re.split(r"[,\n]", text) if c.strip() and not c.strip().startswith("#")]
    return [c.strip() for c in value.split(",") if c.strip()]


def cases_from_fewlabel(workdir: str, budget: int, fold: int) -> tuple[list[str], list[str]]:
    """(training, validation) cases of budget M and fold f of a ``macl_fewlabel`` workdir
    (its ``views/finetune/<dataset>/splits_index.json``; a folder holding that file directly works too)."""
    from nnunetv2_macl.fewlabel.splits import read_splits

    root = Path(workdir)
    candidates = [root] if (root / "splits_index.json").is_file() else \
        sorted(p.parent for p in root.glob("views/finetune/*/splits_index.json"))
    if not candidates:
        raise FileNotFoundError(f"no splits_index.json in {root} or {root}/views/finetune/*/")
    if len(candidates) > 1:
        raise ValueError(f"several split files under {root}: {[str(c) for c in candidates]}; pass one folder")
    plan = read_splits(candidates[0])
    for row in plan["index"]:
        if int(row["budget"]) == int(budget) and int(row["fold"]) == int(fold):
            return list(row["train"]), list(row["val"])
    have = sorted({(int(r["budget"]), int(r["fold"])) for r in plan["index"]})
    raise ValueError(f"no split for budget {budget}, fold {fold} in {candidates[0]} (has (budget, fold): {have})")


def select_slices(num_slices: int, quota: int | None) -> np.ndarray:
    """Every slice, or ``quota`` evenly spaced ones (for ``--max-val-slices``)."""
    if quota is None or quota >= num_slices:
        return np.arange(num_slices)
    return np.unique(np.round(np.linspace(0, num_slices - 1, max(1, quota))).astype(int))


# =====================================================================================================
# networks
# =====================================================================================================
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
    from nnunetv2_macl.transfer.load_pretrained import load_weights_only

    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise ValueError(f"{path} is not a macl_pretrain checkpoint (no 'network_weights')")
    return ckpt


def network_from_checkpoint(setup: Setup, checkpoint: dict, scope: str, seed: int) -> tuple[nn.Module, object]:
    """Fine-tuning's start: nnU-Net's initialisation, then the checkpoint's tensors of ``scope``."""
    from nnunetv2_macl.transfer.load_pretrained import transfer_pretrained_weights

    net = build_network(setup, seed)
    report = transfer_pretrained_weights(net, checkpoint, log=None, scope=scope)
    return net, report


def loaded_decoder_stages(report) -> list[int]:
    """Indices j of ``decoder.stages.j`` that a transfer report loaded (the pretrained decoder stages)."""
    found = {int(m.group(1)) for k in report.loaded if (m := re.match(r"^decoder\.stages\.(\d+)\.", k))}
    return sorted(found)


def dominant_down(network: nn.Module, decoder_blocks: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pretraining's ``down()`` of the dominant branch (``MACLNetwork.down``), without touching the
    global RNG (building the wrapper initialises projection heads)."""
    from nnunetv2_macl.model.macl_network import MACLNetwork

    with torch.random.fork_rng(devices=[]):
        wrapper = MACLNetwork(network, decoder_blocks=decoder_blocks)
    return wrapper.down


def total_stride(network: nn.Module) -> list[int]:
    from nnunetv2_macl.model.macl_network import encoder_strides

    return [int(s) for s in np.prod(np.array(encoder_strides(network)), axis=0)]


def stage_names(network: nn.Module, decoder_stages: Sequence[int]) -> list[str]:
    n_enc = len(network.encoder.stages)
    return [f"encoder.stages.{i}" for i in range(n_enc)] + [f"decoder.stages.{j}" for j in decoder_stages]


def forward_stages(network: nn.Module, x: torch.Tensor, n_decoder: int) -> dict[str, torch.Tensor]:
    """Every encoder stage output (the last is the bottleneck) and the outputs of decoder stages
    0..n_decoder-1, computed as nnU-Net's decoder does (transposed conv, skip concatenation, stage)."""
    skips = network.encoder(x)
    out = {f"encoder.stages.{i}": s for i, s in enumerate(skips)}
    decoder = network.decoder
    y = skips[-1]
    for s in range(n_decoder):
        y = decoder.transpconvs[s](y)
        y = torch.cat((y, skips[-(s + 2)]), 1)
        y = decoder.stages[s](y)
        out[f"decoder.stages.{s}"] = y
    return out


def pad_to(x: torch.Tensor, shape: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the last two axes at the end (bottom/right) to ``shape``: cell j keeps its place."""
    ph, pw = int(shape[0]) - x.shape[-2], int(shape[1]) - x.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} to {tuple(shape)}")
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


def content_cells(size: Sequence[int], canvas: Sequence[int], fmap: Sequence[int]) -> tuple[int, int]:
    """Cells of a feature map (stride canvas/fmap per axis) that lie on the image: cell j is centred on
    canvas pixel stride*j, so it is image content when stride*j < size."""
    out = []
    for s, c, f in zip(size, canvas, fmap):
        stride = c / f
        out.append(max(1, min(int(f), int(math.ceil(s / stride)))))
    return out[0], out[1]


# =====================================================================================================
# (a) variance decomposition
# =====================================================================================================
class VarianceDecomposition:
    """Streaming per-channel decomposition of a feature's variance over slices.

    Slice s contributes n_s cells with mean m_s and (population) variance v_s per channel. With weights
    n_s (so that slices of different sizes count by their cells and the identity is exact):
    ``spatial = sum n_s v_s / N``, ``across = sum n_s (m_s - M)^2 / N``, ``total = spatial + across``
    = the variance of all cells of all slices. ``position_explained`` per channel: the share of
    ``across`` that the slice position explains (between-bin variance of m_s over position bins)."""

    def __init__(self, bins: int = POSITION_BINS) -> None:
        self.bins = bins
        self.counts: list[np.ndarray] = []
        self.means: list[np.ndarray] = []
        self.variances: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []

    def add(self, maps: torch.Tensor, positions: Sequence[float] | None = None) -> None:
        """``maps``: (B, C, *spatial) content cells of B slices of one size."""
        flat = maps.detach().double().flatten(2)
        n = flat.shape[-1]
        self.counts.append(np.full(flat.shape[0], n, dtype=np.float64))
        self.means.append(flat.mean(-1).cpu().numpy())
        self.variances.append(flat.var(-1, unbiased=False).cpu().numpy())
        self.positions.append(np.asarray(positions if positions is not None else np.full(flat.shape[0], np.nan),
                                         dtype=np.float64))

    def result(self) -> dict:
        n = np.concatenate(self.counts)
        m = np.concatenate(self.means)
        v = np.concatenate(self.variances)
        p = np.concatenate(self.positions)
        w = n / n.sum()
        grand = (w[:, None] * m).sum(0)
        spatial = (w[:, None] * v).sum(0)
        across = (w[:, None] * (m - grand) ** 2).sum(0)
        total = spatial + across
        live = total > LIVE_VARIANCE
        out = {"spatial": spatial, "across": across, "total": total, "live": live,
               "num_slices": int(len(n)), "channels": int(len(total)), "dead_channels": int((~live).sum())}
        out["spatial_fraction"] = float(np.mean(spatial[live] / total[live])) if live.any() else float("nan")
        explained = np.full(len(total), np.nan)
        if np.isfinite(p).all() and len(n) > 1:
            # positions (i+1)/n lie in (0, 1]: bin b holds (b/bins, (b+1)/bins]
            bin_of = np.clip(np.ceil(np.round(p * self.bins, 9)).astype(int) - 1, 0, self.bins - 1)
            between = np.zeros(len(total))
            for b in np.unique(bin_of):
                sel = bin_of == b
                wb = w[sel].sum()
                between += wb * ((w[sel, None] * m[sel]).sum(0) / wb - grand) ** 2
            ok = across > LIVE_VARIANCE
            explained[ok] = between[ok] / across[ok]
        out["position_explained"] = explained
        ok = live & np.isfinite(explained)
        out["position_share"] = float(np.mean(explained[ok])) if ok.any() else float("nan")
        # share of the total variance that is a function of the slice position alone
        out["position_fraction_of_total"] = (float(np.mean(explained[ok] * across[ok] / total[ok]))
                                             if ok.any() else float("nan"))
        return out


def variance_decomposition(slice_maps: Sequence[torch.Tensor], positions: Sequence[float] | None = None) -> dict:
    """:class:`VarianceDecomposition` of slices given one by one as (C, *spatial) maps (sizes may differ)."""
    acc = VarianceDecomposition()
    for i, s in enumerate(slice_maps):
        acc.add(s[None], None if positions is None else [positions[i]])
    return acc.result()


def summarise_decomposition(d: dict) -> dict:
    """The JSON-friendly part of :meth:`VarianceDecomposition.result`."""
    live = d["live"]
    return {"spatial_fraction": d["spatial_fraction"], "position_share": d["position_share"],
            "position_fraction_of_total": d["position_fraction_of_total"],
            "mean_total_variance": float(np.mean(d["total"])), "channels": d["channels"],
            "dead_channels": d["dead_channels"], "num_slices": d["num_slices"],
            "spatial_fraction_median": float(np.median(d["spatial"][live] / d["total"][live])) if live.any()
            else float("nan")}


# =====================================================================================================
# (b) linear probe
# =====================================================================================================
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


# =====================================================================================================
# (a) + (b) driver
# =====================================================================================================
@dataclass
class FeatureRun:
    """One network (pretrained or random) with the probes trained on its features."""

    name: str
    network: nn.Module
    down: Callable[[torch.Tensor], torch.Tensor]
    full: dict[str, VarianceDecomposition] = field(default_factory=dict)
    dominant: dict[str, VarianceDecomposition] = field(default_factory=dict)
    probes: dict[str, nn.Module] = field(default_factory=dict)
    dice: dict[str, DiceAccumulator] = field(default_factory=dict)


def canvas_for(network: nn.Module, decoder_blocks: int, slice_shapes: Iterable[Sequence[int]],
               minimum: Sequence[int]) -> tuple[int, int]:
    """One slice size for everything: the largest slice and the plan's patch, made a valid MACL crop
    (``fitting_crop_size``: a multiple of 1/lambda x the total stride, so that the dominant branch's maps
    align too, with a dominant bottleneck of more than one cell, which instance norm needs)."""
    from nnunetv2_macl.model.macl_network import fitting_crop_size

    h, w = int(minimum[0]), int(minimum[1])
    for sh in slice_shapes:
        h, w = max(h, int(sh[0])), max(w, int(sh[1]))
    crop = fitting_crop_size(network, decoder_blocks, [h, w])
    return int(crop[0]), int(crop[1])


PRE_NORM = "@pre-norm"  # suffix of a stage's last convolution output, before its InstanceNorm


def last_conv(stage: nn.Module) -> nn.Module:
    """The convolution of a stage's last conv-norm-nonlin block (dynamic_network_architectures' blocks)."""
    blocks = [m for m in stage.modules() if hasattr(m, "conv") and hasattr(m, "norm")]
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


def labels_on_canvas(case: Case, slices: np.ndarray, canvas: Sequence[int]) -> torch.Tensor:
    seg = torch.from_numpy(case.seg[slices])
    return pad_to(seg, canvas, value=-1)


def images_on_canvas(case: Case, slices: np.ndarray, canvas: Sequence[int]) -> torch.Tensor:
    img = torch.from_numpy(np.ascontiguousarray(case.image[:, slices].transpose(1, 0, 2, 3)))
    return pad_to(img, canvas)


def run_feature_parts(runs: Sequence[FeatureRun], train_cases: Sequence[Case], val_cases: Iterable[Case],
                      stages: Sequence[str], n_decoder: int, canvas: tuple[int, int], num_classes: int,
                      do_variance: bool, do_probe: bool, probe_iters: int, probe_lr: float, probe_batch: int,
                      probe_dice: bool, seed: int, val_quota: int | None, chunk: int,
                      say: Callable[[str], None] = print) -> dict:
    """Parts (a) and (b): probes trained first (on the training slices), then one pass over the
    validation cases per network that feeds the decomposition and the probes' Dice."""
    timings: dict[str, float] = {}
    if do_probe:
        t0 = time.perf_counter()
        train_images = torch.cat([images_on_canvas(c, np.arange(c.num_slices), canvas) for c in train_cases])
        train_labels = torch.cat([labels_on_canvas(c, np.arange(c.num_slices), canvas) for c in train_cases])
        for run in runs:
            feats = slice_features(run.network, train_images, n_decoder, chunk)
            for si, stage in enumerate(stages):
                run.probes[stage] = train_linear_probe(feats[stage], train_labels, num_classes, probe_iters,
                                                       probe_lr, probe_batch, seed=seed * 1000 + si,
                                                       use_dice=probe_dice)
                run.dice[stage] = DiceAccumulator(num_classes)
            del feats
            say(f"(b) probes trained on {run.name} features ({len(stages)} stages, {train_images.shape[0]} slices)")
        timings["probe_training_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    variance_stages = [*stages, *(s + PRE_NORM for s in stages)]
    for run in runs:
        for stage in variance_stages:
            run.full[stage] = VarianceDecomposition()
        bottleneck = f"encoder.stages.{len(run.network.encoder.stages) - 1}"
        for stage in stages:  # what the pretraining's dense and equivariance losses saw
            if stage.startswith("decoder") or stage == bottleneck:
                run.dominant[stage] = VarianceDecomposition()
    num_val = 0
    for case in val_cases:
        num_val += 1
        slices = select_slices(case.num_slices, val_quota)
        positions = (slices + 1) / case.num_slices
        images = images_on_canvas(case, slices, canvas)
        reference = case.seg[slices]
        for run in runs:
            feats = slice_features(run.network, images, n_decoder, chunk, pre_norm=do_variance)
            if do_variance:
                for stage in variance_stages:
                    f = feats[stage]
                    h, w = content_cells(case.slice_shape, canvas, f.shape[-2:])
                    run.full[stage].add(f[..., :h, :w], positions)
            for stage in stages:
                f = feats[stage]
                if do_probe:
                    pred = probe_predict(run.probes[stage], f, canvas)[:, :case.slice_shape[0], :case.slice_shape[1]]
                    run.dice[stage].add_volume(case.identifier, pred.numpy(), reference)
            if do_variance and run.dominant:
                small = torch.cat([run.down(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])
                dom = slice_features(run.network, small, n_decoder, chunk)
                for stage in run.dominant:
                    f = dom[stage]
                    # measured on the full-resolution canvas grid: the small input spans the same canvas
                    h, w = content_cells(case.slice_shape, canvas, f.shape[-2:])
                    run.dominant[stage].add(f[..., :h, :w], positions)
        say(f"    validation case {num_val}: {case.identifier} ({len(slices)} slices)")
    timings["validation_pass_s"] = time.perf_counter() - t0
    out: dict = {"timings": timings, "num_val_cases": num_val}
    if do_variance:
        out["variance"] = {run.name: {"full_resolution": {s: summarise_decomposition(run.full[s].result())
                                                          for s in variance_stages},
                                      "dominant_branch": {s: summarise_decomposition(d.result())
                                                          for s, d in run.dominant.items()}}
                           for run in runs}
    if do_probe:
        out["probe"] = {run.name: {s: run.dice[s].result() for s in stages} for run in runs}
    return out


# =====================================================================================================
# (c) first fine-tuning iterations
# =====================================================================================================
class _NnUNetLossHost:
    """Just enough of an nnUNetTrainer for its own ``_build_loss`` and ``_get_deep_supervision_scales``:
    the loss and its deep-supervision weights are nnU-Net's code, not a re-implementation."""

    def __init__(self, setup: Setup) -> None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        self.configuration_manager = setup.configuration_manager
        self.label_manager = setup.label_manager
        self.is_ddp = False
        self.enable_deep_supervision = True
        self._trainer_class = nnUNetTrainer

    def _do_i_compile(self) -> bool:
        return False

    def _get_deep_supervision_scales(self) -> list | None:
        return self._trainer_class._get_deep_supervision_scales(self)

    def build(self) -> tuple[nn.Module, list]:
        return self._trainer_class._build_loss(self), self._get_deep_supervision_scales()


def nnunet_loss(setup: Setup) -> tuple[nn.Module, list]:
    """nnU-Net's training loss (DC_and_CE_loss in a DeepSupervisionWrapper) and the deep-supervision scales."""
    return _NnUNetLossHost(setup).build()


def parameter_group(name: str) -> str:
    """The gradient-norm group of a parameter: each encoder stage (and a ResEnc stem), each decoder stage
    with its transposed convolution, the segmentation layers."""
    if m := re.match(r"^encoder\.stages\.(\d+)\.", name):
        return f"encoder.stages.{m.group(1)}"
    if name.startswith("encoder.stem."):
        return "encoder.stem"
    if m := re.match(r"^decoder\.(?:stages|transpconvs)\.(\d+)\.", name):
        return f"decoder.stages.{m.group(1)}"
    if name.startswith("decoder.seg_layers."):
        return "seg_layers"
    return "other"


def _group_sort_key(g: str) -> tuple:
    order = {"encoder.stem": (0, -1), "seg_layers": (3, 0), "other": (4, 0)}
    if g in order:
        return order[g]
    kind, idx = g.rsplit(".", 1)
    return (1 if kind.startswith("encoder") else 2, int(idx))


def parameter_groups(network: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by :func:`parameter_group`, each tensor once (``decoder.encoder`` aliases
    the encoder and ``named_parameters`` yields the first name)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in network.named_parameters():
        if p.requires_grad:
            groups.setdefault(parameter_group(name), []).append(p)
    return {g: groups[g] for g in sorted(groups, key=_group_sort_key)}


@dataclass
class CropDraw:
    case: int
    slice: int
    y0: int
    x0: int


def _bbox_range(size: int, patch: int) -> tuple[int, int]:
    """nnU-Net's admissible lower corners of a patch: a patch larger than the image is placed so that the
    image lies inside it (padding split in two)."""
    need = max(patch - size, 0)
    return -(need // 2), size + need // 2 + need % 2 - patch


def draw_crops(rng: np.random.Generator, cases: Sequence[Case], batch_size: int, patch: Sequence[int],
               class_voxels: Sequence[dict[int, np.ndarray]], fg_fraction: float = FG_OVERSAMPLE) -> list[CropDraw]:
    """One batch of 2-D crops as nnU-Net's 2-D loader draws them, without augmentation: a random case;
    the forced-foreground samples pick a class present in the case and centre the patch on one of its
    voxels (clipped to the admissible range), the others a random slice and a random corner."""
    out = []
    for forced in draw_foreground_forced(batch_size, fg_fraction):
        ci = int(rng.integers(len(cases)))
        case = cases[ci]
        (h, w) = case.slice_shape
        (ly, uy), (lx, ux) = _bbox_range(h, patch[0]), _bbox_range(w, patch[1])
        present = [c for c, v in sorted(class_voxels[ci].items()) if len(v)]
        if forced and present:
            c = present[int(rng.integers(len(present)))]
            z, y, x = class_voxels[ci][c][int(rng.integers(len(class_voxels[ci][c])))]
            y0 = int(np.clip(y - patch[0] // 2, ly, uy))
            x0 = int(np.clip(x - patch[1] // 2, lx, ux))
            out.append(CropDraw(ci, int(z), y0, x0))
        else:
            out.append(CropDraw(ci, int(rng.integers(case.num_slices)), int(rng.integers(ly, uy + 1)),
                                int(rng.integers(lx, ux + 1))))
    return out


def crop_batch(cases: Sequence[Case], draws: Sequence[CropDraw], patch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, C, *patch) and labels (B, *patch); outside the image: 0 (nnU-Net pads the image with 0
    and the labels with -1, which its pipeline then turns into background)."""
    ph, pw = int(patch[0]), int(patch[1])
    c = cases[draws[0].case].image.shape[0]
    images = np.zeros((len(draws), c, ph, pw), dtype=np.float32)
    labels = np.zeros((len(draws), ph, pw), dtype=np.int64)
    for i, d in enumerate(draws):
        case = cases[d.case]
        h, w = case.slice_shape
        ya, yb = max(d.y0, 0), min(d.y0 + ph, h)
        xa, xb = max(d.x0, 0), min(d.x0 + pw, w)
        if ya < yb and xa < xb:
            images[i, :, ya - d.y0:yb - d.y0, xa - d.x0:xb - d.x0] = case.image[:, d.slice, ya:yb, xa:xb]
            labels[i, ya - d.y0:yb - d.y0, xa - d.x0:xb - d.x0] = case.seg[d.slice, ya:yb, xa:xb]
    return torch.from_numpy(images), torch.from_numpy(labels)


def deep_supervision_targets(labels: torch.Tensor, scales: Sequence) -> list[torch.Tensor]:
    """nnU-Net's DownsampleSegForDSTransform applied to the batch (B, H, W) -> [(B, 1, h, w), ...]."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    # the transform treats axis 0 as channels: the batch axis plays that role, nearest-exact per slice
    out = DownsampleSegForDSTransform(ds_scales=[list(s) for s in scales])(segmentation=labels)["segmentation"]
    return [t[:, None].float() for t in out]


def windows(values: Sequence[float], width: int = 10) -> list[float]:
    """Means over consecutive windows of ``width`` iterations (the last window may be shorter)."""
    v = np.asarray(values, dtype=np.float64)
    return [float(np.mean(v[i:i + width])) for i in range(0, len(v), width)]


def _batch_stats(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    pred = logits.argmax(1)
    fg_fraction = float((pred > 0).float().mean())
    scores = []
    for c in range(1, num_classes):
        p, r = pred == c, labels == c
        denom = float(p.sum() + r.sum())
        if denom > 0:
            scores.append(2 * float((p & r).sum()) / denom)
    return fg_fraction, float(np.mean(scores)) if scores else float("nan")


def poly_lr(initial: float, iteration: int, poly_iters: int, iters_per_epoch: int) -> float:
    """nnU-Net's PolyLRScheduler as its trainer steps it (once per epoch): ``initial (1 - e / E)^0.9`` for
    epoch e = iteration // iters_per_epoch of E = ceil(poly_iters / iters_per_epoch); ``poly_iters`` 0: constant."""
    if poly_iters <= 0:
        return float(initial)
    epochs = max(1, math.ceil(poly_iters / max(1, iters_per_epoch)))
    epoch = min(iteration // max(1, iters_per_epoch), epochs - 1)
    return float(initial) * (1 - epoch / epochs) ** 0.9


def finetune_trace(setup: Setup, checkpoint: dict | None, train_cases: Sequence[Case], iters: int = 100,
                   batch_size: int = 32, seed: int = 0, starts: Sequence[str] = START_NAMES,
                   lr: float = 1e-2, weight_decay: float = 3e-5, momentum: float = 0.99,
                   poly_iters: int = 1000, iters_per_epoch: int = 25,
                   say: Callable[[str], None] = print) -> dict:
    """Part (c): ``iters`` fine-tuning steps from each start on identical batches. Returns per start the
    per-iteration ``loss``, ``grad_norm`` ({group: [...]}, before clipping), ``grad_norm_total``,
    ``pred_fg_fraction``, ``batch_dice``, their means over windows of 10, the groups the start received
    from the checkpoint, the learning rate of each iteration (``lr``) and the final network (key ``network``,
    not JSON). The rate follows nnU-Net's PolyLRScheduler over ``poly_iters`` iterations of
    ``iters_per_epoch`` (:func:`poly_lr`; ``poly_iters`` 0: constant)."""
    loss_fn, scales = nnunet_loss(setup)
    patch = setup.patch_size
    class_voxels = [{c: np.argwhere(case.seg == c) for c in range(1, setup.num_classes)} for case in train_cases]
    rng = np.random.default_rng([seed, 3])
    draws = [draw_crops(rng, train_cases, batch_size, patch, class_voxels) for _ in range(int(iters))]
    results: dict[str, dict] = {}
    for start in starts:
        t0 = time.perf_counter()
        if start == "scratch":
            net, transferred = build_network(setup, seed), []
        else:
            if checkpoint is None:
                raise ValueError(f"start {start!r} needs a checkpoint")
            net, report = network_from_checkpoint(setup, checkpoint, start, seed)
            transferred = sorted({parameter_group(k) for k in report.loaded}, key=_group_sort_key)
        net.train()
        groups = parameter_groups(net)
        params = [p for ps in groups.values() for p in ps]
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
        log: dict = {"loss": [], "grad_norm": {g: [] for g in groups}, "grad_norm_total": [],
                     "pred_fg_fraction": [], "batch_dice": [], "reference_fg_fraction_per_batch": [], "lr": []}
        for it, batch_draws in enumerate(draws):
            for group in opt.param_groups:
                group["lr"] = poly_lr(lr, it, poly_iters, iters_per_epoch)
            log["lr"].append(opt.param_groups[0]["lr"])
            images, labels = crop_batch(train_cases, batch_draws, patch)
            targets = deep_supervision_targets(labels, scales)
            opt.zero_grad(set_to_none=True)
            outputs = net(images)
            loss = loss_fn(outputs, targets)
            loss.backward()
            for g, ps in groups.items():
                norms = [p.grad.detach().norm() for p in ps if p.grad is not None]
                log["grad_norm"][g].append(float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0)
            total = torch.nn.utils.clip_grad_norm_(params, CLIP_GRAD_NORM)
            opt.step()
            log["loss"].append(float(loss.detach()))
            log["grad_norm_total"].append(float(total))
            fg, dice = _batch_stats(outputs[0].detach(), labels, setup.num_classes)
            log["pred_fg_fraction"].append(fg)
            log["batch_dice"].append(dice)
            log["reference_fg_fraction_per_batch"].append(float((labels > 0).float().mean()))
        log["reference_fg_fraction"] = (float(np.mean(log["reference_fg_fraction_per_batch"])) if draws
                                        else float("nan"))
        log["windows_of_10"] = {"loss": windows(log["loss"]), "grad_norm_total": windows(log["grad_norm_total"]),
                                "pred_fg_fraction": windows(log["pred_fg_fraction"]),
                                "batch_dice": windows([d if np.isfinite(d) else 0.0 for d in log["batch_dice"]]),
                                "grad_norm": {g: windows(v) for g, v in log["grad_norm"].items()}}
        log["transferred_groups"] = transferred
        log["seconds"] = time.perf_counter() - t0
        log["network"] = net.eval()
        results[start] = log
        say(f"(c) {start}: {len(draws)} iterations, loss {log['loss'][0]:.3f} -> {log['loss'][-1]:.3f} "
            f"({log['seconds']:.0f} s)" if draws else f"(c) {start}: 0 iterations")
    return results


@torch.no_grad()
def evaluate_networks(networks: dict[str, nn.Module], val_cases: Iterable[Case], canvas: tuple[int, int],
                      num_classes: int, val_quota: int | None, chunk: int) -> dict[str, dict]:
    """Foreground Dice of each network's full-resolution output on the validation slices (whole slices
    on the canvas, as :class:`DiceAccumulator`)."""
    acc = {k: DiceAccumulator(num_classes) for k in networks}
    for case in val_cases:
        slices = select_slices(case.num_slices, val_quota)
        images = images_on_canvas(case, slices, canvas)
        for name, net in networks.items():
            preds = []
            for i in range(0, images.shape[0], chunk):
                out = net(images[i:i + chunk])
                preds.append((out[0] if isinstance(out, (list, tuple)) else out).argmax(1))
            pred = torch.cat(preds)[:, :case.slice_shape[0], :case.slice_shape[1]]
            acc[name].add_volume(case.identifier, pred.numpy(), case.seg[slices])
    return {k: a.result() for k, a in acc.items()}


def leaves_background_phase(pred_fg_fraction: Sequence[float], threshold: float) -> int | None:
    """The first iteration, after the prediction first fell below ``threshold`` (the background-only phase
    that starts once the randomly initialised head has been pushed to background), at which the
    predicted foreground fraction is back at or above it; None if it never falls or never comes back."""
    below = next((i for i, v in enumerate(pred_fg_fraction) if v < threshold), None)
    if below is None:
        return None
    return next((i for i, v in enumerate(pred_fg_fraction) if i > below and v >= threshold), None)


# =====================================================================================================
# report
# =====================================================================================================
def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def findings(result: dict) -> list[str]:
    """Plain statements read off the numbers (the reader judges; thresholds are stated in each line)."""
    lines: list[str] = []
    dec = result.get("pretrained_decoder_stages", [])
    var = result.get("variance")
    if var:
        for j in dec:
            s = f"decoder.stages.{j}"
            pre = var["pretrained"]["full_resolution"].get(s, {})
            ref_name = "encoder" if "encoder" in var else "random"
            rnd = var[ref_name]["full_resolution"].get(s, {})
            dom = var["pretrained"]["dominant_branch"].get(s, {})
            sp, sr = pre.get("spatial_fraction", float("nan")), rnd.get("spatial_fraction", float("nan"))
            ref = "the encoder-only start" if ref_name == "encoder" else "random init"
            verdict = (f"spatially flat compared with {ref}" if np.isfinite(sp) and np.isfinite(sr) and sp < 0.5 * sr
                       else f"not flatter than {ref} by 2x")
            lines.append(f"(a) decoder stage {j + 1}: {_fmt(sp)} of its variance is within slices ({ref} "
                         f"{_fmt(sr)}; on the dominant-branch input {_fmt(dom.get('spatial_fraction'))}); slice position "
                         f"explains {_fmt(pre.get('position_share'))} of its across-slice variance ({ref} "
                         f"{_fmt(rnd.get('position_share'))}); {pre.get('dead_channels', 'n/a')} of "
                         f"{pre.get('channels', 'n/a')} channels constant -> {verdict}.")
            before = var["pretrained"]["full_resolution"].get(s + PRE_NORM)
            if before:
                ref_before = var[ref_name]["full_resolution"].get(s + PRE_NORM, {})
                lines.append(f"(a) decoder stage {j + 1} before its InstanceNorm: {_fmt(before.get('spatial_fraction'))} "
                             f"of its variance within slices ({ref} {_fmt(ref_before.get('spatial_fraction'))}), "
                             f"position share {_fmt(before.get('position_share'))} ({ref} "
                             f"{_fmt(ref_before.get('position_share'))}).")
        enc_last = [k for k in var["pretrained"]["full_resolution"] if k.startswith("encoder") and PRE_NORM not in k]
        if enc_last:
            b = enc_last[-1]
            lines.append(f"(a) bottleneck ({b}): spatial fraction {_fmt(var['pretrained']['full_resolution'][b]['spatial_fraction'])}"
                         f" pretrained vs {_fmt(var['random']['full_resolution'][b]['spatial_fraction'])} random.")
    probe = result.get("probe")
    if probe:
        for s in probe["pretrained"]:
            dp, dr = probe["pretrained"][s]["mean_dice"], probe["random"][s]["mean_dice"]
            tag = ""
            if np.isfinite(dp) and np.isfinite(dr):
                tag = (" -> less linearly decodable than random features" if dp < dr - 0.05 else
                       " -> more decodable than random features" if dp > dr + 0.05 else " -> within 0.05 of random")
            if s.startswith("decoder") and "encoder" in probe:  # same encoder, decoder initialised by nnU-Net
                de = probe["encoder"][s]["mean_dice"]
                tag += (f"; encoder-only start {_fmt(de)}" + (
                    " -> the hand-over is less decodable than nnU-Net's own decoder init" if dp < de - 0.05 else
                    " -> the hand-over is more decodable than nnU-Net's own decoder init" if dp > de + 0.05 else
                    " -> within 0.05 of the encoder-only start") if np.isfinite(de) and np.isfinite(dp) else "")
            lines.append(f"(b) probe on {s}: Dice {_fmt(dp)} pretrained vs {_fmt(dr)} random{tag}.")
    ft = result.get("finetune")
    if ft and "pretrained" in ft and "encoder" in ft:
        p, e = ft["pretrained"], ft["encoder"]
        lp, le = float(np.mean(p["loss"])), float(np.mean(e["loss"]))
        lines.append(f"(c) mean loss over the {len(p['loss'])} iterations: paper hand-over {lp:.4f}, encoder-only {le:.4f}"
                     + (f", scratch {float(np.mean(ft['scratch']['loss'])):.4f}" if "scratch" in ft else "") + ".")
        gap = [a - b for a, b in zip(p["windows_of_10"]["loss"], e["windows_of_10"]["loss"])]
        lines.append("(c) loss of the hand-over minus encoder-only, per window of 10 iterations: "
                     + ", ".join(f"{g:+.3f}" for g in gap) + ".")
        ref = p.get("reference_fg_fraction", float("nan"))
        if np.isfinite(ref) and ref > 0:
            half = 0.5 * ref
            its = {k: leaves_background_phase(v["pred_fg_fraction"], half) for k, v in ft.items()}
            lines.append("(c) iteration at which the batch prediction leaves the background-only phase (predicted "
                         f"foreground back at half the reference fraction, {_fmt(half, 4)}): "
                         + ", ".join(f"{k} {'not within ' + str(len(v['loss'])) if its[k] is None else its[k]}"
                                     for k, v in ft.items()) + ".")
        for g in p["grad_norm"]:
            if not g.startswith("decoder") and g != "seg_layers":
                continue
            gp, ge = float(np.mean(p["grad_norm"][g])), float(np.mean(e["grad_norm"][g]))
            lines.append(f"(c) mean gradient norm of {g}: hand-over {gp:.4g}, encoder-only {ge:.4g} (ratio "
                         f"{gp / ge if ge > 0 else float('nan'):.3g}){' [transferred]' if g in p['transferred_groups'] else ''}.")
        ev = result.get("finetune_validation")
        if ev:
            lines.append("(c) validation Dice after the iterations: " + ", ".join(
                f"{k} {_fmt(v['mean_dice'])}" for k, v in ev.items()) + ".")
    return lines


def markdown_report(result: dict) -> str:
    out = ["# Decoder hand-over diagnosis", "",
           f"checkpoint: `{result['checkpoint']}`  ", f"dataset: `{result['preprocessed']}` ({result['configuration']})  ",
           f"training cases ({len(result['train_cases'])}): {', '.join(result['train_cases'])}  ",
           f"validation cases: {len(result['val_cases'])}; slices per case: "
           f"{'all' if result['val_slice_quota'] is None else 'at most ' + str(result['val_slice_quota'])}  ",
           f"pretrained decoder stages: {[j + 1 for j in result['pretrained_decoder_stages']]}; lambda "
           f"{result['lambda']}; canvas {result['canvas']}; seed {result['seed']}", ""]
    out += ["## Findings", ""] + [f"- {line}" for line in findings(result)] + [""]
    var = result.get("variance")
    if var:
        out += ["## (a) Within-slice share of the variance", "",
                "spatial fraction = mean over live channels of (mean within-slice variance) / (total variance); "
                "position share = share of the across-slice variance explained by the slice position (10 bins).", "",
                "| stage | pretrained | encoder-only start | random | pretrained, dominant input | random, dominant input | position share pretrained | random | dead channels pre/rand |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s, pre in var["pretrained"]["full_resolution"].items():
            rnd = var["random"]["full_resolution"][s]
            enc = var.get("encoder", {}).get("full_resolution", {}).get(s, {})
            dp = var["pretrained"]["dominant_branch"].get(s, {})
            dr = var["random"]["dominant_branch"].get(s, {})
            out.append(f"| {s} | {_fmt(pre['spatial_fraction'])} | {_fmt(enc.get('spatial_fraction'))} | "
                       f"{_fmt(rnd['spatial_fraction'])} | "
                       f"{_fmt(dp.get('spatial_fraction'))} | {_fmt(dr.get('spatial_fraction'))} | "
                       f"{_fmt(pre['position_share'])} | {_fmt(rnd['position_share'])} | "
                       f"{pre['dead_channels']}/{rnd['dead_channels']} of {pre['channels']} |")
        out.append("")
    probe = result.get("probe")
    if probe:
        out += ["## (b) Linear probe (1x1 conv on frozen features)", "",
                f"{result['probe_settings']}. Dice per volume, mean over volumes (global Dice over all voxels in brackets).", "",
                "| stage | pretrained | encoder-only start | random |", "|---|---|---|---|"]
        for s in probe["pretrained"]:
            p, r = probe["pretrained"][s], probe["random"][s]
            e = probe.get("encoder", {}).get(s, {})
            out.append(f"| {s} | {_fmt(p['mean_dice'])} ({_fmt(p['mean_dice_global'])}) | "
                       f"{_fmt(e.get('mean_dice'))} ({_fmt(e.get('mean_dice_global'))}) | "
                       f"{_fmt(r['mean_dice'])} ({_fmt(r['mean_dice_global'])}) |")
        out.append("")
    ft = result.get("finetune")
    if ft:
        starts = list(ft)
        n = len(next(iter(ft.values()))["loss"])
        out += [f"## (c) First {n} fine-tuning iterations", "", result["finetune_settings"], "",
                "Loss, mean over windows of 10 iterations:", "",
                "| iterations | " + " | ".join(starts) + " |", "|---|" + "---|" * len(starts)]
        for i, _ in enumerate(ft[starts[0]]["windows_of_10"]["loss"]):
            out.append(f"| {10 * i}-{min(10 * i + 9, n - 1)} | " +
                       " | ".join(_fmt(ft[s]["windows_of_10"]["loss"][i], 4) for s in starts) + " |")
        out += ["", "Predicted foreground fraction, mean over windows of 10 (reference "
                f"{_fmt(ft[starts[0]].get('reference_fg_fraction'), 4)}):", "",
                "| iterations | " + " | ".join(starts) + " |", "|---|" + "---|" * len(starts)]
        for i, _ in enumerate(ft[starts[0]]["windows_of_10"]["pred_fg_fraction"]):
            out.append(f"| {10 * i}-{min(10 * i + 9, n - 1)} | " +
                       " | ".join(_fmt(ft[s]["windows_of_10"]["pred_fg_fraction"][i], 4) for s in starts) + " |")
        out += ["", "Gradient L2 norm per group (before clipping), mean over all iterations / first window / last window:", "",
                "| group | " + " | ".join(starts) + " |", "|---|" + "---|" * len(starts)]
        for g in ft[starts[0]]["grad_norm"]:
            cells = []
            for s in starts:
                w = ft[s]["windows_of_10"]["grad_norm"][g]
                mark = "*" if g in ft[s]["transferred_groups"] else ""
                cells.append(f"{np.mean(ft[s]['grad_norm'][g]):.3g} / {w[0]:.3g} / {w[-1]:.3g}{mark}")
            out.append(f"| {g} | " + " | ".join(cells) + " |")
        out.append(f"| total (clipped at {CLIP_GRAD_NORM:g}) | " + " | ".join(
            f"{np.mean(ft[s]['grad_norm_total']):.3g} / {ft[s]['windows_of_10']['grad_norm_total'][0]:.3g} / "
            f"{ft[s]['windows_of_10']['grad_norm_total'][-1]:.3g}" for s in starts) + " |")
        out += ["", "(* = taken from the checkpoint by this start)", ""]
        ev = result.get("finetune_validation")
        if ev:
            out += ["Validation Dice after these iterations: " + ", ".join(f"{k} {_fmt(v['mean_dice'])}" for k, v in ev.items()), ""]
    out += [f"Run time: {result['seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items())
            + ")", ""]
    return "\n".join(out)


def plot_finetune(ft: dict, path: str | os.PathLike) -> Path:
    """Loss, predicted foreground fraction, total and per-group gradient norms vs iteration, one line per start."""
    from nnunetv2_macl.figures import _pyplot, save_figure

    plt = _pyplot()
    starts = list(ft)
    groups = list(ft[starts[0]]["grad_norm"])
    panels = ["loss", "pred_fg_fraction", "grad_norm_total"] + groups
    ncol = 4
    nrow = int(math.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 2.8 * nrow), dpi=100, squeeze=False)
    colours = {"scratch": "#7f7f7f", "encoder": "#1f77b4", "pretrained": "#d62728"}
    for ax, panel in zip(axes.flat, panels):
        for s in starts:
            y = ft[s][panel] if panel in ft[s] else ft[s]["grad_norm"][panel]
            ax.plot(np.arange(len(y)), y, color=colours.get(s), lw=1.2, label=s)
        ax.set_title(panel if panel in ft[starts[0]] else f"grad norm {panel}", fontsize=9)
        if panel not in ("loss", "pred_fg_fraction"):
            ax.set_yscale("log")
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if panel == "pred_fg_fraction" and np.isfinite(ft[starts[0]].get("reference_fg_fraction", float("nan"))):
            ax.axhline(ft[starts[0]]["reference_fg_fraction"], color="k", ls="--", lw=0.8, label="reference")
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # room for the title
    return save_figure(fig, path, "First fine-tuning iterations: scratch, encoder-only, paper hand-over")


def _to_json(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items() if not isinstance(v, nn.Module)}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# =====================================================================================================
# main
# =====================================================================================================
def run_diagnosis(checkpoint_path: str, preprocessed: str, train_ids: Sequence[str], val_ids: Sequence[str],
                  out_dir: str, configuration: str = "2d", plans_identifier: str = "nnUNetPlans", seed: int = 12345,
                  parts: Sequence[str] = ("a", "b", "c"), max_val_slices: int | None = None, probe_iters: int = 300,
                  probe_lr: float = 1e-2, probe_batch: int = 16, probe_dice: bool = True, finetune_iters: int = 100,
                  finetune_batch: int = 32, finetune_eval: bool = True, chunk: int = 32, plot: bool = True,
                  say: Callable[[str], None] = print, poly_iters: int = 1000, iters_per_epoch: int = 25) -> dict:
    """Everything :func:`main` does, as a function; returns the result dict (also written to ``out_dir``)."""
    t_start = time.perf_counter()
    parts = set(parts)
    setup = load_setup(preprocessed, configuration, plans_identifier)
    if not train_ids or not val_ids:
        raise ValueError("training and validation cases are both needed")
    if set(train_ids) & set(val_ids):
        raise ValueError(f"cases in both training and validation: {sorted(set(train_ids) & set(val_ids))}")
    ckpt = load_checkpoint_dict(checkpoint_path)
    meta = ckpt.get("macl") or {}
    train_cases = [read_case(setup.data_folder, c) for c in train_ids]

    pretrained, report = network_from_checkpoint(setup, ckpt, "pretrained", seed)
    # the reference for questions about the handed-over decoder stages: the same pretrained encoder with
    # nnU-Net's initialisation of the decoder (the default start), not a network that is random throughout
    encoder_net, _ = network_from_checkpoint(setup, ckpt, "encoder", seed)
    random_net = build_network(setup, seed)
    dec_stages = loaded_decoder_stages(report)
    n_decoder = (max(dec_stages) + 1) if dec_stages else 0
    decoder_blocks = int(meta.get("decoder_blocks", n_decoder))
    down_pre = dominant_down(pretrained, decoder_blocks)
    down_rand = dominant_down(random_net, decoder_blocks)
    down_enc = dominant_down(encoder_net, decoder_blocks)
    from nnunetv2_macl.model.macl_network import downsampling_factors

    lam = downsampling_factors(pretrained, decoder_blocks)
    # validation cases are streamed later; only their slice sizes are read here
    slice_shapes = [c.slice_shape for c in train_cases] + [_case_slice_shape(setup.data_folder, c) for c in val_ids]
    canvas = canvas_for(pretrained, decoder_blocks, slice_shapes, setup.patch_size)
    quota = None if max_val_slices is None else max(1, int(max_val_slices) // len(val_ids))
    stages = stage_names(pretrained, dec_stages)
    pretrained.eval()
    encoder_net.eval()
    random_net.eval()
    result: dict = {
        "checkpoint": os.path.abspath(checkpoint_path), "preprocessed": os.path.abspath(preprocessed),
        "configuration": configuration, "plans_identifier": plans_identifier, "seed": seed,
        "train_cases": list(train_ids), "val_cases": list(val_ids), "val_slice_quota": quota,
        "pretrained_decoder_stages": dec_stages, "decoder_blocks": decoder_blocks, "lambda": lam,
        "checkpoint_lambda": meta.get("lambda"), "canvas": list(canvas), "total_stride": total_stride(pretrained),
        "patch_size": setup.patch_size, "num_classes": setup.num_classes, "stages": stages,
        "transfer": {"loaded": len(report.loaded), "skipped": len(report.skipped), "notes": list(report.notes)},
        "definitions": {
            "spatial_fraction": "mean over live channels of spatial/total; spatial = cell-weighted mean over slices of "
                                "the within-slice variance, across = cell-weighted variance over slices of the slice "
                                "mean, total = spatial + across (content cells only)",
            "position_share": f"mean over live channels of the share of 'across' explained by {POSITION_BINS} bins of "
                              f"the slice position (i+1)/n",
            "dice": "foreground Dice per class per validation volume on the preprocessed grid, mean over volumes "
                    "(class absent from reference and prediction skipped); dice_global pools all voxels"},
        "timings": {},
    }
    if meta.get("lambda") is not None and [round(float(x), 6) for x in meta["lambda"]] != [round(x, 6) for x in lam]:
        say(f"note: the checkpoint's lambda {meta['lambda']} differs from this plan's {lam}")

    def val_stream() -> Iterable[Case]:
        for c in val_ids:
            yield read_case(setup.data_folder, c)

    if parts & {"a", "b"}:
        say(f"(a/b) stages {stages}; canvas {canvas}; {len(val_ids)} validation cases")
        runs = [FeatureRun("pretrained", pretrained, down_pre), FeatureRun("encoder", encoder_net, down_enc),
                FeatureRun("random", random_net, down_rand)]
        feat = run_feature_parts(runs, train_cases, val_stream(), stages, n_decoder, canvas, setup.num_classes,
                                 "a" in parts, "b" in parts, probe_iters, probe_lr, probe_batch, probe_dice, seed,
                                 quota, chunk, say)
        result["timings"].update(feat.pop("timings"))
        result.update(feat)
        result["probe_settings"] = (f"{probe_iters} Adam steps, lr {probe_lr}, batch {probe_batch} whole slices "
                                    f"({FG_OVERSAMPLE:.0%} forced foreground), loss "
                                    f"{'cross-entropy + soft Dice' if probe_dice else 'cross-entropy'}")
    if "c" in parts:
        t0 = time.perf_counter()
        ft = finetune_trace(setup, ckpt, train_cases, finetune_iters, finetune_batch, seed, poly_iters=poly_iters,
                            iters_per_epoch=iters_per_epoch, say=say)
        result["timings"]["finetune_s"] = time.perf_counter() - t0
        result["finetune_settings"] = (f"nnU-Net's loss (DC_and_CE_loss, deep supervision) and SGD (lr 1e-2, "
                                       + (f"poly decay per epoch of {iters_per_epoch} iterations over {poly_iters}, "
                                          if poly_iters > 0 else "constant, ") +
                                       f"momentum 0.99, nesterov, weight decay 3e-5, gradient clipping at "
                                       f"{CLIP_GRAD_NORM:g}); batch {finetune_batch} augmentation-free crops of "
                                       f"{setup.patch_size} ({FG_OVERSAMPLE:.0%} forced foreground), the same draws for "
                                       f"every start; seed {seed}")
        if finetune_eval:
            t0 = time.perf_counter()
            result["finetune_validation"] = evaluate_networks({k: v["network"] for k, v in ft.items()}, val_stream(),
                                                              canvas, setup.num_classes, quota, chunk)
            result["timings"]["finetune_validation_s"] = time.perf_counter() - t0
        result["finetune"] = {k: {kk: vv for kk, vv in v.items() if kk != "network"} for k, v in ft.items()}
    result["seconds"] = time.perf_counter() - t_start
    result["findings"] = findings(result)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "decoder_diagnosis.json", json.dumps(_to_json(result), indent=1))
    _write_atomic(out / "decoder_diagnosis.md", markdown_report(result))
    if plot and result.get("finetune"):
        plot_finetune(result["finetune"], out / "decoder_diagnosis_finetune.png")
    return result


def _case_slice_shape(data_folder: str, identifier: str) -> tuple[int, int]:
    b2nd = os.path.join(data_folder, identifier + ".b2nd")
    if os.path.isfile(b2nd):
        import blosc2

        shape = blosc2.open(urlpath=b2nd, mode="r").shape
    else:
        shape = read_case(data_folder, identifier).image.shape
    return int(shape[-2]), int(shape[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint_final.pth of macl_pretrain")
    p.add_argument("--preprocessed", required=True, help="nnU-Net preprocessed dataset folder (plans, dataset.json, data)")
    p.add_argument("--configuration", default="2d")
    p.add_argument("--plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--train-cases", help="file or comma list of the M labeled training cases")
    p.add_argument("--val-cases", help="file or comma list of the validation cases")
    p.add_argument("--fewlabel-workdir", help="instead of the case lists: a macl_fewlabel workdir (with --budget, --fold)")
    p.add_argument("--budget", type=int, default=4)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--parts", default="a,b,c", help="which parts to run (comma list of a, b, c)")
    p.add_argument("--max-val-slices", type=int, default=None, help="cap on validation slices (evenly spaced per case)")
    p.add_argument("--probe-iters", type=int, default=300)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--probe-batch", type=int, default=16)
    p.add_argument("--probe-loss", choices=["ce", "ce+dice"], default="ce+dice")
    p.add_argument("--finetune-iters", type=int, default=100)
    p.add_argument("--finetune-batch", type=int, default=32)
    p.add_argument("--poly-iters", type=int, default=1000,
                   help="part (c): the schedule nnU-Net's poly decay spans (the few-label protocol's 1,000; 0: constant lr)")
    p.add_argument("--iters-per-epoch", type=int, default=25, help="part (c): iterations per epoch of that schedule")
    p.add_argument("--no-finetune-eval", action="store_true", help="skip the validation Dice after part (c)")
    p.add_argument("--chunk", type=int, default=32, help="slices per forward pass")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    if args.fewlabel_workdir:
        train_ids, val_ids = cases_from_fewlabel(args.fewlabel_workdir, args.budget, args.fold)
        if args.train_cases:
            train_ids = parse_case_list(args.train_cases)
        if args.val_cases:
            val_ids = parse_case_list(args.val_cases)
    elif args.train_cases and args.val_cases:
        train_ids, val_ids = parse_case_list(args.train_cases), parse_case_list(args.val_cases)
    else:
        print("error: give --train-cases and --val-cases, or --fewlabel-workdir with --budget and --fold", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"a", "b", "c"}:
        print(f"error: --parts must list a, b and/or c, got {args.parts!r}", file=sys.stderr)
        return 2
    result = run_diagnosis(args.checkpoint, args.preprocessed, train_ids, val_ids, args.out, args.configuration,
                           args.plans, args.seed, parts, args.max_val_slices, args.probe_iters, args.probe_lr,
                           args.probe_batch, args.probe_loss == "ce+dice", args.finetune_iters, args.finetune_batch,
                           not args.no_finetune_eval, args.chunk, not args.no_plot, print, args.poly_iters,
                           args.iters_per_epoch)
    print("\n".join(result["findings"]))
    print(f"written to {os.path.abspath(args.out)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
