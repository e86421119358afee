"""The split index: the folder rules' result for one split (common.py's list_image_folder), listed
once, written to one file, and memory-mapped read-only by every reader.

    index = open_index(root)            # maps the index, or lists the split and writes it
    images = index.image_list(max_images)   # common.ImageList over the mapped arrays

Every folder reader goes through it (scan_image_folder: the torchvision loader, the DALI loader's
FolderSamples, the eval loaders and the kNN, convert.py validate / webdataset / ffcv), so a run lists
its tree once, not once per loader, and DataLoader workers share the mapped pages instead of each
copying a Python list of paths as it is read (copy-on-write of reference counts).

Where it lives: beside the split, `<data>/.<split>.masksiam-index` (hidden: the folder rules skip
it), when that folder is writable; else in the cache, `$MASKSIAM_CACHE/index/` (default
`$XDG_CACHE_HOME/masksiam` or `~/.cache/masksiam`), named by a hash of the split's absolute path;
if neither can be written, the index is kept in memory for this process only.

Layout (one file, native little-endian):
    [0:8] MAGIC, [8:16] n (uint64), [16:24] blob bytes (uint64), [24:32] header bytes (uint64)
    offsets (n + 1,) int64   path r is blob[offsets[r]:offsets[r + 1]], UTF-8, relative to the split
    labels  (n,) int32
    blob    (blob bytes,) uint8
    header  JSON: version, root (absolute), classes, stamps [[folder relative to root, mtime_ns]], built_ns

Staleness: adding, removing or renaming a file changes the mtime of the folder holding it, so the
index records the mtime of every folder it read (the split, each class folder and the folders below)
and, on open, stats those folders (one stat each: about a thousand for ImageNet, no listing). A
changed folder makes the index stale: it is rebuilt and the change named on stderr ("index of
<split> is stale: N files added, M removed; rebuilt"). A folder whose mtime falls within RACY_NS of
the listing may have changed during it (mtime granularity), so such an index is rebuilt on next
open, as git treats "racily clean" entries. Files rewritten in place keep their folder's mtime and
are not detected: the index lists files, it does not checksum them. MASKSIAM_FIXED_INDEX=1 refuses
a stale index (DataError naming it) instead of rebuilding: for runs that must read exactly the
files they started with.

Distributed runs: local rank 0 of each node lists and writes; the other ranks wait for its index
(WAIT_S at most, then list for themselves), so a node lists its tree once.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from masksiam.io import atomic_write
from pipelines.loaders.common import DataError, ImageList, list_image_folder, spread

MAGIC = b"MSKIDX01"
PREAMBLE = 32
VERSION = 1
SUFFIX = ".masksiam-index"
RACY_NS = 2_000_000_000
WAIT_S = 300.0
FIXED_ENV = "MASKSIAM_FIXED_INDEX"
CACHE_ENV = "MASKSIAM_CACHE"


class SplitIndex:
    """One split's index: arrays (memory-mapped from `path`, or in memory) and the folder stamps."""

    def __init__(self, root: Path, classes: list[str], offsets: np.ndarray, labels: np.ndarray,
                 blob: np.ndarray, stamps: list[list], built_ns: int, path: Path | None = None):
        self.root, self.classes, self.stamps, self.built_ns, self.path = Path(root), classes, stamps, built_ns, path
        self.offsets, self.labels, self.blob = offsets, labels, blob

    def __len__(self) -> int:
        return len(self.labels)

    def image_list(self, max_images: int = 0) -> ImageList:
        keep = spread(len(self), max_images)
        return ImageList(self.root, self.blob, self.offsets, self.labels, self.classes,
                         None if len(keep) == len(self) else keep, source=self.path)

    def paths(self) -> list[str]:
        text = bytes(self.blob)
        return [text[a:b].decode() for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist())]

    def changed(self) -> list[str]:
        """The recorded folders (and .classes) whose mtime differs now, or that are gone."""
        out = []
        for rel, mtime in self.stamps:
            try:
                now = os.stat(os.path.join(self.root, rel)).st_mtime_ns
            except OSError:
                now = None
            if now != mtime:
                out.append(rel)
        return out

    def racy(self) -> bool:
        """Whether a folder changed so close to the listing that a later change may share its mtime."""
        return any(mtime >= self.built_ns - RACY_NS for _, mtime in self.stamps)


def locations(root: str | Path) -> tuple[Path, Path]:
    """(beside the split, in the cache): where the index of split `root` is looked for."""
    absolute = Path(os.path.abspath(root))
    cache = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "masksiam")
    key = hashlib.sha256(str(absolute).encode()).hexdigest()[:16]
    return absolute.parent / f".{absolute.name}{SUFFIX}", Path(cache) / "index" / f"{absolute.name}-{key}{SUFFIX}"


