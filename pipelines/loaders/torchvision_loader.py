"""The reference loader: ImageFolder files, PIL decoding in DataLoader workers, torchvision semantics.

Each image is decoded once; its crops (spec.views, of spec.view_sizes: multi-crop) are
RandomResizedCrop with the boxes of LoaderSpec.boxes (torchvision's parameter algorithm; bilinear
with antialias as torchvision does on PIL images) plus a horizontal flip, all in the worker.
Workers return NHWC uint8 arrays; the main process moves them to the device and permutes to NCHW,
which is channels-last memory for free (pipelines/loaders/common.py). Unreadable images:
bad_images (common.py), replaced in the worker, named in `loader.bad_images`.

It is the baseline that the DALI and FFCV loaders are measured against, and the eval loader
(resize + center crop, one view, fixed order) for every backend.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipelines.loaders.common import (Batch, DataError, ImageList, replacement, scan_image_folder, split_dir,
                                      to_device_views)
from pipelines.loaders.spec import LoaderSpec, check_bad, eval_short_side
from pipelines.tools.validate import upright


def decode_rgb(path) -> Image.Image:
    """Open and fully decode one image as RGB (CMYK, grayscale, palette and alpha are converted),
    upright: its EXIF orientation applied, as every loader does (pipelines/tools/validate.py's
    EXIF_NOTE; image_size gives the same upright size from the header)."""
    try:
        with Image.open(path) as img:
            img.load()
            upright(img)
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
    short = eval_short_side(size)
    w, h = img.size
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


class _ViewsDataset(torch.utils.data.Dataset):
    """Item (epoch, index) -> (views: V x (S_v, S_v, 3) uint8, label, index, [(file, reason)] replaced).

    An image that cannot be decoded is replaced by the next of its class folder (`replacement`)
    under bad_images=skip; the item then carries the stand-in's label and index, and its crops."""

    def __init__(self, images: ImageList, spec: LoaderSpec):
        self.images, self.spec = images, spec
        self.groups = np.asarray(images.labels)

    def __len__(self) -> int:
        return len(self.images)

    def _decode(self, index: int):
        bad = []
        for k in range(len(self.images)):
            candidate = index if k == 0 else replacement(self.groups, index, k)
            if k and candidate == index:
                break                                    # wrapped around: the whole class is bad
            path = self.images.root / self.images.path(candidate)
            try:
                return candidate, decode_rgb(path), bad
            except DataError as err:
                if self.spec.bad_images == "stop":
                    raise
                cause = err.__cause__ or err
                bad.append((str(path), f"{type(cause).__name__}: {cause}"))
        raise DataError(f"every image of class {self.images.classes[self.images.labels[index]]!r} in "
                        f"{self.images.root} is unreadable: " + "; ".join(f"{f}: {r}" for f, r in bad[:5]))

    def __getitem__(self, key):
        epoch, index = key
        index, img, bad = self._decode(index)
        spec = self.spec
        if spec.train:
            crops = [crop_flip(img, box[:4], size, bool(box[4]))
                     for box, size in zip(spec.boxes(epoch, index, img.height, img.width), spec.view_sizes)]
        else:
            crops = [eval_transform(img, spec.eval_size)]
        return crops, self.images.labels[index], index, bad


def _collate(items):
    views = [torch.from_numpy(np.stack([it[0][v] for it in items])) for v in range(len(items[0][0]))]
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in items], dtype=torch.int64)
    return views, labels, indices, [b for it in items for b in it[3]]


class _EpochBatchSampler:
    """Yields lists of (epoch, index) for this rank's shard of one epoch, from start_batch on, in
    the spec's read order (read_order=shard: chunks of the folder's sorted files, spec.py)."""

    def __init__(self, images: ImageList, spec: LoaderSpec):
        self.n, self.spec = len(images), spec
        self.order = spec.read_order_of(self.n, None, np.asarray(images.labels))
        self.epoch, self.start_batch = 0, 0

    def __iter__(self):
        idx, batch = self.spec.shard(self.n, self.epoch, self.order), self.spec.batch_size
        for b in range(self.start_batch, len(self)):
            yield [(self.epoch, int(i)) for i in idx[b * batch:(b + 1) * batch]]

    def __len__(self) -> int:
        return self.spec.num_batches(self.n)


class TorchvisionLoader:
    def __init__(self, images: ImageList, spec: LoaderSpec):
        self.images, self.classes, self.spec, self.device = images, images.classes, spec, spec.device
        self.views = spec.views
        self.bad_images: list[str] = []                  # "file: reason", distinct, in the order met
        workers = spec.workers
        self.sampler = _EpochBatchSampler(images, spec)
        self.loader = torch.utils.data.DataLoader(
            _ViewsDataset(images, spec), batch_sampler=self.sampler, num_workers=workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=spec.prefetch if workers > 0 else None)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for views, labels, indices, bad in self.loader:
            for name, reason in bad:
                check_bad(self.spec, self.bad_images, name, reason)
            yield Batch(to_device_views(views, self.device), labels.to(self.device, non_blocking=True),
                        indices.to(self.device, non_blocking=True))


def build(cfg, spec: LoaderSpec, split: str) -> TorchvisionLoader:
    return TorchvisionLoader(scan_image_folder(split_dir(cfg.data, split), spec.max_images), spec)
