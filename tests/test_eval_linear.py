"""Linear probe: separable features are learnt, the presets are the papers' protocols, the backbone
stays frozen, and the command writes its JSON / markdown / PNG."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import masksiam  # noqa: F401
from eval import linear
from eval.common import scale_milestones, scheduled_lr
from masksiam.config import Config, to_dict
from masksiam.dist import DistInfo
from models.resnet import build_backbone_from_config

CPU = torch.device("cpu")


def _clusters(n_per: int, classes: int = 4, dim: int = 32, seed: int = 0, noise: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("preset,bn", [("mscn", False), ("mixmask", True)])
def test_separable_features_reach_100_percent_and_shuffled_labels_do_not(preset, bn):
    x, y = _clusters(64)
    xv, yv = _clusters(16, seed=0)
    xv = xv + 0.1 * torch.randn(xv.shape, generator=torch.Generator().manual_seed(5))
    p = dataclasses.replace(linear.PRESETS[preset], batch_size=32)
    head, hist = linear.train_on_features(x, y, xv, yv, 4, p, epochs=10, bn=bn)
    assert hist[-1]["val_top1"] == 1.0 and hist[-1]["val_top5"] == 1.0
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    _, hist = linear.train_on_features(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))],
                                       xv, yv, 4, p, epochs=10, bn=bn)
    assert hist[-1]["val_top1"] < 0.6                                  # nothing to learn: near chance (0.25)


def test_presets_carry_the_seeds_numbers():
    m = linear.PRESETS["mscn"]          # Jing et al. 2022 A.2
    assert (m.epochs, m.lr, m.weight_decay, m.batch_size, m.schedule, m.momentum) == \
        (100, 1.0, 1e-6, 256, "cosine", 0.9)
    k = linear.PRESETS["mixmask"]       # Vishniakov et al. 2022 Table 2 (linear probing column)
    assert (k.epochs, k.lr, k.weight_decay, k.batch_size, k.schedule, k.milestones, k.momentum) == \
        (100, 30.0, 0.0, 256, "step", (60, 80), 0.9)
    # the schedules: cosine from 1.0 to 0, x0.1 at 60 and x0.01 at 80
    assert scheduled_lr(1.0, 0, 100, "cosine") == 1.0 and scheduled_lr(1.0, 50, 100, "cosine") == pytest.approx(0.5)
    assert [scheduled_lr(30, e, 100, "step", (60, 80)) for e in (59.9, 60, 79.9, 80)] == \
        pytest.approx([30, 3, 3, 0.3])
    assert scale_milestones((60, 80), 100, 10) == (6, 8)                # --epochs 10 keeps the fractions


def _run(image_folder, tmp_path):
    """A train.py-like checkpoint of a tiny backbone on the test folder."""
    cfg = dataclasses.replace(Config(), data=str(image_folder), arch="resnet10", width=8, size=32,
                              batch_size=8, workers=0, recipe="simclr", zero_init_residual=False)
    torch.manual_seed(0)
    backbone = build_backbone_from_config(cfg)
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"config": to_dict(cfg), "backbone": backbone.state_dict()}, path)
    return cfg, backbone, path


def test_probe_trains_the_head_and_leaves_the_backbone_untouched(image_folder, tmp_path):
    from eval.common import eval_transform
    from eval.data import eval_loader
    cfg, backbone, _ = _run(image_folder, tmp_path)
    info = DistInfo(0, 1, 0, CPU)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()                                                 # the probe must switch it to eval
    train_loader = eval_loader(cfg, info, "train", train=True, batch_size=8)
    val_loader = eval_loader(cfg, info, "val", batch_size=8)
    p = dataclasses.replace(linear.PRESETS["mscn"], batch_size=8)
    torch.manual_seed(5)
    init = linear.LinearHead(backbone.num_features, 3).fc.weight.detach().clone()
    torch.manual_seed(5)                                             # the probe's head starts from `init`
    head, hist = linear.train_probe(backbone, train_loader, val_loader, eval_transform(cfg, CPU), 3, p, CPU,
                                    epochs=2)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # weights and BN running stats
    assert all(not q.requires_grad for q in backbone.parameters())
    assert len(hist) == 2 and all(0 <= r["val_top1"] <= 1 for r in hist)
    assert (head.fc.weight - init).abs().max() > 1e-3                 # the head was trained


def test_command_writes_json_markdown_and_png(image_folder, tmp_path):
    _, _, ckpt = _run(image_folder, tmp_path)
    out = tmp_path / "out"
    res = linear.main(["--checkpoint", str(ckpt), "--epochs", "3", "--batch-size", "8", "--fast", "--bn",
                       "--out", str(out), "--no-progress", "--save-head"])
    assert res["settings"]["preset"] == "mixmask" and not res["settings"]["highpass"]   # simclr: no high-pass
    saved = json.loads((out / "linear.json").read_text())
    assert saved["metrics"]["top1"] == res["metrics"]["top1"] and len(saved["curves"]["val_top1"]) == 3
    md = (out / "linear.md").read_text()
    assert "top1" in md.splitlines()[0] and f"{100 * res['metrics']['top1']:.2f}" in md
    assert (out / "linear.png").stat().st_size > 1000 and (out / "linear_head.pt").exists()
    res = linear.main(["--checkpoint", str(ckpt), "--epochs", "1", "--batch-size", "8", "--preset", "mscn",
                       "--out", str(out), "--no-progress"])
    assert res["settings"]["lr"] == 1.0 and res["settings"]["highpass"] is False and not res["settings"]["fast"]


@pytest.mark.slow
def test_torchrun_two_processes_train_the_probe_one_process_trains(image_folder, tmp_path, monkeypatch):
    """The full protocol under DDP (gloo): per-rank halves of each batch, crops drawn per image, so
    the two ranks' averaged gradient is the one-process gradient (float round-off apart)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    monkeypatch.setenv("MASKSIAM_DEVICE", "cpu")                       # both on the CPU, also on a CUDA host
    _, _, ckpt = _run(image_folder, tmp_path)
    args = ["--checkpoint", str(ckpt), "--epochs", "2", "--batch-size", "8", "--preset", "mscn", "--no-progress"]
    one = linear.main(args + ["--out", str(tmp_path / "one")])
    repo = Path(__file__).resolve().parent.parent
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                "-m", "eval.linear", *args, "--out", str(tmp_path / "two")]
    out = subprocess.run(torchrun, cwd=repo, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MASKSIAM_DEVICE": "cpu"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "linear.json").read_text())
    assert two["settings"]["world_size"] == 2
    for a, b in zip(one["curves"]["train_loss"], two["curves"]["train_loss"]):
        assert b[1] == pytest.approx(a[1], rel=1e-4)
    assert two["metrics"]["top1"] == one["metrics"]["top1"]
