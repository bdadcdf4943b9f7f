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
    interrupted run redoes only the batches it had not written, with the same samples, and a longer ``items``
    list (a later wave) extends the file with exactly the rows a single long run would have written. Rows of a
    batch are appended together. Under data parallelism batch ``b`` belongs to rank ``b % world``, which appends
    to its own part file ``<filename>.part<rank>``; rank 0 then merges every part into ``filename`` in item order
    (:func:`ssb.rows.merge_parts`). Resuming with any number of ranks reads all parts, so a crashed rank's
    missing batches are redone and nothing is duplicated. Returns all rows in item order (on rank 0; other ranks
    return their own) and counters (tokens generated, seconds).

    The progress bar (:class:`ssb.progress.GenerationBar`) moves inside a batch too: tokens, tok/s, finished
    samples of the batch and an ETA, through the engine's ``progress`` hook.
    """
    path = stage.path(filename)
    had_parts = bool(part_files(path))
    done = {r["id"]: r for r in read_with_parts(path, repair=True)}
    todo = [(b, batch) for b, batch in batches(items, batch_size)
            if b % dist.world() == dist.rank() and any(it.id not in done for it in batch)]
    stats = {"generated_tokens": 0, "generate_seconds": 0.0, "resumed_rows": len(done)}
    if todo:
        engine = engine_factory()
        stage.begin()  # the model has loaded: from here on the stage counts as started
        bar = GenerationBar(sum(len(b) for _, b in todo), desc, "problem")
        own = own_part(path)
        for _, batch in todo:
            seeds = [batch_seed(seed, stage.name, it.id) for it in batch]
            outs, dt = _sample_batch(engine, batch, prompt_of, params, seeds, bar)
            stats["generate_seconds"] += dt
            rows = [row_of(it, samples) for it, samples in zip(batch, outs) if it.id not in done]
            append_rows(own, rows)
            for r in rows:
                done[r["id"]] = r
            ntok = sum(len(s.token_ids) for samples in outs for s in samples)
            stats["generated_tokens"] += ntok
            stage.add(generated_tokens=ntok, generate_seconds=dt)  # the cost ledger: summed over resumes
            bar.end(tokens=ntok)
        bar.close()
    stats["generate_seconds"] = round(stats["generate_seconds"], 3)
    if dist.world() > 1:
        stats["generated_tokens"] = int(dist.all_reduce_sum(torch.tensor(stats["generated_tokens"])))
    return _collect(path, items, done, had_parts), stats


def _sample_batch(engine: Engine, batch: list, prompt_of, params: SamplingParams, seeds: list[int],
                  bar: GenerationBar) -> tuple[list, float]:
    """One batch's samples (per item, in order) and the seconds they took; the bar moves inside the batch."""
    t0 = time.time()
    hook = bar.begin(samples=len(batch) * params.n, items=len(batch))
    outs = engine.generate([prompt_of(engine.tokenizer, it) for it in batch], params, seeds, progress=hook)
    return outs, time.time() - t0


def _collect(path: Path, items: list, done: dict, had_parts: bool) -> list[dict]:
    """Every item's row in item order, with the ranks' part files (and any left by an earlier run,
    ``had_parts``) folded into ``path`` by rank 0; the other ranks return their own rows."""
    if dist.world() > 1:
        dist.barrier()  # every rank's part is complete
        if not dist.is_main():
            return [done[it.id] for it in items if it.id in done]
        done = {r["id"]: r for r in read_with_parts(path)}
    rows = [done[it.id] for it in items]
    if had_parts or dist.world() > 1:  # fold the parts into the one file, in item order
        merge_parts(path, rows)
    return rows


def sample_dict(s) -> dict:
    return {"text": s.text, "token_ids": s.token_ids, "finish_reason": s.finish_reason}
