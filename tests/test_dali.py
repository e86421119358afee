"""The DALI loader (pipelines/loaders/dali_loader.py) and the webdataset shards it reads (pipelines/tools/webdataset.py).

CI runs the CPU decoder (device cpu, DALI device_id=None); the nvJPEG ("mixed") paths run when CUDA is
there (@pytest.mark.gpu) and are skipped otherwise.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convert
from conftest import have_loader_library, make_image_folder, skimage_photos
from masksiam.config import Config
from masksiam.dist import DistInfo
from pipelines.loaders import build_loader
from pipelines.loaders.common import DataError, random_resized_crop_params, sample_rng, scan_image_folder, shard_indices
from pipelines.loaders.torchvision_loader import crop_flip
from pipelines.tools.validate import image_size

HAVE_DALI = have_loader_library("nvidia.dali")  # an error, not skips, where the project installed it
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
pytestmark = pytest.mark.dali
REPO = Path(__file__).resolve().parent.parent


def loader(data, *, backend="dali", split="train", train=True, device="cpu", rank=0, world_size=1, **overrides):
    cfg = Config(**{"data": str(data), "loader": backend, "batch_size": 4, "views": 2, "size": 32, "workers": 2,
                    **overrides})
    return build_loader(cfg, DistInfo(rank, world_size, 0, torch.device(device)), split, train)


def epoch(ld, e=0, start_batch=0):
    ld.set_epoch(e, start_batch)
    return list(ld)


def interior(x: torch.Tensor) -> torch.Tensor:
    """Leave out the outermost pixel ring: there PIL's box filter reads pixels outside the crop box,
    a crop cut out first (torch, DALI's decoded window) does not."""
    return x[..., 1:-1, 1:-1]


def jpeg_bytes(photo: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(photo).save(out, format="JPEG", quality=90)
    return out.getvalue()


# ---- the contract --------------------------------------------------------------------------------

@needs_dali
def test_batches_follow_the_contract(image_folder):
    ld = loader(image_folder, views=3, size=40)
    images = scan_image_folder(image_folder / "train")
    batches = epoch(ld)
    assert len(batches) == len(ld) == 24 // 4
    assert ld.classes == images.classes == ["class_00", "class_01", "class_02"]
    for b in batches:
        assert len(b.views) == 3
        for v in b.views:
            assert v.shape == (4, 3, 40, 40) and v.dtype == torch.uint8 and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last)
        assert b.labels.dtype == b.indices.dtype == torch.int64
        assert b.labels.tolist() == [images.labels[i] for i in b.indices.tolist()]
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == list(range(24))
    assert seen.tolist() != list(range(24))  # shuffled


@needs_dali
def test_same_images_and_pixels_as_torchvision(image_folder):
    """Same order, labels and crop boxes as the reference; pixels within one JPEG/rounding level (both
    decoders are libjpeg-turbo with fancy upsampling; the crops resize with the same filter)."""
    for e in (0, 3):
        for ours, ref in zip(epoch(loader(image_folder, size=48), e),
                             epoch(loader(image_folder, backend="torchvision", size=48), e)):
            assert torch.equal(ours.indices, ref.indices) and torch.equal(ours.labels, ref.labels)
            for a, b in zip(ours.views, ref.views):
                diff = (a.int() - b.int()).abs()
                assert interior(diff).max() <= 2, interior(diff).max()
                assert diff.float().mean() < 0.5


@needs_dali
def test_eval_matches_torchvision(image_folder):
    """train=False: one resize-then-center-crop view in file order, as torchvision_loader.eval_transform."""
    ours = epoch(loader(image_folder, split="val", train=False, size=40))
    ref = epoch(loader(image_folder, backend="torchvision", split="val", train=False, size=40))
    assert [b.indices.tolist() for b in ours] == [b.indices.tolist() for b in ref] == [[0, 1, 2, 3], [4, 5]]
    for a, b in zip(ours, ref):
        assert len(a.views) == 1
        assert (a.views[0].int() - b.views[0].int()).abs().max() <= 1


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_gpu_crop_graph_on_cpu_matches_torchvision(image_folder, train):
    """The graph the GPU path runs (DALI's fn.resize on the decoded window, a reversed ROI for flips,
    a fractional ROI for the eval crop), run on the CPU: same pixels as the reference."""
    from pipelines.loaders.dali_loader import DaliLoader
    from pipelines.loaders.samples import open_split
    from pipelines.loaders.spec import loader_spec
    split = "train" if train else "val"
    cfg = Config(data=str(image_folder), loader="dali", batch_size=4, views=2, size=48, workers=2)
    spec = loader_spec(cfg, DistInfo(0, 1, 0, torch.device("cpu")), train)
    ours = DaliLoader(open_split(image_folder / split), spec, decoder="cpu", crop_in_dali=True)
    ref = loader(image_folder, backend="torchvision", split=split, train=train, size=48)
    for a, b in zip(epoch(ours, 1), epoch(ref, 1)):
        assert torch.equal(a.indices, b.indices) and len(a.views) == len(b.views) == (2 if train else 1)
        for u, v in zip(a.views, b.views):
            assert u.is_contiguous(memory_format=torch.channels_last)
            diff = (u.int() - v.int()).abs()
            assert interior(diff).max() <= 2 and diff.float().mean() < 0.5


def test_fixed_window_crop_matches_pil():
    """crop_resize (the CPU crop) against torchvision_loader.crop_flip (PIL) on fixed boxes:
    downscale, upscale, the whole image, flipped."""
    from pipelines.loaders.dali_loader import crop_resize
    photo = skimage_photos()[0]  # astronaut, 512 x 512
    img = Image.fromarray(photo)
    for box, flip in [((10, 20, 300, 200), False), ((100, 50, 20, 30), True), ((0, 0, 512, 512), True),
                      ((211, 7, 97, 301), False)]:
        ours = crop_resize(torch.from_numpy(photo), (*box, float(flip)), 64).numpy().astype(int)
        ref = crop_flip(img, box, 64, flip).astype(int)
        assert ours.shape == ref.shape == (64, 64, 3)
        assert np.abs(ours - ref)[1:-1, 1:-1].max() <= 1, box
        assert np.abs(ours - ref).mean() < 1.0


@needs_dali
@pytest.mark.parametrize("crop_in_dali", [False, True])
def test_batches_stay_valid_after_the_next(image_folder, crop_in_dali):
    """A Batch handed out owns its memory: kept across the rest of the epoch and the next one (more
    batches than DALI's prefetch queue and the planner hold), its views, labels and indices are
    unchanged; the views DALI produced were copied into torch's memory (a resizable storage), not
    DLPack views of DALI's buffers."""
    from pipelines.loaders.dali_loader import DaliLoader
    from pipelines.loaders.samples import open_split
    from pipelines.loaders.spec import loader_spec
    cfg = Config(data=str(image_folder), loader="dali", batch_size=3, views=2, size=32, workers=2, prefetch=2)
    spec = loader_spec(cfg, DistInfo(0, 1, 0, torch.device("cpu")), True)
    ld = DaliLoader(open_split(image_folder / "train"), spec, decoder="cpu", crop_in_dali=crop_in_dali)
    kept, copies = [], []
    for e in (0, 1):
        ld.set_epoch(e)
        for b in ld:
            kept.append(b)
            copies.append([t.clone() for t in (*b.views, b.labels, b.indices)])
    assert len(kept) == 2 * 8
    for b, c in zip(kept, copies):
        for t, ref in zip((*b.views, b.labels, b.indices), c):
            assert torch.equal(t, ref)
        if crop_in_dali:
            assert all(v.untyped_storage().resizable() for v in (*b.views, b.labels, b.indices))
    assert len({tuple(b.indices.tolist()) for b in kept}) == len(kept)


@needs_dali
def test_headers_are_parsed_once_per_loader(image_folder, monkeypatch):
    """The (H, W) header of each image is read on its first epoch only; later epochs reuse it."""
    from pipelines.loaders import dali_loader
    calls = []
    real = dali_loader.image_size
    monkeypatch.setattr(dali_loader, "image_size", lambda data: calls.append(1) or real(data))
    ld = loader(image_folder, batch_size=4)
    first = epoch(ld, 0)
    assert len(calls) == 24
    second = epoch(ld, 1)
    assert len(calls) == 24 and len(second) == len(first)


# ---- order, sharding, reproducibility --------------------------------------------------------------

@needs_dali
@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_are_disjoint_and_cover(image_folder, drop_last):
    """3 ranks, 22 images, per-rank batch 3: each rank gets shard_indices(...), ranks are disjoint
    (except the wrap-around padding without drop_last) and together cover the epoch."""
    n, world, per_rank = 22, 3, 3
    per = {}
    for rank in range(world):
        ld = loader(image_folder, rank=rank, world_size=world, batch_size=per_rank * world, max_images=n,
                    drop_last=drop_last)
        batches = epoch(ld, 2)
        assert len(batches) == len(ld)
        sizes = [len(b.indices) for b in batches]
        assert sizes == ([3] * 2 if drop_last else [3, 3, 2])
        per[rank] = torch.cat([b.indices for b in batches]).tolist()
        assert per[rank] == shard_indices(n, rank, world, 0, 2, per_rank, drop_last=drop_last).tolist()
    union = [i for rank in per for i in per[rank]]
    if drop_last:
        assert len(set(union)) == len(union) == 18  # 22 // 9 global batches of 9
    else:
        assert set(union) == set(range(n)) and len(union) == 24  # 2 padded by wrapping around
    assert per[0] != epoch_order(image_folder, n, world, drop_last, e=3)


def epoch_order(image_folder, n, world, drop_last, e):
    ld = loader(image_folder, rank=0, world_size=world, batch_size=9, max_images=n, drop_last=drop_last)
    return torch.cat([b.indices for b in epoch(ld, e)]).tolist()


MULTI_CROP = "2x48@0.3-1,3x24@0.05-0.3"   # 2 global + 3 local views


@needs_dali
@pytest.mark.parametrize("crop_in_dali", [False, True])
def test_multi_crop_decodes_once_same_crops_as_torchvision(image_folder, crop_in_dali):
    """crops=: every view at its own size, each image decoded once (one window per image, the union of
    its 5 boxes), the boxes spec.boxes draws, and so the torchvision loader's pixels, view by view;
    the host crop (torch) and the GPU graph (DALI's fn.resize, run on the CPU) alike."""
    from pipelines.loaders.dali_loader import DaliLoader
    from pipelines.loaders.samples import open_split
    from pipelines.loaders.spec import loader_spec
    cfg = Config(data=str(image_folder), loader="dali", batch_size=4, views=5, crops=MULTI_CROP, workers=2)
    spec = loader_spec(cfg, DistInfo(0, 1, 0, torch.device("cpu")), True)
    assert spec.view_sizes == (48, 48, 24, 24, 24)
    ours = DaliLoader(open_split(image_folder / "train"), spec, decoder="cpu", crop_in_dali=crop_in_dali)
    ref = loader(image_folder, backend="torchvision", views=5, crops=MULTI_CROP)

    # the plan of one batch: one encoded image and one window per sample; window + box = spec.boxes
    indices = spec.shard(len(ours.samples), 2)[:4]
    plan = ours._plan_batch(2, indices)
    start, shape = plan.inputs[1], plan.inputs[2]                  # (n, 2) x, y and w, h
    assert len(plan.encoded) == len(indices) and plan.views.shape == (5, 4, 5)
    for k, i in enumerate(indices):
        height, width = image_size(ours.samples.read(int(i)))
        want = spec.boxes(2, int(i), height, width).astype(np.float32)  # (V, 5) top, left, h, w, flip
        got = plan.views[:, k].copy()
        got[:, 0] += start[k, 1]
        got[:, 1] += start[k, 0]
        np.testing.assert_array_equal(got, want)
        assert (plan.views[:, k, 0] >= 0).all() and (plan.views[:, k, 0] + plan.views[:, k, 2] <= shape[k, 1]).all()
        assert (plan.views[:, k, 1] >= 0).all() and (plan.views[:, k, 1] + plan.views[:, k, 3] <= shape[k, 0]).all()

    for e in (0, 2):
        for a, b in zip(epoch(ours, e), epoch(ref, e)):
            assert torch.equal(a.indices, b.indices) and len(a.views) == len(b.views) == 5
            for u, v, size in zip(a.views, b.views, spec.view_sizes):
                assert u.shape == v.shape == (4, 3, size, size)
                assert u.is_contiguous(memory_format=torch.channels_last)
                diff = (u.int() - v.int()).abs()
                assert interior(diff).max() <= 2 and diff.float().mean() < 0.5


@needs_dali
def test_same_seed_same_crops_and_resume(image_folder):
    a, b, c = (loader(image_folder, seed=s) for s in (5, 5, 6))
    first, second, other = epoch(a, 1), epoch(b, 1), epoch(c, 1)
    for x, y in zip(first, second):
        assert torch.equal(x.indices, y.indices)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    assert not all(torch.equal(x.views[0], y.views[0]) for x, y in zip(first, other))
    # resume mid-epoch: the same batches from start_batch on
    resumed = epoch(a, 1, start_batch=2)
    assert len(resumed) == len(first) - 2
    for x, y in zip(first[2:], resumed):
        assert torch.equal(x.indices, y.indices) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    # an iteration abandoned half way leaves nothing behind
    a.set_epoch(1)
    for i, _ in enumerate(a):
        if i == 1:
            break
    again = epoch(a, 1)
    assert [x.indices.tolist() for x in again] == [x.indices.tolist() for x in first]


@needs_dali
def test_prefetch_threads_and_partial_last_batch(image_folder):
    for workers, prefetch in [(1, 1), (3, 3)]:
        ld = loader(image_folder, batch_size=8, max_images=22, drop_last=False, workers=workers, prefetch=prefetch)
        sizes = [len(b.indices) for b in epoch(ld)]
        assert sizes == [8, 8, 6] and len(ld) == 3
        assert [b.views[1].shape[0] for b in epoch(ld, 1)] == [8, 8, 6]
    assert len(loader(image_folder, batch_size=8, max_images=22)) == 2  # drop_last


# ---- crop geometry and statistics ------------------------------------------------------------------

COORD_SIZES = [(256, 192), (200, 256), (240, 240), (256, 100)]  # (width, height)


def coordinate_folder(root: Path, per_size: int = 4) -> Path:
    """Lossless PNGs whose red channel is the column and green the row: a crop's pixels tell its box."""
    for k, (w, h) in enumerate(COORD_SIZES):
        d = root / "train" / f"class_{k}"
        d.mkdir(parents=True)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8)
        for i in range(per_size):
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def recover_boxes(view: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) crops of coordinate images -> (N, 5) top, left, height, width, flip.

    Output pixel j samples source coordinate left + (j + 0.5) * width / S - 0.5; columns 1 and
    S - 2 (one in from the border, where the filter is not clamped) give left and width.
    """
    s = view.shape[-1]
    x = view.double()
    c1, c2 = x[:, 0, :, 1].mean(1), x[:, 0, :, s - 2].mean(1)
    r1, r2 = x[:, 1, 1, :].mean(1), x[:, 1, s - 2, :].mean(1)
    flip = c2 < c1
    lo, hi = torch.minimum(c1, c2), torch.maximum(c1, c2)
    width, height = (hi - lo) * s / (s - 3), (r2 - r1) * s / (s - 3)
    left, top = lo - 1.5 * width / s + 0.5, r1 - 1.5 * height / s + 0.5
    return torch.stack([top, left, height, width, flip.double()], 1).numpy()


@needs_dali
def test_crop_boxes_and_statistics(tmp_path):
    """End to end through decode, crop, resize and flip: every recovered box is the one drawn from
    sample_rng as the spec says (within 2 px), and over ~1000 boxes the area fraction, aspect ratio
    and flip rate follow RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) like torchvision's own
    get_params on the same image sizes."""
    from torchvision.transforms import v2
    root = coordinate_folder(tmp_path)
    images = scan_image_folder(root / "train")
    dims = [COORD_SIZES[label] for label in images.labels]
    ld = loader(root, size=32, batch_size=16, views=2, seed=3)
    ours, errors = [], []
    for e in range(32):
        for b in epoch(ld, e):
            boxes = [recover_boxes(v) for v in b.views]
            for k, i in enumerate(b.indices.tolist()):
                w, h = dims[i]
                rng = sample_rng(3, e, i)
                for v in range(2):
                    expected = (*random_resized_crop_params(h, w, (0.08, 1.0), (3 / 4, 4 / 3), rng), rng.random() < 0.5)
                    got = boxes[v][k]
                    errors.append(np.abs(got[:4] - expected[:4]).max())
                    assert bool(got[4]) == expected[4]
                    ours.append((got[2] * got[3] / (w * h), np.log(got[3] / got[2]), got[4]))
    ours = np.array(ours)
    assert len(ours) == 32 * 16 * 2 and max(errors) <= 2.0, max(errors)

    torch.manual_seed(0)
    ref = []
    for w, h in dims * 64:
        _, _, ch, cw = v2.RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        ref.append((ch * cw / (w * h), np.log(cw / ch)))
    ref = np.array(ref)
    assert 0.07 <= ours[:, 0].min() and ours[:, 0].max() <= 1.02
    assert abs(ours[:, 0].mean() - ref[:, 0].mean()) < 0.04           # se of the difference ~0.012
    assert abs(np.median(ours[:, 0]) - np.median(ref[:, 0])) < 0.06
    assert abs(ours[:, 1].mean() - ref[:, 1].mean()) < 0.03           # log aspect, se ~0.008
    assert abs(ours[:, 1].std() - ref[:, 1].std()) < 0.03
    assert np.abs(ours[:, 1]).max() <= np.log(4 / 3) + 0.05
    assert abs(ours[:, 2].mean() - 0.5) < 0.06                       # flips, se ~0.016


# ---- bad files ------------------------------------------------------------------------------------

def folder_with(root: Path, bad_name: str, bad_bytes: bytes) -> Path:
    photo = skimage_photos()[1][:120, :160]
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            (root / "train" / cls / f"{i}.jpg").write_bytes(jpeg_bytes(np.roll(photo, 9 * i, 1)))
    (root / "train" / "b" / bad_name).write_bytes(bad_bytes)
    return root


@needs_dali
def test_bad_files_are_named(tmp_path):
    good = jpeg_bytes(skimage_photos()[1][:120, :160])
    first_len = good[4] << 8 | good[5]
    cases = {
        "text.jpg": (b"definitely not a jpeg", "not a readable image"),             # the host's header check
        "junk.jpg": (good[:4 + first_len] + b"\x00\x11" + good[4 + first_len:],     # DALI's parser rule
                     "invalid JPEG marker"),
        "truncated.jpg": (good[:len(good) // 2], "truncated"),                     # DALI's decoder fails
    }
    for name, (data, reason) in cases.items():
        root = folder_with(tmp_path / name, name, data)
        ld = loader(root, batch_size=2, bad_images="stop")
        for attempt in range(2):  # and again: the loader recovers from the failed pipeline
            with pytest.raises(DataError) as err:
                epoch(ld, attempt)
            assert f"b/{name}" in str(err.value) and reason in str(err.value), str(err.value)


@needs_dali
@pytest.mark.parametrize("name", ["text.jpg", "junk.jpg", "truncated.jpg"])
def test_bad_images_skip_replaces_names_and_resumes(tmp_path, name):
    """bad_images=skip (the default): the bad file (found on the host, by DALI's parser or by its
    decoder) is replaced by the next image of its class (common.replacement: b/0.jpg, wrapping
    around), named once in loader.bad_images; the epoch is whole and a resume sees the same batches."""
    good = jpeg_bytes(skimage_photos()[1][:120, :160])
    first_len = good[4] << 8 | good[5]
    data = {"text.jpg": b"definitely not a jpeg", "junk.jpg": good[:4 + first_len] + b"\x00\x11" + good[4 + first_len:],
            "truncated.jpg": good[:len(good) // 2]}[name]
    root = folder_with(tmp_path, name, data)
    files = scan_image_folder(root / "train").paths
    bad, stand_in = files.index(f"b/{name}"), files.index("b/0.jpg")
    ld = loader(root, batch_size=2, drop_last=False)
    batches = epoch(ld, 0)
    indices = torch.cat([b.indices for b in batches]).tolist()
    order = shard_indices(len(files), 0, 1, 0, 0, 2, drop_last=False).tolist()
    assert indices == [stand_in if i == bad else i for i in order]
    assert len(ld.bad_images) == 1 and f"b/{name}" in ld.bad_images[0]
    k = order.index(bad) // 2                       # the batch that holds the stand-in
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels[order.index(bad)] == 1            # class b
    resumed = epoch(ld, 0, start_batch=k)
    for a, b in zip(resumed, batches[k:]):
        assert torch.equal(a.indices, b.indices)
        for u, v in zip(a.views, b.views):
            assert torch.equal(u, v)
    assert len(ld.bad_images) == 1                  # still one entry: the same image, met again
    if name != "junk.jpg":                          # PIL reads junk.jpg: the torchvision loader keeps it
        ref = epoch(loader(root, backend="torchvision", batch_size=2, drop_last=False), 0)
        assert torch.cat([b.indices for b in ref]).tolist() == indices


@needs_dali
def test_corrupt_validation_image_is_named_and_counted(tmp_path, capsys):
    """A truncated JPEG in val (DALI's decoder fails on it, "Premature end of JPEG data", naming no
    file): the loader names the file on a printed line, counts it in loader.bad_images, and each
    evaluation pass says how many images it leaves out (the stand-in is a duplicate the kNN counts
    once); same indices as the torchvision loader. A second pass says it again."""
    photo = skimage_photos()[1][:120, :160]
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                (tmp_path / split / cls / f"{i}.jpg").write_bytes(jpeg_bytes(np.roll(photo, 9 * i, 1)))
    good = jpeg_bytes(photo)
    (tmp_path / "val" / "b" / "1.jpg").write_bytes(good[:len(good) // 2])
    ld = loader(tmp_path, split="val", train=False)
    indices = [b.indices.tolist() for b in epoch(ld)]
    out = capsys.readouterr().out
    assert indices == [[0, 1, 2, 3], [5, 5]]                      # b/1.jpg replaced by b/2.jpg
    assert len(ld.bad_images) == 1 and "b/1.jpg" in ld.bad_images[0] and "truncated" in ld.bad_images[0]
    assert "val/b/1.jpg" in out and "replaced by the next image" in out
    assert "1 of 6 evaluation images" in out and "left out of this evaluation" in out
    ref = loader(tmp_path, backend="torchvision", split="val", train=False)
    assert [b.indices.tolist() for b in epoch(ref)] == indices
    assert [b.indices.tolist() for b in epoch(ld)] == indices    # known bad now: replaced on the host
    assert "1 of 6 evaluation images" in capsys.readouterr().out and len(ld.bad_images) == 1


@needs_dali
def test_bad_images_past_the_limit_stop_the_run(tmp_path):
    """More than max_bad_images distinct bad images (one the host finds, one DALI's decoder rejects)
    raise a DataError naming them."""
    good = jpeg_bytes(skimage_photos()[1][:120, :160])
    root = folder_with(tmp_path, "truncated.jpg", good[:len(good) // 2])
    (root / "train" / "a" / "text.jpg").write_bytes(b"definitely not a jpeg")
    assert len(epoch(loader(root, batch_size=2, drop_last=False, max_bad_images=2), 0)) == 4
    with pytest.raises(DataError, match="more than max_bad_images=1") as err:
        epoch(loader(root, batch_size=2, drop_last=False, max_bad_images=1), 0)
    assert "a/text.jpg" in str(err.value) and "b/truncated.jpg" in str(err.value)


@needs_dali
def test_a_dropped_loader_frees_its_pipeline_at_once(image_folder):
    """No reference cycle through DALI's pipeline: otherwise the garbage collector could free it
    inside a forked DataLoader worker (torchvision loader, after a DALI one), where it segfaults."""
    import gc
    import weakref
    ld = loader(image_folder)
    epoch(ld)
    pipe, ref = weakref.ref(ld._pipe), weakref.ref(ld)
    gc.disable()
    try:
        del ld
        assert ref() is None and pipe() is None
    finally:
        gc.enable()


def test_missing_dali_says_how_to_install(monkeypatch):
    from pipelines.loaders import dali_loader
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match="make install"):
        dali_loader.import_dali()


def test_dali_is_imported_only_by_the_loader():
    code = ("import sys, pipelines, pipelines.loaders.dali_loader, pipelines.tools.webdataset, pipelines.tools.validate, convert; "
            "assert 'nvidia.dali' not in sys.modules, 'imported at module level'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_dali_device_choice():
    from pipelines.loaders.dali_loader import resolve_decoder
    assert resolve_decoder("auto", torch.device("cpu")) == "cpu"
    assert resolve_decoder("cpu", torch.device("cuda", 0)) == "cpu"
    assert resolve_decoder("auto", torch.device("cuda", 0)) == "mixed"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_decoder("gpu", torch.device("cpu"))


# ---- webdataset shards -----------------------------------------------------------------------------

def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_webdataset_layout_and_determinism(tmp_path, image_folder):
    out = tmp_path / "wds"
    assert convert.main(["webdataset", "--src", str(image_folder), "--out", str(out), "--shard-size", "10"]) == 0
    assert (out / ".complete").is_file()
    meta = json.loads((out / "train" / "index.json").read_text())
    assert meta["classes"] == ["class_00", "class_01", "class_02"] and meta["num_samples"] == 24
    assert [s["num_samples"] for s in meta["shards"]] == [10, 10, 4] and meta["skipped"] == []
    images = scan_image_folder(image_folder / "train")
    with tarfile.open(out / "train" / "shard-000001.tar") as tar:
        names = tar.getnames()
        first = images.paths[10][:-len(".jpg")]  # shards keep the folder order: 10..19 here
        assert names[:3] == [f"{first}.jpg", f"{first}.cls", f"{images.paths[11][:-4]}.jpg"] and len(names) == 20
        assert tar.extractfile(f"{first}.jpg").read() == (image_folder / "train" / images.paths[10]).read_bytes()
        assert tar.extractfile(f"{first}.cls").read() == str(images.labels[10]).encode()
        assert {m.mtime for m in tar.getmembers()} == {0}
    idx = (out / "train" / "shard-000001.idx").read_text().splitlines()
    assert idx[0] == "v1.2 10" and len(idx) == 11
    ext, offset, size, name = idx[1].split()[:4]
    raw = (out / "train" / "shard-000001.tar").read_bytes()
    assert (ext, name) == ("jpg", f"{first}.jpg")
    assert raw[int(offset):int(offset) + int(size)] == (image_folder / "train" / images.paths[10]).read_bytes()
    # deterministic, refuses to overwrite, --force replaces atomically
    again = tmp_path / "again"
    convert.main(["webdataset", "--src", str(image_folder), "--out", str(again), "--shard-size", "10"])
    assert tree(out) == tree(again)
    with pytest.raises(DataError, match="--force"):
        convert.main(["webdataset", "--src", str(image_folder), "--out", str(out), "--shard-size", "7"])
    convert.main(["webdataset", "--src", str(image_folder), "--out", str(out), "--shard-size", "7", "--force"])
    assert len(list((out / "train").glob("*.tar"))) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_webdataset_skips_bad_files(tmp_path, image_folder):
    src = tmp_path / "src"
    make_image_folder(src, classes=2, per_class=4)
    (src / "train" / "class_01" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    out = tmp_path / "wds"
    convert.main(["webdataset", "--src", str(src), "--out", str(out), "--shard-size", "3"])
    meta = json.loads((out / "train" / "index.json").read_text())
    assert meta["num_samples"] == 8 and len(meta["skipped"]) == 1
    assert meta["skipped"][0]["file"].endswith("class_01/zz_bad.jpg") and meta["skipped"][0]["reason"]
    with pytest.raises(DataError, match="zz_bad.jpg"):
        convert.main(["webdataset", "--src", str(src), "--out", str(tmp_path / "x"), "--shard-size", "3",
                      "--on-bad", "fail"])
    assert not (tmp_path / "x").exists()


@needs_dali
def test_loader_reads_webdataset_like_the_folder(tmp_path, image_folder):
    """data= pointing at shards gives the same images, labels and pixels as the ImageFolder."""
    out = tmp_path / "wds"
    convert.main(["webdataset", "--src", str(image_folder), "--out", str(out), "--shard-size", "5"])
    for split, train in (("train", True), ("val", False)):
        shards = epoch(loader(out, split=split, train=train), 1)
        folder = epoch(loader(image_folder, split=split, train=train), 1)
        assert len(shards) == len(folder) > 0
        for a, b in zip(shards, folder):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            assert all(torch.equal(u, v) for u, v in zip(a.views, b.views))
    assert loader(out, max_images=10).samples.names == loader(image_folder, max_images=10).samples.names


@needs_dali
def test_dali_webdataset_reader_reads_our_index(tmp_path, image_folder):
    """The .idx files are DALI's format: fn.readers.webdataset reads every sample and label."""
    from nvidia.dali import fn, pipeline_def
    out = tmp_path / "wds"
    convert.main(["webdataset", "--src", str(image_folder), "--out", str(out), "--shard-size", "10"])
    tars = sorted(str(p) for p in (out / "train").glob("*.tar"))

    @pipeline_def(batch_size=24, num_threads=1, device_id=None)
    def read():
        jpegs, labels = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                              ext=["jpg", "cls"])
        return jpegs, labels

    pipe = read()
    jpegs, labels = pipe.run()
    images = scan_image_folder(image_folder / "train")
    assert [int(bytes(np.array(labels[k])).decode()) for k in range(24)] == images.labels
    assert [np.array(jpegs[k]).tobytes() for k in range(3)] == \
        [(image_folder / "train" / p).read_bytes() for p in images.paths[:3]]


