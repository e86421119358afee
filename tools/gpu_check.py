"""The Python side of tools/gpu_check.sh: the preflight, the check's JPEG folder, and the summary.

    python3 tools/gpu_check.py preflight WORK        # line 1: which modules import; WORK/env.json, have.sh
    python3 tools/gpu_check.py photos --out DIR      # real photos (convert.py photos), else synthetic JPEGs
    python3 tools/gpu_check.py summary WORK DEST DRY BUDGET SECONDS   # DEST/gpu_check.{md,json}, mode files

Build the photo set a GPU machine carries (it has no Debian photo packages) here, once:

    python tools/gpu_check.py photos --out data/gpu_check_photos --real-only

Nothing but the standard library is imported at module level: the preflight is what finds out whether
the rest (torch, masksiam, ...) imports on a bare machine, and it must not die of what it checks.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:           # run as tools/gpu_check.py: masksiam, pipelines, bench from the repo
    sys.path.insert(0, str(ROOT))


@functools.lru_cache(maxsize=None)
def _io():
    """masksiam/io.py loaded on its own: its atomic writes without importing the masksiam package,
    which imports torch (the preflight and a summary on a machine whose torch is broken still write)."""
    spec = importlib.util.spec_from_file_location("_gpu_check_io", ROOT / "masksiam" / "io.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- preflight ------------------------------------------------------------------------------------

# What every step needs first (a preflight cut short by its limit has checked those, and written the
# environment), the optional loader libraries (FFCV needs numba and cv2) last. masksiam before
# torchvision: masksiam.compat makes a CUDA-built torchvision importable beside a CPU torch.
CORE = ("torch", "masksiam", "torchvision")
MODULES = CORE + ("numpy", "PIL", "yaml", "tqdm", "psutil", "pytest", "skimage", "matplotlib", "nvidia.dali",
                  "ffcv", "numba", "cv2")

def shell_name(module: str) -> str:
    """HAVE_<name> in have.sh: nvidia.dali -> nvidia_dali."""
    return module.replace(".", "_")


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return type(err).__name__ + (f": {text[0][:120]}" if text else "")


def _write_progress(work: Path, found: dict[str, str | None], versions: dict[str, str]) -> None:
    """After each import: have.sh, sourced by the script (HAVE_x=1|0 and WHY_x, the import error), and
    preflight.txt, the line saying what imports. If an import kills or hangs the process, both still
    hold the modules checked before it."""
    lines = []
    for name, why in found.items():
        lines.append(f"HAVE_{shell_name(name)}={0 if why else 1}")
        if why:
            lines.append(f"WHY_{shell_name(name)}={shlex.quote(why)}")
    io = _io()
    io.atomic_write_text(work / "have.sh", "\n".join(lines) + "\n")
    ok = [f"{n} {versions[n]}".strip() for n in found if found[n] is None]
    missing = [f"{n} ({found[n].split(':')[0]})" for n in found if found[n] is not None]
    unchecked = [n for n in MODULES if n not in found]
    io.atomic_write_text(work / "preflight.txt", f"[gpu_check] preflight: imports {', '.join(ok) or 'nothing'}; "
                         + (f"does not import {', '.join(missing)}" if missing else "nothing missing")
                         + (f"; not checked (the preflight stopped): {', '.join(unchecked)}" if unchecked else "")
                         + "\n")


def _environment(found: dict[str, str | None]) -> dict:
    env = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
           "cpus": len(os.sched_getaffinity(0)), "imports": {k: v or "ok" for k, v in found.items()}}
    if found.get("torch") is None:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        try:
            env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
            if torch.cuda.is_available():
                p = torch.cuda.get_device_properties(0)
                env.update(gpu=p.name, gpus=torch.cuda.device_count(), gpu_memory_gb=round(p.total_memory / 2**30, 1),
                           capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported())
        except Exception as err:                       # a broken driver: say so, the steps will too
            env["cuda_error"] = _reason(err)
    if found.get("torchvision") is None:
        import torchvision
        from masksiam import compat
        env["torchvision"] = torchvision.__version__
        # False: the CPU-torch shim of masksiam/compat.py is in use (no CUDA torchvision ops)
        env["torchvision_extension"] = compat.TORCHVISION_EXTENSION_OK
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            env["nvidia_smi"] = _reason(err)
    return env


def _write_environment(work: Path, found: dict[str, str | None]) -> None:
    try:
        env = _environment(found)
    except Exception as err:                            # the machine's details are best effort
        env = {"python": platform.python_version(), "environment_error": _reason(err),
               "imports": {k: v or "ok" for k, v in found.items()}}
    _io().atomic_write_text(work / "env.json", json.dumps(env, indent=2) + "\n")


def preflight(work: Path) -> int:
    """Import every module of MODULES (each failure caught and named), print the line saying which
    import and which do not (WORK/preflight.txt), then write WORK/env.json (the machine, torch, CUDA,
    the GPU)."""
    work.mkdir(parents=True, exist_ok=True)
    found: dict[str, str | None] = {}
    versions: dict[str, str] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            found[name] = None
            versions[name] = str(getattr(module, "__version__", "") or "")
        except (Exception, SystemExit) as err:          # a module may exit or raise anything while importing
            found[name] = _reason(err)
        _write_progress(work, found, versions)
        if name == CORE[-1] or name == MODULES[-1]:     # the machine as soon as torch is known, then again
            _write_environment(work, found)
    print((work / "preflight.txt").read_text(), end="", flush=True)
    print((work / "env.json").read_text(), end="")
    return 0


# ---- the check's JPEG folder ----------------------------------------------------------------------

# The check's photo set: convert.py photos' arguments (2,100 JPEGs, ~34 MB) and the dry run's
PRESETS = {"gpu": {"classes": 20, "train_per_class": 100, "val_per_class": 5, "max_res": 256},
           "dry": {"classes": 2, "train_per_class": 8, "val_per_class": 2, "max_res": 96}}
MAX_MB = 48     # the carried folder travels with the working tree, 64 MiB together


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.jpg"))


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def build_real(out: Path, preset: dict, photo_root: Path, timeout_s: int, workers: int) -> dict:
    """convert.py photos (pipelines.tools.photos.build_photos) with the preset's arguments, from
    those of its Debian packages whose folders are under photo_root ("/": where they install). Raises
    DataError (no usable photos) or _Timeout after timeout_s (the staged folder is removed)."""
    from pipelines.tools import photos
    packages = {name: photo_root / path.relative_to("/") for name, path in photos.PHOTO_PACKAGES.items()}
    # the packages that are there; with none, all of them, so that the error names what to install
    packages = {name: path for name, path in packages.items() if path.is_dir()} or packages
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, timeout_s))
    try:
        return photos.build_photos(out, seed=0, workers=workers, packages=packages, **preset)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _synthetic_class_task(task) -> tuple[int, dict]:
    """One class of the synthetic folder: smooth colour fields (low-resolution noise upsampled, the
    class's tint, grain so that the JPEGs carry photo-like entropy) at ImageNet-like sizes."""
    import numpy as np
    from PIL import Image
    from masksiam.io import atomic_write
    from pipelines.tools import imagefolder_build, photos
    index, counts, seed, quality, max_res, root = task
    tint = np.random.default_rng([seed, index]).uniform(40, 215, 3)
    nbytes = images = 0
    for split, n in counts.items():
        folder = root / split / f"{index:03d}_synthetic"
        for i in range(n):
            rng = np.random.default_rng([seed, index, photos.SPLIT_IDS[split], i])
            w, h = photos.capped_output_size(*photos.sample_output_size(rng), max_res)
            cells = rng.integers(4, 17)
            low = Image.fromarray(rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8))
            field = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.float32)
            pixels = 0.6 * field + 0.4 * tint + rng.normal(0, 6, (h, w, 1))
            data = imagefolder_build.jpeg_bytes(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), quality)
            atomic_write(folder / f"{i:05d}.jpg", lambda f, d=data: f.write(d))
            nbytes, images = nbytes + len(data), images + 1
    return images, {"images": images, "bytes": nbytes}


