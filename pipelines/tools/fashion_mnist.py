"""convert.py fashion-mnist: the idx files of Debian's dataset-fashion-mnist as an ImageFolder of JPEGs.

    python convert.py fashion-mnist --out data/fashion-mnist   # 70,000 28x28 JPEGs, the demo's default data

Class folders are "<label>_<name>", so sorting them (as ImageFolder does) gives back the dataset's
label ids; file names are the sample's index in its split (train = the 60,000 training images,
val = the 10,000 test images). Output folder, report and determinism: imagefolder_build.py.
"""
from __future__ import annotations

import gzip
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.loaders.common import DataError
from pipelines.tools.imagefolder_build import (SPLITS, check_quality, default_workers, fail_command, human_bytes,
                                               jpeg_bytes, run_tasks, staged_output, write_report)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {  # split -> (images, labels); val is the official test set
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# label id -> folder; the digit prefix makes sorted(folders) == label order, so ImageFolder ids match
FASHION_MNIST_CLASSES = ("0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
                         "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot")
# Quality 100: pixels stay within 2 levels of the idx data (mean error ~0.06 level, against ~0.9 and
# up to 10 levels at 95), so results stay comparable with the literature, and a 28x28 file is
# still ~1.2 KB (one disk block either way); decode cost at this size is per-file, not per-byte.
FASHION_MNIST_QUALITY = 100


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or raw) of uint8: magic 00 00 08 <rank>, rank big-endian uint32 sizes, data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read idx file {path}: {err}") from err
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not a uint8 idx file (magic {data[:4].hex()})")
    rank = data[3]
    header = 4 + 4 * rank
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    if len(data) - header != math.prod(shape):
        raise DataError(f"{path}: header says shape {shape} ({math.prod(shape)} bytes) "
                        f"but {len(data) - header} bytes follow")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of one split, checked."""
    paths = [Path(root) / name for name in FASHION_MNIST_FILES[split]]
    for path in paths:
        if not path.is_file():
            raise DataError(f"Fashion-MNIST file {path} is missing: install Debian's dataset-fashion-mnist "
                            f"(`sudo apt-get install dataset-fashion-mnist`, or `make install`), "
                            f"or pass --source DIR holding the four *-ubyte.gz files")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{paths[0]} {images.shape} and {paths[1]} {labels.shape} do not pair up")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{paths[1]} has label {labels.max()}, expected 0-9")
    return images, labels


def _write_fmnist_chunk(task) -> tuple[int, int]:
    """Write images[i] as folder/<class of labels[i]>/<start + i>.jpg; -> (images, bytes)."""
    folder, start, images, labels, quality = task
    nbytes = 0
    for offset, (pixels, label) in enumerate(zip(images, labels)):
        data = jpeg_bytes(Image.fromarray(pixels, "L"), quality)
        (folder / FASHION_MNIST_CLASSES[label] / f"{start + offset:05d}.jpg").write_bytes(data)
        nbytes += len(data)
    return len(images), nbytes


def build_fashion_mnist(out: str | Path, *, force: bool = False, limit: int = 0,
                        quality: int = FASHION_MNIST_QUALITY, workers: int | None = None,
                        source: str | Path = FASHION_MNIST_DIR, chunk: int = 2500) -> dict:
    """Write OUT/{train,val}/<class>/<index>.jpg (the first `limit` per split if > 0); return the report."""
    workers = default_workers() if workers is None else workers
    check_quality(quality)
    data = {split: load_fashion_mnist(split, Path(source)) for split in SPLITS}  # fail before writing
    if limit > 0:
        data = {split: (x[:limit], y[:limit]) for split, (x, y) in data.items()}
    report = {"dataset": "fashion-mnist", "source": str(source), "quality": quality, "limit": limit,
              "classes": list(FASHION_MNIST_CLASSES), "splits": {}}
    with staged_output(out, force) as tmp:
        tasks = []
        for split, (images, labels) in data.items():
            for name in FASHION_MNIST_CLASSES:
                (tmp / split / name).mkdir(parents=True)
            tasks += [(tmp / split, s, images[s:s + chunk], labels[s:s + chunk], quality)
                      for s in range(0, len(images), chunk)]
        results = run_tasks(_write_fmnist_chunk, tasks, workers, sum(len(t[2]) for t in tasks),
                            "fashion-mnist")
        for split, (images, labels) in data.items():
            report["splits"][split] = {
                "images": len(images), "bytes": sum(r for t, r in zip(tasks, results) if t[0].name == split),
                "per_class": np.bincount(labels, minlength=len(FASHION_MNIST_CLASSES)).tolist()}
        report["images"] = sum(s["images"] for s in report["splits"].values())
        report["bytes"] = sum(s["bytes"] for s in report["splits"].values())
        report["mean_bytes"] = round(report["bytes"] / max(1, report["images"]), 1)
        write_report(tmp, report)
    return report


def _fmnist_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder (ImageFolder: OUT/train, OUT/val)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--limit", type=int, default=0, help="keep the first N images of each split (0: all)")
    p.add_argument("--quality", type=int, default=FASHION_MNIST_QUALITY,
                   help=f"JPEG quality (default {FASHION_MNIST_QUALITY}: within 2 levels of the idx pixels)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, at most 8)")
    p.add_argument("--source", default=str(FASHION_MNIST_DIR),
                   help=f"folder of the *-ubyte.gz idx files (default {FASHION_MNIST_DIR})")


def _fmnist_run(args) -> int:
    start = time.perf_counter()
    try:
        report = build_fashion_mnist(args.out, force=args.force, limit=args.limit, quality=args.quality,
                                     workers=args.workers, source=args.source)
    except DataError as err:
        return fail_command("fashion-mnist", err)
    for split, s in report["splits"].items():
        print(f"{split}: {s['images']} images in {len(report['classes'])} classes, {human_bytes(s['bytes'])} "
              f"(per class: {' '.join(map(str, s['per_class']))})")
    print(f"wrote {args.out}: {report['images']} images, {human_bytes(report['bytes'])}, "
          f"mean {report['mean_bytes']:.0f} B/image, {time.perf_counter() - start:.1f} s")
    return 0



COMMANDS = {
    "fashion-mnist": ("Fashion-MNIST (Debian's dataset-fashion-mnist) as an ImageFolder of JPEGs",
                      _fmnist_arguments, _fmnist_run),
}
