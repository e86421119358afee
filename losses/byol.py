"""BYOL: the online predictor regresses the EMA target's projection of the other view.

Per sample, ||p/|p| - zt/|zt|||^2 = 2 - 2 cos(p, zt) with zt from the target network (no
gradient). The paper symmetrises: for views (i, j) the loss is l(p_i, zt_j) + l(p_j, zt_i), each
term averaged over the batch (Grill et al. 2020, Eq. 2), so it lies in [0, 8]. With several pairs
(MSCN multi-mask) the loss is the mean over the listed pairs of that symmetrised sum.

Defaults (Grill et al.; MSCN w/ BYOL, Jing et al. 2022 A.1): projector 2048-4096-256 and predictor
256-4096-256, BatchNorm + ReLU after the hidden layer only; target momentum 0.996 raised to 1 on a
cosine schedule over training (models/ema.py: cosine_momentum). The target network runs in train
mode (BatchNorm with batch statistics), as in the paper.

Distributed: purely per-sample, no gather; each rank's loss is the mean over its own samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from losses.common import EMA, Heads, both_directions, defaults, full_precision, normalized_std, upcast, views_in
from losses.siamese import Siamese


@dataclass(frozen=True)
class Settings(Heads, EMA):
    proj_hidden: int = 4096
    pred_hidden: int = 4096


def per_sample(p: torch.Tensor, zt: torch.Tensor, **_) -> torch.Tensor:
    """2 - 2 cos(p_i, zt_i) for each sample: (N, D), (N, D) -> (N,). No gradient reaches zt."""
    return 2 - 2 * F.cosine_similarity(upcast(p), upcast(zt.detach()), dim=1, eps=1e-8)


def loss(emb, **_) -> tuple[torch.Tensor, dict]:
    if emb.p is None or emb.zt is None:
        raise ValueError("BYOL needs emb.p (online predictor outputs) and emb.zt (EMA target projections)")
    directed = both_directions(emb.pairs)
    terms = torch.stack([per_sample(emb.p[i], emb.zt[j]).mean() for i, j in directed])
    total = 2 * terms.mean()        # mean over pairs of l(i -> j) + l(j -> i)
    return total, {"loss": total.detach(), "cos": 1 - terms.detach().mean() / 2,
                   "z_std": torch.stack([normalized_std(emb.z[v]) for v in views_in(emb.pairs)]).mean()}


class BYOL(Siamese):
    """online backbone -> projector -> predictor regresses the EMA target's projection."""
    name, Settings = "byol", Settings
    DEFAULTS = defaults(Settings)
    predictor, ema = True, True
    loss = staticmethod(full_precision(loss))
    per_sample = staticmethod(full_precision(per_sample))
