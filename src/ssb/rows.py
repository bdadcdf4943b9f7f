"""Files of rows: JSON lines appended batch by batch, read back (a torn last line repaired), written whole, and
split into per-rank part files under data parallelism; JSON documents, written atomically.

- Rows are appended with one ``write`` + ``fsync`` per batch, so a crash loses at most the batch in flight; its torn
  last line is dropped when the file is read (and cut off with ``repair``, before a resumed stage appends again).
- Whole files (a JSONL file, a JSON document) are written to a temp file and renamed over the old one
  (:mod:`ssb.atomic`); a failed write, appends included, is an error naming the file.
- Under data parallelism each rank appends to its own part file ``<name>.part<rank>`` (:func:`own_part`); rank 0
  reads them all (:func:`read_with_parts`) and folds them into the one file (:func:`merge_parts`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ssb import dist
from ssb.atomic import write_error, write_text, writing
from ssb.errors import SsbError


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (dataclasses as dicts, tuples as lists, anything else as its text)."""
    return json.loads(json.dumps(obj, default=_jsonable))


def write_json(path: Path, obj: Any) -> None:
    """Atomic (:func:`ssb.atomic.write_text`). Dataclasses (configs) are written as mappings."""
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SsbError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise SsbError(f"{path}: not valid JSON ({e})") from None


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append rows as JSON lines in one write, then flush to disk."""
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not blob:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from e


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Read JSON lines. A torn last line (a crash mid-write) is dropped, and cut from the file if ``repair``.
    Any other malformed line is an error naming the file and line number."""
    path = Path(path)
    if not path.exists():
        return []
    rows, good_bytes, torn = parse_rows(path.read_bytes(), path)
    if torn and repair:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return rows


def parse_rows(data: bytes, path: Path) -> tuple[list[dict], int, bool]:
    """(rows, bytes of whole lines, whether the last line is torn)."""
    lines = data.split(b"\n")
    rows, good_bytes = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no trailing newline: torn write
                return rows, good_bytes, True
            raise SsbError(f"{path}:{i + 1}: malformed JSON line") from None
        good_bytes += len(line) + 1
    return rows, good_bytes, False


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically (:func:`ssb.atomic.writing`)."""
    with writing(path) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def own_part(path: Path) -> Path:
    """The file this process appends ``path``'s rows to: ``path`` itself, or under data parallelism its rank's part
    file ``<name>.part<rank>`` (ranks never write one file together; rank 0 merges the parts with
    :func:`merge_parts`)."""
    return path if dist.world() == 1 else path.with_name(f"{path.name}.part{dist.rank()}")


def part_files(path: Path) -> list[Path]:
    """``path``'s part files (``<name>.part*``, of any rank count), sorted."""
    return sorted(path.parent.glob(f"{path.name}.part*"))


def read_with_parts(path: Path, repair: bool = False) -> list[dict]:
    """The rows of ``path`` followed by those of each of its part files (see :func:`read_rows` for ``repair``)."""
    return [r for p in [path, *part_files(path)] for r in read_rows(p, repair=repair)]


def merge_parts(path: Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` (the merged rows of ``path`` and its parts) as ``path``, atomically, then delete the parts."""
    parts = part_files(path)
    write_rows(path, rows)
    for p in parts:
        p.unlink()
