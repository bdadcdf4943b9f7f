"""Generation engines: one small interface for rollouts, the teacher, evaluation (and the GRPO baseline).

An engine takes prompts as token ids (already rendered through the chat template by the caller, so every stage
tokenises prompts the same way), samples ``n`` continuations per prompt, and returns for each its token ids *as
sampled* (stop token included when the model stopped), the decoded text, and why it finished.

``TransformersEngine`` is the embedded default (no extra dependency). It runs its own continuous-batching loop
over the plain transformers model:

- every prompt is prefilled once (prompts of similar length together, left-padded) and its KV copied into the
  ``n`` rows that sample from it;
- up to ``max_batch_size`` rows decode together; a row that finishes is refilled with a waiting sample at the next
  step, so no row idles until the longest finishes, and idle rows are dropped once nothing waits;
- the KV cache is a preallocated buffer written in place (no per-step concatenation), compacted when its
  leading columns are dead; bf16 on GPU comes from the model's dtype;
- every sample draws its randomness from its own stream, seeded by (call seed, prompt tokens, occurrence of that
  prompt in the call, sample index) and consumed one uniform per token (inverse-CDF sampling). A prompt's
  samples therefore do not depend on which other prompts share the call or in what order, and a call is
  reproducible; the only remaining coupling is floating-point: batched matmuls may round differently at
  different batch sizes, which can flip a near-tie (vanishingly rare in fp32, possible in bf16).
- only ``SamplingParams`` apply: nothing comes from the model's ``generation_config`` (no repetition penalty, no
  default top-k/top-p).
- ``generate(..., progress=hook)`` calls ``hook(tokens, finished)`` after every step that produced tokens (the
  first tokens of newly admitted samples, or a decode step) with the call's cumulative counts: tokens generated
  (stop tokens included; at the end, the sum of the samples' ``len(token_ids)``) and samples finished, out of
  ``len(prompts) * params.n``. The hook must be cheap (``ssb.progress.GenerationBar.hook`` redraws on a timer).

On CUDA (``cuda_graphs=True``, models with full attention only) a decode step is a fixed-shape computation over the
whole buffer (``ssb._static_decode``), captured once in a CUDA graph and replayed; compaction moves columns inside
the same buffer, so only a reallocation (more columns, fewer rows) captures again. Sampling and bookkeeping stay
outside the graph. On an H100 that takes a batch-256 step of a 3B model from ~100 ms (eager: launch overhead) to
~11 ms, against a 1.8 ms weight-read roofline (benchmarks/RESULTS.md). Elsewhere steps run eagerly.

Why not ``model.generate_batch`` (transformers' continuous batching with paged attention, present in v5): it
seeds one global RNG per manager and samples for whatever batch its background thread has assembled, so a
sample depends on its batch-mates and on scheduling timing - not reproducible per request, which resumable
stages need. ``engine.backend=vllm`` (``ssb.vllm_engine``) is the fast path for big GPU runs.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ssb._static_decode import (CudaGraphStep, StaticLayer, fixed_forward, relayout_buffers, round_capacity,
                               supports_fixed_step, with_cache)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    max_new_tokens: int = 512


@dataclass
class Sample:
    token_ids: list[int]  # as sampled; ends with the stop token when finish_reason == "stop"
    text: str  # decoded reply without special tokens
    finish_reason: str  # "stop" | "length"


ProgressHook = Callable[[int, int], None]  # (tokens generated, samples finished) so far in the call


class Engine(Protocol):
    tokenizer: object

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | list[int],
                 progress: ProgressHook | None = None) -> list[list[Sample]]:
        """``len(prompts)`` lists of ``params.n`` samples each, in prompt order; ``seed``: one per call or one per
        prompt (:func:`request_seeds`). ``progress``, if given, is called with the call's cumulative (tokens
        generated, samples finished) as generation advances (an engine may call it only once, at the end), its last
        call giving the totals."""


def sample_seed(seed: int, prompt: list[int], occurrence: int, j: int) -> int:
    """The seed of sample ``j`` of the ``occurrence``-th copy of ``prompt`` in a call (shared with vLLM)."""
    h = hashlib.blake2b(f"{seed}:{occurrence}:{j}:".encode() + array("q", prompt).tobytes(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def request_seeds(prompts: list[list[int]], n: int, seed: int | list[int]) -> list[list[int]]:
    """Per prompt, the seeds of its ``n`` samples. ``seed`` is one call seed (repeated prompts are told apart by
    their occurrence in the call) or one seed per prompt (then a prompt's samples depend on nothing else in the
    call: the stages use this so that results do not depend on how work is cut into batches or waves)."""
    if not isinstance(seed, int):
        if len(seed) != len(prompts):
            raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")
        return [[sample_seed(s, p, 0, j) for j in range(n)] for p, s in zip(prompts, seed)]
    seen: dict[tuple, int] = {}
    out = []
    for p in prompts:
        occ = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
        out.append([sample_seed(seed, p, occ, j) for j in range(n)])
    return out


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Next token per row: argmax when greedy, else temperature -> top-k -> top-p, then inverse-CDF sampling
    with one uniform ``u`` in (0, 1] per row."""
    if params.temperature == 0:
        return logits.argmax(-1)
    x, idx = logits.float() / params.temperature, None
    if params.top_k:
        x, idx = x.topk(min(params.top_k, x.shape[-1]), dim=-1)
    elif params.top_p < 1:
        x, idx = x.sort(dim=-1, descending=True)
    p = x.softmax(-1)
    if params.top_p < 1:  # keep the smallest head of the sorted distribution whose mass reaches top_p
        p = p * ((p.cumsum(-1) - p) < params.top_p)
    c = p.cumsum(-1)
    j = torch.searchsorted(c, (u.to(c.dtype) * c[:, -1]).unsqueeze(1)).clamp_(max=c.shape[-1] - 1)
    return (idx.gather(1, j) if idx is not None else j).squeeze(1)


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


