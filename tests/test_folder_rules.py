"""The folder rules (pipelines/loaders/common.py), the same in every loader, validate and the
converters: nested sub-folders read as torchvision's ImageFolder reads them, hidden files ignored,
an empty class folder and images beside class folders refused naming them, the train and val class
lists compared before a run and an evaluation, and EXIF orientation applied alike by every decoder.
"""
from __future__ import annotations

import functools
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import masksiam  # noqa: F401
import convert
from conftest import have_loader_library, make_image_folder, skimage_photos
from masksiam.config import Config
from masksiam.dist import DistInfo
from pipelines.loaders import build_loader
from pipelines.loaders.common import DataError, compare_classes, scan_image_folder
from pipelines.tools import validate, webdataset

INFO = DistInfo(0, 1, 0, torch.device("cpu"))
HAVE_DALI = have_loader_library("nvidia.dali")
HAVE_FFCV = have_loader_library("ffcv")

# class -> images below it (nested), as a user's photo tree may hold them
NESTED = {"cats": ["a.jpg", "b.JPEG", "indoor/c.jpg", "indoor/sofa/d.png", "outdoor/e.jpg", "outdoor-2/f.jpg"],
          "dogs": ["g.jpg", "park/h.jpg", "park/i.jpg"],
          "owls": ["j.jpg", "k.jpg", "night/l.jpg"]}
# what a macOS copy, a photo manager or a git checkout leaves among the photos; read, they are bad images
DEBRIS = ["._a.jpg", ".DS_Store", "indoor/._c.jpg", ".thumbnails/a.jpg", "park/.picasa/h.jpg"]


@functools.lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    return skimage_photos()


def _photo(i: int, size=(48, 40)) -> Image.Image:
    photos = _photos()
    return Image.fromarray(photos[i % len(photos)]).resize(size, Image.BILINEAR)


def _tree(root: Path, debris: bool) -> Path:
    """root/{train,val}/<class>/...: NESTED, plus DEBRIS and non-image files when `debris`."""
    k = 0
    for split in ("train", "val"):
        for cls, names in NESTED.items():
            for name in names:
                path = root / split / cls / name
                path.parent.mkdir(parents=True, exist_ok=True)
                _photo(k).save(path, format="PNG" if name.endswith(".png") else "JPEG", quality=90)
                k += 1
            if debris:
                for name in DEBRIS:
                    path = root / split / cls / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X" if name.endswith(".jpg") else b"Bud1\0\0")
                (root / split / cls / "notes.txt").write_text("not an image")
        if debris:
            (root / split / ".git").mkdir()
            _photo(0).save(root / split / ".git" / "x.jpg")
            (root / split / ".DS_Store").write_bytes(b"Bud1")
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return _tree(tmp_path_factory.mktemp("clean"), debris=False)


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    return _tree(tmp_path_factory.mktemp("messy"), debris=True)


def _cfg(data, **kw) -> Config:
    return Config(**{"data": str(data), "loader": "torchvision", "batch_size": 2, "views": 1, "size": 24,
                     "workers": 0, "seed": 0, "drop_last": False, **kw})


def test_nested_folders_are_read_as_torchvision_imagefolder_reads_them(clean, messy):
    """The independent reference: torchvision's ImageFolder on the clean tree (it would also read
    the debris, as classes and images); the scan of the messy tree is the same list."""
    from torchvision.datasets import ImageFolder
    ref = ImageFolder(str(clean / "train"))
    expected = [(str(Path(p).relative_to(clean / "train")), y) for p, y in ref.samples]
    for root in (clean, messy):
        images = scan_image_folder(root / "train")
        assert images.classes == ref.classes == ["cats", "dogs", "owls"]
        assert list(zip(images.paths, images.labels)) == expected
    assert "cats/indoor/sofa/d.png" in scan_image_folder(messy / "train").paths


def _loader_names(fmt: str, data: Path, tmp: Path) -> list[str]:
    """The file (or key) of every sample a loader for `fmt` reads from `data`, in index order."""
    if fmt == "torchvision":
        return build_loader(_cfg(data), INFO).images.paths
    if fmt == "dali":
        return build_loader(_cfg(data, loader="dali", dali_device="cpu"), INFO).samples.names
    if fmt == "webdataset":
        webdataset.convert(data, tmp / "wds", shard_size=5, workers=2, verbose=False)
        samples = build_loader(_cfg(tmp / "wds", loader="dali", dali_device="cpu"), INFO).samples
        return [n[:-4] for n in samples.names]               # keys: the path without its extension
    from ffcv.reader import Reader
    from pipelines.tools.ffcv_convert import convert as convert_beton
    report = convert_beton(data / "train", tmp / "train.beton", workers=1, progress=False)
    assert report["skipped"] == [] and report["classes"] == ["cats", "dogs", "owls"]
    rows = Reader(str(tmp / "train.beton")).metadata["f2"].tolist()     # each row's index in the file list
    return [scan_image_folder(data / "train").paths[i] for i in rows]


