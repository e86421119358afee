"""What every evaluation command shares: the checkpoint's run config and backbone, the eval input
transform, progress, top-k counts, and the result files (JSON + markdown table + PNG curves).

Result files: <out>/<name>.json holds {"eval": kind, "checkpoint", "metrics": {name: value},
"curves": {name: [[x, y], ...]}, "settings": {...}}; <out>/<name>.md the metrics as a table and
<out>/<name>.png the curves. eval.report reads the JSON files back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

import masksiam  # noqa: F401
from masksiam import checkpoint as ckpt_io
from masksiam import dist
from masksiam.io import atomic_write, atomic_write_text
from masksiam.config import Config, apply
from masksiam.errors import UserError


class EvalError(UserError, ValueError):
    """Bad evaluation input (arguments, checkpoint contents); the message names it."""


def run_config(state: dict, path: str, overrides: dict[str, Any]) -> Config:
    """The training run's config from a checkpoint, with the command line's overrides."""
    if "config" not in state:
        raise EvalError(f"{path} is not a train.py checkpoint (no 'config'); export it from a run")
    cfg = apply(Config(), state["config"], path)
    return apply(cfg, {k: v for k, v in overrides.items() if v is not None}, "command line")


def load_backbone(cfg: Config, state: dict | None, device: torch.device):
    """The run's backbone (torchvision ResNet, fc = Identity), with the checkpoint's weights unless
    state is None (random init, same seed), channels-last on `device`."""
    from models.resnet import build_backbone_from_config, load_backbone_state
    torch.manual_seed(cfg.seed)
    backbone = build_backbone_from_config(cfg)
    if state is not None:
        load_backbone_state(backbone, ckpt_io.backbone_state(state))
    return backbone.to(device, memory_format=torch.channels_last)


def open_checkpoint(path: str, overrides: dict[str, Any], random_init: bool = False):
    """(cfg, info, backbone, state) for an evaluation command; a bad checkpoint or override raises a UserError."""
    state = ckpt_io.load(path)
    cfg = run_config(state, path, overrides)
    if cfg.data and overrides.get("loader") is None:
        from eval.data import detect_loader
        loader = detect_loader(cfg, cfg.val_split)
        if loader != cfg.loader:
            print(f"eval: {cfg.data} holds data for loader={loader} (the run used {cfg.loader}); using {loader}",
                  file=sys.stderr)
            cfg = dataclasses.replace(cfg, loader=loader)
    info = dist.init_distributed()
    return cfg, info, load_backbone(cfg, None if random_init else state, info.device), state


class EvalTransform:
    """Deterministic eval input: uint8 (N, 3, H, W) -> normalised float (`dtype`, channels-last),
    through the recipe's high-pass filter when it has one (MSCN evaluates on high-passed images, seed
    001 A.2; a sigma range uses its midpoint). `highpass` forces the filter on or off. Chunks of rows
    run on the augment stage's CPU workers (pipelines.augment.engine.run_chunks)."""

    def __init__(self, recipe, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 highpass: bool | None = None):
        from pipelines.augment.engine import chunk_pool
        from pipelines.augment.recipes import Recipe, load_recipe
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        self.dtype, self.pool = dtype, chunk_pool(device)
        self.spec = next((b.highpass for b in self.recipe.branches if b.highpass), None)
        self.highpass = self.spec is not None if highpass is None else highpass

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from pipelines.augment import ops as A
        from pipelines.augment.engine import default_chunk, run_chunks
        r = self.recipe
        sigma = (sum(self.spec.sigma) / 2 if self.spec else 5.0) * x.shape[-1] / r.ref_size
        out = torch.empty(x.shape, dtype=self.dtype, device=x.device, memory_format=A.CL)
        kernel = A.highpass_kernel_size(sigma, min(x.shape[-2:]))

        def chunk(ci: int, c0: int, c1: int) -> None:
            f = A.to_float(x[c0:c1])
            if self.highpass:
                out[c0:c1] = A.normalize(A.highpass(f, sigma, kernel), (0.0, 0.0, 0.0), r.std)
            else:
                out[c0:c1] = A.normalize(f, r.mean, r.std)

        step = default_chunk(x.device, x.shape[-1])
        run_chunks(chunk, [(c0, min(x.shape[0], c0 + step)) for c0 in range(0, x.shape[0], step)], self.pool)
        return out