class TransformersEngine:
    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch_size: int = 256,
                 prefill_tokens: int = 16384, cuda_graphs: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_batch_size, self.prefill_tokens, self.cuda_graphs = max_batch_size, prefill_tokens, cuda_graphs
        self.captures = 0  # CUDA graphs captured so far (each decode-buffer allocation captures one)

    def _static_step(self, device: torch.device) -> bool:
        """Whether decode steps use the fixed-shape step (captured in a CUDA graph on CUDA)."""
        return device.type == "cuda" and self.cuda_graphs and supports_fixed_step(self.model)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | list[int],
                 progress: ProgressHook | None = None) -> list[list[Sample]]:
        if not prompts:
            return []
        if any(not p for p in prompts):
            raise ValueError("empty prompt")
        toks = _Decoder(self, prompts, params, seed, progress).run()
        return [[self._sample(toks[i * params.n + j]) for j in range(params.n)] for i in range(len(prompts))]

    def _sample(self, toks: list[int]) -> Sample:
        if toks and toks[-1] in self.stop_ids:
            return Sample(toks, self.tokenizer.decode(toks[:-1], skip_special_tokens=True), "stop")
        return Sample(toks, self.tokenizer.decode(toks, skip_special_tokens=True), "length")


class _Decoder:
    """One ``generate`` call: a queue of samples (sorted by prompt length) fed into a fixed set of rows."""

    def __init__(self, eng: TransformersEngine, prompts, params: SamplingParams, seed: int,
                 progress: ProgressHook | None = None):
        self.eng, self.model, self.prompts, self.params = eng, eng.model, prompts, params
        self.progress = progress
        self.tokens = self.finished = 0  # generated so far in this call (reported to ``progress``)
        self.device = next(self.model.parameters()).device
        self.stops = set(eng.stop_ids)
        self.seeds = request_seeds(prompts, params.n, seed)
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        self.queue = [(i, j) for i in order for j in range(params.n)]  # samples waiting for a row
        self.qpos = 0
        self.prefilled: dict[int, tuple[list, torch.Tensor]] = {}  # prompt -> (per-layer (k, v), last logits)
        self.left = {i: params.n for i in range(len(prompts))}  # samples of a prompt not yet given a row
        self.results: list[list[int] | None] = [None] * (len(prompts) * params.n)
        rows = min(eng.max_batch_size, len(self.queue))
        self.sid = [-1] * rows  # flat sample index per row, -1 = free
        self.start, self.pos, self.out = [0] * rows, [0] * rows, [[] for _ in range(rows)]
        udtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.u = torch.ones(rows, params.max_new_tokens, dtype=udtype)
        self.layers: list[_BufferLayer | StaticLayer] = []
        self.t = 0  # the shared column clock: next column written
        self.static = eng._static_step(self.device)  # fixed-shape steps over StaticLayer buffers
        self.graph = None
        if self.static and self.device.type == "cuda":
            self.graph = CudaGraphStep(lambda inp: fixed_forward(self.model, self.cache, inp), self._captured)

    def _captured(self):
        self.eng.captures += 1

    # ---------------------------------------------------------------- prefill and admission

    def _prefill(self, first: int):
        """Prefill the waiting prompts from queue position ``first`` on, up to the token budget."""
        todo, seen = [], set()
        for i, _ in self.queue[first:]:
            if i in self.prefilled or i in seen:
                continue
            width = max([len(self.prompts[k]) for k in todo] + [len(self.prompts[i])])
            if todo and width * (len(todo) + 1) > self.eng.prefill_tokens:
                break
            todo.append(i)
            seen.add(i)
        width = max(len(self.prompts[i]) for i in todo)
        ids = torch.full((len(todo), width), self.eng.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for g, i in enumerate(todo):
            ids[g, width - len(self.prompts[i]):] = torch.tensor(self.prompts[i])
            mask[g, width - len(self.prompts[i]):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), use_cache=True, logits_to_keep=1,
                         **with_cache(self.model, cache))
        logits = out.logits[:, -1].float()
        for g, i in enumerate(todo):
            n = len(self.prompts[i])
            kv = [(layer.keys[g, :, width - n:], layer.values[g, :, width - n:]) for layer in cache.layers]
            self.prefilled[i] = (kv, logits[g])

    def _admit(self):
        """Give free rows to waiting samples; their first token comes from the prompt's prefill logits."""
        while self.qpos < len(self.queue):
            free = [r for r, s in enumerate(self.sid) if s < 0]
            if not free:
                return
            batch = self.queue[self.qpos: self.qpos + len(free)]
            for k in range(len(batch)):
                if batch[k][0] not in self.prefilled:
                    self._prefill(self.qpos + k)
            self.qpos += len(batch)
            longest = max(len(self.prompts[i]) for i, _ in batch)
            if not self.layers:
                self._alloc(longest)
            elif longest > self.t:  # make room on the left
                lo = self._lo()
                self._relayout(lo, longest - (self.t - lo), max(self._cap(), longest + 1 + self.t - lo))
            rows, logits = free[: len(batch)], []
            for r, (i, j) in zip(rows, batch):
                kv, last = self.prefilled[i]
                n = len(self.prompts[i])
                for layer, (k, v) in zip(self.layers, kv):
                    layer.kbuf[r, :, self.t - n: self.t] = k
                    layer.vbuf[r, :, self.t - n: self.t] = v
                g = torch.Generator().manual_seed(self.seeds[i][j])
                self.u[r] = 1 - torch.rand(self.params.max_new_tokens, generator=g, dtype=self.u.dtype)
                self.sid[r], self.start[r], self.pos[r], self.out[r] = i * self.params.n + j, self.t - n, n, []
                logits.append(last)
                self.left[i] -= 1
                if not self.left[i]:
                    del self.prefilled[i]
            first = pick_tokens(torch.stack(logits), self.u[rows, 0].to(self.device), self.params).tolist()
            for r, tok in zip(rows, first):
                self._push(r, tok)
            if self.progress is not None:
                self.progress(self.tokens, self.finished)

    def _push(self, r: int, tok: int):
        self.out[r].append(tok)
        self.pos[r] += 1
        self.tokens += 1
        if tok in self.stops or len(self.out[r]) >= self.params.max_new_tokens:
            self.results[self.sid[r]] = self.out[r]
            self.sid[r] = -1
            self.finished += 1

    # ---------------------------------------------------------------- the KV buffer

    def _alloc(self, longest: int):
        kv, _ = next(iter(self.prefilled.values()))
        cap = longest + min(self.params.max_new_tokens, 256) + 1
        layer_cls, cap = (StaticLayer, round_capacity(cap)) if self.static else (_BufferLayer, cap)
        for k, _ in kv:
            shape = (len(self.sid), k.shape[0], cap, k.shape[2])
            self.layers.append(layer_cls(k.new_zeros(shape), k.new_zeros(shape), longest))
        self.cache = Cache(layers=self.layers)
        self.t = longest

    def _cap(self) -> int:
        return self.layers[0].kbuf.shape[2]

    def _lo(self) -> int:
        live = [self.start[r] for r, s in enumerate(self.sid) if s >= 0]
        return min(live) if live else self.t

    def _relayout(self, lo: int, off: int, cap: int, rows=None):
        if self.static:  # a fixed-shape buffer moves in place unless it must change shape
            cap = round_capacity(cap)
            if self.graph is not None and (rows is not None or cap != self._cap()):
                self.graph.reset()  # the captured graph writes the old buffers: capture again
        for layer in self.layers:
            layer.relayout(lo, off, cap, rows)
        shift = off - lo
        self.start = [s + shift for s in self.start]
        self.t = self.layers[0].n

    def _housekeep(self):
        live = [r for r, s in enumerate(self.sid) if s >= 0]
        if self.qpos >= len(self.queue) and len(live) <= len(self.sid) // 2:  # nothing waits: drop idle rows
            keep = torch.tensor(live)
            lo = self._lo()
            self._relayout(lo, 0, max(self._cap() - lo, self.t - lo + 1), keep.to(self.device))
            for name in ("sid", "start", "pos", "out"):
                setattr(self, name, [getattr(self, name)[r] for r in live])
            self.u = self.u[keep]
            return
        lo = self._lo()
        if self.t + 1 > self._cap() or lo > max(32, self.t // 2):  # full, or mostly dead columns: compact
            window = self.t - lo + 1
            self._relayout(lo, 0, self._cap() if window <= self._cap() * 3 // 4 else 2 * self._cap())

    # ---------------------------------------------------------------- the loop

    def run(self) -> list[list[int]]:
        while True:
            self._admit()
            if all(s < 0 for s in self.sid):
                break
            self._housekeep()
            self._step()
        return self.results

    def _step(self):
        rows = len(self.sid)
        logits = self._fixed_step() if self.static else self._eager_step()
        steps = torch.tensor([len(o) if s >= 0 else 0 for s, o in zip(self.sid, self.out)])  # the token's index
        u = self.u[torch.arange(rows), steps]
        toks = pick_tokens(logits, u.to(self.device), self.params).tolist()
        for r in range(rows):
            if self.sid[r] >= 0:
                self._push(r, toks[r])
        if self.progress is not None:
            self.progress(self.tokens, self.finished)

    def _fixed_step(self) -> torch.Tensor:
        """Fill column ``t`` of the whole fixed-shape buffer; free rows attend to their own new column only."""
        t = self.t
        inp = torch.tensor([[o[-1], p - 1, st, t] if s >= 0 else [self.eng.pad_id, 0, t, t]
                            for s, o, p, st in zip(self.sid, self.out, self.pos, self.start)])
        logits = self._static_logits(inp.to(self.device))
        for layer in self.layers:
            layer.n += 1
        self.t += 1
        return logits

    def _static_logits(self, inp: torch.Tensor) -> torch.Tensor:
        """The fixed-shape forward: replayed from a CUDA graph on CUDA, run directly elsewhere."""
        return self.graph(inp) if self.graph is not None else fixed_forward(self.model, self.cache, inp)

    def _eager_step(self) -> torch.Tensor:
        ids = torch.tensor([[o[-1] if s >= 0 else self.eng.pad_id] for s, o in zip(self.sid, self.out)])
        pos = torch.tensor([[p - 1 if s >= 0 else 0] for s, p in zip(self.sid, self.pos)])
        start = torch.tensor([st if s >= 0 else self.t for s, st in zip(self.sid, self.start)])
        mask = (torch.arange(self.t + 1)[None] >= start[:, None]).long()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), use_cache=True, logits_to_keep=1,
                         **with_cache(self.model, self.cache))
        self.t = self.layers[0].n
        return out.logits[:, -1]

