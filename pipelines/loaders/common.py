"""The loader contract and the pieces every loader shares.

Contract (torchvision, DALI and FFCV loaders all meet it):

    loader = build_loader(cfg, info, split="train")     # pipelines/loaders/__init__.py
    loader.set_epoch(epoch, start_batch=0)              # reshuffle from the run seed; skip batches on resume
    len(loader)                                         # batches per epoch on this rank
    loader.bad_images                                   # ["file: reason"] replaced so far (bad_images=skip)
    for batch in loader:                                # Batch(views, labels, indices)
        batch.views    # V tensors (spec.views), view v (N, 3, S_v, S_v) uint8, channels-last, on info.device
        batch.labels   # (N,) int64 on info.device: class index from the folder name
        batch.indices  # (N,) int64 on info.device: position of each image in the split's file list

N = cfg.batch_size // world_size. Every view is an independent RandomResizedCrop(S_v, scale_v, ratio)
plus a horizontal flip with probability flip_prob of the same decoded image, its box drawn by
LoaderSpec.boxes. Everything after crop and flip (colour, blur, masks, normalisation) belongs to the
batched augment stage.

Settings: every loader reads one frozen LoaderSpec (spec.py: views, sizes, scales, the eval crop,
per-rank batch, drop_last, max_images, bad_images) built once from the config by `build_loader`.

Views: `crops=` gives groups of views of different sizes (multi-crop, e.g. 2 x 224 px + 6 x 96 px);
batch.views lists them in that order, each (N, 3, S_v, S_v). Each image is decoded once for all.

Bad images (bad_images=skip, the default): a file that cannot be read or decoded is replaced by
`replacement` (the next image of its class folder or shard, deterministic), and named in
`loader.bad_images` ("file: reason" per distinct image); more than max_bad_images of them, or any
under bad_images=stop, raise DataError naming them.

Shuffling: the order of an epoch is a permutation drawn from (seed, epoch) alone, cut into disjoint
per-rank parts (`shard_indices`), so every rank agrees without communication and a resumed run sees
the same order. Per-sample crop randomness comes from (seed, epoch, index) (`sample_rng`), so crops
do not depend on which worker or thread decoded the image.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch

from masksiam.config import ConfigError

from masksiam.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class Batch(NamedTuple):
    views: list[torch.Tensor]   # V x (N, 3, S_v, S_v) uint8 channels-last, in crop order
    labels: torch.Tensor        # (N,) int64
    indices: torch.Tensor       # (N,) int64


class Loader(Protocol):
    classes: list[str]
    bad_images: list[str]

    def __iter__(self): ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


class DataError(UserError, RuntimeError):
    """A dataset problem; the message names the file or folder."""


@dataclass(frozen=True)
class ImageList:
    root: Path
    paths: list[str]        # relative to root, sorted: class folder, then file name
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def scan_image_folder(root: str | Path, max_images: int = 0) -> ImageList:
    """ImageNet's layout: root/<class>/<image>. Deterministic order; max_images > 0 keeps `spread` of them."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        names = sorted(e.name for e in os.scandir(root / cls)
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        paths += [f"{cls}/{n}" for n in names]
        labels += [label] * len(names)
    if not paths:
        raise DataError(f"image folder {root} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    keep = spread(len(paths), max_images)
    return ImageList(root, [paths[i] for i in keep], [labels[i] for i in keep], classes)


def spread(n: int, max_images: int) -> np.ndarray:
    """Which of n samples `max_images` keeps: spread evenly over the list (so over every class of a
    class-sorted list rather than the first class only); all of them when max_images is 0 or >= n."""
    if 0 < max_images < n:
        return np.linspace(0, n - 1, max_images).round().astype(np.int64)
    return np.arange(n, dtype=np.int64)


def split_dir(data: str | Path, split: str) -> Path:
    path = Path(data) / split
    if not path.is_dir():
        raise DataError(f"split folder {path} does not exist (data={data}, split={split})")
    return path


def per_rank_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ConfigError(f"batch_size={batch_size} is not divisible by the world size {world_size}")
    return batch_size // world_size


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def shard_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, batch_size: int,
                  shuffle: bool = True, drop_last: bool = True) -> np.ndarray:
    """This rank's sample indices for one epoch, a whole number of per-rank batches when drop_last.

    The permutation is cut so that every rank gets the same number of samples: with drop_last the
    tail that does not fill a global batch is dropped; without it the permutation is padded by
    wrapping around (as DistributedSampler does) so the last batch is full on every rank, except
    that the final partial batch keeps its true size.
    """
    order = epoch_permutation(n, seed, epoch, shuffle)
    global_batch = batch_size * world_size
    if drop_last:
        usable = (n // global_batch) * global_batch
        order = order[:usable]
    else:
        per_rank = math.ceil(n / world_size)
        pad = per_rank * world_size - n
        if pad:
            order = np.concatenate([order, order[:pad]])
    # interleave so rank r takes every world_size-th sample: each global batch spans all ranks
    return order[rank::world_size]


def num_batches(n: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return n // (batch_size * world_size)
    return math.ceil(math.ceil(n / world_size) / batch_size)


def replacement(groups: np.ndarray, index: int, k: int) -> int:
    """The k-th stand-in (k >= 1) for unreadable sample `index` under bad_images=skip: the k-th next
    sample of its group (`groups[i]`: its class folder in an ImageFolder, its tar shard in webdataset
    shards), wrapping around within the group. It depends on the data alone, not on the order,
    workers or ranks, so every loader replaces alike and a resumed run sees the same samples."""
    members = np.flatnonzero(groups == groups[index])
    return int(members[(np.searchsorted(members, index) + k) % len(members)])


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: independent of workers, threads and ranks."""
    return np.random.default_rng([seed, epoch, index, 0xC0])


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy generator: (top, left, h, w).

    Ten tries at a random area fraction in `scale` and log-uniform aspect ratio in `ratio`;
    then the central crop at the clamped aspect ratio, as torchvision does.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_device_views(views_nhwc: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """(N, H, W, C) uint8 host tensors -> (N, C, H, W) channels-last views on `device`.

    Permuting an NHWC tensor gives NCHW with channels-last strides for free; the copy to the device
    is non-blocking from pinned memory.
    """
    return [v.to(device, non_blocking=True).permute(0, 3, 1, 2) for v in views_nhwc]
