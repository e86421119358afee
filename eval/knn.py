"""Weighted kNN classification on frozen backbone features (Wu et al. 2018; the SSL monitor).

    python -m eval.knn --checkpoint runs/demo/checkpoint.pt --data data/fashion-mnist [--k 200 --t 0.1]
    python -m eval.knn --checkpoint runs/demo/checkpoint.pt --random-init     # same arch, untrained
    torchrun --nproc_per_node=8 -m eval.knn --checkpoint ...                  # bank sharded over ranks

Features are the backbone's pooled outputs, L2-normalised; each validation image takes the k most
cosine-similar training images and votes with weight exp(similarity / t). Images come through the
run's loader (`loader=`: an image folder, a .beton or webdataset shards; eval crop: resize + center
crop) and the recipe's eval transform (normalisation, plus the high-pass filter for MSCN recipes).

The memory bank stays sharded: each rank keeps the features of the training images it read, in
half precision (1.28 M x 2048 is 5 GB in float16 over all ranks, not 10 GB float32 on each), scores
every query against its shard and the per-rank top-k are merged. The queries (the validation set)
are gathered on every rank.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import masksiam  # noqa: F401
from masksiam import dist
from masksiam.errors import ArgumentParser, command
from masksiam.io import atomic_write_text
from masksiam.config import Config, parse_overrides


@torch.no_grad()
def embed(backbone, loader, transform, device, *, normalize: bool = True, dtype=torch.float32,
          desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (M_r, F) features (L2-normalised if `normalize`, stored as `dtype`), (M_r,)
    labels and (M_r,) dataset indices, in the order the loader gave them; backbone in eval mode.

    The outputs are allocated once, at the first batch, for len(loader) batches of its size (the
    rank's share of the split; a short last batch leaves a few spare rows, sliced off), and each
    batch is written in place: peak is the bank plus one batch, not a list of batches plus their
    concatenation (2x)."""
    from eval.common import progress
    was_training = backbone.training
    backbone.eval()
    feats = labels = indices = None
    rows = 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = loader if desc is None else progress(loader, desc, total=len(loader))
    for batch in batches:
        with amp:
            h = backbone(transform(batch.views[0])).float()             # (B, F)
        h = (F.normalize(h, dim=1) if normalize else h).to(dtype)
        b = h.shape[0]
        if feats is None:
            cap = (len(loader) if hasattr(loader, "__len__") else 1) * b
            feats = torch.empty((cap, h.shape[1]), dtype=dtype, device=h.device)
            labels = torch.empty((cap,), dtype=batch.labels.dtype, device=batch.labels.device)
            indices = torch.empty((cap,), dtype=batch.indices.dtype, device=batch.indices.device)
        elif rows + b > feats.shape[0]:
            # a loader without len() or whose batches exceed its first one's size: grow by doubling
            cap = max(2 * feats.shape[0], rows + b)
            feats, labels, indices = (torch.cat([t[:rows], t.new_empty((cap - rows, *t.shape[1:]))])
                                      for t in (feats, labels, indices))
        feats[rows:rows + b] = h
        labels[rows:rows + b] = batch.labels
        indices[rows:rows + b] = batch.indices
        rows += b
        del h
    backbone.train(was_training)
    if feats is None:
        raise RuntimeError("embed: the loader gave no batches")
    return feats[:rows], labels[:rows], indices[:rows]


