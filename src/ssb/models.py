"""Loading the base model, its tokenizer and (optionally) a peft adapter, and rendering chats to token ids.

Weights load as safetensors (``use_safetensors=True``), ``trust_remote_code`` stays off unless the config asks,
and the name ``ssb-tiny-arith`` resolves to the tiny CPU model built by :mod:`ssb.tiny`.

A GGUF model (``model.gguf_file``) is dequantised by transformers once per (file content, dtype) and saved with
``save_pretrained`` (safetensors, tokenizer, config) into ``$SSB_CACHE/models/<sha256[:16]>-<dtype>/``
(:func:`gguf_cache_dir`); every load reads that directory, so the minutes of dequantisation are paid once, not
once per stage or per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from ssb.atomic import publish_once, write_text
from ssb.config import ModelConfig
from ssb.errors import SsbError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_cpu_bf16() -> str | None:
    """How this CPU multiplies bf16 natively: ``"amx"`` (Intel AMX tiles), ``"avx512_bf16"``, or None (bf16 would be
    emulated, slower than fp32). ``$SSB_CPU_BF16=0`` / ``=1`` overrides the check (the test suite sets 0, so that it
    runs the same on every CPU; 1 fakes a native CPU)."""
    forced = os.environ.get("SSB_CPU_BF16")
    if forced is not None:
        return None if forced.strip().lower() in ("0", "false", "no", "") else "forced"
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return None


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``model.dtype``, with ``auto`` resolved: bf16 on CUDA and on a CPU that multiplies bf16 natively
    (:func:`native_cpu_bf16`; 3-8x the fp32 matrix rate measured on AMX, 2.8x on AVX512-BF16), fp32 elsewhere."""
    if cfg.dtype == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16() is not None)
        return torch.bfloat16 if native else torch.float32
    return _DTYPES[cfg.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_identity(cfg: ModelConfig) -> dict:
    """What a stage's fingerprint records of ``model`` (:meth:`ssb.reads.Reads.values`): the fields as
    configured, with ``dtype: auto`` resolved on this machine, and for a local GGUF file its content (sha256) in place
    of where it lies (``name_or_path``, ``gguf_file``, ``revision``), so that a run directory restored on another
    machine continues wherever the same model file is."""
    from dataclasses import asdict

    out = asdict(cfg)
    if cfg.dtype == "auto":
        try:
            out["dtype"] = dtype_name(resolve_dtype(cfg, resolve_device(cfg.device)))
        except RuntimeError:  # not a device name: loading will say so
            pass
    local = _local_gguf(cfg)
    if local is not None:
        for k in ("name_or_path", "gguf_file", "revision"):
            out.pop(k)
        out["gguf_sha256"] = file_sha256(local, gguf_models_dir() / GGUF_HASH_INDEX)
    return out


def _local_gguf(cfg: ModelConfig) -> Path | None:
    """The GGUF file of ``cfg`` when it is on this machine (no hub lookup), else None."""
    if not cfg.gguf_file:
        return None
    for p in (Path(str(cfg.gguf_file)).expanduser(), Path(str(cfg.name_or_path)).expanduser() / str(cfg.gguf_file)):
        if p.is_file():
            return p
    return None


ANNOUNCED: set = set()


def _announce(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Say once per process which dtype the model runs in, and why when ``auto`` chose it."""
    key = (str(device), dtype)
    if key in ANNOUNCED:
        return
    ANNOUNCED.add(key)
    why = ""
    if cfg.dtype == "auto":
        native = native_cpu_bf16() if device.type == "cpu" else None
        forced = f", SSB_CPU_BF16={os.environ['SSB_CPU_BF16']}" if "SSB_CPU_BF16" in os.environ else ""
        why = (" (auto: CUDA)" if device.type == "cuda" else f" (auto: this CPU multiplies bf16 natively, {native})"
               if dtype == torch.bfloat16 else f" (auto: this CPU has no native bf16 matrix multiply{forced})")
    print(f"ssb: model dtype {dtype_name(dtype)} on {device}{why}", file=sys.stderr, flush=True)


def looks_like_path(name: str) -> bool:
    """A name meant as a local directory rather than a hub id (``org/name``): absolute, relative with ``.`` or
    ``~``, or with more than one ``/``.

    >>> [looks_like_path(n) for n in ("Qwen/Qwen2.5-3B-Instruct", "/models/qwen", "./qwen", "~/m", "a/b/c")]
    [False, True, True, True, True]
    """
    return (name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name
            or name.count("/") > 1 or name.endswith("/"))


def model_path(cfg: ModelConfig) -> str:
    """Where the model loads from; a local path that does not exist is an error naming it (not the hub's
    complaint about repository ids)."""
    from ssb.tiny import TINY_MODEL_NAME, ensure_tiny_model

    if cfg.name_or_path == TINY_MODEL_NAME:
        return str(ensure_tiny_model())
    path = Path(cfg.name_or_path).expanduser()
    if looks_like_path(cfg.name_or_path) and not path.exists():
        raise SsbError(f"model.name_or_path: no such directory: {cfg.name_or_path}")
    return str(path) if path.exists() else cfg.name_or_path


def source_kwargs(cfg: ModelConfig) -> dict:
    kw = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    return kw


# ---------------------------------------------------------------- GGUF, converted once

GGUF_HASH_INDEX = "gguf-sha256.json"  # in $SSB_CACHE/models: remembered hashes of GGUF files


def gguf_models_dir() -> Path:
    from ssb.tiny import cache_root

    return cache_root() / "models"


def file_sha256(path: str | Path, index_file: str | Path) -> str:
    """The sha256 (hex) of ``path``, remembered in the JSON ``index_file`` under the resolved path together with
    the file's size and ``mtime_ns``: a file unchanged since it was hashed is not read again. A stale or unreadable
    index only costs a re-hash; an index that cannot be written is skipped."""
    path, index_file = Path(path).resolve(), Path(index_file)
    st = path.stat()
    entry = _read_json(index_file).get(str(path))
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    index = _read_json(index_file)  # again: another process may have added entries meanwhile
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        write_text(index_file, json.dumps(index, indent=1, sort_keys=True))
    except (OSError, SsbError):
        pass
    return digest


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def gguf_source(cfg: ModelConfig) -> Path:
    """The local GGUF file of ``cfg``, found the way transformers finds it: ``gguf_file`` as a path, else inside
    the ``name_or_path`` directory, else from the hub (or its local cache) at ``revision``."""
    if Path(cfg.gguf_file).is_file():
        return Path(cfg.gguf_file)
    path = model_path(cfg)
    if (Path(path) / cfg.gguf_file).is_file():
        return Path(path) / cfg.gguf_file
    from transformers.utils import cached_file

    try:
        found = cached_file(path, cfg.gguf_file, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise SsbError(f"cannot find GGUF file '{cfg.gguf_file}' in '{path}': {str(e).splitlines()[0]}") from None
    if not found:
        raise SsbError(f"cannot find GGUF file '{cfg.gguf_file}' in '{path}'")
    return Path(found)


def is_converted(d: Path) -> bool:
    """Whether ``d`` is a finished GGUF conversion (config, tokenizer and safetensors weights)."""
    return (d / "config.json").is_file() and (d / "tokenizer_config.json").is_file() and any(d.glob("*.safetensors"))


def converted_gguf_dir(cfg: ModelConfig) -> Path | None:
    """A finished conversion of ``cfg``'s GGUF model in any dtype (the first by name), or None; converts nothing."""
    models = gguf_models_dir()
    key = file_sha256(gguf_source(cfg), models / GGUF_HASH_INDEX)[:16]
    return next((d for d in sorted(models.glob(f"{key}-*")) if is_converted(d)), None)


def gguf_cache_dir(cfg: ModelConfig, dtype: torch.dtype | None = None) -> Path:
    """The directory holding ``cfg``'s GGUF model dequantised to ``dtype`` (safetensors weights, config, tokenizer),
    converting it on first use. Without ``dtype`` (the tokenizer's case) any converted dtype of the same file will
    do, else the default dtype of ``cfg.device``.

    The directory is ``$SSB_CACHE/models/<first 16 hex of the file's sha256>-<dtype>``. It is written into a
    temporary directory and renamed into place, so it is whole or absent. Concurrent processes (torchrun ranks)
    take a file lock so that one converts while the others wait; where locks do not work, each converts and the
    loser of the rename discards its copy.
    """
    src = gguf_source(cfg)
    models = gguf_models_dir()
    models.mkdir(parents=True, exist_ok=True)
    key = file_sha256(src, models / GGUF_HASH_INDEX)[:16]
    if dtype is None:
        done = converted_gguf_dir(cfg)
        if done is not None:
            return done
        dtype = resolve_dtype(cfg, resolve_device(cfg.device))
    out = models / f"{key}-{dtype_name(dtype)}"
    if is_converted(out):
        return out
    with _file_lock(models / f".{out.name}.lock"):
        if is_converted(out):  # another process converted it while we waited
            return out
        print(f"ssb: converting GGUF {src} once to {out}", file=sys.stderr, flush=True)
        return publish_once(out, lambda tmp: convert_gguf(cfg, dtype, tmp), is_converted)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` while the block runs; no lock where the platform or file system has none."""
    try:
        import fcntl

        f = open(path, "a")
    except (ImportError, OSError):
        f = fcntl = None
    try:
        if f is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        if f is not None:
            f.close()


def convert_gguf(cfg: ModelConfig, dtype: torch.dtype, out: Path) -> None:
    """Dequantise the GGUF model and its tokenizer through transformers and save both to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:  # transformers' own message names neither the package nor the fix
        raise SsbError(f"reading the GGUF model '{cfg.gguf_file}' needs the gguf package: pip install 'ssb[gguf]' "
                       "(or pip install 'gguf>=0.10')")
    path, kw = model_path(cfg), source_kwargs(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise SsbError(f"cannot load GGUF model '{cfg.gguf_file}' from '{path}': {str(e).splitlines()[0]}") from None
    # GGUF weights arrive dequantised but marked quantised: make it a plain model so it saves (and loads) as one
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _load_source(cfg: ModelConfig, dtype: torch.dtype | None = None) -> tuple[str, dict]:
    """Where to load from and how: the converted directory for a GGUF model, else the configured source."""
    if cfg.gguf_file:
        return str(gguf_cache_dir(cfg, dtype)), {"trust_remote_code": cfg.trust_remote_code}
    return model_path(cfg), source_kwargs(cfg)


# ---------------------------------------------------------------- loading


def metadata_source(cfg: ModelConfig) -> tuple[str, dict]:
    """Where ``cfg``'s tokenizer and config can be read without converting anything or loading weights: a GGUF
    model's converted directory if one exists, else the configured source (a GGUF file's metadata)."""
    if cfg.gguf_file:
        done = converted_gguf_dir(cfg)
        if done is not None:
            return str(done), {"trust_remote_code": cfg.trust_remote_code}
    return model_path(cfg), source_kwargs(cfg)


def load_tokenizer(cfg: ModelConfig, source: tuple[str, dict] | None = None):
    """The tokenizer every stage uses (pad = eos if it has none); ``source``: (path, kwargs) to read it from
    instead of :func:`_load_source` (e.g. :func:`metadata_source`, which converts nothing)."""
    from transformers import AutoTokenizer

    path, kw = source or _load_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
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
    dtype = resolve_dtype(cfg, device)
    _announce(cfg, device, dtype)
    path, kw = _load_source(cfg, dtype)
    kw["use_safetensors"] = True
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise SsbError(f"cannot load model from '{path}': {str(e).splitlines()[0]}") from None
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


def lora_config(dc):
    """The peft ``LoraConfig`` of the ``distill`` section's LoRA fields (r, α, dropout, target modules): the one
    adapter shape of SSB's student and of its baselines (SFT, RFT, GRPO)."""
    from peft import LoraConfig

    targets = dc.target_modules if dc.target_modules == "all-linear" else [
        t.strip() for t in dc.target_modules.split(",") if t.strip()]
    return LoraConfig(r=dc.lora_r, lora_alpha=dc.lora_alpha, lora_dropout=dc.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


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
