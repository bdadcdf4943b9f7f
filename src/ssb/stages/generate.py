"""Shared plumbing of the generation stages: resumable batched generation into a JSONL file, seeds."""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Callable

import torch

from ssb.engine import Engine, SamplingParams
from ssb import dist
from ssb.progress import GenerationBar
from ssb.rows import append_rows, merge_parts, own_part, part_files, read_with_parts
from ssb.rundir import Stage, batches


def batch_seed(seed: int, *parts) -> int:
    """A seed for one batch of one stage, stable across runs and resumes."""
    return zlib.crc32(":".join(map(str, (seed, *parts))).encode())


def generate_rows(
    stage: Stage,
    filename: str,
    items: list,
    *,
    prompt_of: Callable[[object, object], list[int]],
    row_of: Callable[[object, list], dict],
    engine_factory: Callable[[], Engine],
    params: SamplingParams,
    seed: int,
    batch_size: int,
    desc: str,
) -> tuple[list[dict], dict]:
    """Generate ``params.n`` samples for every item (an object with ``.id``) not yet in ``stage/filename``;
    ``prompt_of(tokenizer, item)`` renders an item's prompt, ``row_of(item, samples)`` makes its row.

    Every item's samples are seeded by (seed, stage, item id) alone, so they do not depend on batching: an
    interrupted run redoes only the items it had not written, with the same samples, and a longer ``items`` list (a
    later wave) extends the file with exactly the rows a single long run would have written. All of a rank's
    missing items go to the engine in one call, so its rows stay full until the last items (calls cut into batches
    each ended with a few long replies decoding alone); rows are appended ``batch_size`` at a time as their items
    finish (the engine's ``on_done``), so a crash loses fewer than ``batch_size`` rows, and the file is put back in
    item order at the end. Under data parallelism batch ``b`` (``batch_size`` items) belongs to rank ``b % world``,
    which appends to its own part file ``<filename>.part<rank>``; rank 0 then merges every part into ``filename`` in
    item order (:func:`ssb.rows.merge_parts`). Resuming with any number of ranks reads all parts, so a crashed
    rank's missing items are redone and nothing is duplicated. Returns all rows in item order (on rank 0; other
    ranks return their own) and counters (tokens generated, seconds).

    The progress bar (:class:`ssb.progress.GenerationBar`) moves as items finish: tokens, tok/s, finished samples
    and an ETA, through the engine's ``progress`` hook.
    """
    path = stage.path(filename)
    had_parts = bool(part_files(path))
    done = {r["id"]: r for r in read_with_parts(path, repair=True)}
    todo = [it for b, batch in batches(items, batch_size) if b % dist.world() == dist.rank()
            for it in batch if it.id not in done]
    stats = {"generated_tokens": 0, "generate_seconds": 0.0, "resumed_rows": len(done)}
    if todo:
        engine = engine_factory()
        stage.begin()  # the model has loaded: from here on the stage counts as started
        writer = _Writer(stage, own_part(path), done, batch_size)
        bar = GenerationBar(len(todo), desc, "problem")
        hook = bar.begin(samples=len(todo) * params.n, items=len(todo))
        engine.generate([prompt_of(engine.tokenizer, it) for it in todo], params,
                        [batch_seed(seed, stage.name, it.id) for it in todo], progress=hook,
                        on_done=lambda i, samples: writer.add(row_of(todo[i], samples), samples))
        writer.flush()
        bar.end(tokens=writer.tokens)
        bar.close()
        stats["generated_tokens"], stats["generate_seconds"] = writer.tokens, writer.seconds
    stats["generate_seconds"] = round(stats["generate_seconds"], 3)
    if dist.world() > 1:
        stats["generated_tokens"] = int(dist.all_reduce_sum(torch.tensor(stats["generated_tokens"])))
    return _collect(path, items, done, had_parts), stats


class _Writer:
    """Rows of finished items, appended ``every`` at a time to ``path`` and entered in ``done``; each append is
    charged to the stage's cost ledger (tokens, seconds since the last append)."""

    def __init__(self, stage: Stage, path: Path, done: dict, every: int):
        self.stage, self.path, self.done, self.every = stage, path, done, every
        self.rows: list[dict] = []
        self.tokens = self.pending_tokens = 0
        self.seconds, self.t = 0.0, time.time()

    def add(self, row: dict, samples: list) -> None:
        self.rows.append(row)
        self.pending_tokens += sum(len(s.token_ids) for s in samples)
        if len(self.rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        now = time.time()
        dt, self.t = now - self.t, now
        if self.rows:
            append_rows(self.path, self.rows)
        for r in self.rows:
            self.done[r["id"]] = r
        self.stage.add(generated_tokens=self.pending_tokens, generate_seconds=dt)  # summed over resumes
        self.tokens, self.seconds = self.tokens + self.pending_tokens, self.seconds + dt
        self.rows, self.pending_tokens = [], 0


def _collect(path: Path, items: list, done: dict, had_parts: bool) -> list[dict]:
    """Every item's row in item order, with the ranks' part files (and any left by an earlier run,
    ``had_parts``) folded into ``path`` by rank 0, and the file put in item order if rows were appended as their
    items finished; the other ranks return their own rows."""
    if dist.world() > 1:
        dist.barrier()  # every rank's part is complete
        if not dist.is_main():
            return [done[it.id] for it in items if it.id in done]
        done = {r["id"]: r for r in read_with_parts(path)}
    rows = [done[it.id] for it in items]
    ids = {it.id for it in items}
    in_order = [k for k in done if k in ids] == [it.id for it in items]
    if had_parts or dist.world() > 1 or not in_order:  # one file, in item order (rows of other items after)
        merge_parts(path, rows + [r for k, r in done.items() if k not in ids])
    return rows


def sample_dict(s) -> dict:
    return {"text": s.text, "token_ids": s.token_ids, "finish_reason": s.finish_reason}
