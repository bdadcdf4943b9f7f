"""Problem sources: known math benchmarks (hub or offline copies), local files, and a synthetic arithmetic set.

Everything here only reads. `load_problems(DatasetConfig(...))` returns a list of `Problem`s whose `answer`
is the gold *final* answer as a string, exactly as written in the source (GSM8K: the text after ``####``).

Where a known benchmark (gsm8k, math500, aime24, aime25, amc23) is read from, in this order:

1. ``data_dir`` (the config key; else ``$SSB_DATA_DIR``) names a directory holding ``<benchmark>/<split>.jsonl``
   (the layout of ``BENCHMARKS[...]["local"]``): that file, when it exists;
2. otherwise the Hugging Face hub (`BENCHMARKS[...]["hub"]`).

``data_dir=builtin`` (or the path of `BUILTIN_DIR`) is the small slice shipped inside the package
(``ssb/builtin_data``: the first 100 rows of GSM8K train and test, the first 20 of MATH500; see its README). It
exists so the smoke configs and the tests run offline anywhere, and it never stands in for a full benchmark:
it serves only unshuffled requests that fit inside the slice (``limit`` set and ``skip + limit`` <= its rows),
which therefore get exactly the problems the full benchmark would give; any other request (no limit, shuffle,
past the slice, a benchmark or split not bundled) is a `DataError`, never a silent fallback to the hub. Nothing
uses the bundled slice unless ``data_dir`` says so.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssb.choices import GRADERS
from ssb.config import DatasetConfig
from ssb.errors import SsbError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
BUILTIN = "builtin"  # the data_dir value naming BUILTIN_DIR
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_data"


class DataError(SsbError):
    """Bad data source: message is one clear line for the user (file, line number, column)."""


@dataclass
class Problem:
    id: str  # stable id: the source's id column if any, else f"{name}-{row_index}"
    question: str
    answer: str  # gold final answer as a string (GSM8K: the text after '####', commas kept)
    grader: str  # one of GRADERS: which grading rules apply
    solution: str | None = None  # reference solution where the source has one (GSM8K: the worked answer, no '####')


# hub: (id, subset, default split, question/answer/id columns); local: offline copy under the data dir.
BENCHMARKS: dict[str, dict] = {
    "gsm8k": dict(hub="openai/gsm8k", subset="main", split="train", fields=("question", "answer", None),
                  local="gsm8k/{split}.jsonl", local_fields=("question", "answer", None), grader="gsm8k"),
    "math500": dict(hub="HuggingFaceH4/MATH-500", subset=None, split="test",
                    fields=("problem", "answer", "unique_id"), local="math500/test.jsonl",
                    local_fields=("problem", "answer", "unique_id"), grader="math500"),
    "aime24": dict(hub="Maxwell-Jia/AIME_2024", subset=None, split="train", fields=("Problem", "Answer", "ID"),
                   local="aime24/test.jsonl", local_fields=("problem", "answer", "id"), grader="aime"),
    "aime25": dict(hub="math-ai/aime25", subset=None, split="test", fields=("problem", "answer", "id"),
                   local="aime25/test.jsonl", local_fields=("problem", "answer", "id"), grader="aime"),
    "amc23": dict(hub="math-ai/amc23", subset=None, split="test", fields=("question", "answer", "id"),
                  local="amc23/test.jsonl", local_fields=("question", "answer", "id"), grader="math"),
}


def arith_problems(n: int, seed: int = 0) -> list[Problem]:
    """`n` easy single-digit additions ('What is 3 + 5?'), deterministic by seed: the training set of the tiny
    smoke model (:mod:`ssb.tiny` is fitted on exactly this wording)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append(Problem(id=f"arith-{i}", question=f"What is {a} + {b}?", answer=str(a + b), grader="gsm8k"))
    return out


