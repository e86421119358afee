"""The split index (pipelines/loaders/split_index.py): a split is listed once, its result written
atomically beside it (or in the cache when the dataset is read-only), memory-mapped by every reader
and every DataLoader worker, and rebuilt, naming the change, when files are added or removed.

References: list_image_folder (the folder rules applied by listing, independent of the index) and
the files the test itself made.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import masksiam  # noqa: F401
from conftest import make_image_folder
from masksiam.config import Config
from masksiam.dist import DistInfo
from pipelines.loaders import build_loader
from pipelines.loaders import common, split_index
from pipelines.loaders.common import DataError, list_image_folder, scan_image_folder
from pipelines.loaders.samples import FolderSamples

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def age(root: Path, seconds: float = 100.0) -> None:
    """Set every folder's mtime `seconds` back: an index built now is then not racily clean."""
    then = time.time() - seconds
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (then, then))


def tiny_tree(root: Path, classes: int = 3, per_class: int = 5, nested: bool = True) -> Path:
    """root/train/<class>/[sub/]<i>.jpg, empty files (the index never opens them)."""
    split = root / "train"
    for c in range(classes):
        for i in range(per_class):
            path = split / f"c{c}" / ("sub" if nested and i % 2 else "") / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    (split / "c0" / ".DS_Store").write_bytes(b"")          # ignored by the folder rules
    age(root)
    return split


