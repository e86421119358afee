"""Mixed-image losses (MixMask, Un-Mix) around any Siamese method: `Mixed(method, weight)`.

On a step whose recipe mixes (MixMask, Un-Mix; or config `mix`) the augment stage provides:

    x_m    = M * x_a + (1 - M) * x_a.flip(0)   view a = `source` mixed with this rank's batch of view a
             reversed (MixMask: M a block mask on an 8 x 8 grid; Un-Mix: mixup, M = lam, or a cutmix box)
    lam    (N,) tensor or float: the fraction of x_m's pixels that come from x_a[i] (mean of M)
    z_m    (N, D) online projector output for x_m
    p_m    (N, D) online predictor output for x_m (methods with a predictor: BYOL, SimSiam), else None
    emb    the step's Embeddings, as the method's loss gets them. The mixed view is compared with view b,
           the partner of `source` in the first pair of emb.pairs that holds it ((0, 1): a = 0, b = 1).
           b's target is read from emb: emb.zt[b] for EMA methods (MoCo, BYOL; b must be a target
           view, method.views(...)[1]), else emb.z[b]; MoCo's negatives from emb.queue
    hp     the method's hyper-parameters (losses.common.hparams); None = its defaults

and `Mixed` adds `mix_weight * loss_mix` to the method's own loss, embedding x_m in the same forward
as the other online views:

    loss_mix, logs = mixed_loss(method, emb, z_m, p_m, lam, source, hp)

The loss is asymmetric, as MixMask's (Vishniakov et al. 2022): only the mixed branch predicts, against the
unmixed view b of both source images. With m = p_m for predictor methods, else z_m, and t the target
of view b (detached where the method stops gradients: MoCo and BYOL's EMA keys, SimSiam's z;
SimCLR, Barlow Twins and VICReg let gradient reach view b, as their own losses do):

  per-sample methods (SimCLR, MoCo, BYOL, SimSiam), Un-Mix's formulation:
      loss_mix = mean_i [ lam_i L_i(m, t_i) + (1 - lam_i) L_i(m, t_rev(i)) ]
    with L_i the method's own per-sample loss against positive t_i: InfoNCE against the rest of the
    global batch of view b (SimCLR) or the queue (MoCo), 2 - 2 cos (BYOL), -cos (SimSiam).
  batch-statistics methods (Barlow Twins, VICReg), which have no per-sample loss: the method's pair
    loss between z_m and the mixed target t_mix = lam t + (1 - lam) t.flip(0), the embedding a
    linear mixing would give; at lam = 1 it is the method's own loss of the pair (m, b).

Like every loss here it is rank r's share of the global value with exact gradients (losses/common.py).
"""
from __future__ import annotations

import torch

from torch import nn

from losses.common import Embeddings, upcast


def _weight(lam, like: torch.Tensor):
    """lam as a float, or as an (N, 1) column in like's dtype (so it broadcasts over D)."""
    if isinstance(lam, torch.Tensor):
        if lam.shape != (like.shape[0],):
            raise ValueError(f"lam must be a float or an (N,) tensor with N = {like.shape[0]}, got {tuple(lam.shape)}")
        return lam.detach().to(like.dtype)[:, None]
    return float(lam)


def partner(pairs, source: int) -> int:
    """The view the mixed copy of view `source` is compared with: its partner in the first pair."""
    for i, j in pairs:
        if source in (i, j):
            return j if i == source else i
    raise ValueError(f"mixed loss: view {source} (the mixed source) is in none of the pairs {list(pairs)}")


def mixed_loss(method, emb: Embeddings, z_m: torch.Tensor, p_m: torch.Tensor | None, lam,
               source: int = 0, hp: dict | None = None) -> tuple[torch.Tensor, dict]:
    """method: a Siamese method class or instance (its predictor, ema, per_sample / pair_loss)."""
    hp = method.DEFAULTS if hp is None else hp
    m = p_m if method.predictor else z_m
    if m is None:
        raise ValueError(f"the mixed {method.name} loss needs p_m, the predictor output for the mixed images")
    view = partner(emb.pairs, source)
    targets = emb.zt if method.ema else emb.z
    if targets is None or targets[view] is None:
        branch = "emb.zt (EMA target)" if method.ema else "emb.z"
        raise ValueError(f"the mixed {method.name} loss needs {branch}[{view}], the other view's target")
    t = targets[view]
    with torch.autocast(m.device.type, enabled=False):
        m, t = upcast(m), upcast(t)
        w = _weight(lam, m)
        if method.per_sample is not None:
            per = lambda target: method.per_sample(m, target, queue=emb.queue, **hp)   # noqa: E731
            w = w[:, 0] if isinstance(w, torch.Tensor) else w
            loss = (w * per(t) + (1 - w) * per(t.flip(0))).mean()
        else:
            loss, _ = method.pair_loss(m, w * t + (1 - w) * t.flip(0), **hp)
    return loss, {"mix_loss": loss.detach()}


class Mixed(nn.Module):
    """A Siamese method with the mixed term: forward(out) -> (method loss + weight * mixed loss, logs).

    Steps without a mixed view (out.mixed is None) are the method's own. State, hooks and the
    backbone are the wrapped method's."""

    def __init__(self, method: nn.Module, weight: float = 1.0):
        super().__init__()
        self.method, self.weight = method, weight
        self.name = f"{method.name}+mix"

    @property
    def backbone(self) -> nn.Module:
        return self.method.backbone

    def forward(self, out) -> tuple[torch.Tensor, dict]:
        if out.mixed is None:
            return self.method(out)
        emb, (z_x, p_x) = self.method.embed(out, (out.mixed,))
        loss, logs = self.method.loss(emb, **self.method.hp)
        loss_mix, mix_logs = mixed_loss(self.method, emb, z_x[0], p_x[0], out.mix_lam, out.mix_source,
                                        self.method.hp)
        return loss + self.weight * loss_mix, {**logs, **mix_logs}

    def after_step(self, step: int, total_steps: int) -> None:
        self.method.after_step(step, total_steps)
