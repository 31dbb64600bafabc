"""Part (c) / E2: the first fine-tuning iterations from several starts on identical batches.

nnU-Net's own pieces, not re-implementations: the loss (``nnUNetTrainer._build_loss``: DC_and_CE_loss in
a DeepSupervisionWrapper) and its deep-supervision scales, the augmentation
(``nnUNetTrainer.get_training_transforms`` with the rotation / mirroring / initial patch size that
``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` derives from the plans), the optimiser
settings (SGD 1e-2, momentum 0.99, nesterov, weight decay 3e-5), the poly decay per epoch and the
gradient clipping at 12 (``nnUNetTrainer.train_step``). Batches are drawn as nnU-Net's 2-D loader
draws them (a random case, the last third of the batch forced to show foreground), the same for every
start: crop positions from one generator, augmentation seeded per iteration.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nnunetv2_macl.diagnosis.data import Case, images_on_canvas, select_slices
from nnunetv2_macl.diagnosis.networks import START_NAMES, Setup, build_start
from nnunetv2_macl.diagnosis.probes import FG_OVERSAMPLE, DiceAccumulator, draw_foreground_forced

CLIP_GRAD_NORM = 12.0  # nnUNetTrainer.train_step
#: the starts part (c) compares by default (every one :mod:`.networks` builds)
FINETUNE_STARTS = START_NAMES


class _TrainerHost:
    """Just enough of an nnUNetTrainer for its own ``_build_loss``, ``_get_deep_supervision_scales`` and
    ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``: the loss, its deep-supervision weights
    and the augmentation settings are nnU-Net's code, not a re-implementation."""

    def __init__(self, setup: Setup) -> None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        self.configuration_manager = setup.configuration_manager
        self.label_manager = setup.label_manager
        self.is_ddp = False
        self.enable_deep_supervision = True
        self._trainer_class = nnUNetTrainer

    def _do_i_compile(self) -> bool:
        return False

    def print_to_log_file(self, *args, **kwargs) -> None:
        pass

    def _get_deep_supervision_scales(self) -> list | None:
        return self._trainer_class._get_deep_supervision_scales(self)

    def loss(self) -> tuple[nn.Module, list]:
        return self._trainer_class._build_loss(self), self._get_deep_supervision_scales()

    def training_transforms(self) -> tuple[object, list[int], dict]:
        """nnU-Net's training transforms, the (larger) patch its loader crops before them, and the settings."""
        rotation, dummy_2d, initial_patch, mirror_axes = \
            self._trainer_class.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
        cm, lm = self.configuration_manager, self.label_manager
        transforms = self._trainer_class.get_training_transforms(
            cm.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=False, foreground_labels=lm.foreground_labels,
            regions=None, ignore_label=lm.ignore_label)
        settings = {"rotation": [float(r) for r in rotation], "mirror_axes": [int(a) for a in mirror_axes],
                    "do_dummy_2d_data_aug": bool(dummy_2d), "initial_patch_size": [int(p) for p in initial_patch]}
        return transforms, settings["initial_patch_size"], settings


def nnunet_loss(setup: Setup) -> tuple[nn.Module, list]:
    """nnU-Net's training loss (DC_and_CE_loss in a DeepSupervisionWrapper) and the deep-supervision scales."""
    return _TrainerHost(setup).loss()


def _fixed_arithmetic(transform: object) -> object:
    """Turn off GaussianBlurTransform's ``benchmark`` (it times FFT against direct convolution on first use
    and keeps the faster): the same arithmetic on every call, so equal seeds give bitwise-equal batches."""
    if hasattr(transform, "benchmark"):
        transform.benchmark = False
    for t in getattr(transform, "transforms", None) or []:
        _fixed_arithmetic(t)
    if getattr(transform, "transform", None) is not None:
        _fixed_arithmetic(transform.transform)
    return transform


