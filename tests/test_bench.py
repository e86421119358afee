"""bench.py on tiny data: every mode writes well-formed JSON (rates > 0, ratios to the first row of
the same run), a markdown table with one line per row and a PNG chart; sweeps give the cartesian
product of rows; `readme` rewrites only the marked block. Speed is never asserted: these runs are
too short and the machines too noisy for that, the numbers only have to be measured consistently."""
from __future__ import annotations

import argparse
import json
import time
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench
from bench import loader as loader_mode
from bench.loop import bench_loop

from conftest import have_loader_library

HAVE_DALI = have_loader_library("nvidia.dali")  # an error, not skips, where the project installed it
HAVE_FFCV = have_loader_library("ffcv")

TINY_LOADER = ["--views", "2", "--size", "32", "--batch-size", "8", "--workers", "0", "--warmup", "2",
               "--batches", "2", "--device", "cpu"]
TINY_AUGMENT = ["--batch-size", "8", "--size", "32", "--batches", "2", "--warmup", "1", "--reference-images", "4",
                "--device", "cpu"]
TINY_TRAIN = ["arch=resnet10", "width=8", "size=24", "stem=small", "batch_size=8", "workers=0", "views=2",
              "proj_hidden=32", "proj_dim=16", "recipe=simclr", "seed=0"]


