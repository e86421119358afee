"""convert.py fashion-mnist / photos (pipelines/tools/fashion_mnist.py, photos.py, imagefolder_build.py):
counts, labels, pixels, sizes, distinct classes, determinism, refusal to overwrite, atomic output, and
the photo rule on known files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, JpegImagePlugin

import convert
from pipelines.tools import fashion_mnist as FM
from pipelines.tools import imagefolder_build as B
from pipelines.tools import photos as P
from pipelines.loaders.common import DataError

FMNIST_PRESENT = all((FM.FASHION_MNIST_DIR / name).is_file()
                     for pair in FM.FASHION_MNIST_FILES.values() for name in pair)
needs_fmnist = pytest.mark.skipif(not FMNIST_PRESENT, reason="Debian's dataset-fashion-mnist is not installed")
needs_opencv_doc = pytest.mark.skipif(not P.PHOTO_PACKAGES["opencv-doc"].is_dir(),
                                      reason="Debian's opencv-doc is not installed")

FM_LIMIT = 60
# the photo tests use opencv-doc alone: its ~150 files scan in seconds (the wallpapers take ~30 s)
PHOTO_ARGS = ["--packages", "opencv-doc", "--classes", "5", "--train-per-class", "8",
              "--val-per-class", "4", "--seed", "3"]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included), relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def images_of(root: Path, split: str) -> dict[str, list[Path]]:
    return {c.name: sorted(c.iterdir()) for c in sorted((root / split).iterdir())}


# ---- fashion-mnist --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmnist") / "fashion-mnist"
    assert convert.main(["fashion-mnist", "--out", str(out), "--limit", str(FM_LIMIT), "--workers", "2"]) == 0
    return out


@needs_fmnist
def test_fmnist_layout_counts_and_labels(fmnist):
    for split in B.SPLITS:
        _, labels = FM.load_fashion_mnist(split)
        labels = labels[:FM_LIMIT]
        folders = images_of(fmnist, split)
        # sorted folder names are the label ids, as ImageFolder assigns them
        assert list(folders) == list(FM.FASHION_MNIST_CLASSES)
        assert [len(files) for files in folders.values()] == np.bincount(labels, minlength=10).tolist()
        seen = []
        for label, files in enumerate(folders.values()):
            for f in files:
                index = int(f.stem)
                assert labels[index] == label, f"{f}: idx label {labels[index]}"
                seen.append(index)
        assert sorted(seen) == list(range(FM_LIMIT))


@needs_fmnist
def test_fmnist_pixels_equal_idx_within_jpeg_tolerance(fmnist):
    """Quality 100: every pixel within 2 levels of the idx file (measured on all 70,000: max 2,
    mean 0.059), mean error below 0.1 level."""
    errors = []
    for split in B.SPLITS:
        images, labels = FM.load_fashion_mnist(split)
        for index in range(FM_LIMIT):
            path = fmnist / split / FM.FASHION_MNIST_CLASSES[labels[index]] / f"{index:05d}.jpg"
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.mode == "L" and img.size == (28, 28)
                decoded = np.asarray(img, np.int16)
            errors.append(np.abs(decoded - images[index]))
    errors = np.stack(errors)
    assert errors.max() <= 2
    assert errors.mean() < 0.1


@needs_fmnist
def test_fmnist_report_marker(fmnist):
    report = json.loads((fmnist / ".complete").read_text())
    files = [p for p in fmnist.rglob("*.jpg")]
    assert report["images"] == len(files) == 2 * FM_LIMIT
    assert report["bytes"] == sum(p.stat().st_size for p in files)
    assert report["classes"] == list(FM.FASHION_MNIST_CLASSES)
    for split in B.SPLITS:
        _, labels = FM.load_fashion_mnist(split)
        assert report["splits"][split]["images"] == FM_LIMIT
        assert report["splits"][split]["per_class"] == np.bincount(labels[:FM_LIMIT], minlength=10).tolist()
    assert not list(fmnist.parent.glob("*.partial-*"))


@needs_fmnist
def test_fmnist_deterministic_whatever_the_workers(fmnist, tmp_path):
    again = tmp_path / "again"
    assert convert.main(["fashion-mnist", "--out", str(again), "--limit", str(FM_LIMIT), "--workers", "1"]) == 0
    first, second = tree(fmnist), tree(again)
    assert len(first) == 2 * FM_LIMIT + 1  # the images and .complete
    assert first == second


@needs_fmnist
def test_fmnist_refuses_non_empty_output_without_force(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert convert.main(["fashion-mnist", "--out", str(out), "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert tree(out) == {"mine.txt": b"keep me"}
    assert convert.main(["fashion-mnist", "--out", str(out), "--limit", "5", "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / ".complete").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine without --force
    assert convert.main(["fashion-mnist", "--out", str(empty), "--limit", "5"]) == 0


@needs_fmnist
def test_fmnist_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    real, calls = FM._write_fmnist_chunk, []

    def dies_on_second_chunk(task):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main process
        return real(task)

    monkeypatch.setattr(FM, "_write_fmnist_chunk", dies_on_second_chunk)
    out = tmp_path / "fm"
    with pytest.raises(KeyboardInterrupt):
        FM.build_fashion_mnist(out, limit=20, workers=1, chunk=10)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither OUT nor OUT.partial-<pid>


def test_fmnist_missing_files_name_path_and_package(tmp_path, capsys):
    out = tmp_path / "fm"
    assert convert.main(["fashion-mnist", "--out", str(out), "--source", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in err and "dataset-fashion-mnist" in err
    assert not out.exists()


def test_read_idx_checks_header_against_size(tmp_path):
    good = tmp_path / "ok-idx3-ubyte"
    good.write_bytes(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
                     + (4).to_bytes(4, "big") + bytes(range(24)))
    assert FM.read_idx(good).tolist() == np.arange(24, dtype=np.uint8).reshape(2, 3, 4).tolist()
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(DataError, match="short-idx3-ubyte"):
        FM.read_idx(short)
    with pytest.raises(DataError, match="not a uint8 idx"):
        bad = tmp_path / "float-idx"
        bad.write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + bytes(4))
        FM.read_idx(bad)


# ---- photos: the rule, duplicates, regions, sizes ---------------------------------------------------

def _photo(name: str) -> Image.Image:
    from skimage import data
    return Image.fromarray(getattr(data, name)())


def test_photo_rule_on_synthetic_files(tmp_path):
    """A real photo passes; each kind of non-photo fails for its own reason."""
    def verdict(img: Image.Image, name: str):
        path = tmp_path / name
        img.save(path)
        return P.photo_rejection(P.analyse_photo(str(path)))

    astronaut = _photo("astronaut")                                       # 512x512 RGB photo
    assert verdict(astronaut, "astronaut.png") is None
    assert verdict(astronaut.resize((300, 300)), "small.png") == "small"
    assert verdict(_photo("camera"), "camera.png") == "grey"              # mode L
    assert verdict(astronaut.convert("L").convert("RGB"), "grey-rgb.png") == "grey"
    logo = Image.new("RGB", (600, 400), (255, 255, 255))                  # flat fills, hard edges
    draw = ImageDraw.Draw(logo)
    draw.ellipse((100, 50, 300, 250), fill=(220, 30, 40))
    draw.rectangle((320, 80, 560, 300), fill=(30, 90, 200))
    draw.text((120, 320), "LOGO", fill=(0, 0, 0))
    assert verdict(logo, "logo.png") == "flat"
    cutout = astronaut.convert("RGBA")
    cutout.putalpha(0)                                                    # fully transparent
    assert verdict(cutout, "cutout.png") == "transparent"
    y, x = np.mgrid[0:480, 0:640]                                         # vector art: flat shapes
    vector = Image.fromarray(np.stack([x * 255 / 639, y * 255 / 479, 128 + 0 * x], -1).round().astype(np.uint8))
    draw = ImageDraw.Draw(vector)                                         # on a rendered gradient
    draw.polygon([(50, 400), (300, 80), (600, 300)], fill=(240, 180, 40))
    draw.ellipse((380, 40, 560, 220), fill=(40, 60, 200))
    assert verdict(vector, "vector.png") == "flat"
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert verdict(Image.fromarray(noise), "noise.png") == "noise"
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert P.photo_rejection(P.analyse_photo(str(tmp_path / "broken.jpg"))) == "unreadable"


@needs_opencv_doc
def test_photo_rule_on_known_package_files():
    root = P.PHOTO_PACKAGES["opencv-doc"]
    expected = {"data/baboon.jpg": None, "data/fruits.jpg": None, "data/squirrel_cls.jpg": None,
                "data/messi5.jpg": None, "text/scenetext01.jpg": None,
                "data/HappyFish.jpg": "small", "data/LinuxLogo.jpg": "small", "data/pic2.png": "small",
                "data/chessboard.png": "grey", "data/left01.jpg": "grey", "data/sudoku.png": "grey",
                "text/scenetext_segmented_word01_mask.png": "grey", "data/opencv-logo.png": "transparent",
                "data/cards.png": "flat", "data/detect_blob.png": "flat", "data/smarties.png": "flat",
                "ximgproc/stanford.png": "flat"}  # (a map screenshot)
    got = {name: P.photo_rejection(P.analyse_photo(str(root / name))) for name in expected}
    assert got == expected


def _source(stats: dict, path: str, package: str = "test") -> P.Source:
    return P.Source(path, package, Path(path).stem, stats["width"], stats["height"],
                    stats["structure"], stats["colours"])


def test_dedupe_keeps_the_larger_of_the_same_photo(tmp_path):
    chelsea = _photo("chelsea").resize((902, 600), Image.LANCZOS)
    files = {"chelsea.png": chelsea,
             "chelsea-small.jpg": chelsea.resize((676, 450)),             # same picture, smaller
             "chelsea-shifted.png": chelsea.crop((30, 10, 902, 600)),     # another framing
             "coffee.png": _photo("coffee"), "rocket.png": _photo("rocket")}
    sources = []
    for name, img in files.items():
        img.save(tmp_path / name)
        stats = P.analyse_photo(str(tmp_path / name))
        assert P.photo_rejection(stats) is None, name
        sources.append(_source(stats, str(tmp_path / name)))
    kept, dropped = P.dedupe(sources)
    assert sorted(Path(s.path).name for s in kept) == ["chelsea.png", "coffee.png", "rocket.png"]
    assert {Path(d.path).name: Path(k.path).name for d, k in dropped} == {
        "chelsea-small.jpg": "chelsea.png", "chelsea-shifted.png": "chelsea.png"}


def _fake(path: str, w: int, h: int) -> P.Source:
    return P.Source(path, "test", Path(path).stem, w, h, (), ())


def test_plan_regions_choice_and_splits():
    sources = [_fake(f"/p/{i}.jpg", w, h) for i, (w, h) in
               enumerate([(2560, 1600), (1280, 1024), (640, 480), (5120, 2880), (500, 333)])]
    # fewer classes than photos: whole photos, a seeded choice
    few = P.plan_regions(sources, 3, seed=1)
    assert len({r.source.path for r in few}) == 3 and all(r.part == "" for r in few)
    assert few == P.plan_regions(sources, 3, seed=1)
    assert len({tuple(r.source.path for r in P.plan_regions(sources, 3, seed=s)) for s in range(8)}) > 1
    # more: every photo, then halves round-robin, parts disjoint, inside, and large enough
    for classes in (6, 8, 12):
        regions = P.plan_regions(sources, classes, seed=0)
        assert len(regions) == classes
        assert {r.source.path for r in regions} == {s.path for s in sources}
        for s in sources:
            mine = [r for r in regions if r.source.path == s.path]
            area = sum(r.area for r in mine)
            assert area == s.width * s.height  # halves tile the photo exactly (no overlap, no gap)
            if len(mine) > 1:
                assert all(r.short_side >= P.MIN_REGION_SIDE for r in mine)
                assert [r.part for r in mine] == [f"{k + 1}of{len(mine)}" for k in range(len(mine))]
    parts = {s.path: sum(r.source.path == s.path for r in P.plan_regions(sources, 8, 0)) for s in sources}
    # 3 photos can be halved: each once before any twice; the small ones stay whole
    assert parts == {"/p/0.jpg": 2, "/p/1.jpg": 2, "/p/2.jpg": 1, "/p/3.jpg": 2, "/p/4.jpg": 1}
    names = [P.class_name(i, r) for i, r in enumerate(P.plan_regions(sources, 8, 0))]
    assert names == sorted(names) and len(set(names)) == 8
    # capacity: 5120x2880 -> 8x4 regions of >= 640 px, 2560x1600 -> 4x2, 1280x1024 -> 2, two whole
    assert len(P.plan_regions(sources, 44, seed=0)) == 44
    with pytest.raises(DataError, match="--classes 45"):
        P.plan_regions(sources, 45, seed=0)


def test_output_size_and_crop_distributions():
    """20,000 draws: ImageNet-like sizes (mean ~414x361, long side 500 for 60 %, 25 % portrait but square),
    crops inside the image with the output's aspect and area fractions uniform in CROP_AREA."""
    rng = np.random.default_rng(0)
    sizes = np.array([P.sample_output_size(rng) for _ in range(20000)])
    w, h = sizes[:, 0], sizes[:, 1]
    long, short = np.maximum(w, h), np.minimum(w, h)
    assert abs(w.mean() - 414) < 6 and abs(h.mean() - 361) < 6
    square = sum(p for aspect, p in P.ASPECTS if aspect == 1.0)
    assert abs((long == 500).mean() - 0.6) < 0.02 and abs((h > w).mean() - 0.25 * (1 - square)) < 0.02
    assert long.min() >= 200 and long.max() == 500 and short.min() >= 133 and (short >= 330).mean() > 0.6
    assert np.stack([np.round(long / aspect) == short for aspect, _ in P.ASPECTS]).any(0).all()
    fractions = []
    for (ow, oh) in sizes[:2000]:
        left, top, right, bottom = P.sample_crop(800, 1000, ow / oh, rng)
        assert 0 <= left < right <= 800 and 0 <= top < bottom <= 1000
        assert abs((right - left) / (bottom - top) - ow / oh) < 1e-6
        full = min(800, 1000 * ow / oh) * min(1000, 800 * oh / ow)  # largest crop of that aspect
        fractions.append((right - left) * (bottom - top) / full)
    fractions = np.array(fractions)
    assert fractions.min() >= P.CROP_AREA[0] - 1e-9 and fractions.max() <= P.CROP_AREA[1] + 1e-9
    assert abs(fractions.mean() - np.mean(P.CROP_AREA)) < 0.02


