"""Synchronised BatchNorm on any backend.

torch.nn.SyncBatchNorm runs only on GPUs; on CPU (gloo) a DDP run with per-rank BatchNorm statistics
is a different model from one process holding the whole batch. `GlobalBatchNorm` all-reduces the
per-channel sum, sum of squares and count (autograd-aware, so gradients flow through the
statistics exactly as in one process), which makes a gloo run with sync_bn=true reproduce the
single-process run. On CUDA, `convert_sync_batchnorm` uses torch's fused SyncBatchNorm instead.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from masksiam.dist import all_reduce_sum_with_grad, world_size


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the batch of all ranks: (N, C, *) on each rank, statistics of the union."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.tensor([x.numel() / c], device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])          # (2C + 1,)
        stats = all_reduce_sum_with_grad(stats)                                   # sum over ranks
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)                   # biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), m)
                self.num_batches_tracked += 1
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm{1,2,3}d -> synchronised BN (torch's on CUDA, GlobalBatchNorm elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            if module.track_running_stats:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
