"""Sample sources: the encoded bytes of sample i of a split, from an ImageFolder or webdataset shards.

    samples = open_split(path, max_images)   # FolderSamples or TarSamples (path holds index.json)
    len(samples), samples.names, samples.labels, samples.classes
    samples.read(i)                          # (nbytes,) uint8: the file's bytes
    samples.describe(i)                      # the file (or shard:member) for messages

The shards are written by `convert.py webdataset` (pipelines/tools/webdataset.py, which documents
their layout).

Reading: the DALI loader does not use fn.readers.webdataset. That reader cuts each rank a
contiguous range of shards and shuffles through a bounded buffer, which is neither the run's
(seed, epoch) permutation nor resumable mid-epoch. `TarSamples` instead keeps the shard files open
and reads any sample with one pread at the offset in the index: random access in the loader's
read order (spec.py: per-sample `sample`, or `shard`: shuffled whole shards per rank through a
shuffle buffer, from `shard_of`), without the per-file open/stat round trips that make ImageFolders
slow on NFS.
"""
from __future__ import annotations

import json
import os
import resource
import threading
from pathlib import Path

import numpy as np

from pipelines.loaders.common import DataError, ImageList, is_hidden, scan_image_folder, spread

INDEX = "index.json"
FORMAT = "masksiam-webdataset"


class FolderSamples:
    """A folder split (root/<class>/.../<image>, or a flat root/<image>: the folder rules of
    common.py) as a sample source: one file per read."""
    format = "imagefolder"

    def __init__(self, root: str | Path, max_images: int = 0):
        # the mapped split index (common.ImageList): no per-file Python objects held
        self.images = images = scan_image_folder(root, max_images)
        self.root, self.names, self.labels, self.classes = images.root, images.paths, images.labels, images.classes

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> np.ndarray:
        """The encoded bytes of sample i as a writable (nbytes,) uint8 array."""
        return np.fromfile(self.describe(i), dtype=np.uint8)

    def describe(self, i: int) -> str:
        return os.path.join(self.root, self.images.path(i))


class TarSamples:
    """A webdataset split written by `convert.py webdataset`: random access through its index.

    Each shard file is opened once, on first use, and kept open (reads from several threads share
    the descriptor: pread has no file position). If the open-file limit cannot fit every shard even
    after raising the soft limit to the hard one, each read opens its shard instead.
    """
    format = "webdataset"

    def __init__(self, root: str | Path, max_images: int = 0):
        self.root = Path(root)
        meta = read_index(self.root)
        self.classes = meta["classes"]
        shard_ids, offsets, sizes, names, lengths, labels = [], [], [], [], [], []   # per shard
        for s, shard in enumerate(meta["shards"]):
            name_blob, length, offset, size = _read_idx(self.root / _idx_name(shard["name"]))
            if len(offset) != shard["num_samples"] or len(shard["labels"]) != shard["num_samples"]:
                raise DataError(f"{self.root / shard['name']}: index lists {len(offset)} samples and "
                                f"{len(shard['labels'])} labels, {INDEX} says {shard['num_samples']}; "
                                "re-run convert.py webdataset")
            shard_ids.append(np.full(len(offset), s, np.int32)), offsets.append(offset), sizes.append(size)
            names.append(name_blob), lengths.append(length)
            labels.append(np.asarray(shard["labels"], np.int32))
        if not names or not sum(map(len, offsets)):
            raise DataError(f"webdataset split {self.root} has no samples")
        n = sum(map(len, offsets))
        keep = spread(n, max_images)                       # the images scan_image_folder keeps
        self.shards = [self.root / shard["name"] for shard in meta["shards"]]
        self.shard_of = np.concatenate(shard_ids)[keep]
        self.offsets = np.concatenate(offsets)[keep]
        self.sizes = np.concatenate(sizes)[keep]
        # member names as one blob + offsets (an ImageList of names): no per-sample str objects
        blob = np.frombuffer(b"".join(names), np.uint8)
        bounds = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
        self._names = ImageList(self.root, blob, bounds, np.concatenate(labels), self.classes,
                                None if len(keep) == n else keep)
        self.names, self.labels = self._names.paths, self._names.labels
        self.images = self._names                          # the member names as an ImageList
        self._fds = [-1] * len(self.shards)
        self._keep_open = _allow_open_files(len(self.shards) + 256)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    def _fd(self, shard: int) -> int:
        if self._fds[shard] < 0:
            with self._lock:
                if self._fds[shard] < 0:
                    self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def read(self, i: int) -> np.ndarray:
        """The encoded bytes of sample i as a writable (nbytes,) uint8 array: one pread."""
        shard, size, offset = int(self.shard_of[i]), int(self.sizes[i]), int(self.offsets[i])
        out = np.empty(size, np.uint8)
        if self._keep_open:
            got = os.preadv(self._fd(shard), [out], offset)
        else:
            with open(self.shards[shard], "rb") as f:
                got = os.preadv(f.fileno(), [out], offset)
        if got != size:
            raise OSError(f"{self.describe(i)}: read {got} of {size} bytes (shard truncated?)")
        return out

    def describe(self, i: int) -> str:
        return f"{self.shards[int(self.shard_of[i])]}:{self._names.path(i)}"

    def __del__(self):
        for fd in getattr(self, "_fds", []):
            if fd >= 0:
                os.close(fd)


