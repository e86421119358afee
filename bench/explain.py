"""bench.py explain: each stage of the pipeline alone on the user's config (read, decode, loader,
host-to-device, augment, model), then end to end through train.py: which stage bounds the run, in
words and as a waterfall of ms per image."""
from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import torch

from masksiam.dist import DistInfo
from masksiam.errors import UsageError
from masksiam.io import atomic_write, atomic_write_text
from bench.augment import bench_images
from bench.loop import WrappedAugmenter, bench_loop, model_only_overrides
from bench.meter import BLUE, GREY, Meter, machine, pick_device, sync


EXPLAIN_STAGES = ("read", "decode", "loader", "host-to-device", "augment", "model", "end-to-end")
PIPELINE = ("loader", "host-to-device", "augment", "model")   # what one batch goes through, in order
EXPLAIN_DELAYS = ("loader", "augment", "model")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _measure(name: str, images: int, fn, device: torch.device, **extra) -> dict:
    """Run fn() once; its images/s and the CPU cores it kept busy (this process and its children)."""
    meter = Meter(device)
    meter.start()
    fn()
    sync(device)
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
    host = bench_images(aug.sources, cfg.batch_size, cfg.size, torch.device("cpu"))
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
    model = bench_loop("model-only", model_only_overrides(loop, []), loop, device,
                       wrap=_delay_wrappers(delays, stages=("model",)))
    stages.append({"stage": "model", "images_per_s": model["images_per_s"], "cores": model["cpu_percent"] / 100,
                   "other_cpu_percent": model["other_cpu_percent"],
                   "note": f"{cfg.method} {cfg.arch}, synthetic batches on the device, normalise only"})
    e2e = bench_loop("end-to-end", [], loop, device, wrap=_delay_wrappers(delays))
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
    device = pick_device(args.device)
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
    payload = {"mode": "explain", "machine": machine(), "args": vars(args),
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
    """train.main's `wrap`: explain's --delay per batch added to the named stages."""
    def sleep_then(seconds):
        def around(fn, *args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return around
    wrappers = {}
    if delays.get("loader") and "loader" in stages:
        wrappers["build_loader"] = lambda build: lambda *a, **k: _DelayedLoader(build(*a, **k), delays["loader"])
    if delays.get("augment") and "augment" in stages:
        wrappers["build_augmenter"] = lambda build: lambda *a, **k: WrappedAugmenter(build(*a, **k),
                                                                                      sleep_then(delays["augment"]))
    if delays.get("model") and "model" in stages:
        wrappers["train_step"] = lambda step: lambda *a, **k: sleep_then(delays["model"])(step, *a, **k)
    return wrappers
