"""masksiam's SimCLR against the loop a lightly user writes, on the same work, side by side in one run.

    make vs-lightly                                   # installs lightly (no dependencies pulled), then runs
    python tools/vs_lightly.py --steps 100 --seeds 0 1 [--width 64] [--masksiam KEY=VALUE ...]

Both sides train the same network (torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool,
`--width` channels in the stem: 64 is torchvision's) on the same Fashion-MNIST training images
(`--images`, spread over the classes as train.py's max_images spreads them) at 32 px, with the same
batch and number of steps, then one shared weighted kNN (k 200, t 0.1; Wu et al. 2018) scores both
backbones on the same 10k training / 2k validation images (resized to 32 px, ImageNet-normalised,
eval mode). Neither side is tuned for the other:

  lightly   lightly's examples/pytorch/simclr.py as written: SimCLRTransform(input_size=32) in a
            torchvision ImageFolder, a DataLoader with 2 workers (shuffle, drop_last), torchvision's
            ResNet-18 (stem swapped as above), SimCLRProjectionHead(512, 512, 128), NTXentLoss()
            (temperature 0.5) and SGD at lr 0.06.
  masksiam  train.py --config configs/demo_fmnist.yaml at the same network, size, batch and steps
            (one epoch of exactly `--steps` batches: max_images = steps x batch, so its lr schedule
            ends where the run does), loader workers 2; `--masksiam KEY=VALUE` adds overrides (an
            ablation: zero_init_residual=false, temperature=0.5, ...).

Speed is the training loop's images per second after the first `--warmup` steps (each side timed
the same way: wall clock between steps, data loading included), on whatever the machine is doing,
so the ratio is the number to read. Results: <out>/vs_lightly.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from masksiam.io import atomic_write_text  # noqa: E402
from pipelines.loaders.common import scan_image_folder, spread  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def small_stem_resnet18(width: int, zero_init_residual: bool = False) -> nn.Module:
    """torchvision's ResNet-18, 3x3 stride-1 stem, no max-pool: what a lightly user writes for 32 px."""
    from models.resnet import build_backbone
    return build_backbone("resnet18", small_stem=True, zero_init_residual=zero_init_residual, width=width)


# ---- the shared kNN -------------------------------------------------------------------------------

