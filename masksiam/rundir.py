"""A training run's directory, out_dir/run_name: config.yaml, run_info.json, metrics.jsonl,
checkpoint.pt (+ older), backbone.pt, curves.png, result.json; and the rule for writing its files
(a disk or I/O error stops the run naming the path, the checkpoint kept: `RunStopped`)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from masksiam import checkpoint as ckpt_io
from masksiam import dist
from masksiam.config import ConfigError, save_config
from masksiam.errors import UserError
from masksiam.io import atomic_write_text
from masksiam.runinfo import write_run_info


class RunStopped(UserError):
    """The run could not go on (non-finite losses, a failed write); its checkpoint is kept."""


def write_or_stop(path: Path, fn) -> None:
    """Run a read-modify-write of a run file; a disk or I/O error stops the run naming the path (the
    checkpoint is kept)."""
    try:
        fn()
    except OSError as err:
        raise RunStopped(f"could not write {path}: {err}; the checkpoint is kept") from err


@dataclasses.dataclass(frozen=True)
class RunDir:
    """out_dir/run_name: config.yaml, run_info.json, metrics.jsonl, checkpoint.pt (+ older), results."""
    dir: Path
    resume: bool

    @property
    def ckpt_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @classmethod
    def of(cls, cfg) -> "RunDir":
        if cfg.keep_checkpoints < 1:
            raise ConfigError(f"config key 'keep_checkpoints' = {cfg.keep_checkpoints} must be >= 1")
        if not cfg.run_name and cfg.resume:
            raise ConfigError("resume=true needs the run_name of the run to continue (an empty run_name "
                              "starts a new run, named <method>-<arch>-<date>-<time>)")
        run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{cfg.method}-{cfg.arch}-{run_stamp()}")
        has_ckpt = ckpt_io.exists(run_dir / "checkpoint.pt", cfg.keep_checkpoints)
        elastic_restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if has_ckpt and not (cfg.resume or elastic_restart):
            raise ConfigError(f"{run_dir} already holds a checkpoint; pass resume=true to continue it, "
                              f"or choose another run_name / out_dir")
        return cls(run_dir, has_ckpt)

    def record(self, cfg, info, step: int) -> None:
        """The resolved config and run info; metrics past the checkpoint (a killed run's) dropped."""
        if info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.dir / "config.yaml")
            write_run_info(self.dir, {"world_size": info.world_size, "resumed": self.resume})
            truncate_metrics(self.metrics, step)
        dist.barrier()


def run_stamp() -> str:
    """The name part of a run without run_name: the start time, the same on every rank; under
    torchrun the rendezvous id instead, so that workers it restarts find their run again."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return os.environ["TORCHELASTIC_RUN_ID"]
    return dist.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))


def truncate_metrics(path: Path, step: int) -> None:
    """metrics.jsonl without the lines past `step` (a resumed run logs those steps again)."""
    def truncate():
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))
    write_or_stop(path, truncate)
