"""Throughput benchmarking: loaders, the augment stage, the model, the whole training step.

    python bench.py loader --backend torchvision --data DIR --views 2 --size 224 --batch-size 256 --batches 20
    python bench.py loader --compare torchvision,dali,ffcv --data DIR ...     # side by side, ratios to the first
    python bench.py augment --recipe mscn --batch-size 256 --size 224 --device cpu
    python bench.py train --compare torchvision,dali,ffcv --set data=DIR arch=resnet18 ...  # vs model-only
    python bench.py model --config configs/demo_fmnist.yaml,configs/fmnist_simmim.yaml --set size=32   # methods side by side
    python bench.py loader ... --sweep workers=1,2 --sweep batch_size=32,64    # one row per combination
    python bench.py readme --results runs/bench --readme README.md   # the numbers table of a `make bench` run

Every mode excludes warm-up batches (and pipeline start-up: worker spawn, numba/DALI compile) from
the rates and reports them separately as startup_s; rates are images/s (an image = all of its
views; views/s in augment mode), with seconds per batch p50/p95, CPU use, peak host RSS and, on
CUDA, peak GPU memory. Each run writes --json (default runs/bench/<mode>.json), a markdown table
next to it (.md, also printed) and a bar chart (.png). `ratio` is a row's rate over the first row's:
goals are ratios measured side by side in one run, since these machines are shared and noisy.
Loader mode: `ratio_tv2` is the rate over backend torchvision-v2's (the plain ImageFolder +
transforms.v2 pipeline a user would write), when it is compared; host_cpu_ms is the CPU time of the
whole process and its workers per image over the measured batches, host_cpu_ex_decode_ms the same
minus decode_ms, the decode's share: on the CPU DALI's decode threads' CPU time, measured; for the
others the full PIL decodes an image needs, timed on what the loader decodes: the split's files, or
for FFCV the images its .beton stores (at the converter's --max-res).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml
from tqdm import tqdm

import masksiam  # noqa: F401
from masksiam.config import Config, apply
from masksiam.dist import DEVICE_ENV, DistInfo
from masksiam.errors import ArgumentParser, UsageError, UserError, command
from masksiam.io import atomic_write, atomic_write_text


# ---- measurement helpers ------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine_busy() -> float:
    """CPU seconds the whole machine (every process, and the hypervisor's steal) has been busy."""
    t = psutil.cpu_times()
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


class Meter:
    """Per-batch wall times after warm-up, CPU time of this process and its children, and their peak
    RSS, sampled by a thread from construction on (loader workers come and go between batches).
    On CUDA the peak GPU memory counts from construction too: peak_gpu_mb is torch's allocator,
    peak_gpu_device_mb the device's memory in use (cudaMemGetInfo, sampled by the same thread) above
    what it was at construction: every allocator, DALI's and nvJPEG's pools included (and any other
    process on the GPU). other_cpu_percent is the CPU the rest of the machine used meanwhile: the
    sign of a contended, untrustworthy measurement."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []
        self.proc = psutil.Process()
        self.peak_rss = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()                 # a previous row's cached blocks would hide this one's
            torch.cuda.reset_peak_memory_stats(device)
            self.gpu_used0 = self.peak_gpu_used = self._gpu_used()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self._rss()
            if self.device.type == "cuda":
                self.peak_gpu_used = max(self.peak_gpu_used, self._gpu_used())

    def _gpu_used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

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
        total = t.user + t.system + t.children_user + t.children_system   # + workers already gone
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
        self.cpu0, self.busy0 = self._cpu(), _machine_busy()

    def tick(self) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def result(self, images_per_batch: int) -> dict:
        self._stop.set()
        self._watcher.join()
        self._rss()
        wall = time.perf_counter() - self.t0
        cpu, busy = self._cpu() - self.cpu0, _machine_busy() - self.busy0
        t = np.array(self.times)
        out = {
            "batches": len(t),
            "images_per_s": images_per_batch * len(t) / wall if wall > 0 else float("nan"),
            "s_per_batch_p50": float(np.percentile(t, 50)) if len(t) else float("nan"),
            "s_per_batch_p95": float(np.percentile(t, 95)) if len(t) else float("nan"),
            "cpu_percent": 100.0 * cpu / wall if wall > 0 else float("nan"),
            "other_cpu_percent": max(0.0, 100.0 * (busy - cpu) / wall) if wall > 0 else float("nan"),
            "peak_rss_mb": self.peak_rss / 2**20,
        }
        if self.device.type == "cuda":
            self.peak_gpu_used = max(self.peak_gpu_used, self._gpu_used())
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["peak_gpu_device_mb"] = (self.peak_gpu_used - self.gpu_used0) / 2**20
        return out


GPU_COLUMNS = ["peak_gpu_mb", "peak_gpu_device_mb"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    return torch.device(name)


def _print_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append((f"{v:.2f}" if c in ("ratio", "ratio_tv2", "speedup", "efficiency", "data_wait",
                                              "host_cpu_ms", "host_cpu_ex_decode_ms") else f"{v:,.1f}")
                         if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    return table


def _machine() -> dict:
    """What the numbers were measured on (stored in every JSON; the README block quotes it)."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def _combos(args, allowed: tuple[str, ...] | None = None) -> list[dict]:
    """--sweep KEY=V1,V2 (repeatable) -> the cartesian product, one {key: value} per row group ([{}]
    without sweeps). allowed: the keys a mode can sweep (None: train.py config keys, checked there)."""
    axes = []
    for item in args.sweep:
        key, _, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not key or not values:
            raise UsageError(f"--sweep {item!r}: expected KEY=V1,V2,...")
        if allowed is not None and key not in allowed:
            raise UsageError(f"{args.mode}: --sweep {key}: choose from {', '.join(allowed)}")
        cast = int if allowed is not None else str      # loader/augment keys are ints; train.py parses its own
        try:
            axes.append([(key, cast(v)) for v in values.split(",")])
        except ValueError:
            raise UsageError(f"--sweep {item!r}: {key} takes integers") from None
    return [dict(combo) for combo in itertools.product(*axes)]


def _label(name: str, combo: dict) -> str:
    return " ".join([name, *(f"{k}={v}" for k, v in combo.items())])


# ---- loader mode --------------------------------------------------------------------------------

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
            _sync(device)
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
    device = _device(args.device)
    backends = args.compare.split(",") if args.compare else [args.backend]
    decode_ms = _folder_decode_ms(args.data, args.split)
    rows = []
    for combo in _combos(args, LOADER_SWEEPS):
        run = argparse.Namespace(**{**vars(args), **combo})
        measured = {b: [] for b in backends}
        # repeats alternate the order (A B C, C B A, ...): a drift in the machine's speed during the
        # run then weighs on every backend alike instead of on the last one
        for r in range(args.repeats):
            for backend in (backends if r % 2 == 0 else backends[::-1]):
                print(f"[bench loader] {_label(backend, combo)} ({r + 1}/{args.repeats}): {run.warmup} warm-up + "
                      f"{run.batches} batches of {run.batch_size} x {run.views} views @ {run.size}px, "
                      f"{run.workers} workers", flush=True)
                measured[backend].append(bench_loader(backend, run, device))
        group = {b: {"label": _label(b, {**combo, **({"crops": args.crops} if args.crops else {})}),
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
    return _report("loader", rows, args, columns)


# ---- augment mode -------------------------------------------------------------------------------

class _PerSampleReference:
    """A recipe done image by image on the CPU, the way a torchvision pipeline does it: the baseline
    the batched stage is measured against. Colour jitter, grayscale, blur, solarize and normalise are
    torchvision.transforms.v2 (uint8 -> float32 [0, 1] first, as the batched stage); the high-pass
    filter (x - v2 gaussian_blur), MSCN masks with their fills, MixMask / Un-Mix and SimMIM masks,
    which torchvision lacks, are the same algorithms written per image with torch ops."""

    def __init__(self, recipe, size: int):
        from torchvision.transforms import v2
        from pipelines.augment import ops as A
        self.recipe, self.size = recipe, size
        scale = size / recipe.ref_size
        self.branches = []
        for b in recipe.branches:
            ops = [v2.ToDtype(torch.float32, scale=True)]
            if b.flip:
                ops.append(v2.RandomHorizontalFlip(b.flip))
            if b.color:
                c = b.color
                ops.append(v2.RandomApply([v2.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)], p=c.p))
            if b.grayscale:
                ops.append(v2.RandomGrayscale(b.grayscale))
            if b.blur:
                k = A.blur_kernel_size(size, b.blur.kernel)
                sigma = (b.blur.sigma[0] * scale, b.blur.sigma[1] * scale)
                ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma)], p=b.blur.p))
            if b.solarize:
                ops.append(v2.RandomSolarize(b.solarize.threshold, b.solarize.p))
            if b.highpass:
                sigma = sum(b.highpass.sigma) / 2 * scale
                k = A.highpass_kernel_size(sigma, size)
                ops.append(v2.Lambda(lambda x, k=k, s=sigma: x - v2.functional.gaussian_blur(x, [k, k], [s, s])))
                ops.append(v2.Normalize([0.0] * 3, list(recipe.std)))
            else:
                ops.append(v2.Normalize(list(recipe.mean), list(recipe.std)))
            self.branches.append((b, v2.Compose(ops)))

    def _mscn_mask(self, m) -> torch.Tensor:
        """One MSCN mask (3, H, W) bool for one image."""
        import math
        import random
        size, g = self.size, random.choice(m.grid)
        if random.random() < m.focal:
            s = min(g, max(1, round(random.uniform(*m.focal_side) * g)))
            top, left = random.randint(0, g - s), random.randint(0, g - s)
            cells = torch.ones(1, g, g, dtype=torch.bool)
            cells[:, top:top + s, left:left + s] = False
        else:
            k = math.floor(random.uniform(*m.ratio) * g * g + random.random())
            chans = 3 if random.random() < m.channelwise else 1
            cells = torch.rand(chans, g * g).argsort(1).argsort(1).lt(k).view(chans, g, g)
        up = torch.nn.functional.interpolate(cells[None].float(), size=(size, size), mode="nearest")[0]
        return up.bool().expand(3, size, size)

    def _fill(self, x: torch.Tensor, mask: torch.Tensor, m) -> torch.Tensor:
        if m.fill == "zero":
            return x.masked_fill(mask, 0.0)
        if m.fill == "mean":
            return torch.where(mask, x.mean((1, 2), keepdim=True), x)
        return torch.where(mask, torch.randn_like(x) * m.noise_std, x)

    def __call__(self, views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """views: V x (N, 3, H, W) uint8 on the CPU -> per image, its output views (+ the mixed view)."""
        import math
        import random
        r, n = self.recipe, views[0].shape[0]
        out = []
        for i in range(n):
            images = []
            for b, transform in self.branches:
                base = transform(views[b.source][i].contiguous())
                for _ in range(b.copies):
                    if b.mask and random.random() < b.mask.p:
                        images.append(self._fill(base, self._mscn_mask(b.mask), b.mask))
                    else:
                        images.append(base)
            if r.simmim:
                side = self.size // r.simmim.patch
                count = math.ceil(r.simmim.ratio * side * side)
                images.append(torch.randperm(side * side).lt(count).view(side, side))   # one mask
            out.append(images)
        if r.mix:
            from pipelines.augment import mixing
            src, m = sum(b.copies for b in r.branches[:r.mix.branch]), r.mix
            for i in range(n):
                x, x_rev = out[i][src], out[n - 1 - i][src]
                if m.kind == "mixmask":
                    cells = mixing.block_cells(1, m.grid, m.ratio, None, "cpu", m.min_cells, m.aspect, m.rects)
                    mask = torch.nn.functional.interpolate(cells.float(), size=x.shape[-2:], mode="nearest")[0]
                    out[i].append(torch.where(mask.bool(), x_rev, x))
                elif random.random() < m.mixup_p:
                    lam = float(torch.distributions.Beta(m.beta, m.beta).sample())
                    out[i].append(lam * x + (1 - lam) * x_rev)
                else:
                    lam = float(torch.distributions.Beta(m.beta, m.beta).sample())
                    (box,), _ = mixing.cutmix_boxes(torch.tensor([lam]), self.size, self.size, None)
                    y = x.clone()
                    y[:, box[0]:box[1], box[2]:box[3]] = x_rev[:, box[0]:box[1], box[2]:box[3]]
                    out[i].append(y)
        return out


def _bench_images(sources: int, n: int, size: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random uint8 images (bilinear upsampling of 16 x 16 noise), channels-last on the device:
    photo-like statistics (gray and saturated regions, edges) without reading files."""
    g = torch.Generator().manual_seed(seed)
    views = []
    for _ in range(sources):
        low = torch.rand(n, 3, 16, 16, generator=g)
        x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        x = (x * 255).round().to(torch.uint8).contiguous(memory_format=torch.channels_last)
        views.append(x.to(device))
    return views


def _augment_profile(aug, views, device: torch.device) -> list[dict]:
    """Time per stage (the augment.* ranges of pipelines/augment/recipes.py) and the top ops, one batch."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        aug(views)
        _sync(device)
    rows = []
    for e in prof.key_averages():
        cuda_us = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        rows.append({"name": e.key, "calls": e.count, "cpu_ms": e.cpu_time_total / 1e3,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3, "device_ms": cuda_us / 1e3})
    stages = sorted((r for r in rows if r["name"].startswith("augment.")), key=lambda r: -r["cpu_ms"])
    ops = sorted((r for r in rows if not r["name"].startswith("augment.")),
                 key=lambda r: -(r["device_ms"] or r["self_cpu_ms"]))[:12]
    print("stages (inclusive time of one batch):")
    _print_table(stages, ["name", "calls", "cpu_ms", "device_ms"])
    print("top ops (self time):")
    _print_table(ops, ["name", "calls", "self_cpu_ms", "device_ms"])
    return stages + ops


def _augment_gpu_bytes(aug, views, device: torch.device) -> int:
    """Peak memory one augment call allocates above what was allocated before it (the input batch,
    the stage's cached constants): its working buffers and outputs."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = aug(views)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - before


def bench_augment(recipe: str, args, device: torch.device) -> dict:
    from pipelines.augment.engine import build_augmenter
    if args.threads:
        torch.set_num_threads(args.threads)        # before the build: the CPU chunk pool takes its size
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t_build = time.perf_counter()
    aug = build_augmenter(recipe, size=args.size, device=device, dtype=dtype, seed=0, chunk=args.chunk or None,
                          compile=args.compile)
    t_build = time.perf_counter() - t_build
    views = _bench_images(aug.sources, args.batch_size, args.size, device)
    ref_n = min(args.reference_images, args.batch_size)
    ref = _PerSampleReference(aug.recipe, args.size) if ref_n > 0 else None
    ref_views = [v[:ref_n].cpu() for v in views]
    t0 = time.perf_counter()
    out = aug(views)                                                # includes torch.compile, if asked
    _sync(device)
    first_call = time.perf_counter() - t0
    per_image = len(out.views) + (out.mixed is not None)            # views produced per input image
    del out
    for _ in range(max(0, args.warmup - 1)):
        aug(views)
    if ref is not None:
        ref(ref_views)
    _sync(device)
    startup = t_build + time.perf_counter() - t0                    # build, compile, warm-up batches
    gpu_bytes = _augment_gpu_bytes(aug, views, device) if device.type == "cuda" else None
    # batched and per-sample batches alternate, so load changes on a shared machine hit both alike
    t_batched, t_ref = [], []
    meter = Meter(device)                                           # CPU, memory, the machine's load
    meter.start()
    for _ in tqdm(range(args.batches), desc=recipe, file=sys.stderr, unit="batch", leave=False):
        _sync(device)
        t0 = time.perf_counter()
        aug(views)
        _sync(device)
        t_batched.append(time.perf_counter() - t0)
        if ref is not None:
            t0 = time.perf_counter()
            ref(ref_views)
            t_ref.append(time.perf_counter() - t0)
    res = {"recipe": recipe, "device": str(device), "dtype": args.dtype, "batch_size": args.batch_size,
           "size": args.size, "views_per_image": per_image, "threads": torch.get_num_threads(),
           "chunk": aug.chunk, "compile": args.compile, "startup_s": startup, "first_call_s": first_call,
           "batches": args.batches, "views_per_s": per_image * args.batch_size * len(t_batched) / sum(t_batched),
           "s_per_batch_p50": float(np.percentile(t_batched, 50))}
    res.update({k: v for k, v in meter.result(0).items()
                if k in ("cpu_percent", "other_cpu_percent", "peak_rss_mb", "peak_gpu_mb")})
    if ref is not None:
        res.update(reference_images=ref_n,
                   reference_views_per_s=per_image * ref_n * len(t_ref) / sum(t_ref))
        res["speedup"] = res["views_per_s"] / res["reference_views_per_s"]
    if gpu_bytes is not None:                                       # peak_gpu_mb: of the timed batches
        res["augment_gpu_mb_per_image"] = gpu_bytes / args.batch_size / 2**20
    if args.bytes:                                                  # computed from the ops, not timed
        from pipelines.augment.fused import bytes_per_view
        res["mb_per_view"] = bytes_per_view(aug, views) / 1e6
    if args.profile:
        res["profile"] = _augment_profile(aug, views, device)
    return res


AUGMENT_SWEEPS = ("threads", "batch_size", "size", "chunk")


def cmd_augment(args) -> dict:
    device = _device(args.device)
    rows = []
    for combo in _combos(args, AUGMENT_SWEEPS):
        run = argparse.Namespace(**{**vars(args), **combo})
        for recipe in args.recipe.split(","):
            print(f"[bench augment] {_label(recipe, combo)}: {run.warmup} warm-up + {run.batches} batches of "
                  f"{run.batch_size} @ {run.size}px on {device} ({run.threads or torch.get_num_threads()} threads), "
                  f"per-sample torchvision v2 reference on {min(run.reference_images, run.batch_size)} images "
                  f"per batch", flush=True)
            rows.append({"label": _label(recipe, combo), **bench_augment(recipe, run, device)})
    columns = ["label", "views_per_image", "views_per_s", "ratio", "reference_views_per_s", "speedup",
               "s_per_batch_p50", "mb_per_view", "startup_s", "threads", "chunk", "other_cpu_percent"]
    if device.type == "cuda":
        columns += ["augment_gpu_mb_per_image", "peak_gpu_mb"]
    return _report("augment", rows, args, columns, rate="views_per_s")


# ---- model and train modes: the real training loop, end to end or on synthetic data ------------

def _overrides(args) -> list[str]:
    """The train.py overrides of a bench run: its own out_dir, no checkpoints, no final kNN."""
    return [f"out_dir={args.out_dir}", "run_name=bench", f"max_steps={args.warmup + args.batches}",
            f"log_every={args.warmup}", "final_eval=false", "ckpt_every=0", "knn_every=0",
            "progress=false", "resume=false", *args.set]


def bench_loop(label: str, overrides: list[str], args, device: torch.device) -> dict:
    """Run train.py for warmup + batches steps; rates from its metrics after the warm-up interval.
    overrides come last: a row's loader and sweep values win over --set."""
    import shutil
    import train
    run_dir = Path(args.out_dir) / "bench"
    shutil.rmtree(run_dir, ignore_errors=True)
    meter = Meter(device)
    meter.start()
    argv = (["--config", args.config] if args.config else []) + _overrides(args) + overrides
    saved = os.environ.get(DEVICE_ENV)
    os.environ[DEVICE_ENV] = device.type           # train.py trains on the row's device (--device cpu on a GPU host)
    try:
        result = train.main(argv)
    finally:
        if saved is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = saved
    wall = time.perf_counter() - meter.t0
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "images_per_s" in r]
    # intervals after the warm-up (logged every --warmup steps and at epoch ends): (record, steps in it)
    rows = [(r, r["step"] - prev["step"]) for prev, r in zip([{"step": 0}] + logged, logged)
            if prev["step"] >= args.warmup]
    if not rows:
        raise UsageError(f"the {label} run logged nothing after its {args.warmup} warm-up steps: raise --batches")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    seconds = [cfg["batch_size"] * n / r["images_per_s"] for r, n in rows]
    per_step = [t / n for t, (_, n) in zip(seconds, rows)]
    steps = sum(n for _, n in rows)
    res = meter.result(cfg["batch_size"])  # CPU and memory over the whole run
    res.pop("batches")
    res.update(
        label=label, steps=steps, images_per_s=cfg["batch_size"] * steps / sum(seconds),
        s_per_batch_p50=float(np.percentile(per_step, 50)), s_per_batch_p95=float(np.percentile(per_step, 95)),
        data_wait=sum(r["data_wait"] * t for (r, _), t in zip(rows, seconds)) / sum(seconds),
        startup_s=wall - sum(seconds),        # model build, loader start-up, the warm-up steps
        loader=cfg["loader"], recipe=cfg["recipe"], arch=cfg["arch"], width=cfg["width"],
        batch_size=cfg["batch_size"], size=cfg["size"], views=cfg["views"], workers=cfg["workers"],
        device=str(device), exit=result["exit"])
    for key in (k.split("=", 1)[0] for k in overrides):
        res.setdefault(key, cfg.get(key))     # swept keys beyond the ones above
    print(f"[bench {args.mode}] {label}: {res['images_per_s']:,.1f} images/s, data wait {res['data_wait']:.0%}, "
          f"start-up {res['startup_s']:.1f} s", flush=True)
    return res


def model_only_recipe(recipe, mix: str | None) -> dict:
    """The model-only twin of a recipe (a name, path or Recipe; `mix` the config's): its views
    (branches' sources, copies, local), pairs, normalisation, mixing and SimMIM masks, without any
    per-pixel op (colour, blur, high-pass, masks, flips). The network then sees the same number and
    sizes of inputs as the recipe's run (mscn: 3 views, mixmask: 2 + the mixed one) and the method
    computes the same loss terms: like for like. A recipe yaml (dict)."""
    import dataclasses
    from pipelines.augment.recipes import Recipe, load_recipe, with_mix
    r = with_mix(recipe if isinstance(recipe, Recipe) else load_recipe(recipe), mix)

    def plain(value):                                  # tuples -> lists, for yaml
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value
    out = {"description": f"model-only twin of {r.name}: its views, pairs, mixing and SimMIM masks, "
                          f"normalise only (bench.py)",
           "ref_size": r.ref_size, "normalize": {"mean": list(r.mean), "std": list(r.std)},
           "branches": [{"source": b.source, "copies": b.copies, "local": b.local} for b in r.branches],
           "pairs": plain(r.pairs)}
    for key in ("mix", "simmim"):
        spec = getattr(r, key)
        if spec is not None:
            out[key] = {k: plain(v) for k, v in dataclasses.asdict(spec).items()}
    return out


def model_only_overrides(args, sweep: list[str]) -> list[str]:
    """train.py overrides of the model-only ceiling of a config (with --set and the sweep values):
    synthetic uint8 batches already on the device, and the config's recipe's model-only twin
    (model_only_recipe), written next to the run."""
    from masksiam.config import load_config
    cfg = load_config(args.config, [*args.set, *sweep])
    twin = model_only_recipe(cfg.recipe, cfg.mix)
    path = Path(args.out_dir) / f"model-only-{Path(cfg.recipe).stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(twin, sort_keys=False))
    return ["loader=synthetic", f"recipe={path}", "mix=none"]


def cmd_model(args) -> dict:
    """--config A.yaml,B.yaml: one row group per config (methods side by side, ratios to the first)."""
    device = _device(args.device)
    rows = []
    configs = args.config.split(",") if args.config else [None]
    for config in configs:
        one = argparse.Namespace(**{**vars(args), "config": config})
        name = "model-only" + (f" {Path(config).stem}" if len(configs) > 1 else "")
        for combo in _combos(args):
            sweep = [f"{k}={v}" for k, v in combo.items()]
            rows.append(bench_loop(_label(name, combo), sweep + model_only_overrides(one, sweep), one, device))
    columns = ["label", "arch", "batch_size", "images_per_s", "ratio", "s_per_batch_p50", "s_per_batch_p95",
               "startup_s", "other_cpu_percent", "peak_rss_mb"] + (GPU_COLUMNS if device.type == "cuda" else [])
    return _report("model", rows, args, columns)


def cmd_train(args) -> dict:
    """End to end per loader backend, and model-only on the same config: efficiency = their ratio
    (per sweep combination: the ceiling moves with the batch size)."""
    device = _device(args.device)
    rows = []
    for combo in _combos(args):
        sweep = [f"{k}={v}" for k, v in combo.items()]
        model = bench_loop(_label("model-only", combo), sweep + model_only_overrides(args, sweep), args, device)
        for backend in (args.compare.split(",") if args.compare else [None]):
            label = _label(f"end-to-end ({backend})" if backend else "end-to-end", combo)
            row = bench_loop(label, sweep + ([f"loader={backend}"] if backend else []), args, device)
            row["efficiency"] = row["images_per_s"] / model["images_per_s"]
            rows.append(row)
        model["efficiency"] = 1.0
        rows.append(model)
    columns = ["label", "recipe", "images_per_s", "ratio", "efficiency", "data_wait", "s_per_batch_p50",
               "s_per_batch_p95", "startup_s", "cpu_percent", "other_cpu_percent", "peak_rss_mb"]
    return _report("train", rows, args, columns + (GPU_COLUMNS if device.type == "cuda" else []))


# ---- patching train.py for a run: sync guards (syncs), artificial delays (explain) ---------------

@contextlib.contextmanager
def _train_patched(**wrappers):
    """train.py's module-level names (build_loader, build_augmenter, build_method, train_step)
    replaced by wrapper(original) for one run, restored after."""
    import train
    saved = {name: getattr(train, name) for name in wrappers}
    try:
        for name, wrap in wrappers.items():
            setattr(train, name, wrap(saved[name]))
        yield
    finally:
        for name, value in saved.items():
            setattr(train, name, value)


class _WrappedAugmenter:
    """An augmenter whose calls run through around(fn, *args, **kwargs); attributes are the augmenter's."""

    def __init__(self, aug, around):
        self._aug, self._around = aug, around

    def __call__(self, *args, **kwargs):
        return self._around(self._aug, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._aug, name)


class _DelayedLoader:
    """A loader that sleeps `seconds` before handing out each batch (explain --delay loader=S)."""

    def __init__(self, loader, seconds: float):
        self._loader, self._seconds = loader, seconds

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for batch in self._loader:
            time.sleep(self._seconds)
            yield batch

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _delay_wrappers(delays: dict[str, float], stages=("loader", "augment", "model")) -> dict:
    """_train_patched wrappers that add explain's --delay per batch to the named stages."""
    def sleep_then(seconds):
        def around(fn, *args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return around
    wrappers = {}
    if delays.get("loader") and "loader" in stages:
        wrappers["build_loader"] = lambda build: lambda *a, **k: _DelayedLoader(build(*a, **k), delays["loader"])
    if delays.get("augment") and "augment" in stages:
        wrappers["build_augmenter"] = lambda build: lambda *a, **k: _WrappedAugmenter(build(*a, **k),
                                                                                       sleep_then(delays["augment"]))
    if delays.get("model") and "model" in stages:
        wrappers["train_step"] = lambda step: lambda *a, **k: sleep_then(delays["model"])(step, *a, **k)
    return wrappers


# ---- syncs: the step path free of host syncs ----------------------------------------------------

class HostRead(AssertionError):
    """A tensor's value read on the host inside a guarded region (no_host_reads)."""


@contextlib.contextmanager
def no_host_reads():
    """Inside: every way a tensor's value reaches Python (.item, .cpu, .tolist, .numpy, bool / int /
    float / index of a tensor, bincount, boolean-mask indexing) raises HostRead. On CUDA each is a
    device sync; on the CPU this is how a test sees one (there is no sync-debug mode)."""
    def refuse(name):
        def fn(*args, **kwargs):
            raise HostRead(f"host read in a sync-free region: {name}")
        return fn
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            raise HostRead("host read in a sync-free region: boolean-mask indexing")
        return getitem(self, index)
    patches = {name: refuse(name) for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__",
                                              "__float__", "__index__")}
    patches["__getitem__"] = checked_getitem
    saved = {name: getattr(torch.Tensor, name) for name in patches}
    bincount = torch.bincount
    try:
        for name, fn in patches.items():
            setattr(torch.Tensor, name, fn)
        torch.bincount = refuse("bincount")
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.bincount = bincount


@contextlib.contextmanager
def sync_free(device: torch.device):
    """CUDA: torch's sync-debug mode "error" (any synchronising CUDA call raises); CPU: no_host_reads."""
    if device.type != "cuda":
        with no_host_reads():
            yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def sync_check(argv: list[str], device: torch.device, skip: int = 2) -> dict:
    """train.py `argv` with the per-step path sync-free after `skip` warm-up calls (cudnn autotuning,
    lazy inits): on CUDA the augment stage, the train step (forward, backward, optimizer) and the
    method's after_step hook under sync-debug "error"; on the CPU the train step and the hook under
    no_host_reads (the CPU augmenter reads its host-side plan by design). The loader, logging and
    checkpoints stay outside (they sync at intervals on purpose). -> calls guarded, ok, the error."""
    import traceback
    calls = {"augment": 0, "train_step": 0, "after_step": 0}
    seen = dict.fromkeys(calls, 0)

    def guard(name, fn, *args, **kwargs):
        seen[name] += 1
        if seen[name] <= skip:
            return fn(*args, **kwargs)
        with sync_free(device):
            result = fn(*args, **kwargs)
        calls[name] += 1
        return result

    def guarded_augmenter(build):
        def built(*args, **kwargs):
            aug = build(*args, **kwargs)
            return _WrappedAugmenter(aug, lambda fn, *a, **k: guard("augment", fn, *a, **k)) \
                if device.type == "cuda" else aug
        return built

    def guarded_method(build):
        def built(*args, **kwargs):
            method = build(*args, **kwargs)
            hook = method.after_step
            method.after_step = lambda *a, **k: guard("after_step", hook, *a, **k)
            return method
        return built
    wrappers = dict(build_augmenter=guarded_augmenter, build_method=guarded_method,
                    train_step=lambda step: lambda *a, **k: guard("train_step", step, *a, **k))
    saved = os.environ.get(DEVICE_ENV)
    os.environ[DEVICE_ENV] = device.type
    error, where = None, []
    try:
        import train
        with _train_patched(**wrappers):
            train.main(argv)
    except (HostRead, RuntimeError) as err:       # sync-debug "error" raises RuntimeError
        error = f"{type(err).__name__}: {err}".strip()
        root = str(Path(__file__).resolve().parent)
        where = [f"{Path(f.filename).relative_to(root)}:{f.lineno} {f.name}" for f in traceback.extract_tb(err.__traceback__)
                 if f.filename.startswith(root) and "/.venv/" not in f.filename and f.filename != __file__][-4:]
    finally:
        if saved is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = saved
    return {"device": str(device), "guard": "sync-debug error" if device.type == "cuda" else "no_host_reads",
            "guarded_calls": calls, "ok": error is None and calls["train_step"] > 0, "error": error, "where": where}


def cmd_syncs(args) -> dict:
    device = _device(args.device)
    argv = (["--config", args.config] if args.config else []) + [
        f"out_dir={args.out_dir}", "run_name=syncs", f"max_steps={args.skip + args.steps}",
        f"log_every={args.skip + args.steps}", "final_eval=false", "ckpt_every=0", "knn_every=0",
        "progress=false", "resume=false", *args.set]
    import shutil
    shutil.rmtree(Path(args.out_dir) / "syncs", ignore_errors=True)
    res = {"label": "sync-free step path", **sync_check(argv, device, args.skip), "steps": args.steps}
    line = (f"sync check on {device} ({res['guard']}): " + ("no host sync in " if res["ok"] else "FAILED in ")
            + ", ".join(f"{n} {k} calls" for k, n in res["guarded_calls"].items())
            + (f": {res['error']} at {' <- '.join(reversed(res['where']))}" if res["error"] else ""))
    print(line, flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"mode": "syncs", "machine": _machine(), "args": {k: v for k, v in vars(args).items()
                                                                               if k != "run"},
                               "results": [res], "table": line}, indent=2) + "\n")
    if not res["ok"] and args.strict:
        raise UserError(f"syncs: {line}")
    return res


