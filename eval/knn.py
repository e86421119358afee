"""Weighted kNN classification on frozen backbone features (Wu et al. 2018; the SSL monitor).

    python -m eval.knn --checkpoint runs/demo/checkpoint.pt --data data/fashion-mnist [--k 200 --t 0.1]
    python -m eval.knn --checkpoint runs/demo/checkpoint.pt --random-init     # same arch, untrained

Features are the backbone's pooled outputs, L2-normalised; each validation image takes the k most
cosine-similar training images and votes with weight exp(similarity / t). Images go through the eval
loader (resize + center crop) and the recipe's eval transform (normalisation, plus the high-pass
filter for MSCN recipes).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys

import torch
import torch.nn.functional as F

import masksiam  # noqa: F401
from masksiam import checkpoint as ckpt_io
from masksiam import dist
from masksiam.config import Config, apply


@torch.no_grad()
def extract_features(backbone, loader, transform, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, F) L2-normalised float32 features and (M,) labels, in dataset order, gathered over ranks."""
    was_training = backbone.training
    backbone.eval()
    feats, labels, indices = [], [], []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch in loader:
        with amp:
            h = backbone(transform(batch.views[0]))
        feats.append(F.normalize(h.float(), dim=1))
        labels.append(batch.labels)
        indices.append(batch.indices)
    backbone.train(was_training)
    feats, labels, indices = (dist.gather_no_grad(torch.cat(t)) for t in (feats, labels, indices))
    # padded shards repeat a few samples: keep the first occurrence of each index, in index order
    order = torch.argsort(indices, stable=True)
    indices, feats, labels = indices[order], feats[order], labels[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return feats[first], labels[first]


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """bank (M, F), queries (Q, F), both L2-normalised -> (Q,) predicted labels by weighted vote."""
    k = min(k, bank.shape[0])
    preds = []
    for q in queries.split(chunk):
        sim = q @ bank.t()                                   # (q, M) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)                # (q, k)
        weights = (top_sim / t).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(backbone, train_loader, val_loader, transform, device, num_classes: int,
                 k: int = 200, t: float = 0.1) -> float:
    bank, bank_labels = extract_features(backbone, train_loader, transform, device)
    queries, labels = extract_features(backbone, val_loader, transform, device)
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, t)
    return (pred == labels).float().mean().item()


def knn_accuracy_from_config(cfg: Config, info, backbone) -> float:
    """kNN top-1 on cfg.val_split with cfg.train_split as the memory bank, through the eval loader."""
    from pipelines.augment.engine import build_augmenter
    from pipelines.loaders.torchvision_loader import build as build_eval_loader
    eval_batch = max(info.world_size, min(256, cfg.batch_size) // info.world_size * info.world_size)
    base = dataclasses.replace(cfg, batch_size=eval_batch, loader="torchvision")
    train_loader = build_eval_loader(dataclasses.replace(base, max_images=cfg.knn_max_train), info,
                                     cfg.train_split, train=False)
    val_loader = build_eval_loader(dataclasses.replace(base, max_images=cfg.knn_max_val), info,
                                   cfg.val_split, train=False)
    augmenter = build_augmenter(cfg.recipe, size=cfg.eval_size or cfg.size, device=info.device,
                                dtype=torch.float32, seed=cfg.seed, rank=info.rank)
    transform = functools.partial(augmenter.eval_transform, highpass=cfg.highpass_eval)
    return knn_accuracy(backbone, train_loader, val_loader, transform, info.device,
                        len(train_loader.classes), cfg.knn_k, cfg.knn_t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: the run's)")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--t", type=float, default=None)
    p.add_argument("--max-train", type=int, default=None, help="cap the memory bank (0 = all)")
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--random-init", action="store_true", help="evaluate the same arch at random init")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from models.resnet import build_backbone_from_config, load_backbone_state
    state = ckpt_io.load(args.checkpoint)
    if "config" not in state:
        sys.exit(f"eval.knn: {args.checkpoint} is not a train.py checkpoint (no 'config')")
    overrides = {"data": args.data, "knn_k": args.k, "knn_t": args.t, "knn_max_train": args.max_train,
                 "knn_max_val": args.max_val, "workers": args.workers}
    cfg = apply(apply(Config(), state["config"], args.checkpoint),
                {k: v for k, v in overrides.items() if v is not None}, "command line")
    info = dist.init_distributed()
    torch.manual_seed(cfg.seed)
    backbone = build_backbone_from_config(cfg)
    if not args.random_init:
        load_backbone_state(backbone, ckpt_io.backbone_state(state))
    backbone = backbone.to(info.device, memory_format=torch.channels_last)
    top1 = knn_accuracy_from_config(cfg, info, backbone)
    result = {"checkpoint": args.checkpoint, "random_init": args.random_init, "arch": cfg.arch,
              "k": cfg.knn_k, "t": cfg.knn_t, "knn_top1": top1}
    if info.is_main:
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    dist.cleanup()
    return result


if __name__ == "__main__":
    main()
