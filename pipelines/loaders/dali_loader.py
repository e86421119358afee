"""The DALI loader (loader=dali): decode only the pixels the crops keep, on the GPU when there is one.

It meets the contract of pipelines/loaders/common.py: the spec's views (multi-crop: view v is
(N, 3, S_v, S_v)), uint8 channels-last on the training device, plus labels and indices. Reads an
ImageFolder split or webdataset shards (`convert.py webdataset`; detected by their index.json), see
pipelines/loaders/samples.py.

One batch, start to finish:

    host (a planner thread, one batch ahead of DALI's requests, + a pool of spec.workers threads,
          each taking one contiguous run of the batch's samples)
        order       spec.shard(n, epoch, order): the same images per rank and epoch as every loader
                    (the read order: spec.read_order_of, with a webdataset's shards)
        read        the encoded bytes: one file, or one pread from an open webdataset shard
        plan        (H, W) from the header (parsed on an image's first epoch, then kept); the V
                    boxes + flips of spec.boxes(epoch, index, H, W) for the whole batch in one
                    vectorised call (crop_draws.batch_boxes, the same numbers): the crops every
                    loader draws, resumable
        window      the union of the V boxes, for the whole batch at once in numpy: the only
                    region that gets decoded (train=False: the whole image, one view =
                    torchvision_loader.eval_transform as a fractional box)
    DALI (fn.external_source -> spec.workers threads, spec.prefetch batches ahead; on the GPU
          its outputs are bound to the consumer's current CUDA stream, no host sync)
        decode      decoders.image_slice(window), once per image whatever the number of views:
                    "mixed" = nvJPEG with the hardware JPEG decoder where the GPU has one, "cpu" =
                    libjpeg-turbo; both skip what lies outside it
        crop        training on a GPU: fn.resize per view on the GPU, ROI = the box inside the
                    window (given right-to-left for a flip), antialiased bilinear to S_v x S_v
    torch
        GPU         V x (N, S_v, S_v, 3) DALI buffers -> torch through DLPack, copied into torch's
                    memory on the consumer's stream (DALI's own buffers are outside torch's caching
                    allocator: record_stream cannot keep them from reuse while another stream reads
                    them), DALI's outputs held until a CUDA event after the copies; NHWC permuted
                    to NCHW is channels-last for free
        CPU         the pool resizes each box of the decoded windows (a view, no copy; flipped
                    first) straight into its row of the (N, S_v, S_v, 3) batch (crop_resize)

Why the window and not one decode per view: on the CPU, decoding the union once is as fast as the
full image or faster (rows below it are never decoded, columns outside skip the IDCT) and cheaper
than V region decodes, which each redo the entropy decoding; on the GPU it feeds nvJPEG's ROI
decode. Why torch crops on the CPU: measured on this machine (CPU time per 224 px antialiased view
from photos of at most 256 px, one thread) DALI's CPU fn.resize takes ~0.4 ms, torch's uint8
channels-last kernel writing into the batch ~0.05-0.09 ms; per image the resizes are about as much
work as the decode. On the GPU DALI's resize is the fast one. What stays in Python per image is
the read and two calls per view; the kernels release the interpreter lock.

A Batch owns its memory (the contract: it stays valid after the next one): the views are new
tensors, labels and indices come from arrays the plan made for that batch alone.

Bad images (bad_images, pipelines/loaders/spec.py): a file that cannot be read or whose header is
unusable is found on the host; one that DALI's decoder rejects makes the pipeline fail, and the
batches in flight are re-checked with pipelines.tools.validate (PIL + DALI's header rules) to name
it, not only "sample #3". Under bad_images=skip it is replaced by common.replacement (the next image
of its class folder or shard, as every loader does), named once in loader.bad_images, and the
batches not yet yielded are planned again on a new pipeline, and a printed line names the file next
to DALI's own message, which names none; under bad_images=stop a DataError names it. An evaluation
pass (train=False) ends with a line naming and counting the images it left out (their stand-ins are
duplicates that kNN and the linear features count once). `python convert.py validate DIR` finds all
of them before a run.

DALI is imported only here, when a loader is built.
"""
from __future__ import annotations

