"""tools/gpu_check.sh --dry-run: every step of the GPU measurement at tiny sizes on the CPU, so the
script cannot rot between the rare GPU windows. Checks the files it promises (at most 8, each under
16 MB), that every step ran and passed (or was skipped saying why), the rows of each mode, and that
`bench.py readme` takes its folder."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parent.parent
FILES = {"gpu_check.md", "gpu_check.json", "gpu_check.log", "augment.json", "model.json", "train.json",
         "augment.png", "train.png"}


@pytest.fixture(scope="module")
def dry_run(image_folder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DATA": str(image_folder)}
    env.pop("MASKSIAM_DEVICE", None)
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2400)
    return out, done


@pytest.mark.slow
def test_dry_run_completes_and_writes_its_files(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names == FILES
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["environment"]["torch"]
    steps = {s["step"]: s for s in summary["steps"]}
    expected = {"environment", "cuda-tests", "augment-eager", "augment-compiled-simclr", "model-siamese",
                "model-simmim", "train", "syncs-simclr-mscn"}       # the dry run: one row per step
    assert expected <= steps.keys()
    for name in expected:
        assert steps[name]["exit"] == "0", (name, steps[name])
    for s in steps.values():                          # DALI / FFCV rows: run, or skipped saying why
        assert s["exit"] == "0" or (s["exit"] == "skipped" and s["note"]), s


@pytest.mark.slow
def test_dry_run_rows_per_mode(dry_run):
    out, _ = dry_run
    results = json.loads((out / "gpu_check.json").read_text())["results"]
    assert [r["label"] for r in results["augment"]] == ["mscn", "simclr", "byol", "mixmask", "simmim",
                                                        "simclr compiled"]
    assert [r["views_per_image"] for r in results["augment"][:5]] == [3, 2, 2, 3, 1]
    assert [r["label"] for r in results["model"]] == ["model-only simclr", "model-only simmim"]
    labels = [r["label"] for r in results["train"]]
    assert labels == ["end-to-end (torchvision)", "end-to-end (synthetic)", "model-only"]
    assert all(r["device"] == "cpu" and r["images_per_s"] > 0 for m in ("model", "train") for r in results[m])
    assert [r["ok"] for r in results["syncs"]] == [True]
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# tools/gpu_check.sh --dry-run") and "## Host syncs in the step path" in md
    for mode in ("augment", "model", "train"):       # bench.py's own payload format
        payload = json.loads((out / f"{mode}.json").read_text())
        assert payload["mode"] == mode and payload["results"] and payload["table"] in md


@pytest.mark.slow
def test_readme_takes_the_gpu_check_folder(dry_run, tmp_path):
    out, _ = dry_run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.BEGIN}\nold\n{bench.END}\n")
    res = bench.main(["readme", "--results", f"{out},{out}", "--readme", str(readme)])
    assert res["written"] and res["block"].count("Measured by tools/gpu_check.sh --dry-run") == 2
    assert "| augment: mscn batched vs per-sample |" in res["block"]
    assert "| train: model-only simmim |" in res["block"]


def test_script_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--bogus"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "usage: tools/gpu_check.sh [--dry-run]" in done.stderr
