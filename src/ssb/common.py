"""Shared plumbing of the generation stages: resumable batched generation into a JSONL file, seeds, progress."""

from __future__ import annotations

import sys
import time
import zlib
from typing import Callable

from tqdm.auto import tqdm

from ssb.engine import Engine, SamplingParams
from ssb.rundir import Stage, append_rows, batches, read_rows


def batch_seed(seed: int, *parts) -> int:
    """A seed for one batch of one stage, stable across runs and resumes."""
    return zlib.crc32(":".join(map(str, (seed, *parts))).encode())


def progress(total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)


def generate_rows(
    stage: Stage,
    filename: str,
    items: list,
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

    Batches are fixed slices of ``items`` seeded by their index, so an interrupted run redoes only the batches it
    had not written, with the same samples. Rows of a batch are appended together. Returns all rows in item
    order and counters (tokens generated this call, seconds).
    """
    path = stage.path(filename)
    done = {r["id"]: r for r in read_rows(path, repair=True)}
    todo = [(b, batch) for b, batch in batches(items, batch_size) if any(it.id not in done for it in batch)]
    stats = {"generated_tokens": 0, "generate_seconds": 0.0, "resumed_rows": len(done)}
    if todo:
        engine = engine_factory()
        bar = progress(sum(len(b) for _, b in todo), desc, "problem")
        for b, batch in todo:
            t0 = time.time()
            outs = engine.generate([prompt_of(engine.tokenizer, it) for it in batch], params, batch_seed(seed, stage.name, b))
            stats["generate_seconds"] += time.time() - t0
            rows = [row_of(it, samples) for it, samples in zip(batch, outs) if it.id not in done]
            append_rows(path, rows)
            for r in rows:
                done[r["id"]] = r
            ntok = sum(len(s.token_ids) for samples in outs for s in samples)
            stats["generated_tokens"] += ntok
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{stats['generated_tokens'] / max(stats['generate_seconds'], 1e-9):.0f}")
        bar.close()
    stats["generate_seconds"] = round(stats["generate_seconds"], 3)
    return [done[it.id] for it in items], stats


def sample_dict(s) -> dict:
    return {"text": s.text, "token_ids": s.token_ids, "finish_reason": s.finish_reason}
