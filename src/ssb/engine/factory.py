"""Which engine a stage generates with, chosen by ``engine.backend``: the embedded transformers engine
(:mod:`ssb.engine.transformers_engine`) or vLLM (:mod:`ssb.engine.vllm_engine`, an optional extra, imported only when
asked for). The engines import only the interface (:mod:`ssb.engine`); this module sits above them."""

from __future__ import annotations

from ssb.engine import Engine
from ssb.engine.transformers_engine import TransformersEngine
from ssb.models import load_model, load_tokenizer, stop_token_ids


def make_engine(model_cfg, adapter=None, engine_cfg=None) -> Engine:
    """The engine selected by ``engine_cfg.backend`` (default: the embedded transformers engine); with
    ``adapter``, the peft adapter is merged (transformers) or served as a LoRA (vLLM)."""
    if engine_cfg is not None and engine_cfg.backend == "vllm":
        from ssb.engine.vllm_engine import VLLMEngine  # an optional extra: imported only when asked for

        return VLLMEngine(model_cfg, engine_cfg, adapter=adapter)
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, adapter=adapter, merge=adapter is not None)
    kw = {} if engine_cfg is None else dict(max_batch_size=engine_cfg.max_batch_size,
                                            prefill_tokens=engine_cfg.prefill_tokens,
                                            cuda_graphs=engine_cfg.cuda_graphs)
    return TransformersEngine(model, tokenizer, stop_token_ids(tokenizer, model), **kw)
