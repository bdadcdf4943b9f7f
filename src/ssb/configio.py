"""Loading a config, and writing it back out: YAML files and ``section.key=value`` overrides become the typed
dataclasses of :mod:`ssb.config`; ``dump_yaml`` and ``describe`` (the text of ``ssb config --keys``) go the other way.

A config is loaded from YAML (a nested mapping of sections), then overridden with dotted ``section.key=value``
strings whose values are parsed as YAML scalars (``rollout.samples=8``, ``evaluate.benchmarks=[math500,aime24]``).
Unknown keys and ill-typed values raise :class:`ConfigError` naming the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ssb.config import Config, ConfigError, DatasetConfig, DistillConfig


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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


def _build(cls, values: dict, prefix: str = ""):
    hints = _hints(cls)
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


# Numeric fields must be > 0 unless listed here.
_RANGES = {
    **dict.fromkeys(("temperature", "top_k", "warmup_steps", "weight_decay", "max_grad_norm", "kd_weight",
                     "ce_weight", "lora_dropout", "seed", "beta", "format_reward", "save_every", "skip"), (">= 0", 0, None)),
    "top_p": ("in (0, 1]", None, 1), "jsd_beta": ("in [0, 1]", 0, 1), "gpu_memory_utilization": ("in (0, 1]", None, 1),
}


def _validate(obj, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            text, lo, hi = _RANGES.get(f.name, ("> 0", None, None))
            ok = (v >= lo if lo is not None else v > 0) and (hi is None or v <= hi)
            if not ok:
                raise ConfigError(f"{key}: must be {text}; got {v!r}")
    if isinstance(obj, DistillConfig):
        if obj.kd_weight == 0 and obj.ce_weight == 0:
            raise ConfigError("distill: kd_weight and ce_weight are both 0; nothing to train")
        if obj.temperature <= 0:
            raise ConfigError(f"distill.temperature: must be > 0; got {obj.temperature!r}")
        if obj.targets == "rollouts" and obj.kd_weight != 0:
            raise ConfigError("distill.targets=rollouts (RFT) trains on the student's own samples, which have no "
                              "teacher: set distill.kd_weight=0 distill.ce_weight=1")


def to_dict(obj) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def from_dict(values: dict) -> Config:
    return _build(Config, values or {})


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


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


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field: the text of ``ssb config``."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _hints(cls)[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp) and tp is not DatasetConfig:
            rows += describe(tp, key + ".")
        else:
            rows.append((key, json.dumps(to_dict(default), default=str), f.metadata.get("help", "")))
    return rows
