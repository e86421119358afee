"""bench.py explain on tiny data: every stage measured, a consistent table (end to end no faster
than its slowest stage beyond noise), a verdict naming the bounding stage that moves when one stage
is slowed on purpose (--delay), and its JSON, markdown and waterfall PNG."""
from __future__ import annotations

import json

import pytest
from PIL import Image

import bench
from bench.explain import EXPLAIN_STAGES, PIPELINE, explain_verdict

TINY = ["arch=resnet10", "width=8", "size=24", "stem=small", "batch_size=8", "workers=0", "views=2",
        "proj_hidden=32", "proj_dim=16", "recipe=simclr", "seed=0"]


def _explain(image_folder, tmp_path, *extra):
    out = tmp_path / "explain.json"
    payload = bench.main(["explain", "--device", "cpu", "--warmup", "1", "--batches", "3", "--out-dir",
                          str(tmp_path / "runs"), "--json", str(out), *extra, "--set", f"data={image_folder}", *TINY])
    return out, payload


@pytest.fixture(scope="module")
def plain(image_folder, tmp_path_factory):
    return _explain(image_folder, tmp_path_factory.mktemp("explain"))


def test_stage_table_is_consistent(plain):
    out, payload = plain
    stages = {s["stage"]: s for s in payload["stages"]}
    assert list(stages) == list(EXPLAIN_STAGES)
    assert stages["host-to-device"]["images_per_s"] is None            # a CPU run copies nothing
    for name in ("read", "decode", "loader", "augment", "model", "end-to-end"):
        assert stages[name]["images_per_s"] > 0, name
        assert stages[name]["share"] == pytest.approx(stages["end-to-end"]["images_per_s"]
                                                      / stages[name]["images_per_s"])
    slowest = min(stages[n]["images_per_s"] for n in PIPELINE if stages[n]["images_per_s"])
    # end to end runs every stage: never faster than the slowest alone, beyond the noise of runs of
    # 3 batches on a shared machine
    assert stages["end-to-end"]["images_per_s"] <= 2.0 * slowest
    assert stages["loader"]["cores"] >= 0 and stages["read"]["bytes_per_image"] > 0
    assert payload["bound"] in PIPELINE and f"{payload['bound']} bounds this run" in payload["verdict"]
    assert "loader cores" in payload["verdict"]


def test_files(plain):
    out, payload = plain
    assert json.loads(out.read_text())["verdict"] == payload["verdict"]
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| stage | images_per_s | cores | share | note |") and payload["verdict"] in md
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == len(EXPLAIN_STAGES) + 1
    with Image.open(out.with_suffix(".png")) as img:
        img.verify()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["model", "loader"])
def test_verdict_follows_a_slowed_stage(image_folder, tmp_path, stage):
    """2 s per batch of 8 (<= 4 images/s) in one stage: that stage bounds, in the table and in words."""
    _, payload = _explain(image_folder, tmp_path, "--delay", f"{stage}=2")
    stages = {s["stage"]: s for s in payload["stages"]}
    assert stages[stage]["images_per_s"] < 4.5
    assert payload["bound"] == stage and f"the {stage} bounds this run" in payload["verdict"]
    assert stages["end-to-end"]["images_per_s"] < 4.5                  # the slow stage is in every step


def test_verdict_words():
    stages = [{"stage": "read", "images_per_s": 5000.0}, {"stage": "decode", "images_per_s": 800.0},
              {"stage": "loader", "images_per_s": 1500.0, "cores": 2.0},
              {"stage": "host-to-device", "images_per_s": None}, {"stage": "augment", "images_per_s": 9000.0},
              {"stage": "model", "images_per_s": 680.0}, {"stage": "end-to-end", "images_per_s": 600.0}]
    bound, words = explain_verdict(stages, 2)
    assert bound == "model"
    assert words.startswith("the loader gives 1,500 images/s on 2.0 cores, the model takes 680: the model bounds")
    assert "needs 0.91 loader cores at this loader's 750 images/s per core" in words
    stages[2]["images_per_s"] = 300.0                                    # a slow loader: it bounds
    bound, words = explain_verdict(stages, 2)
    assert bound == "loader" and "the loader bounds this run" in words
    assert "decoding alone takes 19% of the loader's CPU time per image" in words
    assert "needs 4.5 loader cores" in words


def test_bad_delay_is_refused(image_folder, tmp_path):
    with pytest.raises(SystemExit, match="the stage is one of loader, augment, model"):
        _explain(image_folder, tmp_path, "--delay", "decode=1")