def load_problems(cfg: DatasetConfig, data_dir: str | Path | None = None) -> list[Problem]:
    """Resolve `cfg.name` (local file, offline copy of a known benchmark, or hub) and return its problems."""
    if cfg.skip < 0:
        raise DataError(f"dataset {cfg.name!r}: skip must be >= 0, got {cfg.skip}")
    if cfg.limit is not None and cfg.limit < 0:
        raise DataError(f"dataset {cfg.name!r}: limit must be >= 0, got {cfg.limit}")
    if cfg.grader is not None and cfg.grader not in GRADERS:
        raise DataError(f"dataset {cfg.name!r}: unknown grader {cfg.grader!r} (choose from {', '.join(GRADERS)})")
    if cfg.name == "arith":
        n = 64 if cfg.limit is None else cfg.limit
        probs = arith_problems(n, cfg.seed)
        if cfg.grader:
            for p in probs:
                p.grader = cfg.grader
        return _finish(probs, cfg, "arith", shuffled=False)

    bench = BENCHMARKS.get(cfg.name)
    data_dir = data_dir if data_dir is not None else os.environ.get("SSB_DATA_DIR") or None
    path = Path(cfg.name).expanduser()
    if bench is None and (path.suffix.lower() in LOCAL_SUFFIXES or path.exists()):
        bench_key = path.parent.name if path.parent.name in BENCHMARKS else None  # e.g. data/gsm8k/test.jsonl
        fields = BENCHMARKS[bench_key]["local_fields"] if bench_key else ("question", "answer", None)
        return _from_rows(_read_file(path), cfg, bench_key or path.stem, bench_key, fields)
    if bench is not None:
        split = cfg.split or bench["split"]
        if data_dir is not None:
            root = resolve_data_dir(data_dir)
            rel = bench["local"].format(split=split)
            local = root / rel
            builtin = root.resolve() == BUILTIN_DIR
            if local.is_file():
                rows = _read_file(local)
                if builtin:
                    _check_builtin_request(cfg, rel, len(rows))
                return _from_rows(rows, cfg, cfg.name, cfg.name, bench["local_fields"])
            if builtin:
                have = ", ".join(p.relative_to(BUILTIN_DIR).as_posix() for p in sorted(BUILTIN_DIR.glob("*/*.jsonl")))
                raise DataError(f"data_dir=builtin has no {rel} for {cfg.name} (bundled slices: {have}); point "
                                f"data_dir (or $SSB_DATA_DIR) at local copies, or unset it to read the hub")
        rows = _read_hub(bench["hub"], cfg.subset or bench["subset"], split)
        return _from_rows(rows, cfg, cfg.name, cfg.name, bench["fields"])
    if "/" not in cfg.name:
        raise DataError(f"unknown dataset {cfg.name!r}: use one of {', '.join([*BENCHMARKS, 'arith'])}, "
                        f"a hub id like 'openai/gsm8k', or a .jsonl/.json/.parquet file")
    rows = _read_hub(cfg.name, cfg.subset, cfg.split or "train")
    return _from_rows(rows, cfg, cfg.name.rsplit("/", 1)[-1], None, ("question", "answer", None))


def resolve_data_dir(data_dir: str | Path) -> Path:
    """The directory a ``data_dir`` value names: 'builtin' -> `BUILTIN_DIR`, anything else a path."""
    return BUILTIN_DIR if str(data_dir) == BUILTIN else Path(data_dir).expanduser()


def _check_builtin_request(cfg: DatasetConfig, rel: str, n: int) -> None:
    """A bundled slice serves only what the full benchmark would give: unshuffled, inside its first `n` rows."""
    if cfg.shuffle:
        why = "shuffle=true (a shuffled slice is not the benchmark shuffled)"
    elif cfg.limit is None:
        why = "no limit (that means the whole benchmark)"
    elif cfg.skip + cfg.limit > n:
        why = f"skip {cfg.skip} + limit {cfg.limit} > {n}"
    else:
        return
    raise DataError(f"data_dir=builtin holds only the first {n} rows of {rel}, for unshuffled requests "
                    f"with skip + limit <= {n}; got {why}. For the full benchmark point data_dir (or $SSB_DATA_DIR) "
                    f"at local copies, or unset it to read the hub")


