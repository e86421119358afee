"""The part the six Siamese methods share: an online network, optionally its EMA target, one forward.

A Siamese method file defines its pure loss functions and a subclass that names them:

    class BYOL(Siamese):
        name, Settings = "byol", Settings   # @dataclass(frozen=True) class Settings(Heads, EMA): ...
        DEFAULTS = defaults(Settings)
        predictor, ema = True, True          # online predictor head; EMA target computes zt
        loss = staticmethod(full_precision(loss))
        per_sample = staticmethod(full_precision(per_sample))   # for the mixed loss (losses/mixed.py)

and the training loop runs every method alike:

    loss, logs = method(out)                 # out: the augment stage's AugmentOutput
    ... backward, optimizer step ...
    method.after_step(step, total_steps)     # EMA target update (and MoCo's queue push)

The online network is backbone -> projector [-> predictor] (models/heads.py), built for the
backbone it is given with the method's head widths. The EMA target is a momentum copy of backbone
+ projector (BYOL / MoCo never run a target predictor), never in the optimizer (requires_grad off),
run under no_grad in train mode (BatchNorm with batch statistics, as the papers).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from losses.common import HEAD_KEYS, Embeddings, Heads, embed, views_in
from models.ema import ema_update, make_target, momentum_at
from models.heads import SiameseNet, build_heads


class Siamese(nn.Module):
    name: str = ""
    Settings: type = Heads                   # its config keys, defaults and ranges (losses/common.py)
    DEFAULTS: dict[str, Any] = {}            # defaults(Settings)
    SHAPE_KEYS: tuple[str, ...] = HEAD_KEYS
    predictor = False                        # the online branch ends in a predictor (out dim = proj_dim)
    ema = False                              # an EMA target computes zt
    loss: Callable[..., tuple[torch.Tensor, dict]]      # (emb, **hp) -> (loss, logs), pure
    # mixed losses (losses/mixed.py): a per-sample loss of m_i against the positive t_i, (N,) ...
    per_sample: Optional[Callable[..., torch.Tensor]] = None
    # ... or, for batch-statistics losses without one, the loss of one pair of views (za, zb)
    pair_loss: Optional[Callable[..., tuple[torch.Tensor, dict]]] = None

    def __init__(self, backbone: nn.Module, hp: dict[str, Any], cfg=None):
        super().__init__()
        self.hp = hp
        self.online = SiameseNet(backbone, *build_heads(backbone.num_features, hp))
        self.target = SiameseNet(make_target(backbone), make_target(self.online.projector)) if self.ema else None

    @property
    def backbone(self) -> nn.Module:
        """The torchvision ResNet that kNN, evaluation and export use."""
        return self.online.backbone

    def views(self, pairs) -> tuple[list[int], list[int]]:
        """(views the online branch embeds, views the EMA target embeds)."""
        used = views_in(pairs)
        return used, (used if self.ema else [])

    def embed(self, out, extra: tuple[torch.Tensor, ...] = ()) -> tuple[Embeddings, tuple[list, list]]:
        """Every online view (and the extra inputs: a mixed view) in one forward per image size,
        the target views under no_grad. -> (Embeddings, (z, p) of the extra inputs)."""
        online, target = self.views(out.pairs)
        z, p, z_x, p_x = embed(self.online, out.views, online, extra)
        zt = None
        if self.target is not None:
            with torch.no_grad():
                zt, _, _, _ = embed(self.target, out.views, target)
        return Embeddings(z=z, p=p, zt=zt, pairs=list(out.pairs)), (z_x, p_x)

    def forward(self, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        emb, _ = self.embed(out)
        return self.loss(emb, **self.hp)

    def after_step(self, step: int, total_steps: int) -> None:
        if self.target is not None:
            m = momentum_at(step, total_steps, self.hp["ema_momentum"], self.hp["ema_schedule"])
            ema_update(self.target.backbone, self.online.backbone, m)
            ema_update(self.target.projector, self.online.projector, m)
