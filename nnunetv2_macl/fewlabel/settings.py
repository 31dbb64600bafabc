"""Settings of a few-label run, its arms (method x fine-tuning recipe) and what ``--resume`` may keep."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nnunetv2_macl.errors import FewLabelError
from nnunetv2_macl.fewlabel.splits import SCHEMES
from nnunetv2_macl.trainers.schedules import PRETRAINED_ONLY_RECIPES, RECIPES
from nnunetv2_macl.transfer.load_pretrained import TRANSFER_SCOPES

METHODS = ("scratch", "macl", "pcl", "simclr")
PRETRAIN_METHODS = ("macl", "pcl", "simclr")
METHOD_LABELS = {"scratch": "scratch", "macl": "MACL", "pcl": "PCL", "simclr": "SimCLR"}
TRAINERS = {("scratch", "stock"): "nnUNetTrainerScratch_bench", ("scratch", "warmup"): "nnUNetTrainerScratch_warmup_bench",
            ("pretrained", "stock"): "nnUNetTrainerMACL_bench", ("pretrained", "warmup"): "nnUNetTrainerMACL_warmup_bench",
            ("encoder", "stock"): "nnUNetTrainerMACL_encoder_bench",
            ("encoder", "warmup"): "nnUNetTrainerMACL_warmup_encoder_bench",
            ("pretrained", "protect"): "nnUNetTrainerMACL_protect_bench",
            ("encoder", "protect"): "nnUNetTrainerMACL_protect_encoder_bench",
            ("pretrained", "rescale"): "nnUNetTrainerMACL_rescale_bench",
            ("encoder", "rescale"): "nnUNetTrainerMACL_rescale_encoder_bench"}


@dataclass(frozen=True)
class Arm:
    """One line of the table: a start (``method``) fine-tuned with a recipe (``stock``/``warmup``);
    ``transfer="encoder"`` starts only the encoder from the pretraining; ``snapshot=E`` starts from the
    pretraining's checkpoint kept at epoch E (``--keep-epochs``) instead of its final one."""

    method: str
    recipe: str
    transfer: str = "pretrained"
    snapshot: int | None = None

    @property
    def key(self) -> str:
        key = self.method if self.recipe == "stock" else f"{self.method}_{self.recipe}"
        key = key if self.transfer == "pretrained" else f"{key}_{self.transfer}"
        return key if self.snapshot is None else f"{key}_e{self.snapshot}"

    @property
    def label(self) -> str:
        # a pretrained start always names its recipe: nnUNetTrainerMACL's is rescale, so "stock" must show
        extras = [self.recipe] if self.pretrained or self.recipe != "stock" else []
        if self.transfer == "encoder":
            extras.append("encoder only")
        elif self.method == "macl":  # MACL alone pretrains decoder stages: say that its row hands them over
            extras.append("paper transfer")
        if self.snapshot is not None:
            extras.append(f"pretraining epoch {self.snapshot}")
        name = METHOD_LABELS.get(self.method, self.method)
        return f"{name} ({', '.join(extras)})" if extras else name

    @property
    def trainer(self) -> str:
        start = "scratch" if self.method == "scratch" else ("encoder" if self.transfer == "encoder" else "pretrained")
        return TRAINERS[(start, self.recipe)]

    @property
    def pretrained(self) -> bool:
        return self.method in PRETRAIN_METHODS


