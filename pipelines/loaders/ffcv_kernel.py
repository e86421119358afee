"""The FFCV loader's decode stage (ffcv_loader.py): `MultiViewDecoder`, an FFCV decoder that decodes
each JPEG once and cuts every crop from it, its numba kernel (`_decode_kernel`, compiled once per
process per CropSpec), `RowDecoder` (.beton rows as indices) and the host memory the compiled code
reaches by address (`DecodeCells`, `PLANNERS`). Imports FFCV and numba: only ffcv_loader.py imports it.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipelines.loaders.ffcv_boxes import BoxPlanner

MISSING_FFCV = "loader=ffcv needs the ffcv package (with numba, opencv and libturbojpeg): run `make install`"
try:
    import numba
    from ffcv.fields.rgb_image import IMAGE_MODES, get_center_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.utils import cast_int_to_byte_ptr
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(f"{MISSING_FFCV} ({err})") from err

JPG = int(IMAGE_MODES["jpg"])
# numba says this of every nogil function with an object-mode block (the kernel's host calls, which
# take the GIL by design); the decode loop itself is a separate parallel function
warnings.filterwarnings("ignore", message="Code running in object mode won't allow parallel execution",
                        category=numba.NumbaWarning)

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
PLANNERS: "weakref.WeakValueDictionary[int, BoxPlanner]" = weakref.WeakValueDictionary()


def _host_boxes(address: int, rows: np.ndarray) -> np.ndarray:
    return PLANNERS[address](rows)


def _host_stand_in(address: int, rows: np.ndarray, slot: int, k: int) -> tuple[int, np.ndarray]:
    return PLANNERS[address].stand_in(rows, slot, k)


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
    # the helpers are compiled for this kernel alone, not shared by every kernel of the process: FFCV
    # sets `mutable = False` on numba's shared array types (its managers' state_type), so a shared
    # dispatcher's overload table stops finding its own entries and grows with every kernel compiled
    # after (a test process that built a few dozen loaders spent over ten minutes in type inference)
    _center_crop, _imdecode, _resize_crop, _flip_inplace_ = (
        numba.njit(nogil=True)(f) for f in (get_center_crop, imdecode, resize_crop, _flip_inplace))

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
                _flip_inplace_(out)
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



class DecodeCells:
    """Host memory that a loader's compiled decoders reach by address (numba freezes Python globals).

    failed: one flag per batch slot, set by the decoder for a JPEG it cannot decode; its address
    also names the loader's BoxPlanner (PLANNERS).
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
