"""MoCo v2: InfoNCE of online queries against momentum-encoder keys and a queue of past keys.

For a pair (i, j): q = normalize(z[i]) from the online encoder + projector, k = normalize(zt[j])
from the EMA copy (no gradient). Each query's logits are [q.k, q.queue] / temperature (1 + K
columns) and its label is column 0 (He et al. 2020; Chen et al. 2020, "MoCo v2"). After the step
`after_step` writes this step's keys, gathered from all ranks in rank order, into the queue (`Queue`).

Defaults are the MixMask paper's ImageNet MoCo v2 settings (Vishniakov et al. 2022, Table 2): moco-dim 128,
m 0.999 (constant, as MoCo v2; `ema_schedule=cosine` gives MoCo v3's schedule), K 65536, t 0.2,
projector 2048-2048-128 without BatchNorm (MoCo v2's fc-ReLU-fc). The seed's CIFAR settings
(Table 1) are K 4096, m 0.99, t 0.1: set them in the run config.

Asymmetric by default, as the original and the seed: pairs [(0, 1)] use view 0 only as query and
view 1 only as key, so the online branch embeds view 0 and the target view 1 (`views`).
`moco_symmetric=True` adds the swapped direction (solo-learn's MoCo v2+ / MoCo v3 symmetrisation),
averaging the two, and enqueues the keys of both views.

Shuffle-BN is not implemented: MoCo shuffled the key batch across GPUs so per-GPU BatchNorm
statistics could not leak which key matches which query. With sync_bn=True (recommended for
multi-GPU MoCo) the statistics are over the global batch, as in MoCo v3, and the leak is diluted
to 1 / global batch; on one GPU shuffle-BN never applied.

Distributed: the loss needs no gather (negatives come from the queue, which holds every rank's
keys); each rank's loss is the mean over its own queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from losses.common import EMA, Heads, both_directions, defaults, full_precision, normalized_std, upcast
from losses.siamese import Siamese
from masksiam.dist import gather_no_grad


@dataclass(frozen=True)
class Settings(Heads, EMA):
    temperature: float = 0.2
    queue_size: int = 65536                # negatives
    moco_symmetric: bool = False           # both views as queries (MoCo v2+/v3)
    ema_momentum: float = 0.999
    ema_schedule: Literal["cosine", "constant"] = "constant"
    proj_dim: int = 128
    proj_bn: bool = False
    RULES: ClassVar = {"temperature": (lambda v: v > 0, "> 0"), "queue_size": (lambda v: v > 0, "> 0")}


def _directed(pairs, moco_symmetric: bool) -> list[tuple[int, int]]:
    return both_directions(pairs) if moco_symmetric else list(pairs)


def views(pairs, moco_symmetric: bool = False, **_) -> tuple[list[int], list[int]]:
    """(online views: the queries, target views: the keys)."""
    directed = _directed(pairs, moco_symmetric)
    return sorted({i for i, _ in directed}), sorted({j for _, j in directed})


def _logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """q (N, D) online, k (N, D) target, queue (K, D) normalised -> logits (N, 1 + K), positive first."""
    q = F.normalize(upcast(q), dim=1)
    k = F.normalize(upcast(k.detach()), dim=1)
    pos = (q * k).sum(1, keepdim=True)                                 # (N, 1)
    neg = q @ queue.to(q.dtype).t()                                    # (N, K)
    return torch.cat([pos, neg], 1) / temperature


def _snapshot(queue: torch.Tensor) -> torch.Tensor:
    """Backward needs the queue as the forward saw it, and the loop may enqueue (in place) before
    calling backward: the loss works on a copy (K x D, 32 MB at the defaults)."""
    return queue.detach().clone()


def per_sample(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.2,
               **_) -> torch.Tensor:
    """InfoNCE of each query q_i with positive key k_i and the queue as negatives: (N,)."""
    if queue is None:
        raise ValueError("MoCo needs emb.queue: (queue_size, proj_dim) keys from losses.moco.init_queue")
    logits = _logits(q, k, _snapshot(queue), temperature)
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long), reduction="none")


def loss(emb, temperature: float, moco_symmetric: bool = False, **_) -> tuple[torch.Tensor, dict]:
    """Mean InfoNCE over the (directed) pairs: query view i, key view j."""
    if emb.queue is None:
        raise ValueError("MoCo needs emb.queue: (queue_size, proj_dim) keys from losses.moco.init_queue")
    if emb.zt is None:
        raise ValueError("MoCo needs emb.zt: key embeddings from the momentum encoder")
    queue = _snapshot(emb.queue)
    losses, accs = [], []
    for i, j in _directed(emb.pairs, moco_symmetric):
        logits = _logits(emb.z[i], emb.zt[j], queue, temperature)
        labels = logits.new_zeros(logits.shape[0], dtype=torch.long)
        losses.append(F.cross_entropy(logits, labels))
        accs.append((logits.detach().argmax(1) == 0).float().mean())
    total = torch.stack(losses).mean()
    queries = views(emb.pairs, moco_symmetric)[0]
    return total, {"loss": total.detach(), "pos_acc": torch.stack(accs).mean(),
                   "z_std": torch.stack([normalized_std(emb.z[v]) for v in queries]).mean()}


class Queue:
    """MoCo's queue of negatives with its write pointer, as the MoCo method holds it.

        queue = Queue.from_hparams(hp, device)         # (queue_size, proj_dim) random unit keys
        emb = Embeddings(..., queue=queue.tensor)
        ... loss, backward, optimizer step ...
        queue.push(emb.zt, emb.pairs)                  # this step's keys from every rank
        state = queue.state_dict()                     # the method's extra state in checkpoints
    """

    def __init__(self, size: int, dim: int, device=None, moco_symmetric: bool = False, seed: int = 0):
        self.tensor = init_queue(size, dim, device, seed)    # (K, D) float32
        self.ptr = 0
        self.moco_symmetric = moco_symmetric

    @classmethod
    def from_hparams(cls, hp: dict, device=None) -> "Queue":
        return cls(hp["queue_size"], hp["proj_dim"], device, hp.get("moco_symmetric", False))

    def push(self, zt, pairs) -> None:
        """Enqueue the keys the loss used: zt[j] of every key view j of `pairs` (gathered over ranks)."""
        keys = torch.cat([zt[v] for v in views(pairs, self.moco_symmetric)[1]], 0)
        self.ptr = enqueue(self.tensor, self.ptr, keys)

    def state_dict(self) -> dict:
        return {"tensor": self.tensor, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["tensor"].shape) != tuple(self.tensor.shape):
            raise ValueError(f"checkpoint MoCo queue is {tuple(state['tensor'].shape)} but this run's is "
                             f"{tuple(self.tensor.shape)} (config keys queue_size, proj_dim)")
        self.tensor.copy_(state["tensor"])
        self.ptr = int(state["ptr"])


def init_queue(size: int, dim: int, device: torch.device | str | None = None, seed: int = 0) -> torch.Tensor:
    """(size, dim) float32 random unit keys, as MoCo starts. Drawn from a seeded CPU generator, so
    every rank starts with the same queue without communication."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(device)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """Write this step's keys (M, D) from every rank, in rank order, into `queue` (K, D) at `ptr`.

    Keys are L2-normalised here; writing wraps around the end of the queue (K need not be a
    multiple of the global batch). Returns the new pointer. `ptr` is a Python int that advances by
    the same amount on every rank, so it costs no sync; store it with the queue in checkpoints.
    """
    keys = gather_no_grad(F.normalize(upcast(keys.detach()), dim=1))   # (R*M, D), rank order
    size = queue.shape[0]
    slots = (ptr + torch.arange(keys.shape[0], device=queue.device)) % size
    # more keys than slots: only the newest `size` survive, each in the slot it would end in
    queue.index_copy_(0, slots[-size:], keys[-size:].to(queue.dtype))
    return (ptr + keys.shape[0]) % size


class MoCo(Siamese):
    """Online query encoder + EMA key encoder + the queue of past keys (its checkpoint state too)."""
    name, Settings = "moco", Settings
    DEFAULTS = defaults(Settings)
    ema = True
    loss = staticmethod(full_precision(loss))
    per_sample = staticmethod(full_precision(per_sample))

    def __init__(self, backbone, hp, cfg=None):
        super().__init__(backbone, hp, cfg)
        # not a buffer: DDP would broadcast its 32 MB from rank 0 every forward, and every rank
        # already holds the same queue (same seed, same gathered keys)
        self.queue = Queue.from_hparams(hp)
        self._keys = None                    # this step's (zt, pairs), pushed by after_step

    def views(self, pairs):
        return views(pairs, self.hp["moco_symmetric"])

    def embed(self, out, extra=()):
        emb, extra_out = super().embed(out, extra)
        emb.queue = self.queue.tensor
        self._keys = (emb.zt, emb.pairs)
        return emb, extra_out

    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)
        if self._keys is not None:          # this step's keys from every rank
            self.queue.push(*self._keys)
            self._keys = None

    def _apply(self, fn, recurse=True):      # .to(device) moves the queue with the module
        super()._apply(fn, recurse)
        self.queue.tensor = fn(self.queue.tensor)
        return self

    def get_extra_state(self) -> dict:
        return self.queue.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.queue.load_state_dict(state)
