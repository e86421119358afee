"""SSL methods: one file each (pure loss functions + the paper's defaults), one explicit registry.

The training loop (models/ema.py has the EMA helpers):

    method = get_method(cfg.method)
    hp = hparams(method, cfg)                      # cfg values where set, else the paper's defaults
    target = make_target(net) if method.target == "ema" else None
    queue = method.make_queue(hp, device) if method.queue else None
  every step:
    online_views, target_views = method.views(pairs, **hp)   # embed only these; MoCo v2: the query
                                                             # view online, the key view in the target
    emb = Embeddings(z=..., p=..., zt=..., pairs=pairs, queue=queue.tensor if queue else None)
    loss, logs = method.loss(emb, **hp)
    if mixing: loss_mix, mix_logs = method.mixed_loss(emb, z_m, p_m, lam, source, hp)   # losses/mixed.py
    ... backward, optimizer step ...
    if target: ema_update(target, net, momentum_at(step, total_steps, hp["ema_momentum"], hp["ema_schedule"]))
    if queue: queue.push(emb.zt, pairs)

Conventions every method follows (and tests/test_losses.py, tests/test_dist_losses.py check):
- Precision: a registered loss runs with autocast off and upcasts half-precision inputs to float32
  (float64 stays float64, so gradcheck works), whatever context the loop calls it from.
- Views: `pairs` lists (i, j) view pairs; a loss averages over the listed pairs. Symmetric methods
  (SimCLR, BYOL, SimSiam, Barlow Twins, VICReg) include both directions of each pair as their papers
  do; MoCo v2 is asymmetric (query i, key j) unless `moco_symmetric`. Multi-mask (MSCN) lists one
  pair per masked view, e.g. [(0, 2), (1, 2)] for two masked views of branch A against branch B.
- Distributed: each rank passes its own N samples. The loss it returns is its share L_r of the
  global loss, with mean over ranks of L_r = the loss of one process holding the whole global batch,
  and backward sends each rank d(sum_k L_k)/d(its inputs) (gathers are autograd-aware), so DDP's
  gradient averaging reproduces the full-batch gradient exactly. `logs` follow the same rule:
  average them over ranks to report global values (except `z_std`, a collapse monitor on the local
  batch). Every rank must hold the same N (drop_last), as all_gather needs.
- `logs` hold detached scalar tensors: no host sync inside a loss.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch


@dataclass
class Embeddings:
    """What the network produced for one step; each present entry is (N, D) on this rank.

    z      online projector outputs, one per view (None for a view the online branch skipped)
    p      online predictor outputs (BYOL, SimSiam), else None
    zt     target-branch projector outputs (EMA network of BYOL/MoCo), no grad; None where skipped
    pairs  (i, j) view pairs the loss compares: view i predicts / is contrasted with view j
    queue  (K, D) MoCo negatives (L2-normalised keys), no grad, else None
    """
    z: list[Optional[torch.Tensor]]
    p: Optional[list[Optional[torch.Tensor]]] = None
    zt: Optional[list[Optional[torch.Tensor]]] = None
    pairs: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])
    queue: Optional[torch.Tensor] = None


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 unchanged (losses are computed in >= fp32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def views_in(pairs) -> list[int]:
    return sorted({v for pair in pairs for v in pair})


def both_directions(pairs) -> list[tuple[int, int]]:
    """[(0, 1)] -> [(0, 1), (1, 0)]: the symmetrised loss of BYOL / SimSiam / symmetric MoCo."""
    return list(pairs) + [(j, i) for i, j in pairs]


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor (SimSiam, Sec. 4.1): per-dimension std of the L2-normalised outputs, averaged.

    About 1/sqrt(D) for well spread embeddings, 0 when they collapse to a point. Detached, local.
    """
    z = upcast(z.detach())
    return torch.nn.functional.normalize(z, dim=1).std(0).mean()


def _all_views(pairs, **_) -> tuple[list[int], list[int]]:
    return views_in(pairs), []


def _all_views_ema(pairs, **_) -> tuple[list[int], list[int]]:
    return views_in(pairs), views_in(pairs)


