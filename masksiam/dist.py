"""Distributed helpers that also work at world size 1 without a launcher.

`python train.py` runs in one process with no process group; `torchrun --nproc_per_node=N train.py`
sets RANK/WORLD_SIZE/LOCAL_RANK and we join a group (nccl on CUDA, gloo on CPU). Every helper here
is a no-op at world size 1, so the training code never branches on it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from masksiam.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# MASKSIAM_DEVICE=cpu|cuda|auto chooses the device where the caller does not: tests designed for the
# CPU (2-process gloo, bitwise comparisons) pin it on a CUDA host, and a user can keep a run off the GPU
DEVICE_ENV = "MASKSIAM_DEVICE"
DEVICES = ("auto", "cpu", "cuda")


def choose_device(device: str | None = None) -> str:
    """"cpu" or "cuda": `device` if given, else $MASKSIAM_DEVICE, else auto (CUDA where it exists)."""
    source = "device" if device is not None else DEVICE_ENV
    device = device if device is not None else os.environ.get(DEVICE_ENV, "auto") or "auto"
    if device not in DEVICES:
        raise ConfigError(f"{source}={device!r}: choose from {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}=cuda but CUDA is not available (torch {torch.__version__})")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes, or stay single-process; pick the device
    (choose_device: the argument, else $MASKSIAM_DEVICE, else CUDA where available)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = choose_device(device) == "cuda"
    if use_cuda:
        # local rank modulo the visible GPUs: a scheduler that shows each task only its own GPU
        # (CUDA_VISIBLE_DEVICES=<one>) still launches local ranks 0..N-1
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # torchrun's store outlives a worker restart (--max-restarts), and a restarted worker could
        # read the dead group's addresses from it before its peer overwrote them (gloo: connection
        # refused, or a hang): every attempt gets its own key space
        store, _, _ = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"attempt{attempt}", store),
                                rank=rank, world_size=world_size, device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def wrap_ddp(module: torch.nn.Module, device: torch.device, *, broadcast_buffers: bool = True) -> torch.nn.Module:
    """`module` under DistributedDataParallel at world size > 1 (gradients averaged over ranks in the
    backward), else `module` itself. Gradients stay in DDP's all-reduce buckets (gradient_as_bucket_view:
    .grad views them, no copy, no second buffer). broadcast_buffers=False where every rank's buffers
    are equal anyway (train.py's sync_bn: GlobalBatchNorm's statistics are the global batch's)."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               broadcast_buffers=broadcast_buffers, gradient_as_bucket_view=True)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice.

    Every rank computes the loss over the gathered (world*N, D) tensor, so the gradient reaching
    rank r's slice is the sum over ranks of d(loss_k)/d(slice_r): an all_reduce of the full
    gradient, then the local slice. (torch.distributed.nn.all_gather uses reduce_scatter, which
    gloo lacks.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.n
        return grad[start:start + ctx.n]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; every rank's output feeds its own loss, so the gradient reaching each
    input is the sum over ranks of the output gradients: an all_reduce again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks, differentiable (global BatchNorm statistics, Barlow Twins' matrix)."""
    if world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) on each rank -> (world*N, ...) in rank order, differentiable w.r.t. the local part."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) on each rank -> (world*N, ...) in rank order; for queues, kNN banks, metrics."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        # gloo's worker threads free finished collectives after they return, and freeing one whose
        # tensors Python already dropped (all_gather_object's) takes the GIL. A group destroyed in
        # that window (DDP's reducer holds it to the end) joins those threads while holding the
        # GIL: a deadlock at exit, seen in 1 of 12 2-process runs. A barrier, then a wait without
        # the GIL, lets them finish first.
        dist.barrier()
        time.sleep(0.1)
        dist.destroy_process_group()


def all_reduce_max(flag: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (e.g. a 'skip this step' flag every rank must agree on)."""
    if world_size() == 1:
        return flag
    out = flag.to(torch.float32).clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(flag.dtype)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank (a host-side decision every rank must take together)."""
    if world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] at world size 1."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
