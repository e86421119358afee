"""Runs side by side: one markdown table and one figure from the results evaluation wrote.

    python -m eval.report runs/simclr runs/mscn_simclr ... [--out runs/report] [--title T]

Each RUNDIR contributes train.py's result.json (kNN top-1 of the final backbone, column "knn", as
eval.knn --out) and every
evaluation JSON under it (<run>/eval/*.json and <run>/*.json written by eval.knn / linear /
finetune; an eval JSON file may also be given directly). Columns are the evaluations (top-1, %),
rows the runs. Runs whose names differ only by a seed suffix (`-seed1`, `_s2`) form one row: the
mean, +- half the range over seeds, and n. Writes <out>/report.md, report.json and report.png
(top-1 per evaluation as grouped bars, and the val top-1 curves; with more than 6 rows one panel per
evaluation, a bar per run and a dot per seed).
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from masksiam.errors import ArgumentParser, UserError, command
from masksiam.io import atomic_write, atomic_write_text

SEED_SUFFIX = re.compile(r"[-_](?:seed|s)\d+$")
KIND_ORDER = {"knn": 0, "linear": 1, "finetune": 2, "finetune_full": 3, "scratch": 4}    # column order


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(run: Path) -> dict[str, dict]:
    """{evaluation label: result} of one run directory (or one eval JSON file)."""
    if run.is_file():
        r = _load(run)
        return {r.get("label", run.stem): r} if r and "eval" in r else {}
    out: dict[str, dict] = {}
    train = _load(run / "result.json")
    if train and "knn_top1" in train:
        out["knn"] = {"eval": "knn", "metrics": {"top1": train["knn_top1"]}, "curves": {}}
    for path in sorted(list(run.glob("*.json")) + list(run.glob("eval/*.json"))):
        r = _load(path)
        if r and "eval" in r and "metrics" in r:
            m = r["metrics"]
            if "top1" not in m and "knn_top1" in m:
                m = {**m, "top1": m["knn_top1"]}
            out[r.get("label", path.stem)] = {**r, "metrics": m}
    return out


def group_name(run: Path) -> str:
    name = run.stem if run.is_file() else run.name
    return SEED_SUFFIX.sub("", name)


def build(runs: list[Path]) -> dict:
    """{"columns": [...], "rows": [{"run", "n", "cells": {col: {"mean", "spread", "values"}}}], "curves"}."""
    groups: dict[str, list[dict[str, dict]]] = {}
    for run in runs:
        groups.setdefault(group_name(run), []).append(collect(run))
    columns: list[str] = []
    kind: dict[str, int] = {}
    for results in groups.values():
        for r in results:
            for c, res in r.items():
                if c not in columns:
                    columns.append(c)
                    kind[c] = KIND_ORDER.get(res.get("eval"), len(KIND_ORDER))
    columns.sort(key=lambda c: kind[c])                       # stable: first seen within a kind
    rows, curves = [], {}
    for name, results in groups.items():
        cells = {}
        for c in columns:
            vals = [r[c]["metrics"]["top1"] for r in results if c in r and "top1" in r[c]["metrics"]]
            if vals:
                cells[c] = {"mean": sum(vals) / len(vals), "spread": (max(vals) - min(vals)) / 2, "values": vals}
        rows.append({"run": name, "n": len(results), "cells": cells})
        for r in results[:1]:                                  # the first seed's curves
            for c, res in r.items():
                if "val_top1" in res.get("curves", {}):
                    curves.setdefault(name, {"curves": {}})["curves"][f"{c}: val top-1"] = res["curves"]["val_top1"]
    return {"columns": columns, "rows": rows, "curves": curves}


def markdown(report: dict) -> str:
    cols = report["columns"]
    seeds = any(r["n"] > 1 for r in report["rows"])
    head = "| run |" + (" seeds |" if seeds else "") + "".join(f" {c} |" for c in cols)
    lines = [head, "|---|" + ("---|" if seeds else "") + "---|" * len(cols)]
    for r in report["rows"]:
        cells = []
        for c in cols:
            cell = r["cells"].get(c)
            if cell is None:
                cells.append("")
            elif len(cell["values"]) > 1:
                cells.append(f"{100 * cell['mean']:.1f} ± {100 * cell['spread']:.1f}")
            else:
                cells.append(f"{100 * cell['mean']:.1f}")
        lines.append(f"| {r['run']} |" + (f" {r['n']} |" if seeds else "") + "".join(f" {c} |" for c in cells))
    return "\n".join(lines) + "\n\nTop-1 accuracy (%)" + (" : mean ± half the range over seeds" if seeds else "") + ".\n"


MANY_RUNS = 6      # above this, grouped bars and shared curve panels stop being readable


def plot(report: dict, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if len(report["rows"]) > MANY_RUNS:
        return plot_many(report, path, title, plt)
    cols, rows = report["columns"], report["rows"]
    curve_names = sorted({k for r in report["curves"].values() for k in r["curves"]})
    panels = 1 + len(curve_names)
    ncols = min(3, panels)
    width_in = 4.5 * ncols if panels > 1 else max(6.0, 1.2 * len(cols) * len(rows))
    fig, axes = plt.subplots(math.ceil(panels / ncols), ncols, figsize=(width_in, 3.6 * math.ceil(panels / ncols)),
                             squeeze=False)
    ax = axes.flat[0]
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + i * width for j, c in enumerate(cols) if c in r["cells"]]
        ys = [100 * r["cells"][c]["mean"] for c in cols if c in r["cells"]]
        err = [100 * r["cells"][c]["spread"] for c in cols if c in r["cells"]]
        ax.bar(xs, ys, width, yerr=err if any(err) else None, label=r["run"], capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols, rotation=20, ha="right", fontsize=7)
    ax.set(ylabel="top-1 (%)", title=title or "evaluation", ylim=(0, 100))
    ax.legend(fontsize=7)
    for ax, name in zip(list(axes.flat)[1:], curve_names):
        for run, res in report["curves"].items():
            pts = res["curves"].get(name)
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=run)
        ax.set(xlabel="epoch", ylabel="val top-1", title=name)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def plot_many(report: dict, path: Path, title: str, plt) -> None:
    """One panel per evaluation: a horizontal bar per run (the mean over seeds) with each seed's value
    as a dot, runs in the order given, top to bottom; the curves stay in each run's own PNG."""
    cols, rows = report["columns"], report["rows"]
    ncols = min(4, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 1.6, 0.28 * len(rows) * nrows + 1.2),
                             squeeze=False, sharey=True)
    ys = list(range(len(rows)))[::-1]
    for ax, c in zip(axes.flat, cols):
        cells = [r["cells"].get(c) for r in rows]
        ax.barh([y for y, cell in zip(ys, cells) if cell], [100 * cell["mean"] for cell in cells if cell],
                color="#9ab", height=0.7)
        for y, cell in zip(ys, cells):
            if cell:
                ax.plot([100 * v for v in cell["values"]], [y] * len(cell["values"]), "k.", ms=4)
                ax.text(100 * max(cell["values"]) + 0.8, y, f"{100 * cell['mean']:.1f}", va="center", fontsize=7)
        # the axis starts below the panel's lowest value: the differences between methods are points
        low = min(100 * v for cell in cells if cell for v in cell["values"])
        ax.set(title=c, xlim=(max(0, 10 * math.floor(low / 10) - 10), 102), xlabel="top-1 (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys, [r["run"] for r in rows], fontsize=8)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


@command("eval.report")
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m eval.report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or eval JSON files)")
    p.add_argument("--out", default="runs/report", help="folder for report.md / report.json / report.png")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not r.exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} do{'es' if len(missing) == 1 else ''} not exist")
    report = build(runs)
    if not report["columns"]:
        raise UserError(f"no results in {', '.join(args.runs)} (result.json or eval JSON files)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(report)
    atomic_write_text(out / "report.md", (f"## {args.title}\n\n" if args.title else "") + md)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    plot(report, out / "report.png", args.title)
    print(md + f"\n{out / 'report.md'}, {out / 'report.png'}")
    return report


if __name__ == "__main__":
    main()
