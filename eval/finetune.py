"""Fine-tuning: semi-supervised (1 % / 10 % / 100 % of the labels) and full fine-tuning for MIM models.

    python -m eval.finetune --checkpoint PATH --data DIR --fraction 0.01 [--subset 1percent.txt]
    python -m eval.finetune --checkpoint PATH --data DIR --fraction 1.0 --full [--layer-decay 0.7]
    [--epochs N] [--out DIR] [--seed S]

Semi-supervised (Jing et al. 2022 A.3, Vishniakov et al. 2022 Table 3; SimCLR's protocol): backbone and a new linear
classifier trained together, SGD momentum 0.9, no weight decay, batch 256, 20 epochs, lr x0.2 after
epochs 12 and 16; backbone / classifier lr 0.002 / 0.5 for 1 % and 10 %, 0.001 / 0.05 for 100 %
(per 256 images). Augmentation as the linear probe: random resized crop + flip (+ high-pass for
MSCN recipes); validation on the eval crop.

Full fine-tuning (--full; MixMAE's Table 2, Liu et al. 2023, with Kim et al. 2024 Table D's structure): AdamW
(0.9, 0.999), base lr 5e-4 per 256 images, weight decay 0.05 (none on BatchNorm and biases), cosine
with 5 warm-up epochs, 100 epochs, label smoothing 0.1, layer-wise lr decay over the ResNet's
stages: fc gets the lr, layer4 lr*d, layer3 lr*d^2, ..., the stem (conv1, bn1) lr*d^5 (SparK fine-
tunes ResNet-50 with d = 0.7). RandAugment, mixup / cutmix and drop path of those tables are not
applied (a ResNet here has no drop path); say so when comparing with them.

Subsets: --fraction f takes round(f * n_c) images (at least one) of every class c, drawn from a
permutation seeded by (seed, class): the same subset on every machine and rank. It is written as
<out>/subset_<f>_seed<seed>.txt, one file name per line (and as a folder of links beside it,
which the loader reads): the format of SimCLR's
imagenet_subsets/1percent.txt, which --subset reads as it is (lines are matched to the split's
files by file name; a line with a '/' by '<class>/<file>'; a .beton keeps no file names, its rows
are '<class>/<row>.jpg'). --epochs shortens a run and moves the
milestones / warm-up to the same fractions of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import masksiam  # noqa: F401
from masksiam import dist
from masksiam.config import parse_overrides
from masksiam.errors import ArgumentParser, command
from masksiam.io import atomic_write_text
from eval.common import EvalError, progress, scale_milestones, scheduled_lr, topk_correct, trained_result, unique_mean


@dataclass(frozen=True)
class FinetunePreset:
    epochs: int
    backbone_lr: float              # per 256 images
    head_lr: float
    optimizer: str                  # "sgd" or "adamw"
    schedule: str                   # "step" or "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    warmup_epochs: float = 0.0
    layer_decay: float = 1.0
    label_smoothing: float = 0.0
    source: str = ""


_SEMI = dict(epochs=20, optimizer="sgd", schedule="step", milestones=(12, 16), gamma=0.2, momentum=0.9,
             weight_decay=0.0, batch_size=256)
SEMI_PRESETS = {
    0.01: FinetunePreset(backbone_lr=0.002, head_lr=0.5, source="Jing et al. 2022 A.3 / Vishniakov et al. 2022 Table 3 (1 %)", **_SEMI),
    0.1: FinetunePreset(backbone_lr=0.002, head_lr=0.5, source="Vishniakov et al. 2022 Table 3 (10 %)", **_SEMI),
    1.0: FinetunePreset(backbone_lr=0.001, head_lr=0.05, source="Vishniakov et al. 2022 Table 3 (100 %)", **_SEMI),
}
FULL_PRESET = FinetunePreset(epochs=100, backbone_lr=5e-4, head_lr=5e-4, optimizer="adamw", schedule="cosine",
                             weight_decay=0.05, batch_size=256, warmup_epochs=5, layer_decay=0.7,
                             label_smoothing=0.1, source="Liu et al. 2023 Table 2 (MixMAE fine-tuning), Kim et al. 2024 Table D")

# supervised training from scratch (the baseline pretraining must beat): torchvision's ResNet recipe
# (SGD 0.1 at batch 256, momentum 0.9, weight decay 1e-4, 90 epochs) with its newer cosine schedule and
# label smoothing 0.1; one lr for the whole network (the fine-tuning presets' small lrs suit a
# pretrained backbone, not a random one)
SCRATCH_PRESET = FinetunePreset(epochs=90, backbone_lr=0.1, head_lr=0.1, optimizer="sgd", schedule="cosine",
                                momentum=0.9, weight_decay=1e-4, batch_size=256, label_smoothing=0.1,
                                source="torchvision's ResNet recipe (SGD 0.1, wd 1e-4, 90 epochs), cosine, smoothing 0.1")

# the ResNet's stages from the input up: a parameter belongs to the first stage its name starts with
STAGES = (("stem", ("conv1.", "bn1.")), ("layer1", ("layer1.",)), ("layer2", ("layer2.",)),
          ("layer3", ("layer3.",)), ("layer4", ("layer4.",)), ("fc", ("fc.",)))


def stage_of(name: str) -> int:
    for i, (_, prefixes) in enumerate(STAGES):
        if name.startswith(prefixes):
            return i
    raise EvalError(f"parameter {name!r} belongs to none of the ResNet stages {[s for s, _ in STAGES]}")


def layer_decay_groups(named_parameters, lr: float, decay: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups from (torchvision name, parameter) pairs: stage s of the 6 (stem,
    layer1..4, fc) gets lr * decay^(5 - s); BatchNorm weights and biases (1-D) get no weight decay.
    Each group records its 'stage'."""
    groups: dict[tuple[int, bool], dict] = {}
    last = len(STAGES) - 1
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        s, no_wd = stage_of(name), p.ndim <= 1
        g = groups.setdefault((s, no_wd), {"params": [], "stage": STAGES[s][0], "lr_scale": decay ** (last - s),
                                           "weight_decay": 0.0 if no_wd else weight_decay})
        g["params"].append(p)
    out = [groups[k] for k in sorted(groups)]
    for g in out:
        g["lr"] = g["base_lr"] = lr * g["lr_scale"]
    return out