def open_index(root: str | Path) -> SplitIndex:
    """The index of split folder `root`: mapped if a fresh one exists, else listed (and written)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    old = _find(root)
    if old is not None:
        changed = old.changed()
        if not changed and not old.racy():
            return old
        if changed and os.environ.get(FIXED_ENV, "") not in ("", "0"):
            raise DataError(f"index of {root} ({old.path}) is stale: {len(changed)} folder(s) changed since it was "
                            f"built ({', '.join(changed[:3])}), and {FIXED_ENV} asks for a fixed index; "
                            f"restore the files, or unset {FIXED_ENV} to rebuild it")
    if _waits():
        waited = _wait_for(root)
        if waited is not None:
            return waited
    new = build(root)
    if old is not None and old.changed():
        before, after = set(old.paths()), set(new.paths())
        added, removed = len(after - before), len(before - after)
        if added or removed:
            print(f"index of {root} is stale: {added} files added, {removed} removed; rebuilt", file=sys.stderr)
    return new


def build(root: str | Path) -> SplitIndex:
    """List split `root` by the folder rules and write its index (beside it, else in the cache)."""
    root = Path(root)
    built_ns = time.time_ns()              # before listing: a change during it makes the index racy
    paths, labels, classes, dirs = list_image_folder(root)
    encoded = [p.encode() for p in paths]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), np.uint8)
    del encoded
    labels = np.asarray(labels, np.int32)
    stamps = [[os.path.relpath(d, root), os.stat(d).st_mtime_ns] for d in dirs]
    if (root / ".classes").is_file():
        stamps.append([".classes", os.stat(root / ".classes").st_mtime_ns])
    header = {"version": VERSION, "root": os.path.abspath(root), "classes": classes, "stamps": stamps,
              "built_ns": built_ns}
    for path in _writable(root):
        try:
            _write(path, header, offsets, labels, blob)
        except OSError:
            continue
        mapped = _read(path, root)
        if mapped is not None:
            return mapped
    return SplitIndex(root, classes, offsets, labels, blob, stamps, built_ns)


def _writable(root: Path) -> list[Path]:
    beside, cache = locations(root)
    return ([beside] if os.access(beside.parent, os.W_OK) else []) + [cache]


def _write(path: Path, header: dict, offsets: np.ndarray, labels: np.ndarray, blob: np.ndarray) -> None:
    text = json.dumps(header).encode()
    preamble = MAGIC + np.asarray([len(labels), len(blob), len(text)], "<u8").tobytes()

    def write(f):
        for part in (preamble, offsets.astype("<i8"), labels.astype("<i4"), blob):
            f.write(memoryview(part).cast("B") if isinstance(part, np.ndarray) else part)
        f.write(text)
    atomic_write(path, write)


def map_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(offsets, labels, blob, header) of an index file, the arrays memory-mapped read-only."""
    with open(path, "rb") as f:
        pre = f.read(PREAMBLE)
        if len(pre) < PREAMBLE or pre[:8] != MAGIC:
            raise ValueError("not a masksiam split index")
        n, nblob, nhead = (int(v) for v in np.frombuffer(pre[8:], "<u8"))
        start = PREAMBLE + (n + 1) * 8 + n * 4
        f.seek(start + nblob)
        header = json.loads(f.read(nhead))
    offsets = np.memmap(path, "<i8", "r", PREAMBLE, (n + 1,))
    labels = np.memmap(path, "<i4", "r", PREAMBLE + (n + 1) * 8, (n,))
    blob = np.memmap(path, np.uint8, "r", start, (nblob,))
    return offsets, labels, blob, header


def _read(path: Path, root: Path) -> SplitIndex | None:
    """The index at `path` if it is a readable index of `root`, else None (rebuilt then)."""
    try:
        offsets, labels, blob, header = map_arrays(path)
    except (OSError, ValueError, KeyError):
        return None
    if header.get("version") != VERSION or header.get("root") != os.path.abspath(root):
        return None
    return SplitIndex(root, header["classes"], offsets, labels, blob, header["stamps"], header["built_ns"], path)


def _find(root: Path) -> SplitIndex | None:
    for path in locations(root):
        if path.is_file():
            index = _read(path, root)
            if index is not None:
                return index
    return None


def _waits() -> bool:
    """Whether this process waits for its node's local rank 0 to write the index."""
    try:
        import torch.distributed as dist
        initialised = dist.is_available() and dist.is_initialized()
    except ImportError:
        return False
    return initialised and int(os.environ.get("LOCAL_RANK", "0")) != 0


def _wait_for(root: Path) -> SplitIndex | None:
    """Local rank 0's fresh index (its listing may be racy: it is the one this run uses), or None
    after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        index = _find(root)
        if index is not None and not index.changed():
            return index
        time.sleep(0.5)
    return None