# ---------------------------------------------------------------- readers: yield (where, row) pairs


def _read_file(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad source
            raise DataError(f"{path}: cannot read parquet: {_one_line(e)}") from e
        return [(f"{path} row {i}", r) for i, r in enumerate(rows)]
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": JSON Lines content in a .json file
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
        else:
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines)")
            return [(f"{path} item {i}", r) for i, r in enumerate(data)]
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON line: {e.msg} (column {e.colno})") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{lineno}", row))
    return rows


def _read_hub(hub_id: str, subset: str | None, split: str) -> list[tuple[str, dict]]:
    import datasets  # lazy: heavy import, and only needed for the hub

    try:
        ds = datasets.load_dataset(hub_id, subset, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth, bad name/split: all one-line user errors
        raise DataError(f"hub dataset {hub_id!r} (subset {subset}, split {split!r}) could not be loaded: "
                        f"{_one_line(e)} (offline? point SSB_DATA_DIR at local copies)") from e
    return [(f"hub {hub_id}[{split}] row {i}", dict(r)) for i, r in enumerate(ds)]


# ---------------------------------------------------------------- rows -> problems


def _from_rows(rows: list[tuple[str, dict]], cfg: DatasetConfig, tag: str, bench_key: str | None,
               defaults: tuple[str | None, str | None, str | None]) -> list[Problem]:
    q_def, a_def, id_def = defaults
    grader = cfg.grader or (BENCHMARKS[bench_key]["grader"] if bench_key else "math")
    gsm8k_solution = bench_key == "gsm8k"  # known GSM8K copies: answer is a worked solution ending '#### N'
    out = []
    for i, (where, row) in enumerate(rows):
        if cfg.question_field:
            q_col = cfg.question_field
        else:
            q_col = next((c for c in (q_def, "question", "problem") if c in row), q_def)
        question = _text(_get(row, q_col, where))
        answer = _text(_get(row, cfg.answer_field or a_def, where))
        solution = _text(row.get("solution")) or None
        if gsm8k_solution or (grader == "gsm8k" and "####" in answer):
            if "####" not in answer:
                raise DataError(f"{where}: GSM8K answer has no '#### <final answer>' line: {answer[-80:]!r}")
            worked, answer = (t.strip() for t in answer.rsplit("####", 1))
            solution = _CALCULATOR.sub("", worked) or solution
        if not answer:
            raise DataError(f"{where}: empty answer in row {_short(row)}")
        if not question:
            raise DataError(f"{where}: empty question in row {_short(row)}")
        id_col = cfg.id_field or next((c for c in (id_def, "id") if c and c in row), None)
        pid = _text(_get(row, id_col, where)) if id_col else ""
        out.append(Problem(id=pid or f"{tag}-{i}", question=question, answer=answer, grader=grader,
                           solution=solution))
    return _finish(out, cfg, tag, shuffled=cfg.shuffle)


def _finish(probs: list[Problem], cfg: DatasetConfig, tag: str, shuffled: bool) -> list[Problem]:
    if shuffled:
        random.Random(cfg.seed).shuffle(probs)
    if cfg.skip:
        probs = probs[cfg.skip:]
    if cfg.limit is not None:
        probs = probs[: cfg.limit]
    if not probs:
        raise DataError(f"dataset {tag!r} has no problems" + (f" (limit={cfg.limit})" if cfg.limit is not None
                                                              else " (empty source)"))
    return probs


_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24


def _get(row: dict, col: str, where: str) -> Any:
    if col not in row:
        raise DataError(f"{where}: missing column {col!r} (available: {', '.join(map(str, row)) or 'none'})")
    return row[col]


def _text(v: Any) -> str:
    """Source value -> string, numbers as written (AIME ints -> '204'; 27.0 -> '27')."""
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _short(row: dict, n: int = 160) -> str:
    s = json.dumps(row, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")
