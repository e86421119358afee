"""The FFCV loader: a .beton (`convert.py ffcv`) -> V uint8 crops per image on the training device.

    loader = build(cfg, info, "train")        # cfg.loader == "ffcv"; reads cfg.ffcv_path or <data>/train.beton
    loader.set_epoch(epoch, start_batch)
    for batch in loader:                      # Batch(views: V x (N, 3, H, W) uint8 channels-last, labels, indices)

Decoding. FFCV's own multi-view recipe is one pipeline per view, each with a
RandomResizedCropRGBImageDecoder, so every JPEG is decoded V times. `MultiViewDecoder` is an FFCV
decoder that decodes each JPEG once (libffcv's turbojpeg `imdecode`, into a scratch image) and
cuts all V crops from it (libffcv's `resize_crop`, cv2 INTER_AREA), each flipped with probability
flip_prob in place. Raw-mode images are cropped straight from the file's pages. cfg.ffcv_fused
picks it (one pipeline, `views` crops) or FFCV's recipe (V pipelines of the same decoder with one
crop each: same crops, decoded V times). The scratch is one batch of decoded images per loader,
unpinned (FFCV's decoders pin one per sample, batch slot and view pipeline).

Crops are reproducible. FFCV 1.0.2 draws crops from numba's unseeded per-thread np.random, so they
differ from run to run. Here every (seed, epoch, row, view) seeds numba's np.random before the
draws (FFCV's get_random_crop: torchvision's RandomResizedCrop algorithm, then one uniform for the
flip), so crops do not depend on threads, fusion or batch composition, and a Python reference can
replay them (`crop_params`). The per-epoch part of the seed lives in a one-word cell that the
compiled decoder reads by address, because numba freezes Python globals at compile time.

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

Buffers. FFCV fills a ring of batches_ahead + 2 preallocated (pinned, under CUDA) host batches. On
CUDA each batch is copied on a side stream and FFCV may refill its slot only after that copy ends;
on a CPU device the yielded tensors are views of the ring, valid until the next batch is requested
(clone them to keep them longer).
"""
from __future__ import annotations

import functools
import json
import math
import queue
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipelines.loaders.common import Batch, DataError, num_batches, per_rank_batch, shard_indices

MISSING_FFCV = "loader=ffcv needs the ffcv package (with numba, opencv and libturbojpeg): run `make install`"
try:
    import numba
    import numba.core.event as numba_event
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, RGBImageField, get_center_crop, get_random_crop
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
MASK64 = (1 << 64) - 1


# ---- per-sample random streams ------------------------------------------------------------------

def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def epoch_key(seed: int, epoch: int) -> int:
    """The 64-bit key of one epoch's crops; the decoder reads it from the loader's key cell."""
    return _splitmix64(_splitmix64(seed & MASK64) ^ (epoch & MASK64))


def stream_seed(key: int, row: int, view: int) -> int:
    """The uint32 that seeds numba's np.random for one (epoch key, row, view): Python twin of `_stream_seed`."""
    return _splitmix64(key ^ ((row * 0xD1B54A32D192ED03) & MASK64) ^ ((view * 0xABC98388FB8FAC03) & MASK64)) >> 32


@numba.njit(nogil=True)
def _stream_seed(key, row, view):
    # stream_seed in numba, all in uint64 (mixing signed and unsigned integers gives floats in numba)
    z = np.uint64(key) ^ (np.uint64(row) * np.uint64(0xD1B54A32D192ED03))
    z = z ^ (np.uint64(view) * np.uint64(0xABC98388FB8FAC03))
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.uint32(z >> np.uint64(32))


