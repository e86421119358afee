"""convert.py photos: an ImageNet-like JPEG folder cut from the real photos of Debian packages.

    python convert.py photos --out data/photos                 # ImageNet-like JPEG folder for throughput work

One class per region of a real photo from opencv-doc, plasma-workspace-wallpapers and
mate-backgrounds. Files that are not colour photos are skipped by the rules in `photo_rejection`
(size, transparency, colourfulness, flat fills, noise floor); of near-duplicates only the largest
file is kept. Each image is a random crop of its class's region, resized to an ImageNet-like size,
flipped at random and saved as a baseline 4:2:0 JPEG at quality 90 (`sample_output_size`,
`sample_crop` give the distributions). --max-res N caps the longer side (the same crops, resized
smaller; the size rule of FFCV's converter): a folder of the images a .beton made with --max-res N
holds, for comparing loaders on the same pixels. Output folder, report and determinism:
imagefolder_build.py.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from pipelines.loaders.common import IMG_EXTENSIONS, DataError
from pipelines.tools.imagefolder_build import (SPLITS, check_output, check_quality, default_workers, fail_command,
                                               human_bytes, jpeg_bytes, run_tasks, staged_output, write_report)

# ---- photos: finding real photos -----------------------------------------------------------------

# Debian package -> where its photos are (the packages tools/install_apt.sh installs)
PHOTO_PACKAGES = {
    "opencv-doc": Path("/usr/share/doc/opencv-doc/examples"),
    "plasma-workspace-wallpapers": Path("/usr/share/wallpapers"),
    "mate-backgrounds": Path("/usr/share/backgrounds/mate"),
}
# A plasma wallpaper is a folder <name>/contents/{images,images_dark,screenshot.*} holding one artwork
# at several sizes and orientations: the folder is one source, its largest file stands for it.
GROUPED_PACKAGES = {"plasma-workspace-wallpapers"}

# The photo rule (`photo_rejection`), first failing test wins. Statistics are measured on a copy
# whose short side is ANALYSIS_SIDE px (the scale the crops are used at), except the noise floor,
# which needs native pixels. Chosen on the three packages' ~210 candidate files: every logo, line
# drawing, mask, calibration board, map screenshot, synthetic test picture and flat vector wallpaper
# is rejected; some textured digital art (plasma's Honeywave, Kokkini, Patak, Shell, SafeLanding,
# mate's Elephants and Ubuntu-Mate auroras, opencv's fuzzy/input.png) passes: statistically it is
# photographic, and a JPEG decoder treats it like a photo.
MIN_SOURCE_SIDE = 320       # short side, px: icons, crops of words, thumbnails; smaller sources
                            # would be upscaled 1.5x or more into the 333-500 px outputs
MAX_TRANSPARENT = 0.01      # fraction of pixels with alpha < 250: logos, cut-outs, overlays
MIN_COLOURFULNESS = 10.0    # Hasler-Suesstrunk M (grey 0, colour photos here 13-132): grey photos,
                            # scanned text, masks, calibration boards
MAX_FLAT = 0.20             # fraction of pixels equal to their right and lower neighbours in all three
                            # channels (photos here <= 0.17): flat fills of logos, drawings,
                            # screenshots and vector art (0.22-1.0)
NOISE_FLOOR = (0.15, 20.0)  # 10th percentile over native 16x16 blocks of the std of the Laplacian
                            # residual: sensor noise and texture remain in a photo's smoothest parts
                            # (0.16-9.2 here), rendered gradients have none (0-0.14), synthetic noise
                            # patterns far too much (44)
ANALYSIS_SIDE = 384
NOISE_STRIPS = 48           # block rows sampled for the noise floor (bounds the cost on 5K wallpapers)
# Two files are one photo (the smaller is dropped) when either holds:
SAME_STRUCTURE = 0.90       # correlation of 32x32 band-pass grey thumbnails: the same picture resized,
                            # recoloured or re-encoded (unrelated pairs here <= 0.54)
SAME_COLOURS = 0.60         # intersection of 512-bin colour histograms: the same scene from another
                            # viewpoint or exposure (stereo pairs, brackets: 0.64-0.97; unrelated <= 0.56)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True)
class Source:
    path: str
    package: str
    name: str                       # readable id: plasma folder name or file stem
    width: int                      # after EXIF orientation
    height: int
    structure: tuple[float, ...]    # 32x32 band-pass grey thumbnail, standardised (duplicates)
    colours: tuple[float, ...]      # 8x8x8-bin colour histogram, sums to 1 (duplicates)


def candidate_files(package: str, root: Path) -> list[tuple[str, str]]:
    """(path, name) of the image files under root, symlinks to the same file once, sorted.

    For a grouped package (plasma) only each folder's largest image (header size) is kept.
    """
    seen, found = set(), []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for file in sorted(files):
            path = os.path.join(folder, file)
            real = os.path.realpath(path)
            if not file.lower().endswith(IMG_EXTENSIONS) or real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            rel = Path(path).relative_to(root)
            name = rel.parts[0] if package in GROUPED_PACKAGES else rel.stem
            found.append((path, name))
    if package not in GROUPED_PACKAGES:
        return found
    largest: dict[str, tuple[int, str]] = {}
    for path, name in found:
        try:
            with Image.open(path) as img:
                pixels = img.width * img.height
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            pixels = -1
        if name not in largest or pixels > largest[name][0]:
            largest[name] = (pixels, path)
    return [(path, name) for name, (_, path) in sorted(largest.items())]


def open_oriented(path: str) -> Image.Image:
    """Decode an image, upright (EXIF orientation applied)."""
    img = Image.open(path)
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    return img


def noise_floor(grey: np.ndarray) -> float:
    """10th percentile over 16x16 blocks of the std of the 4-neighbour Laplacian residual of a
    native-resolution (H, W) grey image, on at most NOISE_STRIPS evenly spaced rows of blocks."""
    rows = (grey.shape[0] - 2) // 16
    strips = np.linspace(0, rows - 1, min(rows, NOISE_STRIPS)).round().astype(int)
    stds = []
    for r in strips:
        g = grey[16 * r:16 * r + 18]                                          # (18, W): 16 rows + border
        res = g[1:-1, 1:-1] - 0.25 * (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:])
        w = res.shape[1] // 16 * 16
        stds.append(res[:, :w].reshape(16, -1, 16).std(axis=(0, 2)))          # (W // 16,)
    return float(np.percentile(np.concatenate(stds), 10))


def analyse_photo(path: str) -> dict:
    """The statistics of the photo rule for one file (see the constants above); {"error": ...} if unreadable."""
    try:
        with Image.open(path) as header:  # size and mode alone reject many files: skip their decode
            stats = {"width": header.width, "height": header.height, "mode": header.mode}
        if min(header.size) < MIN_SOURCE_SIDE or header.mode in GREY_MODES:
            return stats  # (an EXIF rotation does not change the short side)
        img = open_oriented(path)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        return {"error": str(err)}
    stats.update(width=img.width, height=img.height)
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    stats["transparent"] = float((np.asarray(img.convert("RGBA").getchannel("A")) < 250).mean()) if has_alpha else 0.0
    rgb = img.convert("RGB")
    stats["noise_floor"] = noise_floor(np.asarray(rgb.convert("L"), np.float32))
    scale = ANALYSIS_SIDE / min(rgb.size)
    if scale < 1:
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BILINEAR)
    a = np.asarray(rgb, np.int16)                                             # (H, W, 3)
    same_right = (a[:-1, 1:] == a[:-1, :-1]).all(-1)
    same_below = (a[1:, :-1] == a[:-1, :-1]).all(-1)
    stats["flat"] = float((same_right & same_below).mean())
    r, g, b = (a[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    stats["colourfulness"] = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    # duplicate signatures: band-pass structure (thumbnail minus its blur) and colour histogram
    thumb = rgb.convert("L").resize((32, 32), Image.BOX)
    band = np.asarray(thumb, np.float64) - np.asarray(thumb.filter(ImageFilter.GaussianBlur(2)), np.float64)
    stats["structure"] = tuple(((band - band.mean()) / (band.std() + 1e-6)).ravel().round(4).tolist())
    q = np.asarray(rgb.resize((128, 128), Image.BOX)).astype(np.int64) >> 5     # (128, 128, 3) in 0..7
    hist = np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512) / q[..., 0].size
    stats["colours"] = tuple(hist.round(6).tolist())
    return stats


def photo_rejection(stats: dict) -> str | None:
    """Why a file is not used as a source photo (a short reason), or None if it is one."""
    if "error" in stats:
        return "unreadable"
    if min(stats["width"], stats["height"]) < MIN_SOURCE_SIDE:
        return "small"
    if stats["mode"] in GREY_MODES:
        return "grey"
    if stats["transparent"] > MAX_TRANSPARENT:
        return "transparent"
    if stats["colourfulness"] < MIN_COLOURFULNESS:
        return "grey"
    if stats["flat"] > MAX_FLAT:
        return "flat"
    if not NOISE_FLOOR[0] <= stats["noise_floor"] <= NOISE_FLOOR[1]:
        return "noiseless" if stats["noise_floor"] < NOISE_FLOOR[0] else "noise"
    return None


def same_photo(a: Source, b: Source) -> bool:
    structure = float(np.mean(np.asarray(a.structure) * np.asarray(b.structure)))
    colours = float(np.minimum(np.asarray(a.colours), np.asarray(b.colours)).sum())
    return structure >= SAME_STRUCTURE or colours >= SAME_COLOURS


def dedupe(sources: list[Source]) -> tuple[list[Source], list[tuple[Source, Source]]]:
    """Drop near-duplicates, keeping the larger image: -> (kept, [(dropped, kept instead)])."""
    kept, dropped = [], []
    for s in sorted(sources, key=lambda s: (-s.width * s.height, s.package, s.path)):
        twin = next((k for k in kept if same_photo(s, k)), None)
        (dropped.append((s, twin)) if twin else kept.append(s))
    return sorted(kept, key=lambda s: (s.package, s.path)), dropped


_ANALYSES: dict[tuple, dict] = {}  # (real path, size, mtime) -> analyse_photo's result


def _analyse_task(item) -> tuple[int, dict]:
    return 1, analyse_photo(item[0])


def find_sources(packages: dict[str, Path], workers: int) -> tuple[list[Source], dict]:
    """The usable photos of `packages` (name -> folder), and per package {files, accepted, rejected: {reason: n}}."""
    items = []
    for package, root in packages.items():
        if not Path(root).is_dir():
            raise DataError(f"photo folder {root} is missing: install Debian's {package} "
                            f"(`sudo apt-get install {package}`, or `make install`), or leave it out "
                            f"with --packages")
        items += [(path, name, package) for path, name in candidate_files(package, Path(root))]
    # analyses are remembered per file version for the life of the process (tests build twice)
    keys = [(os.path.realpath(path), os.stat(path).st_size, os.stat(path).st_mtime_ns) for path, _, _ in items]
    todo = [i for i, key in enumerate(keys) if key not in _ANALYSES]
    for i, st in zip(todo, run_tasks(_analyse_task, [items[i] for i in todo], workers, len(todo),
                                     "photos: scanning sources")):
        _ANALYSES[keys[i]] = st
    stats = [_ANALYSES[key] for key in keys]
    summary = {p: {"files": 0, "accepted": 0, "rejected": {}} for p in packages}
    accepted = []
    for (path, name, package), st in zip(items, stats):
        summary[package]["files"] += 1
        reason = photo_rejection(st)
        if reason:
            summary[package]["rejected"][reason] = summary[package]["rejected"].get(reason, 0) + 1
        else:
            accepted.append(Source(path, package, name, st["width"], st["height"], st["structure"], st["colours"]))
    kept, dropped = dedupe(accepted)
    for s, _ in dropped:
        summary[s.package]["rejected"]["duplicate"] = summary[s.package]["rejected"].get("duplicate", 0) + 1
    for s in kept:
        summary[s.package]["accepted"] += 1
    return kept, summary


# ---- photos: classes and images ------------------------------------------------------------------

MIN_REGION_SIDE = 640       # a photo is halved into more classes only while halves keep this short side
WORK_SIDE = 800             # each class region is resized once to at most this short side (a quarter-
                            # area crop is then >= 400 px, about the output size: little upscaling)
CROP_AREA = (0.25, 1.0)     # crop area, as a fraction of the largest crop of the output's aspect ratio
FULL_SIZE_PROB = 0.6        # ImageNet's web images mostly have a 500 px long side...
LONG_SIDE_RANGE = (200, 500)  # ...the rest are smaller
ASPECTS = ((4 / 3, 0.55), (3 / 2, 0.25), (5 / 4, 0.10), (1.0, 0.10))  # long / short side, probability
PORTRAIT_PROB = 0.25
PHOTO_QUALITY = 90          # about ImageNet's typical JPEG quality
SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Region:
    source: Source
    box: tuple[int, int, int, int]   # left, top, right, bottom in the (EXIF-oriented) source
    part: str = ""                   # "" for a whole photo, else e.g. "2of4"

    @property
    def short_side(self) -> int:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def long_side(self) -> int:
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def _halves(region: Region) -> tuple[Region, Region]:
    left, top, right, bottom = region.box
    if right - left >= bottom - top:
        mid = (left + right) // 2
        boxes = (left, top, mid, bottom), (mid, top, right, bottom)
    else:
        mid = (top + bottom) // 2
        boxes = (left, top, right, mid), (left, mid, right, bottom)
    return Region(region.source, boxes[0]), Region(region.source, boxes[1])


def plan_regions(sources: list[Source], classes: int, seed: int) -> list[Region]:
    """One region per class, in class order.

    Fewer classes than photos: a seeded choice of whole photos. More: every photo, and then regions
    are halved along their long side while the halves keep a short side of MIN_REGION_SIDE px,
    round-robin over photos (the photo cut into the fewest parts first, then the largest region),
    so that the extra classes spread over many photos. Halves are disjoint: distinct content,
    related look.
    """
    if classes < 1:
        raise DataError(f"--classes must be >= 1, got {classes}")
    if not sources:
        raise DataError("no usable source photos were found")
    if classes <= len(sources):
        pick = np.sort(np.random.default_rng([seed, 0xC1A55]).choice(len(sources), classes, replace=False))
        return [Region(sources[i], (0, 0, sources[i].width, sources[i].height)) for i in pick]
    regions = [Region(s, (0, 0, s.width, s.height)) for s in sources]
    parts = {s.path: 1 for s in sources}
    while len(regions) < classes:
        splittable = [i for i, r in enumerate(regions) if min(r.short_side, r.long_side // 2) >= MIN_REGION_SIDE]
        if not splittable:
            raise DataError(f"--classes {classes}: {len(sources)} source photos give at most "
                            f"{len(regions)} regions with a short side >= {MIN_REGION_SIDE} px; "
                            f"ask for fewer classes")
        i = max(splittable, key=lambda j: (-parts[regions[j].source.path], regions[j].area))
        parts[regions[i].source.path] += 1
        regions[i:i + 1] = _halves(regions[i])
    # parts of one photo stay together, in reading order, named "kofn"
    order = {s.path: i for i, s in enumerate(sources)}
    regions.sort(key=lambda r: (order[r.source.path], r.box[1], r.box[0]))
    total = {path: n for path, n in parts.items() if n > 1}
    seen: dict[str, int] = {}
    for i, r in enumerate(regions):
        if r.source.path in total:
            seen[r.source.path] = seen.get(r.source.path, 0) + 1
            regions[i] = Region(r.source, r.box, f"{seen[r.source.path]}of{total[r.source.path]}")
    return regions


def class_name(index: int, region: Region) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", region.source.name).strip("-") or "photo"
    return f"{index:03d}_{slug}" + (f"_{region.part}" if region.part else "")


def sample_output_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) like ImageNet train: mostly 500x375 / 500x333 / 375x500, mean about 410x360.

    Long side 500 px with probability 0.6, else uniform in [200, 500); long/short aspect 4:3, 3:2,
    5:4 or 1:1 (0.55 / 0.25 / 0.10 / 0.10); portrait with probability 0.25.
    """
    long = 500 if rng.random() < FULL_SIZE_PROB else int(rng.integers(*LONG_SIDE_RANGE))
    aspect = ASPECTS[rng.choice(len(ASPECTS), p=[p for _, p in ASPECTS])][0]
    short = int(round(long / aspect))
    return (short, long) if rng.random() < PORTRAIT_PROB else (long, short)


