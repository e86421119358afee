"""bench.py readme: the numbers table between README.md's bench markers, from the JSON files of a
`make bench` run (and of tools/gpu_check.sh's); nothing else in the file changes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from masksiam.errors import UserError
from masksiam.io import atomic_write_text
from bench.loader import BASELINE

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def readme_block(runs: dict[str, dict], results: str) -> str:
    """The markdown between the README markers from the JSON payloads of one run (mode -> payload);
    `results` is its folder (one written by tools/gpu_check.sh holds gpu_check.json)."""
    m = next(iter(runs.values()))["machine"]
    where = f"{m['cpu']} ({m['cores']} cores)" + (f", {m['gpu']}" if m["gpu"] else "")
    other = max(r.get("other_cpu_percent", 0.0) for run in runs.values() for r in run["results"])
    check = Path(results) / "gpu_check.json"
    by = "`make bench` (tools/bench.sh)"
    if check.exists():
        by = "tools/gpu_check.sh" + (" --dry-run (tiny sizes on the CPU: not a measurement)"
                                     if json.loads(check.read_text()).get("dry_run") else "")
    lines = [f"Measured by {by} on {m['date']}: {where}, torch {m['torch']}. "
             "Rates exclude warm-up batches and start-up (worker spawn, numba compile, DALI pipeline "
             f"build); ratios compare rows measured side by side in one run. Other processes used at "
             f"most {other:.0f}% of a core during a row" + (" (a contended run: rerun on an idle machine)"
                                                              if other > 25 else "")
             + f". Full tables and charts: `{results}/*.md`, `*.png`.", "",
             "| measured | setting | rate | ratio |", "|---|---|---|---|"]
    for r in runs.get("loader", {}).get("results", []):
        views = f"crops {r['crops']}" if r.get("crops") else f"{r['views']} views x {r['size']} px"
        lines.append(f"| loader: {r['label']} | {views}, batch {r['batch_size']}, "
                     f"{r['workers']} workers, {r['device']} | {r['images_per_s']:,.0f} images/s, host CPU "
                     f"{r['host_cpu_ms']:.2f} ms/image ({r['host_cpu_ex_decode_ms']:.2f} ex decode) | "
                     f"x{r['ratio']:.2f}" + (f", x{r['ratio_tv2']:.2f} vs {BASELINE}" if "ratio_tv2" in r else "")
                     + " |")
    for r in runs.get("augment", {}).get("results", []):
        ref = (f" vs {r['reference_views_per_s']:,.0f} per sample (torchvision v2)"
               if "reference_views_per_s" in r else "")
        lines.append(f"| augment: {r['label']} batched vs per-sample | batch {r['batch_size']} x {r['size']} px, "
                     f"{r['device']}, {r['threads']} threads | {r['views_per_s']:,.0f} views/s{ref} | "
                     + (f"x{r['speedup']:.1f} speed-up |" if "speedup" in r else "|"))
    for mode in ("train", "model"):
        for r in runs.get(mode, {}).get("results", []):
            what = "synthetic batches on the device, normalise only" if r["loader"] == "synthetic" \
                else f"recipe {r['recipe']}, {r['workers']} workers"
            eff = f"{r['efficiency']:.2f} of model-only" if "efficiency" in r else f"x{r['ratio']:.2f}"
            lines.append(f"| train: {r['label']} | {r['arch']} width {r['width']}, {r['size']} px, batch "
                         f"{r['batch_size']}, {what} | {r['images_per_s']:,.1f} images/s | {eff} |")
    return "\n".join(lines)


def cmd_readme(args) -> dict:
    blocks, found = [], []                 # one block per results folder (make bench, then gpu_check)
    for folder in args.results.split(","):
        runs = {mode: json.loads(p.read_text()) for mode in ("loader", "augment", "train", "model")
                if (p := Path(folder) / f"{mode}.json").exists()}
        if not runs:
            raise UserError(f"readme: no loader/augment/train/model .json in {folder}")
        blocks.append(readme_block(runs, folder))
        found += [f"{folder}/{m}.json" for m in runs]
    block = "\n\n".join(blocks)
    readme = Path(args.readme)
    text = readme.read_text() if readme.exists() else ""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        print(block)
        print(f"bench.py readme: {readme} has no {BEGIN} ... {END} block; the table is above, "
              f"put the markers where it belongs and run again", file=sys.stderr)
        return {"block": block, "written": False}
    atomic_write_text(readme, text[:start + len(BEGIN)] + "\n" + block + "\n" + text[end:])
    print(f"wrote the bench block of {readme} from {', '.join(found)}")
    return {"block": block, "written": True}