@pytest.mark.parametrize("fmt", ["torchvision", "dali", "webdataset", "ffcv"])
def test_every_loader_reads_the_same_files_and_skips_hidden_ones(messy, clean, tmp_path, fmt):
    if fmt in ("dali", "webdataset") and not HAVE_DALI or fmt == "ffcv" and not HAVE_FFCV:
        pytest.skip(f"{fmt} not installed")
    names = _loader_names(fmt, messy, tmp_path)
    paths = scan_image_folder(clean / "train").paths
    assert names == ([p.rsplit(".", 1)[0] for p in paths] if fmt == "webdataset" else paths)
    if fmt in ("torchvision", "dali"):
        loader = build_loader(_cfg(messy, **({"loader": "dali", "dali_device": "cpu"} if fmt == "dali" else {})), INFO)
        loader.set_epoch(0)
        labels = {int(i): int(y) for b in loader for i, y in zip(b.indices, b.labels)}
        assert labels == dict(enumerate(scan_image_folder(clean / "train").labels))
        assert loader.bad_images == []                     # no AppleDouble file was read


def test_validate_checks_what_the_loaders_read(messy, capsys):
    report = validate.validate(messy, workers=2)
    n = sum(len(v) for v in NESTED.values())
    assert {s: (r["checked"], r["bad"]) for s, r in report["splits"].items()} == {"train": (n, 0), "val": (n, 0)}
    assert report["class_mismatch"] is None and report["splits"]["train"]["labelled"] is True


def _empty_class(root: Path) -> Path:
    make_image_folder(root, classes=2, per_class=4)
    for split in ("train", "val"):
        (root / split / "zebras" / ".thumbnails").mkdir(parents=True)   # hidden inside: still empty
        (root / split / "zebras" / ".DS_Store").write_bytes(b"Bud1")
    return root


def _refusals(root: Path, tmp_path: Path) -> dict:
    """Every reader of a folder split, each reading `root` (a dataset root)."""
    refusals = {
        "scan": lambda: scan_image_folder(root / "train"),
        "torchvision loader": lambda: build_loader(_cfg(root), INFO),
        "validate": lambda: validate.validate(root, verbose=False),
        "webdataset": lambda: webdataset.convert(root, tmp_path / "wds", shard_size=4, verbose=False),
    }
    if HAVE_DALI:
        refusals["dali loader"] = lambda: build_loader(_cfg(root, loader="dali", dali_device="cpu"), INFO)
    if HAVE_FFCV:
        from pipelines.tools.ffcv_convert import convert as convert_beton
        refusals["ffcv"] = lambda: convert_beton(root / "train", tmp_path / "t.beton", workers=1, progress=False)
    return refusals


def test_an_empty_class_folder_is_refused_everywhere_naming_it(tmp_path):
    root = _empty_class(tmp_path / "data")
    for what, refuse in _refusals(root, tmp_path).items():
        with pytest.raises(DataError, match=r"class folder zebras holds no images") as err:
            refuse()
        assert str(root / "train") in str(err.value), what
    assert not (tmp_path / "wds").exists() and not (tmp_path / "t.beton").exists()


def test_images_beside_class_folders_are_refused_everywhere(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    shutil.copy(next((root / "train" / "class_00").glob("*.jpg")), root / "train" / "stray.jpg")
    for what, refuse in _refusals(root, tmp_path).items():
        with pytest.raises(DataError, match=r"holds 1 images beside class folders \(class_00, class_01\)") as err:
            refuse()
        assert str(root / "train") in str(err.value), what


# ---- train and val class lists --------------------------------------------------------------------

def test_compare_classes_names_missing_and_extra_classes():
    compare_classes(["a", "b"], ["a", "b"], "train", "val")
    with pytest.raises(DataError, match=r"val lacks 1 of the classes of train: b; val has 1 classes that train lacks: c"):
        compare_classes(["a", "b"], ["a", "c"], "train", "val")


@pytest.fixture()
def val_missing_a_class(image_folder, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    shutil.rmtree(root / "val" / "class_01")              # class_02's val images would read as label 1
    return root


def test_train_py_refuses_a_val_split_missing_a_class_before_writing(val_missing_a_class, tmp_path, monkeypatch):
    import train
    monkeypatch.setenv("MASKSIAM_DEVICE", "cpu")
    args = [f"data={val_missing_a_class}", f"out_dir={tmp_path / 'runs'}", "run_name=r", "arch=resnet10", "width=8",
            "size=24", "stem=small", "batch_size=8", "workers=0", "epochs=1", "progress=false"]
    with pytest.raises((DataError, SystemExit), match=r"lacks 1 of the classes of train .*: class_01"):
        train.main(args)
    assert not (tmp_path / "runs").exists()                # nothing written
    res = train.main([*args, "final_eval=false", "online_probe=false"])    # no evaluation: nothing to compare
    assert res["exit"] == "finished"


def test_eval_knn_refuses_a_val_split_missing_a_class(val_missing_a_class, tmp_path):
    from eval import knn
    from masksiam.config import to_dict
    from models.resnet import build_backbone
    cfg = _cfg(val_missing_a_class, arch="resnet10", width=8, stem="small")
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"config": to_dict(cfg), "backbone": build_backbone("resnet10", small_stem=True, width=8).state_dict()},
               ckpt)
    with pytest.raises(SystemExit) as err:
        knn.main(["--checkpoint", str(ckpt), "--no-progress"])
    assert "class_01" in str(err.value) and "lacks" in str(err.value)


