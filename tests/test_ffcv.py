"""FFCV: .beton conversion (round trip, odd inputs, atomic writes) and the multi-view loader (contract,
fused == per-view decode, crops replayable from the seed, sharding, resume, eval).

The .beton files are converted once per session; loaders share numba kernels across the file, so
only a few pipelines compile (fused, per-view, eval center crop, multi-crop fused and per-view, and
process cache last: see the end of the file).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import import_loader_library

import_loader_library("ffcv")  # an error, not skips, where the project installed it
pytestmark = pytest.mark.ffcv

import cv2  # noqa: E402

import convert  # noqa: E402
from masksiam.config import Config, apply  # noqa: E402
from masksiam.dist import DistInfo  # noqa: E402
from pipelines.loaders import build_loader  # noqa: E402
from pipelines.loaders.common import DataError, random_resized_crop_params, scan_image_folder, shard_indices  # noqa: E402
from pipelines.tools.ffcv_convert import cap_resolution, capped_size, convert as convert_beton, load_rgb  # noqa: E402
from pipelines.loaders.ffcv_loader import beton_path  # noqa: E402
from pipelines.loaders.spec import loader_spec  # noqa: E402
from conftest import make_image_folder  # noqa: E402

CPU = torch.device("cpu")
SIZE, BATCH, MAX_RES = 48, 8, 128
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """3 classes x 8 train / 2 val photos (64-160 px) as train.beton and val.beton (jpg, max-res 128,
    through the convert.py command line) and raw/train.beton (raw pixels)."""
    root = make_image_folder(tmp_path_factory.mktemp("ffcv") / "data")
    for split in ("train", "val"):
        assert convert.main(["ffcv", "--src", str(root / split), "--out", str(root / f"{split}.beton"),
                             "--max-res", str(MAX_RES), "--quality", "90", "--workers", "2", "--no-progress"]) == 0
    convert_beton(root / "train", root / "raw" / "train.beton", mode="raw", max_res=MAX_RES, workers=2,
                  progress=False)
    return root


def cfg_for(data: Path, **overrides) -> Config:
    values = {"data": str(data), "loader": "ffcv", "views": 2, "size": SIZE, "batch_size": BATCH, "workers": 2,
              "prefetch": 2, "seed": 0, "drop_last": True}
    return apply(Config(), {**values, **overrides}, "test_ffcv")


def epoch(loader, number: int = 0, start_batch: int = 0) -> list:
    """One epoch as a list of (views, labels, indices), cloned (FFCV reuses its host buffers)."""
    loader.set_epoch(number, start_batch)
    return [([v.clone() for v in b.views], b.labels.clone(), b.indices.clone()) for b in loader]


def stacked(batches) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    views = [torch.cat([b[0][v] for b in batches]) for v in range(len(batches[0][0]))]
    return views, torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])


def source_pixels(data: Path, split: str = "train") -> list[np.ndarray]:
    images = scan_image_folder(data / split)
    return [cap_resolution(load_rgb(images.root / p)[0], MAX_RES) for p in images.paths]


def stored_images(path: Path) -> list[tuple[int, np.ndarray]]:
    """(mode, payload) of every image in a .beton, read with FFCV's Reader: raw pixels (H, W, 3) or
    the JPEG bytes."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    table = reader.alloc_table[np.argsort(reader.alloc_table["ptr"])]
    raw = np.fromfile(path, np.uint8)
    out = []
    for m in reader.metadata["f0"]:
        size = table["size"][np.searchsorted(table["ptr"], m["data_ptr"])]
        payload = raw[m["data_ptr"]:m["data_ptr"] + size]
        out.append((int(m["mode"]), payload.reshape(m["height"], m["width"], 3) if m["mode"] == 1 else payload))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def decode_jpeg(payload: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(payload, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# ---- conversion ---------------------------------------------------------------------------------

def test_round_trip_counts_labels_and_pixels(data):
    images = scan_image_folder(data / "train")
    sources = source_pixels(data)
    for path, mode in ((data / "train.beton", 0), (data / "raw" / "train.beton", 1)):
        report = json.loads(path.with_name(path.name + ".json").read_text())
        assert report["counts"]["found"] == report["counts"]["written"] == len(images) == 24
        assert report["counts"]["skipped"] == 0 and report["classes"] == images.classes
        assert report["counts"]["per_class"] == {c: 8 for c in images.classes}
        assert report["bytes"]["beton"] == path.stat().st_size and report["options"]["max_res"] == MAX_RES
        from ffcv.reader import Reader
        meta = Reader(str(path)).metadata
        assert meta["f1"].tolist() == images.labels and meta["f2"].tolist() == list(range(len(images)))
        for src, (stored_mode, payload) in zip(sources, stored_images(path)):
            assert stored_mode == mode
            assert max(src.shape[:2]) <= MAX_RES
            if mode == 1:                                 # raw: the capped source, bit for bit
                np.testing.assert_array_equal(payload, src)
            else:                                         # jpg at quality 90 (4:2:0 chroma)
                pixels = decode_jpeg(payload)
                assert pixels.shape == src.shape and psnr(pixels, src) > 30
    # an image above max-res keeps its aspect ratio within a pixel
    assert capped_size(300, 500, 128) == (76, 128) and capped_size(5, 5000, 128) == (1, 128)


def test_proportion_mode_mixes_and_is_reproducible(data, tmp_path):
    modes = []
    for run in range(2):
        out = tmp_path / f"p{run}.beton"
        report = convert_beton(data / "train", out, mode="proportion", compress_prob=0.5, max_res=MAX_RES,
                               workers=2, seed=3, progress=False)
        modes.append([m for m, _ in stored_images(out)])
        assert report["counts"]["stored_jpg"] + report["counts"]["stored_raw"] == 24
    assert modes[0] == modes[1]
    assert 0 < sum(m == 0 for m in modes[0]) < 24          # both modes (P(all one mode) = 2^-23)


def _odd_folder(root: Path, pillow: Path) -> dict[str, str]:
    """Pillow's and scikit-image's odd files in two classes; returns name -> what it exercises."""
    import skimage.data
    skimage_dir = Path(skimage.data.__file__).parent
    files = {
        "pillow/pil_sample_cmyk.jpg": (pillow / "pil_sample_cmyk.jpg", "CMYK"),
        "pillow/hopper_gray.jpg": (pillow / "hopper_gray.jpg", "grayscale"),
        "pillow/icc_profile_big.jpg": (pillow / "icc_profile_big.jpg", "progressive"),
        "pillow/p_trns_single.png": (pillow / "p_trns_single.png", "palette + transparency"),
        "pillow/transparent.png": (pillow / "transparent.png", "RGBA"),
        "pillow/uncompressed_la.png": (pillow / "uncompressed_la.png", "LA"),
        "pillow/hopper_bw_500.png": (pillow / "hopper_bw_500.png", "1-bit"),
        "pillow/hopper_png_named.jpg": (pillow / "hopper.png", "PNG named .jpg"),
        "pillow/truncated_jpeg.jpg": (pillow / "truncated_jpeg.jpg", "truncated"),
        "pillow/broken.png": (pillow / "broken.png", "unreadable"),
        "pillow/truncated_image.png": (pillow / "truncated_image.png", "truncated"),
        "skimage/logo.png": (skimage_dir / "logo.png", "RGBA"),
        "skimage/camera.png": (skimage_dir / "camera.png", "grayscale"),
        "skimage/horse.png": (skimage_dir / "horse.png", "RGBA"),
        "skimage/multipage.tif": (skimage_dir / "multipage.tif", "multi-page TIFF"),
        "skimage/multipage_rgb.tif": (skimage_dir / "multipage_rgb.tif", "unreadable"),
        "skimage/retina.jpg": (skimage_dir / "retina.jpg", "large"),
    }
    for i in range(2, 9):
        files[f"pillow/hopper_orientation_{i}.jpg"] = (pillow / f"hopper_orientation_{i}.jpg", "EXIF")
    for name, (src, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / name)
    (root / "pillow" / "not_an_image.jpg").write_text("this is text, not a JPEG")
    return {name: kind for name, (_, kind) in files.items()} | {"pillow/not_an_image.jpg": "unreadable"}


def test_odd_inputs_are_converted_or_skipped_with_reasons(tmp_path, pillow_test_images):
    kinds = _odd_folder(tmp_path / "odd", pillow_test_images)
    out = tmp_path / "odd.beton"
    report = convert_beton(tmp_path / "odd", out, mode="raw", max_res=256, workers=2, progress=False)
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {n for n, k in kinds.items() if k in ("truncated", "unreadable")}
    assert "truncated" in skipped["pillow/truncated_jpeg.jpg"]
    assert skipped["pillow/broken.png"].startswith("UnidentifiedImageError")
    assert report["counts"]["found"] == len(kinds)
    assert report["counts"]["written"] == len(kinds) - len(skipped)
    assert report["counts"]["misnamed"] == 1 and report["counts"]["exif_rotated"] == 7
    assert report["counts"]["source_modes"]["CMYK"] == 1

    images = scan_image_folder(tmp_path / "odd")
    from ffcv.reader import Reader
    index = Reader(str(out)).metadata["f2"].tolist()
    stored = {images.paths[i]: pixels for i, (_, pixels) in zip(index, stored_images(out))}
    assert all(p.shape[2] == 3 and max(p.shape[:2]) <= 256 for p in stored.values())
    # EXIF orientations 2..8 all come out upright: like hopper.jpg up to JPEG noise, unlike the stored pixels
    upright = np.asarray(load_rgb(pillow_test_images / "hopper.jpg")[0], dtype=int)
    for i in range(2, 9):
        assert np.abs(stored[f"pillow/hopper_orientation_{i}.jpg"] - upright).mean() < 8
    from PIL import Image
    as_stored = np.asarray(Image.open(pillow_test_images / "hopper_orientation_6.jpg").convert("RGB"), dtype=int)
    assert np.abs(as_stored - upright).mean() > 20
    # CMYK becomes the same picture as Pillow's RGB sample; a PNG named .jpg is decoded as the PNG
    cmyk_ref = np.asarray(Image.open(pillow_test_images / "pil_sample_rgb.jpg"), dtype=int)
    assert np.abs(stored["pillow/pil_sample_cmyk.jpg"] - cmyk_ref).mean() < 10
    np.testing.assert_array_equal(stored["pillow/hopper_png_named.jpg"],
                                  np.asarray(Image.open(pillow_test_images / "hopper.png").convert("RGB")))
    # transparency is composited on white; grayscale has equal channels; large images are capped
    alpha = np.asarray(Image.open(pillow_test_images / "transparent.png"))[..., 3]
    assert (stored["pillow/transparent.png"][alpha == 0] == 255).all()
    gray = stored["skimage/camera.png"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert max(stored["skimage/retina.jpg"].shape[:2]) == 256


def test_interrupted_conversion_leaves_nothing_that_looks_complete(data, tmp_path, monkeypatch):
    from ffcv.writer import DatasetWriter

    def interrupted(self, allocations):
        raise RuntimeError("simulated interruption")

    monkeypatch.setattr(DatasetWriter, "finalize", interrupted)
    out = tmp_path / "x.beton"
    with pytest.raises(RuntimeError, match="simulated"):
        convert_beton(data / "train", out, workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_crashing_writer_process_is_an_error_not_a_hang(data, tmp_path, monkeypatch):
    from ffcv.fields import RGBImageField

    def broken_encode(self, destination, image, malloc):
        raise ValueError("simulated encoder failure")

    monkeypatch.setattr(RGBImageField, "encode", broken_encode)   # inherited by the forked writers
    with pytest.raises(DataError, match="writer process failed"):
        convert_beton(data / "train", tmp_path / "x.beton", workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_names_the_problem(data, tmp_path):
    with pytest.raises(DataError, match="--force"):
        convert_beton(data / "train", data / "train.beton", progress=False)
    with pytest.raises(DataError, match="train/ and val/"):
        convert_beton(data, tmp_path / "x.beton", progress=False)
    with pytest.raises(DataError, match="nope"):      # the command line ends it in one line, exit 1
        convert.main(["ffcv", "--src", str(data / "nope"), "--out", str(tmp_path / "y.beton")])


# ---- the loader ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fused_epoch0(data):
    loader = build_loader(cfg_for(data), DistInfo(0, 1, 0, CPU))
    return loader, epoch(loader, 0)


def test_loader_contract(data, fused_epoch0):
    loader, batches = fused_epoch0
    images = scan_image_folder(data / "train")
    assert len(loader) == len(batches) == 24 // BATCH and loader.classes == images.classes
    assert isinstance(loader.compile_seconds, float) and loader.compile_seconds >= 0
    seen = []
    for views, labels, indices in batches:
        assert len(views) == 2
        for v in views:
            assert v.shape == (BATCH, 3, SIZE, SIZE) and v.dtype == torch.uint8 and v.device == CPU
            assert v.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == indices.dtype == torch.int64
        assert labels.tolist() == [images.labels[i] for i in indices.tolist()]
        seen += indices.tolist()
    assert sorted(seen) == list(range(24))
    assert not torch.equal(batches[0][0][0], batches[0][0][1])     # two different views


def test_fused_decode_equals_per_view_decode(data, fused_epoch0):
    per_view = epoch(build_loader(cfg_for(data, ffcv_fused=False), DistInfo(0, 1, 0, CPU)), 0)
    for (fv, fl, fi), (pv, pl, pi) in zip(fused_epoch0[1], per_view, strict=True):
        assert torch.equal(fi, pi) and torch.equal(fl, pl)
        for a, b in zip(fv, pv, strict=True):
            assert torch.equal(a, b)


def test_crops_replay_from_the_seed_pixel_exact(data, fused_epoch0):
    """Raw mode: every view equals cv2 INTER_AREA of the LoaderSpec.boxes box of the source image (+ flip),
    bit for bit; jpg mode: the same within JPEG tolerance."""
    sources = source_pixels(data)
    raw = build_loader(cfg_for(data, ffcv_path=str(data / "raw" / "train.beton")), DistInfo(0, 1, 0, CPU))
    spec = loader_spec(cfg_for(data), DistInfo(0, 1, 0, CPU))
    for batches, exact in ((epoch(raw, 0), True), (fused_epoch0[1], False)):
        views, _, indices = stacked(batches)
        errors = []
        for n, row in enumerate(indices.tolist()):
            src = sources[row]
            boxes = spec.boxes(0, row, *src.shape[:2])
            for v in range(2):
                top, left, h, w, flip = boxes[v]
                ref = cv2.resize(np.ascontiguousarray(src[top:top + h, left:left + w]), (SIZE, SIZE),
                                 interpolation=cv2.INTER_AREA)
                ref = ref[:, ::-1] if flip else ref
                errors.append(psnr(views[v][n].permute(1, 2, 0).numpy(), ref))
        if exact:
            assert min(errors) == float("inf")
        else:
            assert min(errors) > 27 and np.median(errors) > 30


def test_same_seed_same_crops_other_epoch_or_seed_other_crops(data, fused_epoch0):
    again = build_loader(cfg_for(data), DistInfo(0, 1, 0, CPU))
    first = fused_epoch0[1]
    for (av, _, ai), (bv, _, bi) in zip(first, epoch(again, 0), strict=True):
        assert torch.equal(ai, bi) and all(torch.equal(x, y) for x, y in zip(av, bv))
    views0, _, idx0 = stacked(first)
    for other in (epoch(again, 1), epoch(build_loader(cfg_for(data, seed=1), DistInfo(0, 1, 0, CPU)), 0)):
        views1, _, idx1 = stacked(other)
        assert not torch.equal(idx0, idx1)                            # reshuffled
        by_row0 = views0[0][idx0.argsort()]
        by_row1 = views1[0][idx1.argsort()]
        same = [(a == b).all().item() for a, b in zip(by_row0, by_row1)]
        assert sum(same) <= 1                                         # new crops for (nearly) every image


def test_resume_mid_epoch_skips_batches(data, fused_epoch0):
    loader = fused_epoch0[0]
    full = epoch(loader, 2)
    resumed = epoch(loader, 2, start_batch=1)
    assert len(full) == len(loader) and len(resumed) == len(loader) - 1
    for (av, _, ai), (bv, _, bi) in zip(full[1:], resumed, strict=True):
        assert torch.equal(ai, bi) and all(torch.equal(x, y) for x, y in zip(av, bv))
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, len(loader) + 1)


def test_an_abandoned_epoch_does_not_block_or_cut_the_next(fused_epoch0):
    loader = fused_epoch0[0]
    loader.set_epoch(3)
    abandoned = iter(loader)
    next(abandoned)
    time.sleep(1.0)                 # FFCV's thread fills its queue and waits to post its end marker
    full = epoch(loader, 3)         # stops the abandoned epoch first
    assert len(full) == len(loader)
    abandoned.close()               # closing the old generator leaves the loader usable
    assert len(epoch(loader, 3)) == len(loader)


@pytest.mark.parametrize("order", ["random", "quasi_random"])
def test_ranks_get_disjoint_covering_shards_reshuffled_per_epoch(data, order):
    """World size 2 without a process group; global batch 10 = 5 per rank."""
    n, world, batch = 24, 2, 10
    for drop_last in (True, False):
        ranks = [build_loader(cfg_for(data, ffcv_order=order, drop_last=drop_last, batch_size=batch),
                              DistInfo(r, world, 0, CPU)) for r in range(world)]
        for e in (0, 1):
            parts = [set(r.epoch_rows(e).tolist()) for r in ranks]
            assert not parts[0] & parts[1]
            if drop_last:                       # 2 whole global batches: 10 rows per rank
                assert len(ranks[0]) == 2 and [len(p) for p in parts] == [10, 10]
            else:                               # 3 batches (5, 5, 2) per rank; 24 rows split 12 / 12
                assert len(ranks[0]) == 3 and parts[0] | parts[1] == set(range(n))
            if order == "random":               # the same order as the torchvision loader
                for r in range(world):
                    np.testing.assert_array_equal(ranks[r].epoch_rows(e), shard_indices(
                        n, r, world, 0, e, batch // world, drop_last=drop_last))
        assert not np.array_equal(ranks[0].epoch_rows(0), ranks[0].epoch_rows(1))
    if order == "random":                       # end to end: each rank yields exactly its rows
        for r in ranks:
            batches = epoch(r, 1)
            assert [len(b[2]) for b in batches] == [5, 5, 2]
            assert stacked(batches)[2].tolist() == r.epoch_rows(1).tolist()


def test_eval_loader_center_crops_in_file_order(data):
    cfg = cfg_for(data)
    loader = build_loader(cfg, DistInfo(0, 1, 0, CPU), split="val", train=False)
    batches = epoch(loader, 0)
    views, labels, indices = stacked(batches)
    images = scan_image_folder(data / "val")
    assert len(views) == 1 and indices.tolist() == list(range(len(images))) and len(loader) == 1
    assert labels.tolist() == images.labels
    for n, src in enumerate(source_pixels(data, "val")):              # ffcv's center crop of the stored image
        side = int(min(src.shape[:2]) * 1.0)                          # size 48 <= 64: the whole short side
        top, left = (src.shape[0] - side) // 2, (src.shape[1] - side) // 2
        ref = cv2.resize(np.ascontiguousarray(src[top:top + side, left:left + side]), (SIZE, SIZE),
                         interpolation=cv2.INTER_AREA)
        assert psnr(views[0][n].permute(1, 2, 0).numpy(), ref) > 30


def test_a_beton_made_elsewhere_yields_rows_and_label_numbers(data, tmp_path):
    """Only 'image' and 'label' (ffcv-imagenet's layout), no sidecar: indices are the rows."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    samples = [(img, i % 2) for i, img in enumerate(source_pixels(data)[:10])]
    path = tmp_path / "plain.beton"
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(samples)
    loader = build_loader(cfg_for(data, ffcv_path=str(path), ffcv_order="sequential", drop_last=False),
                          DistInfo(0, 1, 0, CPU))
    views, labels, indices = stacked(epoch(loader))
    assert indices.tolist() == list(range(10)) and labels.tolist() == [i % 2 for i in range(10)]
    assert loader.classes == ["0", "1"] and views[0].shape == (10, 3, SIZE, SIZE)


def test_missing_beton_names_the_convert_command(tmp_path):
    with pytest.raises(DataError, match="convert.py ffcv"):
        build_loader(cfg_for(tmp_path), DistInfo(0, 1, 0, CPU))
    assert beton_path(cfg_for(tmp_path), "val") == tmp_path / "val.beton"
    assert beton_path(cfg_for(tmp_path, ffcv_path="/b/{split}.beton"), "val") == Path("/b/val.beton")
    assert beton_path(cfg_for(tmp_path, ffcv_path="/b/in.beton"), "train") == Path("/b/in.beton")


@pytest.mark.gpu
def test_cuda_batches_match_cpu_batches(data, fused_epoch0):
    device = torch.device("cuda", 0)
    batches = epoch(build_loader(cfg_for(data), DistInfo(0, 1, 0, device)), 0)
    for (gv, gl, gi), (cv, cl, ci) in zip(batches, fused_epoch0[1], strict=True):
        assert gi.device.type == "cuda" and torch.equal(gi.cpu(), ci) and torch.equal(gl.cpu(), cl)
        for g, c in zip(gv, cv):
            assert g.is_contiguous(memory_format=torch.channels_last) and torch.equal(g.cpu(), c)


# ---- multi-crop: every size from one decode, the torchvision loader's boxes -----------------------

MULTI = "2x48@0.3-1,3x24@0.05-0.3"


@pytest.fixture(scope="module")
def full_size_raw(data, tmp_path_factory) -> Path:
    """The train folder as raw pixels at full size (no --max-res cap): the torchvision loader's images."""
    out = tmp_path_factory.mktemp("full") / "train.beton"
    convert_beton(data / "train", out, mode="raw", max_res=1024, workers=2, progress=False)
    return out


def test_multicrop_sizes_fused_equals_per_view_and_resume(data, full_size_raw):
    cfg = cfg_for(data, crops=MULTI, views=5, ffcv_path=str(full_size_raw))
    loader = build_loader(cfg, DistInfo(0, 1, 0, CPU))
    full = epoch(loader, 1)
    assert len(full) == 24 // BATCH
    for views, _, _ in full:
        assert [tuple(v.shape) for v in views] == [(BATCH, 3, 48, 48)] * 2 + [(BATCH, 3, 24, 24)] * 3
        assert all(v.is_contiguous(memory_format=torch.channels_last) for v in views)
    per_view = epoch(build_loader(cfg_for(data, crops=MULTI, views=5, ffcv_path=str(full_size_raw), ffcv_fused=False),
                                  DistInfo(0, 1, 0, CPU)), 1)
    resumed = epoch(loader, 1, start_batch=1)
    for other, skip in ((per_view, 0), (resumed, 1)):
        for (av, _, ai), (bv, _, bi) in zip(full[skip:], other, strict=True):
            assert torch.equal(ai, bi) and all(torch.equal(x, y) for x, y in zip(av, bv, strict=True))


def test_multicrop_crops_equal_the_torchvision_loaders(data, full_size_raw):
    """Same seed, epoch and index: FFCV's crops are the torchvision loader's crops, view by view.

    Raw mode, so FFCV's pixel is cv2 INTER_AREA of the spec.boxes box exactly; the torchvision
    loader resizes the same box with PIL's antialiased bilinear, so the two agree to resampling
    error, and a view set against another view of the same image does not."""
    info = DistInfo(0, 1, 0, CPU)
    ffcv = stacked(epoch(build_loader(cfg_for(data, crops=MULTI, views=5, ffcv_path=str(full_size_raw)), info), 2))
    tv_cfg = apply(cfg_for(data, crops=MULTI, views=5), {"loader": "torchvision", "workers": 0}, "test_ffcv")
    tv = stacked(epoch(build_loader(tv_cfg, info), 2))
    assert torch.equal(ffcv[2], tv[2]) and torch.equal(ffcv[1], tv[1])           # same order, same labels
    sources = [np.asarray(load_rgb(scan_image_folder(data / "train").root / p)[0])
               for p in scan_image_folder(data / "train").paths]
    spec = loader_spec(cfg_for(data, crops=MULTI, views=5), info)
    same, other = [], []
    for n, index in enumerate(ffcv[2].tolist()):
        boxes = spec.boxes(2, index, *sources[index].shape[:2])
        for v in range(5):
            top, left, h, w, flip = boxes[v]
            ref = cv2.resize(np.ascontiguousarray(sources[index][top:top + h, left:left + w]),
                             (spec.view_sizes[v],) * 2, interpolation=cv2.INTER_AREA)
            ours = ffcv[0][v][n].permute(1, 2, 0).numpy()
            assert np.array_equal(ours, ref[:, ::-1] if flip else ref)          # the box, exactly
            same.append(psnr(ours, tv[0][v][n].permute(1, 2, 0).numpy()))
            other.append(psnr(ours, tv[0][(v + 1) % 2 if v < 2 else 2 + (v - 1) % 3][n].permute(1, 2, 0).numpy()))
    assert np.median(same) > 38 and min(same) > 28                              # measured 44.8, 35.0
    assert np.median(other) < 25                                                # measured 15.0


# ---- bad images: a JPEG that stopped decoding after the .beton was written ------------------------

BAD_ROWS = (3, 20)        # class 0 and class 2 (8 images per class, rows in folder order)


@pytest.fixture(scope="module")
def broken_beton(data, tmp_path_factory) -> Path:
    """train.beton with the JPEGs of BAD_ROWS broken (their first bytes zeroed: no JPEG header)."""
    from ffcv.reader import Reader
    out = tmp_path_factory.mktemp("broken") / "train.beton"
    shutil.copy(data / "train.beton", out)
    shutil.copy(data / "train.beton.json", out.with_name("train.beton.json"))
    meta = Reader(str(out)).metadata["f0"]
    with open(out, "r+b") as f:
        for row in BAD_ROWS:
            f.seek(int(meta[row]["data_ptr"]))
            f.write(b"\0" * 16)
    return out


def test_bad_jpeg_is_replaced_by_the_next_of_its_class_named_and_resumable(data, broken_beton):
    info = DistInfo(0, 1, 0, CPU)
    loader = build_loader(cfg_for(data, ffcv_path=str(broken_beton)), info)
    full = epoch(loader, 4)
    views, labels, indices = stacked(full)
    images = scan_image_folder(data / "train")
    assert not set(BAD_ROWS) & set(indices.tolist())
    counts = np.bincount(indices.numpy(), minlength=24)
    for row in BAD_ROWS:                                  # its stand-in: the next image of its class
        assert counts[row + 1] == 2 and images.labels[row + 1] == images.labels[row]
        first, second = np.flatnonzero(indices.numpy() == row + 1)
        assert all(torch.equal(v[first], v[second]) for v in views)   # the stand-in's own crops
    assert labels.tolist() == [images.labels[i] for i in indices.tolist()]
    assert sorted(loader.bad_images) == sorted(f"{broken_beton} row {r} (index {r}): libjpeg-turbo cannot decode "
                                               f"the JPEG" for r in BAD_ROWS)
    resumed = epoch(build_loader(cfg_for(data, ffcv_path=str(broken_beton)), info), 4, start_batch=1)
    for (av, al, ai), (bv, bl, bi) in zip(full[1:], resumed, strict=True):
        assert torch.equal(ai, bi) and torch.equal(al, bl) and all(torch.equal(x, y) for x, y in zip(av, bv))


def test_bad_jpeg_stops_under_stop_or_past_max_bad_images(data, broken_beton):
    info = DistInfo(0, 1, 0, CPU)
    for overrides, says in (({"bad_images": "stop"}, r"row (3|20) \(index (3|20)\).*bad_images=stop"),
                            ({"max_bad_images": 1}, "2 bad images, more than max_bad_images=1")):
        loader = build_loader(cfg_for(data, ffcv_path=str(broken_beton), drop_last=False, **overrides), info)
        with pytest.raises(DataError, match=says):
            epoch(loader, 0)


# ---- last: numba takes minutes to type a new decode kernel once kernels for both FFCV page layouts
# (OS cache and process cache) exist in the process, so every other pipeline compiles before this one

def test_process_cache_reads_the_same_pixels(data, fused_epoch0):
    cached = epoch(build_loader(cfg_for(data, ffcv_os_cache=False), DistInfo(0, 1, 0, CPU)), 0)
    for (av, _, ai), (bv, _, bi) in zip(fused_epoch0[1], cached, strict=True):
        assert torch.equal(ai, bi) and all(torch.equal(x, y) for x, y in zip(av, bv))
