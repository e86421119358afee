"""Webdataset tar shards for network file systems: the writer (`convert.py webdataset`).

    python convert.py webdataset --src data/photos --out data/photos-wds --shard-size 1000

Layout written (one folder per split of --src; the folder, not the files, is what `data=` names):

    OUT/.complete                   written last
    OUT/<split>/index.json          {"format": "masksiam-webdataset", "version": 1, "classes": [...],
                                     "num_samples", "shards": [{"name", "num_samples", "bytes",
                                     "labels": [...]}], "skipped": [{"file", "reason"}]}
    OUT/<split>/shard-000000.tar    <key>.jpg + <key>.cls per image (webdataset convention)
    OUT/<split>/shard-000000.idx    DALI's wds2idx index ("v1.2 N", then "ext offset size name ..."
                                    per sample), so fn.readers.webdataset can read the shards too

<key> is the image's path in its split without extension: "<class>/<stem>", "<class>/<sub>/<stem>"
for nested folders, "<stem>" for a flat folder of photos (the folder rules of
pipelines/loaders/common.py decide which files a split holds; a flat folder is one pseudo-class,
label 0, classes [""]). '.' and whitespace in it become '_': webdataset splits keys at the first
dot, DALI's index at spaces. .cls holds the label
as ASCII digits. Shards keep the ImageFolder order and images are stored byte for byte, so sample i
of a webdataset split is image i of the folder (minus files found corrupt, listed under
"skipped"): every loader sees the same images per rank and epoch whichever format it reads. Tar
headers are fixed (mtime 0, uid 0, mode 0644): the same folder gives byte-identical shards.

Reading: pipelines/loaders/samples.py (TarSamples: random access through the index).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

from masksiam.errors import UsageError
from masksiam.io import atomic_write, atomic_write_text
from pipelines.loaders.common import DataError
from pipelines.loaders.samples import FORMAT, INDEX, FolderSamples, is_webdataset
from pipelines.tools.validate import check_image, find_splits

# ---- conversion --------------------------------------------------------------------------------

def _key(path: str) -> tuple[str, str]:
    """Split path "cls/name.JPEG" -> (key "cls/name", member extension "jpg")."""
    stem, ext = os.path.splitext(path)
    ext = ext[1:].lower()
    return re.sub(r"[.\s]", "_", stem), "jpg" if ext in ("jpg", "jpeg") else ext


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with nothing that changes between runs (time, owner)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _write_shard(path: Path, samples: list[tuple[str, str, int, bytes]]) -> int:
    """Write one tar (and its .idx) atomically; samples are (key, ext, label, data). Returns bytes."""
    idx_lines = [f"v1.2 {len(samples)}"]

    def write_tar(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, ext, label, data in samples:
                line = []
                for member_ext, payload in ((ext, data), ("cls", str(label).encode())):
                    name = f"{key}.{member_ext}"
                    tar.addfile(_member(name, len(payload)), io.BytesIO(payload))
                    # the data ends at tar.offset, padded to a block: whatever the header size was
                    line.append(f"{member_ext} {tar.offset - _padded(len(payload))} {len(payload)} {name}")
                idx_lines.append(" ".join(line))

    atomic_write(path, write_tar)
    atomic_write_text(path.with_suffix(".idx"), "\n".join(idx_lines) + "\n")
    return path.stat().st_size


def convert_split(src: Path, out: Path, shard_size: int, workers: int, on_bad: str,
                  verbose: bool = True) -> dict:
    """One folder split (ImageFolder or flat) -> shards + index in `out`. Every image is checked first
    (pipelines.tools.validate: PIL decode + DALI header rules); bad ones are skipped and listed, or stop
    the conversion with on_bad="fail"."""
    from concurrent.futures import ThreadPoolExecutor

    folder = FolderSamples(src)
    out.mkdir(parents=True)
    keys = [_key(p) for p in folder.names]
    seen: dict[str, str] = {}
    for (key, _), path in zip(keys, folder.names):
        if key in seen:
            raise DataError(f"{src}/{path} and {src}/{seen[key]} map to the same webdataset key {key!r}")
        seen[key] = path

    def load(i):  # -> (data, reason)
        try:
            data = folder.read(i).tobytes()
        except OSError as err:
            return None, f"unreadable: {err}"
        return data, check_image(data)

    shards, skipped, pending, total_bytes = [], [], [], 0

    def flush():
        nonlocal total_bytes
        name = f"shard-{len(shards):06d}.tar"
        nbytes = _write_shard(out / name, pending)
        shards.append({"name": name, "num_samples": len(pending), "bytes": nbytes,
                       "labels": [label for _, _, label, _ in pending]})
        total_bytes += nbytes
        pending.clear()

    chunk = 64 * max(1, workers)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(folder), chunk):
            ids = range(start, min(start + chunk, len(folder)))
            for i, (data, reason) in zip(ids, pool.map(load, ids)):
                if reason is not None:
                    if on_bad == "fail":
                        raise DataError(f"{folder.describe(i)}: {reason} (use --on-bad skip to leave it out)")
                    skipped.append({"file": folder.describe(i), "reason": reason})
                    if verbose:
                        print(f"  SKIP {folder.describe(i)}: {reason}")
                    continue
                pending.append((*keys[i], folder.labels[i], data))
                if len(pending) == shard_size:
                    flush()
    if pending:
        flush()
    count = sum(s["num_samples"] for s in shards)
    if count == 0:
        raise DataError(f"{src}: no readable images to convert")
    meta = {"format": FORMAT, "version": 1, "source": str(src), "classes": folder.classes,
            "num_samples": count, "shard_size": shard_size, "shards": shards, "skipped": skipped}
    atomic_write_text(out / INDEX, json.dumps(meta))
    return {"images": count, "skipped": len(skipped), "shards": len(shards), "bytes": total_bytes}


def convert(src: str | Path, out: str | Path, shard_size: int, workers: int = 4, on_bad: str = "skip",
            force: bool = False, verbose: bool = True) -> dict:
    """Every split of `src` (or `src` itself if it is one split, written as OUT/<name>: find_splits)
    into webdataset shards under `out`, built in a temporary folder and renamed into place."""
    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise UsageError(f"--shard-size must be positive, got {shard_size}")
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"{out} exists and is not empty; pass --force to replace it")
    splits = find_splits(src)
    if any(is_webdataset(s) for s in splits):
        raise DataError(f"{src} already holds webdataset shards")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    summary = {}
    try:
        for split in splits:
            start = time.perf_counter()
            summary[split.name] = s = convert_split(split, tmp / split.name, shard_size, workers, on_bad, verbose)
            if verbose:
                print(f"{split} -> {out / split.name}: {s['images']} images in {s['shards']} shards, "
                      f"{s['bytes'] / 2**20:.1f} MiB, {s['skipped']} skipped, {time.perf_counter() - start:.1f} s")
        atomic_write_text(tmp / ".complete", json.dumps(summary) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def add_arguments(p) -> None:
    p.add_argument("--src", required=True, help="ImageFolder dataset root (train/, val/) or one split")
    p.add_argument("--out", required=True, help="output folder (one sub-folder of shards per split)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reading/checking threads")
    p.add_argument("--on-bad", choices=["skip", "fail"], default="skip",
                   help="corrupt images: leave out and list in index.json (skip) or stop (fail)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    summary = convert(args.src, args.out, args.shard_size, args.workers, args.on_bad, args.force)
    skipped = sum(s["skipped"] for s in summary.values())
    print(f"wrote {sum(s['images'] for s in summary.values())} images to {args.out}"
          + (f"; {skipped} corrupt files skipped (listed in <split>/{INDEX})" if skipped else ""))
    return 0


COMMANDS = {"webdataset": ("ImageFolder -> webdataset tar shards (+ DALI .idx) for network file systems",
                           add_arguments, run)}