def build_synthetic(out: Path, preset: dict, why: str, workers: int, seed: int = 0) -> dict:
    """OUT/{train,val}/<class>/<i>.jpg drawn with Pillow (no source photos needed), the preset's counts
    and size cap; OUT/.complete says it is synthetic and why."""
    from pipelines.tools import imagefolder_build, photos
    counts = {"train": preset["train_per_class"], "val": preset["val_per_class"]}
    with imagefolder_build.staged_output(out, force=False) as tmp:
        tasks = [(c, counts, seed, photos.PHOTO_QUALITY, preset["max_res"], tmp) for c in range(preset["classes"])]
        stats = imagefolder_build.run_tasks(_synthetic_class_task, tasks, workers,
                                            preset["classes"] * sum(counts.values()), "photos: synthetic")
        report = {"dataset": "synthetic-jpeg", "why": why, "seed": seed, **preset,
                  "images": sum(s["images"] for s in stats), "bytes": sum(s["bytes"] for s in stats)}
        imagefolder_build.write_report(tmp, report)
    return report


def photos(args) -> int:
    from masksiam.errors import UserError
    out = Path(args.out)
    if (out / "train").is_dir() and any((out / "train").iterdir()):
        print(f"[gpu_check] photos: {out} is there ({_folder_bytes(out) / 2**20:.1f} MiB of JPEGs)")
        return 0
    preset = PRESETS[args.preset]
    workers = args.workers or min(16, len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    try:
        report = build_real(out, preset, Path(args.photo_root), args.real_timeout_s, workers)
        kind = "real photos (convert.py photos)"
    except Exception as err:
        from pipelines.loaders.common import DataError
        if not isinstance(err, (DataError, _Timeout)):
            raise
        why = (f"convert.py photos took over {args.real_timeout_s} s" if isinstance(err, _Timeout)
               else f"convert.py photos failed: {err}")
        if args.real_only:
            raise UserError(f"{out}: {why}") from None
        report = build_synthetic(out, preset, why, workers)
        kind = f"synthetic JPEGs ({why})"
    mib = _folder_bytes(out) / 2**20
    if mib > args.max_mb:
        raise UserError(f"{out}: {mib:.1f} MiB of JPEGs, over the --max-mb {args.max_mb} that can be carried")
    print(f"[gpu_check] photos: {out}: {report['images']} {kind}, {mib:.1f} MiB, {time.perf_counter() - start:.1f} s")
    return 0


# ---- summary ---------------------------------------------------------------------------------------

MODES = ("augment", "model", "train", "syncs")
COLUMNS = {"augment": ["label", "views_per_image", "views_per_s", "ratio", "mb_per_view", "s_per_batch_p50",
                       "startup_s", "augment_gpu_mb_per_image", "peak_gpu_mb", "peak_gpu_device_mb"],
           "model": ["label", "arch", "batch_size", "images_per_s", "ratio", "s_per_batch_p50", "startup_s",
                     "peak_gpu_mb", "peak_gpu_device_mb"],
           "train": ["label", "recipe", "batch_size", "images_per_s", "ratio", "efficiency", "data_wait",
                     "s_per_batch_p50", "startup_s", "cpu_percent", "peak_gpu_mb", "peak_gpu_device_mb"]}


def _payloads(work: Path) -> dict[str, dict]:
    """One bench.py payload per mode: the rows of its steps' JSON files (WORK/MODE/STEP.json) in the
    order the steps ran, labelled for the README by the step that measured them."""
    order = {name: i for i, name in enumerate((work / "order.txt").read_text().split())} \
        if (work / "order.txt").exists() else {}
    payloads = {}
    for mode in MODES:
        files = sorted((work / mode).glob("*.json"), key=lambda p: order.get(p.stem, len(order))) \
            if (work / mode).is_dir() else []
        parts = []
        for path in files:
            part = json.loads(path.read_text())
            what = path.stem.split("-", 1)[1]          # train-simclr -> simclr, syncs-byol-mixmask -> byol-mixmask
            for r in part["results"]:
                if mode == "augment":
                    r["label"] = f"{r['recipe']}{' compiled' if r.get('compile') else ''}"
                elif mode == "syncs":
                    r["label"] = what.replace("-", " + ")
                elif mode == "train":               # one step per method's config
                    r["label"] = f"{what}: {r['label']}"
                    r["method"] = what
                elif mode == "model" and r["label"] == "model-only":   # one --config: bench names no config
                    r["label"] = f"model-only {Path(part['args'].get('config') or 'model').stem}"
                if str(r.get("recipe", "")).endswith(".yaml"):   # a model-only twin, written in WORK
                    r["recipe"] = Path(r["recipe"]).stem
            parts.append(part)
        if parts:
            payloads[mode] = {**parts[0], "results": [r for p in parts for r in p["results"]]}
    return payloads


def _data_line(work: Path) -> str:
    """What the end-to-end rows read: the JPEG folder, real photos or the synthetic stand-in (its report)."""
    data = Path((work / "data.txt").read_text().strip()) if (work / "data.txt").exists() else None
    if data is None:
        return "Data: unknown."
    report = json.loads((data / ".complete").read_text()) if (data / ".complete").exists() else {}
    kind = {"photos": "real photos (convert.py photos)",
            "synthetic-jpeg": f"synthetic JPEGs ({report.get('why', '')})"}.get(report.get("dataset"), "an ImageFolder")
    size = f", {report['images']} images, {report['bytes'] / 2**20:.1f} MiB" if "images" in report and "bytes" in report else ""
    return f"Data: {data}: {kind}{size}."


def summary(work: Path, dest: Path, dry: bool, budget: int, took: int) -> int:
    """DEST/gpu_check.md and .json, and per mode bench.py's payload (augment/model/train.json, what
    `bench.py readme` reads) and a chart: at most 8 files with gpu_check.log."""
    io = _io()
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    first = (work / "preflight.txt").read_text().strip() if (work / "preflight.txt").exists() else ""
    steps = [dict(zip(("step", "exit", "seconds", "limit", "note"), line.split("\t")))
             for line in (work / "steps.tsv").read_text().splitlines()] if (work / "steps.tsv").exists() else []
    try:
        import bench
    except Exception as err:            # no tables or charts, still the steps and the environment
        bench, payloads = None, {}
        first += f"\n\nbench.py does not import ({_reason(err)}): no tables or charts."
    else:
        payloads = _payloads(work)
    md = [f"# tools/gpu_check.sh{' --dry-run (CPU, tiny sizes: not a measurement)' if dry else ''}", "", first, "",
          _data_line(work), "", f"{took} s of a {budget} s budget." + (" The compiled augment rows ran with torch.compile disabled "
                                                "(TORCHDYNAMO_DISABLE=1)." if dry else ""),
          "", "## Environment", "", "```", json.dumps(env, indent=1), "```", "",
          "## Steps", "", "| step | exit | seconds | limit | note |", "|---|---|---|---|---|"]
    md += [f"| {s['step']} | {s['exit']} | {s['seconds']} | {s.get('limit', '')} | {s.get('note', '')} |" for s in steps]
    for mode in ("augment", "model", "train"):
        if mode not in payloads:
            md += ["", f"## {mode}", "", "no results (see the steps above and gpu_check.log)"]
            continue
        rows = payloads[mode]["results"]
        rate = "views_per_s" if mode == "augment" else "images_per_s"
        for r in rows:
            r["ratio"] = r[rate] / rows[0][rate]
        table = bench.print_table(rows, [c for c in COLUMNS[mode] if any(c in r for r in rows)])
        payloads[mode]["table"] = table
        md += ["", f"## {mode}", "", table]
        io.atomic_write_text(dest / f"{mode}.json", json.dumps(payloads[mode], indent=2) + "\n")
        try:
            if mode == "augment":
                bench.chart([(r["label"], r["views_per_s"], f"x{r['ratio']:.2f}", bench.BLUE) for r in rows],
                             dest / "augment.png", "gpu_check: augment stage", "views / s")
            if mode == "train":
                bars = [(r["label"], r["images_per_s"], f"{r['efficiency']:.2f} of model-only" if "efficiency" in r
                         else "", bench.GREY if "model-only" in r["label"] else bench.BLUE)
                        for r in rows + payloads.get("model", {}).get("results", [])]
                bench.chart(bars, dest / "train.png", "gpu_check: end to end and model-only", "images / s")
        except Exception as err:        # matplotlib missing: the tables stand without the charts
            md += ["", f"(no chart: {_reason(err)})"]
    md += ["", "## Host syncs in the step path", ""]
    for r in payloads.get("syncs", {}).get("results", []):
        md.append(f"- {r['label']}, {r['device']} ({r['guard']}): " + ("none" if r["ok"] else f"FOUND: {r['error']} at "
                  + " <- ".join(reversed(r["where"]))) + f" ({r['guarded_calls']})")
    result = {"dry_run": dry, "seconds": took, "budget_s": budget, "preflight": first.splitlines()[0] if first else "",
              "environment": env, "steps": steps, "results": {m: p["results"] for m, p in payloads.items()}}
    io.atomic_write_text(dest / "gpu_check.json", json.dumps(result, indent=2) + "\n")
    io.atomic_write_text(dest / "gpu_check.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("preflight", help="which modules import, and the machine (WORK/env.json, have.sh)")
    s.add_argument("work", type=Path)
    s = sub.add_parser("photos", help="the check's JPEG folder: real photos, else synthetic JPEGs")
    s.add_argument("--out", required=True)
    s.add_argument("--preset", choices=sorted(PRESETS), default="gpu",
                   help="gpu: " + ", ".join(f"{k} {v}" for k, v in PRESETS["gpu"].items()) + " (default); dry: tiny")
    s.add_argument("--photo-root", default="/", help="where the Debian photo packages' folders are (default /)")
    s.add_argument("--real-timeout-s", type=int, default=60, help="then synthetic JPEGs (default 60)")
    s.add_argument("--real-only", action="store_true", help="fail instead of writing synthetic JPEGs")
    s.add_argument("--max-mb", type=float, default=MAX_MB, help=f"fail over this many MiB (default {MAX_MB})")
    s.add_argument("--workers", type=int, default=0, help="processes (default: CPUs, at most 16)")
    s = sub.add_parser("summary", help="gpu_check.md / .json and bench.py's mode files from WORK into DEST")
    s.add_argument("work", type=Path)
    s.add_argument("dest", type=Path)
    s.add_argument("dry", type=int)
    s.add_argument("budget", type=int)
    s.add_argument("took", type=int)
    args = p.parse_args(argv)
    if args.cmd == "preflight":
        return preflight(args.work)
    if args.cmd == "summary":
        return summary(args.work, args.dest, bool(args.dry), args.budget, args.took)
    from masksiam.errors import exit_on_user_error
    return exit_on_user_error("tools/gpu_check.py photos", photos, args)


if __name__ == "__main__":
    sys.exit(main())
