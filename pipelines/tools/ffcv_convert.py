"""`python convert.py ffcv`: a folder split -> one FFCV .beton file, plus a JSON sidecar.

    python convert.py ffcv --src data/photos/train --out data/photos/train.beton --max-res 256 --quality 90

--src is one split read by the folder rules of pipelines/loaders/common.py (scan_image_folder, as
every loader): an ImageFolder <class>/.../<image>, or a flat folder of photos <image> (one
pseudo-class: label 0, classes [""] in the sidecar, and the run is unlabelled).

Fields: image (RGBImageField), label (IntField: class index of the sorted class folders) and index
(IntField: the image's position in the file list of --src, so a loader can name the source
file even when bad files were skipped).

Image modes (--mode), as FFCV defines them: jpg (re-encoded at --quality), raw (uint8 pixels: no
decode at load time, ~10x the bytes), proportion (jpg with probability --compress-prob, drawn per
image from --seed so a conversion is reproducible), smart (raw unless the raw pixels exceed
--smart-threshold bytes). --max-res caps the longer side (cv2 INTER_AREA, as FFCV resizes).

Odd inputs are converted, not fatal. Every file is decoded by Pillow, which reads the format from
the content (a PNG named .jpg works); a JPEG's EXIF orientation is applied, as every loader
applies it (pipelines/tools/validate.py: EXIF_NOTE); CMYK, grayscale, palette, 16-bit
and float images become 8-bit RGB (colour profiles are ignored); transparency is composited on
white. A file that cannot be fully decoded (truncated, corrupt, not an image, over Pillow's
decompression-bomb limit) is skipped and listed with its reason in the sidecar and on stderr.

Two passes: a parallel check decodes every file (that is what finds bad ones, and the image sizes
fix the FFCV page size), then FFCV's DatasetWriter writes the good ones. The .beton is written as
FILE.beton.partial and renamed only when complete (after the sidecar FILE.beton.json), so an
interrupted run never leaves a file that looks complete; a writer process that dies is reported
as an error (FFCV's own writer would wait for it forever).
"""
from __future__ import annotations

import _thread
import functools
import json
import math
import multiprocessing as mp
import os
import sys
import threading
import time
import warnings
from collections import Counter
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from masksiam.io import atomic_write_text
from pipelines.loaders.common import DataError, scan_image_folder
from pipelines.loaders.samples import is_dataset_root
from pipelines.tools.validate import upright

HELP = "convert an ImageFolder split into an FFCV .beton (+ FILE.beton.json report)"
MODES = ("jpg", "raw", "proportion", "smart")
MAX_SIDE = 65535                 # FFCV stores height and width as uint16
MIN_PAGE = 8 << 20               # FFCV's default page size (4 x 2 MiB)


# ---- robust decoding ----------------------------------------------------------------------------

def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited on white (a transparent pixel's
    stored colour is arbitrary, often black); 16-bit and 32-bit grayscale keep their top 8 bits."""
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    if mode.startswith("I;16") or mode == "I":
        gray = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    if mode == "F":
        return Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> tuple[np.ndarray, dict]:
    """Fully decode one image file -> ((H, W, 3) uint8 RGB, upright; notes on what was converted).

    Raises (OSError, UnidentifiedImageError, DecompressionBombError, ...) for a file that cannot be
    decoded completely.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # Pillow's EXIF/ICC chatter; real errors still raise
        with Image.open(path) as img:
            img.load()                           # the whole file: truncation and corruption raise here
            notes = {"format": img.format, "mode": img.mode}
            notes["rotated"] = upright(img)      # a JPEG's EXIF orientation, as every loader applies it
            rgb = np.asarray(_to_rgb(img))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"decoded to an unusable array of shape {rgb.shape}")
    return rgb, notes


def capped_size(height: int, width: int, max_res: int) -> tuple[int, int]:
    """(h, w) after FFCV's resizer caps the longer side at max_res (never below 1 px)."""
    ratio = max_res / max(height, width) if max_res > 0 else 1.0
    if ratio >= 1:
        return height, width
    return max(1, int(ratio * height)), max(1, int(ratio * width))


