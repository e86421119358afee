"""Find corrupt or unreadable images before a long run does.

    python convert.py validate DIR [--json OUT] [--workers N]

DIR is a dataset root (train/, val/ inside), one split (an ImageFolder <class>/<image>, a flat
folder of photos <image>: the folder rules of pipelines/loaders/common.py) or webdataset shards
written by `convert.py webdataset`. Every image is read and fully decoded with PIL (what the torchvision
loader does) and its header is walked with the rules of DALI's JPEG parser (nvImageCodec), which is
stricter than PIL: a stray byte between two JPEG segments is skipped by PIL but fails DALI's whole
batch. Each bad file is listed with the reason; the exit status is 1 when any is bad, or when the
train and val splits of a dataset root have different class lists. The report also says which
splits are unlabelled (a flat folder, or one class) and how many photos carry an EXIF orientation,
and what the loaders do with it (EXIF_NOTE).

The core is reusable by every loader and converter:

    check_image(data) -> None or "reason"      # one encoded image (bytes / uint8 array)
    image_size(data) -> (height, width)        # header only; raises BadImage
    find_bad(samples, workers) -> [(i, reason)]  # any indexable sample source (pipelines/loaders/samples.py)
"""
from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from masksiam.io import atomic_write_text
from pipelines.loaders.common import UNLABELLED, DataError, compare_classes, has_labels
from pipelines.loaders.samples import dataset_splits, open_split


class BadImage(ValueError):
    """An encoded image that a decoder would reject; the message says why."""


# SOFn markers carry the frame size: 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS, _APP1 = 0xDA, 0xE1


def _jpeg_size(buf: memoryview) -> tuple[int, int]:
    """Walk the JPEG segments up to the first scan the way nvImageCodec's parser does.

    After SOI every segment must start with 0xFF (any number of 0xFF fill bytes may follow) and a
    marker byte that is not 0x00, and its length must stay inside the file. PIL tolerates junk
    between segments; DALI fails with "Invalid marker", so that is reported here.
    """
    n, pos, size, orientation = len(buf), 2, None, None
    while True:
        if pos + 2 > n:
            raise BadImage("JPEG ends before its scan data (truncated header)")
        if buf[pos] != 0xFF:
            raise BadImage(f"invalid JPEG marker at byte {pos}: junk between segments "
                           "(PIL skips it, DALI's decoder rejects the file)")
        while pos + 1 < n and buf[pos + 1] == 0xFF:
            pos += 1
        if pos + 2 > n:
            raise BadImage("JPEG ends inside a marker (truncated header)")
        marker = buf[pos + 1]
        if marker == 0x00:
            raise BadImage(f"invalid JPEG marker 0xFF00 at byte {pos} (DALI's decoder rejects the file)")
        if marker == _SOS:
            break
        if pos + 4 > n:
            raise BadImage("JPEG ends inside a segment header (truncated)")
        length = buf[pos + 2] << 8 | buf[pos + 3]
        if length < 2 or pos + 2 + length > n:
            raise BadImage(f"JPEG segment 0xFF{marker:02X} at byte {pos} runs past the end of the file (truncated)")
        if marker == _APP1 and orientation is None and bytes(buf[pos + 4:pos + 10]) == b"Exif\x00\x00":
            orientation = _exif_orientation(buf[pos + 4:pos + 2 + length])   # the first Exif block, as PIL
        if marker in _SOF_MARKERS:
            if length < 8:
                raise BadImage("JPEG frame header (SOF) is too short")
            height, width = buf[pos + 5] << 8 | buf[pos + 6], buf[pos + 7] << 8 | buf[pos + 8]
            components = buf[pos + 9]
            if components not in (1, 3, 4):
                raise BadImage(f"JPEG with {components} colour components (1, 3 or 4 are decodable)")
            size = (height, width)
        pos += 2 + length
    if size is None:
        raise BadImage("JPEG has no frame header (SOF) before its scan data")
    if size[0] == 0 or size[1] == 0:
        raise BadImage(f"JPEG frame header says {size[1]}x{size[0]} pixels")
    return (size[1], size[0]) if orientation in _TRANSPOSED else size


_TRANSPOSED = (5, 6, 7, 8)          # EXIF orientations that swap height and width (90 / 270 degrees)


