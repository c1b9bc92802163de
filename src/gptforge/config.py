"""Dataclass configs filled from YAML files and dotted ``--section.key=value`` overrides.

Every stage owns a small dataclass. :func:`load_config` reads an optional YAML file, applies overrides,
and builds the dataclass, rejecting unknown keys and wrong types with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gptforge.errors import GptforgeError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; a clear error for missing files and syntax errors."""
    path = Path(path)
    if not path.is_file():
        raise GptforgeError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise GptforgeError(f"{path} is not a text (UTF-8) file: byte {e.object[e.start]:#04x} at offset "
                            f"{e.start}; a config is a YAML text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GptforgeError(f"invalid YAML in {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GptforgeError(f"{path}: the top level of a config must be a mapping of keys to values")
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--train.lr=3e-4", "--name", "x"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise GptforgeError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            key, raw = body, "true"
        set_dotted(out, key.replace("-", "_"), parse_scalar(raw))
        i += 1
    return out


def parse_scalar(raw: str) -> Any:
    """A command-line value as a YAML scalar (``3`` → 3, ``true`` → True, ``[1, 2]`` → a list); text that is not
    valid YAML, or uses a tag (``!foo``), stays the plain string and meets the key's type check."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted == 'a.b'``, creating sections as needed."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise GptforgeError(f"cannot set {dotted}: {part} is a value, not a section")
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except GptforgeError as e:
                errors.append(str(e))
        raise GptforgeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not match {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise GptforgeError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise GptforgeError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise GptforgeError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise GptforgeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise GptforgeError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise GptforgeError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise GptforgeError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise GptforgeError(f"{where}: expected a string, got {value!r}")
    return value


def _with_section_defaults(f: dataclasses.Field, value: Any) -> Any:
    """A partly given section keeps the stage's own defaults for the rest (e.g. classify's constant schedule)."""
    if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
        if dataclasses.is_dataclass(default):
            return deep_merge(dataclasses.asdict(default), value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`GptforgeError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise GptforgeError(f"unknown key {where}.{unknown[0]} (known keys in {where}: {known})")
    kwargs = {name: _coerce(_with_section_defaults(fields[name], value), hints[name], f"{where}.{name}")
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise GptforgeError(f"{where}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain-dict copy of a (nested) dataclass config, for YAML/JSON output."""
    return dataclasses.asdict(config)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """YAML file (optional) + overrides → validated dataclass ``cls``."""
    data = read_yaml(path) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        data = deep_merge(data, overrides)
    migrate = getattr(cls, "migrate", None)  # a config may map deprecated key spellings to current ones
    if migrate is not None:
        data = migrate(data)
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (used for ``runs/<name>/config.yaml``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
