"""bench.py scale: what the loaders, the converters and train.py cost as the number of files grows.

    python bench.py scale --files 10000,100000 [--loaders torchvision,dali,ffcv] [--converters webdataset,ffcv]

For each size N it builds N small JPEGs in C class folders by hard links of a few distinct tiny
JPEGs (os.link: seconds at a million files; a folder under --out with its marker is reused), then
runs each step in a fresh interpreter, so that what is resident is that one process's (a rank's):

- converters (convert.py webdataset / ffcv on the folder): wall time, and the peak memory of the
  process tree (its /proc sampled every SAMPLE_S: RSS summed over the processes, PSS summed, which
  counts a page shared by the writers once, and the main process's own RSS);
- loaders (torchvision and DALI on the folder, DALI on the shards, FFCV on the .beton): the time to
  build the loader (the folder loaders once with no split index, "first", then with the index
  cached), the time to the first batch, the rank's memory (/proc/<pid>/smaps_rollup: RSS, anonymous)
  and each DataLoader worker's private memory (USS) right after the first batch and after --batches
  batches, and the bytes resident per file: (rank RSS after the batches - before building) / N;
- train.py (a tiny model, max_steps=1): seconds from its process start to its first step's log line.

With several sizes it adds the growth per file between consecutive sizes and the linear
extrapolation to TARGET files (ImageNet-21k). Writes OUT/scale.json and OUT/scale.md (printed).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from masksiam.errors import UsageError
from masksiam.io import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parent.parent
TARGET = 14_000_000                 # ImageNet-21k's files: where the growth per file is extrapolated to
SAMPLE_S = 0.2                      # the converters' /proc sampling period
MAX_LINKS = 60_000                  # links per source file: ext4 allows 65,000 per inode
MARKER = ".scale-complete.json"     # written last: a folder with it is a finished dataset of its size
LOADERS = ("torchvision", "dali", "ffcv")
CONVERTERS = ("webdataset", "ffcv")
MODULES = {"dali": "nvidia.dali", "ffcv": "ffcv"}      # what a loader or converter needs importable

LOADER_COLUMNS = ["files", "loader", "startup_first_s", "startup_s", "first_batch_s", "batches", "s_per_batch",
                  "rank_rss_start_mb", "rank_rss_end_mb", "rank_anon_end_mb", "rank_B_per_file", "workers",
                  "worker_uss_start_mb", "worker_uss_end_mb", "worker_dirty_start_mb", "worker_dirty_end_mb",
                  "worker_growth_mb", "worker_B_per_file", "note"]
CONVERTER_COLUMNS = ["files", "converter", "wall_s", "peak_rss_mb", "peak_pss_mb", "peak_main_rss_mb", "processes",
                     "B_per_file", "note"]
TRAIN_COLUMNS = ["files", "first_step_s", "total_s", "note"]
GROWTH_COLUMNS = ["quantity", "values", "growth_per_file", f"at_{TARGET // 1_000_000}M"]


# ---- memory of a process, from /proc ----------------------------------------------------------------

def smaps(pid: int) -> dict | None:
    """Bytes of a process from /proc/<pid>/smaps_rollup: rss, pss, anon (anonymous pages: heaps,
    Python objects, shared copy-on-write ones included), uss (private clean + dirty) and dirty
    (private dirty: what this process alone wrote, its copy-on-write copies included); None when it
    is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            kb[key] = int(parts[0]) * 1024
    return {"rss": kb.get("Rss", 0), "pss": kb.get("Pss", 0), "anon": kb.get("Anonymous", 0),
            "uss": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0), "dirty": kb.get("Private_Dirty", 0)}


