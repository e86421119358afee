"""Checkpoints: written atomically, read back with `weights_only=True`.

A checkpoint is a plain dict of tensors and builtins (no pickled classes), so `torch.load(...,
weights_only=True)` can read it and a corrupt or foreign file fails loudly instead of running code.
It is written to a temporary file in the same folder, flushed to disk, then renamed over the old
one: a run killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # the rename is durable only once the directory entry is
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, pickled objects, not a checkpoint at all
        raise CheckpointError(f"checkpoint {path} could not be read: {err}") from err


def check_compatible(ckpt: dict[str, Any], path: str | Path, **expected: Any) -> None:
    """Refuse a checkpoint made for another architecture / method, naming what differs."""
    meta = ckpt.get("meta", {})
    wrong = [f"{k}={meta.get(k)!r} (this run: {v!r})" for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        raise CheckpointError(f"checkpoint {path} was written for a different run: {', '.join(wrong)}")


def backbone_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """torchvision-compatible ResNet weights from a training checkpoint (or a bare state dict)."""
    if "backbone" in ckpt:
        return ckpt["backbone"]
    if "model" in ckpt:
        prefix = "backbone."
        return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    return ckpt