def eval_transform(cfg: Config, device: torch.device, highpass: bool | None = None) -> EvalTransform:
    """The run's EvalTransform: uint8 (N, 3, H, W) -> normalised float32 through its recipe (MSCN:
    high-passed); `highpass` overrides cfg.highpass_eval."""
    return EvalTransform(cfg.recipe, device, torch.float32, cfg.highpass_eval if highpass is None else highpass)


def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True):
    """A tqdm bar on rank 0 (to stderr), plain iteration elsewhere."""
    if not enabled or dist.rank() != 0:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False, file=sys.stderr)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """(N, C) logits, (N,) labels -> (len(ks), N) bool: label among the top k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                 # (N, kmax)
    hit = top == labels[:, None]
    return torch.stack([hit[:, :min(k, kmax)].any(1) for k in ks])


def trained_result(kind: str, label: str, checkpoint: str, history: list[dict], settings: dict) -> dict:
    """The result of an evaluation that trains (linear, finetune), from its per-epoch history rows
    {"epoch", "val_top1", "val_top5", ...}: the last epoch's top-1 / top-5, and one curve
    [[epoch, value], ...] per logged quantity. The best epoch's top-1 is no metric: picking the
    epoch on val is picking on the test set (the val_top1 curve still shows every epoch)."""
    final = history[-1]
    return {"eval": kind, "label": label, "checkpoint": checkpoint,
            "metrics": {"top1": final["val_top1"], "top5": final["val_top5"]},
            "curves": {k: [[r["epoch"], r[k]] for r in history] for k in history[0] if k != "epoch"},
            "settings": settings}


def write_results(out_dir: str | Path, name: str, result: dict) -> dict[str, Path]:
    """<out>/<name>.json, .md (metrics table) and .png (curves); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    atomic_write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    atomic_write_text(paths["md"], markdown_table([result], [result.get("label", name)]))
    plot_curves({result.get("label", name): result}, paths["png"])
    return paths


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{100 * v:.2f}" if 0 <= v <= 1 else f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(results: list[dict], labels: list[str]) -> str:
    """One row per result, one column per metric (accuracies in %), union of metrics in order."""
    cols: list[str] = []
    for r in results:
        cols += [k for k in r.get("metrics", {}) if k not in cols]
    lines = ["| run | eval | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for label, r in zip(labels, results):
        m = r.get("metrics", {})
        lines.append(f"| {label} | {r.get('eval', '')} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, dict], path: str | Path) -> None:
    """One panel per curve name; one line per result carrying it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names: list[str] = []
    for r in results.values():
        names += [k for k in r.get("curves", {}) if k not in names]
    n = max(1, len(names))
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.2 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, curve in zip(axes.flat, names):
        for label, r in results.items():
            pts = r.get("curves", {}).get(curve)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=label)
        ax.set(xlabel="epoch", title=curve)
        if len(results) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if not names:
        axes.flat[0].text(0.5, 0.5, "no curves", ha="center", va="center")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def scheduled_lr(base: float, epoch: float, epochs: int, schedule: str, milestones=(), gamma: float = 0.1,
                 warmup: float = 0.0) -> float:
    """lr at fractional `epoch` of `epochs`: linear warmup over `warmup` epochs, then cosine to 0
    ("cosine") or x gamma at each milestone epoch ("step"), or constant ("constant")."""
    if warmup and epoch < warmup:
        return base * epoch / warmup
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup) / max(1e-9, epochs - warmup))))
    if schedule == "step":
        return base * gamma ** sum(epoch >= m for m in milestones)
    if schedule == "constant":
        return base
    raise EvalError(f"unknown lr schedule {schedule!r}: cosine, step or constant")


def scale_milestones(milestones, preset_epochs: int, epochs: int) -> tuple[int, ...]:
    """A preset's step epochs at another length: the same fractions of training (60/80 of 100 -> 6/8 of 10)."""
    return tuple(max(1, round(m * epochs / preset_epochs)) for m in milestones)


def recipe_highpasses(cfg: Config) -> bool:
    """Whether the run's recipe trains on high-passed images (MSCN), so evaluation should too."""
    from pipelines.augment.engine import build_augmenter
    return any(b.highpass for b in build_augmenter(cfg.recipe, size=cfg.size).recipe.branches)


def unique_mean(hits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(R, N) per-sample values and (N,) dataset indices on this rank -> (R,) means over the whole
    split, each index counted once (eval loaders pad the last batch by repeating images)."""
    hits, indices = dist.gather_no_grad(hits.t().contiguous()).t(), dist.gather_no_grad(indices)
    order = torch.argsort(indices, stable=True)
    s = indices[order]
    first = torch.ones_like(s, dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    return hits[:, order][:, first].float().mean(1)
