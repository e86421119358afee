"""SSL methods: one file each (a pure loss function + its defaults), one explicit registry.

A loss sees tensors only. The training loop fills an `Embeddings` from the network outputs and calls

    loss, logs = METHODS[cfg.method].loss(emb, **hparams)   # hparams: cfg values, else the method's defaults

`logs` holds detached scalar tensors (no host sync); the loop turns them into numbers at log time.
Gathers across ranks inside a loss use masksiam.dist.gather_with_grad, so gradients stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch


@dataclass
class Embeddings:
    """What the network produced for one step; V views, each (N, D) on this rank.

    z      online projector outputs, one per view
    p      online predictor outputs (BYOL, SimSiam), else None
    zt     target-branch projector outputs (EMA network for BYOL/MoCo), no grad, else None
    pairs  (i, j) view pairs the loss compares: view i predicts / is contrasted with view j
    queue  (K, D) MoCo negatives, no grad, else None
    """
    z: list[torch.Tensor]
    p: Optional[list[torch.Tensor]] = None
    zt: Optional[list[torch.Tensor]] = None
    pairs: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])
    queue: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Method:
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    defaults: dict[str, Any]          # config keys this method reads, with its paper's values
    predictor: bool = False           # online branch ends in a predictor head
    target: Literal["online", "ema"] = "online"   # "ema": a momentum copy computes zt
    queue: bool = False               # keeps a queue of negatives (MoCo)


def _registry() -> dict[str, Method]:
    from losses import simclr
    return {
        "simclr": Method(simclr.loss, simclr.DEFAULTS),
    }


METHODS: dict[str, Method] = _registry()


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def hparams(method: Method, cfg) -> dict[str, Any]:
    """The method's hyper-parameters: the config's value where set (not None), else the default."""
    return {k: (getattr(cfg, k) if getattr(cfg, k, None) is not None else v) for k, v in method.defaults.items()}
