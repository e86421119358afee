"""FFCV's memory managers over arrays (pipelines/loaders/ffcv_memory.py): the bytes, page maps and
process-cache schedules of FFCV's own managers, at ~20 B per sample and no per-sample Python objects;
the FFCV loader yields the batches it yielded with FFCV's managers.

The .beton files: the photo folder of conftest as jpg and raw (the converter's 8 MiB pages: one or
two pages), and raw random images written by FFCV's writer with 2 MiB pages from 2 processes (many
pages, samples interleaved across pages, so the allocation table is not in sample order).
"""
from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import import_loader_library, make_image_folder

import_loader_library("ffcv")  # an error, not skips, where the project installed it
pytestmark = pytest.mark.ffcv

from ffcv.memory_managers import OSCacheManager, ProcessCacheManager  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.traversal_order import QuasiRandom  # noqa: E402

from masksiam.config import Config, apply  # noqa: E402
from masksiam.dist import DistInfo  # noqa: E402
from pipelines.loaders import build_loader  # noqa: E402
from pipelines.loaders import ffcv_loader, ffcv_memory  # noqa: E402
from pipelines.loaders.ffcv_memory import (ArrayOSCacheManager, ArrayProcessCacheManager, ArrayTables,  # noqa: E402
                                           PageQuasiRandom)
from pipelines.tools.ffcv_convert import convert as convert_beton  # noqa: E402

CPU = torch.device("cpu")
PAGE = 1 << 21                                  # FFCV's smallest page size


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> dict[str, Path]:
    root = make_image_folder(tmp_path_factory.mktemp("ffcv_memory") / "data")
    out = {}
    for mode in ("jpg", "raw"):
        out[mode] = root / f"{mode}.beton"
        convert_beton(root / "train", out[mode], mode=mode, max_res=128, workers=2, progress=False)
    out["pages"] = root / "pages.beton"
    _write_paged(out["pages"])
    return out


