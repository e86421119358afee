"""Optimizers (SGD, LARS, AdamW), their parameter groups and the warmup + cosine schedule.

Skipping a bad step without a host sync: every optimizer here takes `step(skip=flag)`, flag a 0-dim
tensor on the device (bool or float, nonzero = skip), e.g. `~isfinite(loss)` (| ~isfinite(grad
norm)). The step then leaves weights and optimizer state untouched, decided inside the fused kernels,
so the CPU never waits for the GPU. The flag combines with torch.amp.GradScaler's own inf check:
`scaler.step(optimizer, skip=flag)` passes it through (GradScaler's own flag and scale arrive as the
attributes `found_inf` / `grad_scale` it sets around that call, the contract of torch's fused
optimizers; nothing else sets them).
"""
from __future__ import annotations

import math

import torch
from torch.optim.sgd import sgd as fused_sgd   # the functional SGD step; called with fused=True
from torch import nn

from masksiam.config import ConfigError


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Qualified names of the parameters a module declares free of weight decay.

    A module lists its own parameters' names in a class attribute `no_weight_decay` (e.g. the mask
    tokens: ("token",) on models.mim.MaskTokenEncoder and PixelDecoder); this collects them over the
    whole model, prefixed with the module's path, so a wrapper needs to declare nothing."""
    names = set()
    for path, module in model.named_modules():
        for own in getattr(module, "no_weight_decay", ()):
            names.add(f"{path}.{own}" if path else own)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights get weight decay (and LARS adaptation); biases, norm parameters and the parameters
    modules declare in `no_weight_decay` (mask tokens) get neither.

    1-D parameters (biases, BN/LN gains and shifts): the SimCLR / BYOL / Barlow Twins convention.
    Mask tokens (SimMIM's after the stem, MixMAE's and the sparse decoder's): SimMIM, MixMIM and
    SparK exclude them; a token is a learned input, and decay would pull it towards 0 (a zero fill).
    The one rule for every method: tests/test_param_groups.py checks it on each registered one.
    """
    exempt = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
            {"params": no_decay, "weight_decay": 0.0, "lars_adapt": False}]


def _skip_flag(optimizer: torch.optim.Optimizer, skip: torch.Tensor | None) -> torch.Tensor | None:
    """The float 0/1 found_inf a fused kernel reads: `skip`, or GradScaler's found_inf attribute,
    or their max; None when neither is set (never skip)."""
    scaler_flag = getattr(optimizer, "found_inf", None)
    if skip is None:
        return scaler_flag
    skip = skip.detach().to(torch.float32).reshape(())
    return skip if scaler_flag is None else torch.maximum(scaler_flag.to(skip.device), skip)


class _SkipViaFoundInf:
    """step(skip=flag) for torch's fused optimizers, which read `self.found_inf` (GradScaler's
    contract): the flag is set for the one call and the previous value (GradScaler's) restored."""

    def _step_with_flag(self, closure, skip):
        flag = _skip_flag(self, skip)
        had, previous = hasattr(self, "found_inf"), getattr(self, "found_inf", None)
        if flag is not None:
            self.found_inf = flag
        try:
            return super().step(closure)
        finally:
            if had:
                self.found_inf = previous
            elif hasattr(self, "found_inf"):
                del self.found_inf


class SGD(_SkipViaFoundInf, torch.optim.SGD):
    """torch's fused momentum SGD with step(skip=flag), and momentum buffers zeroed up front.

    torch creates the buffers with empty_like on the first step and fills them in the kernel; a
    first step skipped as non-finite leaves them uninitialised, and the next step would add
    momentum * garbage. Zeros then a normal step (buf = 0 * m + g) equal torch's first-step copy
    (buf = g) for dampening 0, the only value the configs use."""

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):
        for group in self.param_groups:
            if group["momentum"] == 0:
                continue
            for p in group["params"]:
                if p.grad is not None and self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return self._step_with_flag(closure, skip)


class AdamW(_SkipViaFoundInf, torch.optim.AdamW):
    """torch's fused AdamW with step(skip=flag) (its state starts at zeros, its step count is
    restored in-kernel on a skipped step)."""

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):
        return self._step_with_flag(closure, skip)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), foreach-vectorised.

    For a weight w with gradient g (weight decay folded in: g += wd * w), the step is scaled by the
    trust ratio eta * ||w|| / ||g|| (1 where either norm is 0), then momentum SGD. Groups with
    lars_adapt=False (biases, norms) take plain momentum SGD.
    """
    _step_supports_amp_scaling = True  # reads grad_scale / found_inf like torch's fused optimizers

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, lars_adapt: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_adapt=lars_adapt))

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = _skip_flag(self, skip)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad.float() if p.grad.dtype != torch.float32 else p.grad for p in params]
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale)
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars_adapt"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                    torch.ones_like(w_norm))
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                bufs.append(state["momentum_buffer"])
            # momentum and the update in torch's fused SGD kernel, which also skips the whole step
            # in-kernel when found_inf is set: no host sync, and NaN gradients never reach the state
            fused_sgd(params, grads, bufs, fused=True, found_inf=found_inf, weight_decay=0.0,
                                momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=False,
                                maximize=False)
        return None


def peak_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """`base_lr` is per 256 images (the papers' convention): linear, square-root or no scaling."""
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size / 256)
    return base_lr


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return SGD(groups, lr=lr, momentum=cfg.momentum, fused=True)
    if cfg.optimizer == "adamw":
        betas = tuple(cfg.adamw_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"config key 'adamw_betas' = {list(betas)} must be two numbers in [0, 1)")
        return AdamW(groups, lr=lr, betas=betas, fused=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over warmup_steps, then cosine to min_ratio * peak at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group at `lr` (the schedule's value for this step; train.py, eval.linear)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