def parse_arm(text: str, default_recipe: str = "stock") -> Arm:
    """``scratch`` | ``macl`` | ``macl:warmup`` | ``scratch:warmup`` | ``macl@encoder`` | ``macl@encoder~16`` ...
    A plain pretrained method takes ``default_recipe``; plain ``scratch`` is always nnU-Net's stock recipe
    (what users compare against). ``@encoder``: only the pretrained encoder is transferred. ``~E`` (last):
    the start is the pretraining's snapshot at epoch E, kept by ``--pretrain-extra "--keep-epochs E"``."""
    rest, tilde, snap = text.strip().partition("~")
    snapshot = None
    if tilde:
        if not snap.isdigit() or int(snap) < 1:
            raise FewLabelError(f"{text!r}: ~E names a pretraining epoch (a positive number, written last, "
                                f"e.g. macl@encoder~16), got {snap!r}")
        snapshot = int(snap)
    body, _, transfer = rest.partition("@")
    method, _, recipe = body.partition(":")
    transfer = transfer or "pretrained"
    if transfer not in TRANSFER_SCOPES:
        raise FewLabelError(f"unknown transfer {transfer!r} in {text!r} (method@encoder transfers the encoder only)")
    if transfer != "pretrained" and method not in PRETRAIN_METHODS:
        raise FewLabelError(f"{text!r}: @{transfer} needs a pretrained method ({', '.join(PRETRAIN_METHODS)})")
    if method not in METHODS:
        raise FewLabelError(f"unknown method {method!r} in {text!r} (methods: {', '.join(METHODS)}; a recipe "
                            f"is added as method:recipe, recipes: {', '.join(RECIPES)})")
    if snapshot is not None and method not in PRETRAIN_METHODS:
        raise FewLabelError(f"{text!r}: ~{snapshot} names a pretraining epoch, which {method} has none of")
    recipe = recipe or ("stock" if method == "scratch" else default_recipe)
    if recipe not in RECIPES:
        raise FewLabelError(f"unknown fine-tuning recipe {recipe!r} in {text!r} (recipes: {', '.join(RECIPES)})")
    if recipe in PRETRAINED_ONLY_RECIPES and method not in PRETRAIN_METHODS:
        what = {"protect": "freezes the pretrained parts first", "rescale": "rescales the pretrained filters"}[recipe]
        raise FewLabelError(f"{text!r}: the {recipe} recipe {what}, and a {method} start "
                            f"has none (scratch takes stock or warmup)")
    return Arm(method, recipe, transfer, snapshot)


@dataclass
class Settings:
    dataset_id: int = 981
    source: dict = field(default_factory=dict)   # where the data came from (a changed source resets --resume)
    configuration: str = "2d"
    plans: str = "nnUNetPlans"
    budgets: tuple[int, ...] = (2, 4)
    folds: int = 1
    methods: tuple[str, ...] = ("scratch", "macl")   # arms: method or method:recipe
    recipe: str = "stock"                        # recipe of a plain pretrained method
    split: str = "heldout"                       # "heldout" (the protocol) | "kfold" (earlier benchmark)
    n_val: int | None = 40                       # validation cases (kfold: cap per fold, None = all)
    n_splits: int = 5                            # kfold only
    pretrain_on_all: bool = False                # pretraining also sees the validation cases' images
    pretrain_epochs: int = 1
    pretrain_batch_size: int = 8
    pretrain_workers: int = 0
    pretrain_extra: str = ""                     # more macl_pretrain options for every pretraining, e.g. "--lr 0.01"
    finetune_epochs: int = 2
    iters: int = 4
    val_iters: int = 1
    finetune_batch_size: int | None = None       # None: the plans' batch size (stock nnU-Net)
    warmup_epochs: int | None = None             # warm-up recipe: None = 5 % of the epochs
    warmup_peak_lr: float | None = None          # warm-up recipe: None = 1e-3; protect recipe: None = 1e-2
    freeze_epochs: int | None = None             # protect recipe: None = 15 % of the epochs (0: no freeze)
    pretrained_lr_factor: float | None = None    # protect recipe: lr of the pretrained parts x this (None = 1)
    save_every: int = 5                          # nnU-Net checkpoint every K epochs (resume granularity)
    device: str = "cpu"
    jobs: int = 1
    procs: int | None = None
    seed: int = 12345
    deadline_min: float | None = None
    hard_deadline_min: float | None = None
    overlay_cases: int = 3
    profile: str = "custom"

    def arms(self) -> list[Arm]:
        return [parse_arm(m, self.recipe) for m in self.methods]

    def pretrain_methods(self) -> list[str]:
        return [m for m in PRETRAIN_METHODS if any(a.method == m for a in self.arms())]

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


