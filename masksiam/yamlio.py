"""Yaml files with `base:` inheritance, and values checked against type annotations.

Used by run configs (masksiam/config.py) and augmentation recipes (pipelines/augment/recipes.py):

    layers = read_layers(path, error=ConfigError, what="config file")   # [(file, mapping)], base first
    value = coerce(raw, Optional[int], "config key 'x' in a.yaml", ConfigError)

A file may name another with `base: other`; the other is read first and this file's keys are laid
over it (how depends on the caller: configs replace key by key, recipes merge nested mappings).
Errors are the caller's error class and name the file, the base chain or the key. A key given twice
in one mapping is refused (plain yaml keeps the last one silently, so an edit above a forgotten
line would change nothing).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import yaml


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"key {key!r} appears twice (lines {first} and {again})")
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key repeated in one mapping (merge keys `<<` may still be
    overridden: that is what they are for)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:                   # an unhashable key: the base class names it
                    continue
        return super().construct_mapping(node, deep)


def safe_load(stream) -> Any:
    """yaml.safe_load with repeated keys refused (_DuplicateKey, a yaml.YAMLError)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)


def _relative(base: Any, parent: Path) -> Path:
    return parent.parent / str(base)


def read_layers(path: str | Path, *, error: type[Exception], what: str,
                resolve: Callable[[Any, Path], Path] = _relative) -> list[tuple[Path, dict]]:
    """`path` and its `base` chain as [(file, mapping without `base`)], the deepest base first.

    resolve(base value, file naming it) -> the base's path (default: relative to that file); it may
    raise `error` itself (e.g. an unknown recipe name)."""
    layers: list[tuple[Path, dict]] = []
    seen: list[Path] = []
    path, child = Path(path), None
    while True:
        if not path.is_file():
            raise error(f"{what} {path} does not exist" + (f" (base of {child})" if child else ""))
        if path.resolve() in seen:
            raise error(f"{what} {path}: `base` chain loops back to itself "
                        f"({' -> '.join(str(p) for p in seen + [path.resolve()])})")
        seen.append(path.resolve())
        try:
            with open(path) as f:
                data = safe_load(f) or {}
        except _DuplicateKey as err:
            raise error(f"{what} {path}: {err}; keep one") from None
        except yaml.YAMLError as err:
            raise error(f"{what} {path} is not valid yaml: {' '.join(str(err).split())}") from None   # one line
        if not isinstance(data, dict):
            raise error(f"{what} {path} must hold a mapping of key: value")
        base = data.pop("base", None)
        layers.append((path, data))
        if base is None:
            return layers[::-1]
        path, child = resolve(base, path), path


def type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(typ))
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in typing.get_args(typ)) + "]"
    return "null" if typ is type(None) else getattr(typ, "__name__", str(typ))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def dataclass_from(cls, value: Any, where: str, error: type[Exception], field: Callable | None = None):
    """cls(**value) from a yaml mapping: unknown keys refused naming the valid ones, each value coerced
    to its field's type by field(value, type, where) (default: coerce with the same error)."""
    if not isinstance(value, dict):
        raise error(f"{where}: expected a mapping of {cls.__name__} settings, got {value!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    field = field or (lambda v, t, w: coerce(v, t, w, error))
    return cls(**{k: field(v, hints[k], f"{where}.{k}") for k, v in value.items()})


def coerce(value: Any, typ: Any, where: str, error: type[Exception]) -> Any:
    """`value` checked against the annotation `typ`, with the few safe conversions (int -> float,
    list -> tuple, a number -> str); a dataclass type takes a mapping of its fields. `where` starts
    the error message (it names the key and the file)."""
    origin = typing.get_origin(typ)
    bad = error(f"{where}: expected {type_name(typ)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where, error)
            except error:
                pass
        raise bad
    if origin is Literal:
        if value not in typing.get_args(typ):
            raise error(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in typing.get_args(typ))}")
        return value
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], where, error) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(coerce(v, a, where, error) for a, v in zip(args, value))
    if dataclasses.is_dataclass(typ):
        return dataclass_from(typ, value, where, error)
    if typ is bool and isinstance(value, bool):
        return value
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is float and _number(value):
        return float(value)
    if typ is str:
        if isinstance(value, str):
            return value
        if _number(value):
            return str(value)  # e.g. run_name=123
    if typ is dict and isinstance(value, dict):
        return value
    raise bad
