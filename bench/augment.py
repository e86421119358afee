"""bench.py augment: views/s of a recipe's batched augment stage on the device, on random uint8
crops (no loader, no model), against the same recipe done per sample with torchvision v2; memory
traffic per view and an optional profile."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from bench.meter import Meter, combos, pick_device, print_table, report, row_label, sync


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


def bench_images(sources: int, n: int, size: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
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
        sync(device)
    rows = []
    for e in prof.key_averages():
        cuda_us = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        rows.append({"name": e.key, "calls": e.count, "cpu_ms": e.cpu_time_total / 1e3,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3, "device_ms": cuda_us / 1e3})
    stages = sorted((r for r in rows if r["name"].startswith("augment.")), key=lambda r: -r["cpu_ms"])
    ops = sorted((r for r in rows if not r["name"].startswith("augment.")),
                 key=lambda r: -(r["device_ms"] or r["self_cpu_ms"]))[:12]
    print("stages (inclusive time of one batch):")
    print_table(stages, ["name", "calls", "cpu_ms", "device_ms"])
    print("top ops (self time):")
    print_table(ops, ["name", "calls", "self_cpu_ms", "device_ms"])
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
    views = bench_images(aug.sources, args.batch_size, args.size, device)
    ref_n = min(args.reference_images, args.batch_size)
    ref = _PerSampleReference(aug.recipe, args.size) if ref_n > 0 else None
    ref_views = [v[:ref_n].cpu() for v in views]
    t0 = time.perf_counter()
    out = aug(views)                                                # includes torch.compile, if asked
    sync(device)
    first_call = time.perf_counter() - t0
    per_image = len(out.views) + (out.mixed is not None)            # views produced per input image
    del out
    for _ in range(max(0, args.warmup - 1)):
        aug(views)
    if ref is not None:
        ref(ref_views)
    sync(device)
    startup = t_build + time.perf_counter() - t0                    # build, compile, warm-up batches
    gpu_bytes = _augment_gpu_bytes(aug, views, device) if device.type == "cuda" else None
    # batched and per-sample batches alternate, so load changes on a shared machine hit both alike
    t_batched, t_ref = [], []
    meter = Meter(device)                                           # CPU, memory, the machine's load
    meter.start()
    for _ in tqdm(range(args.batches), desc=recipe, file=sys.stderr, unit="batch", leave=False):
        sync(device)
        t0 = time.perf_counter()
        aug(views)
        sync(device)
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
    device = pick_device(args.device)
    rows = []
    for combo in combos(args, AUGMENT_SWEEPS):
        run = argparse.Namespace(**{**vars(args), **combo})
        for recipe in args.recipe.split(","):
            print(f"[bench augment] {row_label(recipe, combo)}: {run.warmup} warm-up + {run.batches} batches of "
                  f"{run.batch_size} @ {run.size}px on {device} ({run.threads or torch.get_num_threads()} threads), "
                  f"per-sample torchvision v2 reference on {min(run.reference_images, run.batch_size)} images "
                  f"per batch", flush=True)
            rows.append({"label": row_label(recipe, combo), **bench_augment(recipe, run, device)})
    columns = ["label", "views_per_image", "views_per_s", "ratio", "reference_views_per_s", "speedup",
               "s_per_batch_p50", "mb_per_view", "startup_s", "threads", "chunk", "other_cpu_percent"]
    if device.type == "cuda":
        columns += ["augment_gpu_mb_per_image", "peak_gpu_mb"]
    return report("augment", rows, args, columns, rate="views_per_s")
