"""The loader spec: every setting a loader needs, derived from the config once.

    spec = loader_spec(cfg, info, train=True)     # frozen; build_loader makes it and hands it over
    spec.views, spec.view_sizes, spec.view_scales # the crops, in Batch.views order
    order = spec.read_order_of(n, shard_of, labels)   # once per loader: the resolved read order
    spec.shard(n, epoch, order)                   # this rank's sample order of one epoch
    spec.boxes(epoch, index, height, width)       # (V, 5) crop boxes + flips of one sample
    spec.keep(n)                                  # which of n samples max_images keeps

Loaders read the spec and never the config's data keys (views, size, crop_scale, crops, batch_size,
drop_last, max_images, eval_size, ...): the per-rank batch, the eval crop, the max_images spread
and the crop draws are computed here and nowhere else.

Crops (`crops=` in the config): groups of views separated by commas, each `COUNTxSIZE@LO-HI`, the
count and scale range optional, e.g. SwAV / DINO's multi-crop

    crops=2x224@0.14-1,6x96@0.05-0.14      # 2 global views of 224 px, then 6 local views of 96 px

"" (the default) is one group of `views` x `size` at `crop_scale`; with groups, `views` must
equal their total count (the recipe takes that many crops). Batch.views lists the views
in this order; each is RandomResizedCrop(size, scale, crop_ratio) + a flip with flip_prob of the
same decoded image. Evaluation (train=False) is one view: the short side resized to size/0.875
(ImageNet's 256 for 224; the size itself at 64 px and below), then the central size x size.

Crop draws. Sample `index` of epoch `epoch` draws from sample_rng(seed, epoch, index), view by
view in Batch.views order: its box (torchvision's RandomResizedCrop.get_params), then one uniform
for the flip. Every loader takes its boxes from `boxes`, so the same seed, epoch and index give the
same crops in every loader, whatever worker or thread decodes the image.

Read order (`read_order=`, README "Read order"). Every order is a pure function of (seed, epoch,
rank): a resumed run skips start_batch batches of the same order, with no reader or buffer state
saved.
  sample   one permutation of every sample from (seed, epoch), cut into per-rank parts
           (common.shard_indices): full randomness; each rank reads from every shard or folder.
  shard    locality: the shards of a webdataset split (the folder's chunks of shuffle_buffer / 4
           files in its sorted order for an ImageFolder) in a shuffled order from (seed, epoch);
           each rank reads a contiguous block of that stream (whole shards but where a block ends
           inside one) through a shuffle buffer of shuffle_buffer samples from (seed, epoch, rank)
           (common.shard_order_indices). The buffer is computed, not held: resume stays exact.
           FFCV: its page-local quasi_random order.
  auto     shard for a training split of webdataset shards that mix the classes
           (common.class_mixing >= MIN_MIXING), with at least AUTO_MIN_BUFFERS buffers of samples and
           AUTO_MIN_SHARDS shards per rank; sample otherwise: small splits, folders and FFCV (a
           folder's files and the pages convert.py ffcv writes are in class order, so a few chunks
           or pages at a time hold a few classes; class_mixing is not read from a .beton).
Evaluation loaders read in index order (sequential) whatever the setting. Per rank the counts, the
drop_last tail and the padding are the same in every order (num_batches).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from masksiam.config import ConfigError
from pipelines.loaders.common import (DataError, chunk_bounds, class_mixing, num_batches, per_rank_batch,
                                      random_resized_crop_params, run_bounds, sample_rng, shard_indices,
                                      shard_order_indices, spread)

BAD_IMAGES = ("skip", "stop")
READ_ORDERS = ("auto", "sample", "shard")
MIN_MIXING = 0.5           # auto: shards must hold at least half the classes they could (class_mixing)
AUTO_MIN_BUFFERS = 4       # auto: a split of fewer samples than 4 buffers reads in sample order
AUTO_MIN_SHARDS = 2        # auto: ... and of fewer shards than 2 per rank


@dataclass(frozen=True)
class ReadOrder:
    """The read order of one loader's samples, resolved once (LoaderSpec.read_order_of)."""
    kind: str                            # "sample", "shard" or "sequential" (evaluation)
    bounds: np.ndarray | None = None     # shard: (S + 1,) int64 first sample of each shard, then n
    buffer: int = 0                      # shard: shuffle-buffer slots

    def __str__(self) -> str:
        if self.kind != "shard":
            return self.kind
        return f"shard ({len(self.bounds) - 1} shards, shuffle buffer {self.buffer})"


@dataclass(frozen=True)
class CropGroup:
    count: int
    size: int
    scale: tuple[float, float]

    def __str__(self) -> str:
        return f"{self.count}x{self.size}@{self.scale[0]:g}-{self.scale[1]:g}"


