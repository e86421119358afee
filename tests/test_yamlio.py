"""masksiam/yamlio.py (configs and recipes share it) and masksiam/io.py: file permissions, and every write goes through it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from masksiam.io import atomic_write_text
from masksiam.yamlio import coerce, read_layers


class Bad(ValueError):
    pass


def test_base_chain_deepest_first_and_relative_to_each_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("a: 1\nb: 1\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nb: 2\n")
    (tmp_path / "top.yaml").write_text("base: sub/mid.yaml\nc: 3\n")
    layers = read_layers(tmp_path / "top.yaml", error=Bad, what="config file")
    assert [p.name for p, _ in layers] == ["root.yaml", "mid.yaml", "top.yaml"]
    assert [d for _, d in layers] == [{"a": 1, "b": 1}, {"b": 2}, {"c": 3}]     # `base` removed


def test_base_errors_name_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(Bad, match=r"loops back.*a.yaml -> .*b.yaml -> .*a.yaml"):
        read_layers(tmp_path / "a.yaml", error=Bad, what="config file")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(Bad, match=r"missing.yaml does not exist \(base of .*c.yaml\)"):
        read_layers(tmp_path / "c.yaml", error=Bad, what="config file")
    (tmp_path / "d.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(Bad, match="must hold a mapping"):
        read_layers(tmp_path / "d.yaml", error=Bad, what="config file")
    (tmp_path / "e.yaml").write_text("a: [1, 2\n")
    with pytest.raises(Bad, match="not valid yaml"):
        read_layers(tmp_path / "e.yaml", error=Bad, what="recipe")


def test_a_key_given_twice_is_refused_naming_the_key_the_file_and_the_lines(tmp_path):
    """Plain yaml keeps the last of two equal keys: an edit above a forgotten line would do nothing."""
    (tmp_path / "dup.yaml").write_text("lr: 0.5\nepochs: 3\nlr: 0.1\n")
    with pytest.raises(Bad) as err:
        read_layers(tmp_path / "dup.yaml", error=Bad, what="config file")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "dup.yaml") in msg and "'lr' appears twice (lines 1 and 3)" in msg
    # in a base file, and inside a nested mapping (a recipe's stage settings)
    (tmp_path / "top.yaml").write_text("base: nested.yaml\nlr: 1\n")
    (tmp_path / "nested.yaml").write_text("stages:\n  blur: {p: 0.5, p: 0.2}\n")
    with pytest.raises(Bad, match=r"nested.yaml: key 'p' appears twice \(lines 2 and 2\)"):
        read_layers(tmp_path / "top.yaml", error=Bad, what="recipe")
    # what stays allowed: the same key in two mappings, a child file overriding its base, merge keys
    (tmp_path / "ok.yaml").write_text("base: root.yaml\na: {x: 1}\nb: {x: 2}\nd: &d {y: 1, z: 2}\n"
                                      "e:\n  <<: *d\n  y: 3\n")
    (tmp_path / "root.yaml").write_text("a: 0\n")
    layers = read_layers(tmp_path / "ok.yaml", error=Bad, what="config file")
    assert layers[1][1]["e"] == {"y": 3, "z": 2} and layers[0][1] == {"a": 0}


def test_invalid_yaml_is_one_line(tmp_path):
    (tmp_path / "e.yaml").write_text("a: [1, 2\n")
    with pytest.raises(Bad) as err:
        read_layers(tmp_path / "e.yaml", error=Bad, what="recipe")
    assert "\n" not in str(err.value) and "e.yaml" in str(err.value)


@dataclass(frozen=True)
class Inner:
    p: float = 0.5
    name: str = "x"


def test_coerce_rules():
    assert coerce(1, float, "k", Bad) == 1.0 and isinstance(coerce(1, float, "k", Bad), float)
    assert coerce([1, 2], tuple[float, float], "k", Bad) == (1.0, 2.0)
    assert coerce([1, 2, 3], tuple[int, ...], "k", Bad) == (1, 2, 3)
    assert coerce(None, Optional[int], "k", Bad) is None and coerce(3, Optional[int], "k", Bad) == 3
    assert coerce(123, str, "k", Bad) == "123"
    assert coerce({"p": 1}, Inner, "k", Bad) == Inner(p=1.0)
    for value, typ, says in ((True, int, "expected int, got True"), (1.5, int, "expected int"),
                             ("a", Optional[int], "expected int or null"), ([1], tuple[float, float], r"\[float, float\]"),
                             ("c", Literal["a", "b"], "'c' is not one of 'a', 'b'"), (1, bool, "expected bool"),
                             ({"q": 1}, Inner, r"k: unknown key\(s\) q; valid keys: p, name"),
                             ({"p": "hi"}, Inner, "k.p: expected float")):
        with pytest.raises(Bad, match=says):
            coerce(value, typ, "k", Bad)


def test_atomic_write_gives_open_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_text(tmp_path / "r.json", "{}")
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# every file the project writes goes through masksiam.io (a crash or a full disk leaves the old file
# or none, never half of one); the exceptions write inside a temporary folder that is renamed into place
WRITES_IN_TEMP_FOLDER = {"pipelines/tools/webdataset.py", "pipelines/tools/fashion_mnist.py",
                         "pipelines/tools/photos.py"}


def _direct_writes(source: str) -> list[str]:
    import ast
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        first = node.args[0] if node.args else None
        if name in ("write_text", "write_bytes"):
            found.append(f"line {node.lineno}: .{name}()")
        elif name == "savefig" and not isinstance(first, ast.Name):
            # fig.savefig(f, ...) / torch.save(obj, f) inside atomic_write's callback take the file object
            found.append(f"line {node.lineno}: savefig() to a path")
        elif (name == "save" and getattr(fn, "value", None) is not None and getattr(fn.value, "id", "") == "torch"
              and len(node.args) > 1 and not isinstance(node.args[1], ast.Name)):
            found.append(f"line {node.lineno}: torch.save() to a path")
        elif name == "open" and isinstance(fn, ast.Name):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and "w" in str(mode.value):
                found.append(f"line {node.lineno}: open(..., {mode.value!r})")
    return found


def test_the_project_writes_files_only_through_the_atomic_helper():
    root = Path(__file__).resolve().parent.parent
    files = [p for p in root.rglob("*.py") if not {"tests", ".venv", "build", ".git"} & set(p.relative_to(root).parts)]
    assert len(files) > 30
    offenders = {}
    for p in files:
        rel = str(p.relative_to(root))
        if rel in WRITES_IN_TEMP_FOLDER or rel == "masksiam/io.py":
            continue
        if found := _direct_writes(p.read_text()):
            offenders[rel] = found
    assert not offenders, offenders
    # the scan can fail: each kind of direct write is found
    assert len(_direct_writes("from pathlib import Path\nPath('a').write_text('x')\nfig.savefig('a.png')\n"
                              "torch.save(sd, 'a.pt')\nopen('a', 'w')\n")) == 4
