"""Config: yaml + key=value overrides, typed; unknown / mistyped keys stop with the key's name."""
from __future__ import annotations

import pytest

from masksiam.config import Config, ConfigError, load_config, parse_overrides, save_config, valid_keys


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\narch: resnet18\ncrop_scale: [0.2, 1.0]\n")
    cfg = load_config(path, ["epochs=3", "lr=1", "run_name=x", "temperature=0.1", "sync_bn=true"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)          # int accepted for a float key
    assert cfg.epochs == 3 and cfg.arch == "resnet18" and cfg.run_name == "x"
    assert cfg.crop_scale == (0.2, 1.0)
    assert cfg.method_args == {"temperature": 0.1} and cfg.sync_bn is True
    assert Config().method_args == {}                           # method defaults, resolved by the method


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lrr: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'lrr'" in msg and str(path) in msg and "did you mean 'lr'" in msg and "valid keys" in msg
    with pytest.raises(ConfigError, match="'epoch'.*command line.*did you mean 'epochs'"):
        load_config(None, ["epoch=3"])


@pytest.mark.parametrize("override, fragment", [
    ("epochs=3.5", "'epochs'.*expected int"),
    ("lr=fast", "'lr'.*expected float"),
    ("sync_bn=2", "'sync_bn'.*expected bool"),
    ("loader=pytorch", "'loader'.*'pytorch' is not one of"),
    ("crop_scale=[0.1]", "'crop_scale'.*expected"),
    ("lr", "not of the form key=value"),
])
def test_mistyped_values_are_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_base_file_applies_first_and_loops_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 0.5\nepochs: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nlr: 0.9\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.lr == 0.9 and cfg.epochs == 7
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "e.yaml")


def test_a_duplicate_key_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("method: byol\nepochs: 7\nmethod: simclr\n")
    with pytest.raises(ConfigError, match=r"config file .*a.yaml: key 'method' appears twice \(lines 1 and 3\)"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["lr=0.7", "crop_scale=[0.3,0.9]", "proj_dim=64"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert "method_args:\n  proj_dim: 64\n" in (tmp_path / "resolved.yaml").read_text()   # one key holds them


def test_method_keys_flat_or_under_method_args_belong_to_the_selected_method(tmp_path):
    (tmp_path / "a.yaml").write_text("method: moco\nqueue_size: 64\nmethod_args: {temperature: 0.1}\n")
    cfg = load_config(tmp_path / "a.yaml", ["moco_symmetric=true"])
    assert cfg.method_args == {"queue_size": 64, "temperature": 0.1, "moco_symmetric": True}
    assert load_config(tmp_path / "a.yaml", ["temperature=null"]).method_args == {"queue_size": 64}  # its default
    # a key of another method: refused naming the key, where it came from and the method that has it
    with pytest.raises(ConfigError, match=r"^config key 'lambd' in command line is not a setting of method "
                                          r"'moco' \(it belongs to 'barlow'\)$"):
        load_config(tmp_path / "a.yaml", ["lambd=0.1"])
    # a layer naming another method drops the earlier layers' keys it does not have (temperature fits)
    assert load_config(tmp_path / "a.yaml", ["method=simclr"]).method_args == {"temperature": 0.1}
    (tmp_path / "c.yaml").write_text("base: a.yaml\nmethod: barlow\nlambd: 0.01\n")
    assert load_config(tmp_path / "c.yaml").method_args == {"lambd": 0.01}
    with pytest.raises(ConfigError, match=r"'queue_size' in .*d.yaml is not a setting of method 'simclr'.*'moco'"):
        (tmp_path / "d.yaml").write_text("method: simclr\nqueue_size: 64\n")
        load_config(tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match=r"'queue_size' in command line: expected int, got 'many'"):
        load_config(None, ["method=moco", "queue_size=many"])
    with pytest.raises(ConfigError, match=r"'temperature' = 0.0 must be > 0 for method 'moco' \(in command line\)"):
        load_config(tmp_path / "a.yaml", ["temperature=0"])
    with pytest.raises(ConfigError, match=r"'tempreature' in command line \(did you mean 'temperature'"):
        load_config(None, ["tempreature=0.1"])
    with pytest.raises(ConfigError, match=r"'method_args' in .*b.yaml: expected a mapping"):
        (tmp_path / "b.yaml").write_text("method_args: 3\n")
        load_config(tmp_path / "b.yaml")


def test_no_method_key_in_the_shared_config():
    from losses import METHODS
    for name, m in METHODS.items():
        assert not set(m.DEFAULTS) & set(valid_keys()), (name, set(m.DEFAULTS) & set(valid_keys()))


def test_override_parsing_keeps_strings_and_lists():
    assert parse_overrides(["run_name=007", "data=/a/b=c", "crop_scale=[0.2, 1]"]) == \
        {"run_name": 7, "data": "/a/b=c", "crop_scale": [0.2, 1]}
    assert load_config(None, ["run_name=007"]).run_name == "7"
    assert "batch_size" in valid_keys() and "lr" in valid_keys()


def test_every_config_in_configs_dir_loads():
    from pathlib import Path
    configs = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ holds the recipes"
    for path in configs:
        load_config(path)


def test_a_checkpoint_config_from_before_method_args_reads_and_compares():
    """Checkpoints written when method keys were Config fields hold them flat (None: unused)."""
    from masksiam.config import apply, resume_changes, to_dict
    old = {**to_dict(Config()), "method": "simclr", "temperature": 0.2, "proj_dim": 256, "queue_size": None,
           "lambd": None}
    del old["method_args"]
    cfg = apply(Config(), old, "run/checkpoint.pt")                 # as eval.common.run_config reads it
    assert cfg.method_args == {"temperature": 0.2, "proj_dim": 256}
    now = apply(Config(), {"method": "simclr", "method_args": {"temperature": 0.2, "proj_dim": 128}}, "t")
    assert resume_changes(old, now) == ["proj_dim=256 (this run: 128)"]
    assert resume_changes(to_dict(now), apply(now, {"temperature": 0.3}, "t")) == \
        ["temperature=0.2 (this run: 0.3)"]
