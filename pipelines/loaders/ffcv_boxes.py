"""The host side of the FFCV loader's compiled decoders (ffcv_loader.py, ffcv_kernel.py): `BoxPlanner`
draws each batch's crop boxes and flips from LoaderSpec.boxes a few batches ahead on a thread, and
names the stand-ins for images that do not decode. No FFCV import.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines.loaders.common import DataError, replacement
from pipelines.loaders.spec import check_bad


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