def _write_paged(path: Path, n: int = 90) -> None:
    """n raw random images of 120-200 px (~45-120 KB) in 2 MiB pages, written by 2 processes in
    chunks of 4: ~25 samples per page, and each process fills its own pages."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, (int(rng.integers(120, 201)), int(rng.integers(120, 201)), 3), np.uint8), i % 3)
             for i in range(n)]
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                           page_size=PAGE, num_workers=2)
    writer.from_indexed_dataset(items, chunksize=4)


def _as_sets(mapping) -> dict[int, set[int]]:
    return {int(k): {int(x) for x in v} for k, v in mapping.items()}


def _read_all(manager, context, rows) -> list[bytes]:
    read = manager.compile_reader()
    meta = Reader(str(manager.reader.file_name)).metadata["f0"]
    return [read(meta[r]["data_ptr"], context.state).tobytes() for r in rows]


# ---- the managers against FFCV's -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["jpg", "raw", "pages"])
def test_every_sample_reads_upstreams_bytes_and_page_maps(betons, name):
    path = str(betons[name])
    upstream, ours = OSCacheManager(Reader(path)), ArrayOSCacheManager(Reader(path))
    n = int(ours.reader.num_samples)
    assert np.array_equal(upstream.ptrs, ours.ptrs) and np.array_equal(upstream.sizes, ours.sizes)
    assert ours.ptrs.dtype == ours.sizes.dtype == np.uint64 and ours.ptrs.flags.c_contiguous
    with upstream.schedule_epoch(None) as _, ours.schedule_epoch(None) as _:
        mine = _read_all(ours, ours.context, range(n))
        assert mine == _read_all(upstream, upstream.context, range(n))
    # and those are the file's bytes at each image's address, of the size the writer recorded
    raw = np.fromfile(path, np.uint8)
    meta = Reader(path).metadata["f0"]
    table = Reader(path).alloc_table
    for r in range(n):
        size = int(table["size"][table["sample_id"] == r][0])
        assert mine[r] == raw[meta[r]["data_ptr"]:meta[r]["data_ptr"] + size].tobytes()
    assert _as_sets(ours.page_to_samples) == _as_sets(upstream.page_to_samples)
    assert _as_sets(ours.sample_to_pages) == _as_sets(upstream.sample_to_pages)
    if name == "pages":                                   # the case the page maps are for
        assert len(upstream.page_to_samples) >= 4
        # two writers usually interleave their pages (samples out of file order); on a loaded machine
        # one may write every chunk, and the maps are then compared on in-order pages
        if np.array_equal(Reader(path).alloc_table["sample_id"], np.arange(n)):
            import warnings
            warnings.warn("FFCV's two writers did not interleave: page maps compared on in-order pages")


def test_process_cache_schedules_and_reads_as_upstreams(betons):
    """os_cache=False: the same pages in the same slots per batch, the same bytes, over an epoch of
    shuffled batches (pages entering and leaving)."""
    path = str(betons["pages"])
    upstream, ours = ProcessCacheManager(Reader(path)), ArrayProcessCacheManager(Reader(path))
    n = int(ours.reader.num_samples)
    order = np.random.default_rng(1).permutation(n)
    batches = [order[i:i + 8] for i in range(0, n, 8)]
    up, mine = upstream.schedule_epoch(batches), ours.schedule_epoch(batches)
    up.__enter__()
    mine.__enter__()
    try:
        assert mine.schedule.num_slots == up.schedule.num_slots and mine.schedule.num_slots >= 2
        assert {int(k): v for k, v in mine.schedule.page_to_slot.items()} == \
            {int(k): v for k, v in up.schedule.page_to_slot.items()}
        assert np.array_equal(mine.page_to_slot, up.page_to_slot)
        read_up, read_mine = upstream.compile_reader(), ours.compile_reader()
        meta = Reader(path).metadata["f0"]
        for b, batch in enumerate(batches):
            up.start_batch(b)
            mine.start_batch(b)
            for r in batch:
                ptr = meta[r]["data_ptr"]
                assert read_mine(ptr, mine.state).tobytes() == read_up(ptr, up.state).tobytes()
    finally:
        up.__exit__(None, None, None)
        mine.__exit__(None, None, None)


def test_quasi_random_pages_as_upstreams_and_its_order_page_local(betons):
    """PageQuasiRandom's table holds, page by page, the samples FFCV's QuasiRandom holds (for a
    subset of the rows); its order covers the rows once and reads a few pages at a time."""
    path = str(betons["pages"])
    n = int(Reader(path).num_samples)
    rows = np.sort(np.random.default_rng(2).choice(n, n - 17, replace=False))

    def loader(manager):   # batch_size 1: QuasiRandom draws from 2 open pages at a time
        return SimpleNamespace(memory_manager=manager, indices=rows, seed=5, distributed=False, batch_size=1)

    up = QuasiRandom(loader(OSCacheManager(Reader(path))))
    manager = ArrayOSCacheManager(Reader(path))
    ours = PageQuasiRandom(loader(manager))
    assert np.array_equal(ours.page_sizes, up.page_sizes)
    for page, count in enumerate(up.page_sizes):
        assert set(ours.page_to_samples_array[page, :count]) == set(up.page_to_samples_array[page, :count])
    # FFCV's QuasiRandom over the array manager (its page map) builds this very table, sample by sample
    over_arrays = QuasiRandom(loader(ArrayOSCacheManager(Reader(path))))
    assert np.array_equal(ours.page_sizes, over_arrays.page_sizes)
    for page, count in enumerate(ours.page_sizes):
        assert np.array_equal(ours.page_to_samples_array[page, :count], over_arrays.page_to_samples_array[page, :count])
    order = ours.sample_order(3)
    assert sorted(order.tolist()) == rows.tolist()
    assert not np.array_equal(order, ours.sample_order(4))
    # page locality: a page is open from its first sample to its last; never more than 2 at once
    page_of = {int(s): int(p) for p, ss in manager.page_to_samples.items() for s in ss}
    pages = np.array([page_of[int(s)] for s in order])
    spans = [(np.flatnonzero(pages == p)[0], np.flatnonzero(pages == p)[-1]) for p in set(pages.tolist())]
    assert len(spans) >= 4
    assert max(sum(a <= i <= b for a, b in spans) for i in range(len(pages))) == 2


# ---- what the manager holds ----------------------------------------------------------------------

def _held(obj, seen=None):
    """(name, value) of everything reachable through obj.__dict__, except FFCV's reader."""
    seen = seen if seen is not None else set()
    for name, value in vars(obj).items():
        if name == "reader" or id(value) in seen:
            continue
        seen.add(id(value))
        yield name, value
        if hasattr(value, "__dict__") and not isinstance(value, (np.ndarray, type)):
            yield from _held(value, seen)