class Listings:
    """Counts os.scandir and os.walk calls (every listing of the folder rules goes through them)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("scandir", "walk"):
            real = getattr(os, name)

            def counted(*args, _real=real, **kw):
                self.calls += 1
                return _real(*args, **kw)
            monkeypatch.setattr(os, name, counted)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(split_index.CACHE_ENV, str(path))
    monkeypatch.delenv(split_index.FIXED_ENV, raising=False)
    return path


def test_index_is_created_beside_the_split_and_equals_the_listing(tmp_path):
    split = tiny_tree(tmp_path)
    paths, labels, classes, _ = list_image_folder(split)
    images = scan_image_folder(split)
    beside = tmp_path / ".train.masksiam-index"
    assert beside.is_file() and beside.read_bytes()[:8] == split_index.MAGIC
    assert images.paths == paths and images.labels == labels and images.classes == classes == ["c0", "c1", "c2"]
    assert [images.path(i) for i in range(len(images))] == paths
    assert "c0/sub/001.jpg" in paths and not any(".DS_Store" in p for p in paths)
    assert np.asarray(images.labels).dtype == np.int32
    assert isinstance(images._blob, np.memmap)                       # mapped, not a copy
    sub = scan_image_folder(split, max_images=4)                     # spread over the mapped rows
    keep = common.spread(len(paths), 4)
    assert sub.paths == [paths[i] for i in keep] and sub.labels == [labels[i] for i in keep]
    assert common.find_classes(tmp_path) == ["train"]                # the hidden index is no class


def test_the_index_is_written_atomically(tmp_path, cache, monkeypatch):
    """A write that fails midway leaves no index and no temporary file; the split is still read
    right (from the listing, in memory)."""
    split = tiny_tree(tmp_path)

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")
    real = split_index.atomic_write
    monkeypatch.setattr(split_index, "atomic_write", lambda path, write: real(path, broken))
    images = scan_image_folder(split)
    assert images.paths == list_image_folder(split)[0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_a_second_open_lists_nothing(tmp_path, monkeypatch):
    """Loaders and evaluation over an indexed split map it: no os.scandir / os.walk of the tree."""
    data = tmp_path / "data"
    make_image_folder(data, classes=3, per_class=4)
    age(data)
    first = scan_image_folder(data / "train")
    scan_image_folder(data / "val")
    listings = Listings(monkeypatch)
    again = scan_image_folder(data / "train")
    assert listings.calls == 0 and again.paths == first.paths
    cfg = Config(data=str(data), loader="torchvision", batch_size=2, views=1, size=24, workers=0, seed=0,
                 drop_last=False)
    for split, train in (("train", True), ("val", False)):
        loader = build_loader(cfg, INFO, split=split, train=train)
        assert len(list(loader)) == len(loader)
    FolderSamples(data / "train").read(0)
    assert listings.calls == 0


def test_added_and_removed_files_make_the_index_stale_and_are_named(tmp_path, capsys, monkeypatch):
    split = tiny_tree(tmp_path)
    n = len(scan_image_folder(split))
    (split / "c1" / "new_a.jpg").write_bytes(b"")
    (split / "c2" / "sub" / "new_b.png").write_bytes(b"")
    images = scan_image_folder(split)
    assert len(images) == n + 2 and "c1/new_a.jpg" in images.paths and "c2/sub/new_b.png" in images.paths
    assert f"index of {split} is stale: 2 files added, 0 removed; rebuilt" in capsys.readouterr().err
    age(tmp_path)
    scan_image_folder(split)                       # rebuilt once more: the new listing was racy
    capsys.readouterr()
    (split / "c0" / "000.jpg").unlink()
    assert len(scan_image_folder(split)) == n + 1
    assert "0 files added, 1 removed; rebuilt" in capsys.readouterr().err
    age(tmp_path)
    scan_image_folder(split)
    listings = Listings(monkeypatch)
    scan_image_folder(split)
    assert listings.calls == 0                     # fresh again
    (split / "c0" / "late.jpg").write_bytes(b"")
    monkeypatch.setenv(split_index.FIXED_ENV, "1")
    with pytest.raises(DataError, match=r"index of .*train .* is stale: 1 folder\(s\) changed .*c0.*MASKSIAM_FIXED_INDEX"):
        scan_image_folder(split)


def test_a_read_only_dataset_gets_its_index_in_the_cache(tmp_path, cache, monkeypatch):
    split = tiny_tree(tmp_path / "ro")
    read_only = {str(tmp_path / "ro"), str(split)}
    real_access = os.access
    # chmod alone does not stop root (CI runs as root): the index asks os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (False if str(p) in read_only and mode & os.W_OK
                                                            else real_access(p, mode, **kw)))
    os.chmod(tmp_path / "ro", 0o555)
    try:
        images = scan_image_folder(split)
        assert [p.name for p in (tmp_path / "ro").iterdir()] == ["train"]
        stored = list((cache / "index").iterdir())
        assert len(stored) == 1 and stored[0].name.startswith("train-") and images._source == stored[0]
        assert images.paths == list_image_folder(split)[0]
        listings = Listings(monkeypatch)
        scan_image_folder(split)                                    # found in the cache
        assert listings.calls == 0
    finally:
        os.chmod(tmp_path / "ro", 0o755)


class _Paths(torch.utils.data.Dataset):
    """Item i -> (path i, label i, whether the worker reads a mapping, its pid, its private dirty
    memory (pages it has written: a copy-on-write copy counts, RSS would not see it; the mapped
    index's clean pages do not), measured at the first item of each batch the worker makes, else
    None)."""

    def __init__(self, images, batch: int):
        self.images, self.batch, self.count = images, batch, 0     # count: items made by this worker

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.count += 1
        dirty = private_dirty() if self.count % self.batch == 1 else None
        return self.images.path(i), self.images.labels[i], isinstance(self.images._blob, np.memmap), os.getpid(), dirty


def private_dirty() -> int:
    """This process's Private_Dirty bytes (/proc/self/smaps_rollup, Linux 4.14+)."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Private_Dirty:"))


def _read_all(images, workers: int, batch: int, shuffle: bool = False):
    """Every item, in index order or (shuffle) in a random order, as a training epoch reads."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)) if shuffle else range(len(images))
    loader = torch.utils.data.DataLoader(_Paths(images, batch), batch_size=batch, num_workers=workers,
                                         sampler=order.tolist() if shuffle else None, collate_fn=lambda items: items)
    return [item for b in loader for item in b]


def test_workers_map_the_index_and_read_every_path(tmp_path):
    split = tiny_tree(tmp_path, classes=4, per_class=9)
    paths, labels, _, _ = list_image_folder(split)
    items = _read_all(scan_image_folder(split), workers=2, batch=5)
    assert [it[0] for it in items] == paths and [it[1] for it in items] == labels
    assert all(it[2] for it in items) and len({it[3] for it in items}) == 2 and os.getpid() not in {it[3] for it in items}


def test_a_pickled_image_list_maps_its_file_again(tmp_path):
    """Spawned workers get the file name, not a copy of the arrays."""
    import pickle
    split = tiny_tree(tmp_path)
    images = scan_image_folder(split, max_images=7)
    state = pickle.dumps(images)
    assert len(state) < 2000
    back = pickle.loads(state)
    assert back.paths == images.paths and back.labels == images.labels and isinstance(back._blob, np.memmap)


def hard_linked_tree(root: Path, n: int, classes: int = 20) -> Path:
    """root/train/<class>/<i>.jpg: n hard links to one tiny file (cheap to make at 10^5)."""
    source = root / "one.jpg"
    source.write_bytes(b"\xff\xd8\xff\xd9")
    split = root / "train"
    for c in range(classes):
        (split / f"class_{c:03d}").mkdir(parents=True)
    for i in range(n):
        os.link(source, split / f"class_{i % classes:03d}" / f"image_{i:08d}.jpg")
    age(root)
    return split


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc/self/smaps_rollup")
def test_worker_memory_stays_flat_across_an_epoch_of_20k_files(tmp_path):
    """Each of 2 workers reads the paths of its share of a 20k-file split in a random order: its
    private dirty memory grows by less than 1.25 MB from its first batch to its last (0.35-0.62 MB
    measured). The Python lists the loaders held before the index grew it by 1.8-2.1 MB (copied on
    write as each path's reference count is touched)."""
    # in a fresh interpreter: forked from pytest's own large heap, a worker's garbage collector
    # dirties inherited pages that have nothing to do with the loader (+4 MB in a full-suite run)
    import json
    import subprocess
    import sys
    code = (f"import sys, json; sys.path[:0] = [{str(Path(__file__).parent)!r}]; import test_split_index as t; "
            f"print(json.dumps(t.worker_memory_growth(__import__('pathlib').Path({str(tmp_path)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    for pid, n, first, most in json.loads(out.stdout.strip().splitlines()[-1]):
        assert n == 20 and most - first < 1.25 * 2**20, (pid, first, most)


def worker_memory_growth(root: Path) -> list[tuple[int, int, int, int]]:
    """[(worker pid, batches, private dirty bytes at its first batch, the most at any batch)]."""
    split = hard_linked_tree(root, 20_000)
    images = scan_image_folder(split)
    assert len(images) == 20_000
    items = _read_all(images, workers=2, batch=500, shuffle=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:3].tolist()
    assert [it[0] for it in items[:3]] == [images.path(i) for i in order]
    rows = []
    for pid in {it[3] for it in items}:
        dirty = [d for _, _, _, p, d in items if p == pid and d is not None]
        rows.append((pid, len(dirty), dirty[0], max(dirty)))
    return rows


@pytest.mark.parametrize("max_images", [0, 7])
def test_paths_hash_from_the_blob_equals_the_joined_names(tmp_path, max_images):
    """The resume record's name hash, computed from the mapped blob a chunk of rows at a time (chunks
    of 4 rows here: joins inside and across chunks), is the sha1 of the names joined by newlines that
    checkpoints hold; non-ASCII and nested names included."""
    import hashlib
    split = tiny_tree(tmp_path, per_class=6)
    (split / "c1" / "é ü.jpg").write_bytes(b"")
    age(tmp_path)
    images = scan_image_folder(split, max_images)
    want = hashlib.sha1("\n".join(images.paths).encode()).hexdigest()
    assert images.paths_sha1(rows_per_chunk=4) == images.paths_sha1() == want
    assert len(images) == (max_images or 19)
