"""Fine-tuning: class-balanced deterministic subsets, SimCLR's subset list format, layer-wise lr decay
per ResNet stage, the semi-supervised presets, and a fine-tune that moves the backbone."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torchvision

import masksiam  # noqa: F401
from eval import finetune as ft
from eval.common import EvalError, eval_transform
from eval.data import eval_loader
from masksiam.config import Config, to_dict
from masksiam.dist import DistInfo
from models.resnet import build_backbone_from_config

CPU = torch.device("cpu")


def test_balanced_subset_is_deterministic_balanced_and_seeded():
    labels = np.repeat([0, 1, 2], [100, 50, 10])
    a, b = ft.balanced_subset(labels, 0.1, seed=0), ft.balanced_subset(labels, 0.1, seed=0)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0)              # same draw, sorted, no repeats
    assert np.bincount(labels[a]).tolist() == [10, 5, 1]                 # 10 % of every class
    assert np.bincount(labels[ft.balanced_subset(labels, 0.01)]).tolist() == [1, 1, 1]   # at least one each
    c = ft.balanced_subset(labels, 0.1, seed=1)
    assert not np.array_equal(a, c) and np.bincount(labels[c]).tolist() == [10, 5, 1]
    assert len(ft.balanced_subset(labels, 1.0)) == 160
    with pytest.raises(EvalError, match="fraction"):
        ft.balanced_subset(labels, 0.0)


def test_simclr_subset_list_is_honoured(tmp_path):
    names = ["n01440764/n01440764_10026.JPEG", "n01440764/n01440764_10027.JPEG",
             "n01443537/n01443537_2.JPEG", "n01443537/n01443537_5.JPEG"]
    listing = tmp_path / "1percent.txt"
    listing.write_text("n01443537_5.JPEG\nn01440764_10026.JPEG\n\n")      # SimCLR's format, any order
    assert ft.read_subset_file(listing, names).tolist() == [0, 3]
    # webdataset shards store '<class>/<stem>.jpg': matched without the extension
    wds = [n.rsplit(".", 1)[0] + ".jpg" for n in names]
    assert ft.read_subset_file(listing, wds).tolist() == [0, 3]
    listing.write_text("n01440764_10026.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(EvalError, match="n09999999_1.JPEG"):
        ft.read_subset_file(listing, names)
    # round trip: written with file names (unique here), read back to the same positions
    ft.write_subset_file(tmp_path / "s.txt", names, np.array([1, 2]))
    assert (tmp_path / "s.txt").read_text() == "n01440764_10027.JPEG\nn01443537_2.JPEG\n"
    assert ft.read_subset_file(tmp_path / "s.txt", names).tolist() == [1, 2]
    # file names repeated across classes: written (and matched) as <class>/<file>
    dup = ["a/0.jpg", "b/0.jpg"]
    ft.write_subset_file(tmp_path / "d.txt", dup, np.array([1]))
    assert (tmp_path / "d.txt").read_text() == "b/0.jpg\n" and ft.read_subset_file(tmp_path / "d.txt", dup).tolist() == [1]
    (tmp_path / "amb.txt").write_text("0.jpg\n")
    with pytest.raises(EvalError, match="several"):
        ft.read_subset_file(tmp_path / "amb.txt", dup)


def test_layer_decay_gives_each_stage_its_lr():
    net = torchvision.models.resnet18()
    groups = ft.layer_decay_groups(net.named_parameters(), lr=1.0, decay=0.7, weight_decay=0.05)
    expected = {"stem": 0.7 ** 5, "layer1": 0.7 ** 4, "layer2": 0.7 ** 3, "layer3": 0.7 ** 2, "layer4": 0.7,
                "fc": 1.0}
    seen = {}
    for g in groups:
        assert g["lr"] == pytest.approx(expected[g["stage"]])
        for p in g["params"]:
            seen[id(p)] = g
    named = dict(net.named_parameters())
    assert len(seen) == len(named)                                         # every parameter, once
    for name, p in named.items():
        g = seen[id(p)]
        stage = "stem" if name.startswith(("conv1", "bn1")) else name.split(".")[0]
        assert g["stage"] == stage, name
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 0.05), name  # none on BN and biases
    # the Classifier's optimizer uses torchvision's names: same stages
    model = ft.Classifier(_backbone(), 3)
    opt = ft.build_optimizer(model, dataclasses.replace(ft.FULL_PRESET, backbone_lr=1e-3), batch=256)
    lr_of = {g["stage"]: g["lr"] for g in opt.param_groups}
    assert lr_of["fc"] == pytest.approx(1e-3) and lr_of["stem"] == pytest.approx(1e-3 * 0.7 ** 5)
    assert isinstance(opt, torch.optim.AdamW)


def test_semi_supervised_presets_carry_the_seeds_numbers():
    for f, (bb, head) in {0.01: (0.002, 0.5), 0.1: (0.002, 0.5), 1.0: (0.001, 0.05)}.items():
        p = ft.SEMI_PRESETS[f]
        assert (p.epochs, p.backbone_lr, p.head_lr, p.milestones, p.gamma, p.optimizer, p.momentum,
                p.weight_decay, p.batch_size) == (20, bb, head, (12, 16), 0.2, "sgd", 0.9, 0.0, 256)
    full = ft.FULL_PRESET
    assert (full.optimizer, full.layer_decay, full.weight_decay, full.backbone_lr) == ("adamw", 0.7, 0.05, 5e-4)
    # SGD groups: backbone 0.002, classifier 0.5 (per 256 images, linear scaling)
    opt = ft.build_optimizer(ft.Classifier(_backbone(), 3), ft.SEMI_PRESETS[0.01], batch=128)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.25])


def _cfg(image_folder) -> Config:
    return dataclasses.replace(Config(), data=str(image_folder), arch="resnet10", width=8, size=32, batch_size=8,
                               workers=0, recipe="simclr", zero_init_residual=False)


def _backbone(cfg: Config | None = None):
    torch.manual_seed(0)
    return build_backbone_from_config(cfg or dataclasses.replace(Config(), arch="resnet10", width=8, size=32))


def test_finetune_changes_the_backbone(image_folder):
    cfg = _cfg(image_folder)
    info = DistInfo(0, 1, 0, CPU)
    model = ft.Classifier(_backbone(cfg), 3)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    train = eval_loader(dataclasses.replace(cfg, drop_last=False), info, "train", train=True, batch_size=4)
    val = eval_loader(cfg, info, "val", batch_size=4)
    preset = dataclasses.replace(ft.SEMI_PRESETS[0.1], batch_size=4, backbone_lr=0.05)
    hist = ft.finetune(model, train, val, eval_transform(cfg, CPU), preset, CPU, epochs=2)
    after = model.backbone.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any(k.endswith("conv1.weight") for k in moved) and any("running_mean" in k for k in moved)
    # milestones 12, 16 of 20 epochs at 2 epochs: x0.2 from epoch 1 (round(1.2)), again at 2
    assert len(hist) == 2 and hist[-1]["lr_backbone"] == pytest.approx(0.05 * 4 / 256 * 0.2)


def test_command_writes_the_subset_and_reads_it_back(image_folder, tmp_path):
    cfg = _cfg(image_folder)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save({"config": to_dict(cfg), "backbone": _backbone(cfg).state_dict()}, ckpt)
    out = tmp_path / "out"
    common = ["--checkpoint", str(ckpt), "--epochs", "1", "--batch-size", "4", "--out", str(out), "--no-progress"]
    res = ft.main(common + ["--fraction", "0.25"])
    subset_file = out / "subset_25percent_seed0.txt"
    lines = subset_file.read_text().splitlines()
    assert res["settings"]["train_images"] == 6 and len(lines) == 6          # 2 of 8 per class
    assert sorted({ln.split("/")[0] for ln in lines}) == ["class_00", "class_01", "class_02"]
    saved = json.loads((out / "finetune_25percent_seed0.json").read_text())
    assert saved["settings"]["backbone_lr"] == 0.002 and (out / "finetune_25percent_seed0.png").exists()
    # the list given back: the same images
    (tmp_path / "mine.txt").write_text("\n".join(lines[:3]) + "\n")
    res = ft.main(common + ["--subset", str(tmp_path / "mine.txt")])
    assert res["settings"]["train_images"] == 3
    assert (out / "subset_mine.txt").read_text().splitlines() == lines[:3]


def test_scratch_trains_every_label_from_random_init_with_the_sgd_recipe(image_folder, tmp_path):
    s = ft.SCRATCH_PRESET
    assert (s.optimizer, s.backbone_lr, s.head_lr, s.momentum, s.weight_decay, s.schedule, s.epochs) == \
        ("sgd", 0.1, 0.1, 0.9, 1e-4, "cosine", 90)
    cfg = _cfg(image_folder)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save({"config": to_dict(cfg), "backbone": _backbone(cfg).state_dict()}, ckpt)
    out = tmp_path / "out"
    res = ft.main(["--checkpoint", str(ckpt), "--scratch", "--epochs", "1", "--batch-size", "4", "--out", str(out),
                   "--no-progress", "--crop-scale", "0.2", "1"])
    st = res["settings"]
    assert res["eval"] == "scratch" and st["random_init"] and st["fraction"] == 1.0 and st["optimizer"] == "sgd"
    assert st["crop_scale"] == [0.2, 1.0] and (out / "scratch.json").exists()
    with pytest.raises(SystemExit):
        ft.main(["--checkpoint", str(ckpt), "--scratch", "--full"])
