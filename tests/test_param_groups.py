"""Weight decay: one rule for every registered method (masksiam.optim.param_groups).

Decayed: every trainable weight of 2+ dimensions. Not decayed (and no LARS adaptation): biases,
norm weights, and the mask tokens (SimMIM's after the stem, the MixMAE / sparse decoder's), as
SimMIM, MixMIM and SparK do. Frozen parameters (EMA targets, the LUT teacher) are in no group."""
from __future__ import annotations

import pytest
import torch

import masksiam  # noqa: F401
from losses import METHODS, build_method
from masksiam.config import Config, ConfigError, apply
from masksiam.optim import build_optimizer, no_weight_decay_names, param_groups
from models.resnet import build_backbone

SMALL = {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32, "decoder_dim": 16, "queue_size": 64}
# every method once, plus the variants that add or remove tokens and heads
VARIANTS = [(name, {}) for name in sorted(METHODS)] + [
    ("simmim", {"mim_encoder": "sparse", "decoder_depth": 1}),
    ("simmim", {"decoder_depth": 1, "lut_weight": 0.25}),
    ("mixmae", {"lut_weight": 0.25}),
]
# the mask tokens each variant must hold (the independent list the rule is checked against)
TOKENS = {("simmim", ()): {"tokens.token"},
          ("simmim", ("decoder_depth", "mim_encoder")): {"decoder.token"},
          ("simmim", ("decoder_depth", "lut_weight")): {"tokens.token"},
          ("mixmae", ()): {"decoder.token"},
          ("mixmae", ("lut_weight",)): {"decoder.token"}}


def _method(name: str, extra: dict, mixes: bool = False):
    torch.manual_seed(0)
    cfg = apply(Config(), {"method": name, "size": 32, "stem": "small", **SMALL, **extra}, "test")
    return build_method(cfg, build_backbone("resnet10", small_stem=True, width=8), mixes=mixes), cfg


def _check(method, expected_tokens: set[str]) -> None:
    decay, no_decay = param_groups(method, 0.05)
    in_decay = {id(p) for p in decay["params"]}
    in_no = {id(p) for p in no_decay["params"]}
    assert not in_decay & in_no
    tokens = set()
    for name, p in method.named_parameters():
        if not p.requires_grad:
            assert id(p) not in in_decay | in_no, name                  # frozen: no group
            continue
        is_token = name.rsplit(".", 1)[-1] == "token"
        tokens |= {name} if is_token else set()
        should_skip = p.ndim <= 1 or is_token
        assert (id(p) in in_no) == should_skip and (id(p) in in_decay) != should_skip, name
    assert tokens == expected_tokens
    assert decay["weight_decay"] == 0.05 and decay["lars_adapt"]
    assert no_decay["weight_decay"] == 0.0 and not no_decay["lars_adapt"]
    assert decay["params"] and no_decay["params"]


@pytest.mark.parametrize("name,extra", VARIANTS, ids=[f"{n}-{'-'.join(e) or 'default'}" for n, e in VARIANTS])
def test_every_method_decays_weights_only(name, extra):
    method, _ = _method(name, extra)
    _check(method, TOKENS.get((name, tuple(sorted(extra))), set()))


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if hasattr(METHODS[n], "embed")])
def test_mixed_wrapper_keeps_the_rule(name):
    method, _ = _method(name, {}, mixes=True)
    _check(method, set())


def test_no_weight_decay_names_carry_the_module_path():
    method, _ = _method("simmim", {"mim_encoder": "sparse", "decoder_depth": 1})
    names = no_weight_decay_names(torch.nn.ModuleDict({"wrapped": method}))
    assert {"wrapped.decoder.token", "wrapped.tokens.token"} >= {n for n in names if n.startswith("wrapped.")}
    assert "wrapped.decoder.token" in names


def test_adamw_step_leaves_the_mask_token_undecayed():
    """Zero gradients, weight decay 0.5: AdamW's decoupled decay shrinks weights by lr * wd, the
    token and the biases stay where they are."""
    method, cfg = _method("mixmae", {})
    cfg = apply(cfg, {"optimizer": "adamw", "weight_decay": 0.5}, "test")
    opt = build_optimizer(method, cfg, lr=0.1)
    for p in method.parameters():
        p.grad = torch.zeros_like(p)
    token = method.decoder.token.detach().clone()
    w = method.decoder.head.weight.detach().clone()
    opt.step()
    assert torch.equal(method.decoder.token, token)
    torch.testing.assert_close(method.decoder.head.weight, w * (1 - 0.1 * 0.5))


def test_adamw_betas_from_the_config():
    method, cfg = _method("simmim", {})
    opt = build_optimizer(method, apply(cfg, {"optimizer": "adamw", "adamw_betas": [0.9, 0.95]}, "test"), lr=0.1)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    opt = build_optimizer(method, apply(cfg, {"optimizer": "adamw"}, "test"), lr=0.1)
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)     # torch's default stays the default
    with pytest.raises(ConfigError, match="adamw_betas"):
        build_optimizer(method, apply(cfg, {"optimizer": "adamw", "adamw_betas": [0.9, 1.5]}, "test"), lr=0.1)