import contextlib
import itertools
import re
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.loaders.common import Batch, DataError, replacement, split_dir, to_device_views
from pipelines.loaders.crop_draws import batch_boxes
from pipelines.tools.validate import BadImage, check_image, image_size
from pipelines.loaders.samples import open_split
from pipelines.loaders.spec import LoaderSpec, check_bad, eval_short_side

# nvJPEG's preallocated buffers are per DALI thread: one device buffer of device_memory_padding and
# two pinned host buffers of host_memory_padding each (double-buffered). Sized for ImageNet's largest
# images (DALI's ImageNet examples) they cost 16 threads x (201 MiB + 2 x 134 MiB) = 3.1 GiB of GPU
# and 4.2 GiB of pinned memory per pipeline. A training pipeline gets these budgets for all its
# threads together instead (a buffer that proves too small grows once, on the larger image), an
# evaluation pipeline DALI's defaults; neither goes below DALI's defaults per thread. The hardware
# decoder's preallocate_*_hint stay unset (DALI's default): its buffers grow to the largest image met.
PADDING_BUDGET = dict(device=1 << 30, host=1 << 30)                 # bytes per training pipeline
PADDING_MAX = dict(device=211_025_920, host=140_544_512)             # per thread: ImageNet's largest image
PADDING_MIN = dict(device=16 << 20, host=8 << 20)                    # per thread: DALI's defaults
# the hardware decoder (A100, H100) takes this share of every batch, the CUDA decoder the rest. Tune
# HW_DECODER_LOAD with bench.py on the target GPU.
HW_DECODER_LOAD = 0.65


