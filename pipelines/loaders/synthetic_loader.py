"""A loader with no input pipeline: the same random uint8 batch, already on the device, forever.

`loader=synthetic` measures the ceiling of a training step (bench.py model mode): the loop, augment
stage and model run as usual, but no image is read or decoded and nothing crosses PCIe. Meets the
loader contract; `max_images` sets the epoch length (default 1,281,167 images, ImageNet-1k's train).
"""
from __future__ import annotations

import torch

from pipelines.loaders.common import Batch
from pipelines.loaders.spec import LoaderSpec

IMAGENET_TRAIN = 1_281_167


class SyntheticLoader:
    def __init__(self, spec: LoaderSpec, num_images: int, num_classes: int = 1000):
        g = torch.Generator().manual_seed(spec.seed)
        n, device = spec.batch_size, spec.device
        self.spec = spec
        self.classes = [str(c) for c in range(num_classes)]
        self.bad_images: list[str] = []                  # no files, none bad
        self.length = spec.num_batches(num_images)
        # (N, S_v, S_v, 3) -> permuted to (N, 3, S_v, S_v): channels-last like every real loader
        self.batch = Batch(
            [torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).to(device).permute(0, 3, 1, 2)
             for size in spec.view_sizes],
            torch.randint(0, num_classes, (n,), generator=g).to(device),
            torch.arange(n, device=device))
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.start_batch, self.length):
            yield self.batch


def build(cfg, spec: LoaderSpec, split: str) -> SyntheticLoader:
    return SyntheticLoader(spec, spec.max_images or IMAGENET_TRAIN)