# ---- photos: the command end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos") / "photos"
    assert convert.main(["photos", "--out", str(out), *PHOTO_ARGS, "--workers", "2"]) == 0
    return out


@needs_opencv_doc
def test_photos_counts_and_report(photos):
    report = json.loads((photos / ".complete").read_text())
    for split, n in (("train", 8), ("val", 4)):
        folders = images_of(photos, split)
        assert len(folders) == 5 and all(len(files) == n for files in folders.values())
        assert all(f.name == f"{i:05d}.jpg" for files in folders.values() for i, f in enumerate(files))
    assert list(images_of(photos, "train")) == list(images_of(photos, "val")) == list(report["class_sources"])
    files = list(photos.rglob("*.jpg"))
    assert report["images"] == len(files) == 5 * 12
    assert report["bytes"] == sum(p.stat().st_size for p in files)
    assert report["sources"]["opencv-doc"] >= 25  # ~33 of opencv-doc's ~150 files are colour photos
    sizes = [Image.open(p).size for p in files]
    assert report["mean_width"] == pytest.approx(np.mean([s[0] for s in sizes]), abs=0.05)
    assert report["mean_height"] == pytest.approx(np.mean([s[1] for s in sizes]), abs=0.05)


@needs_opencv_doc
def test_photos_images_are_imagenet_like_jpegs(photos):
    for path in photos.rglob("*.jpg"):
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert not img.info.get("progressive") and not img.info.get("progression")  # baseline
            assert JpegImagePlugin.get_sampling(img) == 2                                # 4:2:0
            long, short = max(img.size), min(img.size)
            assert 200 <= long <= 500 and long / short <= 1.51
            img.load()  # decodes completely


