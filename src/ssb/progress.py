"""Progress bars: a plain tqdm bar (training steps, cache shards) and :class:`GenerationBar`, which also moves
while a generation call is still running.

A generation call can take minutes on a GPU (a batch of long chains of thought), so a bar that moves only when a
call returns looks frozen. :class:`GenerationBar` hands the engine a hook (``engine.generate(..., progress=hook)``,
see :mod:`ssb.engine.transformers_engine`) that the engine calls with cumulative ``(tokens, finished)`` counts of the running call;
the bar redraws at most every ``interval`` seconds with the tokens generated, tok/s, finished samples of the call
out of its total, and an ETA (tqdm's, from the fraction of finished samples credited to the call's items).

This module imports only tqdm: no torch, no engine, and importing it changes no global state.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm.auto import tqdm

# n is a float while a call runs (items credited in proportion to finished samples): show it as an integer
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"


def progress(total: int, desc: str, unit: str, file=None):
    """A plain tqdm bar on stderr."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=file or sys.stderr, smoothing=0.1)


class GenerationBar:
    """A bar over ``total`` items (problems, pairs) that generation calls advance.

    Per call::

        hook = bar.begin(samples=len(prompts) * n, items=len(batch))  # items credited when the call ends
        outs = engine.generate(prompts, params, seed, progress=hook)
        bar.end(tokens=sum(len(s.token_ids) for samples in outs for s in samples))

    ``bar.advance(k)`` credits items outside calls, ``bar.note(key=value)`` adds fields to the postfix, and
    ``bar.close()`` ends it. ``clock`` (seconds, monotonic) is injectable for tests.
    """

    def __init__(self, total: int, desc: str, unit: str = "problem", *, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, file=None):
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=file or sys.stderr,
                        bar_format=_BAR_FORMAT)
        self.interval, self.clock = interval, clock
        self.items = 0.0  # items credited so far (finished calls and advance())
        self.tokens = 0  # tokens of finished calls
        self.seconds = 0.0  # time spent in finished calls
        self.extra: dict[str, object] = {}
        self.renders = 0  # redraws so far
        self._call: dict | None = None  # the running call: samples, items, t0, tokens, finished
        self._last = -float("inf")

    # ------------------------------------------------------------------ a generation call

    def begin(self, samples: int, items: float = 0) -> Callable[[int, int], None]:
        """Start a call of ``samples`` samples that will credit ``items`` items; returns the engine's hook."""
        self._call = {"samples": samples, "items": items, "t0": self.clock(), "tokens": 0, "finished": 0}
        return self.hook

    def hook(self, tokens: int, finished: int) -> None:
        """The engine's progress hook: ``tokens`` generated and ``finished`` samples so far in the running call
        (cumulative). Cheap: redraws only when ``interval`` seconds have passed since the last redraw."""
        if self._call is None:
            return
        self._call["tokens"], self._call["finished"] = tokens, finished
        if self.clock() - self._last >= self.interval:
            self._render()

    def end(self, tokens: int | None = None) -> None:
        """End the running call: credit its items, count its ``tokens`` (default: the last hook's count)."""
        call, self._call = self._call, None
        if call is None:
            return
        self.tokens += call["tokens"] if tokens is None else tokens
        self.seconds += self.clock() - call["t0"]
        self.items += call["items"]
        self._render()

    # ------------------------------------------------------------------ outside calls

    def advance(self, items: float) -> None:
        self.items += items
        self._render()

    def note(self, **fields) -> None:
        """Show ``fields`` in the postfix from the next redraw on (e.g. ``accepted=12``)."""
        self.extra.update(fields)

    def close(self) -> None:
        self._render()
        self.bar.close()

    # ------------------------------------------------------------------ numbers and drawing

    def totals(self) -> tuple[int, float]:
        """Tokens and generation seconds so far, the running call included."""
        if self._call is None:
            return self.tokens, self.seconds
        return self.tokens + self._call["tokens"], self.seconds + self.clock() - self._call["t0"]

    def postfix(self) -> str:
        tokens, seconds = self.totals()
        parts = [f"tok={tqdm.format_sizeof(tokens)}", f"tok/s={tokens / seconds:.0f}" if seconds > 0 else "tok/s=?"]
        if self._call is not None:
            parts.append(f"samples={self._call['finished']}/{self._call['samples']}")
        parts += [f"{k}={v}" for k, v in self.extra.items()]
        return ", ".join(parts)

    def _render(self) -> None:
        n = self.items
        if self._call is not None and self._call["samples"]:
            n += self._call["items"] * self._call["finished"] / self._call["samples"]
        self.bar.n = min(n, self.bar.total) if self.bar.total is not None else n
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.refresh()
        self._last = self.clock()
        self.renders += 1
