"""Loading a config, and writing it back out: YAML files and ``section.key=value`` overrides become the typed
dataclasses of :mod:`ssb.config`; :func:`dump_yaml` and :func:`describe` (the text of ``ssb config --keys``) go the
other way.

A config is loaded from YAML (a nested mapping of sections), then overridden with dotted ``section.key=value``
strings whose values are parsed as YAML scalars (``rollout.samples=8``, ``evaluate.benchmarks=[math500,aime24]``).
Every value is converted to its field's type and checked against the choices or range the field declares, then each
section's ``check()`` runs. Unknown keys, ill-typed and out-of-range values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ssb.config import Config, ConfigError, DatasetConfig, Range


# --------------------------------------------------------------------------------------------- in and out

def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults ← ``base`` mapping (e.g. a run directory's saved config) ← YAML file ← ``key=value`` overrides."""
    values: dict = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        _merge(values, loaded)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': {k} is not a section")
        node[keys[-1]] = value
    return from_dict(values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rollout.samples=8"`` -> ``(["rollout", "samples"], 8)``: the value is read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def from_dict(values: dict) -> Config:
    return _build(Config, values or {})


def to_dict(obj) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field: the text of ``ssb config``."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp) and tp is not DatasetConfig:
            rows += describe(tp, key + ".")
        else:
            rows.append((key, json.dumps(to_dict(default), default=str), f.metadata.get("help", "")))
    return rows


# --------------------------------------------------------------------------------------------- building and checking

def _build(cls, values: dict, prefix: str = ""):
    """``cls`` from its defaults and the mapping ``values``, each converted to its field's type, then checked."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; valid keys here: {', '.join(names)}")
    obj = cls()
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        setattr(obj, k, _coerce(v, hints[k], key))
    _validate(obj, prefix)
    return obj


def _validate(obj, prefix: str) -> None:
    """The choices or range each field declares (``allowed``), then the section's rules across fields (``check``)."""
    for f in dataclasses.fields(obj):
        value, allowed = getattr(obj, f.name), f.metadata.get("allowed")
        key = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(allowed, Range):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in allowed:
                raise ConfigError(f"{key}: must be {allowed}; got {value!r}")
        elif allowed and value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}; got {value!r}")
    if hasattr(obj, "check"):
        obj.check()


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; ``key`` names it in errors."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_tname(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if tp is DatasetConfig and isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    return _scalar(value, tp, key)


def _scalar(value: Any, tp: Any, key: str) -> Any:
    """A YAML scalar as a bool, int, float or str field wants it."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
