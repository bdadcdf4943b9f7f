"""The KV buffer of one :class:`ssb.engine.transformers_engine.TransformersEngine` call: a preallocated ``[rows, heads, capacity, dim]``
key and value tensor per layer, written in place (no per-step concatenation), and the column clock they share.

Columns are a clock shared by all rows: the next decode step writes column ``t`` in every row at once, so a row
holds its tokens in columns ``[start, t)``: a prompt's KV is copied in to end at ``t`` (each row is left-padded to
the clock) and every step appends a column. The rows' starts belong to the scheduler (:class:`ssb.engine.transformers_engine.Scheduler`),
which passes the first live column ``lo`` (the smallest start of a busy row) to the moves below; each returns the
shift of the kept columns, which the scheduler adds to every start:

- ``make_room``: a prompt longer than ``t`` is admitted, so the live columns move right;
- ``compact`` (before a step): the buffer is full, or its leading columns are mostly dead: the live columns move to
  column 0, in a buffer of the same capacity or, when they fill most of it, twice that;
- ``keep_rows``: only the busy rows are kept (the scheduler drops idle rows once nothing waits).

A step (``step``) feeds one token per row and writes column ``t``. Eager steps append through :class:`_BufferLayer`
views of the used columns; on a CPU (full-attention models) each chunk of rows attends over its own columns only
(:mod:`ssb.engine.windows`), and the scheduler reorders rows by start with ``keep_rows`` when that pays. Fixed-shape
steps (:mod:`ssb.engine.fixed_step`; CUDA, full-attention models) write the device column of :class:`StaticLayer`
and attend over the whole buffer, with a capacity rounded to a multiple of 64; on CUDA the step is captured once in
a CUDA graph and replayed. Their moves happen in place (same tensors, so
the graph stays valid) unless the rows or the capacity change: that reallocates and resets the graph, which
captures again at the next step.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ssb.engine import windows
from ssb.engine.fixed_step import CudaGraphStep, attention_as, fixed_forward, round_capacity, with_cache


def relayout_buffers(layer, lo: int, off: int, cap: int, rows: torch.Tensor | None = None,
                     in_place: bool = False) -> None:
    """Keep columns ``[lo, n)`` of ``layer.kbuf``/``layer.vbuf`` (and only ``rows``), moved to start at ``off`` in a
    buffer of ``cap`` columns. ``in_place``: reuse the same tensors when neither rows nor capacity change."""
    for name in ("kbuf", "vbuf"):
        old = getattr(layer, name)
        if in_place and rows is None and cap == old.shape[2]:
            old[:, :, off: off + layer.n - lo] = old[:, :, lo: layer.n].clone()
            continue
        live = old[:, :, lo: layer.n] if rows is None else old[rows, :, lo: layer.n]  # only the live columns
        new = old.new_zeros(live.shape[0], old.shape[1], cap, old.shape[3])
        new[:, :, off: off + layer.n - lo] = live
        setattr(layer, name, new)
    layer.n = off + layer.n - lo
    layer._view()


class _BufferLayer(DynamicLayer):
    """A KV layer over a preallocated ``[rows, heads, capacity, dim]`` buffer; appends are in-place writes.
    Columns are a clock shared by all rows (each row is left-padded to it); ``n`` columns are in use."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        self.kbuf, self.vbuf, self.n = k, v, n
        self._view()

    def _view(self):
        self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        self.kbuf[:, :, self.n: self.n + q] = key_states
        self.vbuf[:, :, self.n: self.n + q] = value_states
        self.n += q
        self._view()
        return self.keys, self.values

    def relayout(self, lo: int, off: int, cap: int, rows: torch.Tensor | None = None):
        """Keep columns ``[lo, n)`` (and only ``rows``), moved to start at ``off`` in a new buffer of ``cap``."""
        relayout_buffers(self, lo, off, cap, rows)