@pytest.mark.parametrize("kind", [ArrayOSCacheManager, ArrayProcessCacheManager])
def test_manager_holds_arrays_of_at_most_32_bytes_per_sample_and_no_per_sample_objects(betons, kind):
    reader = Reader(str(betons["pages"]))
    n = int(reader.num_samples)
    manager = kind(reader)
    held = dict(_held(manager))
    arrays = sum(v.nbytes for v in held.values() if isinstance(v, np.ndarray))
    assert arrays == manager.table_bytes <= 32 * n            # ptrs, sizes (u8), sample ids (u4): 20 B
    pages = manager.page_to_samples                           # QuasiRandom keeps this one
    num_pages = len(pages)
    assert 4 <= num_pages < n
    for name, value in _held(pages):
        assert value is manager.sample_ids or len(value) <= num_pages + 1, name
    for name, value in held.items():
        assert not isinstance(value, (dict, set, list, tuple)) or len(value) < n, name
    assert reader.alloc_table is None                         # released: only managers read it


def test_building_the_tables_is_linear_in_numpy_at_a_users_size():
    """200k samples (a synthetic allocation table in FFCV's layout, 8 MiB pages, out of sample
    order): built in well under a second, peak allocation <= 64 B per sample, and QuasiRandom's
    table for every row in numpy."""
    from ffcv.types import ALLOC_TABLE_TYPE
    n, rng = 200_000, np.random.default_rng(0)
    sizes = rng.integers(2_000, 12_000, n).astype(np.uint64)
    table = np.zeros(n, ALLOC_TABLE_TYPE)
    table["sample_id"] = rng.permutation(n)
    table["size"] = sizes
    table["ptr"] = (1 << 23) + np.cumsum(sizes) - sizes           # back to back from page 1
    reader = SimpleNamespace(alloc_table=table, num_samples=n, page_size=1 << 23, file_name="unused")
    gc.collect()
    tracemalloc.start()
    try:
        manager = ArrayOSCacheManager(reader)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del table
    assert manager.table_bytes == 20 * n
    assert peak <= 64 * n, peak / n
    order_table, counts = manager.page_order_tables(np.arange(n))
    assert counts.sum() == n and order_table.shape[0] == int(manager.ptrs[-1]) // (1 << 23) + 1
    pages = _as_sets(manager.page_to_samples)
    assert sum(map(len, pages.values())) == n and pages[1] == set(order_table[1, :counts[1]].tolist())


# ---- the loader ----------------------------------------------------------------------------------

def _cfg(beton: Path, **overrides) -> Config:
    values = {"data": str(beton.parent), "ffcv_path": str(beton), "loader": "ffcv", "views": 2, "size": 48,
              "batch_size": 8, "workers": 2, "prefetch": 2, "seed": 0, "drop_last": True}
    return apply(Config(), {**values, **overrides}, "test_ffcv_memory")


def _epoch(loader, number: int) -> list:
    loader.set_epoch(number)
    return [([v.clone() for v in b.views], b.labels.clone(), b.indices.clone()) for b in loader]


@pytest.mark.parametrize("name", ["jpg", "raw"])
def test_loader_yields_the_batches_it_yielded_with_ffcvs_managers(betons, name, monkeypatch):
    info = DistInfo(0, 1, 0, CPU)
    ours = build_loader(_cfg(betons[name]), info)
    assert isinstance(ours.core.memory_manager, ArrayOSCacheManager)
    got = _epoch(ours, 1)
    monkeypatch.setattr(ffcv_loader, "ArrayLoader", ffcv_memory.ffcv_loader_module.Loader)    # FFCV's own
    upstream = build_loader(_cfg(betons[name]), info)
    assert type(upstream.core.memory_manager) is OSCacheManager
    want = _epoch(upstream, 1)
    assert len(got) == len(want) == 24 // 8
    for (gv, gl, gi), (wv, wl, wi) in zip(got, want, strict=True):
        assert torch.equal(gi, wi) and torch.equal(gl, wl)
        assert all(torch.equal(a, b) for a, b in zip(gv, wv, strict=True))


