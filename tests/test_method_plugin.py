"""A method owns its settings: a toy method defined here (one class with its own Settings) and one
registry entry train through train.py with its own key; keys of no method or of another method are
refused in one line naming the key, where it came from and the method that has it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from torch import nn

import losses
import masksiam  # noqa: F401
import train
from losses.common import Settings, defaults, hparams
from masksiam.config import ConfigError, valid_keys

from test_train import _args, _losses

SEEN: list["Toy"] = []                  # the instances train.py built


@dataclass(frozen=True)
class ToySettings(Settings):
    toy_scale: float = 1.0              # the loss is multiplied by it
    RULES: ClassVar = {"toy_scale": (lambda v: v > 0, "> 0")}


class Toy(nn.Module):
    """The smallest method: the mean squared pooled feature of view 0, times toy_scale."""
    name, Settings = "toy", ToySettings
    DEFAULTS = defaults(ToySettings)

    def __init__(self, backbone: nn.Module, hp: dict, cfg=None):
        super().__init__()
        self.hp, self.backbone = hp, backbone
        SEEN.append(self)

    def forward(self, out):
        h = self.backbone(out.views[0])                              # (N, C)
        loss = self.hp["toy_scale"] * h.float().pow(2).mean()
        return loss, {"loss": loss.detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        pass


@pytest.fixture(autouse=True)
def _toy(monkeypatch):
    monkeypatch.setenv("MASKSIAM_DEVICE", "cpu")
    monkeypatch.setitem(losses.METHODS, "toy", Toy)
    SEEN.clear()


def _run(folder, out, name, *extra):
    args = _args(folder, out, name, "method=toy", "recipe=plain", "max_steps=2", "epochs=1",
                 "online_probe=false", "final_eval=false", *extra)
    return train.main([a for a in args if not a.startswith("proj_")])   # the Siamese heads' keys: not toy's


def test_a_toy_method_trains_through_train_py_with_its_own_key(image_folder, tmp_path):
    assert "toy_scale" not in valid_keys()                          # not a field of the shared Config
    res = _run(image_folder, tmp_path, "two", "toy_scale=2")
    four = _run(image_folder, tmp_path, "four", "toy_scale=4")
    assert [m.hp["toy_scale"] for m in SEEN] == [2.0, 4.0]          # the key reached the method
    a, b = _losses(Path(res["run_dir"])), _losses(Path(four["run_dir"]))
    assert sorted(a) == [1, 2] and sorted(b) == [1, 2]              # 2 optimizer steps each
    assert b[1] == pytest.approx(2 * a[1], rel=1e-5)               # same start, loss x toy_scale
    written = yaml.safe_load((Path(res["run_dir"]) / "config.yaml").read_text())
    assert written["method_args"] == {"toy_scale": 2.0}             # the resolved settings, under one key
    assert "toy_scale" not in written and written["method"] == "toy"
    _run(image_folder, tmp_path, "dflt")
    assert SEEN[-1].hp == {"toy_scale": 1.0}                        # its default


@pytest.mark.parametrize("extra, message", [
    (["toy_scal=2"], r"^unknown config key 'toy_scal' in command line \(did you mean 'toy_scale'.*; valid keys: .*toy_scale"),
    (["lambd=0.1"], r"^config key 'lambd' in command line is not a setting of method 'toy' \(it belongs to 'barlow'\)$"),
    (["toy_scale=0"], r"^config key 'toy_scale' = 0.0 must be > 0 for method 'toy' \(in command line\)$"),
    (["toy_scale=big"], r"^config key 'toy_scale' in command line: expected float, got 'big'$"),
])
def test_bad_method_keys_are_refused_in_one_line(image_folder, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        _run(image_folder, tmp_path, "bad", *extra)
    assert "\n" not in str(err.value) and not (tmp_path / "bad").exists()   # nothing written


def test_another_methods_config_refuses_the_toy_key(image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"'toy_scale' in command line is not a setting of method 'simclr' "
                                          r"\(it belongs to 'toy'\)"):
        train.main(_args(image_folder, tmp_path, "x", "toy_scale=2"))
    assert hparams(Toy, None) == {"toy_scale": 1.0}
