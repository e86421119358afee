"""bench.py loader: images/s of loader backends alone (decode, crops, flips into uint8 batches on the
device), side by side with the plain torchvision-v2 pipeline a user would write, and the host CPU
per image with and without its decodes."""
from __future__ import annotations

import argparse
import functools
import io
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

from masksiam.config import Config, apply
from masksiam.dist import DistInfo
from masksiam.errors import UsageError
from bench.meter import GPU_COLUMNS, Meter, combos, pick_device, report, row_label, sync


# loader-mode backend names -> config; ffcv-perview is FFCV's own way (one decode per view), the
# baseline of masksiam's fused multi-view decoder; torchvision-v2 is no masksiam loader but the
# pipeline a user would write instead (_TorchvisionV2), the baseline every loader is also divided by
LOADER_BACKENDS = {"torchvision": {"loader": "torchvision"}, "torchvision-v2": {"loader": "torchvision"},
                   "dali": {"loader": "dali"}, "ffcv": {"loader": "ffcv"},
                   "ffcv-perview": {"loader": "ffcv", "ffcv_fused": False}}
BASELINE = "torchvision-v2"


class _Views:
    """ImageFolder transform: PIL image -> V x (3, S_v, S_v) uint8, view v RandomResizedCrop(S_v,
    scale_v) (antialiased bilinear) + horizontal flip of the one decoded image, all
    torchvision.transforms.v2 on tensors. views: (size, scale) per view."""

    def __init__(self, views, ratio, flip_prob: float):
        from torchvision.transforms import v2
        self.to_tensor = v2.PILToTensor()
        self.crops = [v2.Compose([v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
                                  v2.RandomHorizontalFlip(flip_prob)]) for size, scale in views]

    def __call__(self, img):
        x = self.to_tensor(img)                      # (3, H, W) uint8
        return [crop(x) for crop in self.crops]


class _TorchvisionV2:
    """Backend torchvision-v2: torchvision's ImageFolder (PIL decode) with _Views in DataLoader
    workers (one torch thread each, DataLoader's default), shuffled, default collate: batches of
    V x (N, 3, S, S) uint8 moved to the device. It draws its own crops (not masksiam's per-sample
    stream), which does not change its speed."""

    def __init__(self, cfg, info: DistInfo):
        from torchvision import datasets

        from pipelines.loaders.spec import loader_spec
        self.device, spec = info.device, loader_spec(cfg, info)    # the views of cfg.crops (multi-crop)
        dataset = datasets.ImageFolder(str(Path(cfg.data) / cfg.train_split),
                                       transform=_Views(zip(spec.view_sizes, spec.view_scales), cfg.crop_ratio,
                                                        cfg.flip_prob))
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=cfg.workers > 0,
            prefetch_factor=cfg.prefetch if cfg.workers > 0 else None)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __iter__(self):
        for views, labels in self.loader:
            yield [v.to(self.device, non_blocking=True) for v in views], labels.to(self.device, non_blocking=True)


def _decode_ms(payloads: list[bytes | None]) -> float:
    """CPU ms to decode one image fully (PIL: libjpeg-turbo, as every CPU loader here uses), median
    over the encoded `payloads` (None: stored as raw pixels, nothing to decode), in this thread
    (thread_time)."""
    from PIL import Image
    if not payloads:
        return float("nan")
    times = []
    for encoded in payloads:
        t0 = time.thread_time()
        if encoded is not None:
            with Image.open(io.BytesIO(encoded)) as img:
                img.convert("RGB").load()
        times.append(time.thread_time() - t0)
    return 1000.0 * float(np.median(times))


def _folder_decode_ms(data: str, split: str, images: int = 64) -> float:
    """_decode_ms on the split's own files (the loaders' folder rules): what the torchvision and DALI
    loaders decode; nan where the split is no image folder (webdataset shards)."""
    from pipelines.loaders.common import DataError, scan_image_folder
    try:
        found = scan_image_folder(Path(data) / split, images)
    except DataError:
        return float("nan")
    return _decode_ms([(found.root / p).read_bytes() for p in found.paths])


@functools.lru_cache(maxsize=None)
def _beton_decode_ms(path: str, images: int = 64) -> float:
    """_decode_ms on the images a .beton stores (its JPEGs, at the converter's --max-res; raw rows
    cost no decode): what the FFCV loader decodes, not the full-size files it was made from."""
    from eval.data import BetonSamples
    from pipelines.loaders.common import spread
    rows = BetonSamples(Path(path))
    return _decode_ms([None if rows.names[i].endswith(".png") else rows.read(i).tobytes()
                       for i in spread(len(rows), images)])


def _decodes_per_image(backend: str, views: int, device: torch.device) -> int:
    """Full host decodes an image costs a backend: ffcv-perview decodes once per view, DALI on CUDA
    decodes with nvJPEG (0 on the host); DALI on the CPU is measured instead (_dali_thread_cpu)."""
    return views if backend == "ffcv-perview" else 0 if backend == "dali" and device.type == "cuda" else 1


def _dali_thread_cpu() -> float:
    """CPU seconds of this process's DALI worker threads (named "[DALI][TP<n>]Exec" in /proc): on the
    CPU backend, with the crops done by the loader's own host pool, their only work is the decode."""
    total = 0.0
    for thread in psutil.Process().threads():
        try:
            name = Path(f"/proc/self/task/{thread.id}/comm").read_text()
        except OSError:
            continue
        if name.startswith("[DALI][TP"):
            total += thread.user_time + thread.system_time
    return total


