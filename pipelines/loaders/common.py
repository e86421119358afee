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

N = cfg.batch_size // world_size.

A Batch owns its tensors: it stays valid after the loader hands out the next ones, for as long as
it is referenced, so a consumer may keep a batch, a view, labels or indices (the kNN bank keeps
every batch's labels and indices; augment-ahead holds batch k while it asks for k+1). A loader that
fills reused buffers copies out of them before it yields (FFCV on a CPU device: its ring of
batches_ahead + 2 host batches is refilled as soon as the next batch is taken); on CUDA every
loader hands out fresh device memory. tests/test_eval_loaders_equal.py checks it for each loader
over more batches than any ring holds.

Every view is an independent RandomResizedCrop(S_v, scale_v, ratio)
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

Shuffling: the order of an epoch is drawn from (seed, epoch) alone (and the rank, for its shuffle
buffer), so every rank agrees without communication and a resumed run sees the same order: a
permutation of every sample cut into disjoint per-rank parts (`shard_indices`, read order
"sample"), or shuffled whole shards per rank through a computed shuffle buffer
(`shard_order_indices`, read order "shard"); spec.py decides which. Per-sample crop randomness comes from (seed, epoch, index) (`sample_rng`), so crops
do not depend on which worker or thread decoded the image.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch

from masksiam.config import ConfigError

from masksiam.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class Batch(NamedTuple):
    """One batch of a loader; it owns its tensors (valid after the next batch: see the module docstring)."""
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


class ImageList:
    """The images of one split, in the folder rules' order (class, then path below it), backed by
    arrays: the split index's (pipelines/loaders/split_index.py), memory-mapped read-only, so
    DataLoader workers share its pages instead of copying a Python list of strings each.

        images.path(i)      # str, relative to images.root (decoded on access)
        images.paths        # a read-only sequence of those (images.paths[i] == images.path(i))
        images.labels       # a read-only sequence of int; np.asarray(images.labels): (n,) int32
        images.classes      # [UNLABELLED] for a flat folder
    """

    def __init__(self, root: Path, blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                 classes: list[str], rows: np.ndarray | None = None, source: Path | None = None):
        # blob: (total bytes,) uint8, every path's UTF-8 bytes end to end; offsets: (n + 1,) int64,
        # path r is blob[offsets[r]:offsets[r + 1]]; labels: (n,) int32; rows: (m,) int64, the
        # rows of a max_images subset (None: every row)
        self.root, self.classes = Path(root), list(classes)
        self._blob, self._offsets, self._rows, self._source = blob, offsets, rows, source
        self._labels = labels if rows is None else np.ascontiguousarray(labels[rows])

    def __getstate__(self):
        # a mapped list travels as its file name (a spawned worker maps it again); pickling the
        # memmaps would copy the arrays
        state = dict(self.__dict__)
        if self._source is not None:
            state["_blob"] = state["_offsets"] = None
            if self._rows is None:
                state["_labels"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._source is not None:
            from pipelines.loaders.split_index import map_arrays
            self._offsets, labels, self._blob, _ = map_arrays(self._source)
            if self._labels is None:
                self._labels = labels

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, i: int) -> str:
        r = int(self._rows[i]) if self._rows is not None else int(i)
        return bytes(self._blob[self._offsets[r]:self._offsets[r + 1]]).decode()

    @property
    def paths(self) -> "_Column":
        return _Column(len(self), self.path)

    def paths_sha1(self, rows_per_chunk: int = 1 << 16) -> str:
        """sha1 of "\n".join(self.paths).encode(), hashed from the mapped blob a chunk of rows at a
        time: no str per path (1.28 M paths joined as strings took most of train.py's start)."""
        h = hashlib.sha1()
        if self._rows is not None:                      # a max_images subset: rows apart in the blob
            h.update("\n".join(self.paths).encode())
            return h.hexdigest()
        for r0 in range(0, len(self), rows_per_chunk):
            r1 = min(len(self), r0 + rows_per_chunk)
            start = int(self._offsets[r0])
            seg = np.asarray(self._blob[start:int(self._offsets[r1])])     # rows r0..r1-1, end to end
            cuts = np.asarray(self._offsets[r0 + 1:r1], dtype=np.int64) - start
            h.update(b"\n" if r0 else b"")
            h.update(np.insert(seg, cuts, ord("\n")).tobytes())           # a newline before each next row
        return h.hexdigest()

    @property
    def labels(self) -> "_Column":
        return _Column(len(self), lambda i: int(self._labels[i]), self._labels)


class _Column(Sequence):
    """A read-only sequence over an ImageList column; equal to a list with the same items."""

    def __init__(self, n: int, get, array: np.ndarray | None = None):
        self._n, self._get, self._array = n, get, array

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._get(i)

    def __eq__(self, other) -> bool:
        return isinstance(other, (Sequence, np.ndarray)) and len(other) == self._n and list(self) == list(other)

    def __array__(self, dtype=None, copy=None):
        out = self._array if self._array is not None else np.asarray(list(self))
        return out.astype(dtype) if dtype is not None else out

    def __repr__(self) -> str:
        return f"[{', '.join(repr(self[i]) for i in range(min(self._n, 5)))}{', ...' if self._n > 5 else ''}] ({self._n})"


# ---- the folder rules: the one place that decides which files a split holds ----------------------
#
# Every loader, `convert.py validate` and the converters read a folder split through
# scan_image_folder, so they agree on these rules:
#   - root/<class>/.../<image>: an ImageFolder. The visible sub-folders of the split are its classes
#     (sorted); a class holds every image anywhere below its folder (nested sub-folders are read, as
#     torchvision's ImageFolder does, in its order: sorted(os.walk(followlinks=True))).
#   - root/<image>: a flat folder of photos (no class folders), the usual input of self-supervised
#     pretraining: one pseudo-class UNLABELLED, label 0 for every image.
#   - a split with images beside class folders is refused (which images belong to no class would
#     be a guess); so is a class folder with no image below it (each split would number its classes
#     differently), naming it.
#   - hidden entries are ignored at every level: names starting with '.' (.DS_Store, macOS's
#     AppleDouble `._photo.jpg`, .thumbnails/, .git/).
#   - an image is a file whose name ends in IMG_EXTENSIONS (any case), as ImageFolder decides;
#     other files (.txt, .json, .xml) are ignored.
#   - CLASS_LIST: a split may list its classes, one per line, in root/.classes (eval/data.py's
#     materialise_subset writes it so a subset keeps the whole split's label numbers); a listed
#     class may then have no image.

UNLABELLED = ""              # the pseudo-class of a flat folder: paths are file names, root / "" is root
CLASS_LIST = ".classes"


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS)


