"""A tiny, download-free chat model for smoke runs and tests.

``build_tiny_model`` trains a byte-level BPE tokenizer and fits a genuine two-layer ``Qwen2ForCausalLM`` for a few
seconds on single-digit addition chats, then saves both with ``save_pretrained`` so the pipeline loads it exactly like
a hub model (``AutoModelForCausalLM`` / ``AutoTokenizer``). Its behaviour is shaped to make every SSB stage non-empty:

* on the bare student prompt the replies carry ~35% label noise, so sampled rollouts are a mix of right and wrong;
* on the hinted teacher prompt (``teacher_messages``) the reply is almost always the correct one.

``ensure_tiny_model`` caches the build (``$SSB_CACHE`` or ``~/.cache/ssb/tiny-arith-v2``); configs refer to it by
``TINY_MODEL_NAME``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from ssb.atomic import publish_once
from ssb.prompts import TEACHER_PROMPTS, student_messages, teacher_messages

TINY_MODEL_NAME = "ssb-tiny-arith"
DEFAULT_STEPS = 300

STUDENT_NOISE = 0.35  # probability that a student-format training reply has a wrong answer
TEACHER_NOISE = 0.05  # same, for the hinted teacher format
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer split: every digit is its own pre-token, so each digit becomes its own token.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def question(a: int, b: int) -> str:
    """Same wording as ``ssb.data.arith_problems``."""
    return f"What is {a} + {b}?"


def reply(a: int, b: int, c: int) -> str:
    return f"{a} + {b} = {c}.\nThe answer is \\boxed{{{c}}}."


def _wrong(rng: random.Random, c: int) -> int:
    return max(0, c + rng.choice([-2, -1, 1, 2])) if c > 1 else c + rng.choice([1, 2])


def _student_example(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    a, b = rng.randrange(10), rng.randrange(10)
    c = _wrong(rng, a + b) if rng.random() < STUDENT_NOISE else a + b
    return student_messages(question(a, b)), reply(a, b, c)


def _teacher_example(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    a, b = rng.randrange(10), rng.randrange(10)
    good, bad = reply(a, b, a + b), reply(a, b, _wrong(rng, a + b))
    c = _wrong(rng, a + b) if rng.random() < TEACHER_NOISE else a + b
    prompt = rng.choice(TEACHER_PROMPTS)  # every teacher-prompt variant, so teach.prompt can be switched
    return teacher_messages(question(a, b), good, bad, prompt=prompt, answer=str(a + b)), reply(a, b, c)


def _build_tokenizer(corpus: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _encode(tok, examples) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; loss only on the reply and its closing <|im_end|>."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    nl = tok.encode("\n", add_special_tokens=False)
    cache: dict[str, list[int]] = {}  # few distinct texts: render and tokenise each once

    def ids(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tok.encode(text, add_special_tokens=False)
        return cache[text]

    rows = []
    for msgs, rep in examples:
        p = ids(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        r = ids(rep) + [end]
        rows.append((p + r + nl, [-100] * len(p) + r + [-100] * len(nl)))
    return rows


def _batch(rows, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def _fit(model, student, teacher, pad_id: int, *, steps: int, lr: float, sizes: tuple[int, int]) -> None:
    """AdamW with warm-up and linear decay; each step takes one batch of student chats and one of teacher chats.
    The logits are computed only where there is a label (the reply), which is most of the saving on long prompts."""
    import torch
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(1, steps)))
    for step in range(steps):
        for part, bs in zip((student, teacher), sizes):
            ids, mask, labels = _batch(part[step * bs : (step + 1) * bs], pad_id)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            targets = labels[:, 1:]
            keep = targets != -100
            F.cross_entropy(model.lm_head(hidden[keep]), targets[keep]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    teacher_batch_size: int = 16,
    lr: float = 1e-2,
    hidden_size: int = 96,
) -> Path:
    """Build tokenizer + tiny Qwen2 model, fit it briefly on arithmetic chats (student format and teacher format),
    save both to ``out_dir`` with ``save_pretrained`` (safetensors), return ``out_dir``.

    Deterministic for a seed on one machine. Each step uses one batch of student chats and one of teacher chats.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    rng = random.Random(seed)
    students = [_student_example(rng) for _ in range(batch_size * max(steps, 1))]
    teachers = [_teacher_example(rng) for _ in range(teacher_batch_size * max(steps, 1))]
    sample = students[:200] + teachers[:200]
    corpus = [m["content"] for msgs, _ in sample for m in msgs] + [rep for _, rep in sample]
    corpus += ["system", "user", "assistant"]
    tok = _build_tokenizer(corpus)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")

    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=end_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        use_sliding_window=False,
    )
    student, teacher = _encode(tok, students), _encode(tok, teachers)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a busy machine, and bit-reproducible
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
            _fit(model, student, teacher, pad_id, steps=steps, lr=lr, sizes=(batch_size, teacher_batch_size))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=end_id, pad_token_id=pad_id, bos_token_id=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def cache_root() -> Path:
    """ssb's cache directory: ``$SSB_CACHE``, else ``~/.cache/ssb`` (the tiny model, converted GGUF models)."""
    root = os.environ.get("SSB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "ssb"


def default_cache_dir() -> Path:
    return cache_root() / "tiny-arith-v2"


def ensure_tiny_model(out_dir: str | Path | None = None) -> Path:
    """Return a directory holding the tiny model, building it if missing (default: ``$SSB_CACHE/tiny-arith-v2`` or
    ``~/.cache/ssb/tiny-arith-v2``). Builds into a temp dir and renames it into place, so a crash never leaves a
    half-written model behind."""
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return publish_once(out, build_tiny_model, lambda d: (d / "config.json").is_file())