def cap_resolution(rgb: np.ndarray, max_res: int) -> np.ndarray:
    """FFCV's resizer (cv2.INTER_AREA on the longer side), clamped so thin images keep >= 1 px."""
    import cv2
    h, w = capped_size(rgb.shape[0], rgb.shape[1], max_res)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)


def _check(item: tuple[int, str, int]) -> dict:
    """Pass 1, in a worker: decode one file; its stored size and notes, or the reason it fails."""
    position, path, max_res = item
    try:
        rgb, notes = load_rgb(path)
    except Exception as err:  # noqa: BLE001  Pillow's plugins raise many types on corrupt data
        return {"position": position, "error": f"{type(err).__name__}: {err}"}
    h, w = capped_size(rgb.shape[0], rgb.shape[1], max_res)
    if max(h, w) > MAX_SIDE:
        return {"position": position, "error": f"{w}x{h} px exceeds FFCV's {MAX_SIDE} px limit; use --max-res"}
    suffix = Path(path).suffix.lower().lstrip(".")
    notes["misnamed"] = notes["format"] is not None and not _suffix_matches(suffix, notes["format"])
    return {"position": position, "height": h, "width": w, "bytes": os.path.getsize(path), **notes}


def _suffix_matches(suffix: str, fmt: str) -> bool:
    aliases = {"JPEG": ("jpg", "jpeg", "jpe", "jfif"), "TIFF": ("tif", "tiff"), "MPO": ("jpg", "jpeg")}
    return suffix in aliases.get(fmt, (fmt.lower(),))


# ---- pass 2: the dataset FFCV's writer reads -----------------------------------------------------

class _Samples:
    """Item i -> (RGB array capped at max_res, label, source position), for FFCV's DatasetWriter.

    It runs in the writer's forked worker processes and must never raise (a raising worker makes
    FFCV's writer wait forever): a file that passed the check but fails now (changed on disk) is
    written as mid-gray of its checked size and reported through `failures`.
    """

    def __init__(self, root: Path, checked: "_Checked", images, max_res: int, seed: int):
        # checked: pass 1's arrays, its good rows only; images: the split's mapped ImageList
        self.root, self.checked, self.images = root, checked, images
        self.max_res, self.seed = max_res, seed
        self.failures = mp.SimpleQueue()

    def __len__(self) -> int:
        return len(self.checked.position)

    def __getitem__(self, i: int):
        pos = int(self.checked.position[i])
        # proportion mode draws jpg-or-raw with np.random inside FFCV's encoder: one stream per image
        np.random.seed((self.seed * 1_000_003 + pos) % 2**32)
        try:
            rgb = cap_resolution(load_rgb(self.root / self.images.path(pos))[0], self.max_res)
        except Exception as err:  # noqa: BLE001  (see the class docstring)
            self.failures.put((pos, f"{type(err).__name__}: {err}"))
            rgb = np.full((int(self.checked.height[i]), int(self.checked.width[i]), 3), 128, np.uint8)
        return rgb, self.images.labels[pos], pos


class _Checked:
    """Pass 1's results as arrays, one row per file in split order (no per-sample dicts kept):
    position (n,) int64, height / width (n,) int32 (stored size), bytes (n,) int64 (source file),
    rotated / misnamed (n,) bool, mode (n,) int16 (index into `modes`, Pillow's source mode),
    errors {position: reason} for the files that failed (their other fields are 0)."""

    def __init__(self, n: int):
        self.position = np.arange(n, dtype=np.int64)
        self.height, self.width = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.bytes = np.zeros(n, np.int64)
        self.rotated, self.misnamed = np.zeros(n, bool), np.zeros(n, bool)
        self.mode = np.zeros(n, np.int16)
        self.modes: list[str] = []
        self.errors: dict[int, str] = {}

    def add(self, r: dict) -> None:
        pos = r["position"]
        if "error" in r:
            self.errors[pos] = r["error"]
            return
        self.height[pos], self.width[pos], self.bytes[pos] = r["height"], r["width"], r["bytes"]
        self.rotated[pos], self.misnamed[pos] = r["rotated"], r["misnamed"]
        if r["mode"] not in self.modes:
            self.modes.append(r["mode"])
        self.mode[pos] = self.modes.index(r["mode"])

    def good(self) -> "_Checked":
        """The rows that decoded, in split order."""
        keep = np.ones(len(self.position), bool)
        keep[list(self.errors)] = False
        out = _Checked(0)
        for name in ("position", "height", "width", "bytes", "rotated", "misnamed", "mode"):
            setattr(out, name, getattr(self, name)[keep])
        out.modes = self.modes
        return out


