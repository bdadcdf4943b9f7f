"""ssb grpo: the reward functions, and one short GRPO run on the tiny model (2 steps) whose run directory is
inspected: a plain peft adapter that training moved, the train log, the manifest, no work on a rerun, and
evaluate/report treating it like an SSB run."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")

from ssb import evaluate, grpo  # noqa: E402
from ssb.cli import main  # noqa: E402
from ssb.config import load_config  # noqa: E402
from ssb.rundir import read_rows  # noqa: E402

RIGHT, WRONG = "3 + 5 = 8.\nThe answer is \\boxed{8}.", "3 + 5 = 9.\nThe answer is \\boxed{9}."


def _msg(text):
    return [{"role": "assistant", "content": text}]


def test_reward_is_correctness_with_optional_format_bonus():
    cols = dict(answer=["8"] * 4, grader=["gsm8k"] * 4)
    comps = [RIGHT, WRONG, "The answer is 8", "I think \\boxed{9"]
    stats = {}
    (correct,) = grpo.reward_funcs(None, stats)
    assert correct(["q"] * 4, comps, completion_ids=[[1, 2]] * 4, **cols) == [1.0, 0.0, 1.0, 0.0]
    assert correct(["q"] * 4, [_msg(c) for c in comps], **cols) == [1.0, 0.0, 1.0, 0.0]  # conversational
    assert stats == {"completions": 8, "correct": 4, "generated_tokens": 8}
    correct, boxed = grpo.reward_funcs(0.1)
    assert boxed(["q"] * 4, [_msg(c) for c in comps], **cols) == [0.1, 0.1, 0.0, 0.0]  # unclosed box: no bonus
    assert correct(["q"], ["\\boxed{12}"], answer=["12"], grader=["math"]) == [1.0]


def _overrides(model_dir, *extra):
    return [f"model.name_or_path={model_dir}", "model.device=cpu", "rollout.data={name: arith, limit: 8}",
            "grpo.steps=2", "grpo.batch_size=2", "grpo.num_generations=4", "grpo.micro_batch_size=8",
            "grpo.max_new_tokens=24", "grpo.lr=1e-2", "grpo.schedule=constant",
            "evaluate.benchmarks=[{name: arith, seed: 1, limit: 4}]", "evaluate.max_new_tokens=24", *extra]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_run")
    assert main(["grpo", "--run-dir", str(run_dir), *_overrides(tiny_model_dir)]) == 0
    return run_dir


def test_grpo_writes_a_stage_with_log_and_manifest(run):
    d = run / "grpo"
    assert {p.name for p in d.iterdir()} == {"adapter", "train_log.jsonl", "started.json", "manifest.json",
                                             "cost.json"}
    log = read_rows(d / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert {"loss", "reward", "reward_std", "lr", "grad_norm", "completion_length", "entropy"} <= set(r)
        assert 0 <= r["reward"] <= 1 and 0 < r["completion_length"] <= 24 and r["lr"] == pytest.approx(1e-2)
    m = json.loads((d / "manifest.json").read_text())
    assert m["counts"]["steps"] == 2 and m["counts"]["problems"] == 8 and m["counts"]["completions"] == 16
    assert 0 < m["generated_tokens"] == m["counts"]["generated_tokens"] <= 16 * 24
    assert m["config"]["distill"] == {"lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.0,
                                      "target_modules": "all-linear"}
    assert m["wall_seconds"] > 0 and m["versions"]["trl"]


def test_adapter_is_plain_peft_and_training_moved_it(run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(run / "grpo" / "adapter"))
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and any(p.abs().max() > 0 for p in lora_b.values())  # LoRA B starts at zero
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(tuned, plain)


def test_rerun_does_no_work_and_changed_config_is_an_error(run, tiny_model_dir, monkeypatch, capsys):
    def stamps():  # every file but the lock (its holder line is rewritten by whoever takes it)
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = stamps()

    def boom(*a, **k):
        raise AssertionError("a finished grpo stage loaded a model")

    monkeypatch.setattr("ssb.grpo.load_model", boom)
    monkeypatch.setattr("ssb.grpo.load_tokenizer", boom)
    capsys.readouterr()
    assert main(["grpo", "--run-dir", str(run), *_overrides(tiny_model_dir)]) == 0
    assert "(already done)" in capsys.readouterr().err
    assert before == stamps()
    assert main(["grpo", "--run-dir", str(run), *_overrides(tiny_model_dir, "grpo.steps=3")]) == 2
    assert "--force" in capsys.readouterr().err


def test_evaluate_auto_picks_the_grpo_adapter_and_report_shows_it(run, tiny_model_dir, tmp_path):
    cfg = load_config(None, _overrides(tiny_model_dir))
    path, fp = evaluate.resolve_adapter(cfg, run)
    assert path == str(run / "grpo" / "adapter")
    assert fp == json.loads((run / "grpo" / "manifest.json").read_text())["fingerprint"]
    results = evaluate.run(cfg, run)
    assert results["arith"]["adapter"] == path and results["arith"]["problems"] == 4
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "grpo/adapter" in text and "grpo s" in text and "](reward.png)" in text


def test_auto_prefers_distill_then_grpo_then_base(tmp_path):
    cfg = load_config(None, [])
    assert evaluate.resolve_adapter(cfg, tmp_path) == (None, None)
    for stage in ("grpo", "distill"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "manifest.json").write_text(json.dumps({"fingerprint": stage}))
        assert evaluate.resolve_adapter(cfg, tmp_path) == (str(tmp_path / stage / "adapter"), stage)


def test_batch_shape_is_checked_before_loading_anything(tmp_path, capsys):
    assert main(["grpo", "--run-dir", str(tmp_path), "grpo.batch_size=3", "grpo.num_generations=2",
                 "grpo.micro_batch_size=4"]) == 2
    assert "micro_batch_size" in capsys.readouterr().err
