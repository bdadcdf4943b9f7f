"""The embedded engine (``engine.backend=transformers``, the default) behind :class:`ssb.engine.Engine`.

``TransformersEngine`` is the embedded default (no extra dependency). It runs its own continuous-batching loop
over the plain transformers model:

- every prompt is prefilled once (prompts of similar length together, left-padded) and its KV copied into the
  ``n`` rows that sample from it;
- up to ``max_batch_size`` rows decode together; a row that finishes is refilled with a waiting sample at the next
  step, so no row idles until the longest finishes, and idle rows are dropped once nothing waits;
- the KV cache is a preallocated buffer written in place (no per-step concatenation), compacted when its
  leading columns are dead (:mod:`ssb.engine.kv_buffer`); bf16 on GPU comes from the model's dtype;
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
- ``generate(..., on_done=hook)`` calls ``hook(i, samples)`` once per prompt as soon as its ``n`` samples have all
  finished, so a caller saves results while one long call keeps every row busy (:func:`ssb.stages.generate.generate_rows`).

A call is a :class:`Scheduler`: it queues the samples, prefills and admits them into rows (one record per busy
row: its sample, first KV column, length, uniforms and tokens), steps and samples; the rows' keys and values, the
column clock they share and every move of them are a :class:`ssb.engine.kv_buffer.KVBuffer`.

On CUDA (``cuda_graphs=True``, models with full attention only) a decode step is a fixed-shape computation over the
whole buffer (``ssb.engine.fixed_step``), captured once in a CUDA graph and replayed; compaction moves columns inside
the same buffer, so only a reallocation (more columns, fewer rows) captures again. Sampling and bookkeeping stay
outside the graph. On an H100 that takes a batch-256 step of a 3B model from ~100 ms (eager: launch overhead) to
~11 ms, against a 1.8 ms weight-read roofline (benchmarks/RESULTS.md). Elsewhere steps run eagerly.

Why not ``model.generate_batch`` (transformers' continuous batching with paged attention, present in v5): it
seeds one global RNG per manager and samples for whatever batch its background thread has assembled, so a
sample depends on its batch-mates and on scheduling timing - not reproducible per request, which resumable
stages need. ``engine.backend=vllm`` (``ssb.engine.vllm_engine``) is the fast path for big GPU runs.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from ssb.engine import DoneHook, ProgressHook, Sample, SamplingParams, request_seeds, windows
from ssb.engine.fixed_step import supports_fixed_step, with_cache
from ssb.engine.kv_buffer import KVBuffer


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Next token per row: argmax when greedy, else temperature -> top-k -> top-p, then inverse-CDF sampling
    with one uniform ``u`` in (0, 1] per row."""
    if params.temperature == 0:
        return logits.max(-1).indices  # argmax's rule (the first maximum); 3.5x faster than argmax in bf16 on CPU
    k, idx = min(params.top_k, logits.shape[-1]), None
    if k and logits.dtype in (torch.bfloat16, torch.float16):
        # select in the model's dtype (on CPU 3x faster than through an fp32 copy of the whole vocabulary); the
        # values kept are the ones the fp32 path keeps, each divided by the temperature in fp32 as there
        x, idx = logits.topk(k, dim=-1)
        x = x.float() / params.temperature
    else:
        x = logits.float() / params.temperature
        if k:
            x, idx = x.topk(k, dim=-1)
        elif params.top_p < 1:
            x, idx = x.sort(dim=-1, descending=True)
    p = x.softmax(-1)
    if params.top_p < 1:  # keep the smallest head of the sorted distribution whose mass reaches top_p
        p = p * ((p.cumsum(-1) - p) < params.top_p)
    c = p.to(u.dtype).cumsum(-1)  # at the uniforms' precision (float64 but on MPS): over a whole vocabulary an fp32
    # sum stops growing for tokens under half its ulp (~3e-8 past 0.5), which then could never be drawn
    j = torch.searchsorted(c, (u * c[:, -1]).unsqueeze(1)).clamp_(max=c.shape[-1] - 1)
    return (idx.gather(1, j) if idx is not None else j).squeeze(1)


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def _contiguous_lm_head(model) -> None:
    """Make the output head's input contiguous (once per model). A prefill keeps only the last position's logits, and
    the hidden states' last column (``[b, 1, h]`` sliced out of ``[b, n, h]``) is not contiguous: when no parameter
    requires grad (a merged adapter), ``torch.matmul`` then expands the head's weight into a batched product, copied
    (b x h x vocab: 50 GB for a 184-prompt prefill of a 151,936-token vocabulary, and 3.5x slower than the base
    model). A contiguous input is one matrix product whatever the grad flags; on a contiguous input this is a no-op."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_ssb_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._ssb_contiguous_input = True


def default_prefill_tokens(device: torch.device) -> int:
    """Prompt tokens per prefill forward when ``engine.prefill_tokens`` is None: 2048 on a CPU (the testbed's prefill
    ran 2.0x faster than at 16384: the elementwise passes over a big forward's activations miss the caches;
    benchmarks/RESULTS.md), 16384 elsewhere."""
    return 2048 if device.type == "cpu" else 16384


class TransformersEngine:
    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch_size: int = 256,
                 prefill_tokens: int | None = None, cuda_graphs: bool = True, windowed: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_batch_size, self.cuda_graphs = max_batch_size, cuda_graphs
        self.prefill_tokens = prefill_tokens or default_prefill_tokens(next(model.parameters()).device)
        self.windowed = windowed
        self.captures = 0  # CUDA graphs captured so far (each decode-buffer allocation captures one)
        _contiguous_lm_head(model)

    def uses_fixed_step(self, device: torch.device) -> bool:
        """Whether decode steps use the fixed-shape step (captured in a CUDA graph on CUDA)."""
        return device.type == "cuda" and self.cuda_graphs and supports_fixed_step(self.model)

    def uses_windows(self, device: torch.device) -> bool:
        """Whether eager decode steps attend per chunk of rows over its own KV columns (:mod:`ssb.engine.windows`):
        on a CPU, for full-attention models."""
        return device.type == "cpu" and self.windowed and supports_fixed_step(self.model)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | list[int],
                 progress: ProgressHook | None = None, on_done: DoneHook | None = None) -> list[list[Sample]]:
        if not prompts:
            return []
        if any(not p for p in prompts):
            raise ValueError("empty prompt")
        done = Scheduler(self, prompts, params, seed, progress, on_done).run()
        return [done[i * params.n: (i + 1) * params.n] for i in range(len(prompts))]

    def _sample(self, toks: list[int]) -> Sample:
        if toks and toks[-1] in self.stop_ids:
            return Sample(toks, self.tokenizer.decode(toks[:-1], skip_special_tokens=True), "stop")
        return Sample(toks, self.tokenizer.decode(toks, skip_special_tokens=True), "length")


@dataclass(slots=True)
class _Row:
    """A sample holding a row: its flat index, the row's first live KV column, its length so far (prompt and tokens
    sampled), its uniforms (one per token) and the tokens sampled."""

    sample: int
    start: int
    length: int
    u: array
    out: list[int] = field(default_factory=list)


class Scheduler:
    """One ``generate`` call: a queue of samples (sorted by prompt length) fed into a fixed set of rows of a
    :class:`ssb.engine.kv_buffer.KVBuffer`. ``rows[r]`` is the sample in row ``r`` (``None``: idle); ``step()`` is one
    decode step of every row (samples the next tokens; the benchmarks time it)."""

    def __init__(self, eng: TransformersEngine, prompts: list[list[int]], params: SamplingParams,
                 seed: int | list[int], progress: ProgressHook | None = None, on_done: DoneHook | None = None):
        self.eng, self.model, self.prompts, self.params = eng, eng.model, prompts, params
        self.progress, self.on_done = progress, on_done
        self.running = [params.n] * len(prompts)  # samples of a prompt not yet finished
        self.tokens = self.finished = 0  # generated so far in this call (reported to ``progress``)
        self.device = next(self.model.parameters()).device
        self.stops = set(eng.stop_ids)
        self.seeds = request_seeds(prompts, params.n, seed)
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        self.queue = [(i, j) for i in order for j in range(params.n)]  # samples waiting for a row
        self.qpos = 0
        self.prefilled: dict[int, tuple[list, torch.Tensor]] = {}  # prompt -> (per-layer (k, v), last logits)
        self.left = {i: params.n for i in range(len(prompts))}  # samples of a prompt not yet given a row
        self.results: list[Sample | None] = [None] * (len(prompts) * params.n)  # decoded once, as each finishes
        self.rows: list[_Row | None] = [None] * min(eng.max_batch_size, len(self.queue))
        self.udtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.buffer = KVBuffer(self.model, len(self.rows), self.device, eng.uses_fixed_step(self.device),
                               on_capture=self._captured, windowed=eng.uses_windows(self.device))

    def _captured(self):
        self.eng.captures += 1

    def run(self) -> list[Sample]:
        while True:
            self._admit()
            if all(row is None for row in self.rows):
                break
            self._housekeep()
            self.step()
        return self.results

    # ---------------------------------------------------------------- prefill and admission

    def prefill(self, first: int):
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
        """Give idle rows to waiting samples; their first token comes from the prompt's prefill logits."""
        while self.qpos < len(self.queue):
            free = [r for r, row in enumerate(self.rows) if row is None]
            if not free:
                return
            batch = self.queue[self.qpos: self.qpos + len(free)]
            for k in range(len(batch)):
                if batch[k][0] not in self.prefilled:
                    self.prefill(self.qpos + k)
            self.qpos += len(batch)
            self._make_room(max(len(self.prompts[i]) for i, _ in batch))
            rows = free[: len(batch)]
            logits = torch.stack([self._seat(r, i, j) for r, (i, j) in zip(rows, batch)])
            u = torch.tensor([self.rows[r].u[0] for r in rows], dtype=self.udtype)
            for r, tok in zip(rows, pick_tokens(logits, u.to(self.device), self.params).tolist()):
                self._push(r, tok)
            if self.progress is not None:
                self.progress(self.tokens, self.finished)

    def _make_room(self, longest: int):
        """Columns before the clock for the longest prompt admitted next (allocating the buffer the first time)."""
        if not self.buffer.layers:
            kv, _ = next(iter(self.prefilled.values()))
            self.buffer.allocate(kv, longest, min(self.params.max_new_tokens, 256))
        else:
            self._shift(self.buffer.make_room(longest, self._lo()))

    def _seat(self, r: int, i: int, j: int) -> torch.Tensor:
        """Sample ``j`` of prompt ``i`` into row ``r``: its prompt's KV and its uniforms; the prompt's last logits."""
        kv, last = self.prefilled[i]
        g = torch.Generator().manual_seed(self.seeds[i][j])
        u = 1 - torch.rand(self.params.max_new_tokens, generator=g, dtype=self.udtype)
        self.rows[r] = _Row(i * self.params.n + j, self.buffer.write(r, kv), len(self.prompts[i]),
                            array("d" if self.udtype == torch.float64 else "f", u.tolist()))
        self.left[i] -= 1
        if not self.left[i]:
            del self.prefilled[i]
        return last

    def _push(self, r: int, tok: int):
        row = self.rows[r]
        row.out.append(tok)
        row.length += 1
        self.tokens += 1
        if tok in self.stops or len(row.out) >= self.params.max_new_tokens:
            self.results[row.sample] = self.eng._sample(row.out)
            self.rows[r] = None
            self.finished += 1
            n = self.params.n
            i = row.sample // n
            self.running[i] -= 1
            if not self.running[i] and self.on_done is not None:
                self.on_done(i, self.results[i * n: (i + 1) * n])

    # ---------------------------------------------------------------- the buffer's layout

    def _lo(self) -> int:
        """The first live column: the smallest start of a busy row (the clock when none is busy)."""
        return min((row.start for row in self.rows if row is not None), default=self.buffer.t)

    def _shift(self, by: int):
        for row in self.rows:
            if row is not None:
                row.start += by

    def _housekeep(self):
        """Before a step: drop idle rows once nothing waits and at most half are busy, else reorder the rows by age
        when windowed attention gains from it (:func:`ssb.engine.windows.resort_order`), else compact if due."""
        busy = [r for r, row in enumerate(self.rows) if row is not None]
        if self.qpos >= len(self.queue) and len(busy) <= len(self.rows) // 2:
            self._keep(busy)
        elif (order := self._age_order()) is not None:
            self._keep(order)
        else:
            self._shift(self.buffer.compact(self._lo()))

    def _age_order(self) -> list[int] | None:
        """The rows sorted by age when windowed attention gains enough from it, else None."""
        if not self.buffer.windowed:
            return None
        t = self.buffer.t
        return windows.resort_order([row.start if row is not None else t for row in self.rows], t)

    def _keep(self, rows: list[int]):
        """Keep ``rows`` of the buffer, in that order."""
        self._shift(self.buffer.keep_rows(rows, self._lo()))
        self.rows = [self.rows[r] for r in rows]

    # ---------------------------------------------------------------- the step

    def step(self):
        """One decode step: every busy row's next token, sampled with its next uniform."""
        t = self.buffer.t
        logits = self.buffer.step([(row.out[-1], row.length - 1, row.start) if row is not None
                                   else (self.eng.pad_id, 0, t) for row in self.rows])
        u = torch.tensor([row.u[len(row.out)] if row is not None else 1.0 for row in self.rows], dtype=self.udtype)
        toks = pick_tokens(logits, u.to(self.device), self.params).tolist()
        for r, tok in enumerate(toks):
            if self.rows[r] is not None:
                self._push(r, tok)
        if self.progress is not None:
            self.progress(self.tokens, self.finished)