def _page_size(checked: _Checked) -> int:
    """A power of two that holds the largest sample (raw pixels, or a JPEG of them, which can be
    larger than the pixels for noise at high quality) with room to spare."""
    largest = int((checked.height.astype(np.int64) * checked.width * 3).max())
    return max(MIN_PAGE, 1 << math.ceil(math.log2(2 * largest + (1 << 20))))


class _Allocations:
    """A writer process's allocation table, (k,) FFCV ALLOC_TABLE_TYPE records (sample_id, ptr, size)
    in a growing array: FFCV's MemoryAllocator keeps a list of tuples (~150 B per sample) and uses
    only append, pop, [-1] and truthiness on it."""

    def __init__(self, dtype: np.dtype):
        self.rows, self.n = np.zeros(1024, dtype), 0

    def append(self, row: tuple) -> None:
        if self.n == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
        self.rows[self.n] = row
        self.n += 1

    def pop(self) -> tuple:
        row = self[-1]
        self.n -= 1
        return row

    def __getitem__(self, i: int) -> tuple:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return tuple(self.rows[i % self.n].tolist())

    def __len__(self) -> int:
        return self.n

    def table(self) -> np.ndarray:
        return self.rows[:self.n].copy()


class _TablePost:
    """The writer process's end of FFCV's allocations queue: posts [its table as one array]."""

    def __init__(self, queue):
        self.queue = queue

    def put(self, allocations: _Allocations) -> None:
        self.queue.put([allocations.table()])


def _writer_job(input_queue, metadata_sm, metadata_type, fields, allocator, done_number, allocations_queue,
                dataset):
    """FFCV's writer process (worker_job_indexed_dataset) with its allocations in one array."""
    from ffcv import writer as ffcv_writer
    from ffcv.types import ALLOC_TABLE_TYPE
    allocator.allocations = _Allocations(ALLOC_TABLE_TYPE)
    ffcv_writer.worker_job_indexed_dataset(input_queue, metadata_sm, metadata_type, fields, allocator,
                                           done_number, _TablePost(allocations_queue), dataset)


@functools.cache
def _array_writer():
    """FFCV's DatasetWriter without per-sample Python objects (FFCV imported on first use).

    FFCV's from_indexed_dataset makes a list of (destination, source) tuples in the main process
    (which the forked writers then partly copy), each writer keeps a list of allocation tuples, and
    finalize turns the gathered list into one numpy record per sample before the array: several
    hundred bytes per sample. Here the work is (k, 2) int64 chunks of one array, each writer posts
    its table as one array and finalize concatenates them. The file's bytes are FFCV's: the same
    samples, records and order."""
    from ffcv import writer as ffcv_writer

    class ArrayWriter(ffcv_writer.DatasetWriter):
        def from_indexed_dataset(self, dataset, chunksize: int = 100) -> None:
            n = len(dataset)
            work = np.repeat(np.arange(n, dtype=np.int64)[:, None], 2, axis=1)  # (n, 2): destination, source
            self._write_common(n, (work[i:i + chunksize] for i in range(0, n, chunksize)), _writer_job, (dataset,))

        def finalize(self, allocations) -> None:
            # allocations: one (k,) table per writer process, in the order FFCV gathered them
            tables = [t for t in allocations if len(t)]
            super().finalize([np.concatenate(tables)] if tables else [])

    return ArrayWriter