class StaticLayer(DynamicLayer):
    """A KV layer over a ``[rows, heads, cap, dim]`` buffer written at the device column ``col`` (set before each
    step); attention always reads the whole buffer (the mask hides dead columns). ``n`` columns are in use."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        self.kbuf, self.vbuf, self.n = k, v, n
        self.col: torch.Tensor | None = None
        self._view()

    def _view(self):
        self.keys, self.values = self.kbuf, self.vbuf

    def update(self, key_states, value_states, *args, **kwargs):
        self.kbuf.index_copy_(2, self.col, key_states)
        self.vbuf.index_copy_(2, self.col, value_states)
        return self.kbuf, self.vbuf

    def relayout(self, lo: int, off: int, cap: int, rows: torch.Tensor | None = None):
        """As :func:`relayout_buffers`, in place (same tensors, so a captured graph stays valid) unless ``rows`` is
        given or ``cap`` changes."""
        relayout_buffers(self, lo, off, cap, rows, in_place=True)


class KVBuffer:
    """The KV layers of ``rows`` rows of ``model`` on ``device``, allocated at the first admission; ``static``:
    fixed-shape steps (CUDA-graph captured on CUDA; ``on_capture()`` is called after each capture); ``windowed``:
    eager steps attend per chunk of rows over its own columns (:mod:`ssb.engine.windows`)."""

    def __init__(self, model, rows: int, device: torch.device, static: bool, on_capture=None,
                 windowed: bool = False):
        self.model, self.rows, self.device, self.static = model, rows, device, static
        self.windowed = windowed and not static
        self.layers: list[_BufferLayer | StaticLayer] = []
        self.cache: Cache | None = None
        self.t = 0  # the column clock: the column the next step writes
        self.graph = None
        if static and device.type == "cuda":
            self.graph = CudaGraphStep(lambda inp: fixed_forward(self.model, self.cache, inp), on_capture)

    @property
    def cap(self) -> int:
        """Columns allocated per row."""
        return self.layers[0].kbuf.shape[2]

    def allocate(self, like: list[tuple[torch.Tensor, torch.Tensor]], longest: int, room: int):
        """Layers shaped like a prefilled prompt's per-layer ``(keys, values)`` ``[heads, n, dim]``, with the clock at
        ``longest`` and ``room`` columns after it (plus one)."""
        cap = longest + room + 1
        layer_cls, cap = (StaticLayer, round_capacity(cap)) if self.static else (_BufferLayer, cap)
        for k, _ in like:
            shape = (self.rows, k.shape[0], cap, k.shape[2])
            self.layers.append(layer_cls(k.new_zeros(shape), k.new_zeros(shape), longest))
        self.cache = Cache(layers=self.layers)
        self.t = longest

    def write(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Copy a prompt's per-layer ``(keys, values)`` ``[heads, n, dim]`` into ``row``, ending at the clock; the
        row's first column."""
        n = kv[0][0].shape[1]
        for layer, (k, v) in zip(self.layers, kv):
            layer.kbuf[row, :, self.t - n: self.t] = k
            layer.vbuf[row, :, self.t - n: self.t] = v
        return self.t - n

    # ---------------------------------------------------------------- moves (each returns the shift of the columns)

    def relayout(self, lo: int, off: int, cap: int, rows: torch.Tensor | None = None) -> int:
        """Keep columns ``[lo, t)`` (and only ``rows``), moved to start at ``off`` in a buffer of ``cap`` columns."""
        if self.static:  # a fixed-shape buffer moves in place unless it must change shape
            cap = round_capacity(cap)
            if self.graph is not None and (rows is not None or cap != self.cap):
                self.graph.reset()  # the captured graph writes the old buffers: capture again
        for layer in self.layers:
            layer.relayout(lo, off, cap, rows)
        if rows is not None:
            self.rows = len(rows)
        self.t = self.layers[0].n
        return off - lo

    def make_room(self, n: int, lo: int) -> int:
        """Make the ``n`` columns before the clock free for a prompt of ``n`` tokens: when ``n > t``, move the live
        columns ``[lo, t)`` right."""
        if n <= self.t:
            return 0
        return self.relayout(lo, n - (self.t - lo), max(self.cap, n + 1 + self.t - lo))

    def compact(self, lo: int) -> int:
        """Before a step: when the buffer is full or mostly dead columns, move the live columns ``[lo, t)`` to column
        0 (into twice the capacity when they would fill more than 3/4 of it)."""
        if self.t + 1 <= self.cap and lo <= max(32, self.t // 2):
            return 0
        window = self.t - lo + 1
        return self.relayout(lo, 0, self.cap if window <= self.cap * 3 // 4 else 2 * self.cap)

    def keep_rows(self, rows: list[int], lo: int) -> int:
        """Keep only ``rows`` (in that order: a subset, or all of them reordered) and the live columns ``[lo, t)``,
        moved to column 0."""
        keep = torch.tensor(rows).to(self.device)
        return self.relayout(lo, 0, max(self.cap - lo, self.t - lo + 1), keep)

    # ---------------------------------------------------------------- the decode step

    def step(self, inputs: list[tuple[int, int, int]]) -> torch.Tensor:
        """One decode step writing column ``t``, then the clock advances: per row, ``(token, its position, the row's
        first live column)`` (an idle row: ``(pad, 0, t)``); last-position logits ``[rows, vocab]``."""
        return self._fixed_step(inputs) if self.static else self._eager_step(inputs)

    def _fixed_step(self, inputs: list[tuple[int, int, int]]) -> torch.Tensor:
        """Fill column ``t`` of the whole fixed-shape buffer; idle rows attend to their own new column only."""
        t = self.t
        logits = self.fixed_logits(torch.tensor([[tok, pos, start, t] for tok, pos, start in inputs]).to(self.device))
        for layer in self.layers:
            layer.n += 1
        self.t += 1
        return logits

    def fixed_logits(self, inp: torch.Tensor) -> torch.Tensor:
        """The fixed-shape forward (:func:`ssb.engine.fixed_step.fixed_forward`): replayed from a CUDA graph on CUDA, run
        directly elsewhere."""
        return self.graph(inp) if self.graph is not None else fixed_forward(self.model, self.cache, inp)

    def _eager_step(self, inputs: list[tuple[int, int, int]]) -> torch.Tensor:
        ids = torch.tensor([[tok] for tok, _, _ in inputs]).to(self.device)
        pos = torch.tensor([[p] for _, p, _ in inputs]).to(self.device)
        starts = [s for _, _, s in inputs]
        mask = torch.arange(self.t + 1)[None] >= torch.tensor(starts)[:, None]
        kw = dict(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                  **with_cache(self.model, self.cache))
        if self.windowed:  # a 4D mask is taken as prepared; each chunk of rows attends over its own columns
            fn = functools.partial(windows.window_attention, windows=windows.chunk_windows(starts))
            with attention_as(self.model, windows.NAME, fn):
                out = self.model(attention_mask=mask[:, None, None].to(self.device), **kw)
        else:
            out = self.model(attention_mask=mask.long().to(self.device), **kw)
        self.t = self.layers[0].n
        return out.logits[:, -1]
