"""Which kernel adaptation keeps a pretrained 3-D convolution's response when a plan needs another
kernel size? (the rule used by ``nnunetv2_macl.transfer.load_pretrained.adapt_kernel``)

Setting: plan A (isotropic data) has [3,3,3] kernels, plan B (the same anatomy with 3x coarser
slices) has [1,3,3]. Reference: A's kernel on the isotropic volume, read at the slices B keeps.
Candidate: the adapted [1,3,3] kernel on B's volume (every 3rd slice). Both go through instance
norm, as every convolution in nnU-Net's networks does; the score is the mean per-channel Pearson
correlation of the two responses (1 = the adapted layer sees B's data as A's layer saw A's).
Grown kernels ([1,3,3] -> [3,3,3]): reference is the 2-D response per slice.

Inputs: real MSD Hippocampus volumes (``../shared/data/Task04_Hippocampus``, z-scored) when
present, else smooth synthetic volumes. Kernels: He-initialised (as nnU-Net initialises) and
"smooth" ones (random kernels low-pass filtered, like trained first-layer filters).

    python pretrain/measure_kernel_adaptation.py [--cases 20]
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_macl.transfer.load_pretrained import adapt_kernel

HIPPOCAMPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "Task04_Hippocampus")


def volumes(n: int) -> tuple[list[torch.Tensor], str]:
    files = sorted(glob.glob(os.path.join(HIPPOCAMPUS, "imagesTr", "hippocampus_*.nii.gz")))[:n]
    if files:
        import SimpleITK as sitk

        out = []
        for f in files:
            a = sitk.GetArrayFromImage(sitk.ReadImage(f)).astype(np.float32)
            out.append(torch.from_numpy((a - a.mean()) / (a.std() + 1e-6)))
        return out, f"{len(out)} Hippocampus volumes"
    g = torch.Generator().manual_seed(0)
    vols = [F.avg_pool3d(torch.randn(1, 1, 36, 48, 48, generator=g), 5, 1, 2)[0, 0] for _ in range(n)]
    return vols, f"{n} smooth synthetic volumes"


def kernels(kind: str, out: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, 1, 3, 3, 3, generator=g) * (2.0 / 27) ** 0.5
    if kind == "smooth":
        w = F.avg_pool3d(F.pad(w, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, 1, 0)
    return w


def in_norm(y: torch.Tensor) -> torch.Tensor:
    return F.instance_norm(y)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten(2)
    b = b.flatten(2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    c = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)
    return float(c.mean())


def shrink_scores(vols, w: torch.Tensor, factor: int = 3) -> dict[str, float]:
    scores = {m: [] for m in ("sum", "mean", "centre")}
    for v in vols:
        x = v[None, None]
        ref = in_norm(F.conv3d(x, w, padding=1)[:, :, ::factor])
        xb = x[:, :, ::factor]
        for m in scores:
            wb, _ = adapt_kernel(w, (1, 3, 3), shrink=m)
            scores[m].append(corr(ref, in_norm(F.conv3d(xb, wb, padding=(0, 1, 1)))))
    return {m: float(np.mean(s)) for m, s in scores.items()}


def grow_scores(vols, w2: torch.Tensor) -> dict[str, float]:
    """[1,3,3] -> [3,3,3]: zero-padding (the rule) against spreading the tap over the three slices."""
    out = {"centre (zero-pad)": [], "spread (repeat / 3)": []}
    for v in vols:
        x = v[None, None]
        ref = in_norm(F.conv3d(x, w2, padding=(0, 1, 1)))
        wc, _ = adapt_kernel(w2, (3, 3, 3))
        ws = w2.repeat(1, 1, 3, 1, 1) / 3
        out["centre (zero-pad)"].append(corr(ref, in_norm(F.conv3d(x, wc, padding=1))))
        out["spread (repeat / 3)"].append(corr(ref, in_norm(F.conv3d(x, ws, padding=1))))
    return {k: float(np.mean(s)) for k, s in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=20)
    args = p.parse_args()
    vols, what = volumes(args.cases)
    print(f"inputs: {what}; 32 filters per kernel family; score = mean per-channel correlation after instance norm")
    for kind in ("he", "smooth"):
        w = kernels(kind)
        print(f"[3,3,3] -> [1,3,3], {kind} kernels: " +
              ", ".join(f"{k} {v:.3f}" for k, v in shrink_scores(vols, w).items()))
        w2 = w[:, :, 1:2]
        print(f"[1,3,3] -> [3,3,3], {kind} kernels: " +
              ", ".join(f"{k} {v:.3f}" for k, v in grow_scores(vols, w2).items()))


if __name__ == "__main__":
    main()
