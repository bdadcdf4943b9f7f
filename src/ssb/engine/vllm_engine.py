"""The vLLM engine (``engine.backend=vllm``; ``pip install ssb[vllm]``): the same interface as the embedded one.

- Seeding: every sample is its own request with ``SamplingParams(n=1, seed=...)``, the seed derived exactly as
  the embedded engine does (:func:`ssb.engine.request_seeds`: call seed, prompt tokens, occurrence, sample
  index), so a prompt's samples do not depend on its batch-mates. The shared prompt is not recomputed: vLLM's
  prefix caching reuses its KV blocks across the ``n`` requests. Samples are *not* equal to the transformers
  engine's (different RNG and kernels); vLLM itself is reproducible only on the same hardware and version, and
  exactly batch-invariant only with ``VLLM_BATCH_INVARIANT=1`` (see vLLM's reproducibility docs).
- Only ``SamplingParams`` apply: nothing is taken from the model's ``generation_config`` (no repetition
  penalty), as in the embedded engine.
- An adapter (evaluation) is served through vLLM's LoRA support (``enable_lora``, ``LoRARequest``), unmerged.
- :meth:`VLLMEngine.prompt_topk_logprobs` returns the top-k log-probs at every position of given sequences via
  ``prompt_logprobs``. Nothing in ssb calls it yet: the top-k teacher cache is built by distill with the
  transformers model, at the training temperature, which this raw (T=1) view cannot give exactly.
- Progress: vLLM runs a call as one ``LLM.generate``, so the ``progress`` hook is called once, at the end, with
  the call's totals (tokens, samples).
- Data parallelism over several GPUs: run one process per GPU on a shard (vLLM's offline data-parallel example);
  ``engine.tensor_parallel_size`` splits one model over GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ssb.engine import DoneHook, ProgressHook, Sample, SamplingParams, request_seeds
from ssb.errors import SsbError


class VLLMEngine:
    def __init__(self, model_cfg, engine_cfg, adapter=None):
        try:
            import vllm
        except ImportError:
            raise SsbError("engine.backend=vllm needs vLLM: pip install 'ssb[vllm]'") from None
        from ssb.models import load_tokenizer, model_path, stop_token_ids

        self._vllm = vllm
        path = model_path(model_cfg)
        self.tokenizer = load_tokenizer(model_cfg)
        kw = dict(model=path, tokenizer=path, trust_remote_code=model_cfg.trust_remote_code,
                  dtype="auto" if model_cfg.dtype == "auto" else model_cfg.dtype,
                  gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
                  tensor_parallel_size=engine_cfg.tensor_parallel_size, enable_prefix_caching=True)
        if model_cfg.revision:
            kw["revision"] = model_cfg.revision
        if engine_cfg.max_model_len:
            kw["max_model_len"] = engine_cfg.max_model_len
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            acfg = Path(adapter) / "adapter_config.json"
            if not acfg.exists():
                raise SsbError(f"not a peft adapter directory (no adapter_config.json): {adapter}")
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_rank(json.loads(acfg.read_text())))
            self.lora = LoRARequest("ssb-adapter", 1, str(Path(adapter).resolve()))
        self.llm = vllm.LLM(**kw)
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(path)
        except OSError:
            gen = None
        holder = type("M", (), {"generation_config": gen})()
        self.stop_ids = stop_token_ids(self.tokenizer, holder)

    def _params(self, params: SamplingParams, seed: int):
        return self._vllm.SamplingParams(
            n=1, temperature=params.temperature, top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p, max_tokens=params.max_new_tokens, seed=seed, stop_token_ids=self.stop_ids,
            repetition_penalty=1.0, skip_special_tokens=True)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | list[int],
                 progress: ProgressHook | None = None, on_done: DoneHook | None = None) -> list[list[Sample]]:
        if not prompts:
            return []
        seeds = request_seeds(prompts, params.n, seed)
        inputs = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(params.n)]
        sps = [self._params(params, s) for row in seeds for s in row]
        outs = self.llm.generate(inputs, sps, lora_request=self.lora, use_tqdm=False)
        flat = [self._sample(o.outputs[0]) for o in outs]
        if progress is not None:  # one call, at the end: vLLM generates the whole call at once
            progress(sum(len(s.token_ids) for s in flat), len(flat))
        out = [flat[i * params.n: (i + 1) * params.n] for i in range(len(prompts))]
        for i, samples in enumerate(out if on_done is not None else ()):  # at the end: vLLM returns the call whole
            on_done(i, samples)
        return out

    def _sample(self, c) -> Sample:
        ids = list(c.token_ids)
        stops = set(self.stop_ids)
        if c.finish_reason == "stop" and (not ids or ids[-1] not in stops):  # stop token left out of the ids
            ids.append(c.stop_reason if isinstance(c.stop_reason, int) else self.stop_ids[0])
        if ids and ids[-1] in stops:
            return Sample(ids, self.tokenizer.decode(ids[:-1], skip_special_tokens=True), "stop")
        return Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True), "length")

    def prompt_topk_logprobs(self, sequences: list[list[int]], k: int) -> list[list[list[tuple[int, float]]]]:
        """For each sequence (prompt + reply ids), per position ``p >= 1``, the ``k`` most likely tokens at ``p``
        given ``seq[:p]`` as ``(token_id, logprob)``, most likely first (``len(seq) - 1`` lists; position 0 has no
        prediction). Log-probs are of the raw model distribution (temperature 1, no top-k/top-p)."""
        sp = self._vllm.SamplingParams(n=1, max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sp,
                                 lora_request=self.lora, use_tqdm=False)
        result = []
        for o in outs:
            rows = []
            for d in (o.prompt_logprobs or [])[1:]:  # vLLM adds the actual token when it is outside the top-k
                top = sorted(d.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))
                rows.append([(tid, lp.logprob) for tid, lp in top[:k]])
            result.append(rows)
        return result


def _lora_rank(adapter_cfg: dict) -> int:
    ranks = [adapter_cfg.get("r", 8), *(adapter_cfg.get("rank_pattern") or {}).values()]
    r = max(ranks)
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):  # vLLM accepts these max_lora_rank values
        if r <= allowed:
            return allowed
    return r
