"""Loading the base model, its tokenizer and (optionally) a peft adapter, and rendering chats to token ids.

Weights load as safetensors (``use_safetensors=True``), ``trust_remote_code`` stays off unless the config asks,
and the name ``ssb-tiny-arith`` resolves to the tiny CPU model built by :mod:`ssb.tiny`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ssb.config import ModelConfig
from ssb.errors import SsbError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[cfg.dtype]


def model_path(cfg: ModelConfig) -> str:
    from ssb.tiny import TINY_MODEL_NAME, ensure_tiny_model

    if cfg.name_or_path == TINY_MODEL_NAME:
        return str(ensure_tiny_model())
    return cfg.name_or_path


def _source_kwargs(cfg: ModelConfig) -> dict:
    kw = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    return kw


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_source_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise SsbError(f"cannot load tokenizer from '{path}': {str(e).splitlines()[0]}") from None
    if not tok.chat_template:
        raise SsbError(f"tokenizer of '{path}' has no chat template; ssb needs a chat model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, adapter: str | Path | None = None, merge: bool = False, device=None):
    """The base causal LM on its device, in eval mode; with ``adapter``, a PeftModel (merged if ``merge``)."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg.device)
    path = model_path(cfg)
    kw = _source_kwargs(cfg)
    if not cfg.gguf_file:
        kw["use_safetensors"] = True
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(cfg, device), **kw)
    except (OSError, ValueError) as e:
        raise SsbError(f"cannot load model from '{path}': {str(e).splitlines()[0]}") from None
    if cfg.gguf_file:  # GGUF weights arrive dequantised: make it a plain model (trainable, saveable)
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(device)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise SsbError(f"not a peft adapter directory (no adapter_config.json): {adapter}")
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends an assistant turn: the tokenizer's eos, the generation config's eos, and common
    end-of-turn tokens of chat templates (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``) when present."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>") if t in vocab]
    return sorted(set(ids))


def render_chat(tokenizer, messages: list[dict], chat_template: bool = True) -> list[int]:
    """Token ids of a chat up to and including the assistant's generation prompt.

    ``chat_template=False`` reproduces the authors' student input: the plain text of the messages, no template.
    """
    if chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]
