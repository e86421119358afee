"""bench.py scale: the hard-link dataset builder (files per class, links per source, reuse), the
growth per file and the extrapolation to 14 M files on known numbers, the process-tree memory sampler
on processes of known size, the mode end to end at 300 files in fresh processes (every column of its
tables), and its one-line errors on bad --files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from bench import scale
from masksiam.errors import UserExit

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(REPO)}


def test_hard_link_builder_makes_n_files_in_the_class_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "MAX_LINKS", 120)       # 1,000 files: ceil(1000 / 120) = 9 sources
    root = tmp_path / "files-1000"
    made = scale.build_dataset(root, 1000, 7)
    assert not made["reused"]
    folders = sorted((root / "train").iterdir())
    assert [f.name for f in folders] == [f"c{c:05d}" for c in range(7)]
    counts = [len(list(f.iterdir())) for f in folders]
    assert counts == [143, 143, 143, 143, 143, 143, 142] == scale.class_counts(1000, 7)
    sources = sorted((root / ".sources").iterdir())
    assert len(sources) == 9
    inodes = {s.stat().st_ino: s for s in sources}
    links = [p.stat() for f in folders for p in f.iterdir()]
    assert {st.st_ino for st in links} == set(inodes)  # every file is a link of a source
    for s in sources:                                  # the source itself + at most MAX_LINKS links
        assert 2 <= s.stat().st_nlink <= 121
    assert len({s.read_bytes() for s in sources}) == 9  # distinct JPEGs
    from PIL import Image
    with Image.open(next(folders[0].iterdir())) as img:
        assert img.format == "JPEG" and img.size == (48, 48)
    # the folder rules see exactly these files and classes
    from pipelines.loaders.common import scan_image_folder
    found = scan_image_folder(root / "train")
    assert len(found.paths) == 1000 and len(found.classes) == 7
    # reused with its marker; another size rebuilds
    assert scale.build_dataset(root, 1000, 7) == {"root": str(root), "seconds": 0.0, "reused": True}
    again = scale.build_dataset(root, 500, 5)
    assert not again["reused"]
    assert sum(len(list(f.iterdir())) for f in (root / "train").iterdir()) == 500
    assert len(list((root / "train").iterdir())) == 5


def test_default_sources_stay_under_the_link_limit():
    # ext4 allows 65,000 links per inode: 1.28 M files need at least 22 sources of <= 60,000 links
    assert scale.MAX_LINKS * max(4, -(-1_281_167 // scale.MAX_LINKS)) >= 1_281_167
    assert scale.MAX_LINKS < 65_000


def test_extrapolation_on_known_numbers():
    # 100 MB at 10k files, 1,000 MB at 100k: 10,000 B... per file in MB units: 0.01 MB per file
    slope, at = scale.extrapolate([(100_000, 1000.0), (10_000, 100.0)], target=14_000_000)
    assert slope == pytest.approx(0.01)
    assert at == pytest.approx(140_000.0)
    # a constant plus a per-file part: the line through the two largest sizes, not through zero
    slope, at = scale.extrapolate([(10_000, 50.0), (100_000, 140.0), (1_000_000, 1040.0)])
    assert slope == pytest.approx(0.001)
    assert at == pytest.approx(1040.0 + 0.001 * 13_000_000)
    # one size: proportional
    slope, at = scale.extrapolate([(1_000, 5.0)], target=14_000)
    assert (slope, at) == (pytest.approx(0.005), pytest.approx(70.0))


def test_growth_rows_per_file_and_at_14m():
    mb = 2**20
    loaders = [{"files": 10_000, "loader": "torchvision", "rank_rss_end_mb": 100.0, "rank_anon_end_mb": 50.0,
                "startup_s": 0.1,
                "startup_first_s": 0.5, "worker_uss_end_mb": 10.0, "worker_dirty_end_mb": 2.1},
               {"files": 100_000, "loader": "torchvision", "rank_rss_end_mb": 109.0, "rank_anon_end_mb": 50.9,
                "startup_s": 0.19,
                "startup_first_s": 5.0, "worker_uss_end_mb": 10.0, "worker_dirty_end_mb": 3.0},
               {"files": 10_000, "loader": "dali (folder)", "note": "skipped: nvidia.dali is not importable"}]
    converters = [{"files": 10_000, "converter": "ffcv", "wall_s": 10.0, "peak_rss_mb": 300.0, "peak_pss_mb": 200.0},
                  {"files": 100_000, "converter": "ffcv", "wall_s": 100.0, "peak_rss_mb": 390.0,
                   "peak_pss_mb": 290.0}]
    train = [{"files": 10_000, "first_step_s": 4.0}, {"files": 100_000, "first_step_s": 4.9}]
    rows = {r["quantity"]: r for r in scale.growth_rows(loaders, converters, train)}
    rss = rows["torchvision: rank RSS after the batches"]
    assert rss["slope"] == pytest.approx(9 * mb / 90_000)                 # 104.9 B per file
    assert rss["growth_per_file"] == "104.9 B"
    assert rss["extrapolated"] == pytest.approx(109 * mb + 9 * mb / 90_000 * 13_900_000)
    assert rss["values"] == "10k: 100 MB / 100k: 109 MB"
    assert rows["torchvision: worker USS after the batches"]["slope"] == 0.0
    assert rows["torchvision: rank anonymous after the batches"]["growth_per_file"] == "10.5 B"
    assert rows["torchvision: worker private dirty after the batches"]["growth_per_file"] == "10.5 B"
    assert rows["torchvision: start-up (first)"]["slope"] == pytest.approx(4.5 / 90_000)
    assert rows["torchvision: start-up (first)"]["growth_per_file"] == "50.00 us"
    assert rows["convert.py ffcv: wall"]["extrapolated"] == pytest.approx(100 + 90 / 90_000 * 13_900_000)
    assert rows["convert.py ffcv: peak PSS of the tree"]["at_14M"] == f"{(290 * mb + mb / 1000 * 13_900_000) / 2**30:,.2f} GB"
    assert rows["train.py: time to first step"]["extrapolated"] == pytest.approx(4.9 + 0.9 / 90_000 * 13_900_000)
    assert not any(q.startswith("dali") for q in rows)                    # skipped at every size: no growth


def test_tree_sampler_sums_the_process_tree(tmp_path):
    # a parent holding 60 MB that starts two children holding 40 MB each, all alive for a second
    hold = "import sys, time; b = b'x' * ({mb} << 20); time.sleep({s})"
    parent = ("import subprocess, sys, time\n"
              f"kids = [subprocess.Popen([sys.executable, '-c', {hold.format(mb=40, s=1.5)!r}]) for _ in range(2)]\n"
              f"{hold.format(mb=60, s=1.5)}\n"
              "[k.wait() for k in kids]\n")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    sampler = scale.TreeSampler(proc.pid)
    proc.wait()
    sampler.stop()
    assert proc.returncode == 0
    assert sampler.processes == 3
    assert 140 * 2**20 <= sampler.peak_rss <= 260 * 2**20
    assert 140 * 2**20 <= sampler.peak_pss <= sampler.peak_rss
    assert 60 * 2**20 <= sampler.peak_main <= 100 * 2**20


def test_smaps_of_this_process_and_of_a_gone_one():
    mine = scale.smaps(os.getpid())
    assert mine["rss"] >= mine["uss"] >= mine["dirty"] > 0 and mine["rss"] >= mine["pss"] > 0 and mine["anon"] > 0
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert scale.smaps(proc.pid) is None


def test_earlier_copies_only_when_complete_and_not_converted_now(tmp_path):
    assert scale.earlier_copies(tmp_path, 100, []) == {}
    wds, beton = tmp_path / "webdataset-100", tmp_path / "ffcv-100" / "train.beton"
    wds.mkdir()
    beton.parent.mkdir()
    beton.write_bytes(b"x")                            # a .beton without its report: not complete
    assert scale.earlier_copies(tmp_path, 100, []) == {}
    (wds / ".complete").write_text("")
    (beton.parent / "train.beton.json").write_text("{}")
    assert scale.earlier_copies(tmp_path, 100, []) == {"webdataset": wds, "ffcv": beton}
    assert scale.earlier_copies(tmp_path, 100, ["ffcv"]) == {"webdataset": wds}   # converted again now
    assert scale.earlier_copies(tmp_path, 1000, []) == {}                          # another size


def test_missing_library_is_a_note(monkeypatch):
    monkeypatch.setitem(scale.MODULES, "dali", "nvidia_not_installed.dali")
    assert scale._missing("dali") == "skipped: nvidia_not_installed.dali is not importable"
    assert scale._missing("torchvision") is None


@pytest.mark.slow
def test_scale_mode_end_to_end(tmp_path):
    """300 files in 3 classes, the torchvision loader (first and cached), convert.py webdataset and
    train.py's first step, each in a fresh process; ffcv asked for without its converter: a note."""
    out = tmp_path / "scale"
    proc = subprocess.run([sys.executable, "bench.py", "scale", "--files", "300", "--classes", "3", "--loaders",
                           "torchvision,ffcv", "--converters", "webdataset", "--batches", "4", "--out", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((out / "scale.json").read_text())
    table = (out / "scale.md").read_text()
    assert table.strip() in proc.stdout
    for columns in (scale.LOADER_COLUMNS, scale.CONVERTER_COLUMNS, scale.TRAIN_COLUMNS):
        assert "| " + " | ".join(columns) + " |" in table
    tv, ffcv = payload["loaders"]
    assert tv["loader"] == "torchvision" and tv["files"] == 300
    assert ffcv == {"files": 300, "loader": "ffcv", "note": "skipped: needs --converters ffcv"}
    for key in ("startup_first_s", "startup_s", "first_batch_s", "rank_rss_start_mb", "rank_rss_end_mb",
                "rank_anon_end_mb", "worker_uss_start_mb", "worker_uss_end_mb", "worker_dirty_start_mb"):
        assert tv[key] > 0, key
    assert tv["batches"] == 4 and tv["workers"] == 2 and len(tv["worker_uss_end_mb_each"]) == 2
    assert tv["rank_B_per_file"] == pytest.approx((tv["rank_rss_end_mb"] - tv["rank_rss_base_mb"]) * 2**20 / 300)
    assert tv["worker_B_per_file"] == pytest.approx(tv["worker_uss_end_mb"] * 2**20 / 300)
    line = next(x for x in table.splitlines() if x.startswith("| 300 | torchvision |"))
    assert "-" not in [cell.strip() for cell in line.split("|")[3:19]]   # every loader column filled
    assert tv["worker_growth_mb"] == pytest.approx(tv["worker_dirty_end_mb"] - tv["worker_dirty_start_mb"])
    assert 0 < tv["worker_dirty_end_mb"] <= tv["worker_uss_end_mb"]
    (conv,) = payload["converters"]
    assert conv["converter"] == "webdataset" and conv["wall_s"] > 0 and conv["processes"] >= 1
    assert 0 < conv["peak_pss_mb"] <= conv["peak_rss_mb"]
    assert conv["B_per_file"] == pytest.approx(conv["peak_pss_mb"] * 2**20 / 300)
    (train,) = payload["train"]
    assert 0 < train["first_step_s"] < train["total_s"], train
    assert payload["growth"] == [] and "one size" in payload["notes"][-1]
    assert "300 files: 5-minute load average" in payload["notes"][0]
    assert not (out / "files-300").exists() and not (out / "webdataset-300").exists()   # no --keep


@pytest.mark.parametrize("files", ["0", "abc", "-5", "1.5", "100,"])
def test_bad_files_is_one_line_exit_2(files, capsys):
    with pytest.raises(UserExit) as done:
        bench.main(["scale", "--files", files])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bench.py: error: scale: --files") and repr(files) in err


def test_more_classes_than_files_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(UserExit) as done:
        bench.main(["scale", "--files", "10,100", "--classes", "20", "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    assert "--classes 20 is more than --files 10" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()             # refused before anything is made


def test_bad_files_from_the_command_line():
    """As a user types it: a fresh interpreter, one line on stderr, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "bench.py", "scale", "--files", "abc"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--files 'abc'" in proc.stderr and "Traceback" not in proc.stderr
