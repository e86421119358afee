"""Linear probe: a linear classifier on the frozen backbone's pooled features.

    python -m eval.linear --checkpoint runs/x/checkpoint.pt --data DIR [--preset mixmask|mscn]
                          [--epochs N] [--out DIR] [--fast] [--bn] [--crop-scale LO HI]
    torchrun --nproc_per_node=8 -m eval.linear ...                 # classifier under DDP

Presets are the papers' protocols (the preset's epochs, batch and base lr per 256 images; --epochs
shortens a run and moves step milestones to the same fractions of it):

    mixmask  Vishniakov et al. 2022 Table 2 (MoCo's protocol): SGD momentum 0.9, lr 30, x0.1 at epochs 60 and 80,
             100 epochs, no weight decay, batch 256
    mscn     Jing et al. 2022 A.2: SGD momentum 0.9, base lr 1.0, cosine, 100 epochs, weight decay 1e-6,
             batch 256

Both read the images as the run trained on them: train random resized crop (--crop-scale, default
0.08-1) + flip, test resize to size/0.875 + center crop, each through the run's eval transform
(high-passed for MSCN recipes, as Jing et al. 2022 A.2 evaluates them; cfg.highpass_eval overrides).

One protocol per comparison: the default preset is mixmask for every run, whatever its recipe, so
runs compared in one table share the optimiser; --preset picks another for all of them. The result
records the preset and every number of it.

--bn puts an affine-free BatchNorm on the features (MAE's probe), which makes one lr fit features of
any scale, with its own base lr (bn_lr, 0.1 per 256 images, MAE's BN probe): lr 30 on standardised
features overfits (the weights grow without bound). --lr overrides either. --fast computes the
features once (eval crop, no augmentation) and trains the classifier on them: minutes instead of
a full protocol, for comparisons between runs, not for paper numbers.

The reported top-1 / top-5 are those of the last epoch; the best epoch on val is not a result (it
selects on the test set) and is not reported (the val_top1 curve holds every epoch).

The backbone is frozen: eval mode (BatchNorm statistics untouched), no gradients. Writes
<out>/linear.json, linear.md, linear.png (train loss, val top-1 / top-5, lr per epoch; --name renames).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import masksiam  # noqa: F401
from masksiam import dist
from masksiam.checkpoint import save_atomic
from masksiam.config import parse_overrides
from masksiam.errors import ArgumentParser, command
from masksiam.optim import set_lr
from eval.common import progress, scale_milestones, scheduled_lr, topk_correct, trained_result, unique_mean


@dataclass(frozen=True)
class LinearPreset:
    epochs: int
    lr: float                       # base lr per 256 images (linear scaling to the batch)
    weight_decay: float
    batch_size: int
    schedule: str                   # "cosine" or "step"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    momentum: float = 0.9
    bn_lr: float = 0.1              # base lr with --bn (standardised features): MAE's BN probe
    source: str = ""


PRESETS = {
    "mscn": LinearPreset(epochs=100, lr=1.0, weight_decay=1e-6, batch_size=256, schedule="cosine",
                         source="Jing et al. 2022 (MSCN) supplement A.2"),
    "mixmask": LinearPreset(epochs=100, lr=30.0, weight_decay=0.0, batch_size=256, schedule="step",
                            milestones=(60, 80), gamma=0.1, source="Vishniakov et al. 2022 (MixMask) Table 2, MoCo's protocol"),
}


DEFAULT_PRESET = "mixmask"          # for every recipe: one optimiser per comparison


def preset_for(name: str, *, bn: bool = False, lr: float | None = None,
               batch_size: int | None = None) -> LinearPreset:
    """The preset a probe runs: PRESETS[name] with its lr for the head (bn_lr with --bn), or the
    command line's --lr / --batch-size."""
    preset = PRESETS[name]
    chosen = lr if lr is not None else (preset.bn_lr if bn else preset.lr)
    return dataclasses.replace(preset, lr=chosen, batch_size=batch_size or preset.batch_size)


class LinearHead(nn.Module):
    """(N, F) features -> (N, C) logits; optional affine-free BatchNorm first (--bn)."""

    def __init__(self, num_features: int, num_classes: int, bn: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, affine=False) if bn else nn.Identity()
        self.fc = nn.Linear(num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)     # MoCo / SimCLR probe initialisation
        nn.init.zeros_(self.fc.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(h))


def _epoch_plan(preset: LinearPreset, epochs: int | None) -> tuple[int, tuple[int, ...]]:
    n = epochs or preset.epochs
    return n, scale_milestones(preset.milestones, preset.epochs, n)


