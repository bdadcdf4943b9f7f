"""The run directory: how stages meet. Each stage owns ``RUN_DIR/<stage>/``, appends its rows there as JSONL as it
goes, and writes ``manifest.json`` last. A stage is *done* exactly when its manifest exists.

Layout and row schemas are documented in README.md ("Run directory"). The rules:

- **Errors of the user's making** (a run directory that is a file, a read-only or full file system, another
  process holding the lock) are :class:`ssb.errors.SsbError` or ``OSError``, which the command line prints as one
  line with exit status 2.
- **One process at a time.** Every command that works on a run directory holds ``RUN_DIR/.lock`` while it runs,
  and so does every stage entry point called as a library (:func:`locking`); a second process is refused with one
  line naming the holder. See :mod:`ssb.lock`.
- ``started.json`` is written when a stage begins work, with the fingerprint of everything that determines its
  output: the config fields the stage declares it reads (``READS`` in its module, :class:`ssb.reads.Reads`; the
  stage runs on a view of the config that refuses any other field) and its inputs' fingerprints. A stage begins
  only once its inputs are read and checked and its model has loaded (:meth:`Stage.begin`): a command that fails
  before that (a mistyped model path, a torn input) leaves no trace.
- Rerunning a done stage with the same fingerprint does nothing. A different fingerprint is an error that tells the
  user to pass ``--force`` (which deletes the stage directory and starts over: :meth:`Stage.discard_if_forced`);
  results are never silently mixed. The command line checks every stage it was asked to run before any of them
  starts, and saves ``config.yaml`` only once a stage begins, so a refused command changes nothing.
- An interrupted stage (``started.json`` but no manifest) resumes: rows already written are kept (a torn last line
  is cut off), and only the missing work is done.
- Rows are appended with one ``write`` + ``fsync`` per batch, so a crash loses at most the batch in flight (see
  :mod:`ssb.rows`).
- **Inputs are verified.** At finish the manifest records every file of the stage (``files``: name -> rows for
  JSONL, bytes, sha256). A stage reading an upstream stage's file goes through :func:`read_upstream` /
  :func:`verify_upstream`, which refuse, naming the file, anything that differs from what the manifest recorded
  (a truncated, edited or missing file).
- **Cost adds up.** Each process that works on a stage (an *attempt*) keeps its wall time, device count and
  counters (generated tokens, ...) in ``<stage>/cost.json`` (``cost.rank<r>.json`` for torchrun's other ranks),
  updated as it goes and when it stops; the manifest's ``wall_seconds``, ``gpu_seconds``, ``cpu_seconds`` and
  counters are sums over every attempt, so a resumed stage costs what all its processes cost together, and its
  ``peak_rss_bytes`` / ``peak_gpu_bytes`` the highest any attempt reached (:mod:`ssb.usage`). The exception is
  grpo, which records its own seconds, carried through its TRL checkpoints (:meth:`Stage.finish`'s extra keys).
- **Which stages exist** and what each reads and writes: the registry, :data:`ssb.stages.STAGES`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ssb import dist, usage
from ssb.atomic import write_text
from ssb.errors import SsbError
from ssb.lock import locked
from ssb.provenance import git_commit, gpus_in_use, machine, versions
from ssb.reads import config_differences
from ssb.rows import parse_rows, plain, read_json, write_json

__all__ = [  # the run directory's API (rows are ssb.rows', the lock ssb.lock's, provenance ssb.provenance's)
    "MANIFEST", "STARTED", "COST", "BOOKKEEPING", "Stage", "locking", "require_done",
    "read_upstream", "verify_upstream", "file_record", "write_on_begin", "flush_deferred", "batches",
]

MANIFEST = "manifest.json"
STARTED = "started.json"
COST = "cost.json"
BOOKKEEPING = (MANIFEST, STARTED)  # a stage's files that are not its outputs (also cost*.json and dotfiles)


# ---------------------------------------------------------------------------------------------------- files

def file_record(path: Path) -> dict:
    """``{"bytes", "sha256"}`` of a file, plus ``rows`` (JSON lines) for ``.jsonl``."""
    data = Path(path).read_bytes()
    out = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if path.suffix == ".jsonl":
        out["rows"] = len(parse_rows(data, path)[0])
    return out


def _output_files(stage_dir: Path) -> dict[str, dict]:
    """Every output file of a stage directory (relative posix name -> :func:`file_record`): all files but the
    manifest, ``started.json``, cost ledgers and dotfiles (temp files, the lock)."""
    out = {}
    for root, dirs, files in os.walk(stage_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            rel = Path(root, name).relative_to(stage_dir).as_posix()
            if name.startswith(".") or rel in BOOKKEEPING or (root == str(stage_dir) and _is_ledger(name)):
                continue
            out[rel] = file_record(Path(root, name))
    return out


def _is_ledger(name: str) -> bool:
    return name == COST or (name.startswith("cost.rank") and name.endswith(".json"))


def require_done(run_dir: str | Path, name: str) -> dict:
    """The manifest of an upstream stage, or a clear error telling the user to run it first."""
    p = Path(run_dir) / name / MANIFEST
    if not p.exists():
        raise SsbError(f"stage '{name}' has not finished in {run_dir}: run `ssb {name} --run-dir {run_dir}` first")
    return read_json(p)


def _check(run_dir: Path, stage: str, name: str, manifest: dict, data: bytes | None) -> None:
    """Raise unless ``data`` (the bytes of ``stage``'s file ``name``, or None if missing) is what the manifest
    recorded. Manifests written before files were recorded are trusted as they are."""
    files = manifest.get("files")
    if files is None:
        return
    path = Path(run_dir) / stage / name
    redo = f"rerun `ssb {stage} --force --run-dir {run_dir}` (and the stages after it) to redo it"
    want = files.get(name)
    if want is None:
        raise SsbError(f"{path}: not among the files stage '{stage}' finished with; {redo}")
    if data is None:
        raise SsbError(f"{path}: missing, but stage '{stage}' finished with it; restore it or {redo}")
    if hashlib.sha256(data).hexdigest() != want["sha256"]:
        if "rows" in want:
            now = f"{len(parse_rows(data, path)[0])} rows, the manifest {want['rows']}"
        else:
            now = f"{len(data)} bytes, the manifest {want['bytes']}"
        raise SsbError(f"{path} has changed since stage '{stage}' finished ({now}; the content differs): restore "
                       f"it or {redo}")


def read_upstream(run_dir: str | Path, stage: str, name: str) -> list[dict]:
    """The rows of upstream ``stage``'s JSONL file ``name``, after checking them against its manifest (which
    must exist): a truncated, edited or missing file is refused with one line naming it."""
    manifest = require_done(run_dir, stage)
    path = Path(run_dir) / stage / name
    data = path.read_bytes() if path.exists() else None
    _check(Path(run_dir), stage, name, manifest, data)
    return parse_rows(data, path)[0] if data is not None else []


def verify_upstream(run_dir: str | Path, stage: str, prefix: str = "") -> dict:
    """Check every file of finished ``stage`` whose name starts with ``prefix`` (e.g. ``adapter/``) against its
    manifest; returns the manifest."""
    manifest = require_done(run_dir, stage)
    for name in (manifest.get("files") or {}):
        if name.startswith(prefix):
            path = Path(run_dir) / stage / name
            _check(Path(run_dir), stage, name, manifest, path.read_bytes() if path.exists() else None)
    return manifest


# ---------------------------------------------------------------------------------------------------- stages

_ACTIVE: set = set()  # stages this process has begun and not finished (their cost is recorded on errors)
_DEFERRED: dict[str, tuple[Path, str]] = {}  # resolved run dir -> (file, text) to write when a stage begins


def locking(run):
    """Decorator of a stage entry point ``run(cfg, run_dir, ...)``: it holds the run directory's lock while it
    runs (a no-op when the command line already holds it)."""

    @functools.wraps(run)
    def wrapper(cfg, run_dir, *args, **kwargs):
        with locked(run_dir):
            try:
                return run(cfg, run_dir, *args, **kwargs)
            except BaseException:
                for stage in list(_ACTIVE):  # an error or Ctrl-C: the time spent so far still counts
                    stage.record()
                raise

    return wrapper


def write_on_begin(run_dir: Path, name: str, text: str | None) -> None:
    """Write ``RUN_DIR/name`` when the first stage of ``run_dir`` begins (or at once when ``flush_deferred`` is
    called); ``None`` cancels. The command line saves ``config.yaml`` this way, so that a command refused or failed
    before any stage began leaves no new config behind."""
    key = str(Path(run_dir).resolve())
    if text is None:
        _DEFERRED.pop(key, None)
    else:
        _DEFERRED[key] = (Path(run_dir) / name, text)


def flush_deferred(run_dir: Path) -> None:
    item = _DEFERRED.pop(str(Path(run_dir).resolve()), None)
    if item is not None and dist.is_main():
        write_text(*item)


class Stage:
    """One stage's directory and its done / resume / changed-config / cost bookkeeping.

    Call :meth:`discard_if_forced` first (``--force`` starts over), then :meth:`is_done` (skip if True), then read
    and check the inputs and load the model, then :meth:`begin` (from then on the stage counts as started),
    :meth:`add` counters as work is done (each call also records the time so far), and :meth:`finish` last."""

    def __init__(self, run_dir: str | Path, name: str, fingerprint: str, config: Any = None, force: bool = False):
        self.run_dir = Path(run_dir)
        self.name = name
        self.dir = self.run_dir / name
        self.fingerprint = fingerprint
        self.config = config
        self.force = force
        self._elapsed, self._since = 0.0, time.time()  # this process's time on the stage; running from now
        self._cpu, self._cpu_since = 0.0, usage.cpu_seconds()  # and its CPU time, paused and resumed alike
        self._counters: dict[str, float] = {}
        self._attempt: dict | None = None  # this process's entry in the cost ledger, once begun
        self._prior: list[dict] = []  # earlier attempts in this rank's ledger
        self._last_record = 0.0

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def manifest(self) -> dict | None:
        p = self.path(MANIFEST)
        return read_json(p) if p.exists() else None

    def check(self) -> str | None:
        """``"finished"``, ``"started"`` or None; raises if finished or begun with a different fingerprint (unless
        ``force``). A question: changes nothing."""
        for fname, what in ((MANIFEST, "finished"), (STARTED, "started")):
            p = self.path(fname)
            if not p.exists():
                continue
            if self.force:
                return what
            saved = read_json(p)
            old = saved.get("fingerprint")
            if old != self.fingerprint:
                differs = config_differences(saved.get("config"), plain(self.config))
                raise SsbError(
                    f"{self.dir} was {what} with a different configuration (fingerprint {old} != {self.fingerprint})"
                    f"{': ' + '; '.join(differs) if differs else ''}; rerun with --force to discard it and redo this "
                    f"stage (and those after it), or use another --run-dir"
                )
            return what
        return None

    def discard_if_forced(self) -> None:
        """With ``force`` (``--force``), delete the stage directory, finished or started, so that the stage starts
        over; otherwise do nothing. Collective under torchrun: every rank calls it, rank 0 deletes."""
        if self.force and self.check() is not None:
            dist.barrier()  # every rank has looked before rank 0 deletes
            if dist.is_main():
                shutil.rmtree(self.dir)
            dist.barrier()

    def is_done(self) -> bool:
        """True if finished with this fingerprint; raises if finished or begun with a different one (unless
        ``force``). A question: changes nothing (under ``force``, call :meth:`discard_if_forced` first)."""
        return self.check() == "finished"

    # ---- time and counters

    def pause(self) -> None:
        if self._since is not None:
            self._elapsed += time.time() - self._since
            self._cpu += usage.cpu_seconds() - self._cpu_since
            self._since = None

    def resume(self) -> None:
        if self._since is None:
            self._since, self._cpu_since = time.time(), usage.cpu_seconds()

    @contextlib.contextmanager
    def lend(self, other: "Stage"):
        """Time spent in the block is ``other``'s, not this stage's (stages sharing one process: the waves)."""
        self.pause()
        other.resume()
        try:
            yield
        finally:
            other.pause()
            self.resume()

    def seconds(self) -> float:
        return self._elapsed + (time.time() - self._since if self._since is not None else 0.0)

    def cpu_seconds(self) -> float:
        return self._cpu + (usage.cpu_seconds() - self._cpu_since if self._since is not None else 0.0)

    def add(self, **counters: float) -> None:
        """Add to this attempt's counters (e.g. ``generated_tokens``) and record them with the time so far."""
        for k, v in counters.items():
            self._counters[k] = self._counters.get(k, 0) + v
        self.record()

    def heartbeat(self, every: float = 5.0) -> None:
        """Record the time so far, at most once per ``every`` seconds (cheap to call every training step)."""
        if time.time() - self._last_record >= every:
            self.record()

    def _ledger_path(self) -> Path:
        return self.path(COST if dist.rank() == 0 else f"cost.rank{dist.rank()}.json")

    def record(self) -> None:
        """Write this attempt's time and counters to the stage's cost ledger (after :meth:`begin`)."""
        if self._attempt is None or not self.dir.is_dir():
            return
        peaks = {k: max(self._attempt.get(k, 0), v)
                 for k, v in (("peak_rss_bytes", usage.peak_rss_bytes()), ("peak_gpu_bytes", usage.peak_gpu_bytes()))}
        self._attempt.update(wall_seconds=round(self.seconds(), 3), cpu_seconds=round(self.cpu_seconds(), 3),
                             gpus=max(self._attempt["gpus"], gpus_in_use()), **peaks,
                             counters={k: round(v, 3) if isinstance(v, float) else v
                                       for k, v in self._counters.items()})
        self._last_record = time.time()
        try:
            write_json(self._ledger_path(), {"attempts": self._prior + [self._attempt]})
        except OSError:
            pass  # bookkeeping must not fail the work

    def _ledgers(self) -> list[tuple[int, list[dict]]]:
        out = []
        for p in sorted(self.dir.glob("cost*.json")):
            if _is_ledger(p.name):
                rank = 0 if p.name == COST else int(p.name[len("cost.rank"):-len(".json")])
                try:
                    out.append((rank, list(read_json(p).get("attempts") or [])))
                except SsbError:
                    pass
        return out

    def begin(self) -> None:
        """From now on the stage counts as started: its directory, ``started.json`` and this attempt's cost entry
        exist. Idempotent; every rank that writes into the stage calls it (no collective)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.path(STARTED).exists():
            write_json(self.path(STARTED), {"fingerprint": self.fingerprint, "started_at": _now()})
        flush_deferred(self.run_dir)  # the command's config.yaml, now that it has changed something
        if self._attempt is None:
            ledger = self._ledger_path()
            self._prior = list(read_json(ledger).get("attempts") or []) if ledger.exists() else []
            self._attempt = {"pid": os.getpid(), "host": platform.node(), "started_at": _now(),
                             "world": dist.world(), "gpus": gpus_in_use()}
            _ACTIVE.add(self)
            usage.reset_peaks()  # this stage's peak memory from here (what earlier stages left is counted)
            self.record()

    def finish(self, counts: dict[str, Any], **extra: Any) -> dict:
        """Write the manifest (rank 0; the others wait for it). Its seconds (wall, GPU, CPU) are summed from the
        cost ledger's attempts. Extra keys are recorded as given and take precedence over those (grpo passes its
        own wall / device / GPU seconds, carried across its TRL checkpoints); the counters added with :meth:`add`
        come last, as the sums over every attempt and rank."""
        self.begin()
        self.record()
        _ACTIVE.discard(self)
        if dist.is_main():  # under data parallelism rank 0 writes for all; the others wait for it
            started = read_json(self.path(STARTED)) if self.path(STARTED).exists() else {}
            ledgers = self._ledgers()
            mine = [a for rank, attempts in ledgers if rank == 0 for a in attempts]
            wall = sum(a.get("wall_seconds", 0.0) for a in mine)
            gpu = sum(a.get("wall_seconds", 0.0) * a.get("gpus", 0) for a in mine)
            every = [a for _, attempts in ledgers for a in attempts]
            totals: dict[str, float] = {}
            for _, attempts in ledgers:
                for a in attempts:
                    for k, v in (a.get("counters") or {}).items():
                        totals[k] = totals.get(k, 0) + v
            manifest = {
                "stage": self.name,
                "fingerprint": self.fingerprint,
                "counts": counts,
                "wall_seconds": round(wall, 3),
                "gpus": max([a.get("gpus", 0) for a in mine] or [0]),
                "gpu_seconds": round(gpu, 3),
                "cpu_seconds": round(sum(a.get("cpu_seconds", 0.0) for a in mine), 3),
                "peak_rss_bytes": max([a.get("peak_rss_bytes", 0) for a in every] or [0]),
                "peak_gpu_bytes": max([a.get("peak_gpu_bytes", 0) for a in every] or [0]),
                "attempts": len(mine),
                "started_at": started.get("started_at"),
                "finished_at": _now(),
                "versions": versions(),
                "machine": machine(),
                "git_commit": git_commit(),
                "host": platform.node(),
                "config": self.config,
                **extra,
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in totals.items()},
                "files": _output_files(self.dir),
            }
            write_json(self.path(MANIFEST), manifest)  # last: its existence means "done"
        dist.barrier()
        return self.manifest


def batches(items: list, size: int) -> Iterator[tuple[int, list]]:
    for i in range(0, len(items), size):
        yield i // size, items[i : i + size]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
