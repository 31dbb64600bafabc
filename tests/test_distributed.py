"""Multi-process (gloo, CPU) check of the gradient-preserving all_gather: the loss computed on the
gathered projections equals the single-process loss on the concatenated batch, and the gradients
(after DDP's averaging over processes) equal the single-process gradients."""
from __future__ import annotations

import datetime
import os
import tempfile

import pytest
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


def _in_process_group(rank: int, init_file: str, out_dir: str, body, *args) -> None:
    """Run ``body(rank, *args)`` in a gloo group of WORLD processes and save what it returns for rank."""
    # a collective that one process never joins raises after the timeout instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(body(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(body, *args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_in_process_group, args=(os.path.join(tmp, "init"), tmp, body, *args), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def _worker(rank: int, gather: bool) -> dict:
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
    return {"loss": total.detach(), "grads": grads}


def _run(gather: bool):
    return _spawn(_worker, gather)


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


# ----------------------------------------------------------------------------- the real pretrainer
def _torchrun_pretraining(tiny_dataset, results, extra: list[str]):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    macl_pretrain = shutil.which("macl_pretrain") or str(Path(sys.executable).with_name("macl_pretrain"))
    env = {**os.environ, "nnUNet_results": str(results), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", macl_pretrain,
                           "-d", str(tiny_dataset["id"]), "--device", "cpu", "--epochs", "2", "--batch-size", "4",
                           "--num-workers", "0", *extra], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return Path(results) / tiny_dataset["name"] / "MACLPretrainer__nnUNetPlans__2d"


def _check_strict_load(folder):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunetv2_macl.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(str(folder / "checkpoint_final.pth"))
    meta = ckpt["macl"]
    assert meta["epoch"] == 2
    net = get_network_from_plans(meta["network_arch_class_name"], meta["network_arch_init_kwargs"],
                                 meta["network_arch_init_kwargs_req_import"], meta["input_channels"],
                                 meta["num_segmentation_heads"], deep_supervision=True)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    return ckpt


def test_torchrun_two_processes_gathered_and_per_gpu_negatives(tiny_dataset, tmp_path):
    """The real macl_pretrain under torchrun (gloo, 2 processes, batch 4 each): two epochs run (DDP
    with parameters that get no gradient), the loss sees 2 x 2 x 4 samples when negatives are gathered
    and 2 x 4 with --per-gpu-negatives, and the checkpoint loads strictly."""
    import math

    gathered = _torchrun_pretraining(tiny_dataset, tmp_path / "gathered", [])
    log = next(gathered.glob("training_log_*.txt")).read_text()
    assert "Epoch 2/2" in log and log.count("Lg contrasts 16 samples per step") == 2
    ckpt = _check_strict_load(gathered)
    assert ckpt["logging"]["Lg_chance"] == [pytest.approx(math.log(15))] * 2

    local = _torchrun_pretraining(tiny_dataset, tmp_path / "local", ["--per-gpu-negatives"])
    log = next(local.glob("training_log_*.txt")).read_text()
    assert "Epoch 2/2" in log and log.count("Lg contrasts 8 samples per step") == 2
    ckpt = _check_strict_load(local)
    assert ckpt["logging"]["Lg_chance"] == [pytest.approx(math.log(7))] * 2