def has_labels(classes: list[str]) -> bool:
    """Whether a split's class list can be evaluated (kNN, probes): two classes or more. A flat
    folder's one pseudo-class, or a single class folder, gives every image the same label."""
    return len(classes) > 1


def find_classes(root: str | Path) -> list[str]:
    """The class list of the split folder `root` by the folder rules: its visible sub-folders,
    sorted; [UNLABELLED] for a flat folder. Reads the top level only (cheap: train.py compares the
    train and val lists with it before a run). Raises DataError naming the folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    if (root / CLASS_LIST).is_file():
        classes = [c for c in (root / CLASS_LIST).read_text().splitlines() if c]
        if not classes:
            raise DataError(f"{root / CLASS_LIST} lists no classes")
        return classes
    folders, images = [], 0
    for e in os.scandir(root):
        if is_hidden(e.name):
            continue
        if e.is_dir():
            folders.append(e.name)
        elif e.is_file() and is_image_name(e.name):
            images += 1
    if folders and images:
        raise DataError(f"image folder {root} holds {images} images beside class folders "
                        f"({_some(sorted(folders))}): put every image in a class folder (root/<class>/<image>), "
                        f"or use a flat folder of images with no sub-folders (root/<image>)")
    if folders:
        return sorted(folders)
    if images:
        return [UNLABELLED]
    raise DataError(f"image folder {root} holds no images ({', '.join(IMG_EXTENSIONS)}): expected "
                    f"root/<class>/<image>, or a flat folder root/<image> for unlabelled photos")


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _images_below(folder: Path, dirs: list[str]) -> list[str]:
    """Image paths below `folder`, relative to it, in ImageFolder's order (sorted os.walk, then
    sorted file names), hidden files and folders left out. Appends every folder it read to `dirs`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]    # pruned in place: never entered
        found.append((dirpath, filenames))
    out = []
    for dirpath, filenames in sorted(found):
        dirs.append(dirpath)
        rel = os.path.relpath(dirpath, folder)
        out += [n if rel == "." else f"{rel}/{n}" for n in sorted(filenames) if is_image_name(n)]
    return out


