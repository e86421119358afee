"""Webdataset tar shards for network file systems, and the sample sources the DALI loader reads.

    python convert.py webdataset --src data/photos --out data/photos-wds --shard-size 1000

Layout written (one folder per split of --src; the folder, not the files, is what `data=` names):

    OUT/.complete                   written last
    OUT/<split>/index.json          {"format": "masksiam-webdataset", "version": 1, "classes": [...],
                                     "num_samples", "shards": [{"name", "num_samples", "bytes",
                                     "labels": [...]}], "skipped": [{"file", "reason"}]}
    OUT/<split>/shard-000000.tar    <key>.jpg + <key>.cls per image (webdataset convention)
    OUT/<split>/shard-000000.idx    DALI's wds2idx index ("v1.2 N", then "ext offset size name ..."
                                    per sample), so fn.readers.webdataset can read the shards too

<key> is the image's ImageFolder path without extension, "<class>/<stem>" ('.' and whitespace in it
become '_': webdataset splits keys at the first dot, DALI's index at spaces). .cls holds the label
as ASCII digits. Shards keep the ImageFolder order and images are stored byte for byte, so sample i
of a webdataset split is image i of the folder (minus files found corrupt, listed under
"skipped"): every loader sees the same images per rank and epoch whichever format it reads. Tar
headers are fixed (mtime 0, uid 0, mode 0644): the same folder gives byte-identical shards.

Reading: the DALI loader does not use fn.readers.webdataset. That reader cuts each rank a
contiguous range of shards and shuffles through a bounded buffer, which is neither the run's
(seed, epoch) permutation nor resumable mid-epoch. `TarSamples` instead keeps the shard files open
and reads any sample with one pread at the offset in the index: random access in the order of
`shard_indices`, without the per-file open/stat round trips that make ImageFolders slow on NFS.
"""
from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

from pipelines.loaders.common import DataError, scan_image_folder

INDEX = "index.json"
FORMAT = "masksiam-webdataset"


def _spread(n: int, max_images: int) -> np.ndarray:
    """The first max_images spread over the list, as scan_image_folder picks them (same images)."""
    return np.linspace(0, n - 1, max_images).round().astype(int)


