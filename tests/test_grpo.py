"""ssb grpo: the reward functions, and one short GRPO run on the tiny model (2 steps) whose run directory is
inspected: a plain peft adapter that training moved, the train log, the manifest, no work on a rerun, and
evaluate/report treating it like an SSB run."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")

from ssb.stages import evaluate, grpo, grpo_budget  # noqa: E402
from ssb.engine.merged import merged_copy  # noqa: E402
from ssb.cli import main  # noqa: E402
from ssb.configio import load_config  # noqa: E402
from ssb.rows import read_rows  # noqa: E402

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

    monkeypatch.setattr("ssb.stages.grpo.load_model", boom)
    monkeypatch.setattr("ssb.stages.grpo.load_tokenizer", boom)
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


# ------------------------------------------------------------------ generators, budgets, resume

def _cfg(model_dir, *extra):
    return load_config(None, _overrides(model_dir, *extra))


def _manifest(run_dir):
    return json.loads((run_dir / "grpo" / "manifest.json").read_text())


def _lora_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "grpo" / "adapter" / "adapter_model.safetensors"))


class Interrupt(Exception):
    """Stands for a kill: raised from inside training by a callback."""


def _interrupt(event: str, at_step: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        pass

    def hook(self, args, state, control, **kwargs):
        if state.global_step == at_step:
            raise Interrupt(f"{event} at step {at_step}")

    setattr(Kill, event, hook)
    return Kill()


@pytest.mark.parametrize("generator", ["generate", "paged"])
def test_every_generator_trains_a_step(tiny_model_dir, tmp_path, generator):
    """ssb (the default) is exercised by the module's run; TRL's two transformers generators run here (paged, i.e.
    transformers' continuous batching, works on CPU but is slow there: one step, short completions)."""
    cfg = _cfg(tiny_model_dir, "grpo.steps=1", f"grpo.generator={generator}", "grpo.max_new_tokens=8")
    m = grpo.run(cfg, tmp_path)
    assert m["counts"]["steps"] == 1 and m["counts"]["completions"] == 8 and m["stopped_by"] == "steps"
    assert 0 < m["generated_tokens"] <= 8 * 8
    (row,) = read_rows(tmp_path / "grpo" / "train_log.jsonl")
    assert row["step"] == 1 and 0 < row["completion_length"] <= 8


def test_ssb_generator_groups_copies_and_keeps_order(tiny_model_dir):
    """TRL passes each prompt num_generations times in a row; the rollout returns one completion per copy, in order,
    sampled from the trainer's current model, and the same step samples the same completions."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssb.models import stop_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = _cfg(tiny_model_dir, "grpo.max_new_tokens=6")
    rollout = grpo.ssb_rollout_func(cfg, tok, stop_token_ids(tok, model))
    trainer = SimpleNamespace(model_wrapped=model, accelerator=Accelerator(cpu=True), state=SimpleNamespace(global_step=0),
                              args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    prompts = [[{"role": "user", "content": q}] for q in ("1 + 2 = ?", "7 + 1 = ?") for _ in range(3)]
    model.train()
    out = rollout(prompts, trainer)
    assert model.training  # restored
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == 6 and out["logprobs"] is None
    assert out["prompt_ids"][0] == out["prompt_ids"][2] != out["prompt_ids"][3]
    assert all(0 < len(c) <= 6 for c in out["completion_ids"])
    assert rollout(prompts, trainer)["completion_ids"] == out["completion_ids"]  # seeded by (seed, step)
    trainer.state.global_step = 1
    assert rollout(prompts, trainer)["completion_ids"] != out["completion_ids"]


def test_sampling_from_a_merged_copy_leaves_the_policy_untouched(tiny_model_dir):
    from types import SimpleNamespace

    from accelerate import Accelerator
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssb.models import lora_config, stop_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = _cfg(tiny_model_dir, "grpo.max_new_tokens=6")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(cfg.distill))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter: a delta that changes the outputs
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    merged = merged_copy(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-3)  # the delta is in the copy
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing merged in place
    trainer = SimpleNamespace(model_wrapped=model, accelerator=Accelerator(cpu=True),
                              state=SimpleNamespace(global_step=0), args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    prompts = [[{"role": "user", "content": "1 + 2 = ?"}]] * 2
    for flag in ("true", "false"):
        flagged = _cfg(tiny_model_dir, "grpo.max_new_tokens=6", f"grpo.sample_merged={flag}")
        out = grpo.ssb_rollout_func(flagged, tok, stop_token_ids(tok, model))(prompts, trainer)
        assert len(out["completion_ids"]) == 2 and all(0 < len(c) <= 6 for c in out["completion_ids"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_token_and_time_budgets_stop_early_and_say_why(tiny_model_dir, tmp_path):
    m = grpo.run(_cfg(tiny_model_dir, "grpo.steps=5", "grpo.max_generated_tokens=1"), tmp_path / "tokens")
    assert m["stopped_by"] == "tokens" and m["counts"]["steps"] == 1
    assert m["generated_tokens"] == m["counts"]["generated_tokens"] > 0
    assert (tmp_path / "tokens" / "grpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "tokens" / "grpo" / ".trl").exists()
    m = grpo.run(_cfg(tiny_model_dir, "grpo.steps=5", "grpo.max_seconds=0.01"), tmp_path / "seconds")
    assert m["stopped_by"] == "seconds" and m["counts"]["steps"] == 1
    assert m["device_seconds"] == m["wall_seconds"] >= 0.01 and m["gpus"] == 0 and m["gpu_seconds"] == 0
    m = grpo.run(_cfg(tiny_model_dir, "grpo.steps=5", "grpo.max_cpu_seconds=0.01"), tmp_path / "cpu")
    assert m["stopped_by"] == "cpu_seconds" and m["counts"]["steps"] == 1
    assert m["cpu_seconds"] >= 0.01 and m["wall_seconds"] > 0


def test_budget_fields_validate(tiny_model_dir):
    from ssb.config import ConfigError

    for bad in ("grpo.max_seconds=0", "grpo.max_cpu_seconds=-1", "grpo.max_generated_tokens=-5", "grpo.save_every=-1",
                "grpo.generator=vllm"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])
    cfg = load_config(None, ["grpo.max_seconds=3600", "grpo.max_generated_tokens=1000000", "grpo.save_every=0"])
    assert (cfg.grpo.max_seconds, cfg.grpo.max_generated_tokens, cfg.grpo.save_every) == (3600.0, 1000000, 0)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    """Checkpoint every step; die at step 2 after its log row but before its checkpoint; rerun. The log is cut back
    to the checkpoint (no duplicate steps), the counters add up over both processes, and since the ssb generator
    seeds each step's samples by (seed, step) and the Trainer restores optimizer, scheduler, RNG and data position,
    the adapter equals that of a run that was never interrupted."""
    extra = ("grpo.steps=3", "grpo.save_every=1")
    whole = grpo.run(_cfg(tiny_model_dir, *extra), tmp_path / "whole")

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        grpo.run(_cfg(tiny_model_dir, *extra), cut, callbacks=[_interrupt("on_log", 2)])
    assert [r["step"] for r in read_rows(cut / "grpo" / "train_log.jsonl")] == [1, 2]
    assert grpo_budget.last_checkpoint(cut / "grpo" / ".trl").name == "checkpoint-1"
    first = json.loads((cut / "grpo" / ".trl" / "checkpoint-1" / grpo_budget.COUNTERS).read_text())
    assert first["step"] == 1 and first["completions"] == 8 and first["generated_tokens"] > 0

    m = grpo.run(_cfg(tiny_model_dir, *extra), cut)
    log = read_rows(cut / "grpo" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and m["counts"]["steps"] == 3 and m["resumed_from_step"] == 1
    assert m["stopped_by"] == "steps" and m["counts"]["completions"] == 24
    assert m["generated_tokens"] == round(sum(r["completion_length"] * 8 for r in log))
    assert m["generated_tokens"] > first["generated_tokens"] and m["wall_seconds"] > first["wall_seconds"]
    assert m["generated_tokens"] == whole["generated_tokens"]
    whole_log = read_rows(tmp_path / "whole" / "grpo" / "train_log.jsonl")
    assert [r["reward"] for r in log] == [r["reward"] for r in whole_log]
    a, b = _lora_state(tmp_path / "whole"), _lora_state(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_while_a_checkpoint_is_incomplete_resumes_from_the_one_before(tiny_model_dir, tmp_path, monkeypatch):
    """TRL rotates old checkpoints out when it saves a new one, before ssb writes the new one's counters: killed in
    that window, the previous complete checkpoint must still be there to resume from."""
    cfg = _cfg(tiny_model_dir, "grpo.steps=3", "grpo.save_every=1")
    write = grpo_budget.write_json

    def dies_writing_step_2(path, obj):
        if path.parent.name == "checkpoint-2":
            raise Interrupt("killed before checkpoint-2's counters")
        write(path, obj)

    monkeypatch.setattr(grpo_budget, "write_json", dies_writing_step_2)
    with pytest.raises(Interrupt):
        grpo.run(cfg, tmp_path)
    assert grpo_budget.last_checkpoint(tmp_path / "grpo" / ".trl").name == "checkpoint-1"
    monkeypatch.setattr(grpo_budget, "write_json", write)
    m = grpo.run(cfg, tmp_path)
    assert m["resumed_from_step"] == 1 and m["counts"]["steps"] == 3


def test_a_run_killed_after_its_last_checkpoint_finishes_without_training(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, "grpo.steps=5", "grpo.max_generated_tokens=1", "grpo.save_every=1")
    with pytest.raises(Interrupt):  # the budget stops it at step 1 and checkpoints; it dies before the manifest
        grpo.run(cfg, tmp_path, callbacks=[_interrupt("on_save", 1)])
    assert not (tmp_path / "grpo" / "manifest.json").exists()

    def boom(*a, **k):
        raise AssertionError("loaded a model to finish a run whose training was over")

    monkeypatch.setattr("ssb.stages.grpo.load_model", boom)
    m = grpo.run(cfg, tmp_path)
    assert m["stopped_by"] == "tokens" and m["counts"]["steps"] == 1 and m["resumed_from_step"] == 1
    assert (tmp_path / "grpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert {p.name for p in (tmp_path / "grpo").iterdir()} == {"adapter", "train_log.jsonl", "started.json",
                                                                "manifest.json", "cost.json"}


def test_on_cpu_only_the_completion_positions_are_scored_with_the_same_values(tiny_model_dir, monkeypatch):
    """TRL's fused log-prob head scores every position off Triton devices; within grpo's context only the labelled
    ones go through the lm_head, and the per-token log-probs, entropies and gradients are those of scoring all."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of a short prompt
    mask[1, -5:] = 0  # right padding of a short completion
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100  # the prompt: as GRPO's _get_per_token_logps_and_entropies labels them
    rows = []
    real = trl_utils._ChunkedLogProbFunction
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", type("Counted", (), {
        "apply": staticmethod(lambda hidden, *a: rows.append(hidden.shape[0]) or real.apply(hidden, *a))}))

    def score():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.log_probs.detach(), out.entropy.detach(), grads

    logp, ent, grads = score()
    with grpo.scoring_labelled_positions_only():
        logp_c, ent_c, grads_c = score()
    assert rows == [3 * 13, int((labels[:, 1:] != -100).sum())]  # every position, then the labelled ones
    assert 0 < rows[1] < rows[0]
    torch.testing.assert_close(logp_c, logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent_c, ent, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_c.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-4, atol=1e-6)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # the switch is put back
