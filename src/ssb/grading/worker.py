"""Hard time limit for math-verify: a small pool of worker subprocesses with a per-call deadline (private to
ssb.grading).

math-verify's own timeout uses ``signal.alarm``, which only works in the main thread of the main interpreter and
cannot interrupt sympy/GMP while they are inside C code (``9^{9^{9^{9}}}``). So ssb never runs math-verify in the
calling process. :class:`MathVerifyWorker` keeps up to ``size`` child Python processes (started lazily, via
``subprocess`` so it also works inside daemonic multiprocessing workers and DataLoader workers), each reading one
JSON request per line on stdin and answering ``1``/``0`` on stdout. Inside a child, math-verify's signal timeouts
stay on as a cheaper first line of defence (the child runs math-verify in its main thread).

Deadline. Every ``verify`` call gets ``timeout_s`` in all, counted from the moment it is called: waiting for a free
worker (when ``size`` calls are already running, or every worker is being restarted) and the verification itself.
A call that reaches its deadline while verifying SIGKILLs its worker and returns None (a verdict: the input is too
hard; ssb.grading caches it as False). A call that could not get a worker in time, or got one so late that less
than half the deadline was left for verifying, raises :class:`WorkerBusy` instead: that is load, not the input, so
callers must not cache it (ssb.grading grades that call False and does not cache it). A killed worker is replaced
at once in the background, so later calls rarely wait for a start (about 1-2 s). The only wait not bounded by
``timeout_s`` is the very first start in a process (no worker has ever been ready): it is bounded by
``startup_timeout_s``, as a cold start says nothing about the input. If no worker can be started at all (e.g.
math-verify is not installed) calls raise RuntimeError for 30 s before the next try.

Calls are safe from any thread; after ``os.fork`` the child gets a fresh, empty pool and starts its own workers.
POSIX only (``select`` on pipes).

This file is also the worker's program: it is executed by path (``runpy``) with only the standard library and
math-verify imported, so it never imports ssb in the child.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

BOOT = "import sys; sys.path.pop(0); import runpy; runpy.run_path(sys.argv[1], run_name='__ssb_mv_worker__')"
_INNER_TIMEOUT_S = 2  # math-verify's own (signal) timeout per parse/verify inside the worker
_BROKEN_RETRY_S = 30.0  # after a failed start, don't try again for this long


class WorkerBusy(RuntimeError):
    """No worker was free early enough before the call's deadline: load, not a verdict on the input."""


class _Proc:
    """One worker process and the unread part of its stdout."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.buf = b""

    def readline(self, deadline: float) -> bytes | None:
        """Next line from the worker, or None at the deadline or EOF (the worker died)."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.strip()

    def kill(self) -> None:
        """SIGKILL (cheap, never blocks); :meth:`reap` collects the process."""
        try:
            self.popen.kill()
        except Exception:
            pass

    def reap(self) -> None:
        self.kill()
        try:
            self.popen.wait(timeout=5)
        except Exception:
            pass
        for f in (self.popen.stdin, self.popen.stdout):
            try:
                if f is not None:
                    f.close()
            except Exception:
                pass