_DATASET_KEYS = ("source", "dataset_id", "configuration", "plans")


def same_data(previous: Settings, current: Settings) -> bool:
    """``--resume`` keeps a run folder only for the same data; within it, every pretraining and training
    is reused (or continued) only if its own fingerprint is unchanged (see ``runner``)."""
    p, c = previous.to_dict(), current.to_dict()
    return all(p.get(k) == c.get(k) for k in _DATASET_KEYS)


def validate(s: Settings) -> None:
    """Every setting checked before anything runs, the pretraining options with ``macl_pretrain``'s parser."""
    arms = s.arms()
    if not arms or len({a.key for a in arms}) != len(arms):
        raise FewLabelError(f"methods must be distinct, got {s.methods}")
    if s.recipe not in RECIPES:
        raise FewLabelError(f"recipe must be one of {RECIPES}, got {s.recipe!r}")
    if s.split not in SCHEMES:
        raise FewLabelError(f"split must be one of {SCHEMES}, got {s.split!r}")
    if not s.budgets or any(int(m) < 1 for m in s.budgets) or list(s.budgets) != sorted(set(s.budgets)):
        raise FewLabelError(f"budgets must be distinct positive numbers in increasing order, got {s.budgets}")
    if s.split == "kfold" and not 1 <= s.folds <= s.n_splits:
        raise FewLabelError(f"folds must be in 1..n_splits ({s.n_splits}), got {s.folds}")
    if s.device not in ("cpu", "cuda"):
        raise FewLabelError(f"device must be 'cpu' or 'cuda', got {s.device!r}")
    for name in ("folds", "pretrain_epochs", "pretrain_batch_size", "finetune_epochs", "iters", "val_iters", "jobs",
                 "save_every"):
        if int(getattr(s, name)) < 1:
            raise FewLabelError(f"{name} must be >= 1, got {getattr(s, name)}")
    for name in ("finetune_batch_size", "procs", "n_val", "warmup_epochs"):
        if getattr(s, name) is not None and int(getattr(s, name)) < 1:
            raise FewLabelError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.warmup_epochs is not None and s.warmup_epochs >= s.finetune_epochs:
        raise FewLabelError(f"warmup_epochs ({s.warmup_epochs}) must be below the {s.finetune_epochs} epochs")
    if s.warmup_peak_lr is not None and not s.warmup_peak_lr > 0:
        raise FewLabelError(f"warmup_peak_lr must be > 0, got {s.warmup_peak_lr}")
    if s.freeze_epochs is not None and not 0 <= s.freeze_epochs < s.finetune_epochs - (s.warmup_epochs or 1):
        raise FewLabelError(f"freeze_epochs ({s.freeze_epochs}) must be >= 0 and leave warm-up and decay epochs of the "
                            f"{s.finetune_epochs}")
    if s.pretrained_lr_factor is not None and not s.pretrained_lr_factor > 0:
        raise FewLabelError(f"pretrained_lr_factor must be > 0, got {s.pretrained_lr_factor}")
    from nnunetv2_macl.fewlabel.pretraining import check_pretrain_extra, pretrain_config  # macl_pretrain (torch)

    check_pretrain_extra(s)
    for a in arms:
        if a.snapshot is None:
            continue
        if a.snapshot >= s.pretrain_epochs:
            raise FewLabelError(f"{a.key}: epoch {a.snapshot} is not a snapshot of a {s.pretrain_epochs}-epoch "
                                f"pretraining (the last epoch's start is the arm without ~{a.snapshot})")
        kept = pretrain_config(s, a.method).keep_epochs
        if a.snapshot not in kept:
            raise FewLabelError(f"{a.key}: the pretraining keeps no checkpoint of epoch {a.snapshot} (it keeps "
                                f"{', '.join(map(str, kept)) or 'none'}): add it to --pretrain-extra \"--keep-epochs\"")