# ---- GPU (nvJPEG) ----------------------------------------------------------------------------------

@needs_dali
@pytest.mark.gpu
def test_gpu_batches_are_torch_memory_on_the_consumer_stream(image_folder):
    """nvJPEG + DALI's crop, asked for from a side stream: the views are copies in torch's memory
    (record_stream works on them), made on that stream; DALI's outputs are released at the epoch's
    end; the batches kept stay equal to copies taken when they were handed out."""
    from pipelines.loaders.dali_loader import DaliLoader
    from pipelines.loaders.samples import open_split
    from pipelines.loaders.spec import loader_spec
    cfg = Config(data=str(image_folder), loader="dali", batch_size=3, views=2, size=48, workers=2, prefetch=2)
    spec = loader_spec(cfg, DistInfo(0, 1, 0, torch.device("cuda", 0)), True)
    ld = DaliLoader(open_split(image_folder / "train"), spec, decoder="mixed")
    side = torch.cuda.Stream()
    kept = []
    with torch.cuda.stream(side):
        ld.set_epoch(0)
        for b in ld:
            kept.append((b, [v.clone() for v in b.views]))
            for v in b.views:
                assert v.untyped_storage().resizable() and v.device.type == "cuda"
                v.record_stream(side)
    assert not ld._held
    torch.cuda.synchronize()
    for b, copies in kept:
        assert all(torch.equal(v, c) for v, c in zip(b.views, copies))


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("dali_device", ["gpu", "cpu"])
def test_gpu_paths(image_folder, dali_device):
    """Views on the GPU, channels-last; same images as the reference; pixels close to it (nvJPEG
    upsamples chroma without libjpeg's fancy filter and DALI's resize rounds differently)."""
    ours = epoch(loader(image_folder, device="cuda:0", dali_device=dali_device, size=48), 1)
    ref = epoch(loader(image_folder, backend="torchvision", size=48), 1)
    again = epoch(loader(image_folder, device="cuda:0", dali_device=dali_device, size=48), 1)
    for a, b, c in zip(ours, ref, again):
        assert a.labels.device.type == a.indices.device.type == "cuda"
        assert torch.equal(a.indices.cpu(), b.indices) and torch.equal(a.labels.cpu(), b.labels)
        for u, v, w in zip(a.views, b.views, c.views):
            assert u.device.type == "cuda" and u.dtype == torch.uint8 and u.shape == v.shape
            assert u.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(u, w)  # same seed, same crops
            diff = interior((u.cpu().int() - v.int()).abs()).float()
            assert diff.mean() < 3.0 and diff.quantile(0.99) <= 16, (diff.mean(), diff.quantile(0.99))