def test_array_tables_is_what_ffcv_loader_uses():
    """Both managers FFCV's Loader can build are bound to the array ones (and FFCV's module is not);
    the FFCV loader's quasi_random order builds its page table in numpy."""
    assert ffcv_loader.ArrayLoader is ffcv_memory.Loader and ffcv_loader.PageQuasiRandom is PageQuasiRandom
    init = ffcv_memory.Loader.__init__
    assert init.__globals__["OSCacheManager"] is ArrayOSCacheManager
    assert init.__globals__["ProcessCacheManager"] is ArrayProcessCacheManager
    assert ffcv_memory.ffcv_loader_module.OSCacheManager is OSCacheManager
    assert init.__code__ is ffcv_memory.ffcv_loader_module.Loader.__init__.__code__
    assert issubclass(ArrayOSCacheManager, ArrayTables) and issubclass(ArrayOSCacheManager, OSCacheManager)


# ---- convert.py ffcv's writer: arrays, FFCV's bytes -------------------------------------------------

def test_writer_allocations_behave_as_ffcvs_list_in_24_bytes_per_region():
    from ffcv.types import ALLOC_TABLE_TYPE
    from pipelines.tools.ffcv_convert import _Allocations
    ours, ref = _Allocations(ALLOC_TABLE_TYPE), []
    assert not ours and len(ours) == 0
    rng = np.random.default_rng(0)
    for k in range(5000):                                  # past the first growths, with pops between
        row = (k, int(rng.integers(0, 2**40)), int(rng.integers(1, 2**20)))
        ours.append(row)
        ref.append(row)
        if k % 7 == 3:
            assert ours.pop() == ref.pop()
        assert ours[-1] == ref[-1] and bool(ours) and len(ours) == len(ref)
    table = ours.table()
    assert table.dtype == ALLOC_TABLE_TYPE and table.tolist() == ref and table.nbytes == 24 * len(ref)
    with pytest.raises(IndexError):
        _Allocations(ALLOC_TABLE_TYPE)[-1]


def test_converter_writes_ffcvs_file_byte_for_byte(betons, tmp_path, monkeypatch):
    """One writer process (a deterministic page order): the .beton equals the one FFCV's own
    DatasetWriter writes, every byte; two processes: every sample's stored bytes and metadata equal."""
    from ffcv.writer import DatasetWriter
    from pipelines.tools import ffcv_convert
    src = betons["jpg"].parent / "train"
    for workers in (1, 2):
        convert_beton(src, tmp_path / f"ours{workers}.beton", mode="raw", max_res=128, workers=workers,
                      progress=False)
    monkeypatch.setattr(ffcv_convert, "_array_writer", lambda: DatasetWriter)
    convert_beton(src, tmp_path / "ffcv.beton", mode="raw", max_res=128, workers=1, progress=False)
    assert (tmp_path / "ours1.beton").read_bytes() == (tmp_path / "ffcv.beton").read_bytes()

    def samples(path):
        reader = Reader(str(path))
        meta = reader.metadata
        raw = np.fromfile(path, np.uint8)
        table = reader.alloc_table[np.argsort(reader.alloc_table["sample_id"])]
        assert np.array_equal(table["ptr"], meta["f0"]["data_ptr"])
        fields = [meta[f][[c for c in meta[f].dtype.names if c != "data_ptr"]] if meta[f].dtype.names else meta[f]
                  for f in meta.dtype.names]
        return [raw[p:p + s].tobytes() for p, s in zip(table["ptr"], table["size"])], fields

    (ours, ours_meta), (ffcv, ffcv_meta) = samples(tmp_path / "ours2.beton"), samples(tmp_path / "ffcv.beton")
    assert ours == ffcv and len(ours) == 24
    assert all(np.array_equal(a, b) for a, b in zip(ours_meta, ffcv_meta, strict=True))
