"""What a stage reads of the config, and the fingerprint made of it. Each stage declares the config fields it reads
(``READS = Reads(...)`` in its module); its fingerprint hashes exactly those values, and it runs on a view of the
config in which reading any other field raises :class:`UndeclaredConfigRead`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ssb.config import ModelConfig
from ssb.configio import to_dict


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs, upstream fingerprints)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]



class UndeclaredConfigRead(RuntimeError):
    """A stage read a config field its :class:`Reads` does not declare: a bug (its fingerprint would miss it)."""


def get_path(cfg: Any, path: str) -> Any:
    """``get_path(cfg, "teach.max_examples") == cfg.teach.max_examples``."""
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


@dataclass(frozen=True)
class Reads:
    """The config fields a stage reads, declared once next to the stage (``READS`` in its module), as dotted paths:
    a section (``"rollout"``) or one field (``"teach.max_examples"``).

    ``result``: what decides the stage's output; its fingerprint is the hash of exactly these values (and of its
    upstream stages' fingerprints). ``how``: read too, but left out of the fingerprint, because they decide only how
    the work runs (engine knobs, ``distill.fsdp``, where local data lives) or enter it in resolved form (evaluate's
    one benchmark and adapter); a ``how`` path inside a ``result`` section is taken out of it.

    The declaration cannot fall behind the code: a stage runs on :meth:`view` of the config, in which reading any
    field outside ``result`` and ``how`` raises :class:`UndeclaredConfigRead`."""

    name: str
    result: tuple[str, ...]
    how: tuple[str, ...] = ()

    def __or__(self, other: "Reads") -> "Reads":
        return Reads(self.name, tuple(dict.fromkeys(self.result + other.result)),
                     tuple(dict.fromkeys(self.how + other.how)))

    def values(self, cfg: Any) -> dict[str, Any]:
        """The ``result`` fields as nested plain data (``{"teach": {"max_examples": 256}, ...}``), without the
        ``how`` fields inside them; the model as :func:`ssb.models.model_identity` gives it (its dtype resolved, a local
        GGUF file by its content)."""
        out: dict[str, Any] = {}
        for path in self.result:
            field = get_path(cfg, path)
            if isinstance(field, ModelConfig):  # the model: what it is (ssb.models.model_identity)
                from ssb.models import model_identity  # here: fingerprints need torch only for the model's dtype

                field = model_identity(field)
            else:
                field = to_dict(field)
            value = json.loads(json.dumps(field, default=str))
            for h in self.how:
                if h.startswith(path + "."):
                    *parents, last = h[len(path) + 1:].split(".")
                    node = value
                    for k in parents:
                        node = node.get(k, {}) if isinstance(node, dict) else {}
                    if isinstance(node, dict):
                        node.pop(last, None)
            *parents, last = path.split(".")
            node = out
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = value
        return out

    def fingerprint(self, cfg: Any, *upstream: Any) -> str:
        """The stage's fingerprint: its name, ``upstream`` (fingerprints, resolved inputs) and :meth:`values`."""
        return fingerprint(self.name, *upstream, self.values(cfg))

    def view(self, cfg: Any) -> "ConfigView":
        return ConfigView(cfg, frozenset(self.result + self.how), self.name)

    def covers(self, key: str) -> bool:
        """Whether changing the leaf field ``key`` changes this stage's fingerprint (upstream aside)."""
        def under(k, paths):
            return any(k == p or k.startswith(p + ".") for p in paths)

        return under(key, self.result) and not any(
            under(key, (h,)) and any(h.startswith(r + ".") for r in self.result) for h in self.how)


class ConfigView:
    """A read-only view of a config (or a section of it) in which only declared paths can be read. A declared
    section or field is returned as the real object; a section only partly declared as another view."""

    __slots__ = ("_obj", "_allowed", "_stage", "_prefix")

    def __init__(self, obj: Any, allowed: frozenset, stage: str, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        path = self._prefix + name
        parts = path.split(".")
        if any(".".join(parts[:i]) in self._allowed for i in range(1, len(parts) + 1)):
            return getattr(self._obj, name)
        if any(a.startswith(path + ".") for a in self._allowed):
            return ConfigView(getattr(self._obj, name), self._allowed, self._stage, path + ".")
        raise UndeclaredConfigRead(f"stage '{self._stage}' reads config field '{path}', which its READS does not "
                                   f"declare (so its fingerprint would not cover it)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's config is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._stage}: {sorted(self._allowed)})"


def config_differences(saved: Any, now: Any) -> list[str]:
    """What differs between a stage's recorded config (its manifest's ``config``) and this command's (both as
    JSON reads them), one ``key: saved then, now now`` per field; empty when the stage recorded none."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return []
    out = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, "(absent)"), b.get(k, "(absent)"), f"{key}.{k}" if key else str(k))
        elif a != b:
            out.append(f"{key}: {a} then, {b} now")

    walk(saved, now, "")
    if "model.dtype: bfloat16 then, float32 now" in out:
        out.append("model.dtype auto is bf16 only on a CPU that multiplies bf16 natively (AMX, AVX512-BF16); "
                   "model.dtype=bfloat16 matches the saved stages here, slowly")
    return [line + " (the stage this one reads was redone or configured differently)"
            if line.startswith("upstream:") else line for line in out]
