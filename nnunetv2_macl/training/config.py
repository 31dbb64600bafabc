"""Pretraining options and the method switches (MACL / PCL / SimCLR and the paper's ablations).

One code path: a method is a set of switches on :class:`MACLConfig`, resolved in
:func:`resolve_method`; nothing is duplicated per method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from nnunetv2_macl.errors import ConfigError

METHODS = ("macl", "pcl", "simclr")
DENSE_FORMS = ("supcon", "mse", "byol")
DENSE_CONTRASTS = ("slices", "locations")
ENCODER_MODES = ("shared", "independent", "ema")
GLOBAL_POOLINGS = ("max", "attention", "avg")  # nnunetv2_macl.model.projectors.GLOBAL_POOLINGS


@dataclass
class MACLConfig:
    method: str = "macl"
    epochs: int = 100
    batch_size: int = 16
    lr: float = 0.1  # paper; the authors' scripts use 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    threshold: float = 0.1
    tau: float = 0.1
    base_temperature: float | None = None  # authors' leftover tau/0.07 factor when set to 0.07
    decoder_blocks: int = 2
    loss_weights: tuple[float, float, float] = (1.0, 0.5, 1.0)  # Lg, Ld, LER
    dense_form: str = "supcon"
    dense_contrast: str = "slices"  # eq. 12; "locations": cells against other cells (beyond the paper)
    dense_locations: int = 64  # cells sampled per step by dense_contrast="locations"
    dense_slice_positives: bool = False  # "locations": the same cell of nearby slices is positive too
    dense_head: bool = False  # a pixel projector on the dominant decoder output (the paper has none)
    ler_content_mask: bool = True  # LER over the bottleneck cells that are content (Ld's rule); False: all
    # masked reconstruction through the N decoder stages (losses/masked_reconstruction.py), added to L_MLC
    recon_weight: float = 0.0  # 0 = off (the paper's objective)
    mask_ratio: float = 0.6  # share of the mask blocks set to 0
    mask_block: int = 8  # block edge in input pixels, a multiple of the reconstruction grid's stride
    positives: str = "position"  # "instance" = SimCLR positives (other view only)
    encoder_mode: str = "shared"
    ema_momentum: float = 0.99
    two_stage: bool = False  # Table IV: encoder with Lg first, then frozen encoder + decoder losses
    global_through_decoder: bool = True
    global_pooling: str = "max"  # image-level descriptor; "avg" (paper) collapses on InstanceNorm networks
    shared_global_head: bool = False  # one g_ins for both views (set for PCL / SimCLR)
    intensity_augmentation: bool = False
    rotation_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.7, 1.3)
    translation: float = 0.1
    crop_size: tuple[int, ...] | None = None  # default: the plan's patch size made divisible
    patches_per_case: int = 8  # 3-D configurations only
    sampling: str = "proportional"  # several datasets: "proportional" to their sizes or "balanced"
    seed: int = 12345
    num_workers: int = 2
    save_every: int = 5
    keep_epochs: tuple[int, ...] = ()  # epochs whose full checkpoint is kept (checkpoint_epoch_<E>.pth)
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on CPU
    compile: bool = False
    channels_last: bool = False
    global_negatives: bool = True  # DDP: gather projections so negatives come from the global batch

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def resolve_method(cfg: MACLConfig) -> MACLConfig:
    """Apply the method switches of METHOD.md ("Baselines and ablations") and validate.

    - pcl: encoder only (N = 0, no down-sampling), Lg only, ONE projector on the encoder for both views
      (as in PCL and SimCLR; MACL keeps its two asymmetric heads);
    - simclr: pcl with positives = the other view of the same slice only.
    """
    cfg = dataclasses.replace(cfg)
    if cfg.method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.method in ("pcl", "simclr"):
        cfg.decoder_blocks = 0
        cfg.loss_weights = (1.0, 0.0, 0.0)
        cfg.global_through_decoder = False
        cfg.shared_global_head = True
        if cfg.method == "simclr":
            cfg.positives = "instance"
    validate(cfg)
    return cfg


def validate(cfg: MACLConfig) -> None:
    if not 0 < cfg.threshold <= 1:
        raise ConfigError(f"--threshold must be in (0, 1] (positions are normalised to (0, 1]), got {cfg.threshold}")
    if cfg.tau <= 0:
        raise ConfigError(f"--tau must be > 0, got {cfg.tau}")
    if cfg.batch_size < 2:
        raise ConfigError(f"--batch-size must be >= 2 (contrastive learning needs negatives in the batch), "
                          f"got {cfg.batch_size}")
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {cfg.lr}")
    if len(cfg.loss_weights) != 3 or any(w < 0 for w in cfg.loss_weights) or sum(cfg.loss_weights) == 0:
        raise ConfigError(f"--lambdas must be three non-negative weights (Lg, Ld, LER), not all zero; "
                          f"got {cfg.loss_weights}")
    if cfg.decoder_blocks < 0:
        raise ConfigError(f"--decoder-blocks must be >= 0, got {cfg.decoder_blocks}")
    if cfg.dense_form not in DENSE_FORMS:
        raise ConfigError(f"--dense-form must be one of {DENSE_FORMS}, got {cfg.dense_form!r}")
    if cfg.dense_contrast not in DENSE_CONTRASTS:
        raise ConfigError(f"--dense-contrast must be one of {DENSE_CONTRASTS}, got {cfg.dense_contrast!r}")
    if cfg.dense_locations < 2:
        raise ConfigError(f"--dense-locations must be >= 2, got {cfg.dense_locations}")
    if cfg.encoder_mode not in ENCODER_MODES:
        raise ConfigError(f"--encoder must be one of {ENCODER_MODES}, got {cfg.encoder_mode!r}")
    if cfg.global_pooling not in GLOBAL_POOLINGS:
        raise ConfigError(f"--global-pooling must be one of {GLOBAL_POOLINGS}, got {cfg.global_pooling!r}")
    if cfg.shared_global_head and cfg.decoder_blocks > 0 and cfg.global_through_decoder:
        raise ConfigError("a shared image-level head needs Z^g from the encoder in both branches "
                          "(--decoder-blocks 0 or --global-on-encoder)")
    if cfg.positives not in ("position", "instance"):
        raise ConfigError(f"positives must be 'position' or 'instance', got {cfg.positives!r}")
    if cfg.sampling not in ("proportional", "balanced"):
        raise ConfigError(f"--sampling must be 'proportional' or 'balanced', got {cfg.sampling!r}")
    if cfg.save_every < 1:
        raise ConfigError(f"--save-every must be >= 1, got {cfg.save_every}")
    bad_keep = [e for e in cfg.keep_epochs if not 1 <= int(e) <= cfg.epochs]
    if bad_keep:
        raise ConfigError(f"--keep-epochs must list epochs between 1 and --epochs ({cfg.epochs}), got {bad_keep}")
    if cfg.recon_weight < 0:
        raise ConfigError(f"--recon-weight must be >= 0, got {cfg.recon_weight}")
    if cfg.recon_weight > 0:
        if cfg.decoder_blocks < 1:
            raise ConfigError("--recon-weight reconstructs through the pretrained decoder stages: it needs "
                              f"--decoder-blocks >= 1 (method {cfg.method} has {cfg.decoder_blocks})")
        if cfg.two_stage:
            raise ConfigError("--recon-weight is not combined with --two-stage")
        if not 0 < cfg.mask_ratio < 1:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}")
        if cfg.mask_block < 1:
            raise ConfigError(f"--mask-block must be >= 1, got {cfg.mask_block}")
    if cfg.two_stage and cfg.epochs < 2:
        raise ConfigError("--two-stage needs at least 2 epochs (half per stage)")
