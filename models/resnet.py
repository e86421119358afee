"""ResNet factory on torchvision's ResNet, so state dicts load into torchvision models unchanged.

    backbone = build_backbone("resnet50")                  # ImageNet stem: 7x7/2 conv + maxpool
    backbone = build_backbone("resnet18", small_stem=True) # 28-64 px inputs: 3x3/1 conv, no maxpool
    backbone = build_backbone_from_config(cfg)             # cfg.stem: auto, imagenet, small or simmim

The classifier is replaced by Identity, so backbone(x) is the pooled feature (N, num_features).
A small-stem model keeps every key name; only conv1.weight's shape (64, 3, 3, 3) differs from
torchvision's, which matters only when loading its weights into a 7x7-stem model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import masksiam  # noqa: F401  (torchvision importable on CPU torch)
from masksiam.config import ConfigError
from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# name -> (block, layers, torchvision kwargs); resnet10 is the 1-1-1-1 BasicBlock net for CPU demos
ARCHS = {
    "resnet10": (BasicBlock, [1, 1, 1, 1], {}),
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "resnet152": (Bottleneck, [3, 8, 36, 3], {}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
    # BiT's width multipliers (SimMIM's ResNet-50x4, MixMAE's ResNet-50x3): every stage's channels x k
    "resnet50x3": (Bottleneck, [3, 4, 6, 3], {"width_multiplier": 3}),
    "resnet50x4": (Bottleneck, [3, 4, 6, 3], {"width_multiplier": 4}),
}


def build_backbone(arch: str, small_stem: bool = False, zero_init_residual: bool = True,
                   width: int = 64) -> ResNet:
    """A torchvision ResNet without classifier; `width` scales every stage (64 = torchvision's)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r} (config key 'arch'); choose one of {', '.join(ARCHS)}")
    block, layers, kwargs = ARCHS[arch]
    kwargs = dict(kwargs)
    width *= kwargs.pop("width_multiplier", 1)
    net = ResNet(block, layers, zero_init_residual=zero_init_residual, **kwargs)
    if width != 64 or small_stem:
        # rebuild the stem and stages with torchvision's own _make_layer: same module names, so a
        # state dict keeps torchvision's keys; only the shapes follow `width`
        net.inplanes = width
        stem = (nn.Conv2d(3, width, 3, 1, 1, bias=False) if small_stem     # CIFAR-style: 28-64 px inputs
                else nn.Conv2d(3, width, 7, 2, 3, bias=False))               # keep full resolution
        net.conv1, net.bn1 = stem, nn.BatchNorm2d(width)
        net.maxpool = nn.Identity() if small_stem else net.maxpool
        net.layer1 = net._make_layer(block, width, layers[0])
        net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
        net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
        net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)
        net.fc = nn.Linear(width * 8 * block.expansion, 1)
        _init_like_torchvision(net, zero_init_residual)
    for m in net.modules():
        if isinstance(m, (BasicBlock, Bottleneck)) and m.downsample is not None:
            conv = m.downsample[0]
            if conv.kernel_size == (1, 1) and conv.stride != (1, 1):
                conv.__class__ = SubsampledConv1x1        # same parameters and keys, no new init
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    return net


class SubsampledConv1x1(nn.Conv2d):
    """The downsample shortcut's stride-s 1x1 convolution, computed on the CPU as the stride-1
    convolution of every s-th pixel (the same values). torch 2.13's CPU backward of a strided 1x1
    convolution on channels-last inputs writes out of bounds for some shapes (few input channels at
    56 px and more, odd batches): a segfault or a corrupted heap. Other devices run it as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return F.conv2d(x[:, :, ::self.stride[0], ::self.stride[1]], self.weight, self.bias)


def _init_like_torchvision(net: ResNet, zero_init_residual: bool) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in net.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def use_small_stem(stem: str, size: int) -> bool:
    return stem == "small" or (stem == "auto" and size <= 64)


def simmim_stem_(net: ResNet) -> ResNet:
    """SimMIM's ResNet stem (Xie et al. 2022, supplement: ResNet-50x4 "after the stem of a 3x3
    convolution of stride 2 followed by a 2x2 max-pooling"), in place of the 7x7/2 conv + 3x3/2
    max-pool: the same stride 4, so the mask token, patch sizes and stages are unchanged. Each stem
    output reads a 5 x 5 px window (1 px before its 4 x 4 cell) instead of 11 x 11, so a visible
    output reads far fewer masked pixels across a patch border (2 % of the masked pixels of a 32 px
    patch mask at 224 px, against 14 %: tests/test_mim_fidelity.py). Same key names; conv1.weight
    is (width, 3, 3, 3), so torchvision's 7x7 weights do not load."""
    width = net.bn1.num_features
    net.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.MaxPool2d(2, 2)
    return net


def build_backbone_from_config(cfg) -> ResNet:
    net = build_backbone(cfg.arch, use_small_stem(cfg.stem, cfg.size), cfg.zero_init_residual, cfg.width)
    return simmim_stem_(net) if cfg.stem == "simmim" else net


def torchvision_layout(cfg) -> str:
    """Why a config's backbone has no torchvision counterpart ("" if it has one)."""
    if use_small_stem(cfg.stem, cfg.size):
        return "small stem"
    if cfg.stem == "simmim":
        return "SimMIM's 3x3 stem"
    return "width" if cfg.width != 64 else ""


def torchvision_model(arch: str, num_classes: int = 1000) -> ResNet:
    """A stock torchvision model of the same arch, for exporting / loading weights."""
    if arch == "resnet10":
        block, layers, kwargs = ARCHS[arch]
        return ResNet(block, layers, num_classes=num_classes, **kwargs)
    if "width_multiplier" in ARCHS.get(arch, (None, None, {}))[2]:     # not in torchvision: same keys
        net = build_backbone(arch, zero_init_residual=False)
        net.fc = nn.Linear(net.num_features, num_classes)
        return net
    return getattr(tv_resnet, arch)(weights=None, num_classes=num_classes)


def load_backbone_state(net: ResNet, state: dict[str, torch.Tensor]) -> None:
    """Load backbone weights, ignoring a classifier; names any missing or unexpected key."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"backbone weights do not fit this model (arch / width / stem?): missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, shape mismatches {shapes[:3]}")
    net.load_state_dict(state, strict=False)