# ----------------------------------------------------------------------------- the real model and heads
def _tiny_macl(global_batchnorm: bool):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    from nnunetv2_macl.model.macl_network import MACLNetwork
    from nnunetv2_macl.training.distributed import use_global_batchnorm

    torch.manual_seed(0)
    network = PlainConvUNet(1, 3, [4, 8, 8], nn.Conv2d, 3, [1, 2, 2], 2, 2, 2, conv_bias=True,
                            norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    macl = MACLNetwork(network, decoder_blocks=1).double()
    if global_batchnorm:
        assert use_global_batchnorm(macl) == 2  # one BatchNorm in each image-level head
    return macl


def _model_batch():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(WORLD * N_PER_RANK, 1, 32, 32, generator=g, dtype=torch.float64)
    # fixed views (no randomness to share between processes): mirrored and transposed slices
    return images, images.flip(-1), images.transpose(-1, -2), torch.rand(WORLD * N_PER_RANK, generator=g)


def _model_loss(macl, images, v1, v2, positions, gather):
    out = macl(images, v1, images, v2)
    if gather:
        out = {k: all_gather_with_grad(v) for k, v in out.items()}
        positions = all_gather_with_grad(positions)
    total, _ = MultiLevelContrastiveLoss()(out, positions)
    return total


def _model_worker(rank: int, global_batchnorm: bool) -> dict:
    torch.set_num_threads(1)
    macl = _tiny_macl(global_batchnorm)
    images, v1, v2, positions = _model_batch()
    sl = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    total = _model_loss(macl, images[sl], v1[sl], v2[sl], positions[sl], gather=True)
    total.backward()
    grads = {}
    for name, p in macl.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)  # what DDP does, then divides by the number of processes
        grads[name] = g / WORLD
    running = {k: v for k, v in macl.state_dict().items() if "running_mean" in k}
    return {"loss": total.detach(), "grads": grads, "running": running}


def _run_model(global_batchnorm: bool):
    return _spawn(_model_worker, global_batchnorm)


def test_two_processes_with_the_real_model_and_heads_equal_one_process():
    """MACLNetwork (encoder, partial decoder, all four heads) on 2 x 4 slices in two processes, with
    gathered negatives and the heads' BatchNorm on the global batch: the loss, every parameter gradient
    (averaged over processes, as DDP does) and the running statistics equal one process on the 8 slices.
    With per-process BatchNorm the two views of a slice are normalised together but the negatives from
    the other process with other statistics, and the loss differs."""
    macl = _tiny_macl(global_batchnorm=False)
    images, v1, v2, positions = _model_batch()
    total = _model_loss(macl, images, v1, v2, positions, gather=False)
    total.backward()
    reference = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in macl.named_parameters()}
    running = {k: v for k, v in macl.state_dict().items() if "running_mean" in k}

    results = _run_model(global_batchnorm=True)
    for r, res in enumerate(results):
        assert torch.allclose(res["loss"], total.detach(), rtol=1e-6), (r, res["loss"], total)  # float32 loss
        for name, g in res["grads"].items():
            assert torch.allclose(g, reference[name], rtol=1e-4, atol=1e-7), name
        for k, v in res["running"].items():
            assert torch.allclose(v, running[k], rtol=1e-9, atol=1e-12), k

    per_process = _run_model(global_batchnorm=False)
    assert not torch.allclose(per_process[0]["loss"], total.detach(), atol=1e-4)


def _diagnostics_on_rank0_only(rank: int) -> dict:
    from nnunetv2_macl.data.augmentation import make_spatial_transform
    from nnunetv2_macl.training.diagnostics import embedding_diagnostics

    torch.set_num_threads(1)
    if rank != 0:  # as in MACLPretrainer.on_epoch_end: the other processes go on without diagnostics
        return {}
    macl = _tiny_macl(global_batchnorm=True)
    images, _, _, positions = _model_batch()
    return embedding_diagnostics(macl, MultiLevelContrastiveLoss(), images[:N_PER_RANK], positions[:N_PER_RANK],
                                 None, make_spatial_transform("var"), seed=3)


def test_diagnostics_on_the_main_process_alone_use_its_own_batch():
    """Under a process group with global BatchNorm in the heads, the per-epoch diagnostics run on rank 0
    only. They must not enter a collective the other process never joins (that hung torchrun runs after
    their first epoch) and must equal the same diagnostics in one process with plain BatchNorm."""
    from nnunetv2_macl.data.augmentation import make_spatial_transform
    from nnunetv2_macl.training.diagnostics import embedding_diagnostics

    images, _, _, positions = _model_batch()
    reference = embedding_diagnostics(_tiny_macl(global_batchnorm=False), MultiLevelContrastiveLoss(),
                                      images[:N_PER_RANK], positions[:N_PER_RANK], None,
                                      make_spatial_transform("var"), seed=3)
    results = _spawn(_diagnostics_on_rank0_only)
    assert results[1] == {}
    assert set(results[0]) == set(reference)
    for k, v in reference.items():
        assert results[0][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
