"""What a run promises when things go wrong: a refused start changes no file, user errors exit in one
line without a traceback, checkpoints are kept in rotation and survive a bad one or a failed write,
and resume is exact for every kind of state (queue, EMA, mixing, noise fills, other loaders, ranks)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import masksiam  # noqa: F401
import train
from losses import METHODS
from masksiam import checkpoint as ckpt_io
from masksiam.config import ConfigError

from test_train import REPO, _args, _losses, _metrics

# the recipe each method trains with in these tests (Siamese methods: two views of the simclr recipe)
RECIPE = {"simmim": "simmim", "mixmae": "mixmae"}


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("MASKSIAM_DEVICE", "cpu")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _backbone(run: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load(run / "checkpoint.pt")["backbone"]


def _same_weights(a, b) -> bool:
    """Bitwise equal state: tensors, and nested dicts of them (a method's extra state: MoCo's queue)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_weights(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


# ---- a refused start changes nothing ----------------------------------------------------------------

@pytest.mark.parametrize("change, named", [("proj_dim=24", "proj_dim=16"), ("width=16", "width=8"),
                                           ("proj_hidden=48", "proj_hidden=32"), ("method=byol", "method")])
def test_a_refused_resume_leaves_the_run_directory_byte_identical(image_folder, tmp_path, change, named):
    train.main(_args(image_folder, tmp_path, "run", "epochs=1", "final_eval=false"))
    before = _digest(tmp_path / "run")
    with pytest.raises(ckpt_io.CheckpointError, match=named):
        train.main(_args(image_folder, tmp_path, "run", "epochs=2", "resume=true", "pred_hidden=32", change))
    assert _digest(tmp_path / "run") == before


def test_an_existing_run_without_resume_changes_nothing(image_folder, tmp_path):
    train.main(_args(image_folder, tmp_path, "run", "epochs=1", "final_eval=false"))
    before = _digest(tmp_path / "run")
    with pytest.raises(ConfigError, match="resume=true"):
        train.main(_args(image_folder, tmp_path, "run", "epochs=1", "lr=0.1"))
    assert _digest(tmp_path / "run") == before


# ---- user errors: one line, no traceback --------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASKSIAM_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_user_errors_exit_in_one_line_without_a_traceback(image_folder, tmp_path):
    train.main(_args(image_folder, tmp_path, "run", "epochs=1", "final_eval=false"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    cases = [  # (run, overrides, exit code, what the message must name)
        ("new", ["temperature=-1"], 2, "'temperature' = -1.0 must be > 0"),
        ("new", ["method=simclrr"], 2, "unknown method 'simclrr'.*simclr"),
        ("new", ["recipe=nope"], 2, "recipe 'nope'.*simclr"),
        ("new", ["arch=resnet5"], 2, "unknown arch 'resnet5'.*resnet50"),
        ("new", ["tempurature=0.1"], 2, "unknown config key 'tempurature'"),
        ("run", [], 2, "already holds a checkpoint; pass resume=true"),
        ("run", ["resume=true", "arch=resnet18"], 1, "arch='resnet10'.*this run: 'resnet18'"),
    ]
    for run, overrides, code, pattern in cases:
        out = _cli(*_args(image_folder, tmp_path, run, "epochs=2", *overrides))
        assert out.returncode == code, (overrides, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, (overrides, out.stderr[-2000:])
        assert re.search(pattern, out.stderr), (overrides, out.stderr[-2000:])
    out = _cli(*_args(image_folder, tmp_path, "corrupt", "epochs=1", "resume=true"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert str(corrupt / "checkpoint.pt") in out.stderr and "weights_only" not in out.stderr, out.stderr


def test_a_corrupt_checkpoint_is_named_without_a_hint_to_unpickle(tmp_path):
    for name, content in (("garbage.pt", b"not a checkpoint"), ("truncated.pt", b"PK\x03\x04\x00")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ckpt_io.CheckpointError) as err:
            ckpt_io.load(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "weights_only" not in str(err.value)
    # a pickled object (what weights_only=True refuses) is named as not a masksiam checkpoint
    torch.save({"x": ConfigError("a pickled class")}, tmp_path / "pickled.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt or not a masksiam checkpoint") as err:
        ckpt_io.load(tmp_path / "pickled.pt")
    assert "weights_only" not in str(err.value)


# ---- checkpoints in rotation --------------------------------------------------------------------------

def test_a_truncated_latest_checkpoint_falls_back_to_the_previous(image_folder, tmp_path, capsys):
    full = train.main(_args(image_folder, tmp_path, "full", "epochs=3", "final_eval=false"))
    train.main(_args(image_folder, tmp_path, "cut", "epochs=3", "max_steps=6", "final_eval=false"))
    run = tmp_path / "cut"
    assert ckpt_io.load(run / "checkpoint.pt")["step"] == 6 and ckpt_io.load(run / "checkpoint.1.pt")["step"] == 3
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[:len(data) // 3])       # a full disk cut the last write short
    resumed = train.main(_args(image_folder, tmp_path, "cut", "epochs=3", "final_eval=false", "resume=true"))
    out = capsys.readouterr().out
    assert "checkpoint.pt cannot be read" in out and "resuming from the previous checkpoint" in out, out
    assert "at step 3" in out
    assert resumed["step"] == full["step"] == 9
    assert _losses(run) == _losses(Path(full["run_dir"]))          # steps 4-6 retrained identically
    assert _same_weights(_backbone(run), _backbone(Path(full["run_dir"])))


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_a_failed_checkpoint_write_keeps_the_previous_one(image_folder, tmp_path, monkeypatch, failing):
    calls = {"n": 0}
    real_save, real_replace = torch.save, os.replace

    def disk_full(*a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:                                            # the second checkpoint write
            raise OSError(errno.ENOSPC, "No space left on device")
        return (real_save if failing == "torch.save" else real_replace)(*a, **k)

    if failing == "torch.save":
        monkeypatch.setattr(torch, "save", disk_full)
    else:                                                  # the rename into place (rotation included)
        monkeypatch.setattr(ckpt_io.os, "replace", lambda *a, **k: disk_full(*a, **k)
                            if str(a[1]).endswith("checkpoint.pt") else real_replace(*a, **k))
    with pytest.raises(train.RunStopped, match="No space left on device") as err:
        train.main(_args(image_folder, tmp_path, "run", "epochs=3", "final_eval=false"))
    assert "checkpoint.pt" in str(err.value)
    monkeypatch.undo()
    run = tmp_path / "run"
    state = ckpt_io.load(run / "checkpoint.pt")
    assert state["step"] == 3                                        # the first checkpoint, intact
    assert not [p for p in run.iterdir() if p.name.startswith(".")], list(run.iterdir())   # no temp file


def test_a_failed_metrics_write_stops_naming_the_path(image_folder, tmp_path):
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)          # not writable as a file
    with pytest.raises(train.RunStopped, match="metrics.jsonl"):
        train.main(_args(image_folder, tmp_path, "run", "epochs=1"))


# ---- every method through the one loop ----------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_trains_through_the_same_loop(image_folder, tmp_path, method):
    recipe = RECIPE.get(method, "simclr")
    if method in RECIPE:                                   # masked image modeling: 32 px, 8 px patches
        extra = ["size=32", "views=1"]
    else:                                                  # each method takes only its own keys
        extra = (["pred_hidden=32"] if METHODS[method].predictor else []) + (["queue_size=16"] if method == "moco" else [])
    res = train.main(_args(image_folder, tmp_path, method, f"method={method}", f"recipe={recipe}", "epochs=1",
                           "max_steps=2", "final_eval=false", *extra))
    assert res["step"] == 2
    rows = [r for r in _metrics(tmp_path / method) if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    state = ckpt_io.load(tmp_path / method / "checkpoint.pt")
    assert state["meta"]["method"] == method and state["step"] == 2


# ---- exact resume, as a matrix ------------------------------------------------------------------------

RESUME_CASES = {
    "moco+mixmask": ["method=moco", "recipe=mixmask", "queue_size=16"],        # queue, EMA, mixing draws
    "simclr+mscn": ["method=simclr", "recipe=mscn"],                          # masks, noise fills
    "barlow+unmix": ["method=barlow", "recipe=unmix"],                        # mixup / cutmix draws
    "byol+multicrop": ["method=byol", "pred_hidden=32", "recipe=byol_multicrop", "views=8",
                       "crops=2x24@0.3-1,6x12@0.1-0.3"],                       # 2 + 6 crops, two sizes
}


def _resume_matches(folder, tmp_path, common):
    full = train.main(_args(folder, tmp_path, "full", *common))
    cut = train.main(_args(folder, tmp_path, "cut", *common, "max_steps=4"))
    assert cut["step"] == 4
    resumed = train.main(_args(folder, tmp_path, "cut", *common, "resume=true"))
    assert resumed["step"] == full["step"]
    assert _losses(tmp_path / "cut") == _losses(Path(full["run_dir"]))
    steps = [r["step"] for r in _metrics(tmp_path / "cut") if "loss" in r]
    assert steps == sorted(set(steps))                                  # no step logged twice
    assert _same_weights(_backbone(tmp_path / "cut"), _backbone(Path(full["run_dir"])))
    a, b = ckpt_io.load(tmp_path / "cut" / "checkpoint.pt"), ckpt_io.load(Path(full["run_dir"]) / "checkpoint.pt")
    assert _same_weights(a["model"], b["model"])                         # heads, EMA target, queue too


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_exact(image_folder, tmp_path, case):
    _resume_matches(image_folder, tmp_path, ["epochs=3", "final_eval=false", *RESUME_CASES[case]])


@pytest.mark.slow
def test_resume_is_exact_with_two_ranks_and_random_augmentation(image_folder, tmp_path):
    """2-rank torchrun runs (gloo), each rank with its own augment stream: cut at step 4 and resumed
    equals the uninterrupted 2-rank run, step by step and bitwise."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASKSIAM_DEVICE": "cpu"}
    common = ["epochs=3", "recipe=byol", "method=byol", "pred_hidden=32", "final_eval=false"]

    def run(name, *extra):
        out = subprocess.run([*torchrun, *_args(image_folder, tmp_path, name, *common, *extra)], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    run("full")
    run("cut", "max_steps=4")
    run("cut", "resume=true")
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full") and len(_losses(tmp_path / "full")) == 9
    assert _same_weights(_backbone(tmp_path / "cut"), _backbone(tmp_path / "full"))


def _metrics_lines(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


def test_metrics_of_a_resumed_run_hold_each_step_once(image_folder, tmp_path):
    train.main(_args(image_folder, tmp_path, "run", "epochs=2", "final_eval=false", "max_steps=4"))
    # a killed run may have logged steps after its last checkpoint: they are dropped on resume
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    train.main(_args(image_folder, tmp_path, "run", "epochs=2", "final_eval=false", "resume=true"))
    steps = [json.loads(line)["step"] for line in _metrics_lines(tmp_path / "run")]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "ffcv"])
def test_resume_is_exact_with_the_dali_and_ffcv_loaders(image_folder, tmp_path, loader):
    from conftest import have_loader_library
    if not have_loader_library({"dali": "nvidia.dali", "ffcv": "ffcv"}[loader]):
        pytest.skip(f"{loader} is not installed")
    data = image_folder
    if loader == "ffcv":                                   # the .beton beside a copy of the folder
        import convert
        data = tmp_path / "data"
        assert convert.main(["ffcv", "--src", str(image_folder / "train"), "--out", str(data / "train.beton"),
                             "--max-res", "128", "--workers", "2", "--no-progress"]) == 0
    _resume_matches(data, tmp_path, ["epochs=3", "final_eval=false", f"loader={loader}", "workers=2",
                                     "recipe=simclr"])


def test_checkpoints_are_read_onto_the_cpu(tmp_path, monkeypatch):
    """Generator states must stay CPU byte tensors (torch.Generator.set_state takes nothing else): a
    checkpoint is never mapped onto the training device (load_state_dict copies weights there)."""
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    ckpt_io.save_atomic({"augment": [{"device": torch.Generator().get_state()}]}, tmp_path / "c.pt")
    monkeypatch.setattr(torch, "load", spy)
    state = ckpt_io.load(tmp_path / "c.pt")
    assert seen["map_location"] == "cpu" and seen["weights_only"] is True
    torch.Generator().set_state(state["augment"][0]["device"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda(image_folder, tmp_path, monkeypatch):
    """The first CUDA resume: augment generator states (CUDA and host) restored from a CPU-loaded
    checkpoint; the resumed steps equal the uninterrupted run's (to float tolerance: cuDNN)."""
    monkeypatch.setenv("MASKSIAM_DEVICE", "cuda")
    common = ["epochs=2", "final_eval=false", "recipe=byol", "method=byol", "pred_hidden=32", "precision=fp32"]
    full = train.main(_args(image_folder, tmp_path, "full", *common))
    train.main(_args(image_folder, tmp_path, "cut", *common, "max_steps=4"))
    train.main(_args(image_folder, tmp_path, "cut", *common, "resume=true"))
    a, b = _losses(Path(full["run_dir"])), _losses(tmp_path / "cut")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-3, abs=1e-4)


def test_augmenting_one_batch_ahead_changes_no_number(image_folder, tmp_path):
    """augment_ahead (the default; a side stream on CUDA) draws batch k+1 before step k trains: the
    same losses as augmenting each batch when it trains, and a cut + resume repeats them (the
    checkpoint holds the augmenter's state before the untrained batch's draw)."""
    common = ["epochs=2", "final_eval=false", "recipe=mscn"]
    ahead = train.main(_args(image_folder, tmp_path, "ahead", *common))
    plain = train.main(_args(image_folder, tmp_path, "plain", *common, "augment_ahead=false"))
    assert _losses(Path(ahead["run_dir"])) == _losses(Path(plain["run_dir"]))
    assert _same_weights(_backbone(Path(ahead["run_dir"])), _backbone(Path(plain["run_dir"])))


# ---- a long run survives a bad image --------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_mid_run_is_skipped_named_and_resume_stays_exact(image_folder, tmp_path, workers):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = sorted((data / "train" / "class_01").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:200])                 # truncated after the run's file listing
    common = ["epochs=3", "final_eval=false", f"workers={workers}"]
    full = train.main(_args(data, tmp_path, "full", *common))
    assert any(bad.name in b and "class_01" in b for b in full["bad_images"]), full["bad_images"]
    logged = [b for r in _metrics(tmp_path / "full") for b in r.get("bad_images", [])]
    assert len(logged) == 1 and bad.name in logged[0]       # named once, in the line of its interval
    _resume_matches(data, tmp_path / "again", common)       # the replacement is deterministic
    with pytest.raises(train.DataError, match=bad.name):
        train.main(_args(data, tmp_path, "stop", *common, "bad_images=stop"))


def test_a_failed_export_stops_naming_the_path(image_folder, tmp_path, monkeypatch):
    real = ckpt_io.save_atomic

    def full_disk(obj, path):
        if Path(path).name == "backbone.pt":
            raise OSError(errno.EIO, "Input/output error")
        return real(obj, path)

    monkeypatch.setattr(ckpt_io, "save_atomic", full_disk)
    with pytest.raises(train.RunStopped, match="backbone.pt.*Input/output error.*checkpoint is kept"):
        train.main(_args(image_folder, tmp_path, "run", "epochs=1"))
    assert ckpt_io.load(tmp_path / "run" / "checkpoint.pt")["step"] == 3
