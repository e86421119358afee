"""What the dataset builders (fashion_mnist.py, photos.py) share: the staged output folder, the
.complete report, the worker pool and the JPEG encoding.

Builders write ImageFolder's layout, OUT/{train,val}/<class>/<n>.jpg, and nothing else but OUT/.complete
(the JSON report, the marker the Makefile looks for). They build into a sibling OUT.partial-<pid> that
is renamed onto OUT only once complete, refuse a non-empty OUT without --force, and are deterministic:
the same inputs and arguments give byte-identical folders (reports included) whatever --workers is,
because every image's randomness comes from its own (seed, class, split, index) stream.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from masksiam.io import atomic_write_text
from pipelines.loaders.common import DataError

SPLITS = ("train", "val")


class OutputExists(DataError):
    """The output folder is not empty and --force was not given."""


def default_workers() -> int:
    """The CPUs this process may use, at most 8 (beyond that the disk, not the encoder, limits)."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExists(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExists(f"output folder {out} is not empty; pass --force to replace it")


@contextmanager
def staged_output(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield a fresh sibling folder OUT.partial-<pid>; on success it replaces OUT, on error it is removed.

    An interrupted run thus leaves OUT as it was (plus, after a hard kill, a .partial folder that
    nothing mistakes for data: it has no .complete and is not named OUT).
    """
    out = Path(out).absolute()
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_output(out, force)  # someone may have filled OUT while we were building
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_report(folder: Path, report: dict) -> None:
    """folder/.complete = the JSON report, written atomically."""
    atomic_write_text(folder / ".complete", json.dumps(report, indent=1, sort_keys=True) + "\n")


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    """Baseline (not progressive) JPEG with libjpeg's standard tables; 4:2:0 chroma like most photos."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    return buf.getvalue()


def run_tasks(fn: Callable, tasks: list, workers: int, total: int, desc: str) -> list:
    """fn(task) -> (images written, result) over a process pool (inline for workers <= 1).

    Results come back in task order; the tqdm bar counts images.
    """
    results = []
    with tqdm(total=total, desc=desc, unit="img", mininterval=1.0, file=sys.stderr) as bar:
        if workers <= 1 or len(tasks) <= 1:
            stream: Iterable = map(fn, tasks)
            pool = None
        else:
            pool = multiprocessing.Pool(min(workers, len(tasks)))
            stream = pool.imap(fn, tasks)
        try:
            for images, result in stream:
                bar.update(images)
                results.append(result)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return results


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.2f} GB"


def check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be in 1..100, got {quality}")


def fail_command(command: str, err: Exception) -> int:
    print(f"convert.py {command}: error: {err}", file=sys.stderr)
    return 2


