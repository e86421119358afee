"""The FFCV loader: a .beton (`convert.py ffcv`) -> V uint8 crops per image on the training device.

    loader = build(cfg, info, "train")        # cfg.loader == "ffcv"; reads cfg.ffcv_path or <data>/train.beton
    loader.set_epoch(epoch, start_batch)
    for batch in loader:                      # Batch(views: V x (N, 3, H, W) uint8 channels-last, labels, indices)

Decoding. FFCV's own multi-view recipe is one pipeline per view, each with a
RandomResizedCropRGBImageDecoder, so every JPEG is decoded V times. `MultiViewDecoder` is an FFCV
decoder that decodes each JPEG once (libffcv's turbojpeg `imdecode`, into a scratch image) and
cuts all V crops from it (libffcv's `resize_crop`, cv2 INTER_AREA), each to its own size
(multi-crop: spec.view_sizes) and flipped in place where drawn. Raw-mode images are cropped straight
from the file's pages. cfg.ffcv_fused picks it (one pipeline, every crop) or FFCV's recipe (V
pipelines of the same decoder with one crop each: same crops, decoded V times). The scratch is one
batch of decoded images per loader, unpinned (FFCV's decoders pin one per sample, batch slot and
view pipeline).

Crops are every loader's crops. FFCV 1.0.2 draws crops from numba's unseeded per-thread np.random.
Here the boxes and flips come from LoaderSpec.boxes (the project's per-sample stream,
sample_rng(seed, epoch, index), drawn as the torchvision reference draws them), where `index` is
the sample's position in its source folder (the .beton's `index` field; the row for a .beton made
elsewhere). The compiled decoder asks the host for one batch's boxes (`BoxPlanner`, through numba's
object mode, once per batch); a planner thread draws them a few batches ahead, in the order the
batches will come, so the decoder rarely waits.

Bad images (.beton files are checked when written: `convert.py ffcv` skips unreadable files): a
JPEG that libjpeg-turbo cannot decode later is, under bad_images=skip, replaced by the next image of
its class (common.replacement over the kept rows, decoded and cropped as itself, with its label and
index), named in loader.bad_images as "<file> row R (index I)"; under bad_images=stop, or past
max_bad_images, the epoch stops with a DataError naming them.

Order. A custom FFCV TraversalOrder gives each rank its part of the epoch: `random` and
`sequential` use the project's `shard_indices` (same permutation and cut as the torchvision loader,
no process group needed, disjoint and covering, reshuffled per epoch from (seed, epoch));
`quasi_random` is FFCV's page-local order for the whole set, cut into contiguous per-rank blocks
(FFCV itself does not support it distributed). A resumed epoch (start_batch > 0) drops the first
start_batch batches from the order, so skipping costs nothing.

Compile. numba compiles the decode kernel on the first batch of a loader. Kernels are cached per
process by their constants (views, size, crop ranges, cache mode, threads), so later loaders with
the same pipeline compile only FFCV's thin stage wrapper. `compile_seconds` is the numba compile
time measured during the first batch (printed once on rank 0).

Buffers. FFCV fills a ring of batches_ahead + 2 preallocated (pinned, under CUDA) host batches and
refills a slot as soon as the batch after it is taken. Every Batch owns its tensors (the contract in
common.py): on CUDA each batch is copied into fresh device memory on a side stream, and FFCV may
refill its slot only after that copy ends; on a CPU device the views, labels and indices are copied
out of the ring (a memcpy per batch; the consumers, e.g. the kNN bank, keep them past the next batch).
"""
from __future__ import annotations

import functools
import json
import math
import queue
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipelines.loaders.common import Batch, DataError, replacement, shard_indices
from pipelines.loaders.spec import LoaderSpec, check_bad

MISSING_FFCV = "loader=ffcv needs the ffcv package (with numba, opencv and libturbojpeg): run `make install`"
try:
    import numba
    import numba.core.event as numba_event
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, RGBImageField, get_center_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader import Loader as FFCVLoaderCore
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.traversal_order import QuasiRandom
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.utils import cast_int_to_byte_ptr
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(f"{MISSING_FFCV} ({err})") from err

