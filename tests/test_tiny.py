"""The tiny download-free chat model: a real Qwen2 checkpoint whose behaviour makes every SSB stage non-empty."""

from __future__ import annotations

import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssb.prompts import student_messages, teacher_messages
from ssb.tiny import TINY_MODEL_NAME, build_tiny_model, ensure_tiny_model, question, reply

try:
    from ssb.grading import grade
except ImportError:  # pragma: no cover - grading is written elsewhere

    def grade(response: str, gold: str, dataset: str = "gsm8k") -> bool:
        boxes = re.findall(r"\\boxed\{([^{}]*)\}", response)
        return bool(boxes) and boxes[-1].strip() == gold


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """The model exactly as the pipeline loads it (``tiny_model_dir`` is conftest's ``ensure_tiny_model()``)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return tok, model


def _sample(tok, model, conversations, *, temperature: float, n: int, seed: int) -> list[str]:
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_k=50,
            max_new_tokens=40,
            num_return_sequences=n,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
        )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _pairs(n: int = 30, seed: int = 123) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n)]


def test_checkpoint_is_a_qwen2_chat_model(tiny_model_dir, loaded):
    tok, model = loaded
    assert TINY_MODEL_NAME == "ssb-tiny-arith"
    assert model.config.model_type == "qwen2" and type(model).__name__ == "Qwen2ForCausalLM"
    assert (tiny_model_dir / "model.safetensors").is_file()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == end == model.config.eos_token_id
    assert model.generation_config.eos_token_id == end
    assert tok.pad_token == "<|endoftext|>" and model.config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == len(tok)
    assert not list(tiny_model_dir.parent.glob(f".{tiny_model_dir.name}.tmp-*"))  # no half-built leftovers


def test_chat_template_renders_chatml(loaded):
    tok, _ = loaded
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 3 + 5?"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(student_messages("What is 3 + 5?"), add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.eos_token_id) == 2


def test_decode_round_trips_and_digits_are_single_tokens(loaded):
    tok, _ = loaded
    for text in ["7 + 5 = 12.\nThe answer is \\boxed{12}.", "  Odd   spacing\t& ünïcode → \\frac{1}{2} 1234567890"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    tokens = tok.convert_ids_to_tokens(tok.encode("\\boxed{1234}", add_special_tokens=False))
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["1", "2", "3", "4"]


def test_student_rollouts_are_a_mix_of_right_and_wrong(loaded):
    tok, model = loaded
    pairs, k = _pairs(), 4
    outs = _sample(tok, model, [student_messages(question(a, b)) for a, b in pairs], temperature=0.8, n=k, seed=0)
    graded = [[grade(o, str(a + b), "gsm8k") for o in outs[i * k : (i + 1) * k]] for i, (a, b) in enumerate(pairs)]
    mixed = sum(any(g) and not all(g) for g in graded) / len(pairs)
    accuracy = sum(map(sum, graded)) / (k * len(pairs))
    assert mixed >= 0.2, (mixed, accuracy, outs[:8])
    assert 0.05 <= accuracy <= 0.95, (mixed, accuracy)


def test_hinted_teacher_is_mostly_right(loaded):
    tok, model = loaded
    pairs = _pairs()
    rng = random.Random(7)
    convs = [
        teacher_messages(question(a, b), reply(a, b, a + b), reply(a, b, a + b + rng.choice([-2, -1, 1, 2])))
        for a, b in pairs
    ]
    outs = _sample(tok, model, convs, temperature=0.4, n=1, seed=0)
    accuracy = sum(grade(o, str(a + b), "gsm8k") for o, (a, b) in zip(outs, pairs)) / len(pairs)
    assert accuracy >= 0.5, (accuracy, outs[:4])


def test_build_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    one = build_tiny_model(tmp_path / "one", seed=3, steps=3)
    two = build_tiny_model(tmp_path / "two", seed=3, steps=3)
    other = build_tiny_model(tmp_path / "other", seed=4, steps=3)
    assert (one / "tokenizer.json").read_text() == (two / "tokenizer.json").read_text()
    w1, w2, w3 = (load_file(d / "model.safetensors") for d in (one, two, other))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_ensure_reuses_an_existing_model(tmp_path):
    target = tmp_path / "prebuilt"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    assert ensure_tiny_model(target) == target  # present: returned as is, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prebuilt"]
