"""ResNet factory and heads: torchvision-compatible weights, shapes, channels-last, optimizer."""
from __future__ import annotations

import math

import pytest
import torch

import masksiam  # noqa: F401
from masksiam.optim import LARS, lr_at, param_groups, peak_lr
from models.heads import SiameseNet, build_heads, mlp
from models.resnet import build_backbone, load_backbone_state, torchvision_model


@pytest.mark.parametrize("arch, features", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_backbone_loads_into_torchvision(arch, features):
    net = build_backbone(arch)
    assert net.num_features == features
    tv = torchvision_model(arch)
    missing, unexpected = tv.load_state_dict(net.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x = torch.randn(2, 3, 64, 64)
    tv.fc = torch.nn.Identity()
    net.eval(), tv.eval()
    torch.testing.assert_close(net(x), tv(x))


def test_small_stem_and_width():
    net = build_backbone("resnet18", small_stem=True, width=16).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert net(x).shape == (4, 128) and net.num_features == 128
    assert net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, torch.nn.Identity)
    # layer1 sees the full 32x32 resolution with the small stem
    assert net.layer1(net.relu(net.bn1(net.conv1(x)))).shape[-1] == 32
    fresh = build_backbone("resnet18", small_stem=True, width=16)
    load_backbone_state(fresh, net.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone_state(build_backbone("resnet18"), {"conv1.weight": torch.zeros(1)})


def test_zero_init_residual_zeroes_last_bn():
    net = build_backbone("resnet50", zero_init_residual=True)
    assert all(b.bn3.weight.abs().sum() == 0 for b in net.layer1)
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("resnet9000")


def test_heads_layout():
    proj = mlp(512, 64, 16, layers=3, bn=True, last_bn=True)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert proj[-1].affine is False and proj[0].bias is None
    no_bn = mlp(512, 64, 16, layers=2, bn=False)
    assert [type(m).__name__ for m in no_bn] == ["Linear", "ReLU", "Linear"] and no_bn[0].bias is not None
    hp = {"proj_hidden": 64, "proj_dim": 16, "proj_layers": 2, "proj_bn": True, "proj_last_bn": False, "pred_hidden": 32}
    projector, predictor = build_heads(128, hp)
    net = SiameseNet(build_backbone("resnet10", small_stem=True, width=16), projector, predictor)
    h, z, p = net(torch.randn(4, 3, 32, 32))
    assert h.shape == (4, 128) and z.shape == (4, 16) and p.shape == (4, 16)


def test_param_groups_exclude_biases_and_norms():
    net = build_backbone("resnet10", width=8)
    decay, no_decay = param_groups(net, 1e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0 and not no_decay["lars_adapt"] and decay["lars_adapt"]
    n = sum(p.numel() for p in net.parameters())
    assert n == sum(p.numel() for g in (decay, no_decay) for p in g["params"])


def test_lars_step_matches_formula_and_skips_nonfinite():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars_adapt": True},
                {"params": [b], "weight_decay": 0.0, "lars_adapt": False}], lr=0.5, momentum=0.9, eta=0.02)
    gw, gb = torch.randn(4, 3), torch.randn(4)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    g = gw + 0.1 * w0
    trust = 0.02 * w0.norm() / g.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * g)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)
    # a step flagged non-finite changes neither weights nor momentum
    w1, buf1 = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    w.grad = torch.full_like(gw, float("nan"))
    opt.step(skip=torch.tensor(True))
    torch.testing.assert_close(w.detach(), w1)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf1)


def test_schedule_warmup_then_cosine():
    peak = peak_lr(0.3, 4096, "linear")
    assert peak == pytest.approx(4.8)
    assert peak_lr(0.075, 4096, "sqrt") == pytest.approx(0.075 * 4)
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, min_ratio=0.1) == pytest.approx(0.1)
    mid = lr_at(10 + 45 // 2, 100, 10, 1.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * (45 // 2) / 90)))


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_every_optimizer_skips_a_nan_step_without_touching_state(name):
    from masksiam.config import Config, apply
    from masksiam.optim import build_optimizer
    net = torch.nn.Linear(4, 3)
    opt = build_optimizer(net, apply(Config(), {"optimizer": name, "weight_decay": 0.01}, "test"), lr=0.1)
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in opt.state.values()]
    for p in net.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step(skip=torch.tensor(True))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for old, new in zip(state, opt.state.values()):
        assert all(torch.equal(old[k], new[k]) for k in old)


@pytest.mark.parametrize("n, c, size", [(8, 8, 64), (7, 8, 64), (8, 4, 96), (5, 64, 56)])
def test_the_downsample_conv_is_a_strided_1x1_conv_and_trains_on_channels_last_cpu(n, c, size):
    """torch 2.13's CPU backward of a strided 1x1 convolution on channels-last inputs crashes (out-of-
    bounds writes) for these shapes; SubsampledConv1x1 computes the same values at stride 1."""
    from models.resnet import SubsampledConv1x1
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(c, 2 * c, 1, 2, bias=False)
    sub = torch.nn.Conv2d(c, 2 * c, 1, 2, bias=False)
    sub.load_state_dict(ref.state_dict())
    sub.__class__ = SubsampledConv1x1
    x = torch.randn(n, c, size, size)
    xr, xs = x.clone().requires_grad_(), x.contiguous(memory_format=torch.channels_last).requires_grad_()
    yr, ys = ref(xr), sub(xs)                              # the reference contiguous: its path is sound
    torch.testing.assert_close(ys, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yr)
    yr.backward(g)
    ys.backward(g)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sub.weight.grad, ref.weight.grad, rtol=1e-3, atol=1e-3)   # sums of ~8k terms
    net = build_backbone("resnet10", small_stem=True, width=c).to(memory_format=torch.channels_last)
    assert isinstance(net.layer2[0].downsample[0], SubsampledConv1x1)
    assert "layer2.0.downsample.0.weight" in net.state_dict()         # torchvision's keys
    net(xs.detach()[:, :3].contiguous(memory_format=torch.channels_last) if c >= 3 else
        torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)).sum().backward()