JPG = int(IMAGE_MODES["jpg"])
# numba says this of every nogil function with an object-mode block (the kernel's host calls, which
# take the GIL by design); the decode loop itself is a separate parallel function
warnings.filterwarnings("ignore", message="Code running in object mode won't allow parallel execution",
                        category=numba.NumbaWarning)


# ---- the compiled decode kernel -----------------------------------------------------------------

_center_crop = numba.njit(nogil=True)(get_center_crop)
_imdecode = numba.njit(nogil=True)(imdecode)
_resize_crop = numba.njit(nogil=True)(resize_crop)


@numba.njit(nogil=True)
def _load_u64(address):
    return numba.carray(cast_int_to_byte_ptr(address), 8).view(np.uint64)[0]


@numba.njit(nogil=True)
def _flip_inplace(img):
    """(H, W, 3) uint8 mirrored left-right in place (rows as flat bytes: ~memory speed, like cv2.flip)."""
    h, w = img.shape[0], img.shape[1]
    rows = img.reshape(h, w * 3)
    for r in range(h):
        row = rows[r]
        for c in range(w // 2):
            a, b = 3 * c, 3 * (w - 1 - c)
            t0, t1, t2 = row[a], row[a + 1], row[a + 2]
            row[a], row[a + 1], row[a + 2] = row[b], row[b + 1], row[b + 2]
            row[b], row[b + 1], row[b + 2] = t0, t1, t2


@dataclass(frozen=True)
class CropSpec:
    """What a decoder produces (its compile-time constants): crops of `sizes` with the host's boxes
    and flips (train), or one center crop (eval)."""
    sizes: tuple[int, ...]           # one per crop the decoder writes
    train: bool
    center_ratio: float = 0.875      # eval: side of the center crop / shorter image side


# Host callbacks of compiled decoders, by the address of their loader's key cell (numba freezes
# Python globals at compile time, so the kernel names this table and passes the address).
_PLANNERS: "weakref.WeakValueDictionary[int, BoxPlanner]" = weakref.WeakValueDictionary()


def _host_boxes(address: int, rows: np.ndarray) -> np.ndarray:
    return _PLANNERS[address](rows)


def _host_stand_in(address: int, rows: np.ndarray, slot: int, k: int) -> tuple[int, np.ndarray]:
    return _PLANNERS[address].stand_in(rows, slot, k)


@functools.cache
def _decode_kernel(spec: CropSpec, os_cache: bool, page_shift: int, parallel: bool):
    """The numba kernel behind MultiViewDecoder, compiled once per process for these constants.

    kernel(batch_indices, storage, metadata, storage_state, cells_address, scratch_address,
    scratch_stride, first_view) fills storage[v][i] (v < len(spec.sizes)) with crop
    first_view + v of image batch_indices[i]; boxes (B, V_all, 5) come from the host per batch.
    JPEGs decode into row i of the loader's scratch (see DecodeCells); a JPEG that fails to decode
    sets its batch slot in the `failed` cell (at cells_address), and the host names the image that
    stands in for it (bad_images=skip) or records the failure (the loader raises). The file is read from storage_state directly (FFCV's
    OS-cache or process-cache layout) rather than through the loader's own compiled reader, so that
    no per-loader object is baked in.
    """
    loop = numba.prange if parallel else range
    train, center_ratio, shift = spec.train, spec.center_ratio, np.uint64(page_shift)
    views = len(spec.sizes)

    if os_cache:
        @numba.njit(nogil=True)
        def read(ptr, state):                   # state = (file mmap, sorted ptrs, sizes)
            size = state[2][np.searchsorted(state[1], ptr)]
            return state[0][ptr:ptr + size]
    else:
        @numba.njit(nogil=True)
        def read(ptr, state):                   # state = (page slots, ptrs, sizes, page -> slot)
            size = state[2][np.searchsorted(state[1], ptr)]
            page = ptr >> shift
            offset = ptr - (page << shift)
            return state[0][state[3][page], offset:offset + size]

    @numba.njit(nogil=True)
    def decode_one(i, row, boxes, storage, metadata, storage_state, scratch_address, scratch_stride, first_view):
        """Image `row` into batch slot i, crop first_view + v of `boxes` (V_all, 5) into storage[v][i];
        False when its JPEG does not decode."""
        # typed (not literal) constants: a literal argument would give the shared helpers one
        # compiled version per call site
        zero, one, no = np.uint32(0), np.uint32(1), np.bool_(False)
        field = metadata[row]
        data = read(field["data_ptr"], storage_state)
        height, width = np.uint32(field["height"]), np.uint32(field["width"])
        if field["mode"] == JPG:                # decode once, for every view
            # a 3-D array, never a flat uint8[::1]: every FFCV loader with an OS cache flips
            # numba's shared uint8[::1] type to read-only (ffcv os_cache.state_type), which
            # corrupts the overload table of any long-lived function that took one
            image = numba.carray(cast_int_to_byte_ptr(scratch_address + i * scratch_stride),
                                 (np.int64(height), np.int64(width), 3))
            if _imdecode(data, image, height, width, height, width, zero, zero, one, one, no, no) != 0:
                return False
        else:                                   # raw pixels: crop from the file's page
            image = data.reshape(height, width, 3)
        for v in range(views):
            out = storage[v][i]
            if train:
                box = boxes[first_view + v]
                top, left, h, w, flip = box[0], box[1], box[2], box[3], box[4] != 0
            else:
                top, left, h, w = _center_crop(height, width, None, center_ratio)
                flip = False
            _resize_crop(image, top, top + h, left, left + w, out)
            if flip:
                _flip_inplace(out)
        return True

    def decode_all(batch_indices, storage, metadata, storage_state, boxes, failed, scratch_address, scratch_stride,
                   first_view):
        # hand images to threads 2 at a time rather than in one block per thread: a thread that the
        # OS preempts (shared machines) then does not hold up the whole batch
        previous_chunk = numba.set_parallel_chunksize(2)
        for i in loop(len(batch_indices)):
            ok = decode_one(i, batch_indices[i], boxes[i], storage, metadata, storage_state,
                            scratch_address, scratch_stride, first_view)
            failed[i, 0] = 0 if ok else 1
        numba.set_parallel_chunksize(previous_chunk)
        bad = 0
        for i in range(len(batch_indices)):
            bad += failed[i, 0]
        return bad

    decode_all = numba.njit(nogil=True, parallel=parallel)(decode_all)

    # the host calls (object mode: they take the GIL) stay outside the parallel loop's function
    def kernel(batch_indices, storage, metadata, storage_state, cells_address, scratch_address, scratch_stride,
               first_view):
        if train:
            with numba.objmode(boxes="int32[:, :, ::1]"):
                boxes = _host_boxes(cells_address, batch_indices)
        else:                                   # eval: center crops, no boxes
            boxes = np.zeros((len(batch_indices), 1, 5), np.int32)
        # (B, 1), not a flat uint8[::1]: see the scratch image in decode_one
        failed = numba.carray(cast_int_to_byte_ptr(cells_address), (len(batch_indices), 1))
        if decode_all(batch_indices, storage, metadata, storage_state, boxes, failed, scratch_address,
                      scratch_stride, first_view):
            # bad_images: ask the host for stand-ins (the next image of the class) until one decodes;
            # a negative row means stop (bad_images=stop, too many, or none left): the host raises
            for i in range(len(batch_indices)):
                k = 1
                while failed[i, 0]:
                    with numba.objmode(stand_in="int64", stand_in_boxes="int32[:, ::1]"):
                        stand_in, stand_in_boxes = _host_stand_in(cells_address, batch_indices, i, k)
                    if stand_in < 0:
                        break
                    if decode_one(i, stand_in, stand_in_boxes, storage, metadata, storage_state, scratch_address,
                                  scratch_stride, first_view):
                        failed[i, 0] = 0
                    k += 1
        return storage

    return numba.njit(nogil=True)(kernel)


class BoxPlanner:
    """The host side of a loader's decoders.

    Boxes: (B, V, 5) int32 (top, left, h, w, flip) per batch of .beton rows, from LoaderSpec.boxes.
    `start(epoch, rows)` plans the epoch's batches in order on a background thread, `AHEAD` batches
    ahead of the decoder; a batch it did not plan (or the same batch asked again by the per-view
    pipelines) is drawn or served on the spot.

    Bad images: `stand_in` names the image that replaces one that did not decode (common.replacement
    over `groups`, the label of each kept row; -1 for rows max_images left out) and records it in
    `replaced[batch rows][slot]`, so the loader can relabel the slot; `bad` holds the names
    (loader.bad_images), `error` the DataError to raise (stop, too many, none left)."""
    AHEAD = 3

    def __init__(self, spec, sample_index: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                 groups: np.ndarray, describe):
        self.spec, self.sample_index, self.heights, self.widths = spec, sample_index, heights, widths
        self.groups, self.describe = groups, describe
        self.bad: list[str] = []
        self.replaced: dict[bytes, dict[int, int]] = {}
        self.error: DataError | None = None
        self.epoch = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ffcv-boxes")
        self._ahead: deque = deque()               # (rows bytes, future), in the decoder's order
        self._batches: list[np.ndarray] = []
        self._next = 0
        self._last: tuple[bytes, np.ndarray] | None = None
        self._lock = threading.Lock()

    def draw(self, epoch: int, rows: np.ndarray) -> np.ndarray:
        spec, index, h, w = self.spec, self.sample_index, self.heights, self.widths
        out = np.empty((len(rows), spec.views, 5), np.int32)
        for i, r in enumerate(rows):
            out[i] = spec.boxes(epoch, int(index[r]), int(h[r]), int(w[r]))
        return out

    def start(self, epoch: int, rows: np.ndarray) -> None:
        with self._lock:
            for _, job in self._ahead:
                job.cancel()
            self.epoch, self._last, self._next = epoch, None, 0
            b = self.spec.batch_size
            self._batches = [rows[k:k + b] for k in range(0, len(rows), b)]
            self._ahead = deque()
            self._fill()

    def _fill(self) -> None:
        while len(self._ahead) < self.AHEAD and self._next < len(self._batches):
            rows = self._batches[self._next]
            self._ahead.append((rows.tobytes(), self._pool.submit(self.draw, self.epoch, rows)))
            self._next += 1

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        key = rows.tobytes()
        with self._lock:
            if self._last is not None and self._last[0] == key:
                return self._last[1]
            job = None
            if self._ahead and self._ahead[0][0] == key:
                job = self._ahead.popleft()[1]
                self._fill()
            epoch = self.epoch
        boxes = job.result() if job is not None else self.draw(epoch, rows)
        with self._lock:
            self._last = (key, boxes)
        return boxes

    def stand_in(self, rows: np.ndarray, slot: int, k: int) -> tuple[int, np.ndarray]:
        """The k-th stand-in (row, its (V, 5) boxes) for the image in batch slot `slot` that did not
        decode (nor did stand-ins 1 .. k-1); row -1: stop, with self.error set."""
        row = int(rows[slot])
        none = (-1, np.zeros((max(1, self.spec.views), 5), np.int32))
        if self.error is not None:
            return none
        try:
            if k == 1:
                check_bad(self.spec, self.bad, self.describe(row), "libjpeg-turbo cannot decode the JPEG")
            else:                                      # the previous stand-in did not decode either
                previous = replacement(self.groups, row, k - 1)
                check_bad(self.spec, self.bad, self.describe(previous), "libjpeg-turbo cannot decode the JPEG")
            other = replacement(self.groups, row, k)
            if other == row:
                raise DataError(f"every image of label {self.groups[row]} in the .beton is unreadable: "
                                + "; ".join(self.bad[-5:]))
        except DataError as err:
            self.error = err
            return none
        with self._lock:
            self.replaced.setdefault(rows.astype(np.int64).tobytes(), {})[slot] = other
        boxes = (self.draw(self.epoch, np.array([other]))[0] if self.spec.train
                 else np.zeros((1, 5), np.int32))
        return other, np.ascontiguousarray(boxes)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class DecodeCells:
    """Host memory that a loader's compiled decoders reach by address (numba freezes Python globals).

    failed: one flag per batch slot, set by the decoder for a JPEG it cannot decode; its address
    also names the loader's BoxPlanner (_PLANNERS).
    scratch: one decoded JPEG per sample of a batch, (batch, max_h * max_w * 3) uint8. FFCV decodes
    one batch at a time per loader and runs a loader's decoders one after another, so one scratch
    serves them all; FFCV's own decoders instead allocate one per sample for each of the
    batches_ahead + 2 slots and each view pipeline, all pinned under CUDA.
    """

    def __init__(self, batch_size: int, max_jpeg_pixels: int):
        self.failed = np.zeros(max(1, batch_size), np.uint8)
        self.scratch = np.empty((batch_size, max(1, max_jpeg_pixels) * 3), np.uint8)


class MultiViewDecoder(Operation):
    """FFCV decoder for an RGBImageField: each image decoded once, every crop of `spec` out.

    Output: a tuple of len(spec.sizes) arrays, array v (B, S_v, S_v, 3) uint8 being crop first_view + v.
    os_cache and page_size describe how the loader reads the file (FFCV's memory managers).
    """

    def __init__(self, spec: CropSpec, first_view: int, cells: DecodeCells, *, os_cache: bool, page_size: int):
        super().__init__()
        self.spec, self.first_view, self.cells = spec, first_view, cells
        self.os_cache, self.page_shift = os_cache, int(page_size).bit_length() - 1

    def declare_state_and_memory(self, previous_state):
        u8 = np.dtype("u1")
        queries = tuple(AllocationQuery((s, s, 3), u8) for s in self.spec.sizes)
        size = self.spec.sizes[0]
        return replace(previous_state, jit_mode=True, shape=(size, size, 3), dtype=u8), queries

    def generate_code(self):
        kernel = _decode_kernel(self.spec, self.os_cache, self.page_shift, Compiler.num_threads > 1)
        failed, scratch = self.cells.failed.ctypes.data, self.cells.scratch.ctypes.data
        stride, first_view = self.cells.scratch.strides[0], self.first_view

        # FFCV compiles this thin wrapper per loader; the kernel is shared. np.int64(...): plain
        # int64 arguments, not literals (a literal would compile the kernel again for each loader)
        def decode(batch_indices, storage, metadata, storage_state):
            return kernel(batch_indices, storage, metadata, storage_state, np.int64(failed), np.int64(scratch),
                          np.int64(stride), np.int64(first_view))

        return decode


class RowDecoder(Operation):
    """The .beton row of each sample, (B, 1) int64: indices for files without an `index` field."""

    def declare_state_and_memory(self, previous_state):
        i64 = np.dtype("<i8")
        return replace(previous_state, jit_mode=True, shape=(1,), dtype=i64), AllocationQuery((1,), i64)

    def generate_code(self):
        def rows(batch_indices, destination, metadata, storage_state):
            for i in range(len(batch_indices)):
                destination[i, 0] = batch_indices[i]
            return destination[:len(batch_indices)]

        return rows


# ---- order: this rank's part of each epoch ------------------------------------------------------

class RankOrder(TraversalOrder):
    """FFCV traversal order over the loader's rows (see the module docstring).

    FFCV instantiates an order itself, `order(loader)`, so this object takes its settings first and
    binds to the loader when called. `start_batch` drops that many batches from the next epoch.
    """

    def __init__(self, kind: str, rank: int, world_size: int, batch_size: int, drop_last: bool):
        if kind not in ("random", "quasi_random", "sequential"):
            raise ValueError(f"ffcv_order={kind!r}: choose random, quasi_random or sequential")
        self.kind, self.rank, self.world_size = kind, rank, world_size
        self.batch_size, self.drop_last, self.start_batch = batch_size, drop_last, 0

    def __call__(self, loader) -> "RankOrder":
        super().__init__(loader)                         # self.indices (rows), self.seed
        self.quasi = QuasiRandom(loader) if self.kind == "quasi_random" else None
        return self

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's rows for a whole epoch, in order."""
        rows = np.asarray(self.indices, dtype=np.int64)
        if self.kind != "quasi_random":
            return rows[shard_indices(len(rows), self.rank, self.world_size, self.seed, epoch, self.batch_size,
                                      shuffle=self.kind == "random", drop_last=self.drop_last)]
        # FFCV's page-local order of all rows (identical on every rank), cut in contiguous blocks so
        # each rank reads ~1/world of the pages; block sizes as shard_indices would give
        order = np.asarray(self.quasi.sample_order(epoch), dtype=np.int64)
        if self.drop_last:
            per_rank = len(order) // (self.batch_size * self.world_size) * self.batch_size
        else:
            per_rank = math.ceil(len(order) / self.world_size)
            order = np.concatenate([order, order[:per_rank * self.world_size - len(order)]])
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.epoch_rows(epoch)[self.start_batch * self.batch_size:]


# ---- the loader ---------------------------------------------------------------------------------

class FFCVLoader:
    """Multi-view crops from a .beton; the loader contract of pipelines/loaders/common.py."""

    def __init__(self, path: str | Path, spec: LoaderSpec, *, order: str, os_cache: bool, fused: bool,
                 verbose: bool = True):
        from ffcv.reader import Reader
        path = Path(path)
        if not path.is_file():
            raise DataError(f"FFCV file {path} does not exist; make it with "
                            f"`python convert.py ffcv --src <split folder> --out {path}`")
        reader = Reader(str(path))
        for name, kind in (("image", RGBImageField), ("label", None)):
            if name not in reader.handlers or (kind and not isinstance(reader.handlers[name], kind)):
                raise DataError(f"{path} needs an RGBImageField 'image' and an IntField 'label'; "
                                f"it has {', '.join(reader.handlers)}")
        rows = spec.keep(int(reader.num_samples))
        batch_size, views = spec.batch_size, spec.views
        self.path, self.spec, self.device, self.verbose = path, spec, spec.device, verbose
        self.views, self.fused = views, fused
        self.classes = _classes(path, reader)
        self.num_rows = len(rows)
        self.epoch, self.start_batch = 0, 0
        self.compile_seconds: float | None = None        # numba compile during construction + first batch
        self.first_batch_seconds: float | None = None
        self._running = None                             # the FFCV epoch iterator in flight

        # numba's thread pool cannot exceed NUMBA_NUM_THREADS (the core count by default)
        self.threads = max(1, min(spec.workers, numba.config.NUMBA_NUM_THREADS))
        fields = list(reader.handlers)
        image_meta = reader.metadata[f"f{fields.index('image')}"]
        jpg = image_meta["mode"] == JPG
        self._cells = DecodeCells(batch_size, int((image_meta["height"][jpg].astype(np.int64)
                                                   * image_meta["width"][jpg]).max()) if jpg.any() else 0)
        # crops are drawn for the sample's index in its source folder (the `index` field), as every loader does
        sample_index = (np.asarray(reader.metadata[f"f{fields.index('index')}"], np.int64) if "index" in fields
                        else np.arange(int(reader.num_samples), dtype=np.int64))
        self._labels = np.asarray(reader.metadata[f"f{fields.index('label')}"], np.int64)
        groups = np.arange(-1, -1 - len(self._labels), -1, dtype=np.int64)    # rows left out: alone
        groups[rows] = self._labels[rows]
        self._planner = BoxPlanner(spec, sample_index, np.asarray(image_meta["height"], np.int64),
                                   np.asarray(image_meta["width"], np.int64), groups,
                                   lambda row: f"{path} row {row} (index {sample_index[row]})")
        self.bad_images = self._planner.bad               # "file row r (index i): reason", distinct
        self._sample_index = sample_index
        _PLANNERS[self._cells.failed.ctypes.data] = self._planner
        self._order = RankOrder(order, spec.rank, spec.world_size, batch_size, spec.drop_last)
        make = functools.partial(MultiViewDecoder, cells=self._cells, os_cache=os_cache,
                                 page_size=int(reader.page_size))
        if spec.train:
            crop = CropSpec(spec.view_sizes, True)
        else:                                            # the eval crop's short-side ratio (spec.eval_short_side)
            crop = CropSpec(spec.view_sizes, False, center_ratio=spec.eval_size / spec.eval_short_side)
        pipelines = {name: None for name in reader.handlers}                 # skip unread fields
        if fused:
            pipelines["image"] = PipelineSpec("image", decoder=make(crop, 0))
        else:                                            # FFCV's recipe: one pipeline (one decode) per view
            for v in range(views):
                pipelines["image" if v == 0 else f"image_view{v}"] = PipelineSpec(
                    "image", decoder=make(replace(crop, sizes=(crop.sizes[v],)), v))
        pipelines["label"] = PipelineSpec("label", decoder=IntDecoder())
        pipelines["index"] = PipelineSpec("index", decoder=IntDecoder()) if "index" in reader.handlers \
            else PipelineSpec("label", decoder=RowDecoder())

        timer = numba_event.TimingListener()
        numba_event.register("numba:compile", timer)
        try:
            self.core = FFCVLoaderCore(str(path), batch_size=batch_size, num_workers=self.threads,
                                       os_cache=os_cache, order=self._order, distributed=False, seed=spec.seed,
                                       indices=rows, pipelines=pipelines, drop_last=spec.drop_last,
                                       batches_ahead=max(1, spec.prefetch))
        finally:
            numba_event.unregister("numba:compile", timer)
        self._compile_timer = timer
        # FFCV returns one output per pipeline, in the order of its pipeline specs
        names = list(self.core.pipeline_specs)
        self._image_slots = [names.index("image")] + [names.index(f"image_view{v}") for v in range(1, views)
                                                      if not fused]
        self._label_slot, self._index_slot = names.index("label"), names.index("index")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch `epoch` from batch `start_batch` on (skipped for free)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} is outside this epoch's {len(self)} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.spec.num_batches(self.num_rows)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's .beton rows of an epoch, in the order they are yielded."""
        return self._order.epoch_rows(epoch)

    def __iter__(self):
        self._close()                                    # an abandoned epoch stops filling the ring
        self._order.start_batch = self.start_batch
        self._planner.error = None
        self._planner.replaced.clear()
        order = self._order.sample_order(self.epoch)
        if self.spec.train:
            self._planner.start(self.epoch, order)
        b = self.spec.batch_size
        batch_keys = [order[k:k + b].astype(np.int64).tobytes() for k in range(0, len(order), b)]
        self.core.next_epoch = self.epoch                # FFCV's own epoch counter (orders take it)
        first = self.compile_seconds is None
        if first:
            numba_event.register("numba:compile", self._compile_timer)
        try:
            t0 = time.perf_counter()
            self._running = epoch = iter(self.core)
            out = _next_batch(epoch)
        finally:
            if first:
                numba_event.unregister("numba:compile", self._compile_timer)
        if first:
            self._report_compile(time.perf_counter() - t0)
        copied = None                                    # CUDA event: the previous batch left its slot
        try:
            k = 0
            while out is not None:
                if self._planner.error is not None:      # bad_images=stop, too many, or none left
                    raise self._planner.error
                batch, copied = self._to_device(out, self._planner.replaced.pop(batch_keys[k], {}))
                k += 1
                yield batch
                if copied is not None:
                    copied.synchronize()                 # FFCV may refill that slot once we ask again
                out = _next_batch(epoch)
        finally:
            if self._running is epoch:                   # not if a newer epoch already replaced it
                self._close()

    def _report_compile(self, first_batch: float) -> None:
        timer = self._compile_timer
        self.compile_seconds = timer.duration if timer.done else 0.0
        self.first_batch_seconds = first_batch
        if self.verbose:
            print(f"ffcv: numba compile {self.compile_seconds:.1f} s (once per process and pipeline), first batch "
                  f"{first_batch:.1f} s; {self.threads} threads, {'fused' if self.fused else 'per-view'} decode",
                  file=sys.stderr, flush=True)

    def _to_device(self, out, replaced: dict[int, int]) -> tuple[Batch, "torch.cuda.Event | None"]:
        """FFCV's host arrays -> Batch on the device; views (B, H, W, 3) become channels-last NCHW.
        replaced: {batch slot: .beton row} of the stand-ins for images that did not decode."""
        for slot, row in replaced.items():               # their label and index, not the bad image's
            out[self._label_slot][slot, 0] = self._labels[row]
            out[self._index_slot][slot, 0] = self._sample_index[row]
        host = [torch.from_numpy(a) for slot in self._image_slots for a in out[slot]]
        host += [torch.from_numpy(out[self._label_slot][:, 0]), torch.from_numpy(out[self._index_slot][:, 0])]
        copied = None
        if self._copy_stream is not None:
            # copy on a side stream (it does not queue behind the training step), then make the
            # consumer's stream wait for it; the event tells us when the host slot is free again
            with torch.cuda.stream(self._copy_stream):
                moved = [t.to(self.device, non_blocking=True) for t in host]
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            for t in moved:
                t.record_stream(current)
            host = moved
        else:
            # on a CPU device the arrays are FFCV's ring, which its thread refills once the next batch
            # is asked for: copy them out, so the Batch stays valid (common.py's contract)
            host = [t.clone() for t in host]
        views = [v.permute(0, 3, 1, 2) for v in host[:-2]]
        return Batch(views, host[-2], host[-1]), copied

    def _close(self) -> None:
        """Stop the epoch in flight, if any (see _stop)."""
        if self._running is not None:
            _stop(self._running)
            self._running = None


def _stop(epoch) -> None:
    """Stop an FFCV EpochIterator and wait for its thread, which finishes the batch it is decoding
    (the scratch is shared with the next epoch). Its queue is drained meanwhile: at the end of an
    epoch FFCV's thread waits, without a timeout, for room to post its end marker."""
    epoch.close()
    while epoch.is_alive():
        try:
            epoch.output_queue.get(timeout=0.1)
        except queue.Empty:
            pass


