"""What one supervised nnU-Net training step costs under each plan configuration, side by side in one run.

For every ``PLANS_JSON:CONFIGURATION[:BATCH]`` given, the network is built from the plans
(``get_network_from_plans``, deep supervision on) and trained on random tensors of the configuration's
batch and patch with nnU-Net's own loss (DC + CE behind the deep-supervision wrapper), SGD settings and
``train_step`` (the trainer's methods, without its folders, logger or data loading). The configurations
take turns step by step, so a load change on a shared machine hits all of them alike; the first
(warm-up) step of each is left out. Printed per configuration: seconds per step, the ratio to the first
one, and the wall time of 1,000 iterations and of nnU-Net's default schedule (1,000 epochs x 250).

Example (MSD Heart native 2d against the CPU configuration, Hippocampus for reference)::

    P=/work/data/heart/nnUNet_preprocessed/Dataset505_Heart/nnUNetPlans.json
    python pretrain/benchmark_plan_cost.py $P:2d_cpu $P:2d \\
        /work/data/fl/nnUNet_preprocessed/Dataset504_Hippocampus/nnUNetPlans.json:2d --steps 3

``:BATCH`` overrides the plan's batch size (e.g. the batch a benchmark really trains with). The plans
folder must hold the dataset's ``dataset.json`` (nnU-Net's planning puts it there); nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

DEFAULT_SCHEDULE = 1000 * 250  # nnUNetTrainer: num_epochs x num_iterations_per_epoch


class StepOnlyTrainer(nnUNetTrainer):
    """nnU-Net's ``_build_loss``, ``configure_optimizers`` and ``train_step`` on a network built from the plans.

    ``nnUNetTrainer.__init__`` is not run: it creates result folders and a logger, and ``initialize`` needs
    the preprocessed data; a cost estimate must work before either exists.
    """

    def __init__(self, plans: dict, configuration: str, dataset_json: dict, device: torch.device,
                 batch_size: int | None = None):
        self.plans_manager = PlansManager(plans)
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.label_manager = self.plans_manager.get_label_manager(dataset_json)
        self.device = device
        self.is_ddp = False
        self.enable_deep_supervision = True
        self.initial_lr, self.weight_decay, self.num_epochs = 1e-2, 3e-5, 1000  # nnUNetTrainer's defaults
        self.grad_scaler = torch.GradScaler("cuda") if device.type == "cuda" else None
        self.batch_size = int(batch_size or self.configuration_manager.batch_size)
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               dataset_json)
        cm = self.configuration_manager
        self.network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                              cm.network_arch_init_kwargs_req_import, self.num_input_channels,
                                              self.label_manager.num_segmentation_heads, allow_init=True,
                                              deep_supervision=True).to(device)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.loss = self._build_loss()

    def _do_i_compile(self) -> bool:
        return False  # compile time is not step cost, and nnU-Net never compiles on CPU

    def random_batch(self, seed: int = 0) -> dict:
        """Random images and labels of the plan's batch and patch, one target per deep-supervision output."""
        g = torch.Generator().manual_seed(seed)
        patch = [int(p) for p in self.configuration_manager.patch_size]
        data = torch.randn(self.batch_size, self.num_input_channels, *patch, generator=g)
        n_classes = len(self.label_manager.all_labels)
        seg = torch.randint(0, n_classes, (self.batch_size, 1, *patch), generator=g).float()
        targets = []
        for scale in self._get_deep_supervision_scales():
            size = [max(1, int(round(p * s))) for p, s in zip(patch, scale)]
            targets.append(seg if size == patch else torch.nn.functional.interpolate(seg, size=size, mode="nearest"))
        return {"data": data.to(self.device), "target": [t.to(self.device) for t in targets]}


@dataclass
class Entry:
    label: str
    trainer: StepOnlyTrainer
    batch: dict
    times: list[float] = field(default_factory=list)


