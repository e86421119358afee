"""Find corrupt or unreadable images before a long run does.

    python convert.py validate DIR [--json OUT] [--workers N]

DIR is a dataset root (train/, val/ inside), one split, an ImageFolder or webdataset shards written
by `convert.py webdataset`. Every image is read and fully decoded with PIL (what the torchvision
loader does) and its header is walked with the rules of DALI's JPEG parser (nvImageCodec), which is
stricter than PIL: a stray byte between two JPEG segments is skipped by PIL but fails DALI's whole
batch. Each bad file is listed with the reason; the exit status is 1 when any is bad.

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

from PIL import Image

from masksiam.io import atomic_write_text
from pipelines.loaders.common import DataError
from pipelines.loaders.samples import is_split, open_split


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
    n, pos, size = len(buf), 2, None
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
    return size


def image_size(data) -> tuple[int, int]:
    """(height, width) of an encoded image as stored (EXIF orientation is not applied, as in the
    loaders), from its header alone. Raises BadImage if the header is unusable."""
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


def check_image(data) -> str | None:
    """None if `data` (one encoded image) decodes with both PIL and DALI's header rules, else why not.

    The full PIL decode catches truncated and corrupt entropy data; converting to RGB catches modes
    the loaders cannot use.
    """
    try:
        image_size(data)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img.convert("RGB")
    except BadImage as err:
        return str(err)
    except Exception as err:  # noqa: BLE001  (PIL raises OSError, SyntaxError, struct.error, ...)
        return f"{type(err).__name__}: {err}"
    return None


def check_sample(samples, i: int) -> str | None:
    """check_image on sample i of a source (see pipelines/tools/webdataset.py); read errors are reasons too."""
    try:
        data = samples.read(i)
    except OSError as err:
        return f"unreadable: {err}"
    return check_image(data)


def find_bad(samples, workers: int = 4, progress=None) -> list[tuple[int, str]]:
    """[(index, reason)] for every bad sample of `samples`, in index order.

    Threads suffice: reading and PIL's decoder release the GIL. Work goes out in chunks so that a
    million-image folder is never held in memory at once.
    """
    bad, chunk = [], 64 * max(1, workers)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(samples), chunk):
            ids = range(start, min(start + chunk, len(samples)))
            for i, reason in zip(ids, pool.map(lambda i: check_sample(samples, i), ids)):
                if reason is not None:
                    bad.append((i, reason))
            if progress:
                progress(ids.stop, len(bad))
    return bad


def find_splits(path: Path) -> list[Path]:
    """The split folders under `path`: itself if it is one (ImageFolder or webdataset), else its
    sub-folders that are."""
    if is_split(path):
        return [path]
    splits = sorted(p for p in path.iterdir() if p.is_dir() and is_split(p)) if path.is_dir() else []
    if not splits:
        raise DataError(f"{path} holds no images: expected <split>/<class>/<image>, <class>/<image> "
                        "or webdataset shards (index.json) from `convert.py webdataset`")
    return splits


def validate(path: str | Path, workers: int = 4, verbose: bool = True) -> dict:
    """Check every image under `path`; returns the report (counts and bad files per split)."""
    report = {"path": str(path), "splits": {}, "checked": 0, "bad": 0}
    for split in find_splits(Path(path)):
        samples = open_split(split)
        start = time.perf_counter()

        def progress(done, nbad, name=split.name, total=len(samples)):
            if verbose and sys.stderr.isatty():
                print(f"\r  {name}: {done}/{total} checked, {nbad} bad", end="", file=sys.stderr, flush=True)

        bad = find_bad(samples, workers, progress)
        if verbose and sys.stderr.isatty():
            print(file=sys.stderr)
        seconds = time.perf_counter() - start
        report["splits"][split.name] = {
            "path": str(split), "format": samples.format, "checked": len(samples), "bad": len(bad),
            "seconds": round(seconds, 2),
            "bad_files": [{"file": samples.describe(i), "reason": reason} for i, reason in bad]}
        report["checked"] += len(samples)
        report["bad"] += len(bad)
        if verbose:
            print(f"{split}: {len(samples)} images ({samples.format}) checked in {seconds:.1f} s, {len(bad)} bad")
            for i, reason in bad:
                print(f"  BAD {samples.describe(i)}: {reason}")
    return report


def add_arguments(p) -> None:
    p.add_argument("path", help="dataset root, split folder, ImageFolder or webdataset split")
    p.add_argument("--json", help="also write the report here (JSON)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")


def run(args) -> int:
    report = validate(args.path, args.workers)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    print(f"{report['checked']} images checked, {report['bad']} bad")
    return 1 if report["bad"] else 0


COMMANDS = {"validate": ("find corrupt or unreadable images (PIL decode + DALI header rules)", add_arguments, run)}


if __name__ == "__main__":  # python -m pipelines.tools.validate DIR
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
