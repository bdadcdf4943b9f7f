"""On-disk cache of a top-k teacher signal (``distill.teacher=topk``): per reply token, the teacher's k most likely
token ids, their log-probabilities and the log of the remaining mass, at a fixed temperature.

Schema (a directory, by default ``RUN_DIR/distill/teacher_topk/``)::

    index.json                    written atomically (temp file + rename) after each shard; the source of truth
      {"format": "ssb-teacher-topk", "version": 1,
       "k": 64,                   top-k kept per token
       "temperature": 2.0,        T_c: values are top-k of log_softmax(teacher_logits / T_c)
       "value_dtype": "float16",  dtype of `logprobs` (float16 or bfloat16)
       "fingerprint": "...",      what the teacher signal depends on (inputs, model, k, T_c); set by the caller
       "complete": false,         true once the writer's finish() ran (every example written)
       "shards": [{"file": "shard-00000.safetensors", "examples": ["id", ...], "tokens": [n_0, ...]}, ...]}
    shard-00000.safetensors       one per batch of examples; tensors (T = total tokens of the shard's examples):
      logprobs  (T, k) value_dtype   top-k log-probs at T_c, sorted descending per row
      ids       (T, k) int32         their token ids (distinct per row)
      tail      (T,)   float32       log(1 - sum(exp(logprobs))) computed in fp32 before rounding; -inf if k == V
    Rows are the examples' reply tokens, example after example in the order of ``examples``, ``tokens[i]`` rows each.

Payload per token: ``k * (2 + 4) + 4`` bytes (388 at k=64) against ``V * 4`` for full fp32 logits (607,744 at
V=151,936). Resumability: a shard file is written to a temp name, fsynced and renamed, and only then listed in the
index; a crash loses at most the shard in flight (its stray file is ignored and overwritten). An example appears in
at most one listed shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save

from ssb.atomic import write_bytes
from ssb.errors import SsbError
from ssb.rows import write_json

FORMAT, VERSION, INDEX = "ssb-teacher-topk", 1, "index.json"
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["TopkCacheWriter", "TopkCacheReader", "bytes_per_token", "check_existing"]


def bytes_per_token(k: int, value_dtype: str = "float16") -> int:
    """Stored payload bytes per reply token: k values + k int32 ids + one fp32 tail."""
    return k * (VALUE_DTYPES[value_dtype].itemsize + 4) + 4


def _read_index(path: Path) -> dict | None:
    p = Path(path) / INDEX
    if not p.exists():
        return None
    try:
        index = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SsbError(f"{p}: not valid JSON ({e}); delete {path} to rebuild the teacher cache") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise SsbError(f"{p}: not a version-{VERSION} {FORMAT} index; delete {path} to rebuild the teacher cache")
    return index


def check_compatible(index: dict, path: Path, k: int, temperature: float, fingerprint: str | None = None) -> None:
    """Raise SsbError (one line) if a cache was built for another k, temperature or fingerprint."""
    if index["k"] != k:
        raise SsbError(f"teacher cache {path} was built with k={index['k']}, but distill.topk={k}; delete it or "
                       f"rerun distill with --force")
    if float(index["temperature"]) != float(temperature):
        raise SsbError(f"teacher cache {path} was built at temperature {index['temperature']}, but "
                       f"distill.temperature={temperature}; delete it or rerun distill with --force")
    if fingerprint is not None and index.get("fingerprint") != fingerprint:
        raise SsbError(f"teacher cache {path} was built for other inputs (fingerprint {index.get('fingerprint')} != "
                       f"{fingerprint}); delete it or rerun distill with --force")


def check_existing(path: str | Path, k: int, temperature: float, fingerprint: str | None = None) -> None:
    """Refuse (SsbError) an existing cache at ``path`` built for another k, temperature or fingerprint; a missing
    cache is fine. Cheap: reads only the index, so callers can check before loading a model."""
    index = _read_index(Path(path))
    if index is not None:
        check_compatible(index, Path(path), k, temperature, fingerprint)


class TopkCacheWriter:
    """Append-only writer. Reopening a directory resumes it: ``done`` holds the ids already written."""

    def __init__(self, path: str | Path, k: int, temperature: float, value_dtype: str = "float16",
                 fingerprint: str = ""):
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {list(VALUE_DTYPES)}, got {value_dtype!r}")
        if not (isinstance(k, int) and k > 0):
            raise ValueError(f"k must be an int > 0, got {k!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        index = _read_index(self.path)
        if index is None:
            index = {"format": FORMAT, "version": VERSION, "k": k, "temperature": float(temperature),
                     "value_dtype": value_dtype, "fingerprint": fingerprint, "complete": False, "shards": []}
        else:
            check_compatible(index, self.path, k, temperature, fingerprint)
            if index["value_dtype"] != value_dtype:
                raise SsbError(f"teacher cache {self.path} stores {index['value_dtype']}, not {value_dtype}; delete it")
        self.index = index
        self.done = {e for s in index["shards"] for e in s["examples"]}

    @property
    def complete(self) -> bool:
        return bool(self.index["complete"])

    def write_shard(self, example_ids: list[str], logprobs: list[torch.Tensor], ids: list[torch.Tensor],
                    tails: list[torch.Tensor]) -> None:
        """One shard: per example, (n_i, k) log-probs, (n_i, k) ids and (n_i,) tail log-masses."""
        if not (len(example_ids) == len(logprobs) == len(ids) == len(tails)) or not example_ids:
            raise ValueError("write_shard needs one (logprobs, ids, tail) triple per example id, at least one")
        if len(set(example_ids)) != len(example_ids) or self.done & set(example_ids):
            raise ValueError(f"example ids must be new and distinct: {example_ids}")
        k = self.index["k"]
        for lp, i, t in zip(logprobs, ids, tails):
            if lp.dim() != 2 or lp.shape[1] != k or i.shape != lp.shape or t.shape != lp.shape[:1]:
                raise ValueError(f"expected (n, {k}) logprobs/ids and (n,) tail, got {tuple(lp.shape)}, "
                                 f"{tuple(i.shape)}, {tuple(t.shape)}")
        name = f"shard-{len(self.index['shards']):05d}.safetensors"
        tensors = {"logprobs": torch.cat(logprobs).to(VALUE_DTYPES[self.index["value_dtype"]]).contiguous(),
                   "ids": torch.cat(ids).to(torch.int32).contiguous(),
                   "tail": torch.cat(tails).float().contiguous()}
        write_bytes(self.path / name, save({n: t.cpu() for n, t in tensors.items()}))
        entry = {"file": name, "examples": list(example_ids), "tokens": [int(lp.shape[0]) for lp in logprobs]}
        index = {**self.index, "shards": self.index["shards"] + [entry]}
        write_json(self.path / INDEX, index)  # the shard counts from here on
        self.index = index
        self.done.update(example_ids)

    def finish(self) -> None:
        self.index["complete"] = True
        write_json(self.path / INDEX, self.index)


class TopkCacheReader:
    """Random access by example id: ``reader[id]`` -> (logprobs (n, k) value dtype, ids (n, k) int32, tail (n,) fp32).
    Only the requested rows are read (safetensors slices of memory-mapped shards)."""

    def __init__(self, path: str | Path, k: int | None = None, temperature: float | None = None,
                 fingerprint: str | None = None):
        self.path = Path(path)
        index = _read_index(self.path)
        if index is None:
            raise SsbError(f"no teacher cache at {self.path} (missing {INDEX})")
        if not index["complete"]:
            raise SsbError(f"teacher cache {self.path} is incomplete (its build was interrupted); rerun distill")
        check_compatible(index, self.path, index["k"] if k is None else k,
                         index["temperature"] if temperature is None else temperature, fingerprint)
        self.index, self.k, self.temperature = index, index["k"], float(index["temperature"])
        self._where: dict[str, tuple[str, int, int]] = {}
        for shard in index["shards"]:
            start = 0
            for ex, n in zip(shard["examples"], shard["tokens"]):
                self._where[ex] = (shard["file"], start, start + n)
                start += n
        self._files: dict[str, object] = {}

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def tokens(self, example_id: str) -> int:
        _, a, b = self._where[example_id]
        return b - a

    @property
    def total_tokens(self) -> int:
        return sum(b - a for _, a, b in self._where.values())

    def __getitem__(self, example_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if example_id not in self._where:
            raise KeyError(f"example {example_id!r} is not in the teacher cache {self.path}")
        name, a, b = self._where[example_id]
        if name not in self._files:
            self._files[name] = safe_open(str(self.path / name), framework="pt")
        f = self._files[name]
        return tuple(f.get_slice(t)[a:b] for t in ("logprobs", "ids", "tail"))

    def batch(self, example_ids: Iterable[str], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows of several examples concatenated in order (as the loss gathers reply tokens), on ``device``."""
        parts = [self[e] for e in example_ids]
        return tuple(torch.cat([p[j] for p in parts]).to(device) for j in range(3))

    def stored_bytes(self) -> int:
        """Bytes of the shard files on disk (payload + safetensors headers)."""
        return sum((self.path / s["file"]).stat().st_size for s in self.index["shards"])