def _sgd(module: nn.Module, preset: LinearPreset, batch: int) -> tuple[torch.optim.Optimizer, float]:
    lr = preset.lr * batch / 256
    return torch.optim.SGD(module.parameters(), lr=lr, momentum=preset.momentum,
                           weight_decay=preset.weight_decay), lr


@torch.no_grad()
def evaluate_features(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                      indices: torch.Tensor | None = None, chunk: int = 4096) -> tuple[float, float]:
    """Top-1, top-5 of `head` on (N, F) features; with `indices`, features are this rank's share and
    each dataset index counts once over all ranks."""
    was = head.training
    head.eval()
    hits = torch.cat([topk_correct(head(f.float()), y) for f, y in zip(feats.split(chunk), labels.split(chunk))], 1)
    head.train(was)
    if indices is None:
        m = hits.float().mean(1)
    else:
        m = unique_mean(hits, indices)
    return float(m[0]), float(m[1])


def train_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                      val_labels: torch.Tensor, num_classes: int, preset: LinearPreset, *,
                      epochs: int | None = None, bn: bool = False, seed: int = 0, show: bool = False,
                      log: Callable[[dict], None] | None = None) -> tuple[LinearHead, list[dict]]:
    """The classifier trained on cached (N, F) features (same on every rank), with the preset's
    optimiser and schedule; one history row per epoch (train loss, val top-1/top-5, lr)."""
    device = train_feats.device
    n_epochs, milestones = _epoch_plan(preset, epochs)
    head = LinearHead(train_feats.shape[1], num_classes, bn).to(device)
    opt, base = _sgd(head, preset, preset.batch_size)
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, b = train_feats.shape[0], min(preset.batch_size, train_feats.shape[0])
    steps = max(1, n // b)                               # drop the last partial batch, as training does
    history = []
    for epoch in progress(range(n_epochs), "linear (cached features)", n_epochs, enabled=show):
        perm = torch.randperm(n, generator=g).to(device)
        loss_sum = torch.zeros((), device=device)
        for s in range(steps):
            set_lr(opt, scheduled_lr(base, epoch + s / steps, n_epochs, preset.schedule, milestones, preset.gamma))
            idx = perm[s * b:(s + 1) * b]
            loss = F.cross_entropy(head(train_feats[idx].float()), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        top1, top5 = evaluate_features(head, val_feats, val_labels)
        row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / steps, "val_top1": top1, "val_top5": top5,
               "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        if log:
            log(row)
    return head, history


def train_probe(backbone: nn.Module, train_loader, val_loader, transform, num_classes: int,
                preset: LinearPreset, device: torch.device, *, epochs: int | None = None, bn: bool = False,
                show: bool = False, log: Callable[[dict], None] | None = None) -> tuple[LinearHead, list[dict]]:
    """The full protocol: every epoch a fresh random resized crop + flip of each training image
    (train_loader, train=True), through the frozen backbone, into the classifier (DDP over ranks);
    val top-1/top-5 after each epoch on the eval crop. `transform`: uint8 -> normalised float."""
    from eval.knn import embed
    backbone.eval().requires_grad_(False)
    n_epochs, milestones = _epoch_plan(preset, epochs)
    head = LinearHead(backbone.num_features, num_classes, bn).to(device)
    model = dist.wrap_ddp(head, device)
    opt, base = _sgd(head, preset, preset.batch_size)
    steps = len(train_loader)
    if steps == 0:
        raise ValueError(f"the training split has fewer images than one batch ({preset.batch_size})")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = []
    for epoch in range(n_epochs):
        train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        for s, batch in enumerate(progress(train_loader, f"linear epoch {epoch + 1}/{n_epochs}", steps, show)):
            set_lr(opt, scheduled_lr(base, epoch + s / steps, n_epochs, preset.schedule, milestones, preset.gamma))
            with torch.no_grad(), amp:
                h = backbone(transform(batch.views[0])).float()
            loss = F.cross_entropy(model(h), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        feats, labels, indices = embed(backbone, val_loader, transform, device, normalize=False)
        top1, top5 = evaluate_features(head, feats, labels, indices)
        row = {"epoch": epoch + 1, "train_loss": float(dist.all_reduce_mean(loss_sum)) / steps,
               "val_top1": top1, "val_top5": top5, "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        if log:
            log(row)
    return head, history


@command("eval.linear")
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m eval.linear", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    p.add_argument("--data", default=None, help="data root (default: the run's): folder, .beton files or shards")
    p.add_argument("--loader", default=None, choices=["torchvision", "dali", "ffcv"])
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"the protocol, the same for every recipe (default {DEFAULT_PRESET})")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch (lr scales with it)")
    p.add_argument("--lr", type=float, default=None,
                   help="override the preset's base lr (per 256 images; with --bn its bn_lr)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("LO", "HI"),
                   help="RandomResizedCrop area range of the training crops (default 0.08 1; small images: 0.2 1)")
    p.add_argument("--fast", action="store_true", help="cache center-crop features once, train on them")
    p.add_argument("--bn", action="store_true",
                   help="affine-free BatchNorm on the features, with the preset's bn_lr (0.1)")
    p.add_argument("--out", default=None, help="result folder (default: <checkpoint folder>/eval)")
    p.add_argument("--max-train", type=int, default=0, help="use only N training images (0 = all)")
    p.add_argument("--max-val", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--random-init", action="store_true", help="probe the same arch at random init")
    p.add_argument("--save-head", action="store_true", help="write the classifier to <out>/<name>_head.pt")
    p.add_argument("--name", default=None,
                   help="result name: <out>/<name>.json/.md/.png and its report column (default linear)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the run's config keys as train.py takes them (masksiam/config.py), e.g. "
                        "val_split=test eval_size=64")
    args = p.parse_args(argv)

    from eval.common import eval_transform, open_checkpoint, recipe_highpasses, write_results
    from eval.data import eval_loader
    cfg, info, backbone, _ = open_checkpoint(args.checkpoint, {"data": args.data, "loader": args.loader,
                                                               "workers": args.workers,
                                                               **parse_overrides(args.overrides)}, args.random_init)
    preset_name = args.preset
    preset = preset_for(preset_name, bn=args.bn, lr=args.lr, batch_size=args.batch_size)
    size = cfg.eval_size or cfg.size
    # the probe's own crops: RandomResizedCrop (--crop-scale) + flip at the eval size
    cfg = dataclasses.replace(cfg, size=size, crop_scale=tuple(args.crop_scale), crop_ratio=(3 / 4, 4 / 3),
                              flip_prob=0.5, drop_last=True)
    transform = eval_transform(cfg, info.device)       # the run's: high-passed as its recipe trains
    highpass = recipe_highpasses(cfg) if cfg.highpass_eval is None else cfg.highpass_eval
    show = not args.no_progress
    out = Path(args.out or Path(args.checkpoint).parent / "eval")

    def log(row):
        if info.is_main:
            print(json.dumps({"linear": row}), flush=True)

    t0 = time.perf_counter()
    val_loader = eval_loader(cfg, info, cfg.val_split, batch_size=preset.batch_size, max_images=args.max_val)
    num_classes = len(val_loader.classes)
    if args.fast:
        from eval.knn import extract_features
        train_eval = eval_loader(cfg, info, cfg.train_split, batch_size=preset.batch_size,
                                 max_images=args.max_train)
        xf, yf = extract_features(backbone, train_eval, transform, info.device, normalize=False,
                                  desc="features (train)" if show else None)
        vf, vy = extract_features(backbone, val_loader, transform, info.device, normalize=False,
                                  desc="features (val)" if show else None)
        head, history = train_on_features(xf, yf, vf, vy, num_classes, preset, epochs=args.epochs, bn=args.bn,
                                          seed=cfg.seed, show=show and info.is_main, log=log)
    else:
        train_loader = eval_loader(cfg, info, cfg.train_split, train=True, batch_size=preset.batch_size,
                                   max_images=args.max_train)
        head, history = train_probe(backbone, train_loader, val_loader, transform, num_classes, preset,
                                    info.device, epochs=args.epochs, bn=args.bn, show=show, log=log)
    final = history[-1]
    label = args.name or f"linear ({preset_name}{', fast' if args.fast else ''})"
    name = args.name or "linear"
    result = trained_result("linear", label, args.checkpoint, history,
                            {"preset": preset_name, **dataclasses.asdict(preset), "epochs": len(history),
                             "fast": args.fast, "bn": args.bn, "crop_scale": list(args.crop_scale),
                             "highpass": highpass, "loader": cfg.loader, "data": cfg.data,
                             "random_init": args.random_init, "world_size": info.world_size,
                             "seconds": round(time.perf_counter() - t0, 1)})
    if info.is_main:
        paths = write_results(out, name, result)
        if args.save_head:
            save_atomic({k: v.cpu() for k, v in head.state_dict().items()}, out / f"{name}_head.pt")
        print(f"linear probe ({preset_name}, last epoch): top-1 {100 * final['val_top1']:.2f}%  top-5 "
              f"{100 * final['val_top5']:.2f}%  -> {paths['json']}", flush=True)
    dist.cleanup()
    return result


if __name__ == "__main__":
    main()
