"""The momentum (EMA) target network of BYOL and MoCo, as three functions.

    target = make_target(online)                    # once, after building the online network
    ...                                             # every optimizer step, after optimizer.step():
    m = momentum_at(step, total_steps, hp["ema_momentum"], hp["ema_schedule"])
    ema_update(target, online, m)                   # target <- m * target + (1 - m) * online

`online` may be wrapped in DistributedDataParallel or torch.compile; both are unwrapped. The target
is never in the optimizer and needs no gradient; keep it in train mode for its forward, so its
BatchNorm uses batch statistics as in BYOL and MoCo (the loop runs it under torch.no_grad()).

Buffers policy: floating-point buffers (BatchNorm running_mean / running_var) are AVERAGED with the
same momentum as the parameters; integer buffers (num_batches_tracked) are copied. Averaging keeps
the target the EMA of the online network's whole state, so the target is a consistent model to
evaluate or export. Copying the online running statistics would pair the target's weights, which
lag the online ones by about 1 / (1 - m) steps, with statistics measured on other weights; and
when the target runs in train mode its own forward already refreshes its running statistics from
its own activations, which the slow average leaves in charge (at m -> 1, BYOL's end of training,
the update leaves the target untouched, buffers included).

Cost: one multi-tensor lerp over the parameters and one over the float buffers per step
(torch._foreach_lerp_), no host sync; momentum is a Python float from the host-side step count.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def make_target(online: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) online network with requires_grad off: the momentum target."""
    target = copy.deepcopy(unwrap(online))
    target.requires_grad_(False)
    return target


def _pairs(target: nn.Module, online: nn.Module):
    params_t, params_o = list(target.parameters()), list(online.parameters())
    buffers_t, buffers_o = list(target.buffers()), list(online.buffers())
    if len(params_t) != len(params_o) or len(buffers_t) != len(buffers_o):
        raise ValueError(f"EMA target and online network differ: {len(params_t)} vs {len(params_o)} parameters, "
                         f"{len(buffers_t)} vs {len(buffers_o)} buffers (build the target with make_target)")
    return params_t, params_o, buffers_t, buffers_o


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for parameters and float buffers;
    integer buffers are copied (see the module docstring for why)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    params_t, params_o, buffers_t, buffers_o = _pairs(target, unwrap(online))
    float_t = [b for b in buffers_t if b.is_floating_point()]
    float_o = [b for b in buffers_o if b.is_floating_point()]
    if momentum < 1.0:
        # lerp(t, o, w) = t + w (o - t) = (1 - w) t + w o, with w = 1 - momentum
        torch._foreach_lerp_(params_t, params_o, 1.0 - momentum)
        if float_t:
            torch._foreach_lerp_(float_t, float_o, 1.0 - momentum)
    for bt, bo in zip(buffers_t, buffers_o):
        if not bt.is_floating_point():
            bt.copy_(bo)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: tau = 1 - (1 - base) (cos(pi step / total) + 1) / 2; base at step 0, 1 at the end."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "cosine") -> float:
    """The target momentum for an optimizer step: "cosine" (BYOL, MoCo v3) or "constant" (MoCo v2)."""
    if schedule == "cosine":
        return cosine_momentum(step, total_steps, base)
    if schedule == "constant":
        return base
    raise ValueError(f"unknown ema_schedule {schedule!r}; choose 'cosine' or 'constant'")