@dataclass(frozen=True)
class Method:
    name: str
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]   # (emb, **hp) -> (loss, logs)
    defaults: dict[str, Any]          # every config key this method reads, with its paper's values
    predictor: bool = False           # online branch ends in a predictor head (out dim = proj_dim)
    target: Literal["online", "ema"] = "online"   # "ema": a momentum copy computes zt (models/ema.py)
    queue: bool = False               # keeps a queue of negatives (make_queue below)
    # (pairs, **hp) -> (views the online branch embeds, views the EMA target embeds)
    views: Callable[..., tuple[list[int], list[int]]] = _all_views
    # mixed losses (losses/mixed.py): a per-sample loss of m_i against the positive t_i, (N,) ...
    per_sample: Optional[Callable[..., torch.Tensor]] = None
    # ... or, for batch-statistics losses without one, the loss of one pair of views (za, zb)
    pair_loss: Optional[Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = None
    # (hp, device) -> the queue object (MoCo: losses.moco.Queue: .tensor, .push, .state_dict)
    make_queue: Optional[Callable[..., Any]] = None

    def mixed_loss(self, emb: "Embeddings", z_m: torch.Tensor, p_m: Optional[torch.Tensor], lam,
                   source: int = 0, hp: Optional[dict[str, Any]] = None):
        """The MixMask / Un-Mix term for a mixed copy of view `source`: see losses/mixed.py."""
        from losses.mixed import mixed_loss
        return mixed_loss(self, emb, z_m, p_m, lam, source, hp)


def _device_type(x) -> str:
    if isinstance(x, Embeddings):
        x = next(t for t in x.z + (x.p or []) + (x.zt or []) if t is not None)
    return x.device.type


def full_precision(fn):
    """Run a loss with autocast off: the loop may call it inside its autocast block, but softmax over
    65536 queue logits or a Gram matrix of 8192-d embeddings must not be computed in bf16."""
    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        with torch.autocast(_device_type(first), enabled=False):
            return fn(first, *args, **kwargs)
    return run


def _registry() -> dict[str, Method]:
    from losses import barlow, byol, moco, simclr, simsiam, vicreg
    fp = full_precision
    methods = [
        Method("simclr", fp(simclr.loss), simclr.DEFAULTS, per_sample=fp(simclr.per_sample)),
        Method("moco", fp(moco.loss), moco.DEFAULTS, target="ema", queue=True, views=moco.views,
               per_sample=fp(moco.per_sample), make_queue=moco.Queue.from_hparams),
        Method("byol", fp(byol.loss), byol.DEFAULTS, predictor=True, target="ema", views=_all_views_ema,
               per_sample=fp(byol.per_sample)),
        Method("simsiam", fp(simsiam.loss), simsiam.DEFAULTS, predictor=True, per_sample=fp(simsiam.per_sample)),
        Method("barlow", fp(barlow.loss), barlow.DEFAULTS, pair_loss=fp(barlow.pair_loss)),
        Method("vicreg", fp(vicreg.loss), vicreg.DEFAULTS, pair_loss=fp(vicreg.pair_loss)),
    ]
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _registry()


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (config key 'method'); choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


# range checks on the values a method reads; config.py has already checked their types
_VALID = {
    "temperature": (lambda v: v > 0, "> 0"),
    "queue_size": (lambda v: v > 0, "> 0"),
    "ema_momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lambd": (lambda v: v >= 0, ">= 0"),
    "sim_coeff": (lambda v: v >= 0, ">= 0"),
    "std_coeff": (lambda v: v >= 0, ">= 0"),
    "cov_coeff": (lambda v: v >= 0, ">= 0"),
    "proj_hidden": (lambda v: v > 0, "> 0"),
    "proj_dim": (lambda v: v > 0, "> 0"),
    "proj_layers": (lambda v: v >= 1, ">= 1"),
    "pred_hidden": (lambda v: v >= 0, ">= 0 (0 = no predictor)"),
}


def hparams(method: Method | str, cfg) -> dict[str, Any]:
    """The method's hyper-parameters: the config's value where set (not None), else the default."""
    method = get_method(method) if isinstance(method, str) else method
    hp = {k: (getattr(cfg, k) if getattr(cfg, k, None) is not None else v) for k, v in method.defaults.items()}
    for key, value in hp.items():
        ok, rule = _VALID.get(key, (lambda v: True, ""))
        if not ok(value):
            raise ValueError(f"config key {key!r} = {value!r} must be {rule} for method {method.name!r}")
    if method.predictor and hp["pred_hidden"] == 0:
        raise ValueError(f"method {method.name!r} needs a predictor: config key 'pred_hidden' must be > 0")
    return hp