def test_validate_fails_on_a_class_mismatch(val_missing_a_class, capsys):
    assert convert.main(["validate", str(val_missing_a_class), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "class_01" in out


# ---- EXIF orientation ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rotated(tmp_path_factory) -> Path:
    """One 64x40 photo stored with each EXIF orientation 1..8 (a class each, 2 classes' worth)."""
    root = tmp_path_factory.mktemp("exif")
    photo = _photo(1, size=(64, 40))
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        d = root / "train" / ("plain" if o == 1 else "turned")
        d.mkdir(parents=True, exist_ok=True)
        # stored so that applying orientation o gives `photo` back
        stored = photo.transpose(_INVERSE[o]) if o in _INVERSE else photo
        stored.save(d / f"o{o}.jpg", quality=95, exif=exif.tobytes())
    return root


# orientation -> the transpose that undoes it (Pillow's exif_transpose applies these methods' inverses)
_INVERSE = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
            6: Image.ROTATE_90, 7: Image.TRANSVERSE, 8: Image.ROTATE_270}


def test_exif_orientation_is_applied_by_every_decoder(rotated, tmp_path):
    from pipelines.loaders.torchvision_loader import decode_rgb
    from pipelines.tools.validate import image_size
    images = scan_image_folder(rotated / "train")
    upright = np.asarray(_photo(1, size=(64, 40)), dtype=int)
    for p in images.paths:                                  # PIL (torchvision loader) and the header agree
        img = decode_rgb(rotated / "train" / p)
        assert img.size == (64, 40) and np.abs(np.asarray(img, dtype=int) - upright).mean() < 6, p
        assert image_size(np.fromfile(rotated / "train" / p, np.uint8)) == (40, 64), p
        with Image.open(rotated / "train" / p) as raw:       # and it was stored turned
            assert raw.size == ((40, 64) if int(Path(p).stem[1]) >= 5 else (64, 40)), p
    ref = torch.cat([b.views[0] for b in _eval_epoch(_cfg(rotated, batch_size=8, size=32))])
    if HAVE_DALI:                                            # DALI: adjust_orientation + upright boxes
        dali = torch.cat([b.views[0] for b in _eval_epoch(_cfg(rotated, loader="dali", dali_device="cpu",
                                                                batch_size=8, size=32))])
        assert (dali.float() - ref.float()).abs().mean() < 2
    if HAVE_FFCV:                                            # convert.py ffcv stores upright pixels
        from pipelines.tools.ffcv_convert import convert as convert_beton
        report = convert_beton(rotated / "train", tmp_path / "train.beton", mode="raw", workers=1, progress=False)
        assert report["counts"]["exif_rotated"] == 7
    report = validate.validate(rotated, verbose=False)
    assert report["splits"]["train"]["exif_rotated"] == 7 and "applied to JPEG files by every loader" in \
        report["exif_orientation"]


def _eval_epoch(cfg):
    from eval.data import eval_loader
    loader = eval_loader(cfg, INFO, "train")
    loader.set_epoch(0)
    return list(loader)


def test_a_png_keeps_its_stored_orientation(tmp_path):
    """Only JPEG orientation is applied (DALI reads other formats as stored): a PNG with an EXIF
    orientation is decoded as stored, by PIL too."""
    from pipelines.loaders.torchvision_loader import decode_rgb
    from pipelines.tools.validate import image_size
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _photo(2, size=(64, 40)).save(buf, format="PNG", exif=exif.tobytes())
    (tmp_path / "p.png").write_bytes(buf.getvalue())
    assert decode_rgb(tmp_path / "p.png").size == (64, 40)
    assert image_size(buf.getvalue()) == (40, 64)
    with Image.open(tmp_path / "p.png") as img:              # Pillow alone would turn it
        assert ImageOps.exif_transpose(img).size == (40, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
@pytest.mark.parametrize("train", [False, True])
def test_exif_orientation_on_the_gpu_decoder(rotated, train):
    """nvJPEG's region decode (dali_device=gpu) turns EXIF-tagged JPEGs as the CPU decoder does:
    the same crops as the torchvision loader, within JPEG decoder rounding."""
    from eval.data import eval_loader
    cuda = DistInfo(0, 1, 0, torch.device("cuda", 0))
    views = {}
    for loader, extra in (("torchvision", {}), ("dali", {"dali_device": "gpu"})):
        ld = eval_loader(_cfg(rotated, loader=loader, batch_size=8, size=32, **extra), cuda, "train", train=train)
        ld.set_epoch(0)
        views[loader] = torch.cat([b.views[0].cpu() for b in ld]).float()
    assert (views["dali"] - views["torchvision"]).abs().mean() < 3