_GROUP = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\d+)\s*(?:@\s*([0-9.eE+-]+?)\s*-\s*([0-9.eE+-]+))?\s*$")


def parse_crops(text: str, size: int, views: int, scale: tuple[float, float],
                where: str = "crops") -> tuple[CropGroup, ...]:
    """`crops=` -> crop groups; "" is `views` x `size` at `scale`. Errors name the key and the group."""
    if not text.strip():
        groups = (CropGroup(views, size, tuple(scale)),)
    else:
        groups = []
        for part in text.split(","):
            m = _GROUP.match(part)
            if not m:
                raise ConfigError(f"{where}: {part.strip()!r} is not COUNTxSIZE@LO-HI "
                                  f"(e.g. crops=2x224@0.14-1,6x96@0.05-0.14)")
            try:
                lo_hi = (float(m[3]), float(m[4])) if m[3] is not None else tuple(scale)
            except ValueError:
                raise ConfigError(f"{where}: {part.strip()!r}: the scale range is not two numbers") from None
            groups.append(CropGroup(int(m[1] or 1), int(m[2]), lo_hi))
        groups = tuple(groups)
    for g in groups:
        if g.count < 1 or g.size < 1:
            raise ConfigError(f"{where}: {g}: count and size must be at least 1")
        if not 0 < g.scale[0] <= g.scale[1] <= 1:
            raise ConfigError(f"{where}: {g}: the scale range must satisfy 0 < lo <= hi <= 1")
    return groups


def eval_short_side(size: int) -> int:
    """The short side that the eval crop resizes to: size/0.875 (256 for 224), `size` up to 64 px."""
    return size if size <= 64 else int(round(size / 0.875))


