"""MACLPretrainer: self-supervised MACL pretraining of the network nnU-Net builds from its plans.

Shaped like nnU-Net's ``nnUNetTrainer``: ``initialize()`` builds everything, ``run_training()``
loops over epochs with ``on_*`` hooks, and each phase is a method a subclass can override
(``build_network``, ``configure_optimizers``, ``get_dataloader``, ``train_step``, ...).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from datetime import datetime
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import nnunetv2_macl
from nnunetv2_macl.data.augmentation import RandomIntensityTransform, RandomSpatialTransform
from nnunetv2_macl.data.multi_dataset import MultiSourceDataset, datasets_file, describe_sources, make_sampler
from nnunetv2_macl.data.slice_dataset import (
    DatasetError, PretrainPatchDataset, PretrainSliceDataset)
from nnunetv2_macl.losses import MultiLevelContrastiveLoss
from nnunetv2_macl.losses.masked_reconstruction import (
    apply_cell_mask, check_mask_geometry, masked_reconstruction_loss, random_block_mask)
from nnunetv2_macl.model.macl_network import (
    MACLNetwork, crop_problems, fitting_crop_size, pretrained_prefixes, required_divisor)
from nnunetv2_macl.training.checkpoint import TMP_PREFIX, CheckpointError, load_checkpoint, save_checkpoint_atomic
from nnunetv2_macl.training.config import ConfigError, MACLConfig, resolve_method
from nnunetv2_macl.training.distributed import use_global_batchnorm
from nnunetv2_macl.training.lr_schedule import CosineSchedule
from nnunetv2_macl.training.diagnostics import (
    contrastive_chance, diagnostic_indices, embedding_diagnostics, format_diagnostics, is_collapsed)
from nnunetv2_macl.training.progress import plot_progress
from nnunetv2_macl.transfer.identity import checkpoint_identity
from nnunetv2_macl.errors import NonFiniteLossError

PRETRAINER_NAME = "MACLPretrainer"
# per-epoch values in self.logging (and the checkpoint): losses, lr, time, and the collapse diagnostics
LOGGED_KEYS = ("epoch", "Lg", "Ld", "LER", "total", "lr", "epoch_time", "Lg_chance", "cos_descriptor",
               "cos_projection", "bottleneck_abs", "Lrec", "Lrec_ref")
CONTRASTIVE_NAMES = ("Lg", "Ld", "LER", "total")  # per-step values of L_MLC (total includes Lrec when on)
RECONSTRUCTION_NAMES = ("Lrec", "Lrec_ref")  # --recon-weight: the term and its reference (predicting 0)


def kept_checkpoint_name(epoch: int) -> str:
    """``--keep-epochs``: the file that keeps the checkpoint written after ``epoch`` epochs."""
    return f"checkpoint_epoch_{int(epoch)}.pth"


def output_folder_name(plans_identifier: str, configuration: str) -> str:
    return f"{PRETRAINER_NAME}__{plans_identifier}__{configuration}"


def check_output_folder_writable(folder: str) -> None:
    """Raise :class:`PermissionError` (one line) unless ``folder`` exists as a writable folder or
    could be created; creates nothing (the nearest existing ancestor is inspected)."""
    path = os.path.abspath(folder)
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise PermissionError(f"Output folder {folder} cannot be created: {probe} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is" if probe == path else f"cannot be created in {probe}, which is"
        raise PermissionError(f"Output folder {folder} {what} not writable")


def _state_dict_mismatches(expected: dict[str, torch.Tensor], found: dict) -> list[str]:
    """Keys of ``expected`` missing from / shaped differently in ``found``, then unexpected keys."""
    out = []
    for k, v in expected.items():
        if k not in found:
            out.append(f"{k} (missing in checkpoint)")
        elif not isinstance(found[k], torch.Tensor):
            out.append(f"{k} (checkpoint holds a {type(found[k]).__name__}, not a tensor)")
        elif tuple(found[k].shape) != tuple(v.shape):
            out.append(f"{k} (checkpoint {list(found[k].shape)} vs network {list(v.shape)})")
    out += [f"{k} (not in this network)" for k in found if k not in expected]
    return out


def _first(items: list[str], n: int = 5) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more


class _EpochTaggedSampler(Sampler):
    """Yields (epoch, index) so that data-loading worker processes (persistent across epochs, each
    with its own copy of the dataset) use the epoch the main process is in: the crop of item k in
    epoch e is then a function of (seed, e, k) whatever the number of workers or resumes."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        epoch = int(self.sampler.epoch)
        return ((epoch, int(k)) for k in iter(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


class _EpochTaggedDataset(Dataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, k = item
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[k]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], [int(i) for i in np_state[1]], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class MACLPretrainer:
    """Pretrain the encoder and the first N decoder stages of an nnU-Net network with MACL.

    Args:
        plans: the plans dict (``nnUNetPlans.json``).
        configuration: e.g. "2d" or "3d_fullres".
        dataset_json: the dataset's ``dataset.json`` (input channels, labels for the head count).
        preprocessed_dataset_folder: ``$nnUNet_preprocessed/DatasetXXX_Name``.
        output_folder: where checkpoints and logs go.
        config: :class:`MACLConfig`.
        device: torch device.
        sources: (dataset name, preprocessed data folder) of every dataset to pretrain on, when
            several (checked compatible with the plans beforehand, ``data.multi_dataset``);
            default: the plans' own dataset.
    """

    def __init__(self, plans: dict, configuration: str, dataset_json: dict, preprocessed_dataset_folder: str,
                 output_folder: str, config: MACLConfig, device: torch.device = torch.device("cpu"),
                 rank: int = 0, world_size: int = 1, sources: list[tuple[str, str]] | None = None) -> None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.config = resolve_method(config)
        self.plans_manager = PlansManager(plans)
        if configuration not in plans["configurations"]:
            raise ConfigError(f"Configuration {configuration!r} is not in plans {self.plans_manager.plans_name!r}; "
                              f"available: {sorted(plans['configurations'])}")
        self.configuration_name = configuration
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.dataset_json = dataset_json
        self.dataset_name = plans.get("dataset_name", os.path.basename(preprocessed_dataset_folder))
        self.preprocessed_dataset_folder = preprocessed_dataset_folder
        self.data_folder = os.path.join(preprocessed_dataset_folder, self.configuration_manager.data_identifier)
        self.sources = list(sources) if sources else [(self.dataset_name, self.data_folder)]
        self.output_folder = output_folder
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.current_epoch = 0
        self.was_initialized = False
        self.logging: dict[str, list] = {k: [] for k in LOGGED_KEYS}
        self.log_file: str | None = None
        self.amp_dtype = None
        if device.type == "cuda" and self.config.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # -- building -----------------------------------------------------------------------------
    def initialize(self) -> None:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        cfg = self.config
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        for source_name, source_folder in self.sources:
            if os.path.isdir(source_folder):
                continue
            raise DatasetError(
                f"Dataset {source_name} is not preprocessed for configuration {self.configuration_name!r} "
                f"(missing {source_folder}). Run: nnUNetv2_preprocess -d "
                f"{int(source_name[7:10]) if source_name[7:10].isdigit() else '<ID>'} "
                f"-c {self.configuration_name}"
                + (f" -plans_name {self.plans_manager.plans_name}" if self.plans_manager.plans_name != "nnUNetPlans"
                   else ""))
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self.network = self.build_network().to(self.device)
        n_decoder_stages = len(self.network.decoder.stages)
        if not 0 <= cfg.decoder_blocks <= n_decoder_stages:
            raise ConfigError(f"--decoder-blocks must be in [0, {n_decoder_stages}] for this network "
                              f"({self.configuration_manager.network_arch_class_name}), got {cfg.decoder_blocks}")
        if cfg.channels_last and self.network.encoder.conv_op is nn.Conv2d:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.macl = MACLNetwork(self.network, cfg.decoder_blocks, global_through_decoder=cfg.global_through_decoder,
                                encoder_mode=cfg.encoder_mode, ema_momentum=cfg.ema_momentum,
                                global_pooling=cfg.global_pooling,
                                shared_global_head=cfg.shared_global_head,
                                dense_head=cfg.dense_head,
                                reconstruction_head=cfg.recon_weight > 0).to(self.device)
        if self.world_size > 1 and cfg.global_negatives:
            # the heads' BatchNorm must see the batch the loss contrasts: the global one
            use_global_batchnorm(self.macl)
        self.crop_size = self.determine_crop_size()
        if cfg.recon_weight > 0:
            problems = check_mask_geometry(self.crop_size, self.macl.reconstruction_stride, cfg.mask_block,
                                           cfg.mask_ratio)
            if problems:
                raise ConfigError(f"--mask-block {cfg.mask_block} does not fit the crop {self.crop_size} "
                                  f"(reconstruction grid stride {self.macl.reconstruction_stride}): " + "; ".join(problems))
        self.loss = MultiLevelContrastiveLoss(cfg.loss_weights, cfg.threshold, cfg.tau, cfg.positives,
                                              cfg.dense_form, cfg.base_temperature, cfg.dense_contrast,
                                              cfg.dense_locations, cfg.dense_slice_positives,
                                              ler_content_mask=cfg.ler_content_mask)
        self.dataset = self.get_dataset()
        if self.dataset.num_channels != self.num_input_channels:
            raise DatasetError(f"Preprocessed data has {self.dataset.num_channels} channels but the plans/dataset.json "
                               f"declare {self.num_input_channels}")
        if len(self.dataset) < cfg.batch_size * self.world_size:
            raise DatasetError(f"The dataset has only {len(self.dataset)} samples per epoch, fewer than the batch size "
                               f"{cfg.batch_size} x {self.world_size} process(es); lower --batch-size")
        self.dataloader = self.get_dataloader()
        self.iterations_per_epoch = len(self.dataloader)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.grad_scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None)
        self.spatial_transform = RandomSpatialTransform(cfg.rotation_degrees, tuple(cfg.scale_range), cfg.translation)
        self.intensity_transform = RandomIntensityTransform() if cfg.intensity_augmentation else None
        self.train_module: nn.Module = self.macl
        if cfg.compile:
            self.train_module = torch.compile(self.macl)
        if self.world_size > 1:
            # the decoder stages past N and the segmentation layers never get a gradient (nor do the
            # heads of switched-off losses, or the encoder in the second stage of --two-stage)
            self.train_module = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.was_initialized = True

    def build_network(self) -> nn.Module:
        """The exact network fine-tuning will use (same class, kwargs, input channels)."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        cm = self.configuration_manager
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, self.num_input_channels,
                                      self.label_manager.num_segmentation_heads, allow_init=True,
                                      deep_supervision=True)

    def determine_crop_size(self) -> list[int]:
        """The smallest crop holding the plan's patch size whose axes are multiples of stride x 1/lambda
        and whose dominant bottleneck keeps more than one voxel (instance norm needs that); a user's
        ``--crop-size`` must satisfy the same rules (see ``crop_problems``)."""
        if self.config.crop_size is not None:
            crop = [int(c) for c in self.config.crop_size]
            problems = crop_problems(self.network, self.config.decoder_blocks, crop)
            if problems:
                divisor = required_divisor(self.network, self.config.decoder_blocks)
                raise ConfigError(
                    f"Crop {crop} is too small or not divisible for this network (stride x 1/lambda = {divisor} "
                    f"with N = {self.config.decoder_blocks} decoder blocks): " + "; ".join(problems))
            return crop
        return fitting_crop_size(self.network, self.config.decoder_blocks, self.configuration_manager.patch_size)

    def get_dataset(self):
        """One slice/patch dataset per source (positions per volume), concatenated when several."""
        parts = [self.get_source_dataset(folder) for _, folder in self.sources]
        if len(parts) == 1:
            return parts[0]
        return MultiSourceDataset([name for name, _ in self.sources], parts)

    def get_source_dataset(self, data_folder: str):
        ndim = len(self.configuration_manager.patch_size)
        if ndim == 2:
            # instance positives (SimCLR) never use positions: single-slice cases are fine for them
            return PretrainSliceDataset(data_folder, self.crop_size, seed=self.config.seed,
                                        allow_single_slice=self.config.positives == "instance")
        return PretrainPatchDataset(data_folder, self.crop_size, patches_per_case=self.config.patches_per_case,
                                    seed=self.config.seed)

    def source_summary(self) -> list[dict]:
        """Every dataset of this pretraining with its number of samples and share of an epoch."""
        return describe_sources(self.dataset, [name for name, _ in self.sources], self.config.sampling)

    def get_dataloader(self) -> DataLoader:
        self.sampler = make_sampler(self.dataset, self.config.sampling, self.config.seed, self.rank, self.world_size)
        workers = self.config.num_workers
        # (epoch, index) items: persistent workers hold stale dataset copies, the epoch travels with the index
        return DataLoader(_EpochTaggedDataset(self.dataset), batch_size=self.config.batch_size,
                          sampler=_EpochTaggedSampler(self.sampler), drop_last=True,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

    def configure_optimizers(self):
        cfg = self.config
        params = [p for p in self.macl.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # cosine decay per iteration (paper) over the whole run: a resumed run (same --epochs) continues
        # the same curve, since the scheduler's step count is restored from the checkpoint; another
        # --epochs extends it honestly (load_checkpoint, lr_schedule.py). The lambda only delegates:
        # LambdaLR would pickle a callable object's attributes into its state_dict.
        self.lr_schedule = CosineSchedule.single(cfg.epochs * self.iterations_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: self.lr_schedule(it))
        return optimizer, scheduler

    # -- stages / switches --------------------------------------------------------------------
    def active_weights(self) -> tuple[float, float, float]:
        """Loss weights for the current epoch (two-stage: Lg first, then Ld with a frozen encoder)."""
        w = tuple(self.config.loss_weights)
        if not self.config.two_stage:
            return w
        if self.current_epoch < self.config.epochs // 2:
            return (w[0] or 1.0, 0.0, 0.0)
        return (0.0, w[1] or 0.5, 0.0)

    def needed_outputs(self, weights) -> tuple[str, ...]:
        names = ("global", "dense", "equivariance")
        return tuple(n for n, w in zip(names, weights) if w > 0)

    @property
    def reconstructs(self) -> bool:
        return self.config.recon_weight > 0

    def step_names(self) -> tuple[str, ...]:
        """The per-step values a step returns and an epoch averages."""
        return CONTRASTIVE_NAMES + (RECONSTRUCTION_NAMES if self.reconstructs else ())

    # -- logging ------------------------------------------------------------------------------
    def print_to_log_file(self, *args: Any, also_print_to_console: bool = True) -> None:
        if not self.is_main:
            return
        msg = " ".join(str(a) for a in args)
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(f"{stamp}: {msg}\n")
        if also_print_to_console:
            print(msg, flush=True)

    # -- hooks --------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if not self.was_initialized:
            self.initialize()
        if self.is_main:
            # nothing is written before this point: every check that can fail without training ran before
            check_output_folder_writable(self.output_folder)
            try:
                os.makedirs(self.output_folder, exist_ok=True)
            except OSError as e:
                raise PermissionError(f"Output folder {self.output_folder} cannot be created: "
                                      f"{e.strerror or e}") from None
            self.remove_stale_temporary_checkpoints()
            if self.log_file is None:
                self.log_file = os.path.join(self.output_folder,
                                             f"training_log_{datetime.now().strftime('%Y_%m_%d_%H_%M_%S')}.txt")
            cfg = self.config
            self.print_to_log_file(
                f"MACL pretraining ({cfg.method}) of {self.configuration_manager.network_arch_class_name} on "
                f"{self.dataset_name} / {self.configuration_name}: {len(self.dataset)} samples per epoch, "
                f"crop {self.crop_size}, N = {cfg.decoder_blocks} decoder blocks, lambda = {self.macl.scale}, "
                f"weights (Lg, Ld, LER) = {tuple(cfg.loss_weights)}, "
                + (f"Lrec weight {cfg.recon_weight} (mask ratio {cfg.mask_ratio}, blocks of {cfg.mask_block} px), "
                   if cfg.recon_weight > 0 else "")
                + f"t = {cfg.threshold}, tau = {cfg.tau}, "
                f"batch {cfg.batch_size}, lr {cfg.lr}, {cfg.epochs} epochs, device {self.device}"
                + (f", autocast {self.amp_dtype}" if self.amp_dtype else ""))
            with open(os.path.join(self.output_folder, "macl_config.json"), "w") as f:
                json.dump(self.config.to_dict(), f, indent=2)
            if len(self.sources) > 1:
                parts = [f"{d['dataset_name']} {d['samples']} samples, share {d['share']:.1%}"
                         for d in self.source_summary()]
                self.print_to_log_file(f"Datasets (sampling {cfg.sampling}): " + ", ".join(parts))
            # read by the fine-tuning's default lookup, so that every dataset trained on finds this run
            with open(datasets_file(self.output_folder), "w") as f:
                json.dump({"plans_identifier": self.plans_manager.plans_name, "configuration": self.configuration_name,
                           "datasets": self.source_summary()}, f, indent=2)

    def remove_stale_temporary_checkpoints(self) -> None:
        """A run killed while writing a checkpoint leaves its temporary file (never a half-written
        checkpoint: the rename did not happen); remove such leftovers."""
        for name in os.listdir(self.output_folder):
            if name.startswith(TMP_PREFIX + "checkpoint_"):
                try:
                    os.remove(os.path.join(self.output_folder, name))
                except OSError:
                    pass

    def on_epoch_start(self) -> None:
        self.sampler.set_epoch(self.current_epoch)
        self.dataset.set_epoch(self.current_epoch)
        # augmentation randomness is a function of (seed, epoch): a resumed run continues identically
        self.aug_generator = torch.Generator().manual_seed(self.config.seed * 7919 + self.current_epoch * 104729
                                                           + self.rank)
        weights = self.active_weights()
        self.loss.weights = weights
        if self.config.two_stage:
            freeze = self.current_epoch >= self.config.epochs // 2
            for p in self.network.encoder.parameters():
                p.requires_grad_(not freeze)
        self.epoch_start_time = time.time()

    def train_step(self, images: torch.Tensor, positions: torch.Tensor,
                   content: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        positions = positions.to(self.device, non_blocking=True)
        if content is not None:
            content = content.to(self.device, non_blocking=True)
        if self.config.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        need = self.needed_outputs(self.loss.weights)
        with torch.no_grad():
            # T_fix = identity (paper's best); T_var drawn independently per view and sample
            v1 = self.spatial_transform(images, generator=self.aug_generator) if "global" in need else images
            v2 = self.spatial_transform(images, generator=self.aug_generator) if "global" in need else images
            i1 = i2 = images
            if self.intensity_transform is not None:
                i1, i2, v1, v2 = (self.intensity_transform(t, generator=self.aug_generator) for t in (i1, i2, v1, v2))
            masked = mask = None
            if self.reconstructs:  # drawn after the views: with the term off the random stream is unchanged
                mask = random_block_mask(i1.shape[0], i1.shape[2:], self.macl.reconstruction_stride,
                                         self.config.mask_block, self.config.mask_ratio, generator=self.aug_generator)
                masked = apply_cell_mask(i1, mask)
                need = need + ("reconstruction",)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            outputs = self.train_module(i1, v1, i2, v2, need=need, masked=masked)
        reconstruction = outputs.pop("reconstruction", None)  # a per-sample loss: never gathered
        local_content = content
        outputs = {k: self.gather(v) for k, v in outputs.items()} if self.world_size > 1 else outputs
        if self.world_size > 1 and self.config.global_negatives:
            positions = self.gather(positions)
            content = self.gather(content) if content is not None else None
        self.contrast_samples = 2 * int(positions.shape[0])  # what Lg's SupCon actually contrasts
        total, components = self.loss(outputs, positions, content)
        components = {k: v for k, v in components.items()}
        if reconstruction is not None:
            lrec, reference = masked_reconstruction_loss(reconstruction, i1, mask, local_content)
            total = total + self.config.recon_weight * lrec
            components["Lrec"], components["Lrec_ref"] = lrec.detach(), reference
        components["total"] = total.detach()
        self.check_finite(components)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            self.optimizer.step()
        self.lr_scheduler.step()
        self.macl.update_ema()
        return components

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Multi-GPU: concatenate a tensor over processes (gradients preserved for the local part)
        when global negatives are on; identity otherwise."""
        if self.world_size == 1 or not self.config.global_negatives:
            return t
        from nnunetv2_macl.training.distributed import all_gather_with_grad
        return all_gather_with_grad(t)

    def check_finite(self, components: dict[str, torch.Tensor]) -> None:
        names = self.step_names()
        # the step's one host sync; run_training logs these values instead of syncing again
        values = torch.stack([components[k].float() for k in names]).tolist()
        self.last_step_losses = dict(zip(names, values))
        if all(math.isfinite(v) for v in values):
            return
        bad = [k for k, v in zip(names, values) if not math.isfinite(v)]
        bad = [k for k in bad if k != "total"] or bad  # name the component(s); total follows from them
        iteration = getattr(self, "_iteration", 0)
        step = self.current_epoch * self.iterations_per_epoch + iteration
        latest = os.path.join(self.output_folder, "checkpoint_latest.pth")
        kept = (f"the last good checkpoint {latest} is kept" if os.path.isfile(latest)
                else "no checkpoint had been written yet")
        msg = (f"Non-finite loss at epoch {self.current_epoch + 1}/{self.config.epochs}, iteration {iteration + 1}/"
               f"{self.iterations_per_epoch} (global step {step}): "
               + ", ".join(f"{k} = {components[k].item()}" for k in bad)
               + f". Training stopped; {kept}. Try a lower --lr.")
        self.print_to_log_file(msg, also_print_to_console=False)
        raise NonFiniteLossError(msg)

    def on_epoch_end(self, sums: dict[str, float], n: int) -> None:
        epoch_time = time.time() - self.epoch_start_time
        means = {k: sums[k] / max(n, 1) for k in self.step_names()}
        lr = self.optimizer.param_groups[0]["lr"]
        self.logging["epoch"].append(self.current_epoch)
        for k in CONTRASTIVE_NAMES + RECONSTRUCTION_NAMES:
            self.logging[k].append(means.get(k, float("nan")))
        self.logging["lr"].append(lr)
        self.logging["epoch_time"].append(epoch_time)
        chance = self.lg_chance()
        self.logging["Lg_chance"].append(chance)
        self.print_to_log_file(
            f"Epoch {self.current_epoch + 1}/{self.config.epochs}: total {means['total']:.4f} | Lg {means['Lg']:.4f} "
            f"| Ld {means['Ld']:.4f} | LER {means['LER']:.4f} | lr {lr:.5f} | {epoch_time:.1f} s")
        weighted = {k: w * means[k] for k, w in zip(("Lg", "Ld", "LER"), self.loss.weights) if w > 0}
        if self.reconstructs:
            weighted["Lrec"] = self.config.recon_weight * means["Lrec"]
            ref = means["Lrec_ref"]
            self.print_to_log_file(f"  Lrec {means['Lrec']:.4f} against {ref:.4f} for predicting the mean (ratio "
                                   f"{means['Lrec'] / ref if ref > 0 else float('nan'):.3f}; a learning term is below 1)")
        if len(weighted) > 1 and means["total"] > 0:
            self.print_to_log_file("  shares of the total: " + ", ".join(
                f"{k} {v / means['total']:.1%}" for k, v in weighted.items()))
        if self.loss.weights[0] > 0:
            self.print_to_log_file(f"  Lg contrasts {getattr(self, 'contrast_samples', 2 * self.contrast_batch())} "
                                   f"samples per step; chance log(2B-1) = {chance:.4f}, Lg / chance = "
                                   f"{means['Lg'] / chance:.3f}")
        diagnostics = self.compute_diagnostics() if self.is_main else None
        for k in ("cos_descriptor", "cos_projection", "bottleneck_abs"):
            self.logging[k].append(diagnostics[k] if diagnostics else float("nan"))
        if diagnostics:
            self.print_to_log_file(f"  diagnostics on {self.config.batch_size} fixed real samples: "
                                   + format_diagnostics(diagnostics))
        if self.loss.weights[0] > 0 and is_collapsed(means["Lg"], chance):
            self.print_to_log_file(
                f"  WARNING: image-level loss at chance: the embeddings have collapsed (Lg {means['Lg']:.4f} is "
                f"within 2 % of log(2B-1) = {chance:.4f}, B = {self.contrast_batch()})")
        self.current_epoch += 1
        if self.is_main:
            plot_progress(self.logging, os.path.join(self.output_folder, "progress.png"))
            if self.current_epoch % self.config.save_every == 0 and self.current_epoch < self.config.epochs:
                self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
            if self.current_epoch in self.config.keep_epochs:  # a point on the pretraining-length curve
                self.save_checkpoint(os.path.join(self.output_folder, kept_checkpoint_name(self.current_epoch)))

    def on_train_end(self) -> None:
        if self.is_main:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_final.pth"))
            self.print_to_log_file(f"Wrote {os.path.join(self.output_folder, 'checkpoint_final.pth')}")

    # -- diagnostics --------------------------------------------------------------------------
    def contrast_batch(self) -> int:
        """Images per contrastive problem: the local batch, or the global one when negatives are gathered."""
        gathered = self.world_size > 1 and self.config.global_negatives
        return self.config.batch_size * (self.world_size if gathered else 1)

    def lg_chance(self) -> float:
        """Lg of fully collapsed embeddings, log(2B - 1): the value a learning Lg must get below. 2B is
        the number of samples the loss saw in the last step (both views, gathered over processes)."""
        return contrastive_chance(getattr(self, "contrast_samples", None) or 2 * self.contrast_batch())

    def compute_diagnostics(self) -> dict[str, float] | None:
        """Collapse measures (:func:`embedding_diagnostics`) on a fixed batch of real samples."""
        if self.loss.weights[0] == 0:
            return None
        if getattr(self, "_diagnostic_batch", None) is None:
            indices = diagnostic_indices(getattr(self.dataset, "case_index", np.arange(len(self.dataset))),
                                         self.config.batch_size, seed=self.config.seed)
            # the crop windows of epoch 0, whatever epoch a run or a resume starts in, so that every epoch
            # of every run (and macl_diagnose) looks at the same pixels
            epoch = getattr(self.dataset, "epoch", 0)
            self.dataset.set_epoch(0)
            try:
                items = [self.dataset[i] for i in indices]
            finally:
                self.dataset.set_epoch(epoch)
            self._diagnostic_batch = [torch.stack(parts).to(self.device) for parts in zip(*items)]
        images, positions, content = self._diagnostic_batch
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return embedding_diagnostics(self.macl, self.loss, images, positions, content, self.spatial_transform,
                                         seed=self.config.seed)

    # -- loop ---------------------------------------------------------------------------------
    def run_training(self) -> None:
        from tqdm import tqdm

        self.on_train_start()
        while self.current_epoch < self.config.epochs:
            self.on_epoch_start()
            self.train_module.train()
            sums = {k: 0.0 for k in self.step_names()}
            n = 0
            bar = tqdm(self.dataloader, desc=f"epoch {self.current_epoch + 1}/{self.config.epochs}",
                       disable=not self.is_main, leave=False, file=sys.stderr, mininterval=1.0)
            for self._iteration, batch in enumerate(bar):
                self.train_step(*batch)
                for k in sums:
                    sums[k] += self.last_step_losses[k]
                n += 1
                bar.set_postfix(loss=f"{sums['total'] / n:.4f}", refresh=False)
            bar.close()
            self.on_epoch_end(sums, n)
        self.on_train_end()

    # -- checkpoints --------------------------------------------------------------------------
    def macl_metadata(self) -> dict:
        cm = self.configuration_manager
        cfg = self.config
        return {
            "plans_identifier": self.plans_manager.plans_name,
            "configuration": self.configuration_name,
            "dataset_name": self.dataset_name,
            "network_arch_class_name": cm.network_arch_class_name,
            "network_arch_init_kwargs": json.loads(json.dumps(cm.network_arch_init_kwargs)),
            "network_arch_init_kwargs_req_import": list(cm.network_arch_init_kwargs_req_import),
            "input_channels": int(self.num_input_channels),
            "num_segmentation_heads": int(self.label_manager.num_segmentation_heads),
            "decoder_blocks": int(cfg.decoder_blocks),
            "pretrained_prefixes": pretrained_prefixes(cfg.decoder_blocks),
            "lambda": [float(s) for s in self.macl.scale],
            "crop_size": [int(c) for c in self.crop_size],
            "loss_weights": [float(w) for w in cfg.loss_weights],
            "threshold": float(cfg.threshold),
            "tau": float(cfg.tau),
            "method": cfg.method,
            "epochs": int(cfg.epochs),
            "epoch": int(self.current_epoch),
            "lr_schedule": self.lr_schedule.to_list(),  # [start, end, start factor] cosine segments
            "package_version": nnunetv2_macl.__version__,
            "config": cfg.to_dict(),
            "datasets": self.source_summary(),
        }

    def save_checkpoint(self, path: str) -> None:
        """Write a resumable checkpoint atomically; a failed write (disk full, permission) leaves the
        previous file at ``path`` as it was and no temporary file behind."""
        bad = [k for k, v in self.macl.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(
                f"Non-finite weights after epoch {self.current_epoch}/{self.config.epochs} ({_first(bad, 3)}); "
                f"not writing {path}, the previous checkpoint is kept. Try a lower --lr.")
        ckpt = {
            **checkpoint_identity(),  # format, format_version, citation
            "network_weights": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "macl": self.macl_metadata(),
            "heads": {k: v.detach().cpu() for k, v in self.macl.heads_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "rng": _rng_state(),
            "logging": {k: [float(x) for x in v] for k, v in self.logging.items()},
        }
        existed = os.path.isfile(path)
        try:
            save_checkpoint_atomic(ckpt, path)
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            kept = (f"the previous {os.path.basename(path)} is unchanged" if existed
                    else f"no {os.path.basename(path)} was written")
            raise CheckpointError(f"Could not write checkpoint {path} ({reason}); {kept} and no partial file was "
                                  f"left behind. Free disk space or fix permissions, then continue with --c") from None

    def load_checkpoint(self, path: str) -> None:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (weights_only load).

        The checkpoint is checked against this run before any state is loaded; one that does not fit
        (another architecture, input channels, method, ...) raises :class:`CheckpointError` with one
        line listing the first mismatches.
        """
        if not self.was_initialized:
            self.initialize()
        ckpt = load_checkpoint(path, map_location=self.device)
        meta = ckpt.get("macl")
        if not isinstance(meta, dict) or not isinstance(ckpt.get("network_weights"), dict):
            raise CheckpointError(f"{path} is not a MACL pretraining checkpoint (no 'macl'/'network_weights' entries)")
        missing = [k for k in ("optimizer", "lr_scheduler", "heads") if not isinstance(ckpt.get(k), dict)]
        if missing:
            raise CheckpointError(f"Cannot resume from {path}: it lacks the resume state {missing} "
                                  f"(a weights-only export?); start a new pretraining instead")
        mine = self.macl_metadata()
        prefix = f"Cannot resume from {path}:"
        if meta.get("input_channels") is not None and int(meta["input_channels"]) != mine["input_channels"]:
            raise CheckpointError(
                f"{prefix} input-channel mismatch: it was pretrained on {meta['input_channels']} input channel(s), "
                f"the data of this run has {mine['input_channels']}, and resuming has no rule to adapt the first "
                f"convolution; use data with {meta['input_channels']} channel(s) or start a new pretraining "
                f"(remove the output folder)")
        for key in ("plans_identifier", "configuration"):
            if meta.get(key) != mine[key]:
                raise CheckpointError(f"{prefix} it was written with {key} = {meta.get(key)!r}, "
                                      f"this run uses {mine[key]!r}")
        net_state = self.network.state_dict()
        mismatches = _state_dict_mismatches(net_state, ckpt["network_weights"])
        arch_diff = []
        if meta.get("network_arch_class_name") != mine["network_arch_class_name"]:
            arch_diff.append(f"{meta.get('network_arch_class_name')} vs {mine['network_arch_class_name']}")
        theirs = meta.get("network_arch_init_kwargs") or {}
        for k, v in mine["network_arch_init_kwargs"].items():
            if k in theirs and theirs[k] != v:
                arch_diff.append(f"{k}: checkpoint {theirs[k]} vs this run {v}")
        if mismatches or arch_diff:
            raise CheckpointError(
                f"{prefix} it is a checkpoint of another architecture"
                + (f" ({_first(arch_diff, 3)})" if arch_diff else "")
                + (f"; first mismatched keys: {_first(mismatches)}" if mismatches else "")
                + "; start a new pretraining (remove the output folder) or use the plans it was written with")
        ours = {"decoder_blocks": mine["decoder_blocks"], "method": mine["method"],
                "encoder_mode": self.config.encoder_mode}
        theirs_run = {"decoder_blocks": meta.get("decoder_blocks"), "method": meta.get("method"),
                      "encoder_mode": (meta.get("config") or {}).get("encoder_mode", self.config.encoder_mode)}
        for key, value in ours.items():
            if theirs_run[key] != value:
                raise CheckpointError(f"{prefix} it was written with {key} = {theirs_run[key]!r}, "
                                      f"this run uses {value!r}")
        head_mismatches = _state_dict_mismatches(self.macl.heads_state_dict(), ckpt["heads"])
        if head_mismatches:
            raise CheckpointError(f"{prefix} its projection heads do not fit this run; first mismatched keys: "
                                  f"{_first(head_mismatches)}")
        try:
            self.network.load_state_dict(ckpt["network_weights"], strict=True)
            self.macl.load_state_dict({**{"network." + k: v for k, v in ckpt["network_weights"].items()},
                                       **ckpt["heads"]}, strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            if self.grad_scaler is not None and ckpt.get("grad_scaler"):
                self.grad_scaler.load_state_dict(ckpt["grad_scaler"])
            if ckpt.get("rng"):
                _set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise CheckpointError(f"{prefix} its resume state does not fit ({type(e).__name__}: {first[:300]})") \
                from None
        self.resume_schedule(meta, path)
        logged = ckpt.get("logging") or {}
        n_epochs = len(logged.get("epoch", []))
        # checkpoints of older versions lack the diagnostic keys: those epochs read as nan
        self.logging = {k: list(logged.get(k, [float("nan")] * n_epochs)) for k in LOGGED_KEYS}
        self.current_epoch = int(meta["epoch"])
        self.print_to_log_file(f"Resumed from {path} at epoch {self.current_epoch}")

    def resume_schedule(self, meta: dict, path: str) -> None:
        """After a resume: keep the checkpoint's learning-rate schedule, or extend it to this run's ``--epochs``.

        The same ``--epochs`` continues the stored curve. Another ``--epochs`` adds a cosine segment from
        the learning rate reached to 0 at the new end (never a jump back up), and says so; a run whose
        learning rate has reached 0 is refused (:class:`ConfigError`).
        """
        done = int(self.lr_scheduler.last_epoch)
        old_epochs = int(meta.get("epochs") or self.config.epochs)
        stored = meta.get("lr_schedule")
        # checkpoints before 0.3 stored no schedule: theirs was one cosine over their --epochs
        schedule = (CosineSchedule.from_list(stored) if stored
                    else CosineSchedule.single(old_epochs * self.iterations_per_epoch))
        new_end = max(1, self.config.epochs * self.iterations_per_epoch)
        if new_end != schedule.end and self.config.two_stage:
            raise ConfigError(f"Cannot resume {path} with --epochs {self.config.epochs}: it was a {old_epochs}-epoch "
                              f"--two-stage run, whose stages are halves of its epochs")
        extended = schedule.extended(done, new_end, run=f"{path} ({old_epochs}-epoch schedule)")
        if extended is not schedule:
            verb = "Extending" if self.config.epochs > old_epochs else "Shortening"
            self.print_to_log_file(
                f"{verb} the pretraining from {old_epochs} to {self.config.epochs} epochs: the learning rate "
                f"continues from {extended(done) * self.config.lr:.5f} (it does not rise) and decays to 0 at epoch "
                f"{self.config.epochs}. This is not the schedule of a {self.config.epochs}-epoch run; the checkpoint "
                f"records it (macl.lr_schedule: {extended.describe()})")
        self.lr_schedule = extended
