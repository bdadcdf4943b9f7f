"""Generation engines: one small interface for rollouts, the teacher, evaluation (and the GRPO baseline).

An engine takes prompts as token ids (already rendered through the chat template by the caller, so every stage
tokenises prompts the same way), samples ``n`` continuations per prompt, and returns for each its token ids *as
sampled* (stop token included when the model stopped), the decoded text, and why it finished.

``TransformersEngine`` is the embedded default: left-padded batched ``generate`` with ``num_return_sequences``,
seeded per call, stopping on every end-of-turn id of the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[Sample]]:
        """``len(prompts)`` lists of ``params.n`` samples each, in prompt order."""


class TransformersEngine:
    def __init__(self, model, tokenizer, stop_ids: list[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[Sample]]:
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = params.temperature == 0
        kw = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
            top_p=params.top_p if params.top_p < 1 else None)
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n, eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **kw)
        new = out[:, width:].tolist()
        results = []
        for i in range(len(prompts)):
            results.append([self._sample(new[i * params.n + j]) for j in range(params.n)])
        return results

    def _sample(self, toks: list[int]) -> Sample:
        stops = set(self.stop_ids)
        for k, t in enumerate(toks):
            if t in stops:
                reply = toks[: k + 1]
                return Sample(reply, self.tokenizer.decode(reply[:-1], skip_special_tokens=True), "stop")
        return Sample(toks, self.tokenizer.decode(toks, skip_special_tokens=True), "length")


def make_engine(model_cfg, adapter=None) -> TransformersEngine:
    from ssb.models import load_model, load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, adapter=adapter, merge=adapter is not None)
    return TransformersEngine(model, tokenizer, stop_token_ids(tokenizer, model))
