"""Attention of the eager decode step over each chunk's own window of KV columns (CPU, full-attention models).

The KV buffer's columns are a clock shared by all rows (:mod:`ssb.engine.kv_buffer`): a row's tokens lie in
``[start, t]``, and plain attention reads every column of the buffer for every row. In a long call some row is always
old (a reply running to the token cap), so every row attends over its window: on the testbed ~745 columns per row
where the rows' own contexts average ~500 (benchmarks/RESULTS.md), and SDPA is ~20-40% of a CPU decode step at 256
rows. Here the rows are cut into chunks of
``CHUNK`` neighbouring rows, and each chunk attends over the columns from its oldest row's start only: the columns
cut off are masked for every row of the chunk, so each row attends to exactly the keys it attended to before.

A chunk is as wide as its oldest row, so the scheduler keeps rows of similar age together: when the chunks cost
``RESORT`` times what the same rows sorted by start would, it reorders the rows (one copy of the live columns,
:meth:`ssb.engine.kv_buffer.KVBuffer.keep_rows`). New rows are always the youngest, so a sorted order decays only as
rows finish and are refilled.

The chunk windows and the sort decision are plain functions of the rows' starts; ``window_attention`` is the
attention function, switched in for the step by :func:`ssb.engine.fixed_step.attention_as`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "ssb_windows"
CHUNK = 16  # rows per attention call: 16 calls per layer at 256 rows
RESORT = 1.25  # reorder the rows when their chunks cost this many times what sorted rows would


def chunk_windows(starts: list[int], chunk: int | None = None) -> list[tuple[int, int, int]]:
    """Per chunk of ``chunk`` (default ``CHUNK``) neighbouring rows: ``(first row, end row, first column)``, the first
    column being the smallest start of the chunk's rows."""
    chunk = chunk or CHUNK
    return [(r, min(r + chunk, len(starts)), min(starts[r: r + chunk])) for r in range(0, len(starts), chunk)]


def window_cost(starts: list[int], t: int, chunk: int | None = None) -> int:
    """(row, column) pairs the chunks attend over in a step writing column ``t``."""
    return sum((r1 - r0) * (t + 1 - lo) for r0, r1, lo in chunk_windows(starts, chunk))


def resort_order(starts: list[int], t: int, chunk: int | None = None) -> list[int] | None:
    """The rows sorted by start (oldest first; ties keep their order) when that makes the chunks at least ``RESORT``
    times cheaper, else None."""
    order = sorted(range(len(starts)), key=lambda r: starts[r])
    now, best = window_cost(starts, t, chunk), window_cost([starts[r] for r in order], t, chunk)
    return order if now >= RESORT * best and order != list(range(len(starts))) else None


def window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                     windows: list[tuple[int, int, int]], **kwargs):
    """One query token per row: ``query`` [b, h, 1, d] against ``key``/``value`` [b, kvh, n, d] under a boolean
    ``attention_mask`` [b, 1, 1, n], one SDPA call per chunk over its own columns. The query heads of each KV head
    lie on SDPA's query-length axis, so grouped-query attention needs no ``repeat_kv``."""
    b, h, _, d = query.shape
    q = query.reshape(b, key.shape[1], h // key.shape[1], d)
    out = torch.empty_like(q)
    for r0, r1, lo in windows:
        out[r0:r1] = F.scaled_dot_product_attention(q[r0:r1], key[r0:r1, :, lo:], value[r0:r1, :, lo:],
                                                    attn_mask=attention_mask[r0:r1, :, :, lo:], scale=scaling)
    return out.reshape(b, 1, h, d), None
