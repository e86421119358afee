"""Evaluation numbers do not depend on the loader, and a Batch a loader hands out stays valid.

The same small photo folder is read by every loader: torchvision and DALI from the folder, DALI from
its webdataset shards, FFCV from its .beton (raw pixels: the same decoded pixels as the folder).
The photos' short side is the eval size, so the eval crop is a plain center crop in every loader
(no resize) and the loaders' pixels agree. Each split gives MORE batches (40 train, 10 val, batch 4)
than any loader's buffer ring holds (FFCV: batches_ahead + 2), which is where a loader reusing its
buffers (FFCV on the CPU handed out views of its ring: kNN 0 % through FFCV, issue 20) shows.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import convert
from conftest import have_loader_library, skimage_photos
from masksiam.config import Config
from masksiam.dist import DistInfo
from pipelines.loaders import build_loader
from pipelines.loaders.common import scan_image_folder

CPU = torch.device("cpu")
INFO = DistInfo(0, 1, 0, CPU)
SIZE, BATCH, CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 48, 4, 4, 40, 10
HAVE_DALI = have_loader_library("nvidia.dali")
HAVE_FFCV = have_loader_library("ffcv")


def _photo_folder(root: Path) -> Path:
    """root/{train,val}/class_<c>/<i>.jpg: crops of real photos (class c from photos c, c + 4, ...),
    short side SIZE, long side SIZE..2 SIZE, so the eval crop is a center crop without a resize."""
    from PIL import Image
    photos = skimage_photos()
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            src = [p for i, p in enumerate(photos) if i % CLASSES == c]
            for i in range(n):
                photo = src[i % len(src)]
                h, w = photo.shape[:2]
                ch, cw = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                long = int(rng.integers(SIZE, 2 * SIZE + 1))
                size = (SIZE, long) if i % 2 else (long, SIZE)               # (width, height)
                Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.BILINEAR).save(
                    d / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """name -> (loader, data root) for every loader installed, all holding the same photos."""
    root = _photo_folder(tmp_path_factory.mktemp("equal") / "photos")
    out = {"torchvision": ("torchvision", root)}
    if HAVE_DALI:
        out["dali"] = ("dali", root)
        wds = root.parent / "shards"
        assert convert.main(["webdataset", "--src", str(root), "--out", str(wds), "--shard-size", "24"]) == 0
        out["dali-webdataset"] = ("dali", wds)
    if HAVE_FFCV:
        from pipelines.tools.ffcv_convert import convert as convert_beton
        beton = root.parent / "beton"
        for split in ("train", "val"):      # raw: the pixels PIL decodes, as the folder loaders' (no re-encode)
            convert_beton(root / split, beton / f"{split}.beton", mode="raw", max_res=0, workers=1, progress=False)
        out["ffcv"] = ("ffcv", beton)
    return out


def _cfg(loader: str, data: Path, **overrides) -> Config:
    return dataclasses.replace(Config(), data=str(data), loader=loader, arch="resnet10", width=8, size=SIZE,
                               batch_size=BATCH, workers=2, prefetch=2, seed=0, recipe="simclr",
                               knn_k=10, knn_t=0.1, zero_init_residual=False, views=2, progress=False, **overrides)


def _snapshot(batch):
    return [v.clone() for v in batch.views], batch.labels.clone(), batch.indices.clone()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["torchvision", "dali", "dali-webdataset", "ffcv"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_batch_stays_valid_after_the_next_ones(sources, name, train, device):
    """Every batch of an epoch, kept (list(loader)), equals what it held when it was handed out."""
    if name not in sources:
        pytest.skip(f"{name} is not installed")
    loader_name, data = sources[name]
    split = "train" if train else "val"
    loader = build_loader(_cfg(loader_name, data), DistInfo(0, 1, 0, torch.device(device)), split, train)
    loader.set_epoch(1)
    kept, seen = [], []
    for batch in loader:
        kept.append(batch)
        seen.append(_snapshot(batch))
    images = scan_image_folder(sources["torchvision"][1] / split)
    assert len(kept) == len(loader) == len(images) // BATCH >= 10
    for batch, (views, labels, indices) in zip(kept, seen):
        assert torch.equal(batch.indices, indices) and torch.equal(batch.labels, labels)
        assert batch.labels.tolist() == [images.labels[i] for i in batch.indices.tolist()]
        assert all(v.device.type == device for v in (*batch.views, batch.labels, batch.indices))
        assert all(torch.equal(a, b) for a, b in zip(batch.views, views, strict=True))
    assert sorted(torch.cat([b.indices for b in kept]).tolist()) == list(range(len(images)))


@pytest.fixture(scope="module")
def backbone():
    from eval.common import load_backbone
    return load_backbone(_cfg("torchvision", Path(".")), None, CPU).eval()


def _evaluate(cfg, backbone) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """kNN top-1 (eval.knn.knn_accuracy, as train.py's final kNN) and the cached linear features
    (extract_features, as eval.linear --fast) through cfg.loader: one loader per split, read twice."""
    from eval.common import eval_transform
    from eval.data import eval_loader
    from eval.knn import extract_features, knn_accuracy
    loaders = {s: eval_loader(cfg, INFO, s, batch_size=BATCH) for s in ("train", "val")}
    transform = eval_transform(cfg, CPU)
    feats = {s: extract_features(backbone, ld, transform, CPU, normalize=False) for s, ld in loaders.items()}
    top1 = knn_accuracy(backbone, loaders["train"], loaders["val"], transform, CPU, CLASSES, cfg.knn_k, cfg.knn_t)
    return top1, feats


@pytest.fixture(scope="module")
def reference(sources, backbone):
    """The torchvision loader's kNN top-1 and cached (linear --fast) features of both splits."""
    return _evaluate(_cfg("torchvision", sources["torchvision"][1]), backbone)


@pytest.mark.parametrize("name", ["dali", "dali-webdataset", "ffcv"])
def test_knn_and_cached_linear_features_equal_the_torchvision_loaders(sources, backbone, reference, name):
    if name not in sources:
        pytest.skip(f"{name} is not installed")
    loader_name, data = sources[name]
    ref_top1, ref_feats = reference
    top1, feats = _evaluate(_cfg(loader_name, data), backbone)
    images = {s: scan_image_folder(sources["torchvision"][1] / s) for s in ("train", "val")}
    assert 0.5 < ref_top1 < 1.0                 # the photos' classes are told apart, not trivially
    for split, (ref, ref_labels) in ref_feats.items():
        ours, labels = feats[split]
        assert ref_labels.tolist() == labels.tolist() == images[split].labels    # dataset order, true labels
        assert torch.equal(ours, ref)          # the same pixels: same decode, a center crop without resize
    assert top1 == ref_top1
