"""The FFCV loader: a .beton (`convert.py ffcv`) -> V uint8 crops per image on the training device.

    loader = build(cfg, info, "train")        # cfg.loader == "ffcv"; reads cfg.ffcv_path or <data>/train.beton
    loader.set_epoch(epoch, start_batch)
    for batch in loader:                      # Batch(views: V x (N, 3, H, W) uint8 channels-last, labels, indices)

Decoding. FFCV's own multi-view recipe is one pipeline per view, each with a
RandomResizedCropRGBImageDecoder, so every JPEG is decoded V times. `MultiViewDecoder` (ffcv_kernel.py) is
an FFCV decoder that decodes each JPEG once (libffcv's turbojpeg `imdecode`, into a scratch image) and
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
elsewhere). The compiled decoder asks the host for one batch's boxes (`BoxPlanner`, ffcv_boxes.py, through numba's
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
start_batch batches from the order, so skipping costs nothing. ffcv_order=auto (the default) lets
read_order decide (LoaderSpec.ffcv_order: shard -> quasi_random, auto and sample -> random).

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
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipelines.loaders.common import Batch, DataError, shard_indices
from pipelines.loaders.spec import LoaderSpec
from pipelines.loaders.ffcv_boxes import BoxPlanner
# without FFCV this raises the ImportError that says what to install
from pipelines.loaders.ffcv_kernel import (JPG, MISSING_FFCV, PLANNERS, CropSpec, DecodeCells, MultiViewDecoder,
                                           RowDecoder)
# FFCV's Loader and QuasiRandom over array-only memory managers (no per-sample dicts or sets)
from pipelines.loaders.ffcv_memory import Loader as ArrayLoader, PageQuasiRandom

try:
    import numba
    import numba.core.event as numba_event
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RGBImageField
    from ffcv.pipeline import PipelineSpec
    from ffcv.traversal_order.base import TraversalOrder
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(f"{MISSING_FFCV} ({err})") from err


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
        self.quasi = PageQuasiRandom(loader) if self.kind == "quasi_random" else None
        # (pages, samples per page) int64: FFCV's sample_order shuffles it in place, so each call
        # starts from a copy of this one: the order is then a function of (seed, epoch), as resume needs
        self._pages = self.quasi.page_to_samples_array.copy() if self.quasi is not None else None
        return self

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's rows for a whole epoch, in order."""
        rows = np.asarray(self.indices, dtype=np.int64)
        if self.kind != "quasi_random":
            return rows[shard_indices(len(rows), self.rank, self.world_size, self.seed, epoch, self.batch_size,
                                      shuffle=self.kind == "random", drop_last=self.drop_last)]
        # FFCV's page-local order of all rows (identical on every rank), cut in contiguous blocks so
        # each rank reads ~1/world of the pages; block sizes as shard_indices would give
        self.quasi.page_to_samples_array = self._pages.copy()
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
        # crops are drawn for the sample's index in its source folder (the `index` field), as every loader does.
        # Copies, not views: a view of one field keeps this Reader's whole metadata (32 B per sample).
        # int32 (and the fields' own 2-byte heights / widths): 16 B per sample in all, not 40
        sample_index = (np.array(reader.metadata[f"f{fields.index('index')}"], np.int32) if "index" in fields
                        else np.arange(int(reader.num_samples), dtype=np.int32))
        self._labels = np.array(reader.metadata[f"f{fields.index('label')}"], np.int32)
        groups = np.arange(-1, -1 - len(self._labels), -1, dtype=np.int32)    # rows left out: alone
        groups[rows] = self._labels[rows]
        self._planner = BoxPlanner(spec, sample_index, np.array(image_meta["height"]),
                                   np.array(image_meta["width"]), groups,
                                   lambda row: f"{path} row {row} (index {sample_index[row]})")
        self.bad_images = self._planner.bad               # "file row r (index i): reason", distinct
        self._sample_index = sample_index
        PLANNERS[self._cells.failed.ctypes.data] = self._planner
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
            self.core = ArrayLoader(str(path), batch_size=batch_size, num_workers=self.threads,
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
    return FFCVLoader(beton_path(cfg, split), spec, order=spec.ffcv_order(cfg.ffcv_order),
                      os_cache=cfg.ffcv_os_cache, fused=cfg.ffcv_fused, verbose=spec.rank == 0)
