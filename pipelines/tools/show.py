"""Draw what the network sees: a few images through the reference loader and a recipe's augmenter.

    python -m pipelines.show --recipe mscn --data data/photos --out views.png [--images 6] [--seed 0]
    python -m pipelines.show --recipe mscn --data data/fashion-mnist --size 32 --zoom 3 --out fmnist.png
    python -m pipelines.show --checkpoint RUN/checkpoint.pt --out recon.png   # MIM reconstructions (tools/recon.py)

One row per image: the loader's crops (uint8, as decoded, cropped and flipped), then every output
view of the recipe, then the mixed view (MixMask / Un-Mix, with its lam) when the recipe mixes.
Normalised views are shown de-normalised; high-passed views, centred on 0, as 0.5 + 0.4 x (x in
normalised units: mid-gray is "no information", where the masks put zeros and noise); SimMIM views
with their masked patches darkened.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import masksiam  # noqa: F401  (torchvision importable before the loader)
from masksiam.config import Config, apply
from masksiam.dist import DistInfo
from masksiam.errors import ArgumentParser, command
from masksiam.io import atomic_write
from pipelines.loaders import build_loader
from pipelines.augment.masks import upsample_mask
from pipelines.augment.engine import build_augmenter

GAP, HEADER = 4, 16


def _display(view: torch.Tensor, mean, std, highpass: bool) -> np.ndarray:
    """(N, 3, H, W) normalised -> (N, H, W, 3) uint8 for the eye."""
    v = view.float().cpu()
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    if highpass:
        img = 0.5 + 0.4 * v
    else:
        img = v * std_t + torch.tensor(mean).view(1, 3, 1, 1)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def render(recipe: str, data: str, images: int = 6, seed: int = 0, size: int = 128, split: str = "train",
           mix: str | None = None, zoom: int = 1) -> Image.Image:
    aug = build_augmenter(recipe, size=size, device="cpu", seed=seed, mix=mix)
    cfg = apply(Config(), {"data": data, "loader": "torchvision", "views": aug.sources, "size": size,
                           "batch_size": images, "workers": 0, "seed": seed, "train_split": split,
                           "drop_last": False}, "pipelines.tools.show")
    loader = build_loader(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    loader.set_epoch(0)
    batch = next(iter(loader))
    out = aug(batch.views)
    r = aug.recipe
    columns, titles = [], []
    for i, crop in enumerate(batch.views):
        columns.append(crop.permute(0, 2, 3, 1).numpy())
        titles.append(f"crop {i}")
    copy_of = {}
    for i, bi in enumerate(aug.view_branch):
        copy_of[bi] = copy_of.get(bi, -1) + 1
        b = r.branches[bi]
        img = _display(out.views[i], r.mean, r.std, b.highpass is not None)
        if out.mim_masks is not None and out.mim_masks[i] is not None:
            mask = upsample_mask(out.mim_masks[i], r.simmim.patch).numpy()[..., None]          # patches -> pixels
            img = np.where(mask, img // 3, img).astype(np.uint8)
        columns.append(img)
        label = f"view {i}: b{bi}" + (f" mask {copy_of[bi]}" if b.mask else "")
        titles.append(label + (" +MIM" if out.mim_masks is not None and out.mim_masks[i] is not None else ""))
    if out.mixed is not None:
        hp = r.branches[aug.view_branch[out.mix_source]].highpass is not None
        columns.append(_display(out.mixed, r.mean, r.std, hp))
        titles.append(f"mixed (view {out.mix_source})")
    n, tile = columns[0].shape[0], size * zoom
    width = len(columns) * (tile + GAP) + GAP
    height = HEADER + n * (tile + GAP) + GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (col, title) in enumerate(zip(columns, titles)):
        x = GAP + c * (tile + GAP)
        draw.text((x + 2, 2), title, fill=(0, 0, 0))
        for row in range(n):
            y = HEADER + GAP + row * (tile + GAP)
            canvas.paste(Image.fromarray(col[row]).resize((tile, tile), Image.NEAREST), (x, y))
            if out.mixed is not None and c == len(columns) - 1:
                draw.text((x + 3, y + 2), f"lam {float(out.mix_lam[row]):.2f}", fill=(255, 255, 0))
    return canvas


def save_png(img: Image.Image, out: str | Path, colours: int = 0) -> None:
    """Write atomically; colours > 0 quantises to a palette (much smaller files for docs)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if colours:
        img = img.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    atomic_write(out, lambda f: img.save(f, format="PNG", optimize=True))


@command("pipelines.show")
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m pipelines.show", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="mscn", help="a recipe name (pipelines/augment/recipes/) or yaml path")
    p.add_argument("--data", default=None, help="ImageFolder root with train/ (and val/); with --checkpoint: "
                   "the run's data unless given")
    p.add_argument("--checkpoint", default=None, help="a simmim / mixmae run's checkpoint.pt: draw its "
                   "reconstructions instead (pipelines/tools/recon.py)")
    p.add_argument("--out", default="views.png")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="crop size in pixels")
    p.add_argument("--split", default="train")
    p.add_argument("--mix", default=None, choices=["mixmask", "unmix"], help="add this mixing to the recipe")
    p.add_argument("--zoom", type=int, default=1, help="enlarge every tile this many times (small images)")
    p.add_argument("--colours", type=int, default=0, help="quantise to this many colours (0 = full colour)")
    args = p.parse_args(argv)
    if args.checkpoint:
        from pipelines.tools.recon import render_reconstructions
        save_png(render_reconstructions(args.checkpoint, args.images, args.seed, args.data, args.zoom),
                 args.out, args.colours)
        print(f"wrote {args.out}")
        return
    if args.data is None:
        p.error("--data is required (or --checkpoint)")
    save_png(render(args.recipe, args.data, args.images, args.seed, args.size, args.split, args.mix, args.zoom),
             args.out, args.colours)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
