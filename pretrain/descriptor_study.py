"""Which image-level descriptor carries per-image information on nnU-Net's InstanceNorm networks?

Measures, on real preprocessed slices of a dataset (e.g. Task04_Hippocampus, 2d):
1. at initialisation, for each descriptor of the two g_ins inputs (auxiliary bottleneck, dominant
   partial-decoder output): the mean pairwise cosine over images and the ratio of the across-image
   spread to the spatial spread inside one map (the issue's collapse measure);
2. a short pretraining (same seed, same batches) per descriptor and method: Lg of the last steps
   against its chance value log(2B - 1).

    python pretrain/descriptor_study.py -d 504 --steps 150
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch


def _pretrainer(dataset: str, method: str, pooling: str, batch_size: int, output: str):
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2_macl.training.config import MACLConfig
    from nnunetv2_macl.training.pretrainer import MACLPretrainer

    name = maybe_convert_to_dataset_name(dataset)
    folder = os.path.join(nnUNet_preprocessed, name)
    with open(os.path.join(folder, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    cfg = MACLConfig(method=method, epochs=1, batch_size=batch_size, global_pooling=pooling, num_workers=0)
    trainer = MACLPretrainer(plans, "2d", dataset_json, folder, output, cfg)
    trainer.initialize()
    return trainer


def _fixed_batch(dataset, n: int, seed: int = 0):
    """n slices from n different volumes at random positions."""
    rng = np.random.default_rng(seed)
    cases = rng.choice(int(dataset.case_index.max()) + 1, size=n, replace=False)
    idx = [int(rng.choice(np.flatnonzero(dataset.case_index == c))) for c in cases]
    items = [dataset[i] for i in idx]
    return [torch.stack(parts) for parts in zip(*items)]


def _spread(desc: torch.Tensor, fmap: torch.Tensor) -> tuple[float, float]:
    """(mean pairwise cosine, across-image std / within-map spatial std), channel-averaged."""
    from nnunetv2_macl.training.diagnostics import mean_pairwise_cosine

    across = desc.std(dim=0).mean().item()
    within = torch.flatten(fmap, 2).std(dim=2).mean().item()
    return mean_pairwise_cosine(desc), across / max(within, 1e-12)


@torch.no_grad()
def at_initialisation(trainer, images: torch.Tensor) -> dict:
    from nnunetv2_macl.model.projectors import GlobalDescriptor

    macl = trainer.macl
    encoder = macl.network.encoder
    norm_type = encoder.norm_op
    last_norm = [m for m in encoder.stages[-1].modules() if isinstance(m, norm_type)][-1]
    captured = {}
    hook = last_norm.register_forward_hook(lambda m, inp, out: captured.__setitem__("pre", inp[0]))
    aux_bottleneck = encoder(images)[-1]
    hook.remove()
    skips = encoder(macl.down(images))
    decoded = macl.partial_decode(skips)
    rows = {}
    for pooling in ("avg", "max", "attention"):
        torch.manual_seed(0)
        for where, fmap in (("auxiliary bottleneck", aux_bottleneck), ("dominant decoder output", decoded)):
            d = GlobalDescriptor(fmap.shape[1], pooling)(fmap)
            rows[f"{pooling} | {where}"] = _spread(d, fmap)
    pre = captured["pre"]
    rows["avg of pre-norm activations | auxiliary bottleneck"] = _spread(torch.flatten(pre, 2).mean(2), pre)
    return rows


def short_run(trainer, steps: int) -> dict:
    losses = []
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.train_module.train()
    t0 = time.time()
    for i, batch in enumerate(trainer.dataloader):
        if i >= steps:
            break
        trainer._iteration = i
        trainer.train_step(*batch)
        losses.append(trainer.last_step_losses)
    tail = losses[-max(1, steps // 5):]
    chance = math.log(2 * trainer.config.batch_size - 1)
    out = {k: float(np.mean([l[k] for l in tail])) for k in ("Lg", "Ld", "LER")}
    out.update(first_Lg=losses[0]["Lg"], chance=chance, ratio=out["Lg"] / chance, seconds=time.time() - t0,
               diagnostics=trainer.compute_diagnostics())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--methods", default="pcl,macl")
    p.add_argument("--skip-init", action="store_true", help="only the short pretrainings")
    p.add_argument("--poolings", default="avg,max,attention")
    p.add_argument("-o", default="/tmp/descriptor_study")
    a = p.parse_args()
    torch.set_num_threads(2)
    if not a.skip_init:
        t = _pretrainer(a.d, "macl", "max", a.batch_size, os.path.join(a.o, "init"))
        images = _fixed_batch(t.dataset, 32)[0]
        print("At initialisation, 32 slices of 32 volumes: mean pairwise cosine | across-image / within-map spread")
        for k, (cos, ratio) in at_initialisation(t, images).items():
            print(f"  {k:55s} {cos:.4f} | {ratio:.3f}", flush=True)
    print(f"Short pretraining: {a.steps} steps of batch {a.batch_size}, lr 0.1; Lg = mean of the last "
          f"{max(1, a.steps // 5)} steps")
    for method in a.methods.split(","):
        for pooling in a.poolings.split(","):
            t = _pretrainer(a.d, method, pooling, a.batch_size, os.path.join(a.o, f"{method}_{pooling}"))
            r = short_run(t, a.steps)
            print(f"  {method:6s} {pooling:9s} Lg {r['first_Lg']:.3f} -> {r['Lg']:.3f} (chance {r['chance']:.3f}, "
                  f"{r['ratio']:.3f} x) | Ld {r['Ld']:.3f} | LER {r['LER']:.4f} | {r['seconds']:.0f} s | projection "
                  f"cosine {r['diagnostics']['cos_projection']:.3f}", flush=True)


if __name__ == "__main__":
    main()
