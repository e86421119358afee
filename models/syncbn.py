"""Synchronised BatchNorm without host syncs, on every backend.

A DDP run with per-rank BatchNorm statistics is a different model from one process holding the whole
batch. `GlobalBatchNorm` normalises with the statistics of the union of all ranks' batches (what one
process would compute), on gloo and nccl alike. torch's nn.SyncBatchNorm does this on CUDA only, and
copies the per-rank counts to the host once per BN layer per forward (`count_all[mask]`, a boolean
index): ~55 stalls per ResNet-50 forward, plus the EMA target's. Here nothing leaves the device:

  forward   per-rank mean and biased variance (C,) and count, one all_gather of (2C + 1,) per layer
            (into one preallocated buffer),
            Chan's parallel combination into the global mean / variance, then normalise
  backward  per-rank sum(dy) and sum(dy * (x - mean)) (C,), one all_reduce of (2C,), then the
            BatchNorm input gradient with the global count

On CUDA the per-element work runs in torch's own SyncBatchNorm kernels (batch_norm_stats / _elemt /
_backward_reduce / _backward_elemt: one pass each, channels-last aware, bf16 in with fp32
statistics); elsewhere the same formulas in plain torch ops. Only the input (and the (C,) statistics)
is saved for backward, as for a plain BatchNorm. Weight and bias gradients stay per rank: DDP
averages them like every other parameter gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from masksiam.dist import world_size


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _local_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, *) -> this rank's per-channel mean and biased variance, (C,) float32 each."""
    if x.is_cuda:
        mean, invstd = torch.batch_norm_stats(x, eps)     # Welford in fp32; invstd = (var + eps)^-1/2
        return mean, (invstd.reciprocal().square() - eps).clamp_min(0)
    var, mean = torch.var_mean(x.float(), _reduce_dims(x), correction=0)
    return mean, var


# Every layer gathers (W, 2C + 1) float32 into one flat buffer per (device, length, world size),
# reused by the next layer of that width: what is read from it becomes new tensors at once (the
# global statistics, a copy of the counts), and the layers run in stream order.
_BUFFERS: dict[tuple, torch.Tensor] = {}
_INTO_TENSOR: dict[str, bool] = {}          # backend -> whether it gathers into one tensor


def _all_gather_rows(packed: torch.Tensor) -> torch.Tensor:
    """(L,) on every rank -> (W, L), rank order: one all_gather into a preallocated flat (W * L,)
    buffer (the layout nccl and gloo both take; newer torch names it all_gather_single), or, on a
    backend without it, a list gather (detected once per backend)."""
    w, length = world_size(), packed.numel()
    backend = str(dist.get_backend())
    into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if _INTO_TENSOR.get(backend, True):
        key = (packed.device, packed.dtype, length, w)
        if torch.compiler.is_compiling():              # no global state in a traced graph
            out = packed.new_empty(w * length)
        else:
            out = _BUFFERS.get(key)
            if out is None:
                out = _BUFFERS[key] = packed.new_empty(w * length)
        try:
            into(out, packed)
            _INTO_TENSOR[backend] = True
            return out.view(w, length)
        except (RuntimeError, NotImplementedError, AttributeError):
            if backend in _INTO_TENSOR:                 # it worked before: a real error
                raise
            _INTO_TENSOR[backend] = False
    parts = [torch.empty_like(packed) for _ in range(w)]
    dist.all_gather(parts, packed)
    return torch.stack(parts)


def _gather_stats(mean: torch.Tensor, var: torch.Tensor, count: float) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank (C,) mean / variance and count -> the global mean, biased variance (C,) and the
    per-rank counts (W,), float32 on the device. Chan et al.'s combination (each rank's variance
    plus its mean's spread around the global mean) instead of E[x^2] - E[x]^2, which cancels
    catastrophically when |mean| >> std."""
    c = mean.shape[0]
    packed = torch.cat([mean, var, mean.new_full((1,), count)])            # (2C + 1,), no H2D copy
    packed = _all_gather_rows(packed) if world_size() > 1 else packed[None]  # (W, 2C + 1)
    means, variances, counts = packed[:, :c], packed[:, c:2 * c], packed[:, 2 * c:]   # (W, C), (W, C), (W, 1)
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    g_var = (counts * (variances + (means - g_mean).square())).sum(0) / total
    return g_mean, g_var, counts.reshape(-1).clone()                       # not a view of the buffer


class _GlobalBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        if x.is_cuda and not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()                                  # the CUDA kernels take either layout
        n_local = x.numel() // x.shape[1] if x.numel() else 0
        if n_local:
            mean, var = _local_stats(x, eps)
        else:                                                   # an empty shard adds nothing
            mean = var = x.new_zeros(x.shape[1], dtype=torch.float32)
        mean, var, counts = _gather_stats(mean, var, float(n_local))
        invstd = torch.rsqrt(var + eps)
        if x.is_cuda:
            y = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        else:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = (x.float() - mean.view(shape)) * invstd.view(shape)
            if weight is not None:
                y = y * weight.view(shape) + bias.view(shape)
            y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd, counts)
        ctx.mark_non_differentiable(mean, var, counts)
        return y, mean, var, counts

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_counts):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if x.is_cuda:
            if not (grad_y.is_contiguous() or grad_y.is_contiguous(memory_format=torch.channels_last)):
                grad_y = grad_y.contiguous()
            sum_dy, sum_dy_xmu, grad_w, grad_b = torch.batch_norm_backward_reduce(
                grad_y, x, mean, invstd, weight, need_x, need_w, need_b)
        else:
            shape = [1, -1] + [1] * (x.dim() - 2)
            dims = _reduce_dims(x)
            gf, xmu = grad_y.float(), x.float() - mean.view(shape)
            sum_dy, sum_dy_xmu = gf.sum(dims), (gf * xmu).sum(dims)                   # (C,) each
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if need_w else None
            grad_b = sum_dy.to(weight.dtype) if need_b else None
        grad_x = None
        if need_x:
            if world_size() > 1:       # every rank's loss depends on every rank's statistics
                both = torch.cat([sum_dy, sum_dy_xmu])
                dist.all_reduce(both)
                sum_dy, sum_dy_xmu = both.chunk(2)
            if x.is_cuda:
                grad_x = torch.batch_norm_backward_elemt(grad_y, x, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                                         counts.to(torch.int32))
            else:
                total = counts.sum()
                scale = invstd if weight is None else invstd * weight.float()
                grad_x = ((gf - (sum_dy / total).view(shape)
                           - xmu * (invstd.square() * sum_dy_xmu / total).view(shape))
                          * scale.view(shape)).to(x.dtype)
        return grad_x, grad_w, grad_b, None


def global_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of (N, C, *) with the statistics of every rank's batch.

    Returns y (like x), the global mean and biased variance (C,) float32 (detached) and the per-rank
    counts (W,). At world size 1 it is a plain BatchNorm (no collective)."""
    return _GlobalBatchNormFn.apply(x, weight, bias, eps)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the batch of all ranks: (N, C, *) on each rank, statistics of the union.

    In eval mode, and at world size 1, it is torch's BatchNorm (the same state_dict keys)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        y, mean, var, counts = global_batch_norm(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: the cumulative average, 1 / batches seen (a tensor: no host read)
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
                n = counts.sum()
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), m)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm{1,2,3}d -> GlobalBatchNorm (on every device), keeping weights, running
    statistics and keys."""
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
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