def list_image_folder(root: str | Path) -> tuple[list[str], list[int], list[str], list[str]]:
    """The folder rules applied to the split folder `root` by listing it: (paths relative to root,
    labels, classes, the folders read). The one listing of a split; scan_image_folder caches its
    result in the split index."""
    root = Path(root)
    classes = find_classes(root)
    paths, labels, empty, dirs = [], [], [], [str(root)]
    listed = (root / CLASS_LIST).is_file()
    if classes == [UNLABELLED]:
        paths = sorted(e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name))
        labels = [0] * len(paths)
    else:
        for label, cls in enumerate(classes):
            names = _images_below(root / cls, dirs) if (root / cls).is_dir() else []
            if not names:
                empty.append(cls)
            paths += [f"{cls}/{n}" for n in names]
            labels += [label] * len(names)
    if empty and not listed:
        raise DataError(f"image folder {root}: class folder{'s' if len(empty) > 1 else ''} {_some(empty)} "
                        f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(IMG_EXTENSIONS)}); "
                        "remove or fill it: every split must number the same classes")
    if not paths:
        raise DataError(f"image folder {root} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    return paths, labels, classes, dirs


def scan_image_folder(root: str | Path, max_images: int = 0) -> ImageList:
    """The images of one split folder by the folder rules above: an ImageFolder or a flat folder.
    Deterministic order; max_images > 0 keeps `spread` of them. Read through the split index
    (split_index.py): the tree is listed once, later calls map the cached result."""
    from pipelines.loaders.split_index import open_index
    return open_index(root).image_list(max_images)


def compare_classes(train: list[str], val: list[str], train_name: str, val_name: str) -> None:
    """Refuse splits whose class lists differ: each numbers its own sorted class folders, so a
    class missing from one shifts every label after it. Raises DataError naming the classes."""
    if train == val:
        return
    in_train, in_val = set(train), set(val)
    missing = [c or "(a flat folder's images)" for c in train if c not in in_val]
    extra = [c or "(a flat folder's images)" for c in val if c not in in_train]
    parts = ([f"{val_name} lacks {len(missing)} of the classes of {train_name}: {_some(missing)}"] if missing else []) \
        + ([f"{val_name} has {len(extra)} classes that {train_name} lacks: {_some(extra)}"] if extra else [])
    if not parts:
        parts = ["the same classes in another order"]
    raise DataError(f"the train and val class lists differ ({'; '.join(parts)}): labels would not match "
                    "between the splits; give both splits the same class folders")


def spread(n: int, max_images: int) -> np.ndarray:
    """Which of n samples `max_images` keeps: spread evenly over the list (so over every class of a
    class-sorted list rather than the first class only); all of them when max_images is 0 or >= n."""
    if 0 < max_images < n:
        return np.linspace(0, n - 1, max_images).round().astype(np.int64)
    return np.arange(n, dtype=np.int64)


def split_dir(data: str | Path, split: str) -> Path:
    path = Path(data) / split
    if not path.is_dir():
        hint = ""
        if Path(data).is_dir() and any(is_image_name(e.name) and e.is_file() for e in os.scandir(data)):
            hint = (f"; {data} holds images itself: data= names the folder above the splits, so move the "
                    f"photos into {path}/ (a flat folder of photos is a split of its own)")
        raise DataError(f"split folder {path} does not exist (data={data}, split={split}){hint}")
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


# ---- read order "shard": whole shards per rank, a shuffle buffer, a pure function of (seed, epoch, rank)

def run_bounds(groups: np.ndarray) -> np.ndarray:
    """(S + 1,) int64 starts of the runs of equal values in `groups` (n,), then n: the shards of a
    webdataset split from TarSamples.shard_of (non-decreasing: its samples are in shard order)."""
    groups = np.asarray(groups)
    return np.concatenate([[0], np.flatnonzero(groups[1:] != groups[:-1]) + 1, [len(groups)]]).astype(np.int64)


def chunk_bounds(n: int, size: int) -> np.ndarray:
    """(S + 1,) int64 starts of consecutive chunks of `size` samples, then n: a folder's pseudo-shards."""
    return np.append(np.arange(0, n, max(1, size), dtype=np.int64), np.int64(n))


def buffer_shuffle(stream: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """`stream` (m,) passed through a shuffle buffer of `buffer` slots (webdataset's `.shuffle`):
    the first `buffer` items fill it; then each step draws a slot, yields what it holds and puts the
    next item of the stream there; at the end the items left leave in a random order. An item
    waits a geometric number of steps (mean `buffer`). Computed without a loop: step i yields the
    item that its slot got at the last earlier step that drew the same slot (or the slot's first
    item), so the whole pass is one stable argsort of the (m - buffer,) slot draws."""
    stream = np.asarray(stream)
    m = len(stream)
    k = min(int(buffer), m)
    if k <= 1:
        return stream.copy()
    steps = m - k
    slots = rng.integers(0, k, steps)                 # (steps,) the slot step i empties and refills
    drain = rng.permutation(k)                        # (k,) the order in which the last items leave
    by_slot = np.argsort(slots, kind="stable")        # steps grouped by slot, in step order
    ordered = slots[by_slot]
    first = np.ones(steps, bool)                      # a slot's first step: it yields the slot's first item
    first[1:] = ordered[1:] != ordered[:-1]
    prev = np.empty(steps, np.int64)                  # the step before, on the same slot (-1: none)
    prev[by_slot] = np.where(first, -1, np.roll(by_slot, 1))
    src = np.where(prev < 0, slots, k + prev)         # step i' writes stream[k + i'] into its slot
    last = np.ones(steps, bool)                       # a slot's last step: what the slot holds at the end
    last[:-1] = ordered[1:] != ordered[:-1]
    held = np.arange(k, dtype=np.int64)
    held[ordered[last]] = k + by_slot[last]
    return stream[np.concatenate([src, held[drain]])]


def shard_order_indices(bounds: np.ndarray, rank: int, world_size: int, seed: int, epoch: int, batch_size: int,
                        buffer: int, drop_last: bool = True) -> np.ndarray:
    """This rank's sample indices for one epoch in read order "shard" (see spec.py): the shards
    (bounds: (S + 1,) starts, then n) in a shuffled order from (seed, epoch), end to end; each rank
    takes a contiguous block of that stream, so whole shards except where a block ends inside one
    (at most world_size - 1 shards are split between two ranks); then `buffer_shuffle` over the
    rank's block from (seed, epoch, rank). Counts per rank, the drop_last tail and the padding are
    shard_indices': the same number of batches per epoch whatever the order."""
    bounds = np.asarray(bounds, np.int64)
    n = int(bounds[-1])
    order = np.random.default_rng([seed, epoch, 0x5EED, 1]).permutation(len(bounds) - 1)
    lengths = np.diff(bounds)[order]                  # (S,) the shards' sizes in stream order
    ends = np.cumsum(lengths)                         # (S,) where each ends in the stream
    if drop_last:
        per_rank = (n // (batch_size * world_size)) * batch_size
    else:                                             # positions past n wrap around to the stream's
        per_rank = math.ceil(n / world_size)          # start, as shard_indices pads
    # (per_rank,) this rank's stream positions -> the shard there -> the sample: only this rank's part
    # is built (a rank of 64 holds 1/64 of the split, not the whole stream)
    at = np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.int64) % max(n, 1)
    shard = np.searchsorted(ends, at, side="right")
    mine = bounds[order[shard]] + at - (ends[shard] - lengths[shard])
    return buffer_shuffle(mine, buffer, np.random.default_rng([seed, epoch, rank, 0xB0FF]))


def class_mixing(labels: np.ndarray, bounds: np.ndarray, shards: int = 64) -> float:
    """How well the shards mix the classes, from 0 to 1: over up to `shards` shards spread over the
    split, the mean of (distinct labels in the shard) / min(classes, shard size). About 1 for shards
    written in a shuffled order, 1 / (images per class) or less for shards written class by class
    (convert.py writes the folder order); 1 for a single class."""
    labels, bounds = np.asarray(labels), np.asarray(bounds, np.int64)
    classes = np.count_nonzero(np.bincount(labels)) if len(labels) else 0
    if classes <= 1 or len(labels) == 0:
        return 1.0
    picked = spread(len(bounds) - 1, shards)
    return float(np.mean([len(np.unique(labels[bounds[s]:bounds[s + 1]])) / min(classes, bounds[s + 1] - bounds[s])
                          for s in picked]))


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
