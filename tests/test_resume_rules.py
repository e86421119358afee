"""What a resume may change, and what survives a bad checkpoint: through train.py, in the sequences a
user meets (truncated newest checkpoint -> fallback -> the next save; a resume with another batch
size, epochs, data or world size; a resume of a run that already reached max_steps)."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

import masksiam  # noqa: F401
import train
from masksiam import checkpoint as ckpt_io
from masksiam import run_checkpoint
from masksiam.config import RESUME_MAY_CHANGE, ConfigError, valid_keys

from test_train import _args, _losses, _metrics


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("MASKSIAM_DEVICE", "cpu")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _step(path: Path) -> int:
    return ckpt_io.load(path)["step"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])                 # a full disk cut the write short


COMMON = ["epochs=3", "final_eval=false"]                    # 24 images, batch 8: 3 steps per epoch


@pytest.fixture(scope="module")
def cut_run(image_folder, tmp_path_factory) -> Path:
    """A run stopped by max_steps=4 (checkpoint.pt at step 4, checkpoint.1.pt at step 3); each test
    resumes a copy of it."""
    out = tmp_path_factory.mktemp("cut")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKSIAM_DEVICE", "cpu")
        train.main(_args(image_folder, out, "run", *COMMON, "max_steps=4"))
    return out / "run"


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


# ---- item 3: an unreadable checkpoint never replaces a readable one ----------------------------------

def test_a_truncated_newest_checkpoint_is_never_rotated_over_the_good_copy(image_folder, tmp_path, capsys):
    """checkpoint.pt truncated -> resume falls back to checkpoint.1.pt -> the next save takes the
    truncated file's name and keeps the good copy as checkpoint.1.pt: a second fault on the newest
    file still finds it."""
    train.main(_args(image_folder, tmp_path, "run", *COMMON, "max_steps=6"))
    run = tmp_path / "run"
    assert (_step(run / "checkpoint.pt"), _step(run / "checkpoint.1.pt")) == (6, 3)
    good = (run / "checkpoint.1.pt").read_bytes()
    _truncate(run / "checkpoint.pt")
    # resumed from step 3, the end of epoch 2 (step 6) writes one checkpoint, then max_steps stops it
    res = train.main(_args(image_folder, tmp_path, "run", *COMMON, "max_steps=6", "resume=true"))
    assert "resuming from the previous checkpoint" in capsys.readouterr().out and res["step"] == 6
    assert _step(run / "checkpoint.pt") == 6
    assert (run / "checkpoint.1.pt").read_bytes() == good        # not the truncated file
    _truncate(run / "checkpoint.pt")                              # another fault: the good copy is there
    res = train.main(_args(image_folder, tmp_path, "run", *COMMON, "resume=true"))
    assert res["step"] == 9 and _step(run / "checkpoint.pt") == 9 and _step(run / "checkpoint.1.pt") == 6


def test_with_every_checkpoint_unreadable_the_error_says_what_to_do(image_folder, cut_run, tmp_path):
    run = _copy(cut_run, tmp_path)
    _truncate(run / "checkpoint.pt")
    (run / "checkpoint.1.pt").write_bytes(b"not a checkpoint")
    before = _digest(run)
    with pytest.raises(ckpt_io.CheckpointError) as err:
        train.main(_args(image_folder, tmp_path, "run", *COMMON, "resume=true"))
    msg = str(err.value)
    assert "\n" not in msg and str(run / "checkpoint.pt") in msg and str(run / "checkpoint.1.pt") in msg, msg
    assert "delete or move checkpoint.pt, checkpoint.1.pt" in msg and "another run_name" in msg, msg
    assert _digest(run) == before


def _state(step: int) -> dict:
    return {"step": step}


@pytest.mark.parametrize("files, bad, after", [
    # files present as {name: step} (all readable here); bad: the names load_latest skipped (declared
    # unreadable); after: {name: step} after saving step 9 with keep=3
    ({"c": 2, "c1": 1}, {"c"}, {"c": 9, "c1": 1}),
    ({"c": 2, "c1": 1}, set(), {"c": 9, "c1": 2, "c2": 1}),
    ({"c": 3, "c1": 2, "c2": 1}, {"c"}, {"c": 9, "c1": 2, "c2": 1}),
    ({"c": 3, "c1": 2, "c2": 1}, {"c", "c1"}, {"c": 9, "c1": 2, "c2": 1}),     # c1 bad: written over later
    ({"c": 3, "c1": 2, "c2": 1}, {"c1"}, {"c": 9, "c1": 3, "c2": 1}),
    ({"c": 3, "c2": 1}, set(), {"c": 9, "c1": 3, "c2": 1}),
    ({"c": 3, "c1": 2, "c2": 1}, set(), {"c": 9, "c1": 3, "c2": 2}),
])
def test_rotation_moves_only_the_files_before_the_first_free_name(tmp_path, files, bad, after):
    names = dict(zip(["c", "c1", "c2"], ckpt_io.rotation(tmp_path / "checkpoint.pt", 3)))
    for key, step in files.items():
        ckpt_io.save_atomic(_state(step), names[key])
    ckpt_io.save_rotating(_state(9), names["c"], keep=3, unreadable={names[k] for k in bad})
    assert {k: ckpt_io.load(p)["step"] for k, p in names.items() if p.exists()} == after


# ---- item 4: a resume keeps what the loader position and the lr schedule depend on -------------------

@pytest.mark.parametrize("change, named", [
    ("batch_size=4", "batch_size=8 (this run: 4)"),
    ("epochs=5", "epochs=3 (this run: 5)"),
    ("warmup_epochs=1", "warmup_epochs=0.5 (this run: 1.0)"),
    ("lr=0.1", "lr=0.5 (this run: 0.1)"),
    ("drop_last=false", "drop_last=True (this run: False)"),
    ("max_images=12", "max_images=0 (this run: 12)"),
    ("crop_scale=[0.5,1.0]", "crop_scale=[0.3, 1.0] (this run: [0.5, 1.0])"),
    ("seed=1", "seed=0 (this run: 1)"),
    ("read_order=shard", "read_order='auto' (this run: 'shard')"),
])
def test_a_resume_that_changes_the_steps_is_refused_and_writes_nothing(image_folder, cut_run, tmp_path, change,
                                                                       named):
    run = _copy(cut_run, tmp_path)
    before = _digest(run)
    with pytest.raises(ckpt_io.CheckpointError) as err:
        train.main(_args(image_folder, tmp_path, "run", *COMMON, "resume=true", change))
    assert named in str(err.value) and "set them back" in str(err.value), str(err.value)
    assert _digest(run) == before


def test_a_resume_on_another_world_size_is_refused(image_folder, cut_run, tmp_path, monkeypatch):
    """Each rank has its own augment stream and sample share: the checkpoint's world size must stay."""
    run = _copy(cut_run, tmp_path)
    before = _digest(run)
    real = run_checkpoint.resume_record
    monkeypatch.setattr(run_checkpoint, "resume_record", lambda loader, info: {**real(loader, info), "world_size": 2})
    with pytest.raises(ckpt_io.CheckpointError, match=r"world_size=1 \(this run: 2\)"):
        train.main(_args(image_folder, tmp_path, "run", *COMMON, "resume=true"))
    assert _digest(run) == before


