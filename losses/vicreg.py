"""VICReg: invariance + variance + covariance regularisation of two views' embeddings.

For a pair (x, y) of (N, D) embeddings per rank, global batch B = R*N (Bardes et al. 2022, Eq. 1-6
and their code):

    invariance  s = mean((x - y)^2)                        over this rank's N x D entries
    variance    v = mean_d relu(1 - sqrt(Var_B(x_d) + 1e-4)) / 2 + (same for y) / 2
    covariance  c = sum_{i != j} Cov_B(x)_ij^2 / D + (same for y)
    loss        sim_coeff * s + std_coeff * v + cov_coeff * c       (25, 25, 1)

Var_B and Cov_B are over the global batch with the unbiased 1 / (B - 1), as the paper's
implementation (which gathers the embeddings of all GPUs for v and c, and keeps s local).
Symmetric in (x, y); with several pairs (MSCN multi-mask) the loss is the mean over the listed pairs.

The covariance term uses the Gram identity of losses/barlow.py: sum_ij Cov_ij^2 =
||X^T X||_F^2 / (B-1)^2 = sum_r ||X_r X^T||_F^2 / (B-1)^2 with X the centred global batch and X_r
this rank's rows: N B D multiply-adds per view and rank, no D x D buffer, against N D^2 for the
local covariance (plus its all-reduce), so cheaper while B < D. Rank r's loss carries R times its share,
so the mean over ranks is the global loss and gradients are exact (losses/__init__.py).

Defaults (Bardes et al., ImageNet): projector 8192-8192-8192 (BatchNorm + ReLU after the hidden
layers, final linear), coefficients 25 / 25 / 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from losses.common import Heads, defaults, full_precision, upcast, views_in
from losses.siamese import Siamese
from masksiam.dist import gather_with_grad, rank, world_size


@dataclass(frozen=True)
class Settings(Heads):
    sim_coeff: float = 25.0                # invariance
    std_coeff: float = 25.0                # variance
    cov_coeff: float = 1.0                 # covariance
    proj_hidden: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    RULES: ClassVar = {k: (lambda v: v >= 0, ">= 0") for k in ("sim_coeff", "std_coeff", "cov_coeff")}
VAR_EPS = 1e-4


class ViewStats(NamedTuple):
    std_term: torch.Tensor   # mean_d relu(1 - std_d)   (global)
    cov_term: torch.Tensor   # sum_{i != j} Cov_ij^2 / D  (this rank's share)
    std_mean: torch.Tensor   # mean_d std_d, detached: a collapse monitor


def view_stats(z: torch.Tensor) -> ViewStats:
    """(N, D) on this rank -> the variance and covariance terms of one view over the global batch."""
    n, dim = z.shape
    full = gather_with_grad(upcast(z))                                   # (B, D)
    batch = full.shape[0]
    if batch < 2:
        raise ValueError("VICReg needs a global batch of at least 2 samples (variance over the batch)")
    full = full - full.mean(0)
    var = full.pow(2).sum(0) / (batch - 1)                               # (D,) = diag of Cov
    std = torch.sqrt(var + VAR_EPS)
    local = full[rank() * n:(rank() + 1) * n]                            # (N, D)
    gram = local @ full.t()                                              # (N, B)
    off = world_size() * gram.pow(2).sum() / (batch - 1) ** 2 - var.pow(2).sum()
    return ViewStats(F.relu(1 - std).mean(), off / dim, std.detach().mean())


def _pair(x: torch.Tensor, y: torch.Tensor, sx: ViewStats, sy: ViewStats):
    invariance = F.mse_loss(upcast(x), upcast(y))
    variance = (sx.std_term + sy.std_term) / 2
    covariance = sx.cov_term + sy.cov_term
    return invariance, variance, covariance


def _combine(inv, var, cov, z_std, sim_coeff, std_coeff, cov_coeff) -> tuple[torch.Tensor, dict]:
    total = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    return total, {"loss": total.detach(), "invariance": inv.detach(), "variance": var.detach(),
                   "covariance": cov.detach(), "std": z_std}


def pair_loss(x: torch.Tensor, y: torch.Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float,
              **_) -> tuple[torch.Tensor, dict]:
    """The loss of one pair of views (N, D), (N, D); mixed losses call this with a mixed target."""
    sx, sy = view_stats(x), view_stats(y)
    inv, var, cov = _pair(x, y, sx, sy)
    return _combine(inv, var, cov, (sx.std_mean + sy.std_mean) / 2, sim_coeff, std_coeff, cov_coeff)


def loss(emb, sim_coeff: float, std_coeff: float, cov_coeff: float, **_) -> tuple[torch.Tensor, dict]:
    views = views_in(emb.pairs)
    stats = {v: view_stats(emb.z[v]) for v in views}     # each view gathered once
    inv, var, cov = (torch.stack(t).mean() for t in
                     zip(*(_pair(emb.z[i], emb.z[j], stats[i], stats[j]) for i, j in emb.pairs)))
    z_std = torch.stack([stats[v].std_mean for v in views]).mean()
    return _combine(inv, var, cov, z_std, sim_coeff, std_coeff, cov_coeff)


class VICReg(Siamese):
    """backbone -> projector; invariance + variance + covariance over the global batch."""
    name, Settings = "vicreg", Settings
    DEFAULTS = defaults(Settings)
    loss = staticmethod(full_precision(loss))
    pair_loss = staticmethod(full_precision(pair_loss))
