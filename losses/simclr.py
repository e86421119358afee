"""SimCLR: NT-Xent (normalised temperature-scaled cross entropy) with negatives from all ranks.

For a pair of views (a, b) of N images on each of R ranks, the 2RN normalised embeddings are
compared by cosine / temperature; each row's positive is the other view of the same image and its
negatives are the other 2RN - 2 embeddings (Chen et al. 2020). The gather is autograd-aware, so a
DDP run with R ranks computes exactly the loss (and gradients) of one process holding all RN images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from masksiam.dist import gather_with_grad, rank

# MSCN (seed 001, A.1): projector 2048-2048-256 with BN, temperature 0.2; SimCLR v1 used 0.1-0.5.
DEFAULTS = {"temperature": 0.2, "proj_hidden": 2048, "proj_dim": 256, "proj_layers": 2, "pred_hidden": 0}


def nt_xent(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """za, zb: (N, D) on this rank -> (mean loss over this rank's 2N rows, top-1 positive accuracy)."""
    n = za.shape[0]
    za = F.normalize(za.float(), dim=1)
    zb = F.normalize(zb.float(), dim=1)
    ga, gb = gather_with_grad(za), gather_with_grad(zb)               # (RN, D) each
    total = ga.shape[0]
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
    """Mean NT-Xent over the view pairs (multi-view / multi-mask: every listed pair)."""
    losses, accs = [], []
    for i, j in emb.pairs:
        l, a = nt_xent(emb.z[i], emb.z[j], temperature)
        losses.append(l)
        accs.append(a)
    total = torch.stack(losses).mean()
    return total, {"loss": total.detach(), "pos_acc": torch.stack(accs).mean()}