def keep_rows_(keep: torch.Tensor, *tensors: torch.Tensor, block_bytes: int = 1 << 24) -> list[torch.Tensor]:
    """Keep the rows where the (M,) bool `keep` is set, in order, moving them to the front of each
    (M, ...) tensor in place -> views of the first keep.sum() rows (the storage is not shrunk).

    Row j of the result comes from row pos[j] >= j, so copying in increasing blocks of destination
    rows never overwrites a row a later block still reads; extra memory is one block (`block_bytes`)."""
    pos = keep.nonzero().squeeze(1)                                   # (n,) increasing
    n = pos.numel()
    for t in tensors:
        block = max(1, block_bytes // max(1, t[:1].nbytes))
        for start in range(0, n, block):
            src = pos[start:start + block]
            t[start:start + src.numel()] = t.index_select(0, src)
    return [t[:n] for t in tensors]


def owned(indices: torch.Tensor) -> torch.Tensor:
    """(M_r,) bool: the samples this rank keeps, so every dataset index is kept exactly once.

    Eval loaders pad the last per-rank batch by wrapping around (pipelines/loaders/common.py), so a
    few images are read on two ranks; only the indices (8 bytes per image) are gathered to decide:
    the lowest rank holding an index keeps it, and a rank keeps its first copy."""
    first = torch.ones_like(indices, dtype=torch.bool)
    order = torch.argsort(indices, stable=True)
    s = indices[order]
    first[order[1:]] = s[1:] != s[:-1]
    if dist.world_size() == 1:
        return first
    counts = dist.gather_no_grad(torch.tensor([indices.numel()], device=indices.device))
    width = int(counts.max())
    padded = torch.full((width,), -1, dtype=indices.dtype, device=indices.device)
    padded[:indices.numel()] = indices
    everyone = dist.gather_no_grad(padded).view(-1, width)            # (W, width), -1 = padding
    n = int(everyone.max()) + 1
    owner = torch.full((n,), dist.world_size(), dtype=torch.int64, device=indices.device)
    for r in range(dist.world_size()):
        ids = everyone[r][everyone[r] >= 0]
        owner.scatter_reduce_(0, ids, torch.full_like(ids, r), reduce="amin")
    return first & (owner[indices] == dist.rank())


@torch.no_grad()
def extract_features(backbone, loader, transform, device, *, normalize: bool = True,
                     desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, F) float32 features and (M,) labels of the whole split, in dataset order, on every rank.

    Padded shards repeat a few samples: the first occurrence of each index is kept. Rows already in
    index order (a sequential eval loader: only the padding copies are out of place) are compacted
    in place (peak 1x the features); any other order costs one copy (2x)."""
    feats, labels, indices = embed(backbone, loader, transform, device, normalize=normalize, desc=desc)
    feats, labels, indices = (dist.gather_no_grad(t) for t in (feats, labels, indices))
    order = torch.argsort(indices, stable=True)                       # copies of an index: lowest row first
    s = indices[order]
    first = torch.ones_like(s, dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    rows = order[first]                                               # (M,) rows to keep, in index order
    del order, s, first, indices
    if bool((rows[1:] > rows[:-1]).all()):
        keep = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
        keep[rows] = True
        feats, labels = keep_rows_(keep, feats, labels)
        return feats, labels
    return feats.index_select(0, rows), labels.index_select(0, rows)


def _vote(top_sim: torch.Tensor, top_labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """(q, k) similarities and labels of the neighbours -> (q,) class with the largest exp(s/t) sum."""
    weights = (top_sim.float() / t).exp()
    votes = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device, dtype=weights.dtype)
    votes.scatter_add_(1, top_labels, weights)
    return votes.argmax(1)


def _local_topk(q: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int,
                block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, F) queries against this rank's (M_r, F) bank -> (q, k) float32 similarities, labels,
    padded with -inf where the shard has fewer than k images. The bank is scored in blocks: on
    CUDA in its own (half) precision, on CPU upcast per block (CPU half matmuls are slow)."""
    best_sim = torch.full((q.shape[0], k), float("-inf"), device=q.device)
    best_lab = torch.zeros((q.shape[0], k), dtype=torch.int64, device=q.device)
    compute = bank.dtype if q.device.type == "cuda" else torch.float32
    qc = q.to(compute)
    for start in range(0, bank.shape[0], block):
        b = bank[start:start + block].to(compute)
        sim = (qc @ b.t()).float()                                   # (q, block)
        kk = min(k, sim.shape[1])
        s, i = sim.topk(kk, dim=1)
        cand_sim = torch.cat([best_sim, s], 1)
        cand_lab = torch.cat([best_lab, bank_labels[start:start + block][i]], 1)
        best_sim, j = cand_sim.topk(k, dim=1)
        best_lab = cand_lab.gather(1, j)
    return best_sim, best_lab


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024, sharded: bool = False) -> torch.Tensor:
    """bank (M, F), queries (Q, F), both L2-normalised -> (Q,) predicted labels by weighted vote.

    sharded=True: `bank` is this rank's shard (sizes may differ); every rank passes the same
    queries and gets the same predictions, those of the union of the shards."""
    sharded = sharded and dist.world_size() > 1
    total = bank.shape[0]
    if sharded:
        total = int(dist.gather_no_grad(torch.tensor([total], device=bank.device)).sum())
    k = min(k, total)
    preds = []
    for q in queries.split(chunk):
        top_sim, top_lab = _local_topk(q, bank, bank_labels, k)      # (q, k) on this shard
        if sharded:                                                  # (W*q, k) -> (q, W*k) -> top k
            sims = dist.gather_no_grad(top_sim).view(-1, *top_sim.shape).permute(1, 0, 2).flatten(1)
            labs = dist.gather_no_grad(top_lab).view(-1, *top_lab.shape).permute(1, 0, 2).flatten(1)
            top_sim, j = sims.topk(k, dim=1)
            top_lab = labs.gather(1, j)
        preds.append(_vote(top_sim, top_lab, num_classes, t))
    return torch.cat(preds)