def eval_images(split: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of a split spread over its classes: (n, 3, 32, 32) float normalised, (n,) labels."""
    from PIL import Image
    images = scan_image_folder(split)
    keep = spread(len(images), n)
    x = np.stack([np.asarray(Image.open(split / images.path(i)).convert("RGB").resize((32, 32), Image.BILINEAR))
                  for i in keep])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.as_tensor(np.asarray(images.labels)[keep], dtype=torch.long)


@torch.no_grad()
def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    return F.normalize(torch.cat([net(x[i:i + 500]).flatten(1) for i in range(0, len(x), 500)]), dim=1)


def knn_top1(net: nn.Module, bank: tuple, queries: tuple, k: int = 200, t: float = 0.1) -> float:
    """The project's weighted kNN vote (eval.knn.knn_predict) on both sides' features."""
    from eval.knn import knn_predict
    (xb, yb), (xq, yq) = bank, queries
    pred = knn_predict(features(net, xb), yb, features(net, xq), int(yb.max()) + 1, k=k, t=t)
    return 100.0 * (pred == yq).float().mean().item()


# ---- the lightly loop -----------------------------------------------------------------------------

def run_lightly(args, seed: int, keep: np.ndarray) -> tuple[nn.Module, dict]:
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    torch.manual_seed(seed)
    backbone = small_stem_resnet18(args.width)
    head = SimCLRProjectionHead(backbone.num_features, 512, 128)
    dataset = torchvision.datasets.ImageFolder(str(Path(args.data) / "train"), transform=SimCLRTransform(input_size=32))
    dataset = torch.utils.data.Subset(dataset, keep.tolist())
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=2, generator=torch.Generator().manual_seed(seed))
    criterion = NTXentLoss()
    optimizer = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.06)
    backbone.train(), head.train()
    seconds, step, t = [], 0, time.perf_counter()
    while step < args.steps:
        for (x0, x1), _ in loader:
            z0, z1 = head(backbone(x0).flatten(1)), head(backbone(x1).flatten(1))
            loss = criterion(z0, z1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            now = time.perf_counter()
            seconds.append(now - t)
            t = now
            if step % 10 == 0:
                print(f"lightly seed {seed}: step {step}/{args.steps}, loss {loss.item():.3f}", flush=True)
            if step == args.steps:
                break
    return backbone, {"images_per_s": speed(seconds, args), "loss": float(loss)}


def speed(seconds: list[float], args) -> float:
    """Images per second over the steps after the first `warmup` (seconds: each step's wall time)."""
    timed = seconds[min(args.warmup, len(seconds) - 1):]
    return args.batch * len(timed) / sum(timed)


# ---- the masksiam run -----------------------------------------------------------------------------

def run_masksiam(args, seed: int, out: Path) -> tuple[nn.Module, dict]:
    name = f"masksiam-seed{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/demo_fmnist.yaml"),
           f"data={args.data}", f"out_dir={out}", f"run_name={name}", f"seed={seed}", "size=32",
           f"width={args.width}", f"batch_size={args.batch}", f"max_images={args.steps * args.batch}",
           "epochs=1", "workers=2", "log_every=1", "final_eval=false", "online_probe=false", "progress=false",
           "ckpt_every=0", *args.masksiam]
    subprocess.run(cmd, check=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r and "loss" in r]
    # per-step records (log_every=1): each step's wall time, data wait included, as the lightly side is timed
    seconds = [args.batch / r["images_per_s"] for r in steps]
    state = torch.load(out / name / "backbone.pt", map_location="cpu", weights_only=True)
    net = small_stem_resnet18(args.width)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    return net, {"images_per_s": speed(seconds, args), "loss": steps[-1]["loss"], "steps": len(steps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data/fashion-mnist"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5, help="steps not timed (start-up, first batches)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sides", nargs="+", default=["lightly", "masksiam"], choices=["lightly", "masksiam"])
    p.add_argument("--masksiam", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the masksiam run")
    p.add_argument("--out", default=str(ROOT / "runs/vs_lightly"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train = Path(args.data) / "train"
    keep = spread(len(scan_image_folder(train)), args.steps * args.batch)     # train.py's max_images images
    bank, queries = eval_images(train, 10_000), eval_images(Path(args.data) / "val", 2_000)
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        rows.append({"side": "random init", "seed": seed,
                     "knn": knn_top1(small_stem_resnet18(args.width), bank, queries)})
        for side in args.sides:
            t0 = time.perf_counter()
            net, info = run_lightly(args, seed, keep) if side == "lightly" else run_masksiam(args, seed, out)
            rows.append({"side": side, "seed": seed, "wall_s": time.perf_counter() - t0,
                         "knn": knn_top1(net, bank, queries), **info})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for side in dict.fromkeys(r["side"] for r in rows):
        got = [r for r in rows if r["side"] == side]
        knn = [r["knn"] for r in got]
        summary[side] = {"knn_mean": float(np.mean(knn)), "knn_spread": float(np.ptp(knn)),
                         "images_per_s": float(np.mean([r.get("images_per_s", np.nan) for r in got]))}
    result = {"args": {k: v for k, v in vars(args).items()}, "rows": rows, "summary": summary}
    atomic_write_text(out / "vs_lightly.json", json.dumps(result, indent=1))
    lines = ["| side | kNN top-1 (mean, spread over seeds) | images/s |", "|---|---|---|"]
    for side, s in summary.items():
        ips = "" if np.isnan(s["images_per_s"]) else f"{s['images_per_s']:.0f}"
        lines.append(f"| {side} | {s['knn_mean']:.1f} ({s['knn_spread']:.1f}) | {ips} |")
    atomic_write_text(out / "vs_lightly.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