class Classifier(nn.Module):
    """backbone (fc = Identity) + a fresh linear fc: parameter names as torchvision's ResNet."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))

    def torchvision_named_state(self):
        """(name, tensor) of the state dict with torchvision's names: a stock ResNet loads it."""
        for name, t in self.state_dict().items():
            yield (name[len("backbone."):] if name.startswith("backbone.") else name), t

    def torchvision_named_parameters(self):
        """(name, parameter) with torchvision's names: 'conv1.weight', ..., 'fc.weight'."""
        for name, p in self.named_parameters():
            yield (name[len("backbone."):] if name.startswith("backbone.") else name), p


def build_optimizer(model: Classifier, preset: FinetunePreset, batch: int) -> torch.optim.Optimizer:
    scale = batch / 256
    if preset.optimizer == "adamw":
        groups = layer_decay_groups(model.torchvision_named_parameters(), preset.backbone_lr * scale,
                                    preset.layer_decay, preset.weight_decay)
        return torch.optim.AdamW(groups, betas=(0.9, 0.999))
    groups = [{"params": list(model.backbone.parameters()), "stage": "backbone"},
              {"params": list(model.fc.parameters()), "stage": "fc"}]
    groups[0]["lr"] = groups[0]["base_lr"] = preset.backbone_lr * scale
    groups[1]["lr"] = groups[1]["base_lr"] = preset.head_lr * scale
    return torch.optim.SGD(groups, momentum=preset.momentum, weight_decay=preset.weight_decay)


# ---- subsets ------------------------------------------------------------------------------------