class MathVerifyWorker:
    """Client of a pool of up to ``size`` math-verify worker processes.

    ``verify(pairs)`` -> True/False, or None when the call's deadline was hit while verifying (see the module
    docstring for WorkerBusy and RuntimeError)."""

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 60.0, size: int = 4) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.size = size
        self.restarts = 0  # number of kills (timeouts / crashes); for tests and diagnostics
        self._reset()
        atexit.register(self.close)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child must not share the parent's worker pipes or a lock held by another thread at fork time.
        self._cond = threading.Condition()
        self._idle: list[_Proc] = []  # ready, not in use
        self._procs: set[_Proc] = set()  # every started worker, idle or in use
        self._starting = 0  # starts in progress (background threads)
        self._ready_once = False  # some worker has been ready in this process: the deadline is strict from now on
        self._broken_until = 0.0
        self._gen = 0  # bumped by close(): starts begun before it are dropped
        self._pid = os.getpid()

    # --- starting and stopping workers (the pool's state is guarded by self._cond) ---------------------------

    def _spawn(self, reap: _Proc | None = None) -> None:
        """Start one worker in a background thread (lock held); first reap ``reap`` (a killed worker)."""
        self._starting += 1
        args = (self._cond, self._gen, reap)
        threading.Thread(target=self._start_one, args=args, daemon=True, name="ssb-mv-start").start()

    def _start_one(self, cond: threading.Condition, gen: int, reap: _Proc | None) -> None:
        if reap is not None:
            reap.reap()
        proc = None
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", BOOT, os.path.abspath(__file__)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
            )
            proc = _Proc(popen)
            ok = proc.readline(time.monotonic() + self.startup_timeout_s) == b"ready"
        except Exception:
            ok = False
        with cond:
            if cond is not self._cond or gen != self._gen:  # pool closed (or reset) meanwhile: a stale worker
                ok = False
            else:
                self._starting -= 1
                if ok:
                    self._procs.add(proc)
                    self._idle.append(proc)
                    self._ready_once = True
                else:
                    self._broken_until = time.monotonic() + _BROKEN_RETRY_S
                cond.notify_all()
        if not ok and proc is not None:
            proc.reap()

    def _acquire(self, t0: float, deadline: float) -> tuple[_Proc, bool]:
        """A free worker, and whether the call had to wait for the process's first start (a cold start)."""
        cold = False
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop(), cold
                alive = len(self._procs) + self._starting
                if alive < self.size and time.monotonic() >= self._broken_until:
                    self._spawn()
                    alive += 1
                if alive == 0:
                    raise RuntimeError("math-verify worker could not be started")
                cold = cold or not self._ready_once
                limit = deadline if self._ready_once else t0 + self.startup_timeout_s
                left = limit - time.monotonic()
                if left <= 0:
                    raise WorkerBusy(f"no math-verify worker free within {self.timeout_s:g} s")
                self._cond.wait(left)

    def _release(self, proc: _Proc) -> None:
        with self._cond:
            if proc in self._procs:
                self._idle.append(proc)
                self._cond.notify()
                return
        proc.reap()  # the pool was closed while this call ran

    def _discard(self, proc: _Proc) -> None:
        """Kill a worker that missed its deadline or died, and start its replacement at once."""
        proc.kill()
        with self._cond:
            self.restarts += 1
            if proc in self._procs:
                self._procs.discard(proc)
                if time.monotonic() >= self._broken_until:
                    self._spawn(reap=proc)
                    return
        threading.Thread(target=proc.reap, daemon=True).start()

    # --- public API ---------------------------------------------------------------------------------------------

    def verify(self, pairs: list[tuple[str, str]]) -> bool | None:
        """True iff math-verify says any (gold, answer) pair is equal; None if this call's deadline was hit while
        verifying (or the worker died). Raises WorkerBusy if no worker was free early enough, RuntimeError if no
        worker can be started (e.g. math-verify is not installed)."""
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        if self._pid != os.getpid():
            self._reset()
        payload = json.dumps({"pairs": pairs}).encode() + b"\n"
        proc, cold = self._acquire(t0, deadline)
        if cold:  # the first start in this process is not charged to the call: it gets a full deadline after it
            deadline = time.monotonic() + self.timeout_s
        budget = deadline - time.monotonic()
        try:
            assert proc.popen.stdin is not None
            proc.popen.stdin.write(payload)
            proc.popen.stdin.flush()
            line = proc.readline(deadline)
        except Exception:
            line = None
        if line in (b"0", b"1"):
            self._release(proc)
            return line == b"1"
        self._discard(proc)
        if budget < self.timeout_s / 2:
            raise WorkerBusy(f"only {max(budget, 0):.2f} s of {self.timeout_s:g} s were left after the wait")
        return None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until some worker is idle (starting one if none is alive); False if ``timeout`` passed first."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._idle:
                if not self._procs and not self._starting and time.monotonic() >= self._broken_until:
                    self._spawn()
                if not self._procs and not self._starting:
                    return False  # broken: nothing will become ready
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Kill every worker (the pool starts afresh on the next call)."""
        if self._pid != os.getpid():
            return
        with self._cond:
            procs = list(self._procs)
            self._idle, self._procs, self._starting = [], set(), 0
            self._ready_once = False  # a later call starts afresh: a cold start again
            self._gen += 1
            self._cond.notify_all()
        for proc in procs:
            proc.reap()


def _serve() -> None:  # pragma: no cover - runs in the worker process
    import logging

    logging.disable(logging.CRITICAL)  # math-verify logs a warning per timeout; the parent cannot see stderr anyway
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    out = os.fdopen(os.dup(1), "wb", buffering=0)
    sys.stdout = sys.stderr  # nothing but protocol lines may reach the parent
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:  # warm up (lazy imports, parser tables) before "ready", so a call's deadline never pays for it
        verify(parse("$\\frac{1}{2}$", extraction_config=config), parse("$0.5$", extraction_config=config))
    except BaseException:
        pass
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        ok = False
        try:
            for gold, answer in json.loads(line)["pairs"]:
                g = parse(f"${gold}$", extraction_config=config, parsing_timeout=_INNER_TIMEOUT_S)
                a = parse(f"${answer}$", extraction_config=config, parsing_timeout=_INNER_TIMEOUT_S)
                if g and a and verify(g, a, allow_set_relation_comp=True, timeout_seconds=_INNER_TIMEOUT_S):
                    ok = True
                    break
        except BaseException:  # math-verify's TimeoutException derives from BaseException
            ok = False
        out.write(b"1\n" if ok else b"0\n")


if __name__ == "__ssb_mv_worker__":
    _serve()
