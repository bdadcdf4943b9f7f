"""The run directory's lock: one process at a time.

Every command that works on a run directory holds ``RUN_DIR/.lock`` (an exclusive ``fcntl.flock``) while it runs,
and so does every stage entry point called as a library (:func:`ssb.rundir.locking`); a second process is refused
with one line naming the holder (pid, host, start time, command), which is written into the lock file. The operating
system drops the lock when its process dies, so a lock file left by a dead process is stale and simply taken over. A
stage reached through a symbolic link (``R/sft/teach -> ../ssb/teach``, see :mod:`ssb.compare`) also locks the run
directory that holds it. Within one process the lock is reentrant. Under torchrun only rank 0 takes it, for the
whole job (the other ranks are its workers, not rivals; keying the lock by job id would add nothing): the command
line shares rank 0's outcome with every rank, so a refused job exits 2 on all of them. Where the file system has no
``flock`` (some network mounts) a warning says the directory is unlocked and the command goes on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from ssb import dist
from ssb.errors import SsbError

LOCK = ".lock"

_HELD: dict[str, list] = {}  # resolved run directory -> [lock file descriptor, reentrancy count]


def _holder_line(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h.get("pid"):
        return "another process (its details are not written yet)"
    cmd = f" ({h['command']})" if h.get("command") else ""
    return f"pid {h['pid']} on host {h.get('host', '?')} since {h.get('started_at', '?')}{cmd}"


def _acquire(run_dir: Path) -> None:
    """Take ``run_dir``'s lock for this process, or raise SsbError naming the holder. Reentrant."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SsbError(f"run directory {run_dir} is not a directory (a file is in the way)") from None
    except OSError as e:
        raise SsbError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    key = str(run_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    path = run_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SsbError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: run unlocked
            break
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SsbError(f"run directory {run_dir} is in use by {_holder_line(path)}; wait for it to finish "
                               f"or stop it, or use another --run-dir") from None
            print(f"ssb: warning: cannot lock {path} ({e.strerror}); nothing stops a second process on this run "
                  f"directory", file=sys.stderr)
            fd = None
            break
        try:  # the file we locked must still be the one at `path` (a remover may have raced us)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if fd is not None:
        holder = {"pid": os.getpid(), "host": platform.node(), "started_at": _now(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _HELD[key] = [fd, 1]


def _release(run_dir: Path, remove: bool = False) -> None:
    """Drop one hold of ``run_dir``'s lock; the last one closes it (and, with ``remove``, deletes the lock file
    first: a contender that opened the old file notices and retries, see :func:`_acquire`)."""
    key = str(Path(run_dir).resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        if remove:
            with contextlib.suppress(OSError):
                (Path(run_dir) / LOCK).unlink()
        if held[0] is not None:
            os.close(held[0])  # drops the flock


def lock_scope(run_dir: Path) -> list[Path]:
    """The run directories a command on ``run_dir`` must lock: ``run_dir`` and those holding the stage
    directories it links to."""
    run_dir = Path(run_dir)
    out = [run_dir]
    if run_dir.is_dir():
        for entry in sorted(run_dir.iterdir()):
            if entry.is_symlink() and entry.is_dir():
                owner = entry.resolve().parent
                if owner not in [p.resolve() for p in out]:
                    out.append(owner)
    return out


@contextlib.contextmanager
def locked(*run_dirs, collective: bool = False):
    """Hold the locks of ``run_dirs`` (and of the run directories their stage links point into) while the block
    runs. Under torchrun only rank 0 locks; with ``collective`` (every rank calls this together, as the command
    line does) the outcome is shared, so every rank raises if rank 0 could not lock.

    If the block fails, what this added is taken away again: a lock file it created, and a run directory it
    created if nothing else is in it. A refused or failed command leaves the run directory as it found it."""
    taken: list[tuple[Path, bool]] = []  # (run dir, whether this created its lock file)
    created: list[Path] = []
    error: SsbError | None = None
    if dist.is_main():
        try:
            for d in run_dirs:
                for p in lock_scope(Path(d)):
                    if not p.exists():
                        created.append(p)
                    new_file = not (p / LOCK).exists()
                    _acquire(p)
                    taken.append((p, new_file))
        except SsbError as e:
            error = e
    if collective and dist.world() > 1:
        import torch

        if int(dist.all_reduce_sum(torch.tensor(0 if error is None else 1))) and error is None:
            error = SsbError("rank 0 could not lock the run directory (see its error)")
            error.quiet = True
    ok = False
    try:
        if error is not None:
            raise error
        yield
        ok = True
    finally:
        for p, new_file in reversed(taken):
            _release(p, remove=new_file and not ok)
        if not ok:
            for p in created:
                _remove_if_empty(p)


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if str(path.resolve()) not in _HELD and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
