"""train.py end to end on a tiny real-photo folder: learning, exact resume, signals, NaN guard, DDP.

Tiny network (ResNet-10 at width 8, 24 px) so every run takes seconds on a 2-core CPU.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import masksiam  # noqa: F401
import train
from losses.simclr import SimCLR
from masksiam import checkpoint as ckpt_io
from masksiam import metrics_log
from masksiam.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = ["arch=resnet10", "width=8", "size=24", "stem=small", "batch_size=8", "workers=0", "views=2",
        "proj_hidden=32", "proj_dim=16", "optimizer=lars", "lr=0.5", "warmup_epochs=0.5", "log_every=1",
        "progress=false", "knn_k=5", "recipe=simclr", "crop_scale=[0.3,1.0]", "seed=0"]


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    """These runs test the CPU path (bitwise resume, gloo): pinned even on a CUDA host (torchrun inherits it)."""
    monkeypatch.setenv("MASKSIAM_DEVICE", "cpu")


def _args(folder, out, name, *extra):
    return [f"data={folder}", f"out_dir={out}", f"run_name={name}", *TINY, *extra]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run_dir) if "loss" in r}


def test_training_lowers_the_loss_and_writes_the_run(image_folder, tmp_path):
    res = train.main(_args(image_folder, tmp_path, "learn", "epochs=7", "recipe=plain", "crop_scale=[0.5,1.0]"))
    run = Path(res["run_dir"])
    losses = list(_losses(run).values())
    assert len(losses) == 21                                     # 24 images / batch 8 = 3 steps x 7 epochs
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert res["exit"] == "finished" and 0 <= res["knn_top1"] <= 1
    for name in ("config.yaml", "run_info.json", "checkpoint.pt", "backbone.pt", "curves.png", "result.json"):
        assert (run / name).exists(), name
    info = json.loads((run / "run_info.json").read_text())
    assert info["packages"]["torch"] and "sha" in info["git"]
    # curves.png: every panel by step; the final kNN a point at the last step, beside the probe's top-1
    curves = metrics_log.curves(_metrics(run))
    assert curves["top-1"]["kNN"] == [(21, res["knn_top1"])]
    assert [len(curves[t][k]) for t, k in [("pretraining loss", "loss"), ("top-1", "online probe"),
                                            ("learning rate", "lr"), ("images/s", "images/s")]] == [21] * 4
    # the exported backbone loads into a stock torchvision-layout model of the same shape
    from models.resnet import build_backbone, load_backbone_state
    load_backbone_state(build_backbone("resnet10", small_stem=True, width=8),
                        torch.load(run / "backbone.pt", weights_only=True))


def test_resume_continues_at_the_same_step_bitwise(image_folder, tmp_path):
    """An interrupted run (stopped mid-epoch) resumes with model, optimizer, EMA target, augment RNG
    and loader position restored: the following steps repeat the uninterrupted run's (bitwise on CPU)."""
    common = ["epochs=3", "method=byol", "pred_hidden=32", "recipe=byol"]
    full = train.main(_args(image_folder, tmp_path, "full", *common))
    first = train.main(_args(image_folder, tmp_path, "cut", *common, "max_steps=4"))
    assert first["step"] == 4
    state = ckpt_io.load(Path(first["run_dir"]) / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 1)
    resumed = train.main(_args(image_folder, tmp_path, "cut", *common, "resume=true"))
    assert resumed["step"] == full["step"] == 9
    a, b = _losses(Path(full["run_dir"])), _losses(Path(resumed["run_dir"]))
    assert a == b                                                # every step, before and after the cut
    sa = torch.load(Path(full["run_dir"]) / "backbone.pt", weights_only=True)
    sb = torch.load(Path(resumed["run_dir"]) / "backbone.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_existing_run_needs_resume_and_foreign_checkpoints_are_refused(image_folder, tmp_path):
    train.main(_args(image_folder, tmp_path, "one", "epochs=1", "final_eval=false"))
    with pytest.raises(ConfigError, match="resume=true"):
        train.main(_args(image_folder, tmp_path, "one", "epochs=1"))
    with pytest.raises(ckpt_io.CheckpointError, match="arch='resnet10'.*this run: 'resnet18'"):
        train.main(_args(image_folder, tmp_path, "one", "epochs=2", "resume=true", "arch=resnet18"))
    with pytest.raises(ckpt_io.CheckpointError, match="method"):
        train.main(_args(image_folder, tmp_path, "one", "epochs=2", "resume=true", "method=barlow"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt_io.CheckpointError, match="bad.pt"):
        ckpt_io.load(bad)


def test_nonfinite_losses_are_skipped_then_stop_the_run(image_folder, tmp_path, monkeypatch):
    """Steps 4-5 return NaN: skipped (weights unchanged) and counted. From step 7 on every loss is
    NaN: after max_bad_steps in a row the run stops, naming the step, and keeps its checkpoint."""
    calls = {"n": 0}
    loss_fn = SimCLR.loss

    def flaky(emb, **hp):
        calls["n"] += 1
        loss, logs = loss_fn(emb, **hp)
        if calls["n"] in (4, 5) or calls["n"] >= 7:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(SimCLR, "loss", staticmethod(flaky))
    with pytest.raises(train.RunStopped, match=r"3 non-finite losses in a row up to step 9"):
        train.main(_args(image_folder, tmp_path, "nan", "epochs=5", "max_bad_steps=3"))
    rows = [r for r in _metrics(tmp_path / "nan") if "loss" in r]
    assert rows[4]["nonfinite_total"] == 2 and rows[-1]["nonfinite_total"] == 5
    state = ckpt_io.load(tmp_path / "nan" / "checkpoint.pt")      # the end of epoch 2, all finite
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values()
                                      if v.is_floating_point())


def _wait_for(path: Path, pred, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if pred(text):
                return text
        time.sleep(0.2)
    raise AssertionError(f"{path} never satisfied the condition")


def _spawn(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.Popen:
    # the same thread count as this process: float sums then run in the same order (bitwise results)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(image_folder, tmp_path):
    proc = _spawn(["train.py", *_args(image_folder, tmp_path, "term", "epochs=50", "final_eval=false")])
    _wait_for(tmp_path / "term" / "metrics.jsonl", lambda t: t.count("\n") >= 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    result = json.loads((tmp_path / "term" / "result.json").read_text())
    assert "stopped by SIGTERM" in result["exit"]
    state = ckpt_io.load(tmp_path / "term" / "checkpoint.pt")
    assert state["step"] == result["step"] >= 5
    # a stopped run is not finished: its weights are in the checkpoint, nothing is exported
    assert not (tmp_path / "term" / "backbone.pt").exists() and not (tmp_path / "term" / "curves.png").exists()


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_reproduces_the_uninterrupted_run(image_folder, tmp_path):
    """SIGKILL before step 6 (3 steps per epoch: the epoch-1 checkpoint holds step 3, steps 4-5 are
    logged but lost): the resumed run repeats steps 4-5, logs each step once, and ends with the
    uninterrupted run's losses and weights, bitwise."""
    common = ["epochs=4", "final_eval=false"]
    full = train.main(_args(image_folder, tmp_path, "full", *common))
    proc = _spawn(["tests/_die_once.py", *_args(image_folder, tmp_path, "killed", *common)],
                  env_extra={"MASKSIAM_TEST_DIE_BEFORE_STEP": "6", "MASKSIAM_TEST_DIE_RANK": "0",
                             "MASKSIAM_TEST_DIE_HOW": "sigkill"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    run = tmp_path / "killed"
    assert ckpt_io.load(run / "checkpoint.pt")["step"] == 3
    assert [r["step"] for r in _metrics(run) if "loss" in r] == [1, 2, 3, 4, 5]   # 4-5 after the checkpoint
    resumed = train.main(_args(image_folder, tmp_path, "killed", *common, "resume=true"))
    assert resumed["step"] == full["step"] == 12
    steps = [r["step"] for r in _metrics(run) if "loss" in r]
    assert steps == list(range(1, 13))                                            # each step once
    assert _losses(run) == _losses(Path(full["run_dir"]))
    a = ckpt_io.load(run / "checkpoint.pt")["model"]
    b = ckpt_io.load(Path(full["run_dir"]) / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(image_folder, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with synchronised BatchNorm takes the steps one process
    takes on the whole batch (float32 round-off apart). The recipe draws no random augmentation
    (each rank's generator differs from the single process's), so the inputs are identical."""
    common = ["epochs=2", "recipe=plain", "sync_bn=true", "final_eval=false"]
    single = train.main(_args(image_folder, tmp_path, "one", *common))
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                "train.py", *_args(image_folder, tmp_path, "two", *common)]
    out = subprocess.run(torchrun, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a, b = _losses(Path(single["run_dir"])), _losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 6
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a[step], b[step])


def test_demo_report_compares_with_random_init_and_fails_without_a_gain(image_folder, tmp_path):
    from eval import demo_report
    res = train.main(_args(image_folder, tmp_path, "demo", "epochs=1"))
    run = Path(res["run_dir"])
    report = demo_report.main(["--run", str(run), "--min-margin", "-1"])
    assert report["knn_top1_pretrained"] == res["knn_top1"]
    assert 0 <= report["knn_top1_random_init"] <= 1
    assert report["margin"] == pytest.approx(report["knn_top1_pretrained"] - report["knn_top1_random_init"])
    assert json.loads((run / "demo_report.json").read_text()) == report
    assert (run / "demo.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="less than the required 200.0"):   # no run gains 2.0
        demo_report.main(["--run", str(run), "--min-margin", "2"])


@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_a_run_whose_worker_died(image_folder, tmp_path):
    """Rank 1 dies in epoch 2 (after the epoch-1 checkpoint); torchrun --max-restarts=1 restarts the
    workers, they resume from the checkpoint, and the finished run logged each step once, with the
    losses of an uninterrupted single-process run."""
    common = ["epochs=2", "recipe=plain", "sync_bn=true", "final_eval=false"]
    single = train.main(_args(image_folder, tmp_path, "one", *common))
    # one restart allowed: it must succeed at once (masksiam.dist keys each attempt apart)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                "--max-restarts=1", "tests/_die_once.py", *_args(image_folder, tmp_path, "elastic", *common)]
    out = subprocess.run(torchrun, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MASKSIAM_TEST_DIE_BEFORE_STEP": "5"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed" in out.stdout and "at step 3" in out.stdout, out.stdout[-2000:]
    steps = [r["step"] for r in _metrics(tmp_path / "elastic") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    a, b = _losses(Path(single["run_dir"])), _losses(tmp_path / "elastic")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a[step], b[step])


def test_the_online_probe_logs_top1_and_changes_no_pretraining_number(image_folder, tmp_path):
    """online_probe (default) trains a linear classifier on detached features: probe_top1 in every
    metrics line, the same losses and weights as without it, its state in the checkpoint."""
    common = ["epochs=2", "final_eval=false"]
    on = train.main(_args(image_folder, tmp_path, "probe", *common))
    off = train.main(_args(image_folder, tmp_path, "noprobe", *common, "online_probe=false"))
    rows = [r for r in _metrics(Path(on["run_dir"])) if "loss" in r]
    assert all(0 <= r["probe_top1"] <= 1 and r["probe_loss"] > 0 for r in rows)
    assert not any("probe_top1" in r for r in _metrics(Path(off["run_dir"])))
    assert _losses(Path(on["run_dir"])) == _losses(Path(off["run_dir"]))
    a = ckpt_io.load(Path(on["run_dir"]) / "checkpoint.pt")
    b = ckpt_io.load(Path(off["run_dir"]) / "checkpoint.pt")
    assert all(torch.equal(a["backbone"][k], b["backbone"][k]) for k in a["backbone"])
    assert a["probe"]["fc.weight"].shape[0] == 3 and b["probe"] is None      # 3 classes in the folder


def test_an_odd_batch_on_the_cpu_trains(image_folder, tmp_path):
    """torch 2.13's CPU backward of the strided 1x1 downsample convolution crashes on channels-last
    inputs with an odd batch: the ResNet computes it subsampled (models.resnet.SubsampledConv1x1)."""
    res = train.main(_args(image_folder, tmp_path, "odd", "arch=resnet18", "stem=imagenet", "size=32",
                           "batch_size=7", "drop_last=false", "epochs=1", "final_eval=false"))
    assert res["step"] == 4 and res["exit"] == "finished"          # 7 + 7 + 7 + 3 of 24 images


def test_steps_after_the_last_log_every_boundary_are_logged(image_folder, tmp_path):
    """A 5-step run (6 steps per epoch at batch 4) with log_every=10 logs its one interval at step 5."""
    res = train.main(_args(image_folder, tmp_path, "short", "batch_size=4", "epochs=1", "max_steps=5",
                           "log_every=10", "final_eval=false"))
    rows = _metrics(Path(res["run_dir"]))
    assert [r["step"] for r in rows] == [5] and rows[0]["loss"] > 0 and "probe_top1" in rows[0]


def test_a_run_without_final_eval_still_exports_the_backbone_and_the_curves(image_folder, tmp_path):
    """final_eval=false skips the kNN only: backbone.pt (the last checkpoint's backbone, bitwise) and
    curves.png are written as after a kNN, and nothing reports a kNN."""
    res = train.main(_args(image_folder, tmp_path, "noeval", "epochs=1", "max_steps=2", "final_eval=false"))
    run = Path(res["run_dir"])
    assert res["exit"] == "reached max_steps=2" and "knn_top1" not in res
    assert not any("knn_top1" in r for r in _metrics(run))
    exported = torch.load(run / "backbone.pt", weights_only=True)
    saved = ckpt_io.load(run / "checkpoint.pt")
    assert saved["step"] == 2 and exported.keys() == saved["backbone"].keys()
    assert all(torch.equal(exported[k], saved["backbone"][k]) for k in exported)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "knn_top1" not in json.loads((run / "result.json").read_text())


def test_help_names_only_configs_that_exist(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    named = re.findall(r"configs/[\w.-]+\.yaml", capsys.readouterr().out)
    assert named and all((REPO / c).is_file() for c in named), named