def _write(writer, samples: _Samples, chunksize: int, progress: bool) -> None:
    """FFCV's DatasetWriter.from_indexed_dataset, made safe to interrupt and to fail.

    FFCV's writer polls a shared counter until every sample is written, so a worker process that
    dies (killed, or an error inside FFCV's encoder) makes it wait forever. A watchdog thread
    interrupts the main thread when a worker exits with an error; on any interruption the workers
    are stopped and FFCV's shared-memory metadata block is released.
    """
    from ffcv import writer as ffcv_writer
    before = set(mp.active_children())
    crashed, done = [], threading.Event()

    def watch():
        # waitid(WNOWAIT) reads a child's exit status without reaping it (FFCV never joins them)
        while not done.wait(0.5):
            for child in psutil.Process().children():
                try:
                    status = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    continue
                if status is not None and status.si_status != 0:
                    crashed.append(status.si_status)
                    _thread.interrupt_main()
                    return

    threading.Thread(target=watch, daemon=True).start()
    bar = ffcv_writer.tqdm                              # FFCV's own progress bar: label it, or silence it
    ffcv_writer.tqdm = functools.partial(bar, desc="ffcv: writing", unit="img", disable=not progress)
    try:
        writer.from_indexed_dataset(samples, chunksize=chunksize)
    except BaseException as err:
        done.set()
        for proc in set(mp.active_children()) - before:
            proc.terminate()
        shm = getattr(writer, "metadata_sm", None)
        if isinstance(shm, shared_memory.SharedMemory):
            shm.close()
            shm.unlink()
        if crashed and isinstance(err, KeyboardInterrupt):
            raise DataError(f"an FFCV writer process failed (exit status {crashed[0]}; its error is "
                            f"printed above)") from None
        raise
    finally:
        done.set()
        ffcv_writer.tqdm = bar


