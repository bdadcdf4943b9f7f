"""Hard time limit for math-verify: a persistent worker subprocess with a deadline (private to ssb.grading).

math-verify's own timeout uses ``signal.alarm``, which only works in the main thread of the main interpreter and
cannot interrupt sympy/GMP while they are inside C code (``9^{9^{9^{9}}}``). So ssb never runs math-verify in the
calling process. :class:`MathVerifyWorker` keeps one child Python process (started lazily, via ``subprocess`` so it
also works inside daemonic multiprocessing workers and DataLoader workers) that reads one JSON request per line on
stdin and answers ``1``/``0`` on stdout. The parent waits with ``select`` and a deadline; on timeout, or if the child
dies, it is SIGKILLed and a fresh one is started on the next call (about 1 s). Inside the child, math-verify's
signal timeouts stay on as a cheaper first line of defence (the child runs math-verify in its main thread).

Calls are serialised by a lock (safe from any thread); after ``os.fork`` the child process gets a fresh lock and
starts its own worker. POSIX only (``select`` on pipes).

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

_BOOT = "import sys; sys.path.pop(0); import runpy; runpy.run_path(sys.argv[1], run_name='__ssb_mv_worker__')"
_INNER_TIMEOUT_S = 2  # math-verify's own (signal) timeout per parse/verify inside the worker


class MathVerifyWorker:
    """Client of one math-verify worker process. ``verify(pairs)`` -> True/False, or None on timeout/failure."""

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0  # number of kills (timeouts / crashes); for tests and diagnostics
        self._reset()
        atexit.register(self.close)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child must not share the parent's worker pipes or a lock held by another thread at fork time.
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()
        self._buf = b""
        self._broken_until = 0.0

    def _start(self) -> bool:
        if time.monotonic() < self._broken_until:
            return False
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, os.path.abspath(__file__)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
            )
            self._buf = b""
            if self._readline(time.monotonic() + self.startup_timeout_s) == b"ready":
                return True
        except Exception:
            pass
        self._kill()
        self._broken_until = time.monotonic() + 30.0  # e.g. math-verify missing: don't respawn on every call
        return False

    def _readline(self, deadline: float) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:  # EOF: the worker died
                    return None
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.strip()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except Exception:
                pass

    def verify(self, pairs: list[tuple[str, str]]) -> bool | None:
        """True iff math-verify says any (gold, answer) pair is equal; None if it timed out or the worker died.

        Raises RuntimeError if no worker can be started (e.g. math-verify is not installed)."""
        with self._lock:
            if self._pid != os.getpid():
                self._reset()
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                if not self._start():
                    raise RuntimeError("math-verify worker could not be started")
            try:
                assert self._proc is not None and self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"pairs": pairs}).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._readline(time.monotonic() + self.timeout_s)
            except Exception:
                line = None
            if line not in (b"0", b"1"):
                self.restarts += 1
                self._kill()
                return None
            return line == b"1"

    def close(self) -> None:
        if self._pid == os.getpid():
            self._kill()


def _serve() -> None:  # pragma: no cover - runs in the worker process
    import logging

    logging.disable(logging.CRITICAL)  # math-verify logs a warning per timeout; the parent cannot see stderr anyway
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    out = os.fdopen(os.dup(1), "wb", buffering=0)
    sys.stdout = sys.stderr  # nothing but protocol lines may reach the parent
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
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
