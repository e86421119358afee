"""Export a backbone as a stock torchvision / timm ResNet state dict.

    python -m eval.export --checkpoint runs/x/checkpoint.pt --out resnet50.pt [--head eval/linear_head.pt]
    python -m eval.export --checkpoint runs/x/checkpoint.pt --out resnet50.safetensors

The file loads with `torchvision.models.resnet50().load_state_dict(sd, strict=True)` and into timm's
`resnet50` (same key names), and gives the backbone's features exactly (checked before writing: a
random batch through both networks). The classifier `fc` is

    from a probe     --head <out>/linear_head.pt (eval.linear --save-head); an affine-free feature
                     BatchNorm (--bn) is folded into it: W' = W / sigma, b' = b - W mu / sigma
    fine-tuned       a checkpoint written by eval.finetune --save carries its own fc
    fresh            otherwise: torchvision's default nn.Linear initialisation (seeded), --num-classes

and the command says which (printed, and in the .safetensors metadata / a .json next to a .pt).
A backbone with the small stem or a non-default width has no torchvision counterpart and is refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import masksiam  # noqa: F401
from masksiam import checkpoint as ckpt_io
from masksiam.errors import ArgumentParser, command
from masksiam.io import atomic_write, atomic_write_text
from eval.common import EvalError


def fold_head(head: dict[str, torch.Tensor], eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """A LinearHead state dict (fc.*, optional affine-free bn.running_*) -> one Linear's weight/bias."""
    w, b = head["fc.weight"].float(), head["fc.bias"].float()
    if "bn.running_mean" in head:
        inv = (head["bn.running_var"].float() + eps).rsqrt()        # (F,)
        b = b - (w * (head["bn.running_mean"].float() * inv)).sum(1)
        w = w * inv
    return {"fc.weight": w, "fc.bias": b}


def arch_of(state: dict) -> str:
    """The checkpoint's arch (a bare state dict: resnet50)."""
    return (state.get("config") or {}).get("arch") or state.get("meta", {}).get("arch") or "resnet50"


def export_state_dict(state: dict, *, arch: str | None = None, head: dict | None = None,
                      num_classes: int = 1000, seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """(torchvision state dict, where fc came from) from a train.py checkpoint, a bare backbone state
    dict or an eval.finetune model (fc included)."""
    from masksiam.config import Config, apply
    from models.resnet import torchvision_model
    cfg = apply(Config(), state["config"], "checkpoint") if "config" in state else None
    arch = arch or arch_of(state)
    if cfg is not None:
        from models.resnet import torchvision_layout
        if why := torchvision_layout(cfg):
            raise EvalError(f"this backbone (arch={cfg.arch}, width={cfg.width}, stem={cfg.stem}, size={cfg.size}: "
                            f"{why}) has no torchvision counterpart; load its weights with "
                            f"models.resnet.build_backbone_from_config instead")
    weights = {k: v.detach().cpu() for k, v in ckpt_io.backbone_state(state).items()}
    torch.manual_seed(seed)
    if head is not None:
        fc, source = fold_head(head), "linear probe"
        num_classes = fc["fc.weight"].shape[0]
    elif "fc.weight" in weights:
        fc, source = {k: weights[k] for k in ("fc.weight", "fc.bias")}, "fine-tuned (from the checkpoint)"
        num_classes = fc["fc.weight"].shape[0]
    else:
        fc, source = None, f"freshly initialised (torchvision's default init, seed {seed})"
    model = torchvision_model(arch, num_classes)
    sd = model.state_dict()
    body = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    missing = [k for k in sd if not k.startswith("fc.") and k not in body]
    extra = [k for k in body if k not in sd]
    shapes = [k for k in body if k in sd and body[k].shape != sd[k].shape]
    if missing or extra or shapes:
        raise EvalError(f"the checkpoint's backbone does not fit torchvision's {arch}: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}, shape mismatches {shapes[:3]}")
    sd.update(body)
    if fc is not None:
        if fc["fc.weight"].shape[1] != sd["fc.weight"].shape[1]:
            raise EvalError(f"the classifier takes {fc['fc.weight'].shape[1]} features, {arch} has "
                            f"{sd['fc.weight'].shape[1]}")
        sd.update({k: v.to(sd[k].dtype) for k, v in fc.items()})
    return {k: v.contiguous() for k, v in sd.items()}, source


@torch.no_grad()
def check_features(sd: dict[str, torch.Tensor], state: dict, arch: str, size: int = 32) -> float:
    """Max |difference| of the pooled features: exported torchvision model vs the project's backbone."""
    from masksiam.config import Config, apply
    from models.resnet import build_backbone, build_backbone_from_config, load_backbone_state, torchvision_model
    tv = torchvision_model(arch, sd["fc.weight"].shape[0])
    tv.load_state_dict(sd, strict=True)
    tv.fc = torch.nn.Identity()
    ours = (build_backbone_from_config(apply(Config(), state["config"], "checkpoint")) if "config" in state
            else build_backbone(arch))
    load_backbone_state(ours, ckpt_io.backbone_state(state))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    theirs, mine = tv.eval()(x), ours.eval()(x)
    # relative to the features' scale: the two convolution paths round differently (on the CPU the
    # downsample conv runs subsampled, models.resnet.SubsampledConv1x1)
    return float((theirs - mine).abs().max() / mine.abs().max().clamp_min(1e-12))


def save(sd: dict[str, torch.Tensor], path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save as to_bytes
        blob = to_bytes(sd, metadata={k: str(v) for k, v in info.items()})
        atomic_write(path, lambda f: f.write(blob))
    elif path.suffix == ".pt":
        ckpt_io.save_atomic(sd, path)
        atomic_write_text(path.with_name(path.name + ".json"), json.dumps(info, indent=2) + "\n")
    else:
        raise EvalError(f"--out {path}: the file must end in .pt or .safetensors")


@command("eval.export")
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m eval.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train.py checkpoint, backbone.pt, or eval.finetune --save")
    p.add_argument("--out", required=True, help="FILE.pt or FILE.safetensors")
    p.add_argument("--head", default=None, help="classifier from eval.linear --save-head")
    p.add_argument("--arch", default=None, help="for a bare state dict (default: the checkpoint's, else resnet50)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of a fresh fc")
    p.add_argument("--seed", type=int, default=0, help="seed of a fresh fc")
    args = p.parse_args(argv)
    state = ckpt_io.load(args.checkpoint)
    head = ckpt_io.load(args.head) if args.head else None
    arch = args.arch or arch_of(state)
    sd, source = export_state_dict(state, arch=arch, head=head, num_classes=args.num_classes, seed=args.seed)
    diff = check_features(sd, state, arch)
    if diff > 1e-4:
        raise EvalError(f"exported {arch} differs from the backbone by {diff:.3g} (relative) on a random batch")
    info = {"arch": arch, "source": args.checkpoint, "fc": source, "num_classes": sd["fc.weight"].shape[0],
            "feature_max_rel_diff": diff}
    save(sd, Path(args.out), info)
    print(f"wrote {args.out}: torchvision / timm {arch}, fc {source}; features match the backbone "
          f"(max |diff| {diff:.1e})")
    return info


if __name__ == "__main__":
    main()