def _exif_orientation(payload: memoryview) -> int:
    """The orientation tag (0x0112) of an APP1 Exif payload's first IFD: 1..8, 1 when absent or
    unreadable (then no decoder applies one either)."""
    if bytes(payload[:6]) != b"Exif\x00\x00" or len(payload) < 14:
        return 1
    tiff = payload[6:]
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None:
        return 1
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        tag, kind = struct.unpack(order + "HH", tiff[entry:entry + 4])
        if tag == 0x0112 and kind == 3:                              # SHORT, stored left-justified
            (value,) = struct.unpack(order + "H", tiff[entry + 8:entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def image_size(data) -> tuple[int, int]:
    """(height, width) of an encoded image upright, from its header alone: a JPEG's EXIF
    orientation is applied (swapped for 90 / 270 degrees), as every loader applies it (EXIF_NOTE).
    Raises BadImage if the header is unusable."""
    buf = memoryview(data).cast("B")
    if len(buf) == 0:
        raise BadImage("empty file")
    if buf[:2] == b"\xff\xd8":
        return _jpeg_size(buf)
    if buf[:8] == b"\x89PNG\r\n\x1a\n":
        if len(buf) < 24 or buf[12:16] != b"IHDR":
            raise BadImage("PNG without an IHDR header (truncated)")
        width, height = struct.unpack(">II", buf[16:24])
        return height, width
    try:  # BMP, PNM, TIFF, WebP: PIL reads only the header here
        with Image.open(io.BytesIO(buf)) as img:
            return img.height, img.width
    except Exception as err:  # noqa: BLE001  (any parser failure means "not an image we can read")
        raise BadImage(f"not a readable image: {type(err).__name__}: {err}") from None


# What each decoder does with a photo's EXIF orientation tag (phones store pixels sideways and
# say "rotate 90" in it): validate's report states it. One rule, three decoders: `upright` (PIL:
# the torchvision loader, convert.py ffcv), DALI's adjust_orientation=True, and image_size, which
# gives DALI's crop planning the upright size from the header.
EXIF_NOTE = ("applied to JPEG files by every loader (torchvision and convert.py ffcv: PIL's "
             "exif_transpose; DALI: adjust_orientation), so crops are drawn on the upright photo; "
             "other formats (PNG, TIFF, WebP) are read as stored, as DALI reads them")
_JPEG_FORMATS = ("JPEG", "MPO")


def upright(img: Image.Image) -> bool:
    """Apply a JPEG's EXIF orientation to the decoded `img` in place, as DALI's decoder does; other
    formats stay as stored (Pillow alone would also turn a PNG by its eXIf chunk or XMP). Returns
    whether it turned the image; an unreadable EXIF block leaves it as stored, as DALI does."""
    if img.format not in _JPEG_FORMATS:
        return False
    try:
        if img.getexif().get(0x0112, 1) in (0, 1):
            return False
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001  (Pillow's EXIF parser raises many types on corrupt blocks)
        return False
    return True


def _inspect(data) -> tuple[str | None, bool]:
    """(None or why `data` fails to decode, whether its EXIF orientation asks for a rotation or flip)."""
    try:
        image_size(data)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img.convert("RGB")
            rotated = upright(img)
    except BadImage as err:
        return str(err), False
    except Exception as err:  # noqa: BLE001  (PIL raises OSError, SyntaxError, struct.error, ...)
        return f"{type(err).__name__}: {err}", False
    return None, rotated


def check_image(data) -> str | None:
    """None if `data` (one encoded image) decodes with both PIL and DALI's header rules, else why not.

    The full PIL decode catches truncated and corrupt entropy data; converting to RGB catches modes
    the loaders cannot use.
    """
    return _inspect(data)[0]


def _inspect_sample(samples, i: int) -> tuple[str | None, bool]:
    try:
        data = samples.read(i)
    except OSError as err:
        return f"unreadable: {err}", False
    return _inspect(data)


def check_sample(samples, i: int) -> str | None:
    """check_image on sample i of a source (see pipelines/tools/webdataset.py); read errors are reasons too."""
    return _inspect_sample(samples, i)[0]


def inspect_all(samples, workers: int = 4, progress=None) -> tuple[list[tuple[int, str]], int]:
    """([(index, reason)] for every bad sample of `samples`, in index order; how many good ones
    carry an EXIF rotation).

    Threads suffice: reading and PIL's decoder release the GIL. Work goes out in chunks so that a
    million-image folder is never held in memory at once.
    """
    bad, rotated, chunk = [], 0, 64 * max(1, workers)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(samples), chunk):
            ids = range(start, min(start + chunk, len(samples)))
            for i, (reason, turned) in zip(ids, pool.map(lambda i: _inspect_sample(samples, i), ids)):
                if reason is not None:
                    bad.append((i, reason))
                rotated += turned
            if progress:
                progress(ids.stop, len(bad))
    return bad, rotated


def find_bad(samples, workers: int = 4, progress=None) -> list[tuple[int, str]]:
    """[(index, reason)] for every bad sample of `samples`, in index order (inspect_all)."""
    return inspect_all(samples, workers, progress)[0]


def find_splits(path: Path) -> list[Path]:
    """The split folders under `path` (samples.dataset_splits: itself if it is one split, else its
    sub-folders when it holds train/ or val/)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} does not exist (expected a dataset root with train/ and val/, one split "
                        "folder <class>/<image> or <image>, or webdataset shards from `convert.py webdataset`)")
    return dataset_splits(path)


def class_mismatch(report: dict) -> str | None:
    """Why the train and val splits of a validated dataset root cannot be evaluated together, or None."""
    splits = report["splits"]
    if "train" not in splits or "val" not in splits or not splits["train"]["labelled"]:
        return None
    try:
        compare_classes(splits["train"]["classes"], splits["val"]["classes"], "train", "val")
    except DataError as err:
        return str(err)
    return None


def validate(path: str | Path, workers: int = 4, verbose: bool = True) -> dict:
    """Check every image under `path`; returns the report (counts and bad files per split)."""
    report = {"path": str(path), "splits": {}, "checked": 0, "bad": 0, "exif_orientation": EXIF_NOTE}
    for split in find_splits(Path(path)):
        samples = open_split(split)
        start = time.perf_counter()

        def progress(done, nbad, name=split.name, total=len(samples)):
            if verbose and sys.stderr.isatty():
                print(f"\r  {name}: {done}/{total} checked, {nbad} bad", end="", file=sys.stderr, flush=True)

        bad, rotated = inspect_all(samples, workers, progress)
        if verbose and sys.stderr.isatty():
            print(file=sys.stderr)
        seconds = time.perf_counter() - start
        labelled = has_labels(samples.classes)
        report["splits"][split.name] = {
            "path": str(split), "format": samples.format, "checked": len(samples), "bad": len(bad),
            "classes": list(samples.classes), "labelled": labelled, "exif_rotated": rotated,
            "seconds": round(seconds, 2),
            "bad_files": [{"file": samples.describe(i), "reason": reason} for i, reason in bad]}
        report["checked"] += len(samples)
        report["bad"] += len(bad)
        if verbose:
            kind = (f"{len(samples.classes)} classes" if labelled else
                    "unlabelled: a flat folder, one pseudo-class" if samples.classes == [UNLABELLED] else
                    "one class: unlabelled for evaluation")
            print(f"{split}: {len(samples)} images ({samples.format}, {kind}) checked in {seconds:.1f} s, "
                  f"{len(bad)} bad, {rotated} with an EXIF orientation")
            for i, reason in bad:
                print(f"  BAD {samples.describe(i)}: {reason}")
    report["class_mismatch"] = class_mismatch(report)
    if verbose:
        if report["class_mismatch"]:
            print(f"PROBLEM {report['class_mismatch']}")
        if any(s["exif_rotated"] for s in report["splits"].values()):
            print(f"EXIF orientation: {EXIF_NOTE}")
    return report


def add_arguments(p) -> None:
    p.add_argument("path", help="dataset root, split folder, ImageFolder or webdataset split")
    p.add_argument("--json", help="also write the report here (JSON)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")


def run(args) -> int:
    report = validate(args.path, args.workers)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    print(f"{report['checked']} images checked, {report['bad']} bad"
          + ("; the train and val class lists differ" if report["class_mismatch"] else ""))
    return 1 if report["bad"] or report["class_mismatch"] else 0


COMMANDS = {"validate": ("find corrupt or unreadable images (PIL decode + DALI header rules)", add_arguments, run)}


if __name__ == "__main__":  # python -m pipelines.tools.validate DIR
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
