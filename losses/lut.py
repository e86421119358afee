"""LUT's broader-context term (Kim et al. 2024), a piece that SimMIM and MixMAE add to their loss.

Two crops of each image, both masked with disjoint visible cells (recipes simmim_lut, mixmae_lut:
`simmim: {disjoint: true}`); the second gets LUT's colour augmentation. An EMA teacher (backbone +
projection head) sees each crop unmasked; the student's features of each masked crop, pooled over its
visible positions, go through a projection head and a predictor and regress the teacher's projection
of the other crop. The two cross-view terms are averaged:

    L_BC = 1/2 [ mean_n d(pred(proj(h0_n)), proj_t(backbone_t(v1_n)))
               + mean_n d(pred(proj(h1_n)), proj_t(backbone_t(v0_n))) ],   d(p, z) = 2 - 2 cos(p, z)

added with weight `lut_weight` (0.25, Kim et al. 2024 B.2 / Table A). With one masked crop and one unmasked
(a recipe with `simmim: {branches: [0]}`) only the first term. The teacher gets no gradient and runs
in eval mode (BatchNorm on its running statistics, which follow the student's by the EMA); after
each optimizer step it moves towards the student (models/ema.py), momentum `lut_momentum` (0.996)
raised to 1 on BYOL's cosine schedule (`ema_schedule`). Per sample, no gather: each rank's loss is
the mean over its own samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import Settings, full_precision, upcast
from masksiam.config import ConfigError
from models.ema import ema_update, make_target, momentum_at
from models.heads import SiameseNet, mlp


@dataclass(frozen=True)
class LUTSettings(Settings):
    """The term's keys, composed into SimMIM's and MixMAE's Settings."""
    lut_weight: float = 0.0                # weight of the term (0 = off; LUT, Kim et al.: 0.25)
    lut_momentum: float = 0.996            # its EMA teacher's momentum (start of the schedule)
    ema_schedule: Literal["cosine", "constant"] = "cosine"
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    RULES: ClassVar = {"lut_weight": (lambda v: v >= 0, ">= 0 (0 = off)"),
                       "lut_momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
                       "proj_hidden": (lambda v: v > 0, "> 0"), "proj_dim": (lambda v: v > 0, "> 0")}


SHAPE_KEYS = ("proj_hidden", "proj_dim", "pred_hidden")


@full_precision
def context_loss(p: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """mean over samples of 2 - 2 cos(p_n, zt_n); (N, D), (N, D) -> scalar. No gradient reaches zt."""
    return (2 - 2 * F.cosine_similarity(upcast(p), upcast(zt.detach()), dim=1, eps=1e-8)).mean()


class BroaderContext(nn.Module):
    """Student heads and the EMA teacher of LUT's term, for a backbone with `num_features` outputs."""

    def __init__(self, backbone: nn.Module, hp: dict[str, Any]):
        super().__init__()
        if hp["pred_hidden"] <= 0:
            raise ConfigError("lut_weight > 0 needs a predictor: config key 'pred_hidden' must be > 0")
        self.hp = hp
        self.projector = mlp(backbone.num_features, hp["proj_hidden"], hp["proj_dim"], 2, bn=True)
        self.predictor = mlp(hp["proj_dim"], hp["pred_hidden"], hp["proj_dim"], 2, bn=True)
        self.teacher = SiameseNet(make_target(backbone), make_target(self.projector))

    def forward(self, pooled: dict[int, torch.Tensor], views: list[torch.Tensor], partner: bool = False) -> torch.Tensor:
        """pooled: view index -> (N, F) student features of that masked view, pooled over its visible
        positions, or (2N, F) when rows N.. are the features of each image's partner in the mix
        (MixMAE: the reversed batch); views: the unmasked views, (N, 3, H, W) each."""
        targets = cross_view_targets(list(pooled), len(views))
        # eval mode: running statistics, so the teacher's projection of an image depends on it alone
        self.teacher.train(False)
        with torch.no_grad():
            zt = {j: self.teacher(views[j])[1] for j in sorted(set(targets.values()))}
        terms = []
        for k, j in targets.items():
            p = self.predictor(self.projector(pooled[k]))
            z = torch.cat([zt[j], zt[j].flip(0)]) if partner else zt[j]
            terms.append(context_loss(p, z))
        return torch.stack(terms).mean()

    def after_step(self, backbone: nn.Module, step: int, total_steps: int) -> None:
        m = momentum_at(step, total_steps, self.hp["lut_momentum"], self.hp["ema_schedule"])
        ema_update(self.teacher.backbone, backbone, m)
        ema_update(self.teacher.projector, self.projector, m)


def total_loss(lut: BroaderContext | None, weight: float, mim: torch.Tensor, pooled: dict[int, torch.Tensor],
               out, method: str, partner: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A MIM method's loss: its reconstruction loss `mim`, plus weight x the broader-context term when
    LUT is on (lut not None); and the logs of each part. pooled: masked view -> its pooled features."""
    logs = {"mim_loss": mim.detach()}
    loss = mim
    if lut is not None:
        bc = lut(pooled, check_views(out, method), partner=partner)
        loss = loss + weight * bc
        logs["lut_loss"] = bc.detach()
    logs["loss"] = loss.detach()
    return loss, logs


def cross_view_targets(masked: list[int], views: int) -> dict[int, int]:
    """masked view k -> the view whose teacher projection it predicts: the other of two masked views,
    or the one unmasked view (the single-direction form)."""
    if views < 2:
        raise ValueError("LUT's term needs two views")
    if len(masked) == 2 and views == 2:
        return {masked[0]: masked[1], masked[1]: masked[0]}
    if masked == [0]:
        return {0: 1}
    raise ValueError(f"LUT's term: masked views {masked} of {views}; expected both of two, or view 0 only")


def check_views(out, method: str) -> list[torch.Tensor]:
    """The two views LUT needs (view 0 masked; view 1 masked with disjoint visible cells, or
    unmasked), or a ConfigError naming the recipe to use."""
    if len(out.views) != 2 or out.mim_masks is None or out.mim_masks[0] is None:
        raise ConfigError(f"method {method!r} with lut_weight > 0 needs a recipe with two crops, masked with "
                          f"disjoint visible cells (config key 'recipe', e.g. simmim_lut or mixmae_lut: "
                          f"two branches, `simmim: {{disjoint: true}}`)")
    return list(out.views)
