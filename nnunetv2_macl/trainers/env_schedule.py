"""A training schedule read from environment variables, shared by a MACL trainer and its scratch
counterpart so that the pair differs in nothing but the initial weights (demo and benchmarks)."""
from __future__ import annotations

import os

import torch


def int_from_env(name: str, default: int, minimum: int = 1) -> int:
    """``int(os.environ[name])`` (``default`` when unset or empty), at least ``minimum``; clear errors."""
    text = os.environ.get(name, "").strip()
    if not text:
        return int(default)
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class EnvScheduleMixin:
    """Mix in before an nnU-Net trainer class: sets (epochs, training iterations, validation iterations
    per epoch) from ``schedule_env`` (env var -> default, in that order) and logs them at train start."""

    schedule_env: dict[str, int] = {}
    schedule_label = "schedule"
    pair_names = ""

    # nnU-Net records the constructor's arguments by inspecting this exact signature
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = self.schedule()

    @classmethod
    def schedule(cls) -> tuple[int, int, int]:
        return tuple(int_from_env(k, v) for k, v in cls.schedule_env.items())

    def schedule_description(self) -> str:
        return (f"{self.schedule_label}: {self.num_epochs} epochs x {self.num_iterations_per_epoch} training / "
                f"{self.num_val_iterations_per_epoch} validation iterations")

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"{self.schedule_description()} (identical for {self.pair_names})",
                               also_print_to_console=True)