# ---- explain: which stage bounds a run ----------------------------------------------------------

EXPLAIN_STAGES = ("read", "decode", "loader", "host-to-device", "augment", "model", "end-to-end")
PIPELINE = ("loader", "host-to-device", "augment", "model")   # what one batch goes through, in order
EXPLAIN_DELAYS = ("loader", "augment", "model")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _measure(name: str, images: int, fn, device: torch.device, **extra) -> dict:
    """Run fn() once; its images/s and the CPU cores it kept busy (this process and its children)."""
    meter = Meter(device)
    meter.start()
    fn()
    _sync(device)
    wall = time.perf_counter() - meter.t0
    res = meter.result(0)
    return {"stage": name, "images": images, "seconds": wall, "images_per_s": images / wall if wall > 0 else None,
            "cores": res["cpu_percent"] / 100, "other_cpu_percent": res["other_cpu_percent"], **extra}


def _split_files(cfg) -> list[Path]:
    root = Path(cfg.data) / cfg.train_split
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []


def _explain_stages(args, cfg, device: torch.device, delays: dict[str, float]) -> list[dict]:
    """Each stage alone on the config's data and settings (args.batches batches after args.warmup),
    then model-only and end to end through train.py."""
    from PIL import Image
    from pipelines.augment.engine import build_augmenter
    from pipelines.loaders import build_loader
    n_images = cfg.batch_size * args.batches
    stages = []
    files = _split_files(cfg)
    if files:
        files = (files * (n_images // len(files) + 1))[:n_images]
        blobs = []
        stages.append(_measure("read", len(files), lambda: blobs.extend(f.read_bytes() for f in files), device,
                               note="bytes from disk, one thread (the page cache may hold them)"))
        stages[-1]["bytes_per_image"] = sum(map(len, blobs)) / len(blobs)

        def decode():
            for blob in blobs:
                Image.open(io.BytesIO(blob)).convert("RGB")
        stages.append(_measure("decode", len(blobs), decode, device, note="full PIL decode to RGB, one thread"))
        del blobs
    else:
        for name in ("read", "decode"):
            stages.append({"stage": name, "images_per_s": None, "note": f"no image files under {cfg.data}/"
                                                                          f"{cfg.train_split} (a .beton or shards)"})

    info = DistInfo(0, 1, 0, device)
    loader = build_loader(cfg, info)

    def batches(count):
        epoch, done = 0, 0
        while done < count:
            loader.set_epoch(epoch)
            for _ in loader:
                time.sleep(delays.get("loader", 0.0))
                done += 1
                if done == count:
                    return
            epoch += 1
    batches(args.warmup)
    stages.append(_measure("loader", n_images, lambda: batches(args.batches), device,
                           note=f"loader={cfg.loader}, {cfg.workers} workers: read + decode + crop"
                                + (", and the copy to the device" if device.type == "cuda" else "")))
    del loader

    aug = build_augmenter(cfg.recipe, size=cfg.size, device=device, seed=cfg.seed, mix=cfg.mix,
                          dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    host = _bench_images(aug.sources, cfg.batch_size, cfg.size, torch.device("cpu"))
    if device.type == "cuda":
        host = [v.pin_memory() for v in host]

        def copy():
            for _ in range(args.batches):
                [v.to(device, non_blocking=True) for v in host]
        copy()
        stages.append(_measure("host-to-device", n_images, copy, device,
                               note=f"pinned uint8 views, {sum(v.numel() for v in host) / cfg.batch_size / 1e3:.0f} "
                                    f"kB per image"))
    else:
        stages.append({"stage": "host-to-device", "images_per_s": None, "note": "none: the run is on the CPU"})
    views = [v.to(device) for v in host]

    def augment(count):
        for _ in range(count):
            time.sleep(delays.get("augment", 0.0))
            aug(views)
    augment(args.warmup)
    stages.append(_measure("augment", n_images, lambda: augment(args.batches), device,
                           note=f"recipe {cfg.recipe} on {device}"))
    del aug, views, host

    loop = argparse.Namespace(out_dir=args.out_dir, config=args.config, set=args.set, warmup=args.warmup,
                              batches=args.batches, mode="explain")
    with _train_patched(**_delay_wrappers(delays, stages=("model",))):
        model = bench_loop("model-only", model_only_overrides(loop, []), loop, device)
    stages.append({"stage": "model", "images_per_s": model["images_per_s"], "cores": model["cpu_percent"] / 100,
                   "other_cpu_percent": model["other_cpu_percent"],
                   "note": f"{cfg.method} {cfg.arch}, synthetic batches on the device, normalise only"})
    with _train_patched(**_delay_wrappers(delays)):
        e2e = bench_loop("end-to-end", [], loop, device)
    stages.append({"stage": "end-to-end", "images_per_s": e2e["images_per_s"], "cores": e2e["cpu_percent"] / 100,
                   "other_cpu_percent": e2e["other_cpu_percent"], "data_wait": e2e["data_wait"],
                   "note": "train.py as configured"})
    return stages


def explain_verdict(stages: list[dict], cores_here: int) -> tuple[str, str]:
    """(the bounding stage, the verdict in words) from the stage table."""
    def n(x: float, unit: str = "") -> str:                 # 1,500 / 68.2 / 0.91: readable at any scale
        return (f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}") + unit
    rate = {s["stage"]: s["images_per_s"] for s in stages}
    by = {s["stage"]: s for s in stages}
    pipeline = [name for name in PIPELINE if rate.get(name)]
    bound = min(pipeline, key=lambda name: rate[name])
    loader, model = rate["loader"], rate["model"]
    loader_cores = max(by["loader"].get("cores") or 0.0, 1e-3)
    words = [f"the loader gives {n(loader)} images/s on {n(loader_cores)} cores, the model takes {n(model)}"]
    if bound == "model":
        words[0] += ": the model bounds this run"
    elif bound == "loader":
        words[0] += ": the loader bounds this run"
        if rate.get("decode"):
            share = loader / rate["decode"] / loader_cores     # decode's share of a loader core's time
            words.append(f"decoding alone takes {min(share, 1):.0%} of the loader's CPU time per image")
    else:
        words[0] += f"; {bound} bounds this run at {n(rate[bound])} images/s"
    per_core = loader / loader_cores
    words.append(f"the model's {n(model)} images/s needs {n(model / per_core)} loader cores at this loader's "
                 f"{n(per_core)} images/s per core ({cores_here} here)")
    e2e = rate.get("end-to-end")
    if e2e:
        words.append(f"end to end runs at {n(e2e)} images/s, {e2e / rate[bound]:.2f} of the bounding stage's "
                     f"rate" + (" (the stages compete for the same cores or device: they do not overlap)"
                                if e2e < 0.8 * rate[bound] else ""))
    return bound, "; ".join(words) + "."


def _waterfall(stages: list[dict], verdict: str, out: Path) -> None:
    """ms per image per stage: read and decode inside the loader; the pipeline's stages end to end as
    if nothing overlapped (their sum), against the measured end to end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ms = {s["stage"]: 1e3 / s["images_per_s"] for s in stages if s.get("images_per_s")}
    rows, left = [], 0.0
    for name in ("read", "decode"):
        if name in ms:
            rows.append((name, 0.0, ms[name], GREY))
    for name in PIPELINE:
        if name in ms:
            rows.append((name, left, ms[name], BLUE))
            left += ms[name]
    rows.append(("sum (no overlap)", 0.0, left, GREY))
    if "end-to-end" in ms:
        rows.append(("end-to-end", 0.0, ms["end-to-end"], "#dd8452"))
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.45 * len(rows)))
    for y, (name, start, width, colour) in enumerate(rows[::-1]):
        ax.barh(y, width, left=start, color=colour)
        ax.text(start + width, y, f" {width:.2f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows[::-1]])
    ax.set(xlabel="ms per image", xlim=(0, max(r[1] + r[2] for r in rows) * 1.25))
    ax.set_title(verdict.split(";")[0], fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def cmd_explain(args) -> dict:
    from masksiam.config import load_config
    device = _device(args.device)
    delays = {}
    for item in args.delay:
        stage, _, seconds = item.partition("=")
        if stage not in EXPLAIN_DELAYS:
            raise UsageError(f"explain: --delay {item!r}: the stage is one of {', '.join(EXPLAIN_DELAYS)}")
        try:
            delays[stage] = float(seconds)
        except ValueError:
            raise UsageError(f"explain: --delay {item!r}: expected STAGE=SECONDS") from None
    cfg = load_config(args.config, args.set)
    stages = _explain_stages(args, cfg, device, delays)
    e2e = next(s["images_per_s"] for s in stages if s["stage"] == "end-to-end")
    for s in stages:
        s["share"] = e2e / s["images_per_s"] if s.get("images_per_s") else None   # of end-to-end time per image
    cores_here = len(os.sched_getaffinity(0))
    bound, verdict = explain_verdict(stages, cores_here)
    columns = ["stage", "images_per_s", "cores", "share", "note"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in stages:
        rate = f"{s['images_per_s']:,.1f}" if s.get("images_per_s") else "-"
        cores = f"{s['cores']:.2f}" if s.get("cores") is not None else "-"
        share = f"{s['share']:.2f}" if s.get("share") is not None else "-"
        lines.append(f"| {s['stage']} | {rate} | {cores} | {share} | {s.get('note', '')} |")
    table = "\n".join(lines)
    print(table)
    print(f"\nverdict: {verdict}")
    payload = {"mode": "explain", "machine": _machine(), "args": {k: v for k, v in vars(args).items() if k != "run"},
               "config": {k: getattr(cfg, k) for k in ("data", "loader", "workers", "recipe", "method", "arch",
                                                        "batch_size", "size", "views")},
               "delays": delays, "stages": stages, "bound": bound, "verdict": verdict, "table": table}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), table + f"\n\n{verdict}\n")
    _waterfall(stages, verdict, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return payload


# ---- reports: JSON, markdown table, chart -------------------------------------------------------

def _report(mode: str, rows: list[dict], args, columns: list[str], rate: str = "images_per_s") -> dict:
    """ratio = rate / the first row's; then --json, the table (.md, and stdout) and the chart (.png)."""
    for r in rows:
        r["ratio"] = r[rate] / rows[0][rate]
    table = _print_table(rows, columns)
    settings = {k: v for k, v in vars(args).items() if k != "run"}
    payload = {"mode": mode, "machine": _machine(), "args": settings, "results": rows, "table": table}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    if mode == "augment":   # batched vs the per-sample reference (grey), per row
        bars = []
        for r in rows:
            bars.append((f"{r['label']} batched", r["views_per_s"],
                         f"x{r['speedup']:.1f} vs per-sample" if "speedup" in r else f"x{r['ratio']:.2f}", BLUE))
            if "reference_views_per_s" in r:
                bars.append((f"{r['label']} per-sample", r["reference_views_per_s"], "", GREY))
    else:                   # train: model-only (grey) is the ceiling the other rows are a fraction of
        bars = [(r["label"], r[rate], f"{r['efficiency']:.2f} of model-only" if "efficiency" in r
                 else f"x{r['ratio']:.2f}", GREY if r.get("loader") == "synthetic" else BLUE) for r in rows]
    _chart(bars, out.with_suffix(".png"), f"bench.py {mode}", "views / s" if mode == "augment" else "images / s")
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return payload


BLUE, GREY = "#4c72b0", "#a0a0a0"


def _chart(bars: list[tuple[str, float, str, str]], out: Path, title: str, unit: str) -> None:
    """Horizontal bars (label, rate, note, colour), top to bottom in row order, labelled rate and note."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.4 * len(bars)))
    labels, rates, notes, colours = zip(*bars[::-1])
    ax.barh(range(len(bars)), rates, color=colours, tick_label=labels)
    for y, (rate, note) in enumerate(zip(rates, notes)):
        ax.text(rate, y, f" {rate:,.0f}/s  {note}", va="center", fontsize=8)
    ax.set(xlabel=unit, title=title, xlim=(0, max(rates) * 1.4))
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ---- readme: the numbers table of a `make bench` run ---------------------------------------------

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def readme_block(runs: dict[str, dict], results: str) -> str:
    """The markdown between the README markers from the JSON payloads of one run (mode -> payload);
    `results` is its folder (one written by tools/gpu_check.sh holds gpu_check.json)."""
    m = next(iter(runs.values()))["machine"]
    where = f"{m['cpu']} ({m['cores']} cores)" + (f", {m['gpu']}" if m["gpu"] else "")
    other = max(r.get("other_cpu_percent", 0.0) for run in runs.values() for r in run["results"])
    check = Path(results) / "gpu_check.json"
    by = "`make bench` (tools/bench.sh)"
    if check.exists():
        by = "tools/gpu_check.sh" + (" --dry-run (tiny sizes on the CPU: not a measurement)"
                                     if json.loads(check.read_text()).get("dry_run") else "")
    lines = [f"Measured by {by} on {m['date']}: {where}, torch {m['torch']}. "
             "Rates exclude warm-up batches and start-up (worker spawn, numba compile, DALI pipeline "
             f"build); ratios compare rows measured side by side in one run. Other processes used at "
             f"most {other:.0f}% of a core during a row" + (" (a contended run: rerun on an idle machine)"
                                                              if other > 25 else "")
             + f". Full tables and charts: `{results}/*.md`, `*.png`.", "",
             "| measured | setting | rate | ratio |", "|---|---|---|---|"]
    for r in runs.get("loader", {}).get("results", []):
        views = f"crops {r['crops']}" if r.get("crops") else f"{r['views']} views x {r['size']} px"
        lines.append(f"| loader: {r['label']} | {views}, batch {r['batch_size']}, "
                     f"{r['workers']} workers, {r['device']} | {r['images_per_s']:,.0f} images/s, host CPU "
                     f"{r['host_cpu_ms']:.2f} ms/image ({r['host_cpu_ex_decode_ms']:.2f} ex decode) | "
                     f"x{r['ratio']:.2f}" + (f", x{r['ratio_tv2']:.2f} vs {BASELINE}" if "ratio_tv2" in r else "")
                     + " |")
    for r in runs.get("augment", {}).get("results", []):
        ref = (f" vs {r['reference_views_per_s']:,.0f} per sample (torchvision v2)"
               if "reference_views_per_s" in r else "")
        lines.append(f"| augment: {r['label']} batched vs per-sample | batch {r['batch_size']} x {r['size']} px, "
                     f"{r['device']}, {r['threads']} threads | {r['views_per_s']:,.0f} views/s{ref} | "
                     + (f"x{r['speedup']:.1f} speed-up |" if "speedup" in r else "|"))
    for mode in ("train", "model"):
        for r in runs.get(mode, {}).get("results", []):
            what = "synthetic batches on the device, normalise only" if r["loader"] == "synthetic" \
                else f"recipe {r['recipe']}, {r['workers']} workers"
            eff = f"{r['efficiency']:.2f} of model-only" if "efficiency" in r else f"x{r['ratio']:.2f}"
            lines.append(f"| train: {r['label']} | {r['arch']} width {r['width']}, {r['size']} px, batch "
                         f"{r['batch_size']}, {what} | {r['images_per_s']:,.1f} images/s | {eff} |")
    return "\n".join(lines)


def cmd_readme(args) -> dict:
    blocks, found = [], []                 # one block per results folder (make bench, then gpu_check)
    for folder in args.results.split(","):
        runs = {mode: json.loads(p.read_text()) for mode in ("loader", "augment", "train", "model")
                if (p := Path(folder) / f"{mode}.json").exists()}
        if not runs:
            raise UserError(f"readme: no loader/augment/train/model .json in {folder}")
        blocks.append(readme_block(runs, folder))
        found += [f"{folder}/{m}.json" for m in runs]
    block = "\n\n".join(blocks)
    readme = Path(args.readme)
    text = readme.read_text() if readme.exists() else ""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        print(block)
        print(f"bench.py readme: {readme} has no {BEGIN} ... {END} block; the table is above, "
              f"put the markers where it belongs and run again", file=sys.stderr)
        return {"block": block, "written": False}
    atomic_write_text(readme, text[:start + len(BEGIN)] + "\n" + block + "\n" + text[end:])
    print(f"wrote the bench block of {readme} from {', '.join(found)}")
    return {"block": block, "written": True}


# ---- command line -------------------------------------------------------------------------------

# what each mode measures: `bench.py MODE --help`
DESCRIPTIONS = {
    "loader": """Images/s of a loader backend alone (or of several side by side, --compare): decode,
crops and flips of the training split into uint8 batches on --device, no augment stage, no model.
Rows: images/s, ratio to the first row (ratio_tv2: to the plain torchvision-v2 pipeline), seconds
per batch p50 / p95, CPU use, host_cpu_ms (CPU ms per image of the process and its workers) and
host_cpu_ex_decode_ms (the same minus decode_ms: the full decodes an image costs, timed on what the
backend decodes: the split's files, the .beton's stored images for FFCV, DALI's threads on CPU),
peak host RSS, start-up seconds; on CUDA peak GPU memory.""",
    "augment": """Views/s of an augment recipe's batched stage on --device, on random uint8 crops (no
loader, no model), against the same recipe applied per sample with torchvision.transforms.v2
(speedup); memory traffic per view (mb_per_view, computed from the ops), optional profile.""",
    "model": """The training step alone on synthetic uint8 batches already on the device: forward,
loss, backward and optimizer step of the config's method, its augment stage replaced by its
model-only twin. The ceiling a loader has to feed; --config A,B side by side.""",
    "train": """train.py's real loop end to end on the config, one row per loader (--compare), beside
the model-only ceiling of the same config (model mode): efficiency = end to end / ceiling.""",
    "explain": """Each stage of the pipeline alone on your config (read, decode, loader, augment,
model), then end to end: which stage bounds the run, in words and as a waterfall of ms per image.""",
    "syncs": """A few train.py steps with the step path guarded against host-device syncs (CUDA:
sync-debug mode raises; CPU: host reads of tensors are refused): names the first sync, or says
none. --strict exits 1 when one is found.""",
    "readme": f"""Rewrite the {BEGIN} ... {END} block of README.md from a bench run's JSON files
(loader, augment, train, model): only that block changes.""",
}

def _run_args(p, config_help: str = "a train.py config (configs/*.yaml)") -> None:
    """The arguments of the modes that run train.py's own pieces on a config: --config, --set,
    --out-dir, --device."""
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides")
    p.add_argument("--out-dir", default="runs/bench-tmp")
    p.add_argument("--device", default="auto")


@command("bench.py")
def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="bench.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sweep_help = "KEY=V1,V2: one row (group) per value; repeat for the cartesian product"

    def mode(name: str, help_text: str):
        return sub.add_parser(name, help=help_text, description=DESCRIPTIONS[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = mode("loader", "images/s of a loader backend (or several, side by side)")
    p.add_argument("--backend", default="torchvision", choices=list(LOADER_BACKENDS))
    p.add_argument("--compare", default="", help="comma-separated backends, ratios to the first")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--ffcv-path", default="", help="the .beton for ffcv (default DATA/SPLIT.beton)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--crops", default="", help="multi-crop views, e.g. 2x224@0.14-1,6x96@0.05-0.14 "
                   "(the config's crops=; replaces --views/--size)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--sweep", action="append", default=[], help=f"{sweep_help} ({', '.join(LOADER_SWEEPS)})")
    p.add_argument("--repeats", type=int, default=1, help="measure every backend this many times, "
                   "alternating the order; rows average them")
    p.add_argument("--json", default="runs/bench/loader.json", help="also writes .md and .png next to it")
    p.set_defaults(run=cmd_loader)

    p = mode("augment", "views/s of an augment recipe vs per-sample torchvision v2")
    p.add_argument("--recipe", default="mscn", help="a recipe name or yaml path; comma-separated for several")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="output dtype")
    p.add_argument("--reference-images", type=int, default=32,
                   help="images per batch for the per-sample torchvision reference (0 = skip it)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--chunk", type=int, default=0,
                   help="rows per chunk (0 = the default: cache-sized on CPU, ~16 MiB on GPUs, compiled GPUs the batch)")
    p.add_argument("--compile", action="store_true",
                   help="each recipe branch as one torch.compile'd function (pipelines/augment/fused.py)")
    p.add_argument("--no-bytes", dest="bytes", action="store_false",
                   help="skip mb_per_view, the memory traffic per output view computed from the ops "
                        "(with --compile it compiles the branches once more, caches off)")
    p.add_argument("--profile", action="store_true", help="also profile one batch: time per stage, top ops")
    p.add_argument("--sweep", action="append", default=[], help=f"{sweep_help} ({', '.join(AUGMENT_SWEEPS)})")
    p.add_argument("--json", default="runs/bench/augment.json", help="also writes .md and .png next to it")
    p.set_defaults(run=cmd_augment)

    for name, run, help_text in (("model", cmd_model, "the training step on synthetic data on the device: the ceiling"),
                                 ("train", cmd_train, "the real loop end to end, per loader, vs model-only")):
        p = mode(name, help_text)
        _run_args(p, "a train.py config (configs/*.yaml); model mode: comma-separated for several, side by side")
        p.add_argument("--compare", default="", help="train mode: comma-separated loaders, end to end each")
        p.add_argument("--batches", type=int, default=20, help="measured steps (a multiple of --warmup)")
        p.add_argument("--warmup", type=int, default=5, help="steps excluded, also the logging interval")
        p.add_argument("--sweep", action="append", default=[],
                       help=f"{sweep_help} (train.py config keys: batch_size, workers, ...)")
        p.add_argument("--json", default=f"runs/bench/{name}.json", help="also writes .md and .png next to it")
        p.set_defaults(run=run)

    p = mode("explain", "each stage alone, then together, on your config: which one bounds the run")
    _run_args(p)
    p.add_argument("--batches", type=int, default=20, help="measured batches per stage (a multiple of --warmup)")
    p.add_argument("--warmup", type=int, default=5, help="batches excluded per stage")
    p.add_argument("--delay", action="append", default=[], metavar="STAGE=SECONDS",
                   help=f"sleep this long per batch in one stage ({', '.join(EXPLAIN_DELAYS)}): to see the "
                        f"verdict move, and for tests")
    p.add_argument("--json", default="runs/bench/explain.json", help="also writes .md and .png (the waterfall)")
    p.set_defaults(run=cmd_explain)

    p = mode("syncs", "a few train.py steps with the step path sync-free (CUDA: sync-debug error; CPU: "
                      "host reads refused): names the first host sync")
    _run_args(p)
    p.add_argument("--steps", type=int, default=4, help="guarded steps")
    p.add_argument("--skip", type=int, default=2, help="unguarded warm-up steps first (autotuning, lazy init)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when a sync is found")
    p.add_argument("--json", default="runs/bench/syncs.json")
    p.set_defaults(run=cmd_syncs)

    p = mode("readme", f"rewrite the {BEGIN} block of README.md from a bench run's JSON")
    p.add_argument("--results", default="runs/bench", help="folder of the run's loader/augment/train .json; "
                   "comma-separated for several (e.g. runs/bench,runs/gpu_check: the GPU rows too)")
    p.add_argument("--readme", default="README.md", help="only the marked block changes; never created")
    p.set_defaults(run=cmd_readme)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
