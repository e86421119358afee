"""Heads: the MLPs that sit on the backbone (projector, predictor) and the SSL network around them.

Papers differ only in depth, widths and where BatchNorm sits (proj_bn: hidden layers,
proj_last_bn: an affine-free BN after the last layer):
    SimCLR / MSCN   2048-2048-256, BN after every layer incl. the last      proj_bn, proj_last_bn
    BYOL            2048-4096-256, BN + ReLU on hidden layers only          proj_bn
                    predictor 256-4096-256
    SimSiam         2048-2048-2048, 3 layers, BN on every layer              proj_bn, proj_last_bn
                    predictor 2048-512-2048
    Barlow / VICReg 8192-8192-8192, BN + ReLU on hidden layers              proj_bn
    MoCo v2         2048-2048-128, fc-ReLU-fc                               neither
"""
from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, bn: bool = True, last_bn: bool = False) -> nn.Sequential:
    """`layers` Linear layers; hidden ones followed by [BN] + ReLU; the last by an affine-free BN if last_bn."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=not bn)]
        mods += [nn.BatchNorm1d(hidden)] if bn else []
        mods += [nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class SiameseNet(nn.Module):
    """backbone -> projector [-> predictor]; forward(x: (N,3,H,W)) -> (h (N,F), z (N,D), p (N,D) | None)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, x: torch.Tensor):
        h = self.backbone(x)
        z = self.projector(h)
        p = self.predictor(z) if self.predictor is not None else None
        return h, z, p


def build_heads(num_features: int, hp: dict) -> tuple[nn.Module, nn.Module | None]:
    """Projector and predictor from a method's resolved hyper-parameters (losses.hparams)."""
    projector = mlp(num_features, hp["proj_hidden"], hp["proj_dim"], hp["proj_layers"],
                    bn=hp["proj_bn"], last_bn=hp["proj_last_bn"])
    predictor = None
    if hp.get("pred_hidden"):
        predictor = mlp(hp["proj_dim"], hp["pred_hidden"], hp["proj_dim"], 2, bn=True, last_bn=False)
    return projector, predictor