def _allow_open_files(n: int) -> bool:
    """Raise the soft open-file limit towards the hard one if n files need it; False if it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n <= soft:
        return True
    if hard != resource.RLIM_INFINITY and n > hard:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return True


def is_webdataset(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


SPLIT_NAMES = ("train", "val")      # the default train_split / val_split


def is_dataset_root(path: str | Path) -> bool:
    """Whether `path` is a dataset root (one folder per split) rather than one split: it holds a
    train/ or val/ folder, or a webdataset split. Nested class folders are read (the folder rules,
    common.py), so root/train/<class>/<image> would otherwise also read as one split of classes
    "train" and "val"; a flat split root/train/<image> likewise."""
    path = Path(path)
    if not path.is_dir() or is_webdataset(path):
        return False
    return any(e.is_dir() and (e.name in SPLIT_NAMES or is_webdataset(e.path))
               for e in os.scandir(path) if not is_hidden(e.name))


def dataset_splits(path: str | Path) -> list[Path]:
    """The split folders of `path`: itself if it is one split (an ImageFolder, a flat folder or
    webdataset shards), else its visible sub-folders (is_dataset_root)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} does not exist")
    if not is_dataset_root(path):
        return [path]
    return sorted(Path(e.path) for e in os.scandir(path) if e.is_dir() and not is_hidden(e.name))


def open_split(path: str | Path, max_images: int = 0) -> FolderSamples | TarSamples:
    """The sample source at `path`: webdataset shards if it holds index.json, else a folder split."""
    return TarSamples(path, max_images) if is_webdataset(path) else FolderSamples(path, max_images)


def read_index(split: Path) -> dict:
    try:
        with open(split / INDEX) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read webdataset index {split / INDEX}: {err}") from err
    if meta.get("format") != FORMAT or meta.get("version") != 1:
        raise DataError(f"{split / INDEX} is not a {FORMAT} v1 index (format={meta.get('format')!r})")
    return meta


def _idx_name(tar_name: str) -> str:
    return tar_name[:-len(".tar")] + ".idx"


_SPACE = np.zeros(256, bool)                      # the bytes that bytes.split() splits at
_SPACE[list(b" \t\n\r\x0b\x0c")] = True


def _read_idx(path: Path) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """(image member names' UTF-8 bytes end to end, their lengths (n,) int64, data offsets (n,)
    int64, sizes (n,) int64) of the samples of a v1.2 DALI webdataset index.

    After the header "v1.2 N", a line per sample of components "ext offset size name" (the image
    and its "cls" label, in either order); the image is the first component that is not the label.
    Parsed in numpy: the fields of the whole file in one split, grouped by the number of fields
    per line (one group in a file convert.py wrote), each group's image columns picked at once."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read shard index {path}: {err}") from err
    head, _, body = data.partition(b"\n")
    if not head.startswith(b"v1.2 "):
        raise DataError(f"{path} is not a v1.2 webdataset index")
    text = np.frombuffer(body, np.uint8)
    newline = text == ord("\n")
    ends = np.flatnonzero(newline)                   # the lines' ends; a last line may lack its newline
    n = len(ends) + (len(body) > 0 and not body.endswith(b"\n"))
    space = _SPACE[text]
    starts = ~space & np.concatenate([[True], space[:-1]])          # (bytes,) a field's first byte
    line_of = np.cumsum(newline) - newline                           # (bytes,) the line of each byte
    per_line = np.bincount(line_of[starts], minlength=n)             # (n,) fields per line
    fields = np.array(body.split(), dtype=object)                    # every field, line after line
    first = np.cumsum(per_line) - per_line                           # (n,) each line's first field

    def malformed(line: int) -> DataError:
        lo = ends[line - 1] + 1 if line else 0
        hi = ends[line] if line < len(ends) else len(body)
        return DataError(f"{path}: malformed line {body[lo:hi].decode(errors='replace')!r}")

    names, offsets, sizes = np.empty(n, object), np.empty(n, np.int64), np.empty(n, np.int64)
    for count in np.unique(per_line):
        rows = np.flatnonzero(per_line == count)
        if count == 0:
            raise malformed(int(rows[0]))
        grid = fields[first[rows, None] + np.arange(count)]          # (rows, count) these lines' fields
        is_image = grid[:, 0::4] != b"cls"                             # (rows, components)
        comp = is_image.argmax(1)                                     # the image's component
        bad = ~is_image.any(1) | (4 * comp + 4 > count)               # no image, or an image cut short
        if bad.any():
            raise malformed(int(rows[bad.argmax()]))
        image = grid[np.arange(len(rows))[:, None], 4 * comp[:, None] + np.arange(1, 4)]   # (rows, 3)
        try:
            offsets[rows], sizes[rows] = image[:, 0].astype(np.int64), image[:, 1].astype(np.int64)
        except ValueError:
            for r, (offset, size) in zip(rows, image[:, :2]):
                if not (offset.isdigit() and size.isdigit()):
                    raise malformed(int(r)) from None
            raise
        names[rows] = image[:, 2]
    return b"".join(names), np.fromiter(map(len, names), np.int64, n), offsets, sizes
