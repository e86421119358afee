"""The checkpoints of a training run (masksiam/checkpoint.py holds the file format, rotation and
the compatibility checks): what a run's checkpoint records, restoring one, saving on every rank."""
from __future__ import annotations

from pathlib import Path

import torch

from losses import shape_keys
from masksiam import checkpoint as ckpt_io
from masksiam import dist
from masksiam.config import resume_changes, to_dict
from masksiam.rundir import RunStopped, write_or_stop
from pipelines.loaders.common import ImageList
from models.resnet import use_small_stem


def resume_record(loader, info) -> dict:
    """What the loader's order and position depend on beyond the config: the world size (each rank's
    share of a batch and its own augment stream), the read order the loader resolved (read_order=auto
    reads shards or samples by what the data is: README "Read order"), and the training images,
    counted and, where the loader lists their names (an ImageFolder or webdataset index), hashed. A
    .beton is counted."""
    images = getattr(loader, "images", None) or getattr(loader, "samples", None)   # torchvision / DALI
    images = getattr(images, "images", images)          # a sample source's ImageList (folder, shards)
    record = {"world_size": info.world_size, "read_order": resolved_order(loader)}
    if isinstance(images, ImageList):
        record["train_images"] = len(images)
        record["train_names_sha1"] = images.paths_sha1()     # sha1 of the names joined by newlines
    elif hasattr(loader, "num_rows"):                                              # FFCV
        record["train_images"] = int(loader.num_rows)
    return record


def resolved_order(loader) -> str:
    """"sample" or "shard": the order a training loader reads in (FFCV: random or quasi_random)."""
    order = getattr(loader, "order", None) or getattr(getattr(loader, "sampler", None), "order", None)
    if order is not None:                                                          # DALI / torchvision
        return order.kind
    kind = getattr(getattr(loader, "_order", None), "kind", "random")              # FFCV's RankOrder
    return {"random": "sample", "quasi_random": "shard"}.get(kind, kind)


def order_before_the_record(saved_config: dict) -> str:
    """The order a checkpoint written before the record held it was trained in: the per-sample order,
    unless its FFCV loader was set to quasi_random."""
    quasi = saved_config.get("loader") == "ffcv" and saved_config.get("ffcv_order") == "quasi_random"
    return "shard" if quasi else "sample"


class RunCheckpoints:
    """The run's checkpoints: what they record (every shape-deciding key and every tensor's shape,
    so a foreign checkpoint is refused naming what differs; the config and the resume record, so a
    resume that would change the steps is refused), restore, and save on every rank."""

    def __init__(self, path: Path, cfg, info, method, optimizer, scaler, ahead, probe=None, record=None):
        self.path, self.cfg, self.info, self.record = path, cfg, info, record or {}
        self.method, self.optimizer, self.scaler, self.ahead, self.probe = method, optimizer, scaler, ahead, probe
        self.meta = {"arch": cfg.arch, "method": cfg.method, "width": cfg.width,
                     "small_stem": use_small_stem(cfg.stem, cfg.size),
                     **{k: getattr(method, "method", method).hp[k] for k in shape_keys(method)}}
        self.shapes = {k: tuple(v.shape) for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
        self.unreadable: dict[Path, str] = {}       # files restore skipped: the next save takes their place

    def restore(self) -> tuple[int, int, int]:
        """-> (step, epoch, batch in epoch) of the newest readable checkpoint, its state loaded."""
        state, path, self.unreadable = ckpt_io.load_latest(self.path, self.cfg.keep_checkpoints)
        ckpt_io.check_compatible(state, path, self.meta, self.shapes)
        saved = state.get("config") or {}
        state["resume_record"] = {"read_order": order_before_the_record(saved), **(state.get("resume_record") or {})}
        ckpt_io.check_resumable(state, path, resume_changes(saved, self.cfg), self.record)
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.ahead.load_state_dict(state["augment"][self.info.rank])
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
        torch.set_rng_state(state["rng_cpu"][self.info.rank])
        if self.info.is_main:
            for why in self.unreadable.values():
                print(f"train.py: {why}; resuming from the previous checkpoint {path}", flush=True)
            print(f"resumed {path} at step {state['step']} (epoch {state['epoch']}, batch "
                  f"{state['batch_in_epoch']})", flush=True)
        return state["step"], state["epoch"], state["batch_in_epoch"]

    def save(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        aug_states = dist.all_gather_object(self.ahead.state_dict())
        rng_states = dist.all_gather_object(torch.get_rng_state())
        failed = None
        if self.info.is_main:
            try:
                ckpt_io.save_rotating({
                    "meta": self.meta, "config": to_dict(self.cfg), "resume_record": self.record,
                    "step": step, "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch, "model": self.method.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                    "augment": aug_states, "rng_cpu": rng_states,
                    "probe": self.probe.state_dict() if self.probe is not None else None,
                    "backbone": {k: v.detach().cpu() for k, v in self.method.backbone.state_dict().items()},
                }, self.path, self.cfg.keep_checkpoints, unreadable=self.unreadable)
                self.unreadable = {}                # written over by this save
            except ckpt_io.CheckpointError as err:
                failed = err
        if dist.any_rank(failed is not None):       # every rank stops together
            raise RunStopped(str(failed or "rank 0 could not write the checkpoint"))
        dist.barrier()

    def export_backbone(self, path: Path) -> None:
        """The backbone alone as a torchvision state dict (backbone.pt), written by rank 0."""
        if self.info.is_main:
            weights = {k: v.detach().cpu() for k, v in self.method.backbone.state_dict().items()}
            write_or_stop(path, lambda: ckpt_io.save_atomic(weights, path))