@needs_opencv_doc
def test_photos_classes_are_distinct(photos):
    """Nearest class-mean colour histogram (8x8x8 bins) puts val crops in their class: a single source
    photo per class makes classes separable by colour alone; one photo for all would give ~20 %."""
    def histogram(path):
        q = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.BOX)).astype(int) >> 5
        return np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512) / 4096

    train, val = images_of(photos, "train"), images_of(photos, "val")
    means = np.stack([np.mean([histogram(p) for p in files], 0) for files in train.values()])
    hits = [np.argmin(np.abs(means - histogram(p)).sum(1)) == label
            for label, files in enumerate(val.values()) for p in files]
    assert np.mean(hits) >= 0.8
    paths = [s.split("#")[0] for s in json.loads((photos / ".complete").read_text())["class_sources"].values()]
    assert len(set(paths)) == 5  # five different photos (5 classes < ~33 sources: no splitting)


@needs_opencv_doc
def test_photos_deterministic_and_seeded(photos, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert convert.main(["photos", "--out", str(again), *PHOTO_ARGS, "--workers", "1"]) == 0
    assert tree(photos) == tree(again)
    assert convert.main(["photos", "--out", str(other), *PHOTO_ARGS, "--seed", "4"]) == 0  # last wins
    assert tree(other) != tree(photos)


@needs_opencv_doc
def test_photos_refuses_non_empty_output_and_bad_arguments(photos, tmp_path, capsys):
    before = tree(photos)
    assert convert.main(["photos", "--out", str(photos), *PHOTO_ARGS]) == 2
    err = capsys.readouterr().err
    assert str(photos) in err and "--force" in err
    assert tree(photos) == before
    assert convert.main(["photos", "--out", str(tmp_path / "x"), "--packages", "opencv-doc,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert convert.main(["photos", "--out", str(tmp_path / "y"), "--packages", "opencv-doc",
                         "--classes", "5000"]) == 2
    assert "--classes 5000" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not list(tmp_path.glob("*.partial-*"))


@needs_opencv_doc
def test_photos_max_res_caps_the_same_crops(photos, tmp_path):
    """--max-res: the same files and crops, resized so the longer side fits, to the sizes FFCV's
    converter would give the full-size images (a .beton of either holds the same-sized images)."""
    from pipelines.tools.ffcv_convert import capped_size
    small = tmp_path / "small"
    assert convert.main(["photos", "--out", str(small), *PHOTO_ARGS, "--max-res", "128", "--workers", "2"]) == 0
    full_files = sorted(p.relative_to(photos) for p in photos.rglob("*.jpg"))
    assert sorted(p.relative_to(small) for p in small.rglob("*.jpg")) == full_files
    capped = 0
    for rel in full_files:
        with Image.open(photos / rel) as a, Image.open(small / rel) as b:
            assert b.size[::-1] == capped_size(a.height, a.width, 128)
            capped += max(a.size) > 128
            # same crop: the full image brought to the small size matches within JPEG/resampling error
            diff = np.abs(np.asarray(a.convert("RGB").resize(b.size, Image.LANCZOS), np.float32)
                          - np.asarray(b.convert("RGB"), np.float32))
            assert diff.mean() < 6, (rel, diff.mean())
    assert capped == len(full_files)                 # every photo here is 200-500 px: all were capped
    assert json.loads((small / ".complete").read_text())["max_res"] == 128
    assert convert.main(["photos", "--out", str(tmp_path / "bad"), *PHOTO_ARGS, "--max-res", "-1"]) == 2
