"""A loader with no input pipeline: the same random uint8 batch, already on the device, forever.

`loader=synthetic` measures the ceiling of a training step (bench.py model mode): the loop, augment
stage and model run as usual, but no image is read or decoded and nothing crosses PCIe. Meets the
loader contract; `max_images` sets the epoch length (default 1,281,167 images, ImageNet-1k's train).
"""
from __future__ import annotations

import torch

from pipelines.loaders.common import Batch, num_batches, per_rank_batch

IMAGENET_TRAIN = 1_281_167


class SyntheticLoader:
    def __init__(self, views: int, size: int, batch_size: int, num_images: int, world_size: int,
                 drop_last: bool, device: torch.device, seed: int, num_classes: int = 1000):
        g = torch.Generator().manual_seed(seed)
        self.classes = [str(c) for c in range(num_classes)]
        self.length = num_batches(num_images, world_size, batch_size, drop_last)
        # (N, H, W, 3) -> permuted to (N, 3, H, W): channels-last like every real loader
        self.batch = Batch(
            [torch.randint(0, 256, (batch_size, size, size, 3), generator=g, dtype=torch.uint8)
             .to(device).permute(0, 3, 1, 2) for _ in range(views)],
            torch.randint(0, num_classes, (batch_size,), generator=g).to(device),
            torch.arange(batch_size, device=device))
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.start_batch, self.length):
            yield self.batch


def build(cfg, info, split: str, train: bool = True) -> SyntheticLoader:
    return SyntheticLoader(cfg.views if train else 1, cfg.size, per_rank_batch(cfg.batch_size, info.world_size),
                           cfg.max_images or IMAGENET_TRAIN, info.world_size, cfg.drop_last, info.device, cfg.seed)