class FolderSamples:
    """An ImageFolder split (root/<class>/<image>) as a sample source: one file per read."""
    format = "imagefolder"

    def __init__(self, root: str | Path, max_images: int = 0):
        images = scan_image_folder(root, max_images)
        self.root, self.names, self.labels, self.classes = images.root, images.paths, images.labels, images.classes
        self._paths = [os.path.join(self.root, p) for p in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> np.ndarray:
        """The encoded bytes of sample i as a writable (nbytes,) uint8 array."""
        return np.fromfile(self._paths[i], dtype=np.uint8)

    def describe(self, i: int) -> str:
        return self._paths[i]


class TarSamples:
    """A webdataset split written by `convert.py webdataset`: random access through its index.

    Each shard file is opened once, on first use, and kept open (reads from several threads share
    the descriptor: pread has no file position). If the open-file limit cannot fit every shard even
    after raising the soft limit to the hard one, each read opens its shard instead.
    """
    format = "webdataset"

    def __init__(self, root: str | Path, max_images: int = 0):
        self.root = Path(root)
        meta = read_index(self.root)
        self.classes = meta["classes"]
        shard_ids, offsets, sizes, names, labels = [], [], [], [], []
        for s, shard in enumerate(meta["shards"]):
            entries = _read_idx(self.root / _idx_name(shard["name"]))
            if len(entries) != shard["num_samples"] or len(shard["labels"]) != shard["num_samples"]:
                raise DataError(f"{self.root / shard['name']}: index lists {len(entries)} samples and "
                                f"{len(shard['labels'])} labels, {INDEX} says {shard['num_samples']}; "
                                "re-run convert.py webdataset")
            for name, offset, size in entries:
                shard_ids.append(s), offsets.append(offset), sizes.append(size), names.append(name)
            labels += shard["labels"]
        if not names:
            raise DataError(f"webdataset split {self.root} has no samples")
        keep = _spread(len(names), max_images) if 0 < max_images < len(names) else np.arange(len(names))
        self.shards = [self.root / shard["name"] for shard in meta["shards"]]
        self.shard_of = np.asarray(shard_ids, np.int32)[keep]
        self.offsets = np.asarray(offsets, np.int64)[keep]
        self.sizes = np.asarray(sizes, np.int64)[keep]
        self.names = [names[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self._fds = [-1] * len(self.shards)
        self._keep_open = _allow_open_files(len(self.shards) + 256)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def _fd(self, shard: int) -> int:
        if self._fds[shard] < 0:
            with self._lock:
                if self._fds[shard] < 0:
                    self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def read(self, i: int) -> np.ndarray:
        """The encoded bytes of sample i as a writable (nbytes,) uint8 array: one pread."""
        shard, size, offset = int(self.shard_of[i]), int(self.sizes[i]), int(self.offsets[i])
        out = np.empty(size, np.uint8)
        if self._keep_open:
            got = os.preadv(self._fd(shard), [out], offset)
        else:
            with open(self.shards[shard], "rb") as f:
                got = os.preadv(f.fileno(), [out], offset)
        if got != size:
            raise OSError(f"{self.describe(i)}: read {got} of {size} bytes (shard truncated?)")
        return out

    def describe(self, i: int) -> str:
        return f"{self.shards[int(self.shard_of[i])]}:{self.names[i]}"

    def __del__(self):
        for fd in getattr(self, "_fds", []):
            if fd >= 0:
                os.close(fd)


def _allow_open_files(n: int) -> bool:
    """Raise the soft open-file limit towards the hard one if n files need it; False if it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n <= soft:
        return True
    if hard != resource.RLIM_INFINITY and n > hard:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return True


def is_webdataset(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def is_split(path: str | Path) -> bool:
    """A webdataset split, or a folder whose sub-folders hold images directly (an ImageFolder)."""
    path = Path(path)
    if is_webdataset(path):
        return True
    from pipelines.loaders.common import IMG_EXTENSIONS
    for sub in (p for p in path.iterdir() if p.is_dir()) if path.is_dir() else ():
        if any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(sub)):
            return True
    return False


def open_split(path: str | Path, max_images: int = 0) -> FolderSamples | TarSamples:
    """The sample source at `path`: webdataset shards if it holds index.json, else an ImageFolder."""
    return TarSamples(path, max_images) if is_webdataset(path) else FolderSamples(path, max_images)


def read_index(split: Path) -> dict:
    try:
        with open(split / INDEX) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read webdataset index {split / INDEX}: {err}") from err
    if meta.get("format") != FORMAT or meta.get("version") != 1:
        raise DataError(f"{split / INDEX} is not a {FORMAT} v1 index (format={meta.get('format')!r})")
    return meta


def _idx_name(tar_name: str) -> str:
    return tar_name[:-len(".tar")] + ".idx"


def _read_idx(path: Path) -> list[tuple[str, int, int]]:
    """(image member name, data offset, size) per sample of a v1.2 DALI webdataset index."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"cannot read shard index {path}: {err}") from err
    if not lines or not lines[0].startswith("v1.2 "):
        raise DataError(f"{path} is not a v1.2 webdataset index")
    out = []
    for line in lines[1:]:
        fields = line.split()
        # components "ext offset size name"; the image is every component that is not the label
        image = next((fields[j:j + 4] for j in range(0, len(fields), 4) if fields[j] != "cls"), None)
        if image is None or len(image) != 4:
            raise DataError(f"{path}: malformed line {line!r}")
        out.append((image[3], int(image[1]), int(image[2])))
    return out


# ---- conversion --------------------------------------------------------------------------------

def _key(path: str) -> tuple[str, str]:
    """ImageFolder path "cls/name.JPEG" -> (key "cls/name", member extension "jpg")."""
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, ext, label, data in samples:
            line = []
            for member_ext, payload in ((ext, data), ("cls", str(label).encode())):
                name = f"{key}.{member_ext}"
                tar.addfile(_member(name, len(payload)), io.BytesIO(payload))
                # the data ends at tar.offset, padded to a block: whatever the header size was
                line.append(f"{member_ext} {tar.offset - _padded(len(payload))} {len(payload)} {name}")
            idx_lines.append(" ".join(line))
    idx_tmp = tmp.with_suffix(".idx")
    idx_tmp.write_text("\n".join(idx_lines) + "\n")
    os.replace(idx_tmp, path.with_suffix(".idx"))
    os.replace(tmp, path)
    return path.stat().st_size


def convert_split(src: Path, out: Path, shard_size: int, workers: int, on_bad: str,
                  verbose: bool = True) -> dict:
    """One ImageFolder split -> shards + index in `out`. Every image is checked first
    (pipelines.tools.validate: PIL decode + DALI header rules); bad ones are skipped and listed, or stop
    the conversion with on_bad="fail"."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.tools.validate import check_image
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
    with open(out / INDEX, "w") as f:
        json.dump(meta, f)
    return {"images": count, "skipped": len(skipped), "shards": len(shards), "bytes": total_bytes}


def convert(src: str | Path, out: str | Path, shard_size: int, workers: int = 4, on_bad: str = "skip",
            force: bool = False, verbose: bool = True) -> dict:
    """Every split of `src` (or `src` itself if it is one ImageFolder split, written as OUT/<name>)
    into webdataset shards under `out`, built in a temporary folder and renamed into place."""
    from pipelines.tools.validate import find_splits
    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
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
        (tmp / ".complete").write_text(json.dumps(summary) + "\n")
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
