"""Multi-process (gloo, CPU) check of the gradient-preserving all_gather: the loss computed on the
gathered projections equals the single-process loss on the concatenated batch, and the gradients
(after DDP's averaging over processes) equal the single-process gradients."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunetv2_macl.losses import MultiLevelContrastiveLoss
from nnunetv2_macl.training.distributed import all_gather_with_grad

WORLD = 2
N_PER_RANK = 4


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = WORLD * N_PER_RANK
    return {
        "global_dominant": torch.randn(n, 16, generator=g),
        "global_auxiliary": torch.randn(n, 16, generator=g),
        "dense_dominant": torch.randn(n, 8, 3, 3, generator=g),
        "dense_auxiliary": torch.randn(n, 8, 3, 3, generator=g),
        "bottleneck_dominant": torch.randn(n, 8, 2, 2, generator=g),
        "bottleneck_auxiliary": torch.randn(n, 8, 4, 4, generator=g),
    }, torch.rand(n, 1, generator=g)


def _worker(rank: int, init_file: str, out_dir: str, gather: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        outputs, positions = make_batch()
        sl = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        local = {k: v[sl].clone().requires_grad_(True) for k, v in outputs.items()}
        loss_fn = MultiLevelContrastiveLoss()
        if gather:
            gathered = {k: all_gather_with_grad(v) for k, v in local.items()}
            total, _ = loss_fn(gathered, all_gather_with_grad(positions[sl]))
        else:  # per-GPU negatives (the authors' behaviour)
            total, _ = loss_fn(local, positions[sl])
        total.backward()
        # the backward all_reduce leaves WORLD x d(loss)/d(own rows) on each process; DDP's averaging
        # of parameter gradients over the processes divides that by WORLD again
        grads = {k: v.grad / WORLD for k, v in local.items()}
        torch.save({"loss": total.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(gather: bool):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, gather), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_gathered_loss_and_gradients_equal_single_process():
    outputs, positions = make_batch()
    full = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    total, _ = MultiLevelContrastiveLoss()(full, positions)
    total.backward()

    results = _run(gather=True)
    for r, res in enumerate(results):
        assert torch.allclose(res["loss"], total.detach(), atol=1e-5), (r, res["loss"], total)
        sl = slice(r * N_PER_RANK, (r + 1) * N_PER_RANK)
        for k, g in res["grads"].items():
            assert torch.allclose(g, full[k].grad[sl], atol=1e-5), k


def test_per_gpu_negatives_differ_from_global_batch():
    outputs, positions = make_batch()
    total, _ = MultiLevelContrastiveLoss()(outputs, positions)
    results = _run(gather=False)
    per_rank = [MultiLevelContrastiveLoss()({k: v[r * N_PER_RANK:(r + 1) * N_PER_RANK] for k, v in outputs.items()},
                                            positions[r * N_PER_RANK:(r + 1) * N_PER_RANK])[0] for r in range(WORLD)]
    for r, res in enumerate(results):
        assert torch.allclose(res["loss"], per_rank[r], atol=1e-5)
    assert not torch.allclose(results[0]["loss"], total, atol=1e-3)
