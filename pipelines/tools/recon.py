"""Draw what a masked-image-modeling run reconstructs: `python -m pipelines.show --checkpoint RUN/checkpoint.pt`.

    python -m pipelines.show --checkpoint runs/fmnist-simmim/checkpoint.pt --out recon.png [--images 6]

The run's config (in the checkpoint) rebuilds its method, loader and recipe; a batch of the train
split goes through the augment stage (its masks) and the method's `reconstruct` (eval mode:
BatchNorm on running statistics). One row per image:
    SimMIM  input | masked input (masked patches darkened) | reconstruction (the prediction on the
            masked patches, the input elsewhere) | the raw prediction
    MixMAE  input | its partner (the reversed batch) | mixed input | reconstruction of the input
            (prediction where it was hidden) | reconstruction of the partner
A per-patch normalised prediction (norm_pix_loss) is shown in the target patch's own mean and std.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from masksiam import checkpoint as ckpt_io
from masksiam.config import Config, ConfigError, apply
from masksiam.dist import DistInfo

GAP, HEADER = 4, 16


def _denormalize_patches(pred: torch.Tensor, target: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Undo losses.simmim.patch_normalize with the target's per-patch mean and std."""
    n, c, h, w = target.shape
    t = target.float().reshape(n, c, h // patch, patch, w // patch, patch)
    mean, std = t.mean((1, 3, 5), keepdim=True), (t.var((1, 3, 5), keepdim=True) + eps).sqrt()
    return (pred.float().reshape(t.shape) * std + mean).reshape(n, c, h, w)


def render_reconstructions(checkpoint: str | Path, images: int = 6, seed: int = 0, data: str | None = None,
                           zoom: int = 1) -> Image.Image:
    from losses import build_method
    from models.resnet import build_backbone_from_config
    from pipelines.augment.engine import build_augmenter
    from pipelines.loaders import build_loader
    from pipelines.tools.show import _display

    state = ckpt_io.load(checkpoint)
    if not isinstance(state.get("config"), dict) or "model" not in state:
        raise ckpt_io.CheckpointError(f"{checkpoint} is not a train.py checkpoint (no run config and model): "
                                      f"reconstructions need a simmim or mixmae run's checkpoint.pt")
    cfg = apply(Config(), state["config"], f"{checkpoint} (its config)")
    if cfg.method not in ("simmim", "mixmae"):
        raise ConfigError(f"{checkpoint} is a {cfg.method!r} run; reconstructions exist for simmim and mixmae")
    method = build_method(cfg, build_backbone_from_config(cfg))
    method.load_state_dict(state["model"])
    method.eval()
    aug = build_augmenter(cfg.recipe, size=cfg.size, device="cpu", seed=seed)
    cfg = apply(cfg, {"data": data or cfg.data, "loader": "torchvision", "batch_size": images, "workers": 0,
                      "seed": seed, "drop_last": False, "max_images": 0}, "pipelines.tools.recon")
    loader = build_loader(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    loader.set_epoch(0)
    out = aug(next(iter(loader)).views)
    with torch.no_grad():
        r = method.reconstruct(out)
    mean, std = aug.recipe.mean, aug.recipe.std
    pred = r["pred"]
    if method.hp["norm_pix_loss"]:
        target = torch.cat([r["input"], r["partner"]]) if cfg.method == "mixmae" else r["input"]
        pred = _denormalize_patches(pred, target, r["patch"])
    show = lambda x: _display(x, mean, std, False)                          # noqa: E731
    if cfg.method == "simmim":
        m = r["mask"]
        masked = show(r["input"])
        masked = np.where(m.permute(0, 2, 3, 1).numpy(), masked // 3, masked).astype(np.uint8)
        columns = [show(r["input"]), masked, show(torch.where(m, pred, r["input"])), show(pred)]
        titles = ["input", "masked", "reconstruction", "prediction"]
    else:
        n = r["input"].shape[0]
        m = r["mask"]
        columns = [show(r["input"]), show(r["partner"]), show(r["mixed"]),
                   show(torch.where(m, pred[:n], r["input"])), show(torch.where(~m, pred[n:], r["partner"]))]
        titles = ["input", "partner", "mixed", "recon input", "recon partner"]
    tile = cfg.size * zoom
    canvas = Image.new("RGB", (len(columns) * (tile + GAP) + GAP, HEADER + len(columns[0]) * (tile + GAP) + GAP),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (col, title) in enumerate(zip(columns, titles)):
        x = GAP + c * (tile + GAP)
        draw.text((x + 2, 2), title, fill=(0, 0, 0))
        for row in range(len(col)):
            canvas.paste(Image.fromarray(col[row]).resize((tile, tile), Image.NEAREST),
                         (x, HEADER + GAP + row * (tile + GAP)))
    return canvas