def bank_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def knn_accuracy(backbone, train_loader, val_loader, transform, device, num_classes: int,
                 k: int = 200, t: float = 0.1, progress: bool = False) -> float:
    """Top-1 of the weighted vote; the bank stays sharded over ranks (half precision on CUDA)."""
    bank, bank_labels, idx = embed(backbone, train_loader, transform, device, dtype=bank_dtype(device),
                                   desc="kNN bank" if progress else None)
    # DDP padding read a few images on two ranks: drop the copies in place (no second bank)
    bank, bank_labels = keep_rows_(owned(idx), bank, bank_labels)
    del idx
    queries, labels = extract_features(backbone, val_loader, transform, device,
                                       desc="kNN queries" if progress else None)
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, t, sharded=True)
    return (pred == labels).float().mean().item()


def knn_accuracy_from_config(cfg: Config, info, backbone, progress: bool | None = None) -> float:
    """kNN top-1 on cfg.val_split with cfg.train_split as the memory bank, read by cfg.loader;
    progress bars on rank 0 as cfg.progress says unless `progress` is given (train.py's kNN: both
    the monitor and the final one)."""
    from eval.common import eval_transform
    from eval.data import eval_loader
    batch = min(256, cfg.batch_size)
    train_loader = eval_loader(cfg, info, cfg.train_split, batch_size=batch, max_images=cfg.knn_max_train)
    val_loader = eval_loader(cfg, info, cfg.val_split, batch_size=batch, max_images=cfg.knn_max_val)
    transform = eval_transform(cfg, info.device)
    return knn_accuracy(backbone, train_loader, val_loader, transform, info.device,
                        len(train_loader.classes), cfg.knn_k, cfg.knn_t, cfg.progress if progress is None else progress)


@command("eval.knn")
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m eval.knn", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    p.add_argument("--data", default=None, help="data root (default: the run's); format as the loader reads it")
    p.add_argument("--loader", default=None, choices=["torchvision", "dali", "ffcv"],
                   help="default: the run's, or the one whose files --data holds")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--t", type=float, default=None)
    p.add_argument("--max-train", type=int, default=None, help="cap the memory bank (0 = all)")
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--random-init", action="store_true", help="evaluate the same arch at random init")
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    p.add_argument("--out", default=None,
                   help="result folder for <name>.json / .md / .png (default: <checkpoint folder>/eval)")
    p.add_argument("--name", default=None,
                   help="result name: <out>/<name>.json and its report column (default knn; knn_random_init "
                        "with --random-init, so it does not replace the trained network's result)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the run's config keys as train.py takes them (masksiam/config.py), e.g. "
                        "val_split=test eval_size=64")
    args = p.parse_args(argv)

    from eval.common import open_checkpoint, write_results
    overrides = {"data": args.data, "loader": args.loader, "knn_k": args.k, "knn_t": args.t,
                 "knn_max_train": args.max_train, "knn_max_val": args.max_val, "workers": args.workers,
                 **parse_overrides(args.overrides)}
    cfg, info, backbone, _ = open_checkpoint(args.checkpoint, overrides, args.random_init)
    top1 = knn_accuracy_from_config(cfg, info, backbone, progress=not args.no_progress)
    result = {"checkpoint": args.checkpoint, "random_init": args.random_init, "arch": cfg.arch,
              "k": cfg.knn_k, "t": cfg.knn_t, "knn_top1": top1}
    if info.is_main:
        print(json.dumps(result))
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        # every eval command writes <out>/<name>.json (README), --out or not
        from pathlib import Path
        name = args.name or ("knn_random_init" if args.random_init else "knn")
        out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
        result["files"] = {k: str(v) for k, v in write_results(out, name, {
            "eval": "knn", "label": name, "checkpoint": args.checkpoint, "metrics": {"knn_top1": top1},
            "curves": {}, "settings": {"k": cfg.knn_k, "t": cfg.knn_t, "loader": cfg.loader,
                                       "random_init": args.random_init}}).items()}
    dist.cleanup()
    return result


if __name__ == "__main__":
    main()