def test_a_resume_on_other_training_images_is_refused(image_folder, cut_run, tmp_path):
    """Moved data resumes; data with one image more, or renamed, is refused naming the count or the names."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    extra = sorted((data / "train").rglob("*.jpg"))[0]
    shutil.copy(extra, extra.with_name("zz_extra.jpg"))
    run = _copy(cut_run, tmp_path)
    before = _digest(run)
    with pytest.raises(ckpt_io.CheckpointError, match=r"train_images=24 \(this run: 25\)"):
        train.main(_args(data, tmp_path, "run", *COMMON, "resume=true"))
    extra.unlink()                                             # 24 images again, one name differs
    with pytest.raises(ckpt_io.CheckpointError, match=r"train_names_sha1="):
        train.main(_args(data, tmp_path, "run", *COMMON, "resume=true"))
    assert _digest(run) == before


def test_allowed_changes_and_moved_data_resume_exactly(image_folder, cut_run, tmp_path):
    """The data copied elsewhere (same names), and keys a resume may change: the resumed run equals
    the uninterrupted one, step by step and bitwise."""
    full = train.main(_args(image_folder, tmp_path, "full", *COMMON))
    data = tmp_path / "moved"
    shutil.copytree(image_folder, data)
    run = _copy(cut_run, tmp_path)
    res = train.main(_args(data, tmp_path, "run", *COMMON, "resume=true", "log_every=2", "keep_checkpoints=3",
                           "knn_k=3", "online_probe=true", "max_bad_steps=5", "progress=true"))
    assert res["step"] == 9
    full_losses, got = _losses(Path(full["run_dir"])), _losses(run)
    assert sorted(got) == [1, 2, 3, 4, 6, 8, 9]                # log_every=2 after the resume
    assert all(got[s] == full_losses[s] for s in (1, 2, 3, 4, 9))   # steps 6, 8: means of two steps
    a, b = ckpt_io.load(run / "checkpoint.pt"), ckpt_io.load(Path(full["run_dir"]) / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_keys_a_resume_may_change_are_config_keys():
    assert RESUME_MAY_CHANGE <= set(valid_keys())
    assert not {"batch_size", "epochs", "warmup_epochs", "lr", "seed", "max_images", "drop_last", "views",
                "crops", "recipe", "optimizer", "loader"} & RESUME_MAY_CHANGE


# ---- item 5: a run that reached max_steps trains no more --------------------------------------------

def test_resuming_a_run_at_max_steps_trains_zero_steps(image_folder, cut_run, tmp_path):
    run = _copy(cut_run, tmp_path)
    before = _digest(run)
    res = train.main(_args(image_folder, tmp_path, "run", *COMMON, "resume=true", "max_steps=4"))
    assert res["step"] == 4 and res["exit"] == "reached max_steps=4"
    assert _digest(run)["checkpoint.pt"] == before["checkpoint.pt"]        # no step, no save
    assert [r["step"] for r in _metrics(run) if "loss" in r] == [1, 2, 3, 4]
    res = train.main(_args(image_folder, tmp_path, "run", *COMMON, "resume=true", "max_steps=3"))
    assert res["step"] == 4 and _digest(run)["checkpoint.pt"] == before["checkpoint.pt"]


# ---- run_name: empty = a new timestamped run; its resume needs the name ------------------------------

def test_an_empty_run_name_starts_a_timestamped_run_and_resume_needs_the_name(image_folder, tmp_path,
                                                                             monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    res = train.main(_args(image_folder, tmp_path, "", "epochs=1", "max_steps=1", "final_eval=false"))
    run = Path(res["run_dir"])
    assert run.parent == tmp_path and re.fullmatch(r"simclr-resnet10-\d{8}-\d{6}", run.name), run.name
    assert f"run_name: {run.name}" in (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="resume=true needs the run_name"):
        train.main(_args(image_folder, tmp_path, "", "epochs=1", "resume=true"))
    res = train.main(_args(image_folder, tmp_path, run.name, "epochs=1", "final_eval=false", "resume=true"))
    assert res["step"] == 3 and Path(res["run_dir"]) == run