def _next_batch(epoch):
    """The next batch of an FFCV EpochIterator, None at the end of the epoch.

    FFCV's own __next__ waits forever when its decode thread dies (a numba error, a bad file);
    this one polls and raises instead. The thread's traceback is printed by Python above.
    """
    while True:
        try:
            item = epoch.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not epoch.is_alive():
                raise RuntimeError("FFCV's decode thread stopped without finishing the epoch "
                                   "(its traceback is printed above)") from None
    if item is None:
        epoch.close()
        return None
    slot, result = item
    if epoch.cuda_streams[slot] is not None:             # FFCV ran no CUDA work in it, but keep its order
        torch.cuda.current_stream().wait_stream(epoch.cuda_streams[slot])
    return result


def _classes(path: Path, reader) -> list[str]:
    """Class names from the converter's sidecar; label numbers for a .beton made elsewhere."""
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        return list(json.loads(sidecar.read_text())["classes"])
    labels = reader.metadata[f"f{list(reader.handlers).index('label')}"]
    return [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]


def beton_path(cfg, split: str) -> Path:
    """cfg.ffcv_path for the train split ("{split}" in it is replaced), else <data>/<split>.beton."""
    if cfg.ffcv_path and (split == cfg.train_split or "{split}" in cfg.ffcv_path):
        return Path(cfg.ffcv_path.replace("{split}", split))
    return Path(cfg.data) / f"{split}.beton"


def build(cfg, spec: LoaderSpec, split: str) -> FFCVLoader:
    return FFCVLoader(beton_path(cfg, split), spec, order=cfg.ffcv_order if spec.train else "sequential",
                      os_cache=cfg.ffcv_os_cache, fused=cfg.ffcv_fused, verbose=spec.rank == 0)
