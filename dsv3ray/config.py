"""Config machinery: TOML files, named presets, `--set section.key=value` overrides.

Each component owns a small `@dataclass` config and receives only its own section; this module
knows nothing about any section's contents. `section_from_dict` builds a section's dataclass from
a plain dict and rejects unknown keys with one clear line.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from dsv3ray.errors import ConfigError, UserError


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist: pass an existing TOML file to --config")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {p} is not valid TOML ({e}): fix the syntax") from None
    except OSError as e:
        raise UserError(f"config file {p} cannot be read ({e.strerror}): check its permissions") from None


def parse_value(text: str) -> Any:
    """`--set` values are TOML literals (1e-4, true, "x", [1, 2]); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` (nested with more dots) to a copy of cfg."""
    out = json.loads(json.dumps(cfg))  # deep copy of plain TOML data
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or "." not in key or not key.split(".")[-1]:
            raise UserError(
                f"--set {item!r} is malformed: use --set section.key=value, e.g. --set model.keep_ratio=0.25"
            )
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part} is a value, not a section")
        node[leaf] = parse_value(raw.strip())
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    """Check a TOML value against a dataclass field type; ints widen to floats."""
    key = f"{section}.{name}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(section, name, a, value)
            except ConfigError as e:
                errors.append(e.allowed)
        raise ConfigError(key, value, " or ".join(errors))
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "expected a string")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(key, value, "expected a list")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(section, name, inner, v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "expected a table")
        return dict(value)
    return value


def section_from_dict(cls: type, data: dict[str, Any] | None, section: str):
    """Build dataclass `cls` from `data`; unknown keys and wrong types are ConfigErrors.

    The dataclass's own `__post_init__` does the value checks (ranges, divisibility).
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}",
            data[unknown[0]],
            f"unknown key; known keys: {', '.join(sorted(fields))}",
        )
    kwargs = {k: _coerce(section, k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    """A dataclass as plain TOML/JSON-able data (None values dropped for TOML)."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}
