"""The reference loader and the shared contract pieces (sharding, per-sample RNG, crop params)."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import masksiam  # noqa: F401
import torchvision.transforms.v2.functional as TF
from torchvision import transforms as T1
from masksiam.config import Config, apply
from masksiam.dist import DistInfo
from pipelines.loaders import build_loader
from pipelines.loaders.common import (DataError, num_batches, random_resized_crop_params, sample_rng,
                              scan_image_folder, shard_indices)
from pipelines.loaders.torchvision_loader import crop_flip, decode_rgb, eval_transform

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _cfg(folder, **kw):
    base = {"data": str(folder), "loader": "torchvision", "views": 2, "size": 32, "batch_size": 4,
            "workers": 0, "seed": 3}
    return apply(Config(), {**base, **kw}, "test")


def test_contract_shapes_dtype_layout_labels(image_folder):
    loader = build_loader(_cfg(image_folder, views=3), CPU)
    images = scan_image_folder(image_folder / "train")
    assert len(loader) == len(images) // 4 and loader.classes == images.classes
    loader.set_epoch(0)
    seen = 0
    for batch in loader:
        assert len(batch.views) == 3
        for v in batch.views:
            assert v.shape == (4, 3, 32, 32) and v.dtype == torch.uint8
            assert v.is_contiguous(memory_format=torch.channels_last)
        expected = torch.tensor([images.labels[i] for i in batch.indices])
        assert torch.equal(batch.labels, expected)
        assert not torch.equal(batch.views[0], batch.views[1])       # independent crops
        seen += 1
    assert seen == len(loader)


def test_same_seed_same_crops_and_epochs_differ(image_folder):
    def first(seed, epoch):
        loader = build_loader(_cfg(image_folder, seed=seed), CPU)
        loader.set_epoch(epoch)
        return next(iter(loader))
    a, b, c = first(3, 0), first(3, 0), first(3, 1)
    assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    assert not torch.equal(a.indices, c.indices)


def test_worker_count_does_not_change_crops(image_folder):
    out = []
    for workers in (0, 2):
        loader = build_loader(_cfg(image_folder, workers=workers), CPU)
        loader.set_epoch(2)
        out.append(list(loader))
    for a, b in zip(*out):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.views[1], b.views[1])


def test_resume_mid_epoch_yields_the_remaining_batches(image_folder):
    loader = build_loader(_cfg(image_folder), CPU)
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(1, start_batch=2)
    tail = list(loader)
    assert len(tail) == len(full) - 2
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.views[0], b.views[0])


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_disjoint_and_covering(drop_last):
    n, world, batch = 103, 4, 5
    shards = [shard_indices(n, r, world, seed=0, epoch=7, batch_size=batch, drop_last=drop_last) for r in range(world)]
    assert len({len(s) for s in shards}) == 1                    # every rank the same length
    flat = np.concatenate(shards)
    if drop_last:
        assert len(flat) == (n // (batch * world)) * batch * world and len(set(flat)) == len(flat)
        assert len(shards[0]) // batch == num_batches(n, world, batch, True)
    else:
        assert set(flat) == set(range(n))                       # covering, padded by wrap-around
        assert len(flat) - len(set(flat)) == math.ceil(n / world) * world - n
        assert math.ceil(len(shards[0]) / batch) == num_batches(n, world, batch, False)
    other_epoch = shard_indices(n, 0, world, seed=0, epoch=8, batch_size=batch, drop_last=drop_last)
    assert not np.array_equal(shards[0], other_epoch)


def test_two_rank_loaders_split_each_global_batch(image_folder):
    cfg = _cfg(image_folder, batch_size=4)
    ranks = [build_loader(cfg, DistInfo(r, 2, r, torch.device("cpu"))) for r in range(2)]
    single = build_loader(cfg, CPU)
    for loader in ranks + [single]:
        loader.set_epoch(0)
    for b0, b1, full in zip(*ranks, single):
        assert b0.views[0].shape[0] == 2
        assert sorted(torch.cat([b0.indices, b1.indices]).tolist()) == sorted(full.indices.tolist())


def test_crop_flip_equals_torchvision_v2(image_folder):
    path = next((image_folder / "train").rglob("*.jpg"))
    img = decode_rgb(path)
    box = (5, 7, 40, 33)
    ours = crop_flip(img, box, 24, flip=True)
    ref = TF.horizontal_flip(TF.resized_crop(img, *box, size=[24, 24], antialias=True))
    assert np.array_equal(ours, np.asarray(ref))                 # same PIL ops: exact


def test_crop_parameters_follow_random_resized_crop():
    """Area fraction and log-aspect statistics match torchvision's RandomResizedCrop sampler."""
    h, w, scale, ratio = 300, 400, (0.08, 1.0), (3 / 4, 4 / 3)
    ours, ref = [], []
    torch.manual_seed(0)
    for i in range(4000):
        t, l, ch, cw = random_resized_crop_params(h, w, scale, ratio, sample_rng(0, 0, i))
        assert 0 <= t and t + ch <= h and 0 <= l and l + cw <= w
        ours.append((ch * cw / (h * w), math.log(cw / ch)))
        _, _, rh, rw = T1.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))
        ref.append((rh * rw / (h * w), math.log(rw / rh)))
    ours, ref = np.array(ours), np.array(ref)
    assert abs(ours[:, 0].mean() - ref[:, 0].mean()) < 0.02
    assert abs(ours[:, 1].std() - ref[:, 1].std()) < 0.02
    assert ours[:, 0].min() >= 0.07 and ours[:, 0].max() <= 1.0


def test_eval_transform_center_crop():
    img = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint8).reshape(300, 200, 3))
    out = eval_transform(img, 224)
    assert out.shape == (224, 224, 3)
    ref = TF.center_crop(TF.resize(img, 256, antialias=True), [224, 224])
    assert np.abs(out.astype(int) - np.asarray(ref).astype(int)).max() <= 1


def test_corrupt_file_error_names_it(image_folder, tmp_path):
    """bad_images=stop (skip: tests/test_loader_spec.py)."""
    folder = tmp_path / "f"
    shutil.copytree(image_folder, folder)
    bad = sorted((folder / "train").rglob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:200])                      # truncated JPEG
    loader = build_loader(_cfg(folder, batch_size=24, drop_last=False, bad_images="stop"), CPU)
    loader.set_epoch(0)
    with pytest.raises(DataError, match=bad.name):
        list(loader)


def test_missing_folder_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        build_loader(_cfg(tmp_path / "nope"), CPU)