def descendants(pid: int) -> list[int]:
    """The pids below `pid` (children, grandchildren), read from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class TreeSampler:
    """Peak memory of a process and its descendants, sampled every SAMPLE_S by a thread: the sum of
    their RSS, the sum of their PSS (a page shared by k of them counts 1/k in each: the tree's real
    footprint) and the root's own RSS."""

    def __init__(self, pid: int):
        self.pid, self.peak_rss, self.peak_pss, self.peak_main, self.processes = pid, 0, 0, 0, 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        pids = [self.pid, *descendants(self.pid)]
        mems = [m for m in map(smaps, pids) if m is not None]
        if mems:
            self.peak_rss = max(self.peak_rss, sum(m["rss"] for m in mems))
            self.peak_pss = max(self.peak_pss, sum(m["pss"] for m in mems))
            self.peak_main = max(self.peak_main, mems[0]["rss"] if pids[0] == self.pid else 0)
            self.processes = max(self.processes, len(mems))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---- the dataset: N hard links in C class folders -----------------------------------------------------

def class_counts(files: int, classes: int) -> list[int]:
    """Files per class folder: N spread evenly, the first N % C classes one more."""
    return [files // classes + (c < files % classes) for c in range(classes)]


def _tiny_jpeg(seed: int, size: int = 48) -> bytes:
    """A distinct small JPEG (size x size, ~1-2 KB): a colour gradient shifted by the seed, plus noise."""
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([(x * 5 + seed * 37) % 256, (y * 5 + seed * 71) % 256, (x + y + seed * 13) % 256], -1)
    pixels = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_dataset(root: Path, files: int, classes: int) -> dict:
    """root/train/c<class>/<i>.jpg: `files` hard links spread over `classes` folders, each a link of
    one of S small source JPEGs (root/.sources, S >= 4 and at most MAX_LINKS links each). A root with
    MARKER for the same size is reused; anything else there is removed first."""
    marker = root / MARKER
    want = {"files": files, "classes": classes}
    if marker.is_file():
        try:
            if {k: json.loads(marker.read_text()).get(k) for k in want} == want:
                return {"root": str(root), "seconds": 0.0, "reused": True}
        except ValueError:
            pass
    t0 = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    sources = root / ".sources"
    count = max(4, math.ceil(files / MAX_LINKS))
    names = [sources / f"src-{s:03d}.jpg" for s in range(count)]
    for s, name in enumerate(names):
        data = _tiny_jpeg(s)
        atomic_write(name, lambda f: f.write(data))
    source_paths = [str(n) for n in names]
    split = root / "train"
    i = 0
    for c, n in enumerate(class_counts(files, classes)):
        folder = split / f"c{c:05d}"
        folder.mkdir(parents=True)
        prefix = str(folder) + os.sep
        for _ in range(n):                  # round-robin over the sources: at most MAX_LINKS each
            os.link(source_paths[i % count], f"{prefix}{i:08d}.jpg")
            i += 1
    atomic_write_text(marker, json.dumps({**want, "sources": count}) + "\n")
    return {"root": str(root), "seconds": time.perf_counter() - t0, "reused": False}


# ---- growth per file and the extrapolation ---------------------------------------------------------

def extrapolate(points: list[tuple[int, float]], target: int = TARGET) -> tuple[float, float]:
    """(growth per file, value at `target` files) of a quantity measured at sizes `points` [(N, v)]:
    the slope between the two largest sizes and the line through the largest one; with one size the
    quantity is taken as proportional (v / N per file)."""
    points = sorted(points)
    if len(points) == 1:
        n, v = points[0]
        return v / n, v / n * target
    (n0, v0), (n1, v1) = points[-2], points[-1]
    slope = (v1 - v0) / (n1 - n0)
    return slope, v1 + slope * (target - n1)


def _size(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1_000_000 else f"{n / 1e3:.3g}k" if n >= 1000 else str(n)


def growth_rows(loaders: list[dict], converters: list[dict], train: list[dict]) -> list[dict]:
    """One row per quantity measured at every size: its values, growth per file between the two
    largest sizes (bytes or microseconds per file) and its linear extrapolation to TARGET files."""
    series = []                          # (name, unit, [(N, value in bytes or seconds)])
    for name in dict.fromkeys(r["loader"] for r in loaders):
        rows = [r for r in loaders if r["loader"] == name and r.get("rank_rss_end_mb") is not None]
        series.append((f"{name}: rank RSS after the batches", "B", [(r["files"], r["rank_rss_end_mb"] * 2**20)
                                                                     for r in rows]))
        # anonymous: the heap's share; RSS also counts the mapped split index's and .beton's pages, page
        # cache that every rank of a node shares and the kernel can drop
        series.append((f"{name}: rank anonymous after the batches", "B",
                       [(r["files"], r["rank_anon_end_mb"] * 2**20) for r in rows]))
        series.append((f"{name}: start-up (cached)", "s", [(r["files"], r["startup_s"]) for r in rows]))
        if any(r.get("startup_first_s") is not None for r in rows):
            series.append((f"{name}: start-up (first)", "s", [(r["files"], r["startup_first_s"]) for r in rows]))
        if any(r.get("worker_uss_end_mb") is not None for r in rows):
            series.append((f"{name}: worker USS after the batches", "B",
                           [(r["files"], r["worker_uss_end_mb"] * 2**20) for r in rows]))
        if any(r.get("worker_dirty_end_mb") is not None for r in rows):
            series.append((f"{name}: worker private dirty after the batches", "B",
                           [(r["files"], r["worker_dirty_end_mb"] * 2**20) for r in rows]))
    for name in dict.fromkeys(r["converter"] for r in converters):
        rows = [r for r in converters if r["converter"] == name and r.get("wall_s") is not None]
        series.append((f"convert.py {name}: peak PSS of the tree", "B", [(r["files"], r["peak_pss_mb"] * 2**20)
                                                                          for r in rows]))
        series.append((f"convert.py {name}: peak RSS summed", "B", [(r["files"], r["peak_rss_mb"] * 2**20)
                                                                     for r in rows]))
        series.append((f"convert.py {name}: wall", "s", [(r["files"], r["wall_s"]) for r in rows]))
    rows = [r for r in train if r.get("first_step_s") is not None]
    series.append(("train.py: time to first step", "s", [(r["files"], r["first_step_s"]) for r in rows]))
    out = []
    for name, unit, points in series:
        if len(points) < 2:              # growth needs two sizes
            continue
        slope, at = extrapolate(points)
        if unit == "B":
            values = " / ".join(f"{_size(n)}: {v / 2**20:,.0f} MB" for n, v in sorted(points))
            per, target = f"{slope:,.1f} B", f"{at / 2**30:,.2f} GB"
        else:
            values = " / ".join(f"{_size(n)}: {v:,.2f} s" for n, v in sorted(points))
            per, target = f"{slope * 1e6:,.2f} us", f"{at:,.1f} s"
        out.append({"quantity": name, "values": values, "growth_per_file": per, GROWTH_COLUMNS[-1]: target,
                    "slope": slope, "extrapolated": at, "unit": unit})
    return out


# ---- one loader in a fresh interpreter ---------------------------------------------------------------

# the child's program: probe(spec) on argv[1], its row as one JSON line on stdout
PROBE = "import json, sys; from bench.scale import probe; print(json.dumps(probe(json.loads(sys.argv[1]))))"

def _mb(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def probe(spec: dict) -> dict:
    """Runs in its own process: build spec's loader, time it and its first batch, read this process's
    and its workers' memory after the first batch and after spec["batches"] batches (0: one epoch)."""
    import torch

    from masksiam.config import Config, apply
    from masksiam.dist import DistInfo
    from pipelines.loaders import build_loader
    from pipelines.loaders.split_index import locations
    from bench.meter import pick_device

    device = pick_device("auto")
    cfg = apply(Config(), {"data": spec["data"], "loader": spec["backend"], "views": 2, "size": spec["size"],
                           "batch_size": spec["batch_size"], "workers": spec["workers"], "prefetch": 2,
                           "ffcv_path": spec.get("ffcv_path", ""), "seed": 0}, "bench.py scale")
    if spec.get("cold"):                     # no split index: the loader lists the folder and writes it
        for where in locations(Path(spec["data"]) / cfg.train_split):
            where.unlink(missing_ok=True)
    base = smaps(os.getpid())
    t0 = time.perf_counter()
    loader = build_loader(cfg, DistInfo(0, 1, 0, device))
    built = time.perf_counter()
    loader.set_epoch(0)
    it = iter(loader)
    batch = next(it)
    first = time.perf_counter()
    workers = descendants(os.getpid())
    rank0 = smaps(os.getpid())
    worker0 = {pid: smaps(pid) for pid in workers}
    want = spec["batches"] or len(loader) - 1
    done, t1 = 0, time.perf_counter()
    while done < want:
        try:
            batch = next(it)
        except StopIteration:
            break
        done += 1
    t2 = time.perf_counter()
    rank1 = smaps(os.getpid())
    worker1 = {pid: smaps(pid) for pid in workers}
    del batch
    alive = [p for p in workers if worker0.get(p) and worker1.get(p)]
    n = spec["files"]
    out = {"startup_s": built - t0, "first_batch_s": first - built, "batches": done,
           "s_per_batch": (t2 - t1) / done if done else None, "len": len(loader),
           "rank_rss_base_mb": _mb(base["rss"]), "rank_rss_start_mb": _mb(rank0["rss"]),
           "rank_rss_end_mb": _mb(rank1["rss"]), "rank_anon_end_mb": _mb(rank1["anon"]),
           "rank_B_per_file": (rank1["rss"] - base["rss"]) / n, "workers": len(alive)}
    if alive:                                # each a mean over the workers; growth: of the private dirty pages
        def mean(mems, key):
            return sum(mems[p][key] for p in alive) / len(alive)
        out.update(worker_uss_start_mb=_mb(mean(worker0, "uss")), worker_uss_end_mb=_mb(mean(worker1, "uss")),
                   worker_dirty_start_mb=_mb(mean(worker0, "dirty")), worker_dirty_end_mb=_mb(mean(worker1, "dirty")),
                   worker_growth_mb=_mb(mean(worker1, "dirty") - mean(worker0, "dirty")),
                   worker_B_per_file=mean(worker1, "uss") / n,
                   worker_uss_end_mb_each=[_mb(worker1[p]["uss"]) for p in alive])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def _child_env() -> dict:
    # the child imports the repository's packages as this process does, from any working directory
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else ""


def run_probe(spec: dict) -> dict:
    """probe(spec) in a fresh interpreter; a failure becomes a note (its last stderr line)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, env=_child_env())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"note": f"failed (exit {proc.returncode}): {_last_line(proc.stderr)}"}


def run_converter(name: str, argv: list[str], files: int) -> dict:
    """convert.py with `argv` in its own process tree, its memory sampled: wall time and peaks."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "convert.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=_child_env())
    sampler = TreeSampler(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    row = {"files": files, "converter": name}
    if proc.returncode != 0:
        return {**row, "note": f"failed (exit {proc.returncode}): {_last_line(err or out)}"}
    return {**row, "wall_s": wall, "peak_rss_mb": _mb(sampler.peak_rss), "peak_pss_mb": _mb(sampler.peak_pss),
            "peak_main_rss_mb": _mb(sampler.peak_main), "processes": sampler.processes,
            "B_per_file": sampler.peak_pss / files}


def run_train(data: Path, files: int, args, out: Path) -> dict:
    """train.py on the folder with a tiny model and max_steps=1: seconds from its process start to
    the first step's log line (progress=false prints each metrics.jsonl record on stdout)."""
    runs = out / "train-runs"
    name = f"files-{files}"
    shutil.rmtree(runs / name, ignore_errors=True)
    argv = [f"data={data}", "arch=resnet18", "width=8", "stem=small", f"size={args.size}",
            f"batch_size={args.batch_size}", f"workers={args.workers}", "final_eval=false", "online_probe=false",
            "max_steps=1", "log_every=1", "ckpt_every=0", "epochs=1", "warmup_epochs=0", "progress=false",
            f"out_dir={runs}", f"run_name={name}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=_child_env())
    first = None
    for line in proc.stdout:                 # the first step's record is the first JSON line with "step"
        if first is None and line.startswith("{") and '"step"' in line:
            first = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.wait()
    total = time.perf_counter() - t0
    shutil.rmtree(runs / name, ignore_errors=True)
    row = {"files": files, "total_s": total}
    if proc.returncode != 0 or first is None:
        return {**row, "note": f"failed (exit {proc.returncode}): {_last_line(err)}"}
    return {**row, "first_step_s": first}


# ---- the mode ------------------------------------------------------------------------------------------

def earlier_copies(out: Path, files: int, converters: list[str]) -> dict[str, Path]:
    """{converter: its output} for the converters not run now whose complete output an earlier --keep
    run left under `out` for this size (webdataset: its .complete marker; ffcv: the .beton and its
    sidecar report, written before the .beton's rename)."""
    found = {}
    wds, beton = out / f"webdataset-{files}", out / f"ffcv-{files}" / "train.beton"
    if "webdataset" not in converters and (wds / ".complete").is_file():
        found["webdataset"] = wds
    if "ffcv" not in converters and beton.is_file() and beton.with_name(beton.name + ".json").is_file():
        found["ffcv"] = beton
    return found


def parse_files(text: str) -> list[int]:
    """--files 10000,100000 -> [10000, 100000]: positive integers (1e6 and 1_000_000 accepted)."""
    sizes = []
    for item in text.split(","):
        try:
            value = float(item.strip().replace("_", ""))
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value < 1 or value != int(value):
            raise UsageError(f"scale: --files {text!r}: expected positive whole numbers separated by commas, "
                             f"e.g. 10000,100000")
        sizes.append(int(value))
    return sorted(dict.fromkeys(sizes))


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in allowed:
            raise UsageError(f"scale: {flag} {n!r}: choose from {', '.join(allowed)}")
    return names


def _missing(name: str) -> str | None:
    """Why loader or converter `name` is skipped (its package is not installed), or None."""
    module = MODULES.get(name)
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:              # its parent package (nvidia) is missing
        found = False
    return None if found else f"skipped: {module} is not importable"


def _fmt(row: dict, columns: list[str]) -> dict:
    """Cells as the tables print them: seconds to 2 decimals (3 under 0.1), MB and B to 1, '-' when absent."""
    out = {}
    for c in columns:
        v = row.get(c)
        if v is None:
            out[c] = "-" if c != "note" else ""
        elif isinstance(v, float):
            out[c] = ((f"{v:.3f}" if abs(v) < 0.1 else f"{v:,.2f}") if c.endswith("_s") or c == "s_per_batch"
                      else f"{v:,.1f}")
        elif isinstance(v, int) and c == "files":
            out[c] = f"{v:,}"
        else:
            out[c] = str(v)
    return out


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r, columns)[c] for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def cmd_scale(args) -> dict:
    from bench.meter import machine
    sizes = parse_files(args.files)
    loaders = _names(args.loaders, LOADERS, "--loaders")
    converters = _names(args.converters, CONVERTERS, "--converters")
    for flag, least in (("classes", 1), ("workers", 0), ("batch_size", 1), ("size", 1)):
        if getattr(args, flag) < least:
            raise UsageError(f"scale: --{flag.replace('_', '-')} {getattr(args, flag)}: must be at least {least}")
    if args.batches < 0:
        raise UsageError(f"scale: --batches {args.batches}: 0 (one epoch) or more")
    if args.classes > sizes[0]:
        raise UsageError(f"scale: --classes {args.classes} is more than --files {sizes[0]}: a class folder "
                         f"needs an image")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loader_rows, converter_rows, train_rows, notes, datasets = [], [], [], [], []
    for n in sizes:
        root = out / f"files-{n}"
        made = build_dataset(root, n, args.classes)
        if not made["reused"]:               # an index listed within RACY_NS of a folder's change is rebuilt
            from pipelines.loaders.split_index import RACY_NS      # at its next open: let the folders age first
            time.sleep(RACY_NS / 1e9)
        datasets.append({"files": n, **made})
        print(f"[bench scale] {n:,} files in {args.classes} classes: "
              + ("reused" if made["reused"] else f"linked in {made['seconds']:.1f} s"), flush=True)
        common = {"files": n, "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
                  "batches": args.batches}
        # first start-ups (no split index) before anything else lists the folder
        first = {}
        for name in [b for b in loaders if b in ("torchvision", "dali") and not _missing(b)]:
            cold = run_probe({**common, "backend": name, "data": str(root), "cold": True, "batches": 1})
            first[name] = cold.get("startup_s")
        made_by = {}
        for conv in converters:
            if (why := _missing(conv)) is not None:
                converter_rows.append({"files": n, "converter": conv, "note": why})
                continue
            target = out / f"{conv}-{n}"
            if conv == "webdataset":
                argv = ["webdataset", "--src", str(root), "--out", str(target), "--workers", str(max(1, args.workers)),
                        "--force"]
                made_by[conv] = target
            else:
                argv = ["ffcv", "--src", str(root / "train"), "--out", str(target / "train.beton"), "--force",
                        "--no-progress"]
                made_by[conv] = target / "train.beton"
            print(f"[bench scale] {n:,} files: convert.py {conv}", flush=True)
            converter_rows.append(row := run_converter(conv, argv, n))
            if "note" in row:
                made_by.pop(conv)
        readers = {"webdataset": "dali", "ffcv": "ffcv"}          # the loader that reads each copy
        for conv, done in earlier_copies(out, n, converters).items():
            made_by[conv] = done
            if readers[conv] in loaders:
                notes.append(f"{n:,} files: {readers[conv]} reads {done}, converted by an earlier run")
        runs = []                            # (row name, backend, data, extra or the reason it is skipped)
        for name in loaders:
            if name == "torchvision":
                runs.append(("torchvision", "torchvision", root, {}))
            elif name == "dali":
                runs.append(("dali (folder)", "dali", root, {}))
                if "webdataset" in made_by:
                    runs.append(("dali (webdataset)", "dali", made_by["webdataset"], {}))
            else:
                runs.append(("ffcv", "ffcv", root, {"ffcv_path": str(made_by["ffcv"])} if "ffcv" in made_by
                             else "skipped: needs --converters ffcv"))
        for label, backend, data, extra in runs:
            why = _missing(backend) or (extra if isinstance(extra, str) else None)
            if why is not None:
                loader_rows.append({"files": n, "loader": label, "note": why})
                continue
            print(f"[bench scale] {n:,} files: loader {label}", flush=True)
            row = run_probe({**common, "backend": backend, "data": str(data), **extra})
            loader_rows.append({"files": n, "loader": label, "startup_first_s": first.get(backend)
                                if data == root else None, **row})
        if not args.no_train:
            print(f"[bench scale] {n:,} files: train.py to its first step", flush=True)
            train_rows.append(run_train(root, n, args, out))
        load = os.getloadavg()[1]            # a shared machine: say how busy it was over this size
        datasets[-1]["loadavg_5min"] = load
        notes.append(f"{n:,} files: 5-minute load average {load:.1f} on {os.cpu_count()} cores at the end"
                     + (" (contended: times are upper bounds)" if load > (os.cpu_count() or 1) else ""))
        if not args.keep:
            for path in [root, *[out / f"{c}-{n}" for c in converters]]:
                shutil.rmtree(path, ignore_errors=True)
    growth = growth_rows(loader_rows, converter_rows, train_rows) if len(sizes) > 1 else []
    if len(sizes) < 2:
        notes.append("one size: give --files A,B for the growth per file and the extrapolation")
    text = "\n\n".join(filter(None, [
        f"### loaders ({args.workers} workers, batch {args.batch_size} x 2 views @ {args.size} px, "
        f"{args.batches or 'one epoch of'} batches after the first)\n\n" + _table(loader_rows, LOADER_COLUMNS),
        "### converters\n\n" + _table(converter_rows, CONVERTER_COLUMNS) if converter_rows else "",
        "### train.py, process start to the first step's log\n\n" + _table(train_rows, TRAIN_COLUMNS)
        if train_rows else "",
        f"### growth per file (between the two largest sizes) and the extrapolation to {TARGET:,} files\n\n"
        + _table(growth, GROWTH_COLUMNS) if growth else "",
        "\n".join(f"- {n}" for n in notes)]))
    print(text)
    payload = {"mode": "scale", "machine": machine(), "args": vars(args), "datasets": datasets,
               "loaders": loader_rows, "converters": converter_rows, "train": train_rows, "growth": growth,
               "notes": notes, "table": text}
    atomic_write_text(out / "scale.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out / "scale.md", text + "\n")
    print(f"wrote {out / 'scale.json'}, {out / 'scale.md'}")
    return payload
