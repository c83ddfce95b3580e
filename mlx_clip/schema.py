"""Strict YAML / dict -> dataclass conversion, the machinery under every config in mlx_clip.

A dataclass's type hints are the schema: `from_dict` refuses unknown keys (naming the nearest
valid one) and values of the wrong type, and a `Literal[...]` hint is the one list of a field's
allowed values (the modules that act on a value derive their tuples from it with
`typing.get_args`). Framework-free, and it knows no particular config:
mlx_clip/config.py (the run) and mlx_clip/models/config.py (an architecture) are built on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value, key or file is wrong; the message says which and why."""


class _NotFinite(ConfigError):
    """NaN or inf for a number: said as such, also where a union (`float | None`) is expected."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def one_of(values: tuple) -> str:
    """('a', 'b', 'c') -> "'a', 'b' or 'c'", for error messages."""
    return _either([repr(v) for v in values])


_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _allowed(tp: Any) -> list[str]:
    """A union member in an error message: a Literal's values, or what a type accepts in words."""
    if typing.get_origin(tp) is typing.Literal:
        return [repr(a) for a in typing.get_args(tp)]
    return [_WORDS.get(tp) or _type_name(tp)]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, and a Literal's
    value must be one of its arguments."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        shaped = None  # the error of the member whose shape the value has (a list, a mapping)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _NotFinite:
                raise
            except ConfigError as e:
                if _same_shape(value, arg):
                    shaped = e
        if shaped is not None:  # e.g. str | list[Source] given a list: say what is wrong inside it
            raise shaped
        if any(typing.get_origin(a) is typing.Literal for a in args):  # e.g. int | Literal["auto"]
            allowed = [word for a in args for word in _allowed(a)]
            raise ConfigError(f"{key} must be {_either(allowed)}, got {value!r}")
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        # The type is compared too: True == 1 must not pass for a Literal[1].
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{key} must be {one_of(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-5" (no dot) as a string; accept numeric text for floats.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            value = math.inf
        if not math.isfinite(value):  # NaN and inf pass every range check written as a comparison
            raise _NotFinite(f"{key} must be a finite number, got {value}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    return value


def _same_shape(value: Any, tp: Any) -> bool:
    """Whether `value` is the container `tp` asks for: a list for list[...], a mapping for a dataclass."""
    if typing.get_origin(tp) in (list, tuple):
        return isinstance(value, (list, tuple))
    return dataclasses.is_dataclass(tp) and isinstance(value, dict)


def unknown_key_error(key: str, valid: list[str], prefix: str = "") -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint} (valid: {', '.join(sorted(valid))})")


def check_dotted_key(cls: type, dotted: str) -> None:
    """Refuse `dotted` ("section.key") unless it names a single value of dataclass `cls`; the error
    names the key and the nearest valid one, as from_dict's does."""
    node, prefix = cls, ""
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"'{prefix}' is not a section, so '{dotted}' is not a config key")
        valid = [f.name for f in fields(node)]
        if part not in valid:
            raise unknown_key_error(part, valid, prefix)
        node, prefix = typing.get_type_hints(node)[part], f"{prefix}.{part}" if prefix else part
    if dataclasses.is_dataclass(node):
        raise ConfigError(
            f"'{dotted}' is a section; name one of its keys ({', '.join(f.name for f in fields(node))})"
        )


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys, wrong types and missing required
    keys (fields without a default). A list of dataclasses names each item's keys `key[i].field`."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise unknown_key_error(key, valid, prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    required = [f.name for f in fields(cls) if _required(f)]
    missing = [name for name in required if name not in kwargs]
    if missing:
        where = f"{prefix}: " if prefix else ""
        raise ConfigError(
            f"{where}missing key {one_of(tuple(missing))} (required: {', '.join(required)}); got {data!r}"
        )
    return cls(**kwargs)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true / false (any case) are bools. PyYAML follows YAML 1.1, where
    on / off / yes / no are too, which turned `data.validate: off` into False and refused it."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str):
    """A YAML document or scalar as every config is read (YAML 1.2 booleans, see _Loader)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set data['a']['b'] = value for dotted='a.b' (creating mappings on the way)."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def merge(data: dict, overrides: dict) -> None:
    """Overlay `overrides` (nested like `data`, as set_dotted builds it) on `data`, key by key."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merge(data[key], value)
        else:
            data[key] = value


def move_deprecated(data: dict, renames: dict[str, str], log=print) -> None:
    """Rename deprecated "section.key"s of a raw config mapping to their new "section.key" (`renames`:
    old -> new), warning through `log` (None: silently); old and new given together must agree."""
    for old, new in renames.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = data.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{new_section}: expected a mapping, got {type(target).__name__} {target!r}")
        if new_key in target and target[new_key] != value:
            raise ConfigError(
                f"{old}={value!r} and {new}={target[new_key]!r} disagree; {old} is the deprecated name "
                f"of {new}: give {new} only"
            )
        target[new_key] = value
        if log is not None:
            log(f"warning: {old} is deprecated, use {new} (read as {new}: {value!r})")


__all__ = [
    "ConfigError",
    "from_dict",
    "load_yaml",
    "merge",
    "move_deprecated",
    "one_of",
    "parse_yaml",
    "set_dotted",
    "to_dict",
    "unknown_key_error",
]
