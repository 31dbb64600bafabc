"""``macl_pretrain``: MACL self-supervised pretraining on an nnU-Net preprocessed dataset.

Thin over :func:`run_pretraining` (the API), as nnU-Net's ``run_training`` is over its trainer.
Multi-GPU: ``torchrun --nproc_per_node N $(which macl_pretrain) -d ID ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from nnunetv2_macl.data.multi_dataset import dataset_id_of
from nnunetv2_macl.errors import UsageError
from nnunetv2_macl.training.config import MACLConfig, resolve_method

REQUIRED_ENV = ("nnUNet_preprocessed", "nnUNet_results")


def _require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise UsageError(f"Environment variable {name} is not set. Set nnUNet_raw, nnUNet_preprocessed and "
                         f"nnUNet_results as for nnU-Net (see nnU-Net's documentation/setting_up_paths.md).")
    return value


def resolve_dataset_name(dataset_name_or_id: str | int) -> str:
    """nnU-Net's dataset id/name lookup, with a one-line error; the dataset must have been planned
    (a folder in nnUNet_preprocessed)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    preprocessed_root = _require_env("nnUNet_preprocessed")
    try:
        name = str(maybe_convert_to_dataset_name(dataset_name_or_id))
    except (RuntimeError, ValueError, AssertionError) as e:
        text = " ".join(str(e).split())
        if "More than one dataset name" in text:
            raise UsageError(f"Dataset id {dataset_name_or_id!r} is ambiguous: more than one DatasetXXX_* folder has "
                             f"this id in nnUNet_raw, nnUNet_preprocessed or nnUNet_results; pass the full name") from None
        raise UsageError(f"Unknown dataset {dataset_name_or_id!r}: no dataset with this id or name in nnUNet_raw "
                         f"({os.environ.get('nnUNet_raw')}), nnUNet_preprocessed ({preprocessed_root}) or "
                         f"nnUNet_results ({os.environ.get('nnUNet_results')})") from None
    if not os.path.isdir(os.path.join(preprocessed_root, name)):
        raw = os.environ.get("nnUNet_raw")
        if raw and os.path.isdir(os.path.join(raw, name)):
            raise UsageError(f"Dataset {name} is not planned and preprocessed (no {os.path.join(preprocessed_root, name)}"
                             f"). Run: nnUNetv2_plan_and_preprocess -d {dataset_id_of(name)}")
        raise UsageError(f"Unknown dataset {dataset_name_or_id!r}: no folder {name} in nnUNet_preprocessed "
                         f"({preprocessed_root})")
    return name


