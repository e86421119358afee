"""The demo's verdict: kNN top-1 of the pretrained backbone against the same network at random init.

    python -m eval.demo_report --run runs/demo [--min-margin 0.02]

Reads the run's result.json (kNN of the final backbone, computed by train.py), evaluates the same
architecture at random initialisation with the same kNN protocol (same seed, same memory bank and
validation images), prints both, writes demo_report.json and demo.png (loss curve, kNN bars) into
the run directory, and exits non-zero when pretraining did not beat random init by --min-margin:
a demo that silently fails to learn is worse than none.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from masksiam.errors import ArgumentParser, UserError, command
from masksiam.io import atomic_write, atomic_write_text


def _plot(run: Path, pretrained: float, random_init: float, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    steps = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    if steps:
        axes[0].plot(*zip(*steps), color="#4c72b0")
    axes[0].set(xlabel="step", ylabel="loss", title=f"pretraining loss ({run.name})")
    bars = axes[1].bar(["random init", "pretrained"], [random_init, pretrained], color=["#999999", "#4c72b0"])
    for bar, v in zip(bars, [random_init, pretrained]):
        axes[1].text(bar.get_x() + bar.get_width() / 2, v, f"{100 * v:.1f}%", ha="center", va="bottom")
    axes[1].set(ylabel="kNN top-1", ylim=(0, 1), title="frozen features, weighted kNN")
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


@command("eval.demo_report")
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m eval.demo_report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a finished train.py run directory")
    p.add_argument("--min-margin", type=float, default=0.02, help="required kNN gain over random init")
    args = p.parse_args(argv)
    run = Path(args.run)
    result_path = run / "result.json"
    if not result_path.exists():
        raise UserError(f"{result_path} is missing: did train.py finish?")
    try:
        result = json.loads(result_path.read_text())
    except ValueError as err:
        raise UserError(f"{result_path} is not JSON ({err})") from None
    if "knn_top1" not in result:
        raise UserError(f"{result_path} has no knn_top1 (exit: {result.get('exit')}; final_eval off?)")

    from eval import knn
    random_init = knn.main(["--checkpoint", str(run / "checkpoint.pt"), "--random-init"])["knn_top1"]
    pretrained = result["knn_top1"]
    report = {"run": str(run), "knn_top1_pretrained": pretrained, "knn_top1_random_init": random_init,
              "margin": pretrained - random_init, "steps": result["step"]}
    atomic_write_text(run / "demo_report.json", json.dumps(report, indent=2) + "\n")
    _plot(run, pretrained, random_init, run / "demo.png")
    print(f"\nkNN top-1 on {run}: pretrained {100 * pretrained:.1f}%   random init {100 * random_init:.1f}%   "
          f"(+{100 * (pretrained - random_init):.1f} points)\nplot: {run / 'demo.png'}")
    if pretrained < random_init + args.min_margin:
        raise UserError(f"pretraining gained {100 * (pretrained - random_init):.1f} points over random "
                 f"init, less than the required {100 * args.min_margin:.1f}")
    return report


if __name__ == "__main__":
    main()
