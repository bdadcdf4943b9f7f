"""Atomic writes: a file or a directory appears at its path whole, or not at all.

Three ways, one scheme: :func:`writing` (a file, replaced), :func:`publishing` (a directory, replaced: an adapter,
a checkpoint, an export) and :func:`publish_once` (a shared cache directory several processes may build at once:
the first finished copy stays).

Both are written under a temp name beside the target, ``.<name>.<pid>.tmp`` (per process: torchrun ranks may write
the same file), flushed to disk, and renamed over the target in one step. If anything fails on the way (a full
disk, say), the temp is removed and the error names the path that was being written:
``cannot write runs/x/curate/pairs.jsonl: No space left on device``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from ssb.errors import SsbError


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_error(path: Path, e: OSError) -> SsbError:
    """An OS error met while writing ``path``, as a user error that names the path (and the file the error was
    about, where that is another one than ``path`` or its temp)."""
    other = e.filename and not os.path.basename(str(e.filename)).startswith((Path(path).name, f".{Path(path).name}."))
    return SsbError(f"cannot write {path}: {e.strerror or e}" + (f" ({e.filename})" if other else ""))


@contextmanager
def writing(path: Path, binary: bool = False) -> Iterator[IO]:
    """``with writing(path) as f: f.write(...)``: ``path`` is replaced by what was written when the block ends, and
    left as it was if the block raises."""
    path, tmp = Path(path), temp_path(path)
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise


def write_text(path: Path, text: str) -> None:
    with writing(path) as f:
        f.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with writing(path, binary=True) as f:
        f.write(data)


@contextmanager
def publishing(out: Path) -> Iterator[Path]:
    """``with publishing(out) as tmp: save(tmp)``: a directory built in ``tmp`` replaces ``out`` (any old one) in one
    rename when the block ends; if the block raises, ``tmp`` is removed and ``out`` is left as it was."""
    out, tmp = Path(out), temp_path(out)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(out, e) from e
        raise


def publish_once(out: Path, build: Callable[[Path], None], done: Callable[[Path], bool]) -> Path:
    """Build a cache directory with ``build(tmp)`` in a temp beside ``out`` and rename it into place, unless another
    process finished ``out`` first (``done(out)``: then its copy stays and this one is dropped); an unfinished
    leftover at ``out`` is replaced. The temp is removed whatever happens. Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not done(out):  # not a finished copy from another process: a stale leftover
                shutil.rmtree(out, ignore_errors=True)
                try:
                    os.rename(tmp, out)
                except OSError:
                    if not done(out):
                        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the race loser's copy, or a failed build
    return out