def nnunet_training_transforms(setup: Setup) -> tuple[object, list[int], dict]:
    """nnU-Net's training augmentation for this plan (with the deep-supervision down-sampling of the labels),
    the initial patch size its loader crops, and the settings it derived (for the report)."""
    transforms, initial_patch, settings = _TrainerHost(setup).training_transforms()
    return _fixed_arithmetic(transforms), initial_patch, settings


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
    """One crop of a batch: case index, slice, top-left corner (may be negative: padding)."""

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


def crop_batch(cases: Sequence[Case], draws: Sequence[CropDraw], patch: Sequence[int],
               label_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, C, *patch) and labels (B, *patch); outside the image the images are 0 and the labels
    ``label_pad`` (nnU-Net pads the labels with -1, which its pipeline turns into background at the end:
    0 for crops fed as they are, -1 for crops that go through nnU-Net's transforms)."""
    ph, pw = int(patch[0]), int(patch[1])
    c = cases[draws[0].case].image.shape[0]
    images = np.zeros((len(draws), c, ph, pw), dtype=np.float32)
    labels = np.full((len(draws), ph, pw), label_pad, dtype=np.int64)
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


def iteration_seed(seed: int, iteration: int) -> int:
    """The augmentation seed of one iteration: a function of (seed, iteration) only, not of the start."""
    return int(np.random.SeedSequence([int(seed), 11, int(iteration)]).generate_state(1)[0])


def augment_batch(transforms: Callable, images: torch.Tensor, labels: torch.Tensor,
                  seed: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """nnU-Net's training transforms applied sample by sample, as its loader does, on crops of the initial
    patch size (images (B, C, H, W), labels (B, H, W) with -1 outside the image). The global numpy and
    torch generators (which batchgeneratorsv2 draws from) are seeded with ``seed`` and restored after.
    Returns the images (B, C, *patch), the deep-supervision targets [(B, 1, h, w) float] and the
    full-resolution labels (B, *patch)."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            out_images, out_segs = [], []
            for b in range(images.shape[0]):
                t = transforms(image=images[b].float(), segmentation=labels[b][None].to(torch.int16))
                out_images.append(t["image"])
                out_segs.append(t["segmentation"] if isinstance(t["segmentation"], list) else [t["segmentation"]])
    finally:
        np.random.set_state(state)
    targets = [torch.stack([s[k] for s in out_segs]).float() for k in range(len(out_segs[0]))]
    return torch.stack(out_images), targets, targets[0][:, 0].long()


class FinetuneBatches:
    """The batches of part (c), iteration by iteration, identical for every start: crop positions drawn
    once from ``default_rng([seed, 3])``; with ``augment`` crops of nnU-Net's initial patch size through
    its training transforms, seeded per iteration (:func:`iteration_seed`), otherwise crops of the patch
    size as they are. ``batch(i)`` -> (images, deep-supervision targets, full-resolution labels)."""

    def __init__(self, setup: Setup, cases: Sequence[Case], iters: int, batch_size: int, seed: int,
                 scales: Sequence, augment: bool = True) -> None:
        self.cases = list(cases)
        self.seed = int(seed)
        self.scales = scales
        self.augment = bool(augment)
        self.patch = setup.patch_size
        self.transforms, self.augmentation_settings = None, None
        self.crop_size = self.patch
        if self.augment:
            self.transforms, self.crop_size, self.augmentation_settings = nnunet_training_transforms(setup)
        class_voxels = [{c: np.argwhere(case.seg == c) for c in range(1, setup.num_classes)} for case in self.cases]
        rng = np.random.default_rng([seed, 3])
        self.draws = [draw_crops(rng, self.cases, batch_size, self.crop_size, class_voxels) for _ in range(int(iters))]

    def __len__(self) -> int:
        return len(self.draws)

    def batch(self, iteration: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        draws = self.draws[iteration]
        if not self.augment:
            images, labels = crop_batch(self.cases, draws, self.crop_size)
            return images, deep_supervision_targets(labels, self.scales), labels
        images, labels = crop_batch(self.cases, draws, self.crop_size, label_pad=-1)
        return augment_batch(self.transforms, images, labels, iteration_seed(self.seed, iteration))


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


def clip_fraction(total_norms: Sequence[float], max_norm: float = CLIP_GRAD_NORM) -> float:
    """The share of iterations whose total gradient norm before clipping exceeds ``max_norm``: those where
    nnU-Net's ``clip_grad_norm_(..., 12)`` scales the step down."""
    v = np.asarray(total_norms, dtype=np.float64)
    return float(np.mean(v > max_norm)) if len(v) else float("nan")


def finetune_trace(setup: Setup, checkpoint: dict | None, train_cases: Sequence[Case], iters: int = 150,
                   batch_size: int = 32, seed: int = 0, starts: Sequence[str] = FINETUNE_STARTS,
                   lr: float = 1e-2, weight_decay: float = 3e-5, momentum: float = 0.99,
                   poly_iters: int = 1000, iters_per_epoch: int = 25, augment: bool = True,
                   pretrained_stages: Sequence[int] | None = None, say: Callable[[str], None] = print) -> dict:
    """Part (c): ``iters`` fine-tuning steps from each start on identical batches (:class:`FinetuneBatches`).
    Returns per start the per-iteration ``loss``, ``grad_norm`` ({group: [...]}, before clipping),
    ``grad_norm_total`` (before clipping), ``pred_fg_fraction``, ``batch_dice``, their means over windows
    of 10, ``clip_fraction`` (:func:`clip_fraction`), the groups the start received from the checkpoint,
    the learning rate of each iteration (``lr``) and the final network (key ``network``, not JSON). The
    rate follows nnU-Net's PolyLRScheduler over ``poly_iters`` iterations of ``iters_per_epoch``
    (:func:`poly_lr`; ``poly_iters`` 0: constant). ``pretrained_stages``: the decoder stages the hand-over
    loads, when known (:func:`~.networks.build_start`)."""
    loss_fn, scales = nnunet_loss(setup)
    batches = FinetuneBatches(setup, train_cases, iters, batch_size, seed, scales, augment)
    results: dict[str, dict] = {}
    for start in starts:
        t0 = time.perf_counter()
        net, report = build_start(setup, checkpoint, start, seed, pretrained_stages)
        transferred = [] if report is None else sorted({parameter_group(k) for k in report.loaded}, key=_group_sort_key)
        net.train()
        groups = parameter_groups(net)
        params = [p for ps in groups.values() for p in ps]
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
        log: dict = {"loss": [], "grad_norm": {g: [] for g in groups}, "grad_norm_total": [],
                     "pred_fg_fraction": [], "batch_dice": [], "reference_fg_fraction_per_batch": [], "lr": []}
        for it in range(len(batches)):
            for group in opt.param_groups:
                group["lr"] = poly_lr(lr, it, poly_iters, iters_per_epoch)
            log["lr"].append(opt.param_groups[0]["lr"])
            images, targets, labels = batches.batch(it)
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
        log["reference_fg_fraction"] = (float(np.mean(log["reference_fg_fraction_per_batch"])) if len(batches)
                                        else float("nan"))
        log["clip_fraction"] = clip_fraction(log["grad_norm_total"])
        log["windows_of_10"] = {"loss": windows(log["loss"]), "grad_norm_total": windows(log["grad_norm_total"]),
                                "pred_fg_fraction": windows(log["pred_fg_fraction"]),
                                "batch_dice": windows([d if np.isfinite(d) else 0.0 for d in log["batch_dice"]]),
                                "grad_norm": {g: windows(v) for g, v in log["grad_norm"].items()}}
        log["transferred_groups"] = transferred
        log["transfer_notes"] = [] if report is None else list(report.notes)
        log["seconds"] = time.perf_counter() - t0
        log["network"] = net.eval()
        results[start] = log
        say(f"(c) {start}: {len(batches)} iterations, loss {log['loss'][0]:.3f} -> {log['loss'][-1]:.3f}, clip "
            f"bites {log['clip_fraction']:.0%} ({log['seconds']:.0f} s)" if len(batches) else f"(c) {start}: 0 iterations")
    for log in results.values():
        log["augmentation"] = batches.augmentation_settings  # None: crops as they are
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
