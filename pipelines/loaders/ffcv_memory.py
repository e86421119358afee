"""FFCV memory managers that hold arrays, not per-sample Python objects (ffcv_loader.py uses them).

FFCV 1.0.2's MemoryManager.__init__ turns the .beton's allocation table into a dict address -> size
and two defaultdicts of sets (sample -> pages, page -> samples): several hundred bytes of Python
objects per sample, held as long as the loader. What FFCV and masksiam actually read of a manager:

  - ptrs, sizes: the data regions' start addresses, sorted, and their sizes (uint64[::1] each). Every
    compiled reader (FFCV's compile_reader, masksiam's kernel in ffcv_kernel.py) looks a size up as
    sizes[searchsorted(ptrs, address)]; they reach the reader through context.state.
  - page_to_samples: QuasiRandom's page-local order (which samples start on which page).
  - sample_to_pages: the process cache (os_cache=False), which pages a batch needs.
  - reader, schedule_epoch(batches) -> a MemoryContext (state, __enter__/__exit__, start_batch),
    compile_reader(), state_type.

The managers here keep ptrs, sizes and the sample id of each region in address order (`sample_ids`,
uint32 below 2**32 samples): 20 bytes per region, built in numpy from reader.alloc_table, which
they then release (nothing else in FFCV reads it; it is 24 bytes per region). A page's samples are a
slice of `sample_ids` (addresses are sorted, so pages are contiguous runs); `page_to_samples` is a
read-only mapping over those slices, and `page_order_tables` gives QuasiRandom's padded table in
numpy. Bytes read are the upstream managers' bytes: the same compiled readers over the same arrays.

`Loader` is FFCV's Loader with these managers: FFCV builds its manager inside Loader.__init__, so
this class runs that very function with the two manager names bound to these classes (a copy of
the function with its own globals; FFCV's module is not modified).
"""
from __future__ import annotations

import types
from collections.abc import Mapping

import numpy as np

from pipelines.loaders.ffcv_kernel import MISSING_FFCV

try:
    import ffcv.loader.loader as ffcv_loader_module
    from ffcv.memory_managers.os_cache import OSCacheContext, OSCacheManager
    from ffcv.memory_managers.process_cache.context import ProcessCacheContext
    from ffcv.memory_managers.process_cache.manager import ProcessCacheManager
    from ffcv.memory_managers.process_cache.schedule import ScheduleExecutor, compute_schedule
    from ffcv.traversal_order import QuasiRandom
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(f"{MISSING_FFCV} ({err})") from err


