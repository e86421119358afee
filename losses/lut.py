"""LUT's broader-context term (seed 003, Kim et al.), a piece that SimMIM and MixMAE add to their loss.

An EMA teacher (backbone + projection head) sees a second, unmasked view of each image; the
student's pooled features of the masked view go through a projection head and a predictor, and
regress the teacher's projection:

    L_BC = mean_n (2 - 2 cos(predictor(projector(h_n)), projector_t(backbone_t(v_n))))

added with weight `lut_weight` (0.25, seed 003 B.2 / Table A). The teacher gets no gradient; after
each optimizer step it moves towards the student (models/ema.py), momentum `lut_momentum` (0.996)
raised to 1 on BYOL's cosine schedule (`ema_schedule`). It runs in train mode (batch statistics),
as BYOL's target does. Per sample, no gather: each rank's loss is the mean over its own samples.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import full_precision, upcast
from masksiam.config import ConfigError
from models.ema import ema_update, make_target, momentum_at
from models.heads import SiameseNet, mlp

DEFAULTS = {"lut_weight": 0.0, "lut_momentum": 0.996, "ema_schedule": "cosine",
            "proj_hidden": 4096, "proj_dim": 256, "pred_hidden": 4096}
VALID = {"lut_weight": (lambda v: v >= 0, ">= 0 (0 = off)"),
         "lut_momentum": (lambda v: 0 <= v <= 1, "in [0, 1]")}
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

    def forward(self, pooled: torch.Tensor, view: torch.Tensor, partner: bool = False) -> torch.Tensor:
        """pooled (N, F) student features of the masked view, or (2N, F) when rows N.. are the features
        of each image's partner (MixMAE: the reversed batch); view (N, 3, H, W) the unmasked view."""
        p = self.predictor(self.projector(pooled))
        with torch.no_grad():
            _, zt, _ = self.teacher(view)
        if partner:
            zt = torch.cat([zt, zt.flip(0)])
        return context_loss(p, zt)

    def after_step(self, backbone: nn.Module, step: int, total_steps: int) -> None:
        m = momentum_at(step, total_steps, self.hp["lut_momentum"], self.hp["ema_schedule"])
        ema_update(self.teacher.backbone, backbone, m)
        ema_update(self.teacher.projector, self.projector, m)


def total_loss(lut: BroaderContext | None, weight: float, mim: torch.Tensor, pooled: torch.Tensor, out,
               method: str, partner: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A MIM method's loss: its reconstruction loss `mim`, plus weight x the broader-context term when
    LUT is on (lut not None); and the logs of each part."""
    logs = {"mim_loss": mim.detach()}
    loss = mim
    if lut is not None:
        bc = lut(pooled, check_views(out, method), partner=partner)
        loss = loss + weight * bc
        logs["lut_loss"] = bc.detach()
    logs["loss"] = loss.detach()
    return loss, logs


def check_views(out, method: str) -> torch.Tensor:
    """The unmasked second view LUT's teacher needs, or a ConfigError naming the recipe to use."""
    if len(out.views) < 2 or (out.mim_masks is not None and out.mim_masks[1] is not None):
        raise ConfigError(f"method {method!r} with lut_weight > 0 needs a recipe with a second, unmasked view "
                          f"(config key 'recipe', e.g. simmim_lut: two branches, `simmim: {{branches: [0]}}`)")
    return out.views[1]