@dataclass(frozen=True)
class LoaderSpec:
    train: bool
    crops: tuple[CropGroup, ...]     # train: the crop groups; eval: one view at the eval size
    ratio: tuple[float, float]       # RandomResizedCrop aspect-ratio range
    flip_prob: float
    batch_size: int                  # per rank
    rank: int
    world_size: int
    seed: int
    drop_last: bool
    max_images: int                  # 0 = all
    workers: int
    prefetch: int
    device: torch.device
    bad_images: str = "skip"         # skip: replace an unreadable image (see common.replacement); stop: DataError
    max_bad_images: int = 100        # skip: stop once more than this many distinct images were bad
    read_order: str = "sample"       # auto / sample / shard (module docstring)
    shuffle_buffer: int = 10_000     # read_order shard: buffer slots (samples)

    # ---- views --------------------------------------------------------------------------------
    @property
    def views(self) -> int:
        return sum(g.count for g in self.crops)

    @property
    def view_sizes(self) -> tuple[int, ...]:
        return tuple(g.size for g in self.crops for _ in range(g.count))

    @property
    def view_scales(self) -> tuple[tuple[float, float], ...]:
        return tuple(g.scale for g in self.crops for _ in range(g.count))

    @property
    def eval_size(self) -> int:
        return self.crops[0].size

    @property
    def eval_short_side(self) -> int:
        return eval_short_side(self.eval_size)

    @property
    def shuffle(self) -> bool:
        return self.train

    # ---- samples and order --------------------------------------------------------------------
    def keep(self, n: int) -> np.ndarray:
        return spread(n, self.max_images)

    def read_order_of(self, n: int, shard_of: np.ndarray | None = None,
                      labels: np.ndarray | None = None) -> ReadOrder:
        """The order to read n samples in, the one place `read_order` is decided (module docstring).
        shard_of: (n,) the shard of each sample, non-decreasing (a webdataset split); None for a
        folder. labels: (n,) for the class-mixing check (auto) and its note (shard)."""
        if not self.train:
            return ReadOrder("sequential")
        if self.read_order == "sample" or n == 0:
            return ReadOrder("sample")
        if self.read_order == "auto" and (shard_of is None or n < AUTO_MIN_BUFFERS * self.shuffle_buffer):
            return ReadOrder("sample")
        bounds = run_bounds(shard_of) if shard_of is not None else chunk_bounds(n, self.shuffle_buffer // 4)
        mixing = class_mixing(labels, bounds) if labels is not None else 1.0
        if self.read_order == "auto" and (mixing < MIN_MIXING or len(bounds) - 1 < AUTO_MIN_SHARDS * self.world_size):
            return ReadOrder("sample")
        if mixing < MIN_MIXING and self.rank == 0:
            print(f"read_order=shard: a shard holds {mixing:.0%} of the classes it could (its samples are "
                  f"in class order), so a shuffle buffer of {self.shuffle_buffer} samples mixes few classes; "
                  "read_order=sample mixes them all", flush=True)
        return ReadOrder("shard", bounds, self.shuffle_buffer)

    def shard(self, n: int, epoch: int, order: ReadOrder | None = None) -> np.ndarray:
        """This rank's sample indices of one epoch, in read order (`order`: read_order_of's; None:
        sample order for training, sequential for evaluation)."""
        if order is not None and order.kind == "shard":
            return shard_order_indices(order.bounds, self.rank, self.world_size, self.seed, epoch,
                                       self.batch_size, order.buffer, self.drop_last)
        return shard_indices(n, self.rank, self.world_size, self.seed, epoch, self.batch_size,
                             self.shuffle, self.drop_last)

    def ffcv_order(self, configured: str) -> str:
        """FFCV's traversal order (ffcv_loader.RankOrder): `ffcv_order` when set; else read_order=shard
        is FFCV's page-local quasi_random, auto and sample its random order (convert.py ffcv writes
        a .beton class by class, and quasi_random draws from a few pages at a time); evaluation
        reads sequentially."""
        if not self.train:
            return "sequential"
        if configured != "auto":
            return configured
        return "quasi_random" if self.read_order == "shard" else "random"

    def num_batches(self, n: int) -> int:
        return num_batches(n, self.world_size, self.batch_size, self.drop_last)

    # ---- crops --------------------------------------------------------------------------------
    def boxes(self, epoch: int, index: int, height: int, width: int) -> np.ndarray:
        """(V, 5) int64 rows (top, left, h, w, flip) of sample `index` in `epoch` (see the module
        docstring); train only: evaluation's crop is deterministic (eval_short_side)."""
        rng = sample_rng(self.seed, epoch, index)
        out = np.empty((self.views, 5), np.int64)
        for v, scale in enumerate(self.view_scales):
            out[v, :4] = random_resized_crop_params(height, width, scale, self.ratio, rng)
            out[v, 4] = rng.random() < self.flip_prob
        return out


def loader_spec(cfg, info, train: bool = True) -> LoaderSpec:
    """The spec of a train (random crops, cfg.drop_last) or eval (one center crop, every image) loader."""
    if cfg.bad_images not in BAD_IMAGES:
        raise ConfigError(f"bad_images={cfg.bad_images!r}: choose one of {', '.join(BAD_IMAGES)}")
    if cfg.read_order not in READ_ORDERS:
        raise ConfigError(f"read_order={cfg.read_order!r}: choose one of {', '.join(READ_ORDERS)}")
    if cfg.shuffle_buffer < 1:
        raise ConfigError(f"shuffle_buffer={cfg.shuffle_buffer}: must be at least 1 (samples)")
    if train:
        crops = parse_crops(cfg.crops, cfg.size, cfg.views, tuple(cfg.crop_scale))
        if sum(g.count for g in crops) != cfg.views:
            raise ConfigError(f"views={cfg.views} but crops={cfg.crops!r} gives {sum(g.count for g in crops)} "
                              f"views: set views to that number (the recipe's sources)")
    else:
        crops = (CropGroup(1, cfg.eval_size or cfg.size, (1.0, 1.0)),)
    return LoaderSpec(
        train=train, crops=crops, ratio=tuple(cfg.crop_ratio), flip_prob=float(cfg.flip_prob),
        batch_size=per_rank_batch(cfg.batch_size, info.world_size), rank=info.rank,
        world_size=info.world_size, seed=cfg.seed, drop_last=cfg.drop_last if train else False,
        max_images=cfg.max_images, workers=cfg.workers, prefetch=cfg.prefetch, device=info.device,
        bad_images=cfg.bad_images, max_bad_images=cfg.max_bad_images, read_order=cfg.read_order,
        shuffle_buffer=cfg.shuffle_buffer)


def check_bad(spec: LoaderSpec, bad: list[str], name: str, reason: str) -> None:
    """Record bad image `name` (once) in `bad`; raise DataError under bad_images=stop or past the limit."""
    if spec.bad_images == "stop":
        raise DataError(f"cannot use image {name}: {reason} (bad_images=stop; bad_images=skip replaces "
                        f"it by the next image of its class or shard)")
    entry = f"{name}: {reason}"
    if entry not in bad:
        bad.append(entry)
    if len(bad) > spec.max_bad_images:
        raise DataError(f"{len(bad)} bad images, more than max_bad_images={spec.max_bad_images}: "
                        + "; ".join(bad[:20]) + (" ..." if len(bad) > 20 else "")
                        + "\n  `python convert.py validate <data>` lists every bad file")

