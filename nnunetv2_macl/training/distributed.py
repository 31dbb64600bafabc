"""Multi-GPU helpers: a gradient-preserving all_gather so that the contrastive negatives come from
the global batch (as SimCLR's large-batch training does), not only from each GPU's share."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every process computed the same global loss from the gathered tensor: sum the gradients
        # of all processes for this process's slice
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (N, ...) from all processes along dim 0; gradients flow back to each
    process's own part. Identity when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is the sum over processes of the incoming gradients (every
    process's loss depends on every process's input through the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, over all processes.

    The image-level heads normalise their input with BatchNorm. With negatives gathered across
    processes, per-process statistics would normalise the two views of a slice together but its
    negatives from other processes with other statistics, a cue the contrastive loss can exploit (the
    leak SimCLR closes with global BatchNorm, Chen et al., ICML 2020). torch's SyncBatchNorm runs on
    GPUs only; this one runs on any backend (gloo included). The statistics are reduced with a
    differentiable all_reduce, so gradients flow through them as in a single-process batch. Same
    parameters and buffers as BatchNorm1d: checkpoints load either way. Without an initialised process
    group, in eval mode, or inside :func:`process_local_statistics`, it is plain BatchNorm1d.
    """

    # set by process_local_statistics: a forward pass that only this process runs (a diagnostic batch on
    # the main process) must not wait in an all_reduce for processes that never enter it
    process_local = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.process_local or not (dist.is_available() and dist.is_initialized())
                or dist.get_world_size() == 1):
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C), got {tuple(x.shape)}")
        xf = x if x.dtype == torch.float64 else x.float()
        local = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([float(x.shape[0])])])
        total = _AllReduceSum.apply(local)
        c = x.shape[1]
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp(min=0.0)  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def use_global_batchnorm(module: torch.nn.Module) -> int:
    """Replace every BatchNorm1d inside ``module`` by :class:`GlobalBatchNorm1d` (parameters and running
    statistics kept); returns how many were replaced."""
    replaced = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.BatchNorm1d:
                new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
                like = next(t for t in child.state_dict().values() if t.is_floating_point())
                new.to(device=like.device, dtype=like.dtype)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
                replaced += 1
    return replaced


@contextlib.contextmanager
def process_local_statistics(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block every :class:`GlobalBatchNorm1d` of ``module`` normalises with this process's own
    batch, with no collective call: for forward passes that not every process runs (the per-epoch
    diagnostics run on the main process only, and a global reduction there would wait forever)."""
    norms = [m for m in module.modules() if isinstance(m, GlobalBatchNorm1d)]
    saved = [m.process_local for m in norms]
    for m in norms:
        m.process_local = True
    try:
        yield
    finally:
        for m, value in zip(norms, saved):
            m.process_local = value