def load_plans_and_dataset_json(dataset_name: str, plans_identifier: str) -> tuple[dict, dict, str]:
    preprocessed = os.path.join(_require_env("nnUNet_preprocessed"), dataset_name)
    plans_file = os.path.join(preprocessed, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        available = sorted(f[:-5] for f in os.listdir(preprocessed) if f.endswith("Plans.json")) \
            if os.path.isdir(preprocessed) else []
        raise UsageError(f"Unknown plans {plans_identifier!r} for {dataset_name}: {plans_file} does not exist "
                         f"(available: {available or 'none; run nnUNetv2_plan_and_preprocess'})")
    plans = _read_json(plans_file, "plans")
    dataset_json_file = os.path.join(preprocessed, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise UsageError(f"{dataset_json_file} is missing; rerun nnUNetv2_plan_and_preprocess -d "
                         f"{dataset_id_of(dataset_name)}")
    dataset_json = _read_json(dataset_json_file, "dataset.json")
    return plans, dataset_json, preprocessed


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"Cannot read the {what} file {path} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"The {what} file {path} does not hold a JSON object")
    return data


def check_configuration(plans: dict, configuration: str, plans_identifier: str, dataset_name: str,
                        preprocessed: str) -> None:
    """The configuration must be in the plans and preprocessed (its data folder must exist)."""
    configurations = plans.get("configurations") or {}
    if configuration not in configurations:
        raise UsageError(f"Unknown configuration {configuration!r} in plans {plans_identifier!r} of {dataset_name} "
                         f"(available: {sorted(configurations)})")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    data_folder = os.path.join(preprocessed, data_identifier)
    if not os.path.isdir(data_folder):
        command = f"nnUNetv2_preprocess -d {dataset_id_of(dataset_name)} -c {configuration}"
        if plans_identifier != "nnUNetPlans":
            command += f" -plans_name {plans_identifier}"
        raise UsageError(f"Dataset {dataset_name} is not preprocessed for configuration {configuration!r} (missing "
                         f"{data_folder}). Run: {command}")


def pretraining_output_folder(dataset_name: str, plans_identifier: str, configuration: str) -> str:
    from nnunetv2_macl.training.pretrainer import output_folder_name

    return os.path.join(_require_env("nnUNet_results"), dataset_name, output_folder_name(plans_identifier,
                                                                                        configuration))


def resolve_sources(datasets: list[str], configuration: str, plans_identifier: str,
                    plans_from: str | int | None = None) -> tuple[dict, dict, str, list[tuple[str, str]]]:
    """The plans whose network is pretrained (``plans_from``, default the first dataset), its
    dataset.json and preprocessed folder, and (name, data folder) of every dataset to pretrain on,
    each checked compatible with those plans (one-line errors naming the dataset, field and fix)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_macl.data.multi_dataset import check_compatible_plans

    names = [resolve_dataset_name(d) for d in datasets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"Dataset(s) given more than once to -d: {', '.join(duplicates)}")
    ref_name = resolve_dataset_name(plans_from) if plans_from is not None else names[0]
    plans, dataset_json, preprocessed = load_plans_and_dataset_json(ref_name, plans_identifier)
    configurations = plans.get("configurations") or {}
    if configuration not in configurations:
        raise UsageError(f"Unknown configuration {configuration!r} in plans {plans_identifier!r} of {ref_name} "
                         f"(available: {sorted(configurations)})")
    sources = []
    for name in names:
        if name == ref_name:
            check_configuration(plans, configuration, plans_identifier, name, preprocessed)
            this_plans, this_preprocessed = plans, preprocessed
        else:
            this_plans, this_json, this_preprocessed = load_plans_and_dataset_json(name, plans_identifier)
            check_compatible_plans(ref_name, plans, dataset_json, name, this_plans, this_json, configuration,
                                   plans_identifier)
            check_configuration(this_plans, configuration, plans_identifier, name, this_preprocessed)
        data_identifier = PlansManager(this_plans).get_configuration(configuration).data_identifier
        sources.append((name, os.path.join(this_preprocessed, data_identifier)))
    return plans, dataset_json, preprocessed, sources


def run_pretraining(dataset_name_or_id: str | int | list, configuration: str = "2d",
                    plans_identifier: str = "nnUNetPlans", config: MACLConfig | None = None,
                    device: str | torch.device = "cuda", continue_training: bool = False,
                    output_folder: str | None = None, plans_from: str | int | None = None) -> str:
    """Pretrain with MACL and return the output folder (holding checkpoint_final.pth).

    ``dataset_name_or_id`` may list several datasets (one pretraining over all of them): the network
    comes from the plans of ``plans_from`` (default: the first dataset), every dataset must be
    preprocessed with a compatible plan, and the output goes under the first dataset unless
    ``output_folder`` is given.

    Everything that can be checked without training (options, environment, dataset, plans,
    configuration, data, crop, output folder, the checkpoint to resume) is checked first; the
    output folder is created only after that, when training starts. User errors raise the
    exceptions in :data:`nnunetv2_macl.errors.USER_ERRORS` with one-line messages.
    """
    from nnunetv2_macl.training.pretrainer import MACLPretrainer, check_output_folder_writable

    config = config or MACLConfig()
    resolve_method(config)  # option errors first (raises ConfigError); the trainer resolves again
    for name in REQUIRED_ENV:
        _require_env(name)
    device = torch.device(device) if not isinstance(device, torch.device) else device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps requested but MPS is not available; use --device cpu")

    datasets = list(dataset_name_or_id) if isinstance(dataset_name_or_id, (list, tuple)) else [dataset_name_or_id]
    plans, dataset_json, preprocessed, sources = resolve_sources(datasets, configuration, plans_identifier,
                                                                 plans_from)
    output_folder = output_folder or pretraining_output_folder(sources[0][0], plans_identifier, configuration)
    latest = os.path.join(output_folder, "checkpoint_latest.pth")
    final = os.path.join(output_folder, "checkpoint_final.pth")
    if not continue_training and (os.path.isfile(final) or os.path.isfile(latest)):
        raise UsageError(f"{output_folder} already holds a pretraining checkpoint; use --c to continue it, or remove "
                         f"the folder to start over")
    if rank == 0:
        check_output_folder_writable(output_folder)  # creates nothing
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    trainer = MACLPretrainer(plans, configuration, dataset_json, preprocessed, output_folder, config, device,
                             rank=rank, world_size=world_size, sources=sources)
    trainer.initialize()
    if continue_training:
        resume_from = latest if os.path.isfile(latest) else final if os.path.isfile(final) else None
        if resume_from is not None:
            trainer.load_checkpoint(resume_from)
        else:
            trainer.print_to_log_file(f"--c: no {latest} yet; starting a new pretraining")
    trainer.run_training()  # creates the output folder (on_train_start)
    return output_folder


def _floats(text: str, n: int | None = None) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if n is not None and len(values) != n:
        raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
    return values


def _epoch_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch numbers, got {text!r}")
    return values


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (``macl_pretrain: error: ...``), exit code 2 as usual."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    d = MACLConfig()
    p = _OneLineErrorParser(
        prog="macl_pretrain",
        description="MACL self-supervised pretraining (no labels) of the network nnU-Net plans for a dataset. "
                    "Writes $nnUNet_results/DatasetXXX_Name/MACLPretrainer__<plans>__<configuration>/.")
    p.add_argument("-d", dest="dataset", nargs="+", required=True,
                   help="dataset id(s) or name(s), as nnU-Net accepts; several: one pretraining over all of them")
    p.add_argument("-c", dest="configuration", default="2d", help="nnU-Net configuration (default 2d)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--plans-from", dest="plans_from", default=None,
                   help="several datasets: the dataset whose plan gives the network (default: the first of -d)")
    p.add_argument("--sampling", default=d.sampling, choices=["proportional", "balanced"],
                   help="several datasets: samples per epoch proportional to each dataset's size (default) or an "
                        "equal share per dataset")
    p.add_argument("-o", dest="output_folder", default=None,
                   help="output folder (default $nnUNet_results/<first dataset>/MACLPretrainer__<plans>__<conf>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cuda", "cpu", "mps"], help="default: cuda when available, else cpu")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="slices per process (default 16)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate, cosine decay per iteration "
                                                          "(paper 0.1; the authors' scripts 0.01)")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help="positions closer than this are positives (default 0.1)")
    p.add_argument("--decoder-blocks", type=int, default=d.decoder_blocks, help="N decoder stages pretrained")
    p.add_argument("--lambdas", type=lambda s: _floats(s, 3), default=d.loss_weights,
                   help="weights of Lg,Ld,LER (default 1,0.5,1); 0 switches a loss off")
    p.add_argument("--tau", type=float, default=d.tau, help="temperature (default 0.1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="data loading processes")
    p.add_argument("--c", dest="continue_training", action="store_true",
                   help="continue from checkpoint_latest.pth in the output folder")
    g = p.add_argument_group("method, baselines and ablations (METHOD.md)")
    g.add_argument("--method", default=d.method, choices=["macl", "pcl", "simclr"])
    g.add_argument("--dense-form", default=d.dense_form, choices=["supcon", "mse", "byol"])
    g.add_argument("--dense-contrast", default=d.dense_contrast, choices=["slices", "locations"],
                   help="Ld (supcon form) contrasts each location across slices ('slices', paper eq. 12) or cells "
                        "against the other cells of the same and other slices ('locations': positives are the "
                        "same cell in the other branch)")
    g.add_argument("--dense-locations", type=int, default=d.dense_locations,
                   help="--dense-contrast locations: cells sampled per step (default 64)")
    g.add_argument("--dense-slice-positives", action="store_true",
                   help="--dense-contrast locations: the same cell of slices within --threshold is a positive too")
    g.add_argument("--dense-head", action="store_true",
                   help="a pixel projection head on the dominant decoder output (the paper contrasts the decoder "
                        "output itself)")
    g.add_argument("--ler-all-cells", action="store_true",
                   help="LER over every bottleneck cell, padding included (the paper's loss, whose crops have no "
                        "padding; before 0.3). Default: the cells that are mostly padding are left out, as in Ld")
    g.add_argument("--recon-weight", type=float, default=d.recon_weight,
                   help="weight of a masked reconstruction term through the N decoder stages, on the full-resolution "
                        "view (beyond the paper; default 0 = off)")
    g.add_argument("--mask-ratio", type=float, default=d.mask_ratio,
                   help="--recon-weight: share of the blocks masked (default 0.6)")
    g.add_argument("--mask-block", type=int, default=d.mask_block,
                   help="--recon-weight: mask block edge in pixels, a multiple of decoder stage N's stride (default 8)")
    g.add_argument("--encoder", dest="encoder_mode", default=d.encoder_mode,
                   choices=["shared", "independent", "ema"], help="auxiliary-branch encoder")
    g.add_argument("--two-stage", action="store_true", help="Lg on the encoder first, then Ld with it frozen")
    g.add_argument("--global-on-encoder", action="store_true",
                   help="dominant image-level projection from the encoder (paper eq. 9) instead of the decoder")
    g.add_argument("--global-pooling", default=d.global_pooling, choices=["max", "attention", "avg"],
                   help="image-level descriptor pooled before g_ins (default max; the paper's avg pool carries "
                        "almost no per-image information after nnU-Net's InstanceNorm, see docs/RESULTS.md)")
    g.add_argument("--intensity-aug", action="store_true",
                   help="add brightness/contrast/gamma/noise jitter to all views (authors' code)")
    g.add_argument("--base-temperature", type=float, default=None,
                   help="multiply losses by tau/base_temperature (authors' code uses 0.07)")
    o = p.add_argument_group("data and engineering")
    o.add_argument("--crop-size", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                   help="crop per axis, e.g. 64,64 (default: the plan's patch size made divisible)")
    o.add_argument("--patches-per-case", type=int, default=d.patches_per_case, help="3-D configurations")
    o.add_argument("--save-every", type=int, default=d.save_every,
                   help="write checkpoint_latest.pth every K epochs (what --c resumes from; 1 for runs that span "
                        "sessions)")
    o.add_argument("--keep-epochs", type=_epoch_list, default=d.keep_epochs, metavar="E1,E2,...",
                   help="also keep the full checkpoint of these epochs (checkpoint_epoch_<E>.pth), each loadable "
                        "with MACL_PRETRAINED; the learning-rate schedule still spans all --epochs")
    o.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    o.add_argument("--channels-last", action="store_true")
    o.add_argument("--per-gpu-negatives", action="store_true",
                   help="multi-GPU: negatives from each GPU's batch only (the authors' behaviour)")
    return p


def config_from_args(args: argparse.Namespace) -> MACLConfig:
    return MACLConfig(
        method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, threshold=args.threshold,
        tau=args.tau, base_temperature=args.base_temperature, decoder_blocks=args.decoder_blocks,
        loss_weights=tuple(args.lambdas), dense_form=args.dense_form, dense_contrast=args.dense_contrast,
        dense_locations=args.dense_locations, dense_slice_positives=args.dense_slice_positives,
        dense_head=args.dense_head, ler_content_mask=not args.ler_all_cells, encoder_mode=args.encoder_mode,
        recon_weight=args.recon_weight, mask_ratio=args.mask_ratio, mask_block=args.mask_block,
        two_stage=args.two_stage, global_through_decoder=not args.global_on_encoder,
        global_pooling=args.global_pooling,
        intensity_augmentation=args.intensity_aug, crop_size=args.crop_size,
        patches_per_case=args.patches_per_case, sampling=args.sampling, seed=args.seed, num_workers=args.num_workers,
        save_every=args.save_every, keep_epochs=tuple(args.keep_epochs), amp=not args.no_amp, compile=args.compile,
        channels_last=args.channels_last,
        global_negatives=not args.per_gpu_negatives)


def one_line(e: BaseException) -> str:
    """The exception's message on one line (nnU-Net and torch messages can span several)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors (:data:`~nnunetv2_macl.errors.USER_ERRORS`) are printed as
    ``macl_pretrain: error: <one line>`` with exit code 2 and no traceback; anything else is a bug
    and keeps its traceback."""
    from nnunetv2_macl.errors import USER_ERRORS

    args = build_parser().parse_args(argv)  # argparse prints its own one-line usage errors (exit 2)
    try:
        folder = run_pretraining(args.dataset, args.configuration, args.plans, config_from_args(args), args.device,
                                 args.continue_training, args.output_folder, args.plans_from)
    except USER_ERRORS as e:
        sys.stdout.flush()
        print(f"macl_pretrain: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    print(f"MACL pretraining finished. Weights for fine-tuning: {os.path.join(folder, 'checkpoint_final.pth')}")
    return 0


if __name__ == "__main__":
    # ``python -m nnunetv2_macl.run.pretrain``: run the imported module's main, not this __main__ copy,
    # whose UsageError would be a different class from the one in nnunetv2_macl.errors.USER_ERRORS
    from nnunetv2_macl.run.pretrain import main as _main

    sys.exit(_main())
