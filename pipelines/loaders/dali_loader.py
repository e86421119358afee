"""The DALI loader (loader=dali): decode only the pixels the crops keep, on the GPU when there is one.

It meets the contract of pipelines/loaders/common.py: V views per image, each (N, 3, S, S) uint8 channels-last
on the training device, plus labels and indices. Reads an ImageFolder split or webdataset shards
(`convert.py webdataset`; detected by their index.json), see pipelines/tools/webdataset.py.

One batch, start to finish:

    host (a planner thread, one batch ahead of DALI's requests, + a pool of cfg.workers threads)
        order       shard_indices(seed, epoch): the same images per rank and epoch as every backend
        read        the encoded bytes: one file, or one pread from an open webdataset shard
        plan        (H, W) from the header; V boxes + flips from sample_rng(seed, epoch, index),
                    drawn exactly as the torchvision loader draws them: same crops, resumable
        window      the union of the V boxes: the only region that gets decoded (train=False: the
                    whole image, one view = torchvision_loader.eval_transform as a fractional box)
    DALI (fn.external_source -> cfg.workers threads, cfg.prefetch batches ahead)
        decode      decoders.image_slice(window): "mixed" = nvJPEG with the hardware JPEG decoder
                    where the GPU has one, "cpu" = libjpeg-turbo; both skip what lies outside it
        crop        training on a GPU: fn.resize per view on the GPU, ROI = the box inside the
                    window (given right-to-left for a flip), antialiased bilinear to S x S
    torch
        GPU         V x (N, S, S, 3) DALI buffers -> torch through DLPack, no copy; NHWC permuted
                    to NCHW is channels-last for free
        CPU         the decoded windows come back and torch crops them in the pool (crop_resize)

Why the window and not one decode per view: on the CPU, decoding the union once is as fast as the
full image or faster (rows below it are never decoded, columns outside skip the IDCT) and cheaper
than V region decodes, which each redo the entropy decoding; on the GPU it feeds nvJPEG's ROI
decode. Why torch crops on the CPU: measured on this machine (CPU time per 224 px antialiased view
from a ~400 px photo) DALI's CPU resampler takes ~1.8 ms, PIL ~1.2 ms, torch's uint8 channels-last
kernel ~0.4 ms, and the resize is most of the work. On the GPU DALI's resize is the fast one.

Errors: a file that cannot be read or whose header is unusable stops the batch on the host with a
DataError naming it. If DALI's decoder fails later, the batches in flight are re-checked with
pipelines.tools.validate (PIL + DALI's header rules) so the DataError names the file, not only
"sample #3". `python convert.py validate DIR` finds all of them before a run.

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

from pipelines.loaders.common import (Batch, DataError, num_batches, random_resized_crop_params,
                              sample_rng, shard_indices, split_dir, to_device_views)
from pipelines.tools.validate import BadImage, check_image, image_size
from pipelines.loaders.samples import open_split
from pipelines.loaders.spec import LoaderSpec, eval_short_side

# nvJPEG buffers sized for ImageNet's largest images (DALI's ImageNet examples) so nothing is
# reallocated mid-run; the hardware decoder (A100, H100) takes this share of every batch, the
# CUDA decoder the rest. Tune HW_DECODER_LOAD with bench.py on the target GPU.
HW_DECODER_LOAD = 0.65
MIXED_DECODER_ARGS = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                          preallocate_width_hint=5980, preallocate_height_hint=6430,
                          hw_decoder_load=HW_DECODER_LOAD)


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
    indices: np.ndarray          # (n,) int64 positions in the split
    encoded: list[np.ndarray]    # n x (nbytes,) uint8
    views: np.ndarray            # (V, n, 5) float32: top, left, height, width, flip inside the window
    inputs: tuple                # what external_source handed to DALI (no_copy: must stay alive)


def eval_box(height: int, width: int, size: int) -> tuple[float, float, float, float]:
    """torchvision_loader.eval_transform as a box in source pixels: resizing the short side to
    size/0.875 (`size` below 64 px) and cutting the central size x size is resizing this box."""
    short = eval_short_side(size)
    scale = short / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    sy, sx = height / new_h, width / new_w
    return (new_h - size) // 2 * sy, (new_w - size) // 2 * sx, size * sy, size * sx


def crop_resize(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """(h, w, 3) uint8 -> (size, size, 3) uint8: `box` = (top, left, height, width, flip) of
    `image` resized with antialiased bilinear (PIL's filter, as torchvision uses), then flipped.

    An integer box is cut out and resized. A fractional one (the eval crop) is the whole image
    resized so that the box becomes size x size, then cut out: torchvision's resize-then-crop.
    """
    top, left, height, width, flip = (float(v) for v in box)
    x = image.permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last strides
    resize = dict(mode="bilinear", antialias=True, align_corners=False)
    if all(v.is_integer() for v in (top, left, height, width)):
        t, l, h, w = int(top), int(left), int(height), int(width)
        # a contiguous channels-last copy of the box takes torch's vectorised uint8 kernel
        x = x[..., t:t + h, l:l + w].contiguous(memory_format=torch.channels_last)
        x = F.interpolate(x, size=(size, size), **resize)
    else:
        out_h, out_w = round(x.shape[2] * size / height), round(x.shape[3] * size / width)
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(out_h, out_w), **resize)
        t, l = round(top * size / height), round(left * size / width)
        x = x[..., t:t + size, l:l + size]
    if flip:
        x = x.flip(-1)
    return x[0].permute(1, 2, 0)


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
    def __init__(self, samples, *, views: int, size: int, batch_size: int, scale, ratio, flip_prob: float,
                 seed: int, rank: int, world_size: int, device: torch.device, decoder: str, threads: int,
                 prefetch: int, train: bool, drop_last: bool, crop_in_dali: bool | None = None):
        """crop_in_dali: crop with DALI's fn.resize (default: when training on a GPU) instead of torch on
        the host; on the CPU it only serves to test the GPU graph."""
        if decoder not in ("mixed", "cpu"):
            raise ValueError(f"decoder must be 'mixed' or 'cpu', got {decoder!r}")
        if decoder == "mixed" and device.type != "cuda":
            raise ValueError("the mixed (nvJPEG) decoder needs a CUDA training device")
        self._dali = import_dali()
        self.samples, self.classes, self.device, self.decoder = samples, samples.classes, device, decoder
        self.labels = np.asarray(samples.labels, np.int64)
        self.views, self.size, self.batch = (views if train else 1), size, batch_size
        self.scale, self.ratio, self.flip_prob, self.seed, self.train = scale, ratio, flip_prob, seed, train
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.threads, self.prefetch = max(1, threads), max(1, prefetch)
        self.crop_in_dali = device.type == "cuda" if crop_in_dali is None else crop_in_dali
        self.epoch, self.start_batch = 0, 0
        self.bad_images: list[str] = []  # the contract's list; a bad image still stops this loader
        # reads and host crops. One intra-op thread each (a per-thread setting; the training thread
        # keeps its own): the pool already spreads images over the cores, and an OpenMP team per
        # 224 px resize oversubscribed them (measured: 1.3x more images/s on 2 cores)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dali-host",
                                        initializer=torch.set_num_threads, initargs=(1,))
        self._planner = ThreadPoolExecutor(1, thread_name_prefix="dali-plan")          # whole batches, ahead
        self._pipe = None
        self._todo: deque[list] = deque()  # [epoch, indices, planned future or None]: not yet given to DALI
        self._fed: deque[_Plan] = deque()  # given to DALI, outputs not yet taken

    # ---- contract --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return num_batches(len(self.samples), self.world_size, self.batch, self.drop_last)

    def __iter__(self):
        pipe = self._pipeline()
        order = shard_indices(len(self.samples), self.rank, self.world_size, self.seed, self.epoch,
                              self.batch, shuffle=self.train, drop_last=self.drop_last)
        self._todo = deque([self.epoch, order[b * self.batch:(b + 1) * self.batch], None]
                           for b in range(self.start_batch, len(self)))
        try:
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    return
                except DataError:
                    self._pipe = None  # raised by our own source: drop this pipeline's state
                    raise
                except RuntimeError as err:  # DALI operator errors; the pipeline is dead after one
                    self._pipe = None
                    raise self._decode_error(err) from err
                yield self._to_batch(outputs, self._fed.popleft())
        finally:
            self._todo.clear()
            self._drain()

    # ---- host side -------------------------------------------------------------------------------
    def _plan_sample(self, epoch: int, index: int):
        """Read sample `index`, draw its boxes -> (encoded, window x/y/w/h, V boxes in the window)."""
        try:
            data = self.samples.read(index)
            height, width = image_size(data)
        except (OSError, BadImage) as err:
            raise DataError(f"cannot use image {self.samples.describe(index)}: {err}") from err
        if not self.train:
            return data, (0, 0, width, height), [(*eval_box(height, width, self.size), 0.0)]
        rng = sample_rng(self.seed, epoch, index)
        boxes = []
        for _ in range(self.views):  # the torchvision loader's order of draws: box, then flip
            top, left, h, w = random_resized_crop_params(height, width, self.scale, self.ratio, rng)
            boxes.append((top, left, h, w, float(rng.random() < self.flip_prob)))
        y0, x0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        y1, x1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
        return data, (x0, y0, x1 - x0, y1 - y0), [(t - y0, l - x0, h, w, f) for t, l, h, w, f in boxes]

    def _plan_batch(self, epoch: int, indices: np.ndarray) -> _Plan:
        """Read and plan one batch (reads and header parsing spread over the pool)."""
        encoded, windows, boxes = zip(*self._pool.map(lambda i: self._plan_sample(epoch, int(i)), indices))
        windows = np.asarray(windows, np.int32)                           # (n, 4) x, y, w, h
        views = np.asarray(boxes, np.float32).transpose(1, 0, 2).copy()  # (V, n, 5)
        inputs = [list(encoded), np.ascontiguousarray(windows[:, :2]), np.ascontiguousarray(windows[:, 2:]),
                  self.labels[indices], indices.astype(np.int64)]
        if self.crop_in_dali:  # fn.resize's ROI per view, given right-to-left when flipped
            top, left, h, w, flip = views.transpose(2, 0, 1)               # each (V, n)
            x_from, x_to = left + w * flip, left + w * (1 - flip)
            for v in range(self.views):
                inputs.append(np.stack([top[v], x_from[v]], 1))
                inputs.append(np.stack([top[v] + h[v], x_to[v]], 1))
        return _Plan(inputs[4], inputs[0], views, tuple(inputs))

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
                adjust_orientation=False,  # the boxes are in stored pixels, as PIL (no EXIF transpose)
                device="mixed" if self.decoder == "mixed" else "cpu",
                **(MIXED_DECODER_ARGS if self.decoder == "mixed" else {}))
            if not self.crop_in_dali:
                pipe.set_outputs(images, labels, indices)
            else:
                if on_gpu:
                    images, labels, indices = images.gpu(), labels.gpu(), indices.gpu()
                views = [fn.resize(images, size=(self.size, self.size), roi_start=rois[2 * v], roi_end=rois[2 * v + 1],
                                   interp_type=types.INTERP_LINEAR, antialias=True) for v in range(self.views)]
                pipe.set_outputs(*views, labels, indices)
        pipe.build()
        return pipe

    def _drain(self) -> None:
        """Take the outputs of batches still in flight (the source is empty), then rewind DALI."""
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

    def _to_batch(self, outputs, plan: _Plan) -> Batch:
        *images, labels, indices = outputs
        if self.crop_in_dali:
            # V x (N, S, S, 3) DALI buffers become torch tensors without a copy; on the GPU DLPack
            # also makes torch's current stream wait for DALI's
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                views = [torch.from_dlpack(v.as_tensor()).permute(0, 3, 1, 2) for v in images]
                return Batch(views, torch.from_dlpack(labels.as_tensor()), torch.from_dlpack(indices.as_tensor()))
        (windows,) = images
        n = len(plan.indices)
        decoded = [torch.from_dlpack(windows[k]) for k in range(n)]  # (h, w, 3) each, no copy
        views = [torch.empty(n, self.size, self.size, 3, dtype=torch.uint8) for _ in range(self.views)]

        def crop(k):
            for v in range(self.views):
                views[v][k] = crop_resize(decoded[k], plan.views[v, k], self.size)

        list(self._pool.map(crop, range(n)))
        return Batch(to_device_views(views, self.device), torch.from_dlpack(labels.as_tensor()).to(self.device),
                     torch.from_dlpack(indices.as_tensor()).to(self.device))

    def _decode_error(self, err: RuntimeError) -> DataError:
        """Name the file(s) behind a DALI decode error: re-check every image in flight."""
        bad = [f"{self.samples.describe(int(i))}: {reason}"
               for plan in self._fed for i, data in zip(plan.indices, plan.encoded)
               if (reason := check_image(data)) is not None]
        if not bad and self._fed and (m := re.search(r"sample #(\d+)", str(err))):
            plan = self._fed[0]  # DALI reports the position in the failing (oldest) batch
            if int(m[1]) < len(plan.indices):
                bad = [f"{self.samples.describe(int(plan.indices[int(m[1])]))}: DALI's decoder rejects it "
                       "(PIL decodes it)"]
        if not bad:
            files = [self.samples.describe(int(i)) for plan in self._fed for i in plan.indices]
            bad = [f"one of {len(files)} files that all decode with PIL (first: {', '.join(files[:3])})"]
        dali_said = " ".join(line.strip() for line in str(err).splitlines()
                             if line.strip() and "File " not in line and "pipeline definition" not in line)
        self._fed.clear()
        return DataError(f"DALI could not decode {'; '.join(bad)}\n  DALI: {dali_said[:500]}\n"
                         f"  `python convert.py validate <data>` lists every bad file before a run")


def resolve_decoder(dali_device: str, device: torch.device) -> str:
    """cfg.dali_device -> the DALI decoder backend: "auto" is nvJPEG ("mixed") when training on CUDA."""
    if dali_device == "gpu" and device.type != "cuda":
        raise ValueError("dali_device=gpu decodes with nvJPEG and needs a CUDA training device; "
                         "use dali_device=cpu or auto on this machine")
    return "mixed" if dali_device == "gpu" or (dali_device == "auto" and device.type == "cuda") else "cpu"


def build(cfg, spec: LoaderSpec, split: str) -> DaliLoader:
    if len(set(zip(spec.view_sizes, spec.view_scales))) > 1:
        from masksiam.config import ConfigError
        raise ConfigError(f"loader=dali takes one crop size and scale for now (crops={cfg.crops!r}); "
                          "use loader=torchvision or ffcv for multi-crop")
    samples = open_split(split_dir(cfg.data, split), spec.max_images)
    return DaliLoader(
        samples, views=spec.views, size=spec.view_sizes[0], batch_size=spec.batch_size, scale=spec.view_scales[0],
        ratio=spec.ratio, flip_prob=spec.flip_prob, seed=spec.seed, rank=spec.rank, world_size=spec.world_size,
        device=spec.device, decoder=resolve_decoder(cfg.dali_device, spec.device), threads=spec.workers,
        prefetch=spec.prefetch, train=spec.train, drop_last=spec.drop_last)