def convert(src: str | Path, out: str | Path, *, mode: str = "jpg", max_res: int = 256, quality: int = 90,
            compress_prob: float = 0.5, smart_threshold: int = 0, workers: int = 0, max_images: int = 0,
            seed: int = 0, force: bool = False, progress: bool = True) -> dict:
    """Convert the ImageFolder split `src` into the .beton `out`; returns the sidecar report."""
    import pipelines.loaders.ffcv_loader  # noqa: F401  (a clear message when FFCV is missing)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality}: must be in 1..100")
    if mode == "proportion" and not 0 <= compress_prob <= 1:
        raise ValueError(f"--compress-prob {compress_prob}: must be in [0, 1]")
    if mode == "smart" and smart_threshold <= 0:
        raise ValueError("--mode smart needs --smart-threshold BYTES (raw images larger than it become jpg)")
    sidecar = out.with_name(out.name + ".json")
    if (out.exists() or sidecar.exists()) and not force:
        raise DataError(f"{out} already exists; pass --force to overwrite it")
    if not src.is_dir():
        raise DataError(f"--src {src} is not a folder")
    if is_dataset_root(src):
        raise DataError(f"--src {src} is a dataset root (it holds train/ and val/, or one of them): convert one "
                        f"split, e.g. --src {src / 'train'}")
    images = scan_image_folder(src, max_images)
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    t0 = time.perf_counter()

    # pass 1: decode everything once, in parallel, keeping the input order
    n = len(images)
    items = ((pos, str(src / images.path(pos)), max_res) for pos in range(n))    # made as the pool asks
    checks = tqdm(total=n, desc="ffcv: checking", unit="img", disable=not progress)
    checked = _Checked(n)
    if workers == 1:
        for item in items:
            checked.add(_check(item))
            checks.update()
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for res in pool.imap(_check, items, chunksize=max(1, min(32, n // (8 * workers)))):
                checked.add(res)
                checks.update()
    checks.close()
    skipped = [{"path": images.path(pos), "reason": reason} for pos, reason in sorted(checked.errors.items())]
    for s in skipped:
        print(f"ffcv: skipping {src / s['path']}: {s['reason']}", file=sys.stderr)
    good = checked.good()
    if not len(good.position):
        raise DataError(f"no decodable images in {src} ({len(skipped)} files failed; first: "
                        f"{skipped[0]['path']}: {skipped[0]['reason']})")

    # pass 2: FFCV's writer, into a temporary name
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    page_size = _page_size(good)
    fields = {
        "image": RGBImageField(write_mode=mode, max_resolution=max_res or None, jpeg_quality=quality,
                               compress_probability=compress_prob,
                               smart_threshold=smart_threshold if mode == "smart" else None),
        "label": IntField(),
        "index": IntField(),
    }
    samples = _Samples(src, good, images, max_res, seed)
    writer = _array_writer()(str(partial), fields, page_size=page_size, num_workers=workers)
    try:
        _write(writer, samples, max(1, min(100, math.ceil(len(good.position) / (4 * workers)))), progress)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    replaced = []
    while not samples.failures.empty():
        pos, reason = samples.failures.get()
        replaced.append({"path": images.path(pos), "reason": reason})
        print(f"ffcv: {src / images.path(pos)} failed while writing, stored as gray: {reason}", file=sys.stderr)

    # read the result back: the modes FFCV chose and the sizes it stored
    meta = Reader(str(partial)).metadata
    stored_modes = Counter(int(m) for m in meta["f0"]["mode"])
    per_class = Counter(int(label) for label in meta["f1"])
    report = {
        "format": "ffcv-beton",
        "source": str(src.resolve()),
        "classes": images.classes,
        "counts": {
            "found": len(images), "written": int(len(meta)), "skipped": len(skipped), "replaced": len(replaced),
            "stored_jpg": stored_modes.get(0, 0), "stored_raw": stored_modes.get(1, 0),
            "per_class": {images.classes[c]: per_class.get(c, 0) for c in range(len(images.classes))},
            "exif_rotated": int(good.rotated.sum()),
            "misnamed": int(good.misnamed.sum()),
            "source_modes": {good.modes[m]: int(c) for m, c in zip(*np.unique(good.mode, return_counts=True))},
        },
        "bytes": {
            "source": int(good.bytes.sum()),
            "beton": partial.stat().st_size,
            "per_image": partial.stat().st_size / len(meta),
        },
        "max_stored_side": int(max(meta["f0"]["height"].max(), meta["f0"]["width"].max())),
        "skipped": skipped,
        "replaced": replaced,
        "options": {"mode": mode, "max_res": max_res, "quality": quality, "compress_prob": compress_prob,
                    "smart_threshold": smart_threshold, "max_images": max_images, "seed": seed,
                    "workers": workers, "page_size": page_size},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out.unlink(missing_ok=True)         # --force: never an old .beton beside the new report
    atomic_write_text(sidecar, json.dumps(report, indent=2))
    os.replace(partial, out)            # the commit point: a .beton exists only once complete
    return report


# ---- convert.py command -------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--src", required=True, help="one split: SRC/<class>/<image> or a flat SRC/<image>")
    p.add_argument("--out", required=True, help="output .beton (the report goes to OUT.json)")
    p.add_argument("--mode", default="jpg", choices=MODES, help="how images are stored (default jpg)")
    p.add_argument("--max-res", type=int, default=256, help="cap the longer side (0 = keep)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for stored jpg images")
    p.add_argument("--compress-prob", type=float, default=0.5, help="proportion mode: P(jpg)")
    p.add_argument("--smart-threshold", type=int, default=0, help="smart mode: raw bytes above which jpg")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    p.add_argument("--max-images", type=int, default=0, help="convert only N images spread over classes")
    p.add_argument("--seed", type=int, default=0, help="proportion mode's per-image draw")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args) -> int:
    try:
        report = convert(args.src, args.out, mode=args.mode, max_res=args.max_res, quality=args.quality,
                         compress_prob=args.compress_prob, smart_threshold=args.smart_threshold,
                         workers=args.workers, max_images=args.max_images, seed=args.seed,
                         force=args.force, progress=args.progress)
    except (DataError, ValueError) as err:
        print(f"convert.py ffcv: {err}", file=sys.stderr)
        return 2
    c, b = report["counts"], report["bytes"]
    print(f"ffcv: wrote {args.out}: {c['written']} images ({c['stored_jpg']} jpg, {c['stored_raw']} raw), "
          f"{len(report['classes'])} classes, {b['beton'] / 2**20:.1f} MiB "
          f"({b['per_image'] / 1024:.1f} KiB/image; source {b['source'] / 2**20:.1f} MiB), "
          f"{c['skipped']} skipped, {report['seconds']:.1f} s; report in {args.out}.json")
    return 0


COMMANDS = {"ffcv": (HELP, add_arguments, run)}