def decoder_padding(threads: int, train: bool) -> dict:
    """nvJPEG's per-thread padding for one pipeline of `threads` threads -> the mixed decoder's
    device_memory_padding and host_memory_padding (bytes). Its memory: threads x device padding
    on the GPU, 2 x threads x host padding pinned (see padding_bytes)."""
    if not train:
        return dict(device_memory_padding=PADDING_MIN["device"], host_memory_padding=PADDING_MIN["host"])
    threads = max(1, threads)
    device = min(PADDING_MAX["device"], max(PADDING_MIN["device"], PADDING_BUDGET["device"] // threads))
    host = min(PADDING_MAX["host"], max(PADDING_MIN["host"], PADDING_BUDGET["host"] // (2 * threads)))
    return dict(device_memory_padding=device, host_memory_padding=host)


def padding_bytes(threads: int, train: bool) -> dict:
    """What decoder_padding preallocates for one pipeline: {"device": GPU bytes, "pinned": host bytes}."""
    pad = decoder_padding(threads, train)
    return dict(device=threads * pad["device_memory_padding"], pinned=2 * threads * pad["host_memory_padding"])


def import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as err:
        raise ImportError("loader=dali needs NVIDIA DALI: run `make install` (installs nvidia-dali-cuda130), "
                          "or `pip install nvidia-dali-cuda130` (`nvidia-dali-cuda120` for CUDA 12), "
                          f"or pick loader=torchvision ({err})") from err
    return dali


class _Plan(NamedTuple):
    """What the host prepared for one batch of n images (kept alive until DALI has used it)."""
    indices: np.ndarray          # (n,) int64 positions in the split (bad images replaced)
    encoded: list[np.ndarray]    # n x (nbytes,) uint8
    views: np.ndarray            # (V, n, 5) float32: top, left, height, width, flip inside the window
    inputs: tuple                # what external_source handed to DALI (no_copy: must stay alive)
    job: tuple                   # (epoch, the batch's indices as drawn): to plan it again
    bad: list                    # (file, reason) of the images replaced in this batch


def eval_box(height, width, size: int) -> np.ndarray:
    """torchvision_loader.eval_transform as a box in source pixels: resizing the short side to
    size/0.875 (`size` below 64 px) and cutting the central size x size is resizing this box.
    height, width: ints or (n,) arrays -> (..., 4) float64 top, left, box height, box width."""
    height, width = np.asarray(height, np.float64), np.asarray(width, np.float64)
    scale = eval_short_side(size) / np.minimum(width, height)
    new_w, new_h = np.maximum(size, np.rint(width * scale)), np.maximum(size, np.rint(height * scale))
    sy, sx = height / new_h, width / new_w
    return np.stack([(new_h - size) // 2 * sy, (new_w - size) // 2 * sx, size * sy, size * sx], -1)


# the call behind F.interpolate(mode="bilinear", antialias=True), with out=: it resizes straight into
# the batch tensor (torch releases the interpreter lock inside it)
_RESIZE_AA = torch._C._nn._upsample_bilinear2d_aa


def crop_resize(image: torch.Tensor, box, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(h, w, 3) uint8 -> (size, size, 3) uint8: `box` = (top, left, height, width, flip) of
    `image` resized with antialiased bilinear (PIL's filter, as torchvision uses), then flipped.
    out: a (size, size, 3) uint8 tensor to write into (a row of a batch) instead of a new one.

    An integer box is resized from a view of it, no copy, into `out`, flipped first when asked:
    the filter is symmetric, so flipping the (usually smaller) box equals flipping the result. A
    fractional one (the eval crop) is the whole image resized so that the box becomes size x size,
    then cut out: torchvision's resize-then-crop.
    """
    top, left, height, width, flip = (float(v) for v in box)
    x = image.permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last strides
    out = torch.empty(size, size, 3, dtype=torch.uint8) if out is None else out
    if all(v.is_integer() for v in (top, left, height, width)):
        t, l, h, w = int(top), int(left), int(height), int(width)
        x = x[..., t:t + h, l:l + w]
        _RESIZE_AA(x.flip(-1) if flip else x, (size, size), False, None, out=out.permute(2, 0, 1).unsqueeze(0))
        return out
    out_h, out_w = round(x.shape[2] * size / height), round(x.shape[3] * size / width)
    x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(out_h, out_w), mode="bilinear",
                      antialias=True, align_corners=False)
    t, l = round(top * size / height), round(left * size / width)
    x = x[..., t:t + size, l:l + size]
    out.copy_((x.flip(-1) if flip else x)[0].permute(1, 2, 0))
    return out


class _Source:
    """The external_source callback. It holds its loader weakly: the loader owns the pipeline, and
    a pipeline holding its loader would be a reference cycle that only the garbage collector frees,
    possibly inside a forked DataLoader worker where DALI's threads do not exist (a segfault)."""

    def __init__(self, loader: "DaliLoader"):
        self.loader = weakref.ref(loader)

    def __call__(self):
        loader = self.loader()
        if loader is None:
            raise StopIteration
        return loader._next_inputs()


class DaliLoader:
    def __init__(self, samples, spec: LoaderSpec, *, decoder: str, crop_in_dali: bool | None = None):
        """spec: the views (multi-crop: one size per view), order and crops (pipelines/loaders/spec.py);
        spec.workers is the number of DALI and host threads. crop_in_dali: crop with DALI's fn.resize
        (default: when training on a GPU) instead of torch on the host; on the CPU it only serves to
        test the GPU graph."""
        device = spec.device
        if decoder not in ("mixed", "cpu"):
            raise ValueError(f"decoder must be 'mixed' or 'cpu', got {decoder!r}")
        if decoder == "mixed" and device.type != "cuda":
            raise ValueError("the mixed (nvJPEG) decoder needs a CUDA training device")
        self._dali = import_dali()
        self.samples, self.classes, self.device, self.decoder = samples, samples.classes, device, decoder
        self.labels = np.asarray(samples.labels, np.int64)
        self.spec, self.train, self.batch = spec, spec.train, spec.batch_size
        self.sizes = spec.view_sizes if spec.train else (spec.eval_size,)  # one per view, Batch.views order
        self.views = len(self.sizes)
        self.threads, self.prefetch = max(1, spec.workers), max(1, spec.prefetch)
        self.crop_in_dali = device.type == "cuda" if crop_in_dali is None else crop_in_dali
        self.epoch, self.start_batch = 0, 0
        self.bad_images: list[str] = []  # the contract's "file: reason" list (bad_images=skip)
        self._bad: dict[int, str] = {}   # index -> reason: unusable, found on the host or by DALI
        self._sizes = np.zeros((len(samples), 2), np.int64)  # (H, W) per sample from its header, 0 = not read yet
        # replacements stay in an image's group: its class folder, or its shard of a webdataset
        self.groups = np.asarray(samples.shard_of if samples.format == "webdataset" else samples.labels)
        self.order = spec.read_order_of(len(samples), samples.shard_of if samples.format == "webdataset" else None,
                                        self.labels)
        # reads and host crops. One intra-op thread each (a per-thread setting; the training thread
        # keeps its own): the pool already spreads images over the cores, and an OpenMP team per
        # 224 px resize oversubscribed them (measured: 1.3x more images/s on 2 cores)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dali-host",
                                        initializer=torch.set_num_threads, initargs=(1,))
        self._planner = ThreadPoolExecutor(1, thread_name_prefix="dali-plan")          # whole batches, ahead
        self._pipe = None
        self._todo: deque[list] = deque()  # [epoch, indices, planned future or None]: not yet given to DALI
        self._fed: deque[_Plan] = deque()  # given to DALI, outputs not yet taken
        self._held: deque[tuple] = deque()  # (CUDA event after the copies, DALI outputs) kept alive until it has run

    # ---- contract --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.spec.num_batches(len(self.samples))

    def __iter__(self):
        pipe = self._pipeline()
        order = self.spec.shard(len(self.samples), self.epoch, self.order)
        self._todo = deque([self.epoch, order[b * self.batch:(b + 1) * self.batch], None]
                           for b in range(self.start_batch, len(self)))
        replaced: dict[str, str] = {}  # file -> reason, replaced in this pass
        try:
            while True:
                try:
                    outputs = pipe.run(self._stream())  # on the GPU bound to the consumer's stream, no host sync
                except StopIteration:
                    if replaced and not self.train:
                        self._report_eval_bad(replaced)
                    return
                except DataError:
                    self._pipe = None  # raised by our own source: drop this pipeline's state
                    raise
                except RuntimeError as err:  # DALI operator errors; the pipeline is dead after one
                    self._pipe = None
                    pipe = self._skip_undecodable(err)
                    continue
                plan = self._fed.popleft()
                for name, reason in plan.bad:
                    check_bad(self.spec, self.bad_images, name, reason)
                    replaced[name] = reason
                yield self._to_batch(outputs, plan)
        finally:
            self._todo.clear()
            self._drain()

    def _report_eval_bad(self, replaced: dict[str, str]) -> None:
        """Evaluation: an unreadable image's stand-in (the next image of its class) is a duplicate that
        the evaluation counts once, so the image is left out of it: say which and how many, per pass."""
        names = "; ".join(f"{name}: {reason}" for name, reason in list(replaced.items())[:10])
        print(f"DALI loader: {len(replaced)} of {len(self.samples)} evaluation images in {self.samples.root} are "
              f"unreadable and left out of this evaluation (bad_images=skip): {names}"
              + (" ..." if len(replaced) > 10 else ""), flush=True)

    # ---- host side -------------------------------------------------------------------------------
    def _read_sample(self, index: int):
        """Read sample `index` -> (index used, encoded bytes, bad). Its (H, W) header is parsed once
        per loader and kept in self._sizes, not once per epoch.

        An image that cannot be read, whose header is unusable or that DALI failed to decode before
        (self._bad) is replaced under bad_images=skip by common.replacement, as every loader does;
        `bad` lists the (file, reason) replaced. bad_images=stop raises DataError naming it.
        """
        bad = []
        for k in range(len(self.samples)):
            candidate = index if k == 0 else replacement(self.groups, index, k)
            if k and candidate == index:
                break                                    # wrapped around: the whole class or shard is bad
            reason = self._bad.get(candidate)
            if reason is None:
                try:
                    data = self.samples.read(candidate)
                    if self._sizes[candidate, 0] == 0:
                        self._sizes[candidate] = image_size(data)
                except (OSError, BadImage) as err:
                    reason = self._bad[candidate] = str(err)
            if reason is not None:
                if self.spec.bad_images == "stop":
                    check_bad(self.spec, [], self.samples.describe(candidate), reason)  # raises DataError
                bad.append((self.samples.describe(candidate), reason))
                continue
            return candidate, data, bad
        raise DataError(f"every image of the group of {self.samples.describe(index)} (its class folder or "
                        "shard) is unusable: " + "; ".join(f"{f}: {r}" for f, r in bad[:5]))

    def _plan_batch(self, epoch: int, indices: np.ndarray) -> _Plan:
        """Read and plan one batch: reads (and first-time headers) over the pool, one run of samples
        per thread; then the crop draws (crop_draws.batch_boxes: spec.boxes for the whole batch in
        one vectorised call) and each image's decode window, for the whole batch at once."""
        parts = self._pool.map(lambda part: [self._read_sample(int(indices[k])) for k in part],
                               _parts(len(indices), self.threads))
        used, encoded, bad = zip(*(sample for part in parts for sample in part))
        job, indices = (epoch, indices), np.asarray(used, np.int64)
        heights, widths = self._sizes[indices].T                           # each (n,)
        if self.train:  # (n, V, 5) top, left, h, w, flip in source pixels: the crops every loader draws
            boxes = batch_boxes(self.spec, epoch, indices, heights, widths).astype(np.float64)
            # the window: the union of the V boxes, the only region decoded
            y0, x0 = boxes[:, :, 0].min(1), boxes[:, :, 1].min(1)
            y1, x1 = (boxes[:, :, 0] + boxes[:, :, 2]).max(1), (boxes[:, :, 1] + boxes[:, :, 3]).max(1)
        else:           # one view, the eval crop as a fractional box, never flipped; the whole image decoded
            boxes = np.concatenate([eval_box(heights, widths, self.sizes[0]), np.zeros((len(indices), 1))], 1)[:, None]
            y0 = x0 = np.zeros(len(indices))
            y1, x1 = heights.astype(np.float64), widths.astype(np.float64)
        windows = np.stack([x0, y0, x1 - x0, y1 - y0], 1).astype(np.int32)  # (n, 4) x, y, w, h
        boxes[:, :, 0] -= y0[:, None]
        boxes[:, :, 1] -= x0[:, None]
        views = boxes.transpose(1, 0, 2).astype(np.float32)                # (V, n, 5) inside the window
        inputs = [list(encoded), np.ascontiguousarray(windows[:, :2]), np.ascontiguousarray(windows[:, 2:]),
                  self.labels[indices], indices.astype(np.int64)]
        if self.crop_in_dali:  # fn.resize's ROI per view, given right-to-left when flipped
            top, left, h, w, flip = views.transpose(2, 0, 1)               # each (V, n)
            x_from, x_to = left + w * flip, left + w * (1 - flip)
            for v in range(self.views):
                inputs.append(np.stack([top[v], x_from[v]], 1))
                inputs.append(np.stack([top[v] + h[v], x_to[v]], 1))
        return _Plan(inputs[4], inputs[0], views, tuple(inputs), job, [b for sample in bad for b in sample])

    def _next_inputs(self):
        """external_source callback: the next batch of this epoch, or StopIteration at its end.

        The batch and the one after it are planned by a background thread, so DALI's call (made from
        the training loop's thread) rarely waits and the host work overlaps training and decoding.
        """
        if not self._todo:
            raise StopIteration
        for job in itertools.islice(self._todo, 2):
            if job[2] is None:
                job[2] = self._planner.submit(self._plan_batch, job[0], job[1])
        plan = self._todo.popleft()[2].result()
        self._fed.append(plan)
        return list(plan.inputs)

    # ---- DALI ------------------------------------------------------------------------------------
    def _pipeline(self):
        if self._pipe is None:
            self._pipe = self._build_pipeline()
        self._drain()  # an iteration abandoned without closing leaves batches in flight
        return self._pipe

    def _build_pipeline(self):
        dali = self._dali
        fn, types = dali.fn, dali.types
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if on_gpu else None
        pipe = dali.Pipeline(batch_size=self.batch, num_threads=self.threads, prefetch_queue_depth=self.prefetch,
                             device_id=device_id, exec_dynamic=True)
        with pipe:
            encoded, start, shape, labels, indices, *rois = fn.external_source(
                _Source(self), num_outputs=5 + (2 * self.views if self.crop_in_dali else 0), batch=True, no_copy=True)
            images = fn.decoders.image_slice(  # (h, w, 3) uint8 windows, HWC
                encoded, start=start, shape=shape, axis_names="WH", output_type=types.RGB,
                adjust_orientation=True,  # upright, as every loader; the boxes are in upright pixels (image_size)
                device="mixed" if self.decoder == "mixed" else "cpu",
                **(dict(decoder_padding(self.threads, self.train), hw_decoder_load=HW_DECODER_LOAD)
                   if self.decoder == "mixed" else {}))
            if not self.crop_in_dali:
                pipe.set_outputs(images, labels, indices)
            else:
                if on_gpu:
                    images, labels, indices = images.gpu(), labels.gpu(), indices.gpu()
                views = [fn.resize(images, size=(size, size), roi_start=rois[2 * v], roi_end=rois[2 * v + 1],
                                   interp_type=types.INTERP_LINEAR, antialias=True) for v, size in enumerate(self.sizes)]
                pipe.set_outputs(*views, labels, indices)
        pipe.build()
        return pipe

    def _drain(self) -> None:
        """Take the outputs of batches still in flight (the source is empty), then rewind DALI."""
        self._release_held(wait=True)  # the end of an epoch: the last copies out of DALI's buffers
        if self._pipe is None:
            self._fed.clear()
            return
        self._todo.clear()
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        except Exception:  # noqa: BLE001  (a decode error nobody will look at, or DALI shutting down)
            self._pipe = None  # start afresh
        self._fed.clear()

    def _stream(self):
        """The consumer's CUDA stream (the current one of whoever asks for the next batch: the
        training loop, or augment-ahead's side stream), None on the CPU (host-synchronous outputs)."""
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _to_batch(self, outputs, plan: _Plan) -> Batch:
        """DALI's outputs -> a Batch that owns its memory: it stays valid after the next batch, and
        record_stream works on it (torch's caching allocator made it)."""
        *images, labels, indices = outputs
        if self.crop_in_dali:
            # V x (N, S, S, 3) DALI buffers, imported through DLPack and copied into torch's memory on
            # the consumer's stream (DALI bound its outputs to it). DALI's buffers are not torch's:
            # record_stream cannot protect them from reuse while another stream reads them, so
            # nothing downstream sees them, and they stay referenced until the copies have run.
            stream = self._stream()
            with torch.cuda.device(self.device) if stream is not None else contextlib.nullcontext():
                owned = [torch.from_dlpack(t.as_tensor()).clone() for t in (*images, labels, indices)]
            if stream is not None:
                self._release_held()
                done = torch.cuda.Event()
                done.record(stream)
                self._held.append((done, outputs))
            *views, labels, indices = owned
            return Batch([v.permute(0, 3, 1, 2) for v in views], labels, indices)
        (windows,) = images
        n = len(plan.indices)
        views = [torch.empty(n, size, size, 3, dtype=torch.uint8) for size in self.sizes]
        boxes = plan.views.tolist()  # (V, n, 5) as Python floats, read per sample below

        def crop(part):  # one task per thread, a contiguous run of samples: each view written in place
            for k in part:
                image = torch.from_dlpack(windows[k])  # (h, w, 3) window, no copy
                for v, size in enumerate(self.sizes):
                    crop_resize(image, boxes[v][k], size, out=views[v][k])

        list(self._pool.map(crop, _parts(n, self.threads)))
        # labels and indices from the plan: arrays made for this batch alone (DALI's outputs of them are
        # its buffers); the views were written into new tensors
        return Batch(to_device_views(views, self.device), torch.from_numpy(plan.inputs[3]).to(self.device),
                     torch.from_numpy(plan.indices).to(self.device))

    def _release_held(self, wait: bool = False) -> None:
        """Drop DALI's outputs whose copies into torch memory have run (all of them, waiting, if `wait`)."""
        while self._held and (wait or self._held[0][0].query()):
            done, _ = self._held.popleft()
            done.synchronize()

    def _undecodable(self, err: RuntimeError) -> list[tuple[int, str]]:
        """The samples behind a DALI decode error, (index, reason): every image in flight re-checked
        with pipelines.tools.validate (PIL + DALI's header rules), else the "sample #k" DALI names."""
        bad = [(int(i), reason) for plan in self._fed for i, data in zip(plan.indices, plan.encoded)
               if (reason := check_image(data)) is not None]
        if not bad and self._fed and (m := re.search(r"sample #(\d+)", str(err))):
            plan = self._fed[0]  # DALI reports the position in the failing (oldest) batch
            if int(m[1]) < len(plan.indices):
                bad = [(int(plan.indices[int(m[1])]), "DALI's decoder rejects it (PIL decodes it)")]
        return bad

    def _skip_undecodable(self, err: RuntimeError):
        """After a DALI decode error: under bad_images=skip, mark the images behind it bad and plan the
        batches not yet yielded again (they get replacements) on a new pipeline, which is returned;
        else (or when they cannot be named) raise DataError naming them."""
        bad = self._undecodable(err)
        if self.spec.bad_images == "skip" and bad and not any(i in self._bad for i, _ in bad):
            for i, reason in bad:
                self._bad[i] = reason
                check_bad(self.spec, self.bad_images, self.samples.describe(i), reason)  # max_bad_images
                # DALI's own message (its log line above) names no file
                print(f"DALI loader: {self.samples.describe(i)}: {reason}: replaced by the next image of its "
                      "class or shard (bad_images=skip)", flush=True)
            again = [[*plan.job, None] for plan in self._fed] + [[job[0], job[1], None] for job in self._todo]
            self._fed.clear()
            self._todo = deque(again)
            self._pipe = self._build_pipeline()  # the failed one is dead; nothing in flight to drain
            return self._pipe
        names = [f"{self.samples.describe(i)}: {reason}" for i, reason in bad]
        if not names:
            files = [self.samples.describe(int(i)) for plan in self._fed for i in plan.indices]
            names = [f"one of {len(files)} files that all decode with PIL (first: {', '.join(files[:3])})"]
        dali_said = " ".join(line.strip() for line in str(err).splitlines()
                             if line.strip() and "File " not in line and "pipeline definition" not in line)
        self._fed.clear()
        raise DataError(f"DALI could not decode {'; '.join(names)}\n  DALI: {dali_said[:500]}\n"
                        f"  `python convert.py validate <data>` lists every bad file before a run") from err


def _parts(n: int, k: int) -> list[range]:
    """range(n) cut into min(n, k) contiguous runs of near-equal length (one task per pool thread)."""
    k = max(1, min(n, k))
    return [range(i * n // k, (i + 1) * n // k) for i in range(k)]


def resolve_decoder(dali_device: str, device: torch.device) -> str:
    """cfg.dali_device -> the DALI decoder backend: "auto" is nvJPEG ("mixed") when training on CUDA."""
    if dali_device == "gpu" and device.type != "cuda":
        raise ValueError("dali_device=gpu decodes with nvJPEG and needs a CUDA training device; "
                         "use dali_device=cpu or auto on this machine")
    return "mixed" if dali_device == "gpu" or (dali_device == "auto" and device.type == "cuda") else "cpu"


def build(cfg, spec: LoaderSpec, split: str) -> DaliLoader:
    samples = open_split(split_dir(cfg.data, split), spec.max_images)
    return DaliLoader(samples, spec, decoder=resolve_decoder(cfg.dali_device, spec.device))
