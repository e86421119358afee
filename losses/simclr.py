"""SimCLR: NT-Xent (normalised temperature-scaled cross entropy) with negatives from all ranks.

For a pair of views (a, b) of N images on each of R ranks, the 2RN normalised embeddings are
compared by cosine / temperature; each row's positive is the other view of the same image and its
negatives are the other 2RN - 2 embeddings (Chen et al. 2020). Both views are queries, so the loss
is symmetric in (a, b). The gather is autograd-aware, so a DDP run with R ranks computes exactly
the loss (and gradients) of one process holding all RN images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from losses.common import Heads, defaults, full_precision, normalized_std, upcast, views_in
from losses.siamese import Siamese
from masksiam.dist import gather_with_grad, rank

# MSCN (Jing et al. 2022, A.1): projector 2048-2048-256 with BN after every layer, temperature 0.2;
# SimCLR v1 used 0.1-0.5.
@dataclass(frozen=True)
class Settings(Heads):
    temperature: float = 0.2
    proj_last_bn: bool = True
    RULES: ClassVar = {"temperature": (lambda v: v > 0, "> 0")}


def _contrast(za: torch.Tensor, zb: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """za, zb: this rank's normalised views (N, D); ga, gb: the same gathered over ranks (RN, D).

    -> (mean loss over this rank's 2N rows, top-1 accuracy of the positive)."""
    n, total = za.shape[0], ga.shape[0]
    offset = rank() * n
    # rows: this rank's 2N queries; columns: all 2RN keys [ga; gb]
    queries = torch.cat([za, zb], 0)                                   # (2N, D)
    keys = torch.cat([ga, gb], 0)                                      # (2RN, D)
    logits = queries @ keys.t() / temperature                          # (2N, 2RN)
    local = torch.arange(n, device=za.device) + offset
    self_cols = torch.cat([local, local + total])                      # each query's own column
    pos_cols = torch.cat([local + total, local])                       # the other view
    logits = logits.scatter(1, self_cols[:, None], float("-inf"))
    loss = F.cross_entropy(logits, pos_cols)
    acc = (logits.argmax(1) == pos_cols).float().mean()
    return loss, acc.detach()


def loss(emb, temperature: float, **_) -> tuple[torch.Tensor, dict]:
    """Mean NT-Xent over the view pairs (multi-view / multi-mask: every listed pair).

    Each view is normalised and gathered once, however many pairs it appears in."""
    views = views_in(emb.pairs)
    local = {v: F.normalize(upcast(emb.z[v]), dim=1) for v in views}   # (N, D) each
    gathered = {v: gather_with_grad(local[v]) for v in views}           # (RN, D) each
    losses, accs = [], []
    for i, j in emb.pairs:
        l, a = _contrast(local[i], local[j], gathered[i], gathered[j], temperature)
        losses.append(l)
        accs.append(a)
    total = torch.stack(losses).mean()
    return total, {"loss": total.detach(), "pos_acc": torch.stack(accs).mean(),
                   "z_std": torch.stack([normalized_std(local[v]) for v in views]).mean()}


def per_sample(m: torch.Tensor, t: torch.Tensor, temperature: float, **_) -> torch.Tensor:
    """Mixed-loss term: InfoNCE of each query m_i against all RN gathered targets, positive t_i.

    m, t: (N, D) -> (N,). The mixed query's negatives are the other view's embeddings of the rest of
    the global batch; the columns are a set, so per_sample(m, t.flip(0)) has the same denominator
    with positive t_rev(i) (losses/mixed.py relies on this)."""
    m = F.normalize(upcast(m), dim=1)
    t = F.normalize(upcast(t), dim=1)
    keys = gather_with_grad(t)                                         # (RN, D)
    logits = m @ keys.t() / temperature                                # (N, RN)
    pos = torch.arange(m.shape[0], device=m.device) + rank() * m.shape[0]
    return F.cross_entropy(logits, pos, reduction="none")


class SimCLR(Siamese):
    """backbone -> projector; NT-Xent over the view pairs, negatives from every rank."""
    name, Settings = "simclr", Settings
    DEFAULTS = defaults(Settings)
    loss = staticmethod(full_precision(loss))
    per_sample = staticmethod(full_precision(per_sample))
