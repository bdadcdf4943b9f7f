"""Generation engines: one small interface for rollouts, the teacher, evaluation (and the GRPO baseline).

An engine takes prompts as token ids (already rendered through the chat template by the caller, so every stage
tokenises prompts the same way), samples ``n`` continuations per prompt, and returns for each its token ids *as
sampled* (stop token included when the model stopped), the decoded text, and why it finished.

The parts:

- this module: the interface (:class:`SamplingParams`, :class:`Sample`, :class:`Engine`, the per-sample seeds that
  make results independent of batching);
- :mod:`ssb.engine.factory`: :func:`~ssb.engine.factory.make_engine`, the engine ``engine.backend`` names;
- :mod:`ssb.engine.transformers_engine`: the embedded continuous-batching engine over a plain transformers model
  (the default; no extra dependency);
- :mod:`ssb.engine.kv_buffer`: its preallocated KV cache and every move of it;
- :mod:`ssb.engine.fixed_step`: its fixed-shape decode step and the CUDA graph that replays it;
- :mod:`ssb.engine.windows`: its CPU decode attention, each chunk of rows over its own KV columns;
- :mod:`ssb.engine.vllm_engine`: the vLLM backend (an optional extra), seeded the same way;
- :mod:`ssb.engine.merged`: sampling a model in training (on-policy, GRPO) through a copy with its LoRA merged.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Callable, Protocol


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
DoneHook = Callable[[int, list["Sample"]], None]  # (prompt index, its n samples) once all of them have finished


class Engine(Protocol):
    tokenizer: object

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | list[int],
                 progress: ProgressHook | None = None, on_done: DoneHook | None = None) -> list[list[Sample]]:
        """``len(prompts)`` lists of ``params.n`` samples each, in prompt order; ``seed``: one per call or one per
        prompt (:func:`request_seeds`). ``progress``, if given, is called with the call's cumulative (tokens
        generated, samples finished) as generation advances (an engine may call it only once, at the end), its last
        call giving the totals. ``on_done(i, samples)``, if given, is called once per prompt as soon as its samples
        have all finished (an engine may call it for every prompt at the end), so a caller can save results while a
        long call goes on."""


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
