"""The run directory: how stages meet. Each stage owns ``RUN_DIR/<stage>/``, appends its rows there as JSONL as it
goes, and writes ``manifest.json`` last. A stage is *done* exactly when its manifest exists.

Layout and row schemas are documented in README.md ("Run directory"). The rules:

- ``started.json`` is written when a stage begins work, with the fingerprint of everything that determines its
  output (its config section, the model, the seed, and its inputs' manifests' fingerprints).
- Rerunning a done stage with the same fingerprint does nothing. A different fingerprint is an error that tells the
  user to pass ``--force`` (which deletes the stage directory and starts over); results are never silently mixed.
- An interrupted stage (``started.json`` but no manifest) resumes: rows already written are kept (a torn last line
  is cut off), and only the missing work is done.
- Rows are appended with one ``write`` + ``fsync`` per batch, so a crash loses at most the batch in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from ssb import dist
from ssb.errors import SsbError

MANIFEST = "manifest.json"
STARTED = "started.json"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: write a temp file and rename it over ``path``. Dataclasses (configs) are written as mappings."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


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
    with open(path, "a", encoding="utf-8") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Read JSON lines. A torn last line (a crash mid-write) is dropped, and cut from the file if ``repair``.
    Any other malformed line is an error naming the file and line number."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
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
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_bytes)
                break
            raise SsbError(f"{path}:{i + 1}: malformed JSON line") from None
        good_bytes += len(line) + 1
    return rows


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    append_rows(tmp, rows)
    tmp.touch()
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("ssb", "torch", "transformers", "peft", "datasets", "math_verify", "vllm", "trl"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def gpus_in_use() -> int:
    """GPUs this process has initialised (0 on CPU): the multiplier of wall time in a stage's cost."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun every rank is one GPU
    return max(world, 1)


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Stage:
    """One stage's directory and its done / resume / changed-config bookkeeping."""

    def __init__(self, run_dir: str | Path, name: str, fingerprint: str, config: Any = None, force: bool = False):
        self.run_dir = Path(run_dir)
        self.name = name
        self.dir = self.run_dir / name
        self.fingerprint = fingerprint
        self.config = config
        self.force = force
        self._t0 = time.time()

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def manifest(self) -> dict | None:
        p = self.path(MANIFEST)
        return read_json(p) if p.exists() else None

    def is_done(self) -> bool:
        """True if finished with this fingerprint. Raises if finished or begun with a different one."""
        for fname, what in ((MANIFEST, "finished"), (STARTED, "started")):
            p = self.path(fname)
            if not p.exists():
                continue
            if self.force:
                dist.barrier()  # every rank has looked before rank 0 deletes
                if dist.is_main():
                    shutil.rmtree(self.dir)
                dist.barrier()
                return False
            old = read_json(p).get("fingerprint")
            if old != self.fingerprint:
                raise SsbError(
                    f"{self.dir} was {what} with a different configuration (fingerprint {old} != {self.fingerprint}); "
                    f"rerun with --force to discard it and redo this stage (and those after it), or use another --run-dir"
                )
            return fname == MANIFEST
        return False

    def begin(self) -> None:
        if dist.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.path(STARTED).exists():
                write_json(self.path(STARTED), {"fingerprint": self.fingerprint, "started_at": _now()})
        dist.barrier()

    def finish(self, counts: dict[str, Any], wall_seconds: float | None = None, **extra: Any) -> dict:
        """Write the manifest. ``wall_seconds``: this stage's own time where it shared a process with other stages
        (the budgeted waves); default: since this object was made."""
        started = read_json(self.path(STARTED)) if self.path(STARTED).exists() else {}
        wall = time.time() - self._t0 if wall_seconds is None else wall_seconds
        gpus = gpus_in_use()
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "counts": counts,
            "wall_seconds": round(wall, 3),
            "gpus": gpus,
            "gpu_seconds": round(wall * gpus, 3),
            "started_at": started.get("started_at"),
            "finished_at": _now(),
            "versions": versions(),
            "git_commit": git_commit(),
            "host": platform.node(),
            "config": self.config,
            **extra,
        }
        if dist.is_main():  # under data parallelism rank 0 writes for all; the others wait for it
            write_json(self.path(MANIFEST), manifest)  # last: its existence means "done"
        dist.barrier()
        return self.manifest


def require_done(run_dir: str | Path, name: str) -> dict:
    """The manifest of an upstream stage, or a clear error telling the user to run it first."""
    p = Path(run_dir) / name / MANIFEST
    if not p.exists():
        raise SsbError(f"stage '{name}' has not finished in {run_dir}: run `ssb {name} --run-dir {run_dir}` first")
    return read_json(p)


def batches(items: list, size: int) -> Iterator[tuple[int, list]]:
    for i in range(0, len(items), size):
        yield i // size, items[i : i + size]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
