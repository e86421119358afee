"""The reference loader: ImageFolder files, PIL decoding in DataLoader workers, torchvision semantics.

Each image is decoded once; its `views` crops are RandomResizedCrop (torchvision's parameter
algorithm, bilinear with antialias as torchvision does on PIL images) plus a horizontal flip, all in
the worker. Workers return NHWC uint8 arrays; the main process moves them to the device and permutes
to NCHW, which is channels-last memory for free (pipelines/loaders/common.py).

It is the baseline that the DALI and FFCV loaders are measured against, and the eval loader
(resize + center crop, one view, fixed order) for every backend.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipelines.loaders.common import (Batch, DataError, ImageList, num_batches, per_rank_batch,
                              random_resized_crop_params, sample_rng, scan_image_folder,
                              shard_indices, split_dir, to_device_views)


def decode_rgb(path) -> Image.Image:
    """Open and fully decode one image as RGB (CMYK, grayscale, palette and alpha are converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from err


def crop_flip(img: Image.Image, box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
    """Crop (top, left, h, w), resize to size x size (bilinear, antialiased), flip -> (size, size, 3) uint8."""
    top, left, h, w = box
    # crop, then resize: what torchvision's resized_crop does on PIL images (resize(box=...) would
    # also filter over pixels outside the box and differ at the edges)
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to size/0.875 (ImageNet's 256 for 224; just `size` below 64 px) and
    center-crop size x size."""
    short = size if size <= 64 else int(round(size / 0.875))
    w, h = img.size
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


class _ViewsDataset(torch.utils.data.Dataset):
    """Item (epoch, index) -> (views: V x (H, W, 3) uint8, label, index)."""

    def __init__(self, images: ImageList, views: int, size: int, scale, ratio, flip_prob: float,
                 seed: int, train: bool):
        self.images, self.views, self.size = images, views, size
        self.scale, self.ratio, self.flip_prob, self.seed, self.train = scale, ratio, flip_prob, seed, train

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        img = decode_rgb(self.images.root / self.images.paths[index])
        if self.train:
            rng = sample_rng(self.seed, epoch, index)
            crops = []
            for _ in range(self.views):
                box = random_resized_crop_params(img.height, img.width, self.scale, self.ratio, rng)
                crops.append(crop_flip(img, box, self.size, rng.random() < self.flip_prob))
        else:
            crops = [eval_transform(img, self.size)]
        return crops, self.images.labels[index], index


def _collate(items):
    views = [torch.from_numpy(np.stack([it[0][v] for it in items])) for v in range(len(items[0][0]))]
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in items], dtype=torch.int64)
    return views, labels, indices


class _EpochBatchSampler:
    """Yields lists of (epoch, index) for this rank's shard of one epoch, from start_batch on."""

    def __init__(self, n, rank, world_size, batch, seed, shuffle, drop_last):
        self.n, self.rank, self.world_size, self.batch = n, rank, world_size, batch
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def __iter__(self):
        idx = shard_indices(self.n, self.rank, self.world_size, self.seed, self.epoch, self.batch,
                            self.shuffle, self.drop_last)
        for b in range(self.start_batch, len(self)):
            yield [(self.epoch, int(i)) for i in idx[b * self.batch:(b + 1) * self.batch]]

    def __len__(self) -> int:
        return num_batches(self.n, self.world_size, self.batch, self.drop_last)


class TorchvisionLoader:
    def __init__(self, images: ImageList, *, views: int, size: int, batch_size: int, scale, ratio,
                 flip_prob: float, seed: int, rank: int, world_size: int, device: torch.device,
                 workers: int, prefetch: int, train: bool, drop_last: bool):
        self.images, self.classes, self.device = images, images.classes, device
        self.views = views if train else 1
        dataset = _ViewsDataset(images, self.views, size, scale, ratio, flip_prob, seed, train)
        self.sampler = _EpochBatchSampler(len(images), rank, world_size, batch_size, seed,
                                          shuffle=train, drop_last=drop_last)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=_collate,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for views, labels, indices in self.loader:
            yield Batch(to_device_views(views, self.device), labels.to(self.device, non_blocking=True),
                        indices.to(self.device, non_blocking=True))


def build(cfg, info, split: str, train: bool = True) -> TorchvisionLoader:
    images = scan_image_folder(split_dir(cfg.data, split), cfg.max_images)
    batch = per_rank_batch(cfg.batch_size, info.world_size)
    return TorchvisionLoader(
        images, views=cfg.views, size=cfg.size if train else (cfg.eval_size or cfg.size),
        batch_size=batch, scale=cfg.crop_scale, ratio=cfg.crop_ratio, flip_prob=cfg.flip_prob,
        seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=info.device,
        workers=cfg.workers, prefetch=cfg.prefetch, train=train, drop_last=cfg.drop_last if train else False)
