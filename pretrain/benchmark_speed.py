"""Side-by-side speed benchmark of MACL pretraining against a supervised nnU-Net step.

In ONE run, on the same network (built by nnU-Net's get_network_from_plans), precision and batch:
  (a) supervised nnU-Net step: forward with deep supervision, nnU-Net's DC+CE loss, backward,
      SGD step (nnU-Net's optimizer settings);
  (b) MACL step with the batch already on the device (augmentation on the device included);
  (c) MACL step fed by the real data pipeline (nnU-Net blosc2 cases on disk -> slice index ->
      DataLoader workers -> pinned memory -> device).
Prints slices/s, the ratios b/a (MACL vs supervised step cost) and c/b (pipeline efficiency) and
the peak memory of each phase.

Examples:
  python pretrain/benchmark_speed.py                         # CHD-like 7-stage plan, 512x512, batch 16
  python pretrain/benchmark_speed.py --device cpu --size 64 --batch-size 4 --steps 5
  python pretrain/benchmark_speed.py --plans $nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch


def chd_like_plans(size: int, batch_size: int) -> dict:
    """A 2-D nnU-Net plan like the one nnU-Net makes for 512x512 CT slices (CHD): 7 stages at 512;
    fewer at smaller sizes so that the MACL crop (2 x stride x 1/lambda) equals ``size``."""
    n = int(round(np.log2(size / 8))) + 1
    if n < 3 or size != 8 * 2 ** (n - 1):
        raise SystemExit(f"--size must be a power of two >= 32, got {size}")
    n = min(n, 7)
    features = [min(32 * 2 ** i, 512) for i in range(n)]
    return {
        "dataset_name": "Dataset999_SpeedBenchmark", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [64, size, size],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": batch_size, "patch_size": [size, size], "median_image_size_in_voxels": [size, size],
            "spacing": [1.0, 1.0], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": features,
                    "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * n,
                    "strides": [[1, 1]] + [[2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
                    "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": True}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0}},
    }


def write_synthetic_cases(folder: str, num_cases: int, slices: int, size: tuple[int, int], patch) -> None:
    """Random preprocessed cases in nnU-Net's blosc2 layout (chunks as nnU-Net's preprocessor picks)."""
    import pickle

    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num_cases):
        data = rng.standard_normal((1, slices, *size), dtype=np.float32)
        seg = (data > 1).astype(np.int16)
        blocks, chunks = comp_blosc2_params(data.shape, tuple(patch), data.itemsize)
        blocks_s, chunks_s = comp_blosc2_params(seg.shape, tuple(patch), seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, {"spacing": [1, 1, 1]}, os.path.join(folder, f"case_{i:03d}"),
                                      chunks=chunks, blocks=blocks, chunks_seg=chunks_s, blocks_seg=blocks_s)
        with open(os.path.join(folder, f"case_{i:03d}.pkl"), "wb") as f:
            pickle.dump({"spacing": [1, 1, 1]}, f)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process max RSS (CPU)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def supervised_step_fn(trainer, device, amp_dtype, images):
    """One supervised nnU-Net step on the same network, with nnU-Net's loss and optimizer."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    network = trainer.build_network().to(device)
    if trainer.config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    strides = [s if isinstance(s, (list, tuple)) else [s, s] for s in network.encoder.strides]
    scales = list(list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0))[:-1]
    weights = np.array([1 / (2 ** i) for i in range(len(scales))])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                 {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                 dice_class=MemoryEfficientSoftDiceLoss), weights / weights.sum())
    optimizer = torch.optim.SGD(network.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
    seg = (images[:, :1] > 0.5).float()
    targets = [torch.nn.functional.interpolate(seg, scale_factor=tuple(float(x) for x in s), mode="nearest")
               if any(x != 1 for x in s) else seg for s in scales]
    targets = [t.long().float() for t in targets]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = network(images)
            l = loss(out, targets)
        l.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="slice size of the default CHD-like plan")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--plans", default=None, help="an nnUNetPlans.json to benchmark instead of the CHD-like plan")
    p.add_argument("--configuration", default="2d")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--cases", type=int, default=8, help="synthetic cases written for (c)")
    p.add_argument("--slices", type=int, default=40, help="slices per synthetic case")
    p.add_argument("--decoder-blocks", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from nnunetv2_macl.training.config import MACLConfig
    from nnunetv2_macl.training.pretrainer import MACLPretrainer

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.plans:
        with open(args.plans) as f:
            plans = json.load(f)
    else:
        plans = chd_like_plans(args.size, args.batch_size)
    patch = plans["configurations"][args.configuration]["patch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, plans.get("dataset_name", "Dataset999_SpeedBenchmark"))
        data_id = plans["configurations"][args.configuration]["data_identifier"]
        size = patch[-2:] if args.plans is None else [max(int(s), 32) for s in patch[-2:]]
        write_synthetic_cases(os.path.join(pre, data_id), args.cases, args.slices, tuple(size), patch)
        dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "fg": 1}, "numTraining": args.cases,
                        "file_ending": ".nii.gz"}
        steps_needed = (args.warmup + args.steps)
        epochs = max(1, -(-steps_needed * args.batch_size // (args.cases * args.slices)))
        cfg = MACLConfig(epochs=epochs, batch_size=args.batch_size, decoder_blocks=args.decoder_blocks,
                         num_workers=args.num_workers, compile=args.compile, channels_last=args.channels_last,
                         amp=not args.no_amp, save_every=10**6)
        trainer = MACLPretrainer(plans, args.configuration, dataset_json, pre, os.path.join(tmp, "out"), cfg, device)
        trainer.initialize()
        trainer.on_epoch_start()
        trainer.train_module.train()
        crop = trainer.crop_size
        b = args.batch_size
        images = torch.randn(b, trainer.num_input_channels, *crop, device=device)
        positions = torch.rand(b, 1, device=device)
        print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"torch {torch.__version__}, {plans['configurations'][args.configuration]['architecture']['network_class_name'].split('.')[-1]} "
              f"{len(trainer.network.encoder.stages)} stages, crop {crop}, batch {b}, autocast {trainer.amp_dtype}, "
              f"N = {cfg.decoder_blocks}, compile {cfg.compile}, channels_last {cfg.channels_last}", flush=True)

        results = {}
        reset_peak(device)
        step_a = supervised_step_fn(trainer, device, trainer.amp_dtype, images)
        t_a = timed(step_a, args.steps, args.warmup, device)
        results["a_supervised"] = {"s_per_step": t_a, "slices_per_s": b / t_a, "peak_gib": peak_gib(device)}
        del step_a

        reset_peak(device)
        t_b = timed(lambda: trainer.train_step(images, positions), args.steps, args.warmup, device)
        results["b_macl_on_device"] = {"s_per_step": t_b, "slices_per_s": b / t_b, "peak_gib": peak_gib(device)}

        reset_peak(device)
        it = iter(trainer.dataloader)

        def pipeline_step():
            nonlocal it
            try:
                batch = next(it)
            except StopIteration:
                trainer.current_epoch += 1
                trainer.on_epoch_start()
                it = iter(trainer.dataloader)
                batch = next(it)
            trainer.train_step(*batch)
        t_c = timed(pipeline_step, args.steps, args.warmup, device)
        results["c_macl_pipeline"] = {"s_per_step": t_c, "slices_per_s": b / t_c, "peak_gib": peak_gib(device)}

    for k, v in results.items():
        print(f"({k[0]}) {k[2:]:<18} {v['s_per_step'] * 1000:9.1f} ms/step  {v['slices_per_s']:8.1f} slices/s  "
              f"peak {v['peak_gib']:.2f} GiB{'' if device.type == 'cuda' else ' (process max RSS)'}")
    ratio_ba = t_b / t_a
    ratio_cb = (b / t_c) / (b / t_b)
    print(f"b/a (MACL step time / supervised step time) = {ratio_ba:.3f}   target <= 1.0")
    print(f"c/b (throughput with real pipeline / on-device) = {ratio_cb:.3f}   target >= 0.9")
    results.update(ratio_b_over_a=ratio_ba, ratio_c_over_b=ratio_cb, device=str(device), crop=crop, batch_size=b)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