def sample_crop(width: int, height: int, aspect: float, rng: np.random.Generator) -> tuple[float, ...]:
    """(left, top, right, bottom): the largest crop of `aspect` (w/h) that fits, scaled to an area
    fraction uniform in CROP_AREA, at a uniform position. Same aspect as the output: no distortion."""
    if width / height > aspect:
        cw, ch = height * aspect, float(height)
    else:
        cw, ch = float(width), width / aspect
    s = math.sqrt(rng.uniform(*CROP_AREA))
    cw, ch = cw * s, ch * s
    left, top = rng.uniform(0, width - cw), rng.uniform(0, height - ch)
    return left, top, left + cw, top + ch


def capped_output_size(width: int, height: int, max_res: int) -> tuple[int, int]:
    """(width, height) with the longer side capped at max_res (0: unchanged), truncated to whole
    pixels as FFCV's converter does (pipelines/ffcv_convert.capped_size), so that its --max-res
    leaves these images as they are."""
    ratio = max_res / max(width, height) if max_res > 0 else 1.0
    if ratio >= 1:
        return width, height
    return max(1, int(ratio * width)), max(1, int(ratio * height))


def _work_image(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The class region, resized once so its short side is at most WORK_SIDE."""
    region = img.crop(box)
    scale = WORK_SIDE / min(region.size)
    if scale < 1:
        size = (max(1, round(region.width * scale)), max(1, round(region.height * scale)))
        region = region.resize(size, Image.LANCZOS, reducing_gap=3.0)
    return region


def _build_photo_task(task) -> tuple[int, list[dict]]:
    """All classes cut from one source photo: -> (images written, per-class stats)."""
    path, classes, counts, seed, quality, max_res, root = task
    try:
        img = open_oriented(path).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode source photo {path} (it was readable during the scan): {err}") from err
    stats = []
    for index, name, box in classes:
        work = _work_image(img, box)
        for split, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            nbytes = widths = heights = 0
            for i in range(n):
                rng = np.random.default_rng([seed, index, SPLIT_IDS[split], i])
                w, h = sample_output_size(rng)
                box = sample_crop(work.width, work.height, w / h, rng)
                w, h = capped_output_size(w, h, max_res)     # after the draws: the same crops
                crop = work.resize((w, h), Image.LANCZOS, box=box)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                data = jpeg_bytes(crop, quality)
                (folder / f"{i:05d}.jpg").write_bytes(data)
                nbytes, widths, heights = nbytes + len(data), widths + w, heights + h
            stats.append({"index": index, "split": split, "images": n, "bytes": nbytes,
                          "width_sum": widths, "height_sum": heights})
    return sum(counts.values()) * len(classes), stats


def build_photos(out: str | Path, *, classes: int = 100, train_per_class: int = 100, val_per_class: int = 10,
                 seed: int = 0, quality: int = PHOTO_QUALITY, max_res: int = 0, force: bool = False,
                 workers: int | None = None, packages: dict[str, Path] | None = None) -> dict:
    """Write OUT/{train,val}/<class>/<index>.jpg from the packages' photos; return the report."""
    workers = default_workers() if workers is None else workers
    packages = dict(PHOTO_PACKAGES) if packages is None else packages
    if train_per_class < 1 or val_per_class < 0:
        raise DataError(f"--train-per-class must be >= 1 and --val-per-class >= 0 "
                        f"(got {train_per_class}, {val_per_class})")
    if max_res < 0:
        raise DataError(f"--max-res must be >= 0 (0: no cap), got {max_res}")
    check_quality(quality)
    check_output(Path(out).absolute(), force)  # before the scan: refuse early
    sources, summary = find_sources(packages, workers)
    regions = plan_regions(sources, classes, seed)
    names = [class_name(i, r) for i, r in enumerate(regions)]
    counts = {"train": train_per_class, "val": val_per_class}
    by_photo: dict[str, list] = {}
    for i, (name, r) in enumerate(zip(names, regions)):
        by_photo.setdefault(r.source.path, []).append((i, name, r.box))
    with staged_output(out, force) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        # biggest jobs first so that the pool's last tasks are short ones
        tasks = sorted(((p, c, counts, seed, quality, max_res, tmp) for p, c in by_photo.items()),
                       key=lambda t: (-len(t[1]), t[0]))
        results = [s for stats in run_tasks(_build_photo_task, tasks, workers,
                                            classes * sum(counts.values()), "photos: writing")
                   for s in stats]
        report = {"dataset": "photos", "seed": seed, "quality": quality, "max_res": max_res, "classes": classes,
                  "train_per_class": train_per_class, "val_per_class": val_per_class,
                  "sources": {p: s["accepted"] for p, s in summary.items()},
                  "source_scan": summary, "splits": {},
                  "class_sources": {n: f"{r.source.path}#{','.join(map(str, r.box))}"
                                    for n, r in zip(names, regions)}}
        for split in SPLITS:
            rows = [s for s in results if s["split"] == split]
            n = sum(s["images"] for s in rows)
            report["splits"][split] = {
                "images": n, "bytes": sum(s["bytes"] for s in rows),
                "mean_width": round(sum(s["width_sum"] for s in rows) / max(1, n), 1),
                "mean_height": round(sum(s["height_sum"] for s in rows) / max(1, n), 1)}
        n = sum(s["images"] for s in results)
        report["images"] = n
        report["bytes"] = sum(s["bytes"] for s in results)
        report["mean_bytes"] = round(report["bytes"] / max(1, n), 1)
        report["mean_width"] = round(sum(s["width_sum"] for s in results) / max(1, n), 1)
        report["mean_height"] = round(sum(s["height_sum"] for s in results) / max(1, n), 1)
        write_report(tmp, report)
    return report


def _photos_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder (ImageFolder: OUT/train, OUT/val)")
    p.add_argument("--classes", type=int, default=100, help="number of classes (default 100)")
    p.add_argument("--train-per-class", type=int, default=100, help="train images per class (default 100)")
    p.add_argument("--val-per-class", type=int, default=10, help="val images per class (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--quality", type=int, default=PHOTO_QUALITY, help=f"JPEG quality (default {PHOTO_QUALITY})")
    p.add_argument("--max-res", type=int, default=0,
                   help="cap the longer side at N px, as `convert.py ffcv --max-res N` does (default 0: no cap)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, at most 8)")
    p.add_argument("--packages", default=",".join(PHOTO_PACKAGES),
                   help=f"comma-separated source packages (default: {','.join(PHOTO_PACKAGES)})")


def _photos_run(args) -> int:
    start = time.perf_counter()
    try:
        wanted = [p.strip() for p in args.packages.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in PHOTO_PACKAGES]
        if unknown or not wanted:
            raise DataError(f"--packages: unknown {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(PHOTO_PACKAGES)}")
        report = build_photos(args.out, classes=args.classes, train_per_class=args.train_per_class,
                              val_per_class=args.val_per_class, seed=args.seed, quality=args.quality,
                              max_res=args.max_res, force=args.force, workers=args.workers,
                              packages={p: PHOTO_PACKAGES[p] for p in wanted})
    except DataError as err:
        return fail_command("photos", err)
    for package, s in report["source_scan"].items():
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected"].items())) or "none"
        print(f"{package}: {s['accepted']} source photos of {s['files']} files (rejected: {rejected})")
    for split, s in report["splits"].items():
        print(f"{split}: {s['images']} images, {human_bytes(s['bytes'])}, "
              f"mean {s['bytes'] / max(1, s['images']) / 1000:.1f} KB, {s['mean_width']:.0f}x{s['mean_height']:.0f}")
    print(f"wrote {args.out}: {report['classes']} classes, {report['images']} images, "
          f"{human_bytes(report['bytes'])}, mean {report['mean_bytes'] / 1000:.1f} KB/image, "
          f"mean {report['mean_width']:.0f}x{report['mean_height']:.0f}, {time.perf_counter() - start:.1f} s")
    return 0


COMMANDS = {
    "photos": ("an ImageNet-like JPEG folder cut from the real photos of Debian packages",
               _photos_arguments, _photos_run),
}
