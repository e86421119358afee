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
import yaml

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

class _PerSampleReference:
    """A recipe done image by image on the CPU, the way a torchvision pipeline does it: the baseline
    the batched stage is measured against. Colour jitter, grayscale, blur, solarize and normalise are
    torchvision.transforms.v2 (uint8 -> float32 [0, 1] first, as the batched stage); the high-pass
    filter (x - v2 gaussian_blur), MSCN masks with their fills, MixMask / Un-Mix and SimMIM masks,
    which torchvision lacks, are the same algorithms written per image with torch ops."""

    def __init__(self, recipe, size: int):
        from torchvision.transforms import v2
        from pipelines import augment as A
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
            from pipelines import mixing
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
    """Time per stage (the augment.* ranges of pipelines/recipes.py) and the top ops, one batch."""
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


def bench_augment(recipe: str, args, device: torch.device) -> dict:
    from pipelines.recipes import build_augmenter
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    aug = build_augmenter(recipe, size=args.size, device=device, dtype=dtype, seed=0, chunk=args.chunk or None,
                          compile=args.compile)
    views = _bench_images(aug.sources, args.batch_size, args.size, device)
    ref_n = min(args.reference_images, args.batch_size)
    ref = _PerSampleReference(aug.recipe, args.size) if ref_n > 0 else None
    ref_views = [v[:ref_n].cpu() for v in views]
    t0 = time.perf_counter()
    out = aug(views)                                                # includes torch.compile, if asked
    _sync(device)
    first_call = time.perf_counter() - t0
    per_image = len(out.views) + (out.mixed is not None)            # views produced per input image
    for _ in range(max(0, args.warmup - 1)):
        aug(views)
    if ref is not None:
        ref(ref_views)
    # batched and per-sample batches alternate, so load changes on a shared machine hit both alike
    t_batched, t_ref = [], []
    for _ in range(args.batches):
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
           "chunk": aug.chunk, "compile": args.compile, "first_call_s": first_call, "batches": args.batches,
           "views_per_s": per_image * args.batch_size * len(t_batched) / sum(t_batched),
           "s_per_batch_p50": float(np.percentile(t_batched, 50))}
    if ref is not None:
        res.update(reference_images=ref_n,
                   reference_views_per_s=per_image * ref_n * len(t_ref) / sum(t_ref))
        res["speedup"] = res["views_per_s"] / res["reference_views_per_s"]
    if device.type == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if args.profile:
        res["profile"] = _augment_profile(aug, views, device)
    return res


