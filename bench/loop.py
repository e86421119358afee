"""bench.py model and train: train.py's own loop for a few steps, on synthetic batches already on the
device (model: the ceiling a loader has to feed) or end to end per loader (train). train.main's
`wrap` is how the other modes add delays and sync guards to its pieces (WrappedAugmenter)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from masksiam.dist import DEVICE_ENV
from masksiam.errors import UsageError
from masksiam.io import atomic_write_text
from bench.meter import GPU_COLUMNS, Meter, combos, pick_device, report, row_label


def _overrides(args) -> list[str]:
    """The train.py overrides of a bench run: its own out_dir, no checkpoints, no final kNN."""
    return [f"out_dir={args.out_dir}", "run_name=bench", f"max_steps={args.warmup + args.batches}",
            f"log_every={args.warmup}", "final_eval=false", "ckpt_every=0", "knn_every=0",
            "progress=false", "resume=false", *args.set]


@contextlib.contextmanager
def trains_on(device: torch.device):
    """train.py inside trains on `device` (--device cpu on a GPU host too); the variable it reads is
    restored after."""
    saved = os.environ.get(DEVICE_ENV)
    os.environ[DEVICE_ENV] = device.type
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = saved


def bench_loop(label: str, overrides: list[str], args, device: torch.device, wrap: dict | None = None) -> dict:
    """Run train.py for warmup + batches steps; rates from its metrics after the warm-up interval.
    overrides come last: a row's loader and sweep values win over --set. wrap: train.main's, for
    this run (explain's delays)."""
    import shutil
    import train
    run_dir = Path(args.out_dir) / "bench"
    shutil.rmtree(run_dir, ignore_errors=True)
    meter = Meter(device)
    meter.start()
    argv = (["--config", args.config] if args.config else []) + _overrides(args) + overrides
    with trains_on(device):
        result = train.main(argv, wrap=wrap)
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
    device = pick_device(args.device)
    rows = []
    configs = args.config.split(",") if args.config else [None]
    for config in configs:
        one = argparse.Namespace(**{**vars(args), "config": config})
        name = "model-only" + (f" {Path(config).stem}" if len(configs) > 1 else "")
        for combo in combos(args):
            sweep = [f"{k}={v}" for k, v in combo.items()]
            rows.append(bench_loop(row_label(name, combo), sweep + model_only_overrides(one, sweep), one, device))
    columns = ["label", "arch", "batch_size", "images_per_s", "ratio", "s_per_batch_p50", "s_per_batch_p95",
               "startup_s", "other_cpu_percent", "peak_rss_mb"] + (GPU_COLUMNS if device.type == "cuda" else [])
    return report("model", rows, args, columns)


def cmd_train(args) -> dict:
    """End to end per loader backend, and model-only on the same config: efficiency = their ratio
    (per sweep combination: the ceiling moves with the batch size)."""
    device = pick_device(args.device)
    rows = []
    for combo in combos(args):
        sweep = [f"{k}={v}" for k, v in combo.items()]
        model = bench_loop(row_label("model-only", combo), sweep + model_only_overrides(args, sweep), args, device)
        for backend in (args.compare.split(",") if args.compare else [None]):
            label = row_label(f"end-to-end ({backend})" if backend else "end-to-end", combo)
            row = bench_loop(label, sweep + ([f"loader={backend}"] if backend else []), args, device)
            row["efficiency"] = row["images_per_s"] / model["images_per_s"]
            rows.append(row)
        model["efficiency"] = 1.0
        rows.append(model)
    columns = ["label", "recipe", "images_per_s", "ratio", "efficiency", "data_wait", "s_per_batch_p50",
               "s_per_batch_p95", "startup_s", "cpu_percent", "other_cpu_percent", "peak_rss_mb"]
    return report("train", rows, args, columns + (GPU_COLUMNS if device.type == "cuda" else []))


class WrappedAugmenter:
    """An augmenter whose calls run through around(fn, *args, **kwargs); attributes are the augmenter's."""

    def __init__(self, aug, around):
        self._aug, self._around = aug, around

    def __call__(self, *args, **kwargs):
        return self._around(self._aug, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._aug, name)
