"""The loader spec (pipelines/loaders/spec.py), multi-crop through the torchvision and synthetic
loaders, and bad images (skip / stop / max_bad_images) with exact resume.

FFCV's multi-crop and its crop boxes against the torchvision loader's are in test_ffcv.py.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from masksiam.config import Config, ConfigError, apply
from masksiam.dist import DistInfo
from pipelines.loaders import LOADERS, build_loader
from pipelines.loaders.common import DataError, random_resized_crop_params, sample_rng, scan_image_folder
from pipelines.loaders.spec import CropGroup, eval_short_side, loader_spec, parse_crops
from pipelines.loaders.torchvision_loader import crop_flip, decode_rgb

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
MULTI = "2x40@0.3-1,3x16@0.05-0.3"


def _cfg(folder, **kw):
    base = {"data": str(folder), "loader": "torchvision", "views": 2, "size": 32, "batch_size": 4,
            "workers": 0, "seed": 3}
    if "crops" in kw and "views" not in kw:
        kw["views"] = sum(g.count for g in parse_crops(kw["crops"], 0, 0, (0.08, 1.0)))
    return apply(Config(), {**base, **kw}, "test")


def _epoch(loader, epoch=0, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return [([v.clone() for v in b.views], b.labels.clone(), b.indices.clone()) for b in loader]


# ---- the spec ------------------------------------------------------------------------------------

def test_crops_parse_groups_sizes_and_scales():
    groups = parse_crops("2x224@0.14-1, 6x96@0.05-0.14", 0, 0, (0.08, 1.0))
    assert groups == (CropGroup(2, 224, (0.14, 1.0)), CropGroup(6, 96, (0.05, 0.14)))
    assert parse_crops("", 64, 3, (0.2, 1.0)) == (CropGroup(3, 64, (0.2, 1.0)),)      # views x size
    assert parse_crops("128", 0, 0, (0.2, 1.0)) == (CropGroup(1, 128, (0.2, 1.0)),)    # count, scale default
    for bad, says in (("2x", "COUNTxSIZE"), ("0x96", "at least 1"), ("2x96@0.5-0.2", "lo <= hi"),
                      ("2x96@0-1", "0 < lo"), ("2x96@0.1-1.5", "hi <= 1")):
        with pytest.raises(ConfigError, match=says):
            parse_crops(bad, 0, 0, (0.08, 1.0))


def test_spec_is_where_the_derived_settings_come_from(image_folder):
    cfg = _cfg(image_folder, crops=MULTI, views=5, batch_size=8, eval_size=80, max_images=10, drop_last=True)
    spec = loader_spec(cfg, DistInfo(1, 2, 0, torch.device("cpu")))
    assert spec.batch_size == 4 and spec.rank == 1 and spec.world_size == 2 and spec.drop_last
    assert spec.views == 5 and spec.view_sizes == (40, 40, 16, 16, 16)
    assert spec.view_scales == ((0.3, 1.0),) * 2 + ((0.05, 0.3),) * 3
    np.testing.assert_array_equal(spec.keep(30), np.linspace(0, 29, 10).round())
    ev = loader_spec(cfg, CPU, train=False)
    assert ev.views == 1 and ev.eval_size == 80 and ev.eval_short_side == round(80 / 0.875) == 91
    assert not ev.drop_last and not ev.shuffle and eval_short_side(64) == 64 and eval_short_side(224) == 256
    with pytest.raises(ConfigError, match="batch_size=7.*world size 2|not divisible"):
        loader_spec(_cfg(image_folder, batch_size=7), DistInfo(0, 2, 0, torch.device("cpu")))


def test_every_loader_reads_its_settings_from_the_spec(image_folder, monkeypatch):
    """The loaders never re-derive: a spec with values no config could give reaches them unchanged."""
    import pipelines.loaders as L
    real = L.loader_spec
    odd = {}

    def patched(cfg, info, train=True):
        import dataclasses
        spec = dataclasses.replace(real(cfg, info, train), batch_size=3, crops=(CropGroup(2, 20, (0.5, 0.6)),
                                                                                 CropGroup(1, 12, (0.1, 0.2))))
        odd["spec"] = spec
        return spec

    monkeypatch.setattr(L, "loader_spec", patched)
    for name in ("torchvision", "synthetic"):
        loader = build_loader(_cfg(image_folder, loader=name, max_images=12), CPU)
        assert len(loader) == 12 // 3                    # max_images / the spec's batch, not the config's 4
        loader.set_epoch(0)
        batch = next(iter(loader))
        assert [tuple(v.shape) for v in batch.views] == [(3, 3, 20, 20)] * 2 + [(3, 3, 12, 12)]
    assert set(LOADERS) == {"torchvision", "dali", "ffcv", "synthetic"}


def test_boxes_are_the_per_sample_stream_view_by_view(image_folder):
    spec = loader_spec(_cfg(image_folder, crops=MULTI, flip_prob=0.5), CPU)
    boxes = spec.boxes(4, 17, 300, 200)
    rng = sample_rng(3, 4, 17)                        # the documented order: box, then flip, per view
    for v, scale in enumerate([(0.3, 1.0)] * 2 + [(0.05, 0.3)] * 3):
        assert tuple(boxes[v, :4]) == random_resized_crop_params(300, 200, scale, (3 / 4, 4 / 3), rng)
        assert boxes[v, 4] == (rng.random() < 0.5)
    areas = boxes[:, 2] * boxes[:, 3] / (300 * 200)
    assert np.array_equal(spec.boxes(4, 17, 300, 200), boxes) and not np.array_equal(spec.boxes(5, 17, 300, 200), boxes)
    assert (areas[2:] <= 0.3 + 0.02).all()


# ---- multi-crop ----------------------------------------------------------------------------------

def test_multicrop_views_are_the_spec_boxes_of_one_decode(image_folder):
    cfg = _cfg(image_folder, crops=MULTI, batch_size=6)
    loader = build_loader(cfg, CPU)
    spec = loader_spec(cfg, CPU)
    images = scan_image_folder(image_folder / "train")
    batches = _epoch(loader, 1)
    assert len(batches) == len(images) // 6
    for views, labels, indices in batches:
        assert [tuple(v.shape[1:]) for v in views] == [(3, 40, 40)] * 2 + [(3, 16, 16)] * 3
        assert all(v.is_contiguous(memory_format=torch.channels_last) for v in views)
        for n, i in enumerate(indices.tolist()):
            img = decode_rgb(images.root / images.paths[i])
            boxes = spec.boxes(1, i, img.height, img.width)
            areas = boxes[:, 2] * boxes[:, 3] / (img.height * img.width)
            assert (areas[:2] >= 0.3 - 0.05).all() and (areas[2:] <= 0.3 + 0.05).all()
            for v, size in enumerate(spec.view_sizes):
                ref = crop_flip(img, tuple(boxes[v, :4]), size, bool(boxes[v, 4]))
                assert np.array_equal(views[v][n].permute(1, 2, 0).numpy(), ref)


def test_multicrop_resume_mid_epoch_and_workers(image_folder):
    cfg = _cfg(image_folder, crops=MULTI)
    full = _epoch(build_loader(cfg, CPU), 2)
    tail = _epoch(build_loader(_cfg(image_folder, crops=MULTI, workers=2), CPU), 2, start_batch=3)
    assert len(tail) == len(full) - 3
    for (av, _, ai), (bv, _, bi) in zip(full[3:], tail, strict=True):
        assert torch.equal(ai, bi) and all(torch.equal(x, y) for x, y in zip(av, bv, strict=True))


def test_synthetic_multicrop_and_eval():
    cfg = apply(Config(), {"loader": "synthetic", "crops": MULTI, "views": 5, "batch_size": 4, "max_images": 16}, "t")
    batch = next(iter(build_loader(cfg, CPU)))
    assert [v.shape[-1] for v in batch.views] == [40, 40, 16, 16, 16]
    ev = next(iter(build_loader(apply(cfg, {"eval_size": 24}, "t"), CPU, train=False)))
    with pytest.raises(ConfigError, match="views=3.*5 views"):
        loader_spec(apply(cfg, {"views": 3}, "t"), CPU)
    assert [tuple(v.shape) for v in ev.views] == [(4, 3, 24, 24)]


# ---- bad images ----------------------------------------------------------------------------------

@pytest.fixture()
def broken_folder(image_folder, tmp_path):
    """The image folder with two train images truncated (one in class 0, one in class 2)."""
    folder = tmp_path / "f"
    shutil.copytree(image_folder, folder)
    files = sorted((folder / "train").rglob("*.jpg"))
    bad = [files[3], files[20]]
    for f in bad:
        f.write_bytes(f.read_bytes()[:200])
    return folder, bad


def test_bad_images_skip_replaces_by_the_next_of_its_class_and_names_it(broken_folder):
    folder, bad = broken_folder
    images = scan_image_folder(folder / "train")
    bad_index = [images.paths.index(str(p.relative_to(folder / "train"))) for p in bad]
    cfg = _cfg(folder, batch_size=6)
    loader = build_loader(cfg, CPU)
    batches = _epoch(loader)
    indices = torch.cat([b[2] for b in batches]).tolist()
    assert not set(bad_index) & set(indices)                      # never yielded
    counts = np.bincount(indices, minlength=len(images))
    for i in bad_index:                                           # its stand-in: the next file of its class
        assert counts[i + 1] == 2 and images.labels[i + 1] == images.labels[i]
    assert sorted(name.split(":")[0] for name in loader.bad_images) == sorted(str(p) for p in bad)
    assert all(name.endswith("OSError: Truncated File Read") for name in loader.bad_images)
    labels = torch.cat([b[1] for b in batches]).tolist()
    assert labels == [images.labels[i] for i in indices]          # labels follow the stand-in
    # the stand-in's crops are its own: the same as where it appears under its own index
    spec = loader_spec(cfg, CPU)
    views = [torch.cat([b[0][v] for b in batches]) for v in range(2)]
    for i in bad_index:
        first, second = np.flatnonzero(np.array(indices) == i + 1)
        assert torch.equal(views[0][first], views[0][second]) and spec.views == 2
    # the same list again next epoch (distinct images, not one entry per occurrence)
    _epoch(loader, 1)
    assert len(loader.bad_images) == 2


def test_bad_images_resume_after_the_bad_one_is_exact(broken_folder):
    folder, _ = broken_folder
    cfg = _cfg(folder, batch_size=4, crops=MULTI)
    full = _epoch(build_loader(cfg, CPU), 5)
    resumed_loader = build_loader(cfg, CPU)
    resumed = _epoch(resumed_loader, 5, start_batch=2)
    for (av, al, ai), (bv, bl, bi) in zip(full[2:], resumed, strict=True):
        assert torch.equal(ai, bi) and torch.equal(al, bl) and all(torch.equal(x, y) for x, y in zip(av, bv))


def test_bad_images_stop_and_max_bad_images_name_the_files(broken_folder):
    folder, bad = broken_folder
    loader = build_loader(_cfg(folder, batch_size=24, drop_last=False, bad_images="stop"), CPU)
    loader.set_epoch(0)
    with pytest.raises(DataError, match=bad[0].name):
        list(loader)
    loader = build_loader(_cfg(folder, batch_size=24, drop_last=False, max_bad_images=1), CPU)
    loader.set_epoch(0)
    with pytest.raises(DataError, match=f"2 bad images, more than max_bad_images=1.*{bad[1].name}"):
        list(loader)
    with pytest.raises(ConfigError, match="bad_images"):
        _cfg(folder, bad_images="ignore")
