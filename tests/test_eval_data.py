"""Evaluation data: read through the run's loader (folder, .beton, webdataset shards), and a run whose
evaluation data is missing is refused at start-up with the path and the config keys named."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

import masksiam  # noqa: F401
from conftest import have_loader_library
from eval.data import check_eval_data, detect_loader, eval_loader, eval_source
from eval.knn import extract_features, knn_accuracy_from_config
from masksiam.config import Config
from masksiam.dist import DistInfo
from models.resnet import build_backbone
from pipelines.loaders.common import DataError

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def _cfg(data, **kw) -> Config:
    return dataclasses.replace(Config(), data=str(data), size=32, batch_size=8, workers=0, prefetch=2, **kw)


def test_missing_val_beton_fails_at_start_up_naming_path_and_keys(tmp_path):
    # the case: loader=ffcv, data=DIR holding only train.beton
    (tmp_path / "train.beton").write_bytes(b"")
    for split in ("train", "val"):                  # convert.py ffcv's sidecars: the class lists
        (tmp_path / f"{split}.beton.json").write_text('{"classes": ["a", "b"]}')
    cfg = _cfg(tmp_path, loader="ffcv")
    with pytest.raises(DataError) as err:
        check_eval_data(cfg)
    msg = str(err.value)
    assert str(tmp_path / "val.beton") in msg
    assert "val_split=val" in msg and "loader=ffcv" in msg and f"data={tmp_path}" in msg
    assert "final_eval=false" in msg                                 # how to run without evaluation
    check_eval_data(dataclasses.replace(cfg, final_eval=False, knn_every=0))   # no evaluation: no check
    (tmp_path / "val.beton").write_bytes(b"")
    check_eval_data(cfg)                                             # both there: passes


def test_missing_folder_split_names_the_split_key(image_folder, tmp_path):
    check_eval_data(_cfg(image_folder))                              # train/ and val/ exist
    with pytest.raises(DataError, match=r"val_split=test"):
        check_eval_data(_cfg(image_folder, val_split="test"))
    shutil.copytree(image_folder / "val", tmp_path / "val")          # a bank split missing
    with pytest.raises(DataError, match=r"train_split=train") as err:
        check_eval_data(_cfg(tmp_path, loader="dali"))
    assert str(tmp_path / "train") in str(err.value)
    # ffcv_path with {split} decides where the .beton of each split is
    cfg = _cfg(tmp_path, loader="ffcv", ffcv_path=str(tmp_path / "b" / "{split}.beton"))
    assert eval_source(cfg, "val") == tmp_path / "b" / "val.beton"


def test_detect_loader_follows_the_files(tmp_path, image_folder):
    (tmp_path / "val.beton").write_bytes(b"")
    assert detect_loader(_cfg(tmp_path), "val") == "ffcv"              # a folder run evaluated on .beton
    assert detect_loader(_cfg(image_folder, loader="ffcv"), "val") == "torchvision"
    (tmp_path / "wds" / "val").mkdir(parents=True)
    (tmp_path / "wds" / "val" / "index.json").write_text("{}")
    assert detect_loader(_cfg(tmp_path / "wds"), "val") == "dali"


def _net():
    torch.manual_seed(0)
    return build_backbone("resnet10", small_stem=True, zero_init_residual=False, width=8).to(
        memory_format=torch.channels_last)


def _identity_transform(x):
    return x.float() / 255


@pytest.fixture(scope="module")
def formats(image_folder, tmp_path_factory):
    """The same folder as webdataset shards (and .beton files where FFCV imports)."""
    import convert
    root = tmp_path_factory.mktemp("formats")
    assert convert.main(["webdataset", "--src", str(image_folder), "--out", str(root / "wds"),
                         "--shard-size", "7"]) == 0
    out = {"torchvision": image_folder, "dali": root / "wds"}
    if have_loader_library("ffcv"):
        for split in ("train", "val"):
            assert convert.main(["ffcv", "--src", str(image_folder / split), "--out", str(root / f"{split}.beton"),
                                 "--workers", "1", "--no-progress"]) == 0
        out["ffcv"] = root
    return out


@pytest.mark.parametrize("loader", ["dali", "ffcv"])
def test_evaluation_reads_every_format_like_the_folder(formats, loader):
    if loader not in formats or (loader == "dali" and not have_loader_library("nvidia.dali")):
        pytest.skip(f"{loader} not installed")
    net = _net()
    ref_cfg = _cfg(formats["torchvision"])
    cfg = _cfg(formats[loader], loader=loader)
    ref_feats, ref_labels = extract_features(net, eval_loader(ref_cfg, INFO, "val"), _identity_transform, INFO.device)
    feats, labels = extract_features(net, eval_loader(cfg, INFO, "val"), _identity_transform, INFO.device)
    assert torch.equal(labels, ref_labels) and feats.shape == ref_feats.shape
    # same images, same eval crop; only the decoder (and FFCV's re-encoding) differ
    cos = (feats * ref_feats).sum(1)
    assert cos.min() > 0.97, cos
    acc = knn_accuracy_from_config(dataclasses.replace(cfg, knn_k=3), INFO, net)
    ref = knn_accuracy_from_config(dataclasses.replace(ref_cfg, knn_k=3), INFO, net)
    assert 0 <= acc <= 1 and abs(acc - ref) <= 1 / 6 + 1e-6          # 6 val images: one vote apart at most


@pytest.mark.parametrize("fmt", ["torchvision", "dali", "ffcv"])
def test_a_subset_is_read_as_a_folder_with_every_class(formats, tmp_path, fmt):
    from eval.data import materialise_subset, sample_names
    if fmt not in formats or (fmt == "dali" and not have_loader_library("nvidia.dali")):
        pytest.skip(f"{fmt} not installed")
    cfg = _cfg(formats[fmt], loader=fmt)
    names, labels, classes = sample_names(cfg, "train")
    assert len(names) == 24 and labels == sorted(labels) and len(classes) == 3
    sub = materialise_subset(cfg, "train", [0, 9, 10], tmp_path / "sub")    # nothing of class 2
    loader = eval_loader(sub, INFO, "train", batch_size=2)
    assert loader.classes == classes                                       # labels keep their numbers
    got = torch.cat([b.labels for b in loader])
    assert sorted(got.tolist()) == [0, 1, 1]
    mine = torch.cat([b.views[0] for b in loader])
    if fmt == "ffcv":        # the .beton's JPEG bytes, re-encoded by the converter: close to the folder's
        ref = torch.cat([b.views[0] for b in eval_loader(_cfg(formats["torchvision"]), INFO, "train", batch_size=24)])
        assert sub.loader == "torchvision"
        assert (mine[0].float() - ref[0].float()).abs().mean() < 8 and (mine[1].float() - ref[9].float()).abs().mean() < 8
    else:                    # the same bytes through the same loader as the whole split
        ref = torch.cat([b.views[0] for b in eval_loader(cfg, INFO, "train", batch_size=24)])
        assert torch.equal(mine[0], ref[0]) and torch.equal(mine[1], ref[9])


def test_knn_command_on_shards_of_a_folder_run(formats, image_folder, tmp_path):
    """A run trained from the folder, evaluated on its webdataset shards: the command switches to
    the loader that reads them and writes its result files."""
    if not have_loader_library("nvidia.dali"):
        pytest.skip("nvidia.dali not installed")
    from eval import knn
    from masksiam.config import to_dict
    cfg = _cfg(image_folder, arch="resnet10", width=8, zero_init_residual=False, knn_k=3)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"config": to_dict(cfg), "backbone": _net().state_dict()}, ckpt)
    folder = knn.main(["--checkpoint", str(ckpt), "--no-progress"])
    shards = knn.main(["--checkpoint", str(ckpt), "--data", str(formats["dali"]), "--out", str(tmp_path / "e"),
                       "--no-progress"])
    assert abs(shards["knn_top1"] - folder["knn_top1"]) <= 1 / 6 + 1e-6
    assert (tmp_path / "e" / "knn.json").exists() and (tmp_path / "e" / "knn.png").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        knn.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "nowhere"), "--no-progress"])


def test_eval_loaders_give_one_view_also_for_a_multi_crop_run(image_folder):
    cfg = _cfg(image_folder, crops="2x32@0.5-1,3x16@0.1-0.5")
    for train in (True, False):
        batch = next(iter(eval_loader(cfg, INFO, "train", train=train, batch_size=4)))
        assert len(batch.views) == 1 and batch.views[0].shape == (4, 3, 32, 32)
