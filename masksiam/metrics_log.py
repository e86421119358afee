"""What a training run logs: one JSON line per log interval in metrics.jsonl (rank 0), a tqdm bar
per epoch, and the curves (curves.png) drawn from metrics.jsonl at the end."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from masksiam import dist
from masksiam.io import atomic_write
from masksiam.rundir import write_or_stop


class Interval:
    """What a log interval accumulates: the loss sum on the device (no sync), steps, data wait."""

    def __init__(self, device: torch.device):
        self.loss, self.steps, self.data, self.t = torch.zeros((), device=device), 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def reduce(self) -> "Interval":
        self.loss = dist.all_reduce_mean(self.loss)   # each rank's loss is its share: average
        return self


def reduce_logs(logs: dict) -> dict:
    """Global values of a method's logs: averaged over ranks, except z_std (a per-rank monitor)."""
    return {k: v if k == "z_std" else dist.all_reduce_mean(v.float()) for k, v in logs.items()}


class Logger:
    """Rank 0: a tqdm bar per epoch, and one JSON line per log interval in metrics.jsonl. A context
    manager: the bar and the file are closed on the way out, an exception included."""

    def __init__(self, path: Path, enabled: bool, progress: bool):
        self.path, self.enabled, self.progress, self.bar = path, enabled, progress and enabled, None
        self.bad_logged = 0
        self.file = None
        if enabled:
            write_or_stop(path, lambda: setattr(self, "file", open(path, "a")))

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_epoch(self, epoch: int, steps: int, start: int) -> None:
        if self.progress:
            from tqdm import tqdm
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}", dynamic_ncols=True, leave=True)

    def _record(self, record: dict) -> None:
        def write():
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        write_or_stop(self.path, write)

    def step(self, step, epoch, lr, since: Interval, logs, batch_size, bad_total, bad_images) -> None:
        elapsed = time.perf_counter() - since.t
        record = {"step": step, "epoch": epoch, "lr": lr,
                  "loss": (since.loss / max(1, since.steps)).item(),
                  "images_per_s": batch_size * since.steps / max(elapsed, 1e-9),
                  "data_wait": since.data / max(elapsed, 1e-9), "nonfinite_total": bad_total}
        record.update({k: float(v) for k, v in logs.items() if k != "loss"})
        if len(bad_images) > self.bad_logged:       # images replaced since the last line (this rank's)
            record["bad_images"] = bad_images[self.bad_logged:]
            self.bad_logged = len(bad_images)
        if self.enabled:
            self._record(record)
            if self.bar is not None:
                self.bar.n = self.bar.n + since.steps
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}",
                                     img_s=f"{record['images_per_s']:.0f}", wait=f"{record['data_wait']:.0%}")
                self.bar.refresh()
            elif not self.progress:
                print(json.dumps(record), flush=True)

    def knn(self, step, epoch, top1) -> None:
        if self.enabled:
            self._record({"step": step, "epoch": epoch, "knn_top1": top1})
            print(f"epoch {epoch}: kNN top-1 {top1:.2%}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()


# curves.png: one panel per entry of PLOTS, every panel by step: (title, ((metrics key, label), ...)).
# kNN top-1 shares the online probe's panel (top-1 on the same classes), as points at its step.
PLOTS = (("pretraining loss", (("loss", "loss"),)),
         ("top-1", (("probe_top1", "online probe"), ("knn_top1", "kNN"))),
         ("learning rate", (("lr", "lr"),)),
         ("images/s", (("images_per_s", "images/s"),)))


def curves(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metrics.jsonl rows -> {panel title: {label: [(step, value)]}}, the series that have points."""
    return {title: {label: pts for key, label in series if (pts := [(r["step"], r[key]) for r in rows if key in r])}
            for title, series in PLOTS}


def plot(metrics_path: Path, out: Path) -> None:
    """curves.png from metrics.jsonl: the PLOTS panels, 2 x 2."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = curves([json.loads(line) for line in metrics_path.read_text().splitlines() if line])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for label, points in series.items():
            ax.plot(*zip(*points), label=label, **({"marker": "o", "linestyle": "none"} if label == "kNN" else {}))
        if len(series) > 1:
            ax.legend()
        ax.set(xlabel="step", title=title)
    fig.tight_layout()
    write_or_stop(out, lambda: atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100)))
    plt.close(fig)
