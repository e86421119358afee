"""A flat folder of photos (train/*.jpg: no class folders, no val split), the usual input of
self-supervised pretraining: read by every loader and converter as one pseudo-class, trained on by
train.py without the probe and the kNN (said once), and refused by every evaluation.

The folder also holds what a macOS copy leaves beside the photos (.DS_Store, `._*.jpg` AppleDouble
files that are not JPEGs): a loader that read them would meet bad images.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import masksiam  # noqa: F401
import convert
from conftest import have_loader_library, make_image_folder
from masksiam.config import Config
from masksiam.dist import DistInfo
from pipelines.loaders import build_loader
from pipelines.loaders.common import UNLABELLED, DataError, has_labels, scan_image_folder

REPO = Path(__file__).resolve().parent.parent
INFO = DistInfo(0, 1, 0, torch.device("cpu"))
N = 24                                       # photos; batch 4 -> 6 batches an epoch


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    """root/train/img_000.jpg ... img_023.jpg (real photos, 64-160 px) plus macOS debris."""
    root = tmp_path_factory.mktemp("flat")
    labelled = make_image_folder(root / "labelled", classes=3, per_class=8)
    train = root / "photos" / "train"
    train.mkdir(parents=True)
    for i, p in enumerate(sorted((labelled / "train").rglob("*.jpg"))):
        shutil.copy(p, train / f"img_{i:03d}.jpg")
    (train / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    (train / "._img_000.jpg").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X        ")   # AppleDouble: not a JPEG
    (train / ".thumbnails").mkdir()
    shutil.copy(train / "img_000.jpg", train / ".thumbnails" / "img_000.jpg")
    return root / "photos"


def _cfg(data, **kw) -> Config:
    return Config(**{"data": str(data), "loader": "torchvision", "batch_size": 4, "views": 2, "size": 32,
                     "workers": 0, "seed": 1, **kw})


def test_scan_reads_a_flat_folder_as_one_pseudo_class(flat):
    images = scan_image_folder(flat / "train")
    assert images.classes == [UNLABELLED] and not has_labels(images.classes)
    assert images.paths == [f"img_{i:03d}.jpg" for i in range(N)]       # hidden files and folders left out
    assert images.labels == [0] * N
    assert (images.root / images.paths[0]).is_file()


def _converted(flat: Path, fmt: str, tmp: Path) -> Config:
    """The config that reads `flat` in format `fmt`, converting it first with convert.py."""
    if fmt == "torchvision":
        return _cfg(flat)
    if fmt == "dali":
        return _cfg(flat, loader="dali", dali_device="cpu")
    if fmt == "webdataset":
        assert convert.main(["webdataset", "--src", str(flat), "--out", str(tmp / "wds"), "--shard-size", "10"]) == 0
        index = json.loads((tmp / "wds" / "train" / "index.json").read_text())
        assert index["classes"] == [UNLABELLED] and index["num_samples"] == N and index["skipped"] == []
        return _cfg(tmp / "wds", loader="dali", dali_device="cpu")
    assert convert.main(["ffcv", "--src", str(flat / "train"), "--out", str(tmp / "train.beton"),
                         "--workers", "1", "--max-res", "160", "--no-progress"]) == 0
    sidecar = json.loads((tmp / "train.beton.json").read_text())
    assert sidecar["classes"] == [UNLABELLED] and sidecar["counts"]["written"] == N
    return _cfg(tmp, loader="ffcv")


@pytest.mark.parametrize("fmt", ["torchvision", "dali", "webdataset", "ffcv"])
def test_every_loader_reads_a_flat_folder(flat, tmp_path, fmt):
    if fmt in ("dali", "webdataset") and not have_loader_library("nvidia.dali"):
        pytest.skip("nvidia.dali not installed")
    if fmt == "ffcv" and not have_loader_library("ffcv"):
        pytest.skip("ffcv not installed")
    cfg = _converted(flat, fmt, tmp_path)
    loader = build_loader(cfg, INFO)
    assert loader.classes == [UNLABELLED] and len(loader) == N // 4
    for epoch in (0, 1):                                   # more than one pass: the order is reshuffled
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == N // 4
        indices = torch.cat([b.indices for b in batches])
        assert sorted(indices.tolist()) == list(range(N))  # every photo once, none of the debris
        assert torch.cat([b.labels for b in batches]).eq(0).all()
        assert all(v.shape == (4, 3, 32, 32) for b in batches for v in b.views)
    assert loader.bad_images == []                         # the AppleDouble file was never read


def test_validate_reports_an_unlabelled_split(flat, tmp_path, capsys):
    assert convert.main(["validate", str(flat), "--json", str(tmp_path / "report.json"), "--workers", "2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    split = report["splits"]["train"]                      # photos/ is a dataset root: train/ is its split
    assert split["checked"] == N and split["bad"] == 0
    assert split["classes"] == [UNLABELLED] and split["labelled"] is False
    assert report["class_mismatch"] is None                # no val split: nothing to compare
    assert "unlabelled: a flat folder" in capsys.readouterr().out


def test_train_py_pretrains_on_a_flat_folder(flat, tmp_path):
    """End to end as a user runs it: exit 0, the unlabelled note once, backbone.pt and curves.png,
    no kNN (none at the end, none from knn_every) and no probe."""
    args = [sys.executable, "train.py", f"data={flat}", f"out_dir={tmp_path}", "run_name=flat", "arch=resnet10",
            "width=8", "size=24", "stem=small", "batch_size=8", "workers=0", "views=2", "proj_hidden=32",
            "proj_dim=16", "epochs=2", "knn_every=1", "log_every=1", "progress=false", "recipe=simclr"]
    env = {**os.environ, "MASKSIAM_DEVICE": "cpu"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    notes = [line for line in out.splitlines() if "unlabelled" in line]
    assert len(notes) == 1 and str(flat / "train") in notes[0], out[-3000:]
    run = tmp_path / "flat"
    for name in ("backbone.pt", "curves.png", "result.json", "checkpoint.pt"):
        assert (run / name).is_file(), name
    result = json.loads((run / "result.json").read_text())
    assert result["exit"] == "finished" and result["step"] == 6 and "knn_top1" not in result
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and not any("knn_top1" in m or "probe_top1" in m for m in metrics)


def test_evaluation_refuses_unlabelled_data(flat, tmp_path):
    from eval import knn
    from eval.data import eval_loader
    from masksiam.config import to_dict
    from models.resnet import build_backbone
    with pytest.raises(DataError, match=r"unlabelled \(a flat folder"):
        eval_loader(_cfg(flat), INFO, "train")
    ckpt = tmp_path / "checkpoint.pt"
    cfg = _cfg(flat, arch="resnet10", width=8, stem="small")
    torch.save({"config": to_dict(cfg), "backbone": build_backbone("resnet10", small_stem=True, width=8).state_dict()},
               ckpt)
    with pytest.raises(SystemExit) as err:
        knn.main(["--checkpoint", str(ckpt), "--no-progress"])
    assert "unlabelled" in str(err.value) and str(flat / "train") in str(err.value)


def test_data_naming_the_photos_themselves_says_where_they_go(flat):
    """data= names the folder above the splits; pointing it at the photos says so."""
    with pytest.raises(DataError, match=r"holds images itself: data= names the folder above the splits"):
        build_loader(_cfg(flat / "train"), INFO)