def parse_spec(spec: str) -> tuple[Path, str, int | None]:
    """``PLANS_JSON:CONFIGURATION[:BATCH]`` -> (plans file, configuration, batch or None)."""
    parts = spec.rsplit(":", 2)
    batch = None
    if len(parts) == 3 and parts[2].isdigit():
        batch = int(parts[2])
        parts = parts[:2]
    elif len(parts) == 3:
        parts = [parts[0] + ":" + parts[1], parts[2]]
    if len(parts) != 2 or not parts[1]:
        raise SystemExit(f"benchmark_plan_cost: expected PLANS_JSON:CONFIGURATION[:BATCH], got {spec!r}")
    return Path(parts[0]), parts[1], batch


def build_entry(spec: str, device: torch.device) -> Entry:
    plans_file, configuration, batch = parse_spec(spec)
    if not plans_file.is_file():
        raise SystemExit(f"benchmark_plan_cost: no plans file {plans_file}")
    dataset_json_file = plans_file.parent / "dataset.json"
    if not dataset_json_file.is_file():
        raise SystemExit(f"benchmark_plan_cost: {dataset_json_file} is missing (labels and channels come from it)")
    plans = json.loads(plans_file.read_text())
    if configuration not in plans.get("configurations", {}):
        raise SystemExit(f"benchmark_plan_cost: {plans_file} has no configuration {configuration!r} "
                         f"(it has {sorted(plans.get('configurations', {}))})")
    trainer = StepOnlyTrainer(plans, configuration, json.loads(dataset_json_file.read_text()), device, batch)
    label = f"{plans['dataset_name'].split('_', 1)[-1]} {configuration}" + (f" (batch {batch})" if batch else "")
    return Entry(label, trainer, trainer.random_batch())


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmark_plan_cost", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", metavar="PLANS_JSON:CONFIGURATION[:BATCH]",
                   help="configurations to time; ratios are to the first")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("benchmark_plan_cost: --steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    torch.manual_seed(0)
    entries = [build_entry(s, device) for s in args.specs]
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.2f} at start", flush=True)
    for e in entries:
        cm, arch = e.trainer.configuration_manager, e.trainer.configuration_manager.network_arch_init_kwargs
        n_params = sum(t.numel() for t in e.trainer.network.parameters())
        print(f"  {e.label}: patch {list(cm.patch_size)}, spacing {list(cm.spacing)}, batch {e.trainer.batch_size}, "
              f"{arch['n_stages']} stages {list(arch['features_per_stage'])}, {n_params / 1e6:.1f} M parameters",
              flush=True)
    t_all = time.perf_counter()
    for step in range(args.warmup + args.steps):
        for e in entries:  # round robin: a load change on the shared cores hits every configuration
            t = time.perf_counter()
            e.trainer.train_step(e.batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                e.times.append(time.perf_counter() - t)
        done = "warm-up" if step < args.warmup else ", ".join(f"{e.label} {e.times[-1]:.2f} s" for e in entries)
        print(f"  step {step + 1}/{args.warmup + args.steps}: {done}", flush=True)
    load1 = os.getloadavg()
    ref = float(np.mean(entries[0].times))
    rows = []
    print(f"\n{args.steps} timed steps each after {args.warmup} warm-up, {time.perf_counter() - t_all:.0f} s in all; "
          f"load average {load1[0]:.2f} at the end; max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    header = f"{'configuration':<28} {'patch':>10} {'batch':>5} {'s/step':>8} {'min-max':>13} {'x first':>8} " \
             f"{'1,000 it':>9} {'250,000 it':>11}"
    print(header)
    print("-" * len(header))
    for e in entries:
        m = float(np.mean(e.times))
        patch = "x".join(str(int(v)) for v in e.trainer.configuration_manager.patch_size)
        rows.append({"configuration": e.label, "patch_size": patch, "batch_size": e.trainer.batch_size,
                     "seconds_per_step": m, "min": min(e.times), "max": max(e.times), "ratio_to_first": m / ref,
                     "seconds_per_1000_iterations": 1000 * m, "seconds_default_schedule": DEFAULT_SCHEDULE * m})
        print(f"{e.label:<28} {patch:>10} {e.trainer.batch_size:>5} {m:>8.2f} "
              f"{min(e.times):>6.2f}-{max(e.times):<6.2f} {m / ref:>8.2f} {human(1000 * m):>9} "
              f"{human(DEFAULT_SCHEDULE * m):>11}")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "device": str(device),
                                               "threads": torch.get_num_threads(), "load_average": [load0, load1],
                                               "steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
