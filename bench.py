"""Throughput benchmarking: loaders, the augment stage, the model, the whole training step.

    python bench.py loader --backend torchvision --data DIR --views 2 --size 224 --batch-size 256 --batches 20
    python bench.py loader --compare torchvision,dali,ffcv --data DIR ...     # side by side, ratios to the first
    python bench.py augment --recipe mscn --batch-size 256 --size 224 --device cpu

Every mode excludes warm-up batches (and pipeline start-up: worker spawn, numba/DALI compile) from
the rates and reports them separately; rates are images/s (an image = all of its views), with
seconds per batch p50/p95. Results go to --json (and a markdown table on stdout). Goals are ratios
measured side by side in one run, since these machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

import masksiam  # noqa: F401
from masksiam.config import Config, apply
from masksiam.dist import DistInfo


# ---- measurement helpers ------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Per-batch wall times after warm-up, CPU time and peak RSS of this process and its children."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []
        self.proc = psutil.Process()
        self.peak_rss = 0

    def _rss(self) -> int:
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, total)
        return total

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        total = t.user + t.system
        for child in self.proc.children(recursive=True):
            try:
                ct = child.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
        return total

    def start(self) -> None:
        _sync(self.device)
        self.t0 = self.last = time.perf_counter()
        self.cpu0 = self._cpu()

    def tick(self) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        if len(self.times) % 5 == 0:
            self._rss()

    def result(self, images_per_batch: int) -> dict:
        self._rss()
        wall = time.perf_counter() - self.t0
        t = np.array(self.times)
        out = {
            "batches": len(t),
            "images_per_s": images_per_batch * len(t) / wall if wall > 0 else float("nan"),
            "s_per_batch_p50": float(np.percentile(t, 50)) if len(t) else float("nan"),
            "s_per_batch_p95": float(np.percentile(t, 95)) if len(t) else float("nan"),
            "cpu_percent": 100.0 * (self._cpu() - self.cpu0) / wall if wall > 0 else float("nan"),
            "peak_rss_mb": self.peak_rss / 2**20,
        }
        if self.device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: --device cuda but CUDA is not available")
    return torch.device(name)


def _print_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:,.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    return table


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


# ---- loader mode --------------------------------------------------------------------------------

def bench_loader(backend: str, args, device: torch.device) -> dict:
    from pipelines import build_loader
    cfg = apply(Config(), {"data": args.data, "loader": backend, "views": args.views, "size": args.size,
                           "batch_size": args.batch_size, "workers": args.workers,
                           "prefetch": args.prefetch, "train_split": args.split, "seed": 0}, "bench.py")
    info = DistInfo(0, 1, 0, device)
    t0 = time.perf_counter()
    loader = build_loader(cfg, info)
    loader.set_epoch(0)
    meter = Meter(device)
    it = iter(loader)
    for _ in range(args.warmup):                     # worker spawn, compile, first reads
        next(it)
    _sync(device)
    startup = time.perf_counter() - t0
    meter.start()
    done = 0
    epoch = 0
    while done < args.batches:
        try:
            batch = next(it)
        except StopIteration:                        # small folders: keep going into the next epoch
            epoch += 1
            loader.set_epoch(epoch)
            it = iter(loader)
            continue
        meter.tick()
        done += 1
    res = meter.result(cfg.batch_size)
    res.update(backend=backend, startup_s=startup, views=args.views, size=args.size,
               batch_size=args.batch_size, workers=args.workers, device=str(device))
    for key in ("compile_seconds",):
        if hasattr(loader, key):
            res[key] = getattr(loader, key)
    del batch, it, loader
    return res


def cmd_loader(args) -> dict:
    device = _device(args.device)
    backends = args.compare.split(",") if args.compare else [args.backend]
    rows = []
    for backend in backends:
        print(f"[bench loader] {backend}: {args.warmup} warm-up + {args.batches} batches of "
              f"{args.batch_size} x {args.views} views @ {args.size}px, {args.workers} workers", flush=True)
        rows.append(bench_loader(backend, args, device))
    base = rows[0]["images_per_s"]
    for r in rows:
        r["ratio"] = r["images_per_s"] / base
    table = _print_table(rows, ["backend", "images_per_s", "ratio", "s_per_batch_p50", "s_per_batch_p95",
                                "cpu_percent", "peak_rss_mb", "startup_s"])
    payload = {"mode": "loader", "data": args.data, "results": rows, "table": table}
    _write_json(args.json, payload)
    return payload


# ---- augment mode -------------------------------------------------------------------------------

def cmd_augment(args) -> dict:
    raise SystemExit("bench.py augment: not yet implemented")


# ---- command line -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)

    p = sub.add_parser("loader", help="images/s of a loader backend (or several, side by side)")
    p.add_argument("--backend", default="torchvision", choices=["torchvision", "dali", "ffcv"])
    p.add_argument("--compare", default="", help="comma-separated backends, ratios to the first")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.set_defaults(run=cmd_loader)

    p = sub.add_parser("augment", help="views/s of an augment recipe vs per-sample torchvision v2")
    p.add_argument("--recipe", default="mscn")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.set_defaults(run=cmd_augment)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