def cmd_augment(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    rows = []
    for recipe in args.recipe.split(","):
        print(f"[bench augment] {recipe}: {args.warmup} warm-up + {args.batches} batches of {args.batch_size} "
              f"@ {args.size}px on {device} ({torch.get_num_threads()} threads), per-sample torchvision v2 "
              f"reference on {min(args.reference_images, args.batch_size)} images per batch", flush=True)
        rows.append(bench_augment(recipe, args, device))
    table = _print_table(rows, ["recipe", "device", "views_per_image", "views_per_s", "reference_views_per_s",
                                "speedup", "s_per_batch_p50", "threads", "chunk", "compile"])
    payload = {"mode": "augment", "results": rows, "table": table}
    _write_json(args.json, payload)
    return payload


# ---- model and train modes: the real training loop, end to end or on synthetic data ------------

def _overrides(args) -> list[str]:
    """The train.py overrides of a bench run: its own out_dir, no checkpoints, no final kNN."""
    return [f"out_dir={args.out_dir}", "run_name=bench", f"max_steps={args.warmup + args.batches}",
            f"log_every={args.warmup}", "final_eval=false", "ckpt_every=0", "knn_every=0",
            "progress=false", "resume=false", *args.set]


def bench_loop(label: str, config: str | None, overrides: list[str], args, device: torch.device) -> dict:
    """Run train.py for warmup + batches steps; rates from its metrics after the warm-up interval."""
    import shutil
    import train
    run_dir = Path(args.out_dir) / "bench"
    shutil.rmtree(run_dir, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = Meter(device)
    meter.start()
    t0 = time.perf_counter()
    argv = (["--config", config] if config else []) + overrides + _overrides(args)
    result = train.main(argv)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r and r["step"] > args.warmup]
    if not rows:
        raise SystemExit(f"bench.py: the {label} run logged nothing after its {args.warmup} warm-up steps")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    images = cfg["batch_size"] * args.warmup  # per logged interval (log_every = warmup)
    seconds = [images / r["images_per_s"] for r in rows]
    res = meter.result(cfg["batch_size"])  # CPU and memory over the whole run
    res.update(
        label=label, steps=sum(args.warmup for _ in rows), images_per_s=images * len(rows) / sum(seconds),
        s_per_batch_p50=float(np.percentile(seconds, 50)) / args.warmup,
        s_per_batch_p95=float(np.percentile(seconds, 95)) / args.warmup,
        data_wait=sum(r["data_wait"] * t for r, t in zip(rows, seconds)) / sum(seconds),
        startup_s=wall - sum(seconds), loader=cfg["loader"], recipe=cfg["recipe"], arch=cfg["arch"],
        batch_size=cfg["batch_size"], size=cfg["size"], views=cfg["views"], device=str(device),
        exit=result["exit"])
    res.pop("batches", None)
    return res


def _model_overrides(args) -> list[str]:
    """The same network and step on synthetic uint8 batches already on the device, normalise only."""
    return ["loader=synthetic", "recipe=plain"]


def cmd_model(args) -> dict:
    device = _device(args.device)
    rows = [bench_loop("model-only", args.config, _model_overrides(args), args, device)]
    return _report("model", rows, args, ["label", "arch", "batch_size", "images_per_s", "s_per_batch_p50",
                                          "s_per_batch_p95", "peak_rss_mb"] + (["peak_gpu_mb"] if device.type == "cuda" else []))


def cmd_train(args) -> dict:
    """End to end per loader backend, and model-only on the same config: efficiency = their ratio."""
    device = _device(args.device)
    model = bench_loop("model-only", args.config, _model_overrides(args), args, device)
    rows = []
    for backend in (args.compare.split(",") if args.compare else [None]):
        label = f"end-to-end ({backend})" if backend else "end-to-end"
        row = bench_loop(label, args.config, [f"loader={backend}"] if backend else [], args, device)
        row["efficiency"] = row["images_per_s"] / model["images_per_s"]
        rows.append(row)
    model["efficiency"] = 1.0
    columns = ["label", "loader", "recipe", "images_per_s", "efficiency", "data_wait", "s_per_batch_p50",
               "s_per_batch_p95", "cpu_percent", "peak_rss_mb"] + (["peak_gpu_mb"] if device.type == "cuda" else [])
    return _report("train", rows + [model], args, columns)


def _report(mode: str, rows: list[dict], args, columns: list[str]) -> dict:
    table = _print_table(rows, columns)
    payload = {"mode": mode, "config": getattr(args, "config", None), "results": rows, "table": table}
    _write_json(args.json, payload)
    if args.json:
        _chart(rows, Path(args.json).with_suffix(".png"), f"bench.py {mode}")
        Path(args.json).with_suffix(".md").write_text(table + "\n")
    return payload


def _chart(rows: list[dict], out: Path, title: str) -> None:
    """Horizontal bars of images/s per row, labelled with the ratio to the first row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [str(r.get("label") or r.get("backend") or r.get("recipe")) for r in rows]
    rates = [r["images_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    ax.barh(labels[::-1], rates[::-1], color="#4c72b0")
    for y, rate in enumerate(rates[::-1]):
        ax.text(rate, y, f" {rate:,.0f}/s  x{rate / rates[0]:.2f}", va="center", fontsize=8)
    ax.set(xlabel="images / s", title=title, xlim=(0, max(rates) * 1.35))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")


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
    p.add_argument("--chunk", type=int, default=0, help="rows per CPU chunk (0 = sized to the cache)")
    p.add_argument("--compile", action="store_true", help="torch.compile the colour-jitter kernels")
    p.add_argument("--profile", action="store_true", help="also profile one batch: time per stage, top ops")
    p.add_argument("--json", default=None)
    p.set_defaults(run=cmd_augment)

    for name, run, help_text in (("model", cmd_model, "the training step on synthetic data on the device: the ceiling"),
                                 ("train", cmd_train, "the real loop end to end, per loader, vs model-only")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="a train.py config (configs/*.yaml)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides")
        p.add_argument("--compare", default="", help="train mode: comma-separated loaders, end to end each")
        p.add_argument("--batches", type=int, default=20, help="measured steps (a multiple of --warmup)")
        p.add_argument("--warmup", type=int, default=5, help="steps excluded, also the logging interval")
        p.add_argument("--out-dir", default="runs/bench-tmp")
        p.add_argument("--device", default="auto")
        p.add_argument("--json", default=None)
        p.set_defaults(run=run)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