def bench_loader(backend: str, args, device: torch.device) -> dict:
    from pipelines.loaders import build_loader
    if backend not in LOADER_BACKENDS:
        raise UsageError(f"loader: unknown backend {backend!r}; choose from {', '.join(LOADER_BACKENDS)}")
    views = args.views
    if args.crops:                                   # the config wants views = the crops' total
        from pipelines.loaders.spec import parse_crops
        views = sum(g.count for g in parse_crops(args.crops, args.size, args.views, (0.08, 1.0), "--crops"))
    cfg = apply(Config(), {"data": args.data, **LOADER_BACKENDS[backend], "views": views, "size": args.size,
                           "batch_size": args.batch_size, "workers": args.workers, "prefetch": args.prefetch,
                           "train_split": args.split, "ffcv_path": args.ffcv_path, "seed": 0,
                           "crops": args.crops}, "bench.py")
    info = DistInfo(0, 1, 0, device)
    meter = Meter(device)                            # from here: the start-up's memory peak counts too
    t0 = time.perf_counter()
    loader = _TorchvisionV2(cfg, info) if backend == BASELINE else build_loader(cfg, info)
    epoch = 0
    loader.set_epoch(epoch)
    it = iter(loader)
    progress = tqdm(total=args.warmup + args.batches, desc=f"{backend} warm-up", file=sys.stderr,
                    unit="batch", leave=False)
    done, startup = -args.warmup, None               # warm-up: worker spawn, compile, first reads
    while done < args.batches:
        if done == 0 and startup is None:
            sync(device)
            startup = time.perf_counter() - t0
            progress.set_description(backend)
            meter.start()
            dali_cpu = _dali_thread_cpu()
        try:
            batch = next(it)
        except StopIteration:                        # small folders: keep going into the next epoch
            epoch += 1
            loader.set_epoch(epoch)
            it = iter(loader)
            continue
        done += 1
        progress.update()
        if done > 0:
            meter.tick()
    progress.close()
    dali_cpu = _dali_thread_cpu() - dali_cpu
    res = meter.result(cfg.batch_size)
    # host CPU per image: CPU seconds of this process (every thread) and its workers over the measured
    # batches / images. decode_ms: DALI's decode threads measured (CPU backend); FFCV: decodes_per_image
    # decodes of the .beton's stored images; else cmd_loader counts decodes_per_image full decodes of
    # the split's files (each timed once per run)
    res["host_cpu_ms"] = 10.0 * res["cpu_percent"] / res["images_per_s"]
    res["decodes_per_image"] = _decodes_per_image(backend, views, device)
    if backend == "dali" and device.type == "cpu":
        res["decode_ms"] = 1000.0 * dali_cpu / max(1, res["batches"] * cfg.batch_size)
    elif cfg.loader == "ffcv":
        from pipelines.loaders.ffcv_loader import beton_path
        res["decode_ms"] = res["decodes_per_image"] * _beton_decode_ms(str(beton_path(cfg, cfg.train_split)))
    res.update(backend=backend, startup_s=startup, views=views, size=args.size, crops=args.crops,
               batch_size=args.batch_size, workers=args.workers, device=str(device))
    if hasattr(loader, "compile_seconds"):           # ffcv: numba compile, part of startup_s
        res["compile_seconds"] = loader.compile_seconds
    del batch, it, loader
    return res


LOADER_SWEEPS = ("workers", "batch_size", "views", "size", "prefetch")


def _merge_repeats(runs: list[dict]) -> dict:
    """One row from repeated measurements: rates and times averaged, start-up at its worst, memory
    peaks at their least (later repeats run in a process that already held the other loaders),
    each repeat's images/s kept (`images_per_s_runs`) to show the spread."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            values = [r[key] for r in runs]
            row[key] = (min(values) if key.startswith("peak") else max(values) if key == "startup_s"
                        else sum(values) / len(values))
    row["images_per_s_runs"] = [r["images_per_s"] for r in runs]
    return row


def cmd_loader(args) -> dict:
    device = pick_device(args.device)
    backends = args.compare.split(",") if args.compare else [args.backend]
    decode_ms = _folder_decode_ms(args.data, args.split)
    rows = []
    for combo in combos(args, LOADER_SWEEPS):
        run = argparse.Namespace(**{**vars(args), **combo})
        measured = {b: [] for b in backends}
        # repeats alternate the order (A B C, C B A, ...): a drift in the machine's speed during the
        # run then weighs on every backend alike instead of on the last one
        for r in range(args.repeats):
            for backend in (backends if r % 2 == 0 else backends[::-1]):
                print(f"[bench loader] {row_label(backend, combo)} ({r + 1}/{args.repeats}): {run.warmup} warm-up + "
                      f"{run.batches} batches of {run.batch_size} x {run.views} views @ {run.size}px, "
                      f"{run.workers} workers", flush=True)
                measured[backend].append(bench_loader(backend, run, device))
        group = {b: {"label": row_label(b, {**combo, **({"crops": args.crops} if args.crops else {})}),
                     **_merge_repeats(measured[b])} for b in backends}
        for row in group.values():
            if BASELINE in group:
                row["ratio_tv2"] = row["images_per_s"] / group[BASELINE]["images_per_s"]
            row.setdefault("decode_ms", row["decodes_per_image"] * decode_ms)
            row["host_cpu_ex_decode_ms"] = row["host_cpu_ms"] - row["decode_ms"]
        rows += group.values()
    columns = ["label", "images_per_s", "ratio", *(["ratio_tv2"] if BASELINE in backends else []),
               "s_per_batch_p50", "s_per_batch_p95", "cpu_percent", "other_cpu_percent", "host_cpu_ms",
               "host_cpu_ex_decode_ms", "peak_rss_mb", "startup_s"] + (GPU_COLUMNS if device.type == "cuda" else [])
    return report("loader", rows, args, columns)