class ArrayTables:
    """The allocation table as sorted arrays (see the module docstring); shared by both managers.

    ptrs, sizes: (R,) uint64, ptrs ascending; sample_ids: (R,) uint32/uint64, the sample owning
    region r; page_shift: log2 of the .beton's page size.
    """

    def _build_tables(self, reader) -> None:
        table = reader.alloc_table                      # (R,) records (sample_id, ptr, size), u8 each
        order = np.argsort(table["ptr"], kind="stable")
        self.reader = reader
        self.ptrs = np.ascontiguousarray(table["ptr"][order], np.uint64)
        self.sizes = np.ascontiguousarray(table["size"][order], np.uint64)
        small = reader.num_samples < 2 ** 32
        self.sample_ids = np.ascontiguousarray(table["sample_id"][order], np.uint32 if small else np.uint64)
        self.page_shift = int(reader.page_size).bit_length() - 1
        # the table is read only by memory managers; keeping it would cost 24 B per region for nothing
        reader.alloc_table = None

    @property
    def table_bytes(self) -> int:
        """Bytes of the arrays this manager holds per .beton (its whole per-sample state)."""
        return self.ptrs.nbytes + self.sizes.nbytes + self.sample_ids.nbytes

    def _page_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(P,) uint64 page numbers that hold a region start, ascending, and (P + 1,) int64 bounds:
        the regions starting on pages[p] are ptrs[bounds[p]:bounds[p + 1]]."""
        pages = self.ptrs >> np.uint64(self.page_shift)
        first = np.flatnonzero(np.r_[True, pages[1:] != pages[:-1]]) if len(pages) else np.zeros(0, np.int64)
        return pages[first], np.r_[first, len(pages)].astype(np.int64)

    @property
    def page_to_samples(self) -> "PageSamples":
        """page -> the samples whose regions start on it (an array each); read by QuasiRandom."""
        pages, bounds = self._page_runs()
        return PageSamples(pages, bounds, self.sample_ids)

    def page_order_tables(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """QuasiRandom's tables for the samples `indices`: (pages, max per page) int64 sample ids,
        each page's samples in address order from column 0, and (pages,) int64 counts."""
        pages, bounds = self._page_runs()
        num_pages = int(pages[-1]) + 1 if len(pages) else 0
        keep = np.zeros(int(self.reader.num_samples), bool)
        keep[np.asarray(indices, np.int64)] = True
        region_kept = keep[self.sample_ids]
        page_of_region = np.repeat(pages.astype(np.int64), np.diff(bounds))
        counts = np.bincount(page_of_region[region_kept], minlength=num_pages).astype(np.int64)
        # column of each kept region within its page: its rank among the page's kept regions
        kept_pages = page_of_region[region_kept]
        starts = np.r_[0, np.cumsum(counts)[:-1]] if num_pages else np.zeros(0, np.int64)
        column = np.arange(len(kept_pages)) - starts[kept_pages]
        table = np.empty((num_pages, max(1, int(counts.max())) if num_pages else 1), np.int64)
        table[kept_pages, column] = self.sample_ids[region_kept]
        return table, counts

    def sample_regions(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The regions (indices into ptrs) of every sample of `samples` (int64), concatenated sample
        by sample, and (len(samples),) how many each has (1 for masksiam's files: one image field)."""
        by_sample = np.argsort(self.sample_ids, kind="stable")
        sorted_ids = self.sample_ids[by_sample]
        lo = np.searchsorted(sorted_ids, samples, "left")
        n = np.searchsorted(sorted_ids, samples, "right") - lo
        # region k of sample j is by_sample[lo[j] + k]
        offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return by_sample[np.repeat(lo, n) + offsets], n

    @property
    def sample_to_pages(self) -> Mapping:
        """sample -> the pages its regions start on (small; the process cache batches in numpy)."""
        return SamplePages(self)


class PageSamples(Mapping):
    """A read-only mapping page -> (k,) sample ids over ArrayTables' arrays (no per-page objects
    are built until asked for); keys are np.uint64 page numbers, as FFCV's own dict's are."""

    def __init__(self, pages: np.ndarray, bounds: np.ndarray, sample_ids: np.ndarray):
        self.pages, self.bounds, self.sample_ids = pages, bounds, sample_ids

    def __getitem__(self, page) -> np.ndarray:
        p = int(np.searchsorted(self.pages, np.uint64(page)))
        if p == len(self.pages) or self.pages[p] != np.uint64(page):
            raise KeyError(page)
        return self.sample_ids[self.bounds[p]:self.bounds[p + 1]]

    def __iter__(self):
        return iter(self.pages)

    def __len__(self) -> int:
        return len(self.pages)


class SamplePages(Mapping):
    """A read-only mapping sample -> (k,) uint64 pages, computed per lookup (FFCV's own process
    cache asks it per sample; ArrayProcessCacheContext asks for whole epochs instead)."""

    def __init__(self, tables: ArrayTables):
        self.tables = tables

    def __getitem__(self, sample) -> np.ndarray:
        regions, _ = self.tables.sample_regions(np.asarray([sample], np.int64))
        return np.unique(self.tables.ptrs[regions] >> np.uint64(self.tables.page_shift))

    def __iter__(self):
        return iter(np.unique(self.tables.sample_ids))

    def __len__(self) -> int:
        return len(np.unique(self.tables.sample_ids))


class ArrayOSCacheManager(ArrayTables, OSCacheManager):
    """FFCV's OS-cache manager (the file memory-mapped, read through the page cache) over arrays."""

    def __init__(self, reader):
        self._build_tables(reader)                     # not MemoryManager.__init__: no dicts, no sets
        self.context = OSCacheContext(self)


class ArrayProcessCacheContext(ProcessCacheContext):
    """FFCV's process-cache epoch (pages read by threads into slots, per batch) with the pages of
    each batch computed in numpy; the schedule, slots and reads are FFCV's."""

    def __enter__(self):
        tables: ArrayTables = self.manager
        lengths = np.array([len(b) for b in self.batches], np.int64)
        samples = np.concatenate([np.asarray(b, np.int64) for b in self.batches] + [np.zeros(0, np.int64)])
        regions, counts = tables.sample_regions(samples)
        pages = tables.ptrs[regions] >> np.uint64(tables.page_shift)
        # regions come sample by sample in batch order: batch b's are the next sum(counts of its samples)
        per_batch = np.add.reduceat(counts, np.cumsum(lengths) - lengths) if len(samples) else lengths
        pages_at_batch = [set(np.unique(p).tolist()) for p in np.split(pages, np.cumsum(per_batch)[:-1])]

        self.schedule = compute_schedule(pages_at_batch)
        self.memory = np.zeros((self.schedule.num_slots, self.page_size), dtype="<u1")
        self.executor = ScheduleExecutor(self.fname, self.schedule, self.memory)
        max_page = max(self.schedule.page_to_slot.keys(), default=-1)
        self.page_to_slot = np.zeros(max_page + 1, dtype=np.uint32)       # page -> slot, O(1) in the reader
        for page, slot in self.schedule.page_to_slot.items():
            self.page_to_slot[page] = slot
        self.executor.__enter__()


class ArrayProcessCacheManager(ArrayTables, ProcessCacheManager):
    """FFCV's process-cache manager (os_cache=False) over arrays."""

    def __init__(self, reader):
        self._build_tables(reader)

    def schedule_epoch(self, batches):
        return ArrayProcessCacheContext(self, batches)


class PageQuasiRandom(QuasiRandom):
    """FFCV's QuasiRandom with its page table built in numpy from an ArrayTables manager (FFCV's
    builds it sample by sample from a set of the indices). Within a page, samples start in address
    order, where FFCV's start in its sets' hash order: the same kind of order, not the same one."""

    def prepare_data_structures(self):
        manager = self.loader.memory_manager
        if not isinstance(manager, ArrayTables):
            return super().prepare_data_structures()
        self.page_to_samples_array, self.page_sizes = manager.page_order_tables(self.indices)


def _with_array_managers(function):
    """`function` (FFCV's Loader.__init__) with its OSCacheManager / ProcessCacheManager names bound
    to the array managers: same code and defaults, its own globals."""
    names = dict(function.__globals__, OSCacheManager=ArrayOSCacheManager,
                 ProcessCacheManager=ArrayProcessCacheManager)
    copy = types.FunctionType(function.__code__, names, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = function.__kwdefaults__, function.__qualname__, function.__doc__
    return copy


class Loader(ffcv_loader_module.Loader):
    """FFCV's Loader with ArrayOSCacheManager (os_cache=True) or ArrayProcessCacheManager."""
    __init__ = _with_array_managers(ffcv_loader_module.Loader.__init__)
