"""Reports: every evaluation's JSON / markdown / PNG render, and eval.report puts runs side by side
(seeds of one configuration folded into mean +- half range)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from eval import report
from eval.common import markdown_table, write_results


def _eval(label, top1, curve):
    return {"eval": "linear", "label": label, "metrics": {"top1": top1, "top5": 0.99},
            "curves": {"val_top1": [[i + 1, v] for i, v in enumerate(curve)], "train_loss": [[1, 2.0], [2, 1.0]]}}


def _run(root, name, knn, linear):
    d = root / name
    (d / "eval").mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"step": 10, "knn_top1": knn}))
    write_results(d / "eval", "linear", _eval("linear (mixmask)", linear, [linear / 2, linear]))
    return d


def test_write_results_renders_json_markdown_and_png(tmp_path):
    paths = write_results(tmp_path, "linear", _eval("linear (mscn)", 0.734, [0.5, 0.734]))
    assert json.loads(paths["json"].read_text())["metrics"]["top1"] == 0.734
    md = paths["md"].read_text().splitlines()
    assert md[0] == "| run | eval | top1 | top5 |" and md[2] == "| linear (mscn) | linear | 73.40 | 99.00 |"
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 300 and im.getextrema() != ((255, 255),) * 3
    assert "| a | knn | 50.00 |" in markdown_table([{"eval": "knn", "metrics": {"top1": 0.5}}], ["a"])


def test_report_puts_runs_side_by_side_and_folds_seeds(tmp_path):
    runs = [_run(tmp_path, "mscn-seed0", 0.60, 0.70), _run(tmp_path, "mscn-seed1", 0.64, 0.74),
            _run(tmp_path, "simclr", 0.55, 0.65)]
    out = tmp_path / "report"
    rep = report.main([str(r) for r in runs] + ["--out", str(out), "--title", "test"])
    assert [r["run"] for r in rep["rows"]] == ["mscn", "simclr"] and rep["rows"][0]["n"] == 2
    md = (out / "report.md").read_text()
    assert "| mscn | 2 | 62.0 ± 2.0 | 72.0 ± 2.0 |" in md and "| simclr | 1 | 55.0 | 65.0 |" in md
    assert rep["columns"] == ["knn", "linear (mixmask)"]
    with Image.open(out / "report.png") as im:
        assert im.size[0] > 600
    assert json.loads((out / "report.json").read_text())["rows"][1]["cells"]["linear (mixmask)"]["mean"] == 0.65
    with pytest.raises(SystemExit, match="no results"):
        (tmp_path / "empty").mkdir()
        report.main([str(tmp_path / "empty"), "--out", str(out)])


def test_report_of_many_runs_keeps_their_order_and_draws_a_panel_per_evaluation(tmp_path):
    names = [f"m{i}-seed{s}" for i in (3, 1, 4, 0, 2, 6, 5) for s in (0, 1)]
    runs = [_run(tmp_path, n, 0.5 + 0.01 * int(n[1]), 0.6 + 0.01 * int(n[-1])) for n in names]
    out = tmp_path / "report"
    rep = report.main([str(r) for r in runs] + ["--out", str(out)])
    assert [r["run"] for r in rep["rows"]] == ["m3", "m1", "m4", "m0", "m2", "m6", "m5"]     # as given
    assert rep["rows"][2]["cells"]["linear (mixmask)"]["values"] == [0.6, 0.61]
    with Image.open(out / "report.png") as im:
        w, h = im.size
        assert 600 < w < 1400 and h > 150 and im.convert("L").getextrema()[0] < 100    # drawn, not blank