def balanced_subset(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted positions of round(fraction * n_c) (>= 1) images of every class c, each class drawn
    from its own permutation seeded by (seed, c): deterministic, class-balanced."""
    if not 0 < fraction <= 1:
        raise EvalError(f"--fraction {fraction}: must be in (0, 1]")
    labels = np.asarray(labels)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(members))))
        picked.append(members[np.random.default_rng([seed, int(c), 0x5B5E7]).permutation(len(members))[:k]])
    return np.sort(np.concatenate(picked))


def read_subset_file(path: str | Path, names: list[str]) -> np.ndarray:
    """Positions in `names` ('<class>/<file>' paths) of the files a subset list names, one per line
    (SimCLR's 1percent.txt: 'n01440764_10026.JPEG'; '<class>/<file>' lines match the whole path).

    A line matches exactly first: the whole path, else the file name. Only a line that matches
    nothing exactly is compared without its extension (webdataset shards store '<stem>.jpg'), and
    those matches are reported on stderr, with an example, so a list for another copy of the data
    is not taken silently. A line matching several files (exactly, or by stem) is an error."""
    import sys
    from pipelines.tools.webdataset import _key as shard_key
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as err:
        raise EvalError(f"subset file {path} cannot be read: {err}") from err
    exact: dict[str, list[int]] = {}
    stems: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        base = n.rsplit("/", 1)[-1]
        for key in {n, base}:
            exact.setdefault(key, []).append(i)
        for key in {n.rsplit(".", 1)[0], base.rsplit(".", 1)[0]}:
            stems.setdefault(key, []).append(i)
    out, missing, ambiguous, fuzzy = [], [], [], []
    for ln in lines:
        hits = exact.get(ln)
        if not hits:       # the stem as written, or as a webdataset key (dots and spaces -> '_')
            hits = stems.get(ln.rsplit(".", 1)[0]) or stems.get(shard_key(ln)[0])
            if hits and len(set(hits)) == 1:
                fuzzy.append((ln, names[hits[0]]))
        if not hits:
            missing.append(ln)
        elif len(set(hits)) > 1:
            ambiguous.append(ln)
        else:
            out.append(hits[0])
    if missing or ambiguous:
        raise EvalError(f"subset file {path}: {len(missing)} of {len(lines)} names are not in the split "
                        f"(e.g. {missing[:3]}), {len(ambiguous)} match several files (e.g. {ambiguous[:3]}; "
                        f"write them as <class>/<file>)")
    if fuzzy:
        print(f"eval.finetune: subset file {path}: {len(fuzzy)} of {len(lines)} names match a file with another "
              f"extension only (e.g. {fuzzy[0][0]} -> {fuzzy[0][1]})", file=sys.stderr)
    return np.unique(np.asarray(out, np.int64))


def write_subset_file(path: str | Path, names: list[str], indices: np.ndarray) -> None:
    """One line per image: its file name (SimCLR's format) when file names are unique, else '<class>/<file>'."""
    bases = [n.rsplit("/", 1)[-1] for n in names]
    unique = len(set(bases)) == len(bases)
    atomic_write_text(path, "".join((bases[i] if unique else names[i]) + "\n" for i in indices))


# ---- training -----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader, transform, device) -> tuple[float, float]:
    """Top-1, top-5 on the eval loader (each image once over all ranks)."""
    was = model.training
    model.eval()
    hits, idx = [], []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch in loader:
        with amp:
            logits = model(transform(batch.views[0])).float()
        hits.append(topk_correct(logits, batch.labels))
        idx.append(batch.indices)
    model.train(was)
    m = unique_mean(torch.cat(hits, 1), torch.cat(idx))
    return float(m[0]), float(m[1])


def finetune(model: Classifier, train_loader, val_loader, transform, preset: FinetunePreset,
             device: torch.device, *, epochs: int | None = None, show: bool = False,
             log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` (backbone and fc) on train_loader's crops; one history row per epoch."""
    n_epochs = epochs or preset.epochs
    milestones = scale_milestones(preset.milestones, preset.epochs, n_epochs)
    warmup = preset.warmup_epochs * n_epochs / preset.epochs
    # torch 2.13's CPU backward of a strided 1x1 convolution (the ResNet's downsample) corrupts
    # memory on channels-last inputs with an odd batch (segfaults measured at batch 3, 5, 7), and a
    # subset's last batch is often odd: on the CPU the fine-tune runs in the contiguous format
    contiguous = device.type == "cpu"
    if contiguous:
        model.to(memory_format=torch.contiguous_format)
    opt = build_optimizer(model, preset, preset.batch_size)
    net = dist.wrap_ddp(model.train().requires_grad_(True), device)
    steps = len(train_loader)
    if steps == 0:
        raise EvalError("the training subset yields no batch; lower --batch-size")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = []
    for epoch in range(n_epochs):
        train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        for s, batch in enumerate(progress(train_loader, f"fine-tune epoch {epoch + 1}/{n_epochs}", steps, show)):
            for g in opt.param_groups:
                g["lr"] = scheduled_lr(g["base_lr"], epoch + s / steps, n_epochs, preset.schedule, milestones,
                                       preset.gamma, warmup)
            x = transform(batch.views[0])
            with amp:
                logits = net(x.contiguous() if contiguous else x).float()
            loss = F.cross_entropy(logits, batch.labels, label_smoothing=preset.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        top1, top5 = evaluate(model, val_loader, transform, device)
        row = {"epoch": epoch + 1, "train_loss": float(dist.all_reduce_mean(loss_sum)) / steps,
               "val_top1": top1, "val_top5": top5, "lr_backbone": opt.param_groups[0]["lr"]}
        history.append(row)
        if log:
            log(row)
    return history


def _fraction_name(f: float) -> str:
    return f"{100 * f:g}percent"


@command("eval.finetune")
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m eval.finetune", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    p.add_argument("--data", default=None, help="data root (default: the run's): folder, .beton files or shards")
    p.add_argument("--loader", default=None, choices=["torchvision", "dali", "ffcv"])
    p.add_argument("--fraction", type=float, default=None, help="labelled fraction: 0.01, 0.1 or 1.0")
    p.add_argument("--subset", default=None, help="a subset list (SimCLR's 1percent.txt format) instead")
    p.add_argument("--full", action="store_true", help="full fine-tuning: AdamW + layer-wise lr decay")
    p.add_argument("--layer-decay", type=float, default=None, help="with --full (default 0.7)")
    p.add_argument("--scratch", action="store_true",
                   help="supervised training from scratch (a baseline): --random-init, every label, "
                        "torchvision's SGD recipe (SCRATCH_PRESET)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch (lr scales with it)")
    p.add_argument("--seed", type=int, default=0, help="subset draw")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("LO", "HI"),
                   help="training crops' area fraction (default the protocols' ImageNet 0.08 1; small images "
                        "such as Fashion-MNIST's 28 px keep more with e.g. 0.2 1)")
    p.add_argument("--out", default=None, help="result folder (default: <checkpoint folder>/eval)")
    p.add_argument("--max-train", type=int, default=0,
                   help="cap the training images (spread over the class-sorted subset; 0 = all)")
    p.add_argument("--max-val", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--random-init", action="store_true",
                   help="the same arch from random init: a baseline (see also --scratch)")
    p.add_argument("--name", default=None, help="result name (default finetune_<subset>)")
    p.add_argument("--save", action="store_true",
                   help="write the fine-tuned network to <out>/<name>.pt (torchvision keys, fc included)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the run's config keys as train.py takes them (masksiam/config.py), e.g. "
                        "val_split=test eval_size=64")
    args = p.parse_args(argv)
    if args.scratch:
        if args.full or args.subset or args.fraction not in (None, 1.0):
            p.error("--scratch trains every label from random init: drop --full, --subset and --fraction")
        args.random_init, args.fraction = True, 1.0
    if args.fraction is None and args.subset is None:
        args.fraction = 1.0 if args.full else 0.01

    from eval.common import eval_transform, open_checkpoint, write_results
    from eval.data import eval_loader, materialise_subset, sample_names
    cfg, info, backbone, _ = open_checkpoint(args.checkpoint, {"data": args.data, "loader": args.loader,
                                                               "workers": args.workers,
                                                               **parse_overrides(args.overrides)}, args.random_init)
    if args.scratch:
        preset = SCRATCH_PRESET
    elif args.full:
        preset = FULL_PRESET if args.layer_decay is None else dataclasses.replace(FULL_PRESET,
                                                                                  layer_decay=args.layer_decay)
    else:
        key = min(SEMI_PRESETS, key=lambda f: abs(f - (args.fraction or 0.01)))
        preset = SEMI_PRESETS[key]
    if args.batch_size:
        preset = dataclasses.replace(preset, batch_size=args.batch_size)
    size = cfg.eval_size or cfg.size
    cfg = dataclasses.replace(cfg, size=size, crop_scale=tuple(args.crop_scale), crop_ratio=(3 / 4, 4 / 3),
                              flip_prob=0.5)
    transform = eval_transform(cfg, info.device)          # the run's normalisation (+ high-pass for MSCN)
    out = Path(args.out or Path(args.checkpoint).parent / "eval")
    show = not args.no_progress
    t0 = time.perf_counter()
    subset, subset_file = None, None
    need_list = args.subset or args.fraction < 1 or args.max_train
    names, labels, classes = sample_names(cfg, cfg.train_split) if need_list else (None, None, None)
    if args.subset:
        subset = read_subset_file(args.subset, names)
        tag = Path(args.subset).stem
    elif args.fraction < 1:
        subset = balanced_subset(labels, args.fraction, args.seed)
        tag = f"{_fraction_name(args.fraction)}_seed{args.seed}"
    else:
        tag = "100percent"
        subset = np.arange(len(names)) if args.max_train else None
    if args.max_train and len(subset) > args.max_train:
        subset = subset[np.linspace(0, len(subset) - 1, args.max_train).round().astype(np.int64)]
        tag += f"_max{args.max_train}"
    n_train = len(subset) if subset is not None else None
    train_cfg = cfg
    if subset is not None:
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            subset_file = out / f"subset_{tag}.txt"
            write_subset_file(subset_file, names, subset)
        # the subset as a folder of links next to the results, read like any split; at least
        # one batch per rank even for a tiny subset (the last one padded by the loader)
        train_cfg = dataclasses.replace(materialise_subset(cfg, cfg.train_split, subset, out / f"subset_{tag}"),
                                        drop_last=n_train >= 2 * preset.batch_size)
    train_loader = eval_loader(train_cfg, info, cfg.train_split, train=True, batch_size=preset.batch_size)
    val_loader = eval_loader(cfg, info, cfg.val_split, batch_size=preset.batch_size, max_images=args.max_val)
    model = Classifier(backbone, len(val_loader.classes)).to(info.device)

    def log(row):
        if info.is_main:
            print(json.dumps({"finetune": row}), flush=True)

    history = finetune(model, train_loader, val_loader, transform, preset, info.device, epochs=args.epochs,
                       show=show, log=log)
    kind = "scratch" if args.scratch else "finetune_full" if args.full else "finetune"
    name = args.name or ("scratch" if args.scratch else f"finetune_{'full_' if args.full else ''}{tag}")
    final = history[-1]
    result = trained_result(kind, name, args.checkpoint, history,
                            {**dataclasses.asdict(preset), "epochs": len(history), "fraction": args.fraction,
                             "crop_scale": list(args.crop_scale),
                             "subset": str(subset_file or args.subset or ""), "train_images": n_train,
                             "seed": args.seed, "loader": cfg.loader, "data": cfg.data,
                             "random_init": args.random_init, "world_size": info.world_size,
                             "seconds": round(time.perf_counter() - t0, 1)})
    if info.is_main:
        paths = write_results(out, name, result)
        if args.save:                               # eval.export reads it (its fc: "fine-tuned")
            from masksiam import checkpoint as ckpt_io
            ckpt_io.save_atomic({k: v.detach().cpu() for k, v in model.torchvision_named_state()}, out / f"{name}.pt")
        print(f"{name}: top-1 {100 * final['val_top1']:.2f}%  top-5 {100 * final['val_top5']:.2f}%  -> "
              f"{paths['json']}", flush=True)
    dist.cleanup()
    return result


if __name__ == "__main__":
    main()
