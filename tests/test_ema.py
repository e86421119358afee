"""models/ema.py: the momentum target copy, its update over parameters and buffers, BYOL's schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.ema import cosine_momentum, ema_update, make_target, momentum_at, unwrap


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2), nn.BatchNorm1d(2))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_make_target_is_an_independent_frozen_copy():
    online = small_net()
    target = make_target(online)
    for (name, pt), po in zip(target.named_parameters(), online.parameters()):
        assert not pt.requires_grad and po.requires_grad, name
        assert torch.equal(pt, po) and pt.data_ptr() != po.data_ptr()
    with torch.no_grad():
        next(online.parameters()).add_(1.0)
    assert not torch.equal(next(target.parameters()), next(online.parameters()))


def test_ema_update_averages_parameters_and_float_buffers_copies_counts():
    online, target = small_net(0), make_target(small_net(1))
    online.train()(torch.randn(8, 3, 6, 6))                  # move running stats and num_batches_tracked
    online.train()(torch.randn(8, 3, 6, 6))
    before_t, before_o = state(target), state(online)
    m = 0.9
    ema_update(target, online, m)
    after = target.state_dict()
    for key, value in after.items():
        if value.is_floating_point():                       # weights, biases, running_mean, running_var
            torch.testing.assert_close(value, m * before_t[key] + (1 - m) * before_o[key], rtol=1e-6, atol=1e-7)
        else:                                               # num_batches_tracked
            assert key.endswith("num_batches_tracked") and value.item() == before_o[key].item() == 2
    assert all(torch.equal(v, before_o[k]) for k, v in online.state_dict().items())   # online untouched


def test_ema_update_limits_and_wrappers():
    online, target = small_net(0), make_target(small_net(1))
    before = state(target)
    ema_update(target, online, 1.0)                          # BYOL's end of training: frozen
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items() if v.is_floating_point())
    ema_update(target, torch.compile(online, backend="eager"), 0.0)     # wrappers are unwrapped
    assert all(torch.equal(v, online.state_dict()[k]) for k, v in target.state_dict().items())
    with pytest.raises(ValueError, match="momentum must be in"):
        ema_update(target, online, 1.5)
    with pytest.raises(ValueError, match="differ"):
        ema_update(target, nn.Linear(2, 2), 0.5)


def test_unwrap_sees_through_compile():
    net = small_net()
    assert unwrap(torch.compile(net, backend="eager")) is net
    assert unwrap(net) is net


def test_repeated_updates_converge_geometrically():
    # after n updates toward a fixed online network the gap shrinks by m^n
    online, target = small_net(0), make_target(small_net(1))
    gap0 = [(pt - po).detach().clone() for pt, po in zip(target.parameters(), online.parameters())]
    for _ in range(5):
        ema_update(target, online, 0.8)
    for g0, pt, po in zip(gap0, target.parameters(), online.parameters()):
        torch.testing.assert_close(pt - po, g0 * 0.8 ** 5, rtol=1e-5, atol=1e-6)


def test_cosine_momentum_schedule():
    base, total = 0.996, 1000
    assert cosine_momentum(0, total, base) == pytest.approx(base)
    assert cosine_momentum(total, total, base) == pytest.approx(1.0)
    assert cosine_momentum(total // 2, total, base) == pytest.approx((1 + base) / 2)
    for k in (100, 333, 750):   # BYOL: 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
        assert cosine_momentum(k, total, base) == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2)
    values = [cosine_momentum(k, total, base) for k in range(0, total + 1, 50)]
    assert values == sorted(values)
    assert cosine_momentum(5 * total, total, base) == 1.0 and cosine_momentum(-3, total, base) == pytest.approx(base)
    assert momentum_at(700, total, 0.999, "constant") == 0.999
    assert momentum_at(700, total, base, "cosine") == cosine_momentum(700, total, base)
    with pytest.raises(ValueError, match="ema_schedule"):
        momentum_at(0, total, base, "linear")
