"""The augment stage's draws, made before any pixel work: `Plan` (which samples each op touches,
decided on the host; engine.py's docstring says why) and `BranchDraw` (one branch's per-sample
parameters, drawn on the device), which the Augmenter's _plan / _draw_branch fill; `upload` (the
plan's index arrays to the device in one copy) and `stream_seed` (the seeds of the random streams)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

SUBSET_OPS = ("flip", "jitter", "gray", "blur", "solarize")


@dataclass
class Plan:
    """The host's decisions for one call, drawn before the device is touched. Index arrays are
    sorted int64 numpy (None = no sample) until `upload` turns them into device tensors.

    branches[b]: {op: whole-batch subset for op in SUBSET_OPS, "members": the jittered samples in a
    random order, "rotation": the hue slot rotation, "masked": [subset per copy]};
    chunks[c][b]: chunk-relative indices {op, "hue": [4 slots], "masked": [per copy]}."""
    n: int
    chunks_rows: list[tuple[int, int]]
    branches: list[dict]
    chunks: list[list[dict]]
    noise_seed: Optional[int] = None


def relative_to_chunk(idx: Optional[np.ndarray], c0: int, c1: int) -> Optional[np.ndarray]:
    """The sorted indices in [c0, c1), relative to c0 (None when none)."""
    if idx is None:
        return None
    lo, hi = np.searchsorted(idx, (c0, c1))
    return idx[lo:hi] - c0 if hi > lo else None


def upload(tree, device: torch.device):
    """Every numpy index array in a nested list/dict -> an int64 tensor on `device`, all in one copy:
    pinned memory and non_blocking on CUDA, so the host does not wait for the GPU's queue (a copy
    from pageable memory can). The caching host allocator keeps the pinned block until the copy ran."""
    arrays = []

    def collect(t):
        if isinstance(t, np.ndarray):
            arrays.append(t)
        elif isinstance(t, dict):
            for v in t.values():
                collect(v)
        elif isinstance(t, list):
            for v in t:
                collect(v)

    collect(tree)
    if not arrays:
        return tree
    flat = torch.from_numpy(np.concatenate(arrays).astype(np.int64, copy=False))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    parts = iter(flat.split([len(a) for a in arrays]))

    def rebuild(t):
        if isinstance(t, np.ndarray):
            return next(parts)
        if isinstance(t, dict):
            return {k: rebuild(v) for k, v in t.items()}
        if isinstance(t, list):
            return [rebuild(v) for v in t]
        return t

    return rebuild(tree)


@dataclass
class BranchDraw:
    """One branch's random parameters for a whole batch (N leading), drawn before any pixel work."""
    jitter: Optional[torch.Tensor] = None               # (N, 4) factors, identity outside the subset
    order: Optional[torch.Tensor] = None                # (N, 4) op per slot
    blur_sigma: Optional[torch.Tensor] = None           # (N,) px
    highpass_sigma: Optional[torch.Tensor | float] = None
    # per copy: cells (N, 3, G, G), grid (N,)
    masks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def stream_seed(seed: int, rank: int, stream: str) -> int:
    digest = hashlib.sha256(f"masksiam-augment/{seed}/{rank}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
