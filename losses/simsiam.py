"""SimSiam: the predictor of one view regresses the stop-gradient projection of the other.

D(p, z) = -cos(p, stopgrad(z)); for views (i, j) the loss is D(p_i, z_j) / 2 + D(p_j, z_i) / 2
(Chen & He 2021, Eq. 1-2), so it lies in [-1, 1]. With several pairs (MSCN multi-mask) the loss is
the mean over the listed pairs. The stop-gradient is the method: z reaches the loss detached, its
only gradient path is through p = h(z) of the same view, which the loop computed.

Defaults (Chen & He, ImageNet): projector 2048-2048-2048 with BatchNorm after every layer
(the last one without affine parameters in the paper's code), predictor 2048-512-2048 with
BatchNorm + ReLU after the hidden layer only.

Distributed: purely per-sample, no gather; each rank's loss is the mean over its own samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from losses.common import Heads, both_directions, defaults, full_precision, normalized_std, upcast, views_in
from losses.siamese import Siamese


@dataclass(frozen=True)
class Settings(Heads):
    proj_dim: int = 2048
    proj_layers: int = 3
    proj_last_bn: bool = True
    pred_hidden: int = 512


def per_sample(p: torch.Tensor, z: torch.Tensor, **_) -> torch.Tensor:
    """-cos(p_i, stopgrad(z_i)) for each sample: (N, D), (N, D) -> (N,)."""
    return -F.cosine_similarity(upcast(p), upcast(z.detach()), dim=1, eps=1e-8)


def loss(emb, **_) -> tuple[torch.Tensor, dict]:
    if emb.p is None:
        raise ValueError("SimSiam needs emb.p (online predictor outputs)")
    terms = torch.stack([per_sample(emb.p[i], emb.z[j]).mean() for i, j in both_directions(emb.pairs)])
    total = terms.mean()            # mean over pairs of D(i -> j) / 2 + D(j -> i) / 2
    return total, {"loss": total.detach(),
                   "z_std": torch.stack([normalized_std(emb.z[v]) for v in views_in(emb.pairs)]).mean()}


class SimSiam(Siamese):
    """backbone -> projector -> predictor; -cos against the stop-gradient projection of the other view."""
    name, Settings = "simsiam", Settings
    DEFAULTS = defaults(Settings)
    predictor = True
    loss = staticmethod(full_precision(loss))
    per_sample = staticmethod(full_precision(per_sample))