@pytest.fixture(autouse=True)
def _keep_threads():
    """augment --threads / --sweep threads set torch's thread count for the whole process."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def results(image_folder, tmp_path_factory) -> Path:
    """One small `make bench`: loader, augment and train JSON files in one folder."""
    out = tmp_path_factory.mktemp("bench")
    n = torch.get_num_threads()
    bench.main(["loader", "--data", str(image_folder), *TINY_LOADER, "--json", str(out / "loader.json")])
    bench.main(["augment", "--recipe", "mscn,simclr", *TINY_AUGMENT, "--json", str(out / "augment.json")])
    torch.set_num_threads(n)
    bench.main(["train", "--compare", "torchvision", "--warmup", "2", "--batches", "2",
                "--out-dir", str(out / "runs"), "--device", "cpu", "--json", str(out / "train.json"),
                "--set", f"data={image_folder}", *TINY_TRAIN])
    return out


def check_outputs(json_path: Path, rate: str = "images_per_s") -> list[dict]:
    """The three files of a run: returns its rows after checking what every mode promises."""
    payload = json.loads(json_path.read_text())
    rows = payload["results"]
    assert rows and payload["mode"] == json_path.stem
    assert {"cpu", "cores", "torch", "date"} <= payload["machine"].keys()
    assert payload["machine"]["torch"] == torch.__version__
    for r in rows:
        assert r[rate] > 0 and r["startup_s"] >= 0 and r["peak_rss_mb"] > 0
        # CPU times tick every 10 ms, a tiny loader run can take less: present and >= 0 is all there is
        assert r["cpu_percent"] >= 0 and r["other_cpu_percent"] >= 0
        assert r["ratio"] == pytest.approx(r[rate] / rows[0][rate], rel=1e-12)
    assert rows[0]["ratio"] == 1.0
    table = json_path.with_suffix(".md").read_text().splitlines()
    assert table == payload["table"].splitlines() and len(table) == len(rows) + 2
    assert table[0].startswith("| label |") and table[1].startswith("|---|")
    for line, r in zip(table[2:], rows):
        assert line.startswith(f"| {r['label']} |")
    png = json_path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    return rows


def test_loader_mode(results):
    (row,) = check_outputs(results / "loader.json")
    assert row["label"] == row["backend"] == "torchvision"
    assert row["batches"] == 2 and row["batch_size"] == 8 and row["workers"] == 0
    assert row["peak_rss_mb"] > 0 and row["s_per_batch_p95"] >= row["s_per_batch_p50"] > 0


def test_augment_mode_against_the_per_sample_reference(results):
    rows = check_outputs(results / "augment.json", rate="views_per_s")
    assert [r["label"] for r in rows] == ["mscn", "simclr"]
    for r in rows:
        assert r["reference_images"] == 4 and r["reference_views_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["views_per_s"] / r["reference_views_per_s"])
        assert r["startup_s"] >= r["first_call_s"] > 0
    assert rows[0]["views_per_image"] > rows[1]["views_per_image"] == 2   # MSCN's extra masked copies


def test_train_mode_end_to_end_vs_model_only(results):
    e2e, model = check_outputs(results / "train.json")
    assert (e2e["label"], e2e["loader"], e2e["recipe"]) == ("end-to-end (torchvision)", "torchvision", "simclr")
    assert (model["label"], model["loader"]) == ("model-only", "synthetic")
    assert model["recipe"].endswith("model-only-simclr.yaml") and e2e["device"] == model["device"] == "cpu"
    assert e2e["efficiency"] == pytest.approx(e2e["images_per_s"] / model["images_per_s"])
    assert model["efficiency"] == 1.0
    for r in (e2e, model):
        assert r["steps"] == 2 and r["arch"] == "resnet10" and r["batch_size"] == 8
        assert 0 <= r["data_wait"] <= 1 and r["exit"] == "reached max_steps=4"
    assert model["data_wait"] < e2e["data_wait"]      # nothing to load: the one robust ordering here


@pytest.mark.parametrize("recipe,mix", [("mscn", "none"), ("mixmask", "none"), ("simclr", "unmix"),
                                        ("simmim", "none"), ("simclr_multicrop", "none")])
def test_model_only_twin_feeds_the_network_what_the_recipe_does(recipe, mix, tmp_path):
    """Like for like: the twin's views (count, sizes, pairs), mixed view and SimMIM masks are the
    recipe's; every per-pixel op is off (a constant image stays constant after normalising)."""
    import yaml
    from pipelines.augment.engine import build_augmenter
    from pipelines.augment.recipes import load_recipe, with_mix
    path = tmp_path / "twin.yaml"
    path.write_text(yaml.safe_dump(bench.model_only_recipe(recipe, mix)))
    original, twin = with_mix(load_recipe(recipe), mix), load_recipe(path)
    assert twin.pairs == original.pairs and twin.mix == original.mix and twin.simmim == original.simmim
    assert [(b.source, b.copies, b.local) for b in twin.branches] == \
           [(b.source, b.copies, b.local) for b in original.branches]
    sizes = [32 if not b.local else 16 for b in original.branches]
    sizes = [sizes[next(i for i, b in enumerate(original.branches) if b.source == s)] for s in range(original.sources)]
    views = [torch.full((4, 3, s, s), 100, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
             for s in sizes]
    ref, out = build_augmenter(original, size=sizes)(views), build_augmenter(twin, size=sizes)(views)
    assert [v.shape for v in out.views] == [v.shape for v in ref.views]
    assert (out.mixed is None) == (ref.mixed is None)
    assert [m is None for m in out.mim_masks or []] == [m is None for m in ref.mim_masks or []]
    assert (recipe == "simmim") == any(m is not None for m in ref.mim_masks or [])
    for v in out.views:                                 # normalise only: (100/255 - mean) / std per channel
        assert torch.allclose(v, v[:, :, :1, :1].expand_as(v))


def test_train_rows_run_on_the_rows_device(monkeypatch, tmp_path):
    """--device cpu: train.py's init_distributed is told the CPU (MASKSIAM_DEVICE), on a CUDA host
    too; the variable is restored after the row."""
    import train
    from masksiam.dist import DEVICE_ENV, choose_device
    seen = []

    def fake_main(argv, wrap=None):
        seen.append((os.environ.get(DEVICE_ENV), choose_device()))
        raise RuntimeError("stop here")
    monkeypatch.setattr(train, "main", fake_main)
    monkeypatch.setenv(DEVICE_ENV, "auto")
    args = argparse.Namespace(out_dir=str(tmp_path), config=None, set=[], warmup=1, batches=1, mode="train")
    with pytest.raises(RuntimeError, match="stop here"):
        bench_loop("row", [], args, torch.device("cpu"))
    assert seen == [("cpu", "cpu")] and os.environ[DEVICE_ENV] == "auto"


SYNC_TRAIN = ["loader=synthetic", "arch=resnet10", "width=8", "size=24", "stem=small", "batch_size=8", "views=2",
              "proj_hidden=32", "proj_dim=16", "recipe=simclr", "seed=0"]


def test_syncs_passes_the_step_path_and_names_a_planted_host_read(monkeypatch, tmp_path):
    args = ["syncs", "--device", "cpu", "--steps", "2", "--skip", "1", "--out-dir", str(tmp_path / "runs"),
            "--json", str(tmp_path / "syncs.json"), "--set", f"data={tmp_path}", *SYNC_TRAIN]
    res = bench.main(args)
    assert res["ok"] and res["guarded_calls"]["train_step"] == 2 and res["guarded_calls"]["after_step"] == 2
    assert json.loads((tmp_path / "syncs.json").read_text())["results"][0]["ok"]
    import train
    step = train.train_step

    def reads_the_loss(*a, **k):
        loss, logs, nonfinite = step(*a, **k)
        print(f"loss {loss.item()}")               # a sync per step on CUDA
        return loss, logs, nonfinite
    monkeypatch.setattr(train, "train_step", reads_the_loss)
    res = bench.main(args)
    assert not res["ok"] and "item" in res["error"] and any("reads_the_loss" in w for w in res["where"])
    assert train.train_step is reads_the_loss          # the guard is removed afterwards
    with pytest.raises(SystemExit, match="FAILED in"):
        bench.main(args + ["--strict"])


def test_sweeps_are_cartesian(image_folder, tmp_path):
    out = tmp_path / "loader.json"
    bench.main(["loader", "--data", str(image_folder), *TINY_LOADER, "--sweep", "workers=0,1",
                "--sweep", "batch_size=4,8", "--json", str(out)])
    rows = check_outputs(out)
    assert [(r["workers"], r["batch_size"]) for r in rows] == [(0, 4), (0, 8), (1, 4), (1, 8)]
    assert rows[3]["label"] == "torchvision workers=1 batch_size=8"
    with pytest.raises(SystemExit, match="choose from"):
        bench.main(["loader", "--data", str(image_folder), "--sweep", "threads=1,2", "--json", str(out)])

    out = tmp_path / "augment.json"
    bench.main(["augment", "--recipe", "simclr", *TINY_AUGMENT, "--reference-images", "0",
                "--sweep", "threads=1,2", "--json", str(out)])
    rows = check_outputs(out, rate="views_per_s")
    assert [r["threads"] for r in rows] == [1, 2] and "speedup" not in rows[0]

    out = tmp_path / "model.json"       # train.py's own keys pass through as overrides
    bench.main(["model", "--warmup", "1", "--batches", "1", "--out-dir", str(tmp_path / "runs"), "--device",
                "cpu", "--sweep", "batch_size=4,8", "--json", str(out), "--set", f"data={image_folder}", *TINY_TRAIN])
    rows = check_outputs(out)
    assert [(r["label"], r["batch_size"]) for r in rows] == [("model-only batch_size=4", 4),
                                                             ("model-only batch_size=8", 8)]


def test_loader_torchvision_v2_baseline_and_host_cpu(image_folder, tmp_path):
    out = tmp_path / "loader.json"
    bench.main(["loader", "--compare", "torchvision,torchvision-v2", "--data", str(image_folder), *TINY_LOADER,
                "--json", str(out)])
    rows = check_outputs(out)
    assert [r["backend"] for r in rows] == ["torchvision", "torchvision-v2"]
    for r in rows:
        assert r["ratio_tv2"] == pytest.approx(r["images_per_s"] / rows[1]["images_per_s"], rel=1e-12)
        assert r["host_cpu_ms"] == pytest.approx(10 * r["cpu_percent"] / r["images_per_s"])
        assert 0 < r["decode_ms"] < 50 and r["decodes_per_image"] == 1
        assert r["host_cpu_ex_decode_ms"] == pytest.approx(r["host_cpu_ms"] - r["decode_ms"])
    assert rows[1]["ratio_tv2"] == 1.0
    header = out.with_suffix(".md").read_text().splitlines()[0]
    assert "| ratio_tv2 |" in header and "| host_cpu_ex_decode_ms |" in header

    crops = "2x32@0.3-1,3x16@0.05-0.3"                # multi-crop: every backend, one label each
    bench.main(["loader", "--compare", "torchvision-v2,torchvision", "--data", str(image_folder), *TINY_LOADER,
                "--crops", crops, "--json", str(out)])
    rows = check_outputs(out)
    assert [r["label"] for r in rows] == [f"torchvision-v2 crops={crops}", f"torchvision crops={crops}"]


def test_torchvision_v2_views():
    """The baseline's transform: V independent antialiased resized crops + flips of one image, uint8."""
    from PIL import Image
    from torchvision.transforms import v2
    photo = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    views = loader_mode._Views([(32, (0.2, 1.0))] * 2 + [(16, (0.05, 0.2))], ratio=(0.75, 4 / 3),
                         flip_prob=0.5)(Image.fromarray(photo))
    assert [v.shape for v in views] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
    assert all(v.dtype == torch.uint8 for v in views) and not torch.equal(views[0], views[1])
    # the whole image at its own aspect ratio, always flipped: the flipped antialiased resize of it
    whole = loader_mode._Views([(32, (1.0, 1.0))], ratio=(1.5, 1.5), flip_prob=1.0)(Image.fromarray(photo))[0]
    x = torch.from_numpy(photo).permute(2, 0, 1)
    assert torch.equal(whole, v2.functional.horizontal_flip(v2.functional.resize(x, [32, 32], antialias=True)))


@pytest.mark.skipif(not HAVE_FFCV, reason="ffcv is not installed")
def test_ffcv_decode_is_timed_on_what_the_beton_stores(image_folder, tmp_path, monkeypatch):
    """The .beton holds copies capped at the converter's --max-res: FFCV's decode_ms is the decode of
    those (its stored JPEGs), not of the folder's full-size files, which made host_cpu_ex_decode_ms
    negative. Each backend's decode is timed on what it decodes."""
    import io
    import convert
    beton = tmp_path / "train.beton"
    assert convert.main(["ffcv", "--src", str(image_folder / "train"), "--out", str(beton), "--max-res", "40",
                         "--workers", "1", "--no-progress"]) == 0
    decoded = []                                       # the images of each decode timing, in order
    timed = loader_mode._decode_ms

    def spy(payloads):
        decoded.append([Image.open(io.BytesIO(p)).size for p in payloads if p is not None])
        return timed(payloads)
    monkeypatch.setattr(loader_mode, "_decode_ms", spy)
    loader_mode._beton_decode_ms.cache_clear()
    out = tmp_path / "loader.json"
    bench.main(["loader", "--compare", "torchvision,ffcv", "--data", str(image_folder), "--ffcv-path", str(beton),
                *TINY_LOADER, "--workers", "1", "--json", str(out)])
    rows = check_outputs(out)
    assert [r["backend"] for r in rows] == ["torchvision", "ffcv"]
    folder, stored = decoded                           # the split's files, then the .beton's rows
    assert len(folder) == len(stored) == 24            # 3 classes x 8 training images, every one
    assert max(max(s) for s in stored) == 40 < max(max(s) for s in folder)
    assert rows[1]["decode_ms"] < rows[0]["decode_ms"]  # 40 px against 64-160 px: several times less work
    for r in rows:
        assert r["host_cpu_ex_decode_ms"] == pytest.approx(r["host_cpu_ms"] - r["decode_ms"])


def test_every_mode_says_what_it_measures(capsys):
    for mode in bench.DESCRIPTIONS:
        with pytest.raises(SystemExit) as done:
            bench.main([mode, "--help"])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert " ".join(bench.DESCRIPTIONS[mode].split()) in text
    assert "host_cpu_ex_decode_ms" in bench.DESCRIPTIONS["loader"]


@pytest.mark.dali
@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_loader_compare_torchvision_dali(image_folder, tmp_path):
    out = tmp_path / "loader.json"
    bench.main(["loader", "--compare", "torchvision,dali", "--data", str(image_folder), *TINY_LOADER,
                "--workers", "1", "--repeats", "2", "--json", str(out)])
    rows = check_outputs(out)
    assert [r["backend"] for r in rows] == ["torchvision", "dali"]
    for r in rows:                                     # each row: the mean of its two repeats
        assert len(r["images_per_s_runs"]) == 2
        assert r["images_per_s"] == pytest.approx(sum(r["images_per_s_runs"]) / 2)
        assert r["host_cpu_ex_decode_ms"] == pytest.approx(r["host_cpu_ms"] - r["decode_ms"])
    # DALI's decode is its decode threads' CPU time (0 on a run shorter than a tick), not a PIL estimate
    assert rows[1]["decode_ms"] >= 0 and rows[1]["decode_ms"] != rows[0]["decode_ms"]


def test_dali_decode_threads_are_found():
    """loader_mode._dali_thread_cpu reads the CPU time of threads named like DALI's workers, and only those."""
    import ctypes
    import threading
    libc = ctypes.CDLL(None)
    stop = threading.Event()

    def worker(name: bytes, named: threading.Event, busy: threading.Event):
        libc.prctl(15, name, 0, 0, 0)                  # PR_SET_NAME: this thread's /proc comm
        named.set()
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.15:         # 150 ms of CPU, 15 clock ticks
            pass
        busy.set()
        stop.wait()                                    # alive while measured: /proc lists live threads

    before = loader_mode._dali_thread_cpu()
    done = []
    for name in (b"[DALI][TP0]Exec", b"other-thread"):
        named, busy = threading.Event(), threading.Event()
        threading.Thread(target=worker, args=(name, named, busy), daemon=True).start()
        assert named.wait(10)
        done.append(busy)
    assert all(busy.wait(30) for busy in done)
    spent = loader_mode._dali_thread_cpu() - before
    stop.set()
    assert 0.12 <= spent < 0.22                        # the DALI-named thread's 150 ms, not the other's


def test_readme_rewrites_only_the_marked_block(results, tmp_path, capsys):
    before, after = "# masksiam\n\nintro text\n\n", "\n\n## Next section\nmore text\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + bench.BEGIN + "\nold numbers\n" + bench.END + after)
    res = bench.main(["readme", "--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert res["written"] and "old numbers" not in text
    assert text.startswith(before + bench.BEGIN + "\n") and text.endswith(bench.END + after)
    block = text[len(before + bench.BEGIN):-len(bench.END + after)]
    assert block.strip() == res["block"]
    machine = json.loads((results / "loader.json").read_text())["machine"]
    assert machine["cpu"] in block and f"torch {torch.__version__}" in block and machine["date"] in block
    assert "Other processes used at most" in block
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| measured")]
    assert [line.split(" | ")[0] for line in rows] == [
        "| loader: torchvision", "| augment: mscn batched vs per-sample", "| augment: simclr batched vs per-sample",
        "| train: end-to-end (torchvision)", "| train: model-only"]
    assert "x1.00" in rows[0] and "of model-only" in rows[3]
    # a second run replaces its own block: still one block, the rest of the file unchanged
    bench.main(["readme", "--results", str(results), "--readme", str(readme)])
    assert readme.read_text() == text

    # no markers: the file stays as it is, the block goes to stdout with a note on stderr
    readme.write_text("no markers here\n")
    capsys.readouterr()
    assert not bench.main(["readme", "--results", str(results), "--readme", str(readme)])["written"]
    out, err = capsys.readouterr()
    assert readme.read_text() == "no markers here\n" and res["block"] in out and bench.BEGIN in err
    missing = tmp_path / "nothing" / "README.md"
    bench.main(["readme", "--results", str(results), "--readme", str(missing)])
    assert not missing.exists()
