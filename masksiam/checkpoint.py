"""Checkpoints: written atomically, kept in a short rotation, read back with `weights_only=True`.

A checkpoint is a plain dict of tensors and builtins (no pickled classes), so `torch.load(...,
weights_only=True)` can read it and a corrupt or foreign file fails loudly instead of running code.
It is written to a temporary file in the same folder, flushed to disk, then renamed over the old
one: a run killed mid-write leaves the previous checkpoint intact.

Rotation (`keep_checkpoints`): checkpoint.pt is the newest; the one before it is checkpoint.1.pt, and
so on. When the newest cannot be read (truncated by a full disk or a storage fault) a resume falls
back to the next readable one (`load_latest`), and the next save writes over the unreadable ones
instead of rotating them (`save_rotating(..., unreadable=...)`): a corrupt file never takes the
place of the good copy the run resumed from. Checkpoints are always read onto the CPU: the
training state (model, optimizer) is copied onto the device by load_state_dict, and the RNG
states (torch.Generator.set_state takes CPU byte tensors only) stay where they belong.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Collection

import torch

from masksiam.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read, written, or belongs to another run; the message names the file."""


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    from masksiam.io import atomic_write
    atomic_write(path, lambda f: torch.save(obj, f))


def rotation(path: str | Path, keep: int) -> list[Path]:
    """[checkpoint.pt, checkpoint.1.pt, ...]: the newest first, `keep` names in all."""
    path = Path(path)
    return [path] + [path.with_name(f"{path.stem}.{k}{path.suffix}") for k in range(1, keep)]


def save_rotating(obj: dict[str, Any], path: str | Path, keep: int = 2, unreadable: Collection[Path] = ()) -> None:
    """Write `obj` as the newest checkpoint, keeping the previous keep - 1.

    The files before the first free slot of the rotation (a missing name, or one in `unreadable`:
    those `load_latest` skipped) move one name down, the new file takes the first name: an
    unreadable file is written over, never moved over a readable one, and the files after it stay.
    A failed write (disk full, an I/O error) leaves the newest existing checkpoint as it was,
    removes its temporary file and raises CheckpointError."""
    names = rotation(path, max(1, keep))
    bad = {Path(p) for p in unreadable}
    free = next((i for i, name in enumerate(names) if name in bad or not name.exists()), len(names) - 1)
    new = names[0].with_name(f".{names[0].name}.new")
    try:
        save_atomic(obj, new)
        for older, newer in reversed(list(zip(names[2:free + 1], names[1:free]))):
            os.replace(newer, older)
        if free >= 1:
            # the previous checkpoint gets its second name first (a hard link: no copy), so that
            # checkpoint.pt names a complete file at every moment, before and after the rename
            names[1].unlink(missing_ok=True)
            try:
                os.link(names[0], names[1])
            except OSError:                          # a file system without hard links
                shutil.copyfile(names[0], names[1])
        os.replace(new, names[0])
    except OSError as err:
        new.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {names[0]}: {err}; the previous checkpoint "
                              f"is kept") from err


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickled objects, not a checkpoint at all
        # torch's message suggests weights_only=False, which would run arbitrary code: not repeated
        kind = "truncated or corrupt" if "zip" in str(err).lower() or "eof" in str(err).lower() else \
            "corrupt or not a masksiam checkpoint"
        raise CheckpointError(f"checkpoint {path} cannot be read: {kind} ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a masksiam checkpoint (holds a {type(state).__name__})")
    return state


def load_latest(path: str | Path, keep: int = 2) -> tuple[dict[str, Any], Path, dict[Path, str]]:
    """The newest readable checkpoint of the rotation -> (state, its path, {newer unreadable file: why}).
    None readable: CheckpointError naming each file and what the user can do."""
    skipped: dict[Path, str] = {}
    for name in rotation(path, max(1, keep)):
        if not name.exists():
            continue
        try:
            return load(name), name, skipped
        except CheckpointError as err:
            skipped[name] = str(err)
    if not skipped:
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(f"no checkpoint of {Path(path).parent} can be read ({'; '.join(skipped.values())}): "
                          f"delete or move {', '.join(p.name for p in skipped)} to start this run again from "
                          f"step 0, or set another run_name / out_dir to start a new run")


def exists(path: str | Path, keep: int = 2) -> bool:
    return any(name.exists() for name in rotation(path, max(1, keep)))


def check_compatible(ckpt: dict[str, Any], path: str | Path, expected: dict[str, Any],
                     shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Refuse a checkpoint made for another run: name the config keys that differ, then any tensor
    whose shape still differs (a key this record does not know)."""
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a masksiam training checkpoint (no run record)")
    wrong = [f"{k}={meta.get(k)!r} (this run: {v!r})" for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        raise CheckpointError(f"checkpoint {path} was written for a different run: {', '.join(wrong)}")
    if shapes is not None:
        theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
        diff = sorted(set(theirs) ^ set(shapes)) + [k for k in shapes if k in theirs and theirs[k] != shapes[k]]
        if diff:
            detail = ", ".join(f"{k} {theirs.get(k)} vs {shapes.get(k)}" for k in diff[:4])
            raise CheckpointError(f"checkpoint {path} holds tensors of other shapes or names than this run's "
                                  f"model ({len(diff)}: {detail})")


def check_resumable(ckpt: dict[str, Any], path: str | Path, changed: list[str], record: dict[str, Any]) -> None:
    """Refuse a resume that changes what the steps depend on: `changed` (config keys, as
    config.resume_changes names them) and the run record (world size, training images) against the
    one the checkpoint holds (a key it lacks, from an older checkpoint, is not compared)."""
    saved = ckpt.get("resume_record") or {}
    wrong = changed + [f"{k}={saved[k]!r} (this run: {v!r})" for k, v in record.items() if k in saved and saved[k] != v]
    if wrong:
        raise CheckpointError(f"checkpoint {path} was written with {', '.join(wrong)}: the loader's position and "
                              f"the lr schedule depend on these, so a resume keeps them; set them back (the run's "
                              f"config.yaml holds them) or start a new run with another run_name")


def backbone_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """torchvision-compatible ResNet weights from a training checkpoint (or a bare state dict)."""
    if "backbone" in ckpt:
        return ckpt["backbone"]
    return ckpt