def crop_params(key: int, row: int, view: int, height: int, width: int, scale, ratio,
                flip_prob: float) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of one view, exactly as the compiled decoder draws them.

    numba's np.random is MT19937 with NumPy's legacy seeding, so NumPy's global generator replays it.
    """
    state = np.random.get_state()
    try:
        np.random.seed(stream_seed(key, row, view))
        top, left, h, w = get_random_crop(height, width, np.asarray(scale, np.float64),
                                          np.asarray(ratio, np.float64))
        return top, left, h, w, bool(np.random.random() < flip_prob)
    finally:
        np.random.set_state(state)


# ---- the compiled decode kernel -----------------------------------------------------------------

_random_crop = numba.njit(nogil=True)(get_random_crop)
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
    """What a decoder produces: random-resized crops + flips (train) or one center crop (eval)."""
    size: int
    train: bool
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    flip_prob: float = 0.5
    center_ratio: float = 0.875     # eval: side of the center crop / shorter image side


@functools.cache
def _decode_kernel(spec: CropSpec, views: int, os_cache: bool, page_shift: int, parallel: bool):
    """The numba kernel behind MultiViewDecoder, compiled once per process for these constants.

    kernel(batch_indices, storage, metadata, storage_state, key_address, scratch_address,
    scratch_stride, first_view) fills storage[v][i] (v < views) with crop first_view + v of image
    batch_indices[i]. JPEGs decode into row i of the loader's scratch (see DecodeCells). The file
    is read from storage_state directly (FFCV's OS-cache or process-cache layout) rather than
    through the loader's own compiled reader, so that no per-loader object is baked in.
    """
    loop = numba.prange if parallel else range
    scale, ratio = np.array(spec.scale, np.float64), np.array(spec.ratio, np.float64)
    train, flip_prob, center_ratio, shift = spec.train, spec.flip_prob, spec.center_ratio, np.uint64(page_shift)

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

    def kernel(batch_indices, storage, metadata, storage_state, key_address, scratch_address, scratch_stride,
               first_view):
        # hand images to threads 2 at a time rather than in one block per thread: a thread that the
        # OS preempts (shared machines) then does not hold up the whole batch
        previous_chunk = numba.set_parallel_chunksize(2)
        key = _load_u64(key_address)
        # typed (not literal) constants: a literal argument would give the shared helpers one
        # compiled version per call site
        zero, one, no = np.uint32(0), np.uint32(1), np.bool_(False)
        for i in loop(len(batch_indices)):
            row = batch_indices[i]
            field = metadata[row]
            data = read(field["data_ptr"], storage_state)
            height, width = np.uint32(field["height"]), np.uint32(field["width"])
            if field["mode"] == JPG:            # decode once, for every view
                # a 3-D array, never a flat uint8[::1]: every FFCV loader with an OS cache flips
                # numba's shared uint8[::1] type to read-only (ffcv os_cache.state_type), which
                # corrupts the overload table of any long-lived function that took one
                image = numba.carray(cast_int_to_byte_ptr(scratch_address + i * scratch_stride),
                                     (np.int64(height), np.int64(width), 3))
                _imdecode(data, image, height, width, height, width, zero, zero, one, one, no, no)
            else:                               # raw pixels: crop from the file's page
                image = data.reshape(height, width, 3)
            for v in range(views):
                out = storage[v][i]
                if train:
                    np.random.seed(_stream_seed(key, row, first_view + v))
                    top, left, h, w = _random_crop(height, width, scale, ratio)
                    flip = np.random.random() < flip_prob
                else:
                    top, left, h, w = _center_crop(height, width, None, center_ratio)
                    flip = False
                _resize_crop(image, top, top + h, left, left + w, out)
                if flip:
                    _flip_inplace(out)
        numba.set_parallel_chunksize(previous_chunk)
        return storage

    return numba.njit(nogil=True, parallel=parallel)(kernel)


class DecodeCells:
    """Host memory that a loader's compiled decoders reach by address (numba freezes Python globals).

    key: the current epoch's crop key (epoch_key), written before each epoch.
    scratch: one decoded JPEG per sample of a batch, (batch, max_h * max_w * 3) uint8. FFCV decodes
    one batch at a time per loader and runs a loader's decoders one after another, so one scratch
    serves them all; FFCV's own decoders instead allocate one per sample for each of the
    batches_ahead + 2 slots and each view pipeline, all pinned under CUDA.
    """

    def __init__(self, batch_size: int, max_jpeg_pixels: int):
        self.key = np.zeros(1, np.uint64)
        self.scratch = np.empty((batch_size, max(1, max_jpeg_pixels) * 3), np.uint8)


class MultiViewDecoder(Operation):
    """FFCV decoder for an RGBImageField: each image decoded once, `views` crops out.

    Output: a tuple of `views` arrays (B, size, size, 3) uint8, view v being crop first_view + v.
    os_cache and page_size describe how the loader reads the file (FFCV's memory managers).
    """

    def __init__(self, spec: CropSpec, views: int, first_view: int, cells: DecodeCells, *,
                 os_cache: bool, page_size: int):
        super().__init__()
        self.spec, self.views, self.first_view, self.cells = spec, views, first_view, cells
        self.os_cache, self.page_shift = os_cache, int(page_size).bit_length() - 1

    def declare_state_and_memory(self, previous_state):
        size, u8 = self.spec.size, np.dtype("u1")
        queries = tuple([AllocationQuery((size, size, 3), u8)] * self.views)
        return replace(previous_state, jit_mode=True, shape=(size, size, 3), dtype=u8), queries

    def generate_code(self):
        kernel = _decode_kernel(self.spec, self.views, self.os_cache, self.page_shift, Compiler.num_threads > 1)
        key, scratch = self.cells.key.ctypes.data, self.cells.scratch.ctypes.data
        stride, first_view = self.cells.scratch.strides[0], self.first_view

        # FFCV compiles this thin wrapper per loader; the kernel is shared. np.int64(...): plain
        # int64 arguments, not literals (a literal would compile the kernel again for each loader)
        def decode(batch_indices, storage, metadata, storage_state):
            return kernel(batch_indices, storage, metadata, storage_state, np.int64(key), np.int64(scratch),
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

    def __init__(self, path: str | Path, *, spec: CropSpec, views: int, batch_size: int, rank: int,
                 world_size: int, seed: int, order: str, os_cache: bool, fused: bool, workers: int,
                 prefetch: int, drop_last: bool, device: torch.device, max_images: int = 0,
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
        n = int(reader.num_samples)
        rows = np.arange(n)
        if 0 < max_images < n:                           # as scan_image_folder: spread over classes
            rows = np.linspace(0, n - 1, max_images).round().astype(np.int64)
        self.path, self.device, self.seed, self.verbose = path, device, seed, verbose
        self.views, self.spec, self.fused = views, spec, fused
        self.classes = _classes(path, reader)
        self.num_rows, self.world_size, self.batch_size, self.drop_last = len(rows), world_size, batch_size, drop_last
        self.epoch, self.start_batch = 0, 0
        self.compile_seconds: float | None = None        # numba compile during construction + first batch
        self.first_batch_seconds: float | None = None
        self._running = None                             # the FFCV epoch iterator in flight

        # numba's thread pool cannot exceed NUMBA_NUM_THREADS (the core count by default)
        self.threads = max(1, min(workers, numba.config.NUMBA_NUM_THREADS))
        image_meta = reader.metadata[f"f{list(reader.handlers).index('image')}"]
        jpg = image_meta["mode"] == JPG
        self._cells = DecodeCells(batch_size, int((image_meta["height"][jpg].astype(np.int64)
                                                   * image_meta["width"][jpg]).max()) if jpg.any() else 0)
        self._order = RankOrder(order, rank, world_size, batch_size, drop_last)
        make = functools.partial(MultiViewDecoder, spec, cells=self._cells, os_cache=os_cache,
                                 page_size=int(reader.page_size))
        pipelines = {name: None for name in reader.handlers}                 # skip unread fields
        if fused:
            pipelines["image"] = PipelineSpec("image", decoder=make(views, 0))
        else:                                            # FFCV's recipe: one pipeline (one decode) per view
            for v in range(views):
                pipelines["image" if v == 0 else f"image_view{v}"] = PipelineSpec("image", decoder=make(1, v))
        pipelines["label"] = PipelineSpec("label", decoder=IntDecoder())
        pipelines["index"] = PipelineSpec("index", decoder=IntDecoder()) if "index" in reader.handlers \
            else PipelineSpec("label", decoder=RowDecoder())

        timer = numba_event.TimingListener()
        numba_event.register("numba:compile", timer)
        try:
            self.core = FFCVLoaderCore(str(path), batch_size=batch_size, num_workers=self.threads,
                                       os_cache=os_cache, order=self._order, distributed=False, seed=seed,
                                       indices=rows, pipelines=pipelines, drop_last=drop_last,
                                       batches_ahead=max(1, prefetch))
        finally:
            numba_event.unregister("numba:compile", timer)
        self._compile_timer = timer
        # FFCV returns one output per pipeline, in the order of its pipeline specs
        names = list(self.core.pipeline_specs)
        self._image_slots = [names.index("image")] + [names.index(f"image_view{v}") for v in range(1, views)
                                                      if not fused]
        self._label_slot, self._index_slot = names.index("label"), names.index("index")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch `epoch` from batch `start_batch` on (skipped for free)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} is outside this epoch's {len(self)} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return num_batches(self.num_rows, self.world_size, self.batch_size, self.drop_last)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's .beton rows of an epoch, in the order they are yielded."""
        return self._order.epoch_rows(epoch)

    def __iter__(self):
        self._close()                                    # an abandoned epoch stops filling the ring
        self._cells.key[0] = epoch_key(self.seed, self.epoch)
        self._order.start_batch = self.start_batch
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
            while out is not None:
                batch, copied = self._to_device(out)
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

    def _to_device(self, out) -> tuple[Batch, "torch.cuda.Event | None"]:
        """FFCV's host arrays -> Batch on the device; views (B, H, W, 3) become channels-last NCHW."""
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


def build(cfg, info, split: str, train: bool = True) -> FFCVLoader:
    batch = per_rank_batch(cfg.batch_size, info.world_size)
    if train:
        spec = CropSpec(cfg.size, True, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.flip_prob)
    else:                                               # torchvision loader's eval: short side size/0.875, center crop
        size = cfg.eval_size or cfg.size
        spec = CropSpec(size, False, center_ratio=1.0 if size <= 64 else size / round(size / 0.875))
    return FFCVLoader(
        beton_path(cfg, split), spec=spec, views=cfg.views if train else 1, batch_size=batch, rank=info.rank,
        world_size=info.world_size, seed=cfg.seed, order=cfg.ffcv_order if train else "sequential",
        os_cache=cfg.ffcv_os_cache, fused=cfg.ffcv_fused, workers=cfg.workers, prefetch=cfg.prefetch,
        drop_last=cfg.drop_last if train else False, device=info.device, max_images=cfg.max_images,
        verbose=info.rank == 0)
