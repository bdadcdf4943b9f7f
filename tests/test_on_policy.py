"""On-policy distillation (``distill.targets=on_policy``) on the tiny model: the in-process student samples what
the merged adapter samples, the teacher reads exactly the hinted prompt + the student's tokens, the loss equals a
float64 full-vocabulary reference, the stage trains, resumes to the same weights, and (slow) 2 processes follow the
1-process curve."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import copy_taught
from ssb.stages import distill, on_policy
from ssb.config import DistillConfig
from ssb.configio import load_config, to_dict
from ssb.stages.distill import align, attach_lora, batch_loss, collate
from ssb.engine import SamplingParams
from ssb.engine.transformers_engine import TransformersEngine
from ssb.errors import SsbError
from ssb.models import render_chat
from ssb.rows import read_rows


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def student(tiny_model_dir, tmp_path_factory):
    """A peft student with a non-trivial adapter, and the same adapter saved for merging."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = attach_lora(base, DistillConfig(lora_r=4, lora_alpha=8), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(path))
    return model, path


def _questions(tok, n=3):
    rows = [{"id": f"q{i}", "question": f"What is {i} + {i + 2}?", "answer": str(2 * i + 2),
             "teacher_prompt_ids": render_chat(tok, [{"role": "user", "content": f"hint {i}: the answer is {2 * i + 2}"}]),
             "reply_ids": tok.encode(f"{2 * i + 2}<|im_end|>")} for i in range(n)]
    return rows, on_policy.questions(rows, on_policy.student_prompts(rows, tok),
                                     [list(r["teacher_prompt_ids"]) for r in rows])


def _sampler(model, tok, qs, **dc):
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    dc = SimpleNamespace(**{"samples": 2, "sample_temperature": 1.0, "mix": 0.0, "sample_merged": True, **dc})
    return on_policy.OnPolicySampler(model, tok, [eot], qs, dc, seed=7, max_new_tokens=12, make_example=align)


@pytest.mark.parametrize("merged", [True, False])
def test_in_process_student_samples_what_the_merged_adapter_samples(tiny_model_dir, student, tok, merged):
    from ssb.config import ModelConfig
    from ssb.models import load_model

    model, path = student
    _, qs = _questions(tok)
    sampler = _sampler(model, tok, qs, sample_merged=merged)
    model.train()
    sampler.before_step(5, [0, 1, 2])
    assert model.training  # sampling ran in eval mode and put the model back
    merged = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", dtype="float32"),
                        adapter=path, merge=True)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    ref = TransformersEngine(merged, tok, [eot], cuda_graphs=False)
    slots = [(i, j) for i in range(3) for j in range(2)]
    seeds = [on_policy.batch_seed(7, "on_policy", 5, qs[i].id, j) for i, j in slots]
    outs = ref.generate([qs[i].student_prompt for i, _ in slots], SamplingParams(1, 1.0, 0, 1.0, 12), seeds)
    got = [e.targets for i in range(3) for e in sampler.examples[i]]
    assert got == [s.token_ids for (s,) in outs]
    assert len({tuple(t) for t in got}) > 1  # real samples, not one repeated reply


@pytest.mark.parametrize("dora", [False, True])
def test_each_step_samples_the_adapter_as_it_is_then(tiny_model_dir, tok, dora):
    """The adapter changes between steps: step 1 samples what a fresh merge of the changed adapter samples (a plain
    LoRA's copy is refreshed in place; DoRA's is merged afresh, and the engine must follow it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ssb.engine.merged import merged_copy
    from ssb.models import lora_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = lora_config(DistillConfig(lora_r=4, lora_alpha=8))
    model = get_peft_model(base, LoraConfig(**{**cfg.to_dict(), "use_dora": dora}))
    _, qs = _questions(tok)
    sampler = _sampler(model, tok, qs)
    sampler.before_step(0, [0, 1, 2])
    with torch.no_grad():  # what a training step does to the adapter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    sampler.before_step(1, [0, 1, 2])
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    ref = TransformersEngine(merged_copy(model), tok, [eot], cuda_graphs=False)
    slots = [(i, j) for i in range(3) for j in range(2)]
    seeds = [on_policy.batch_seed(7, "on_policy", 1, qs[i].id, j) for i, j in slots]
    outs = ref.generate([qs[i].student_prompt for i, _ in slots], SamplingParams(1, 1.0, 0, 1.0, 12), seeds)
    assert [e.targets for i in range(3) for e in sampler.examples[i]] == [s.token_ids for (s,) in outs]


def test_teacher_reads_the_hinted_prompt_then_the_students_tokens(student, tok):
    model, _ = student
    _, qs = _questions(tok)
    sampler = _sampler(model, tok, qs)
    info = sampler.before_step(0, [2, 0])
    examples = sampler.batch([2, 0])
    assert len(examples) == 4 and info["student_replies"] == 4
    assert info["sampled_tokens"] == sum(len(e.targets) for e in examples) == sampler.global_tokens
    for e, q in zip(examples, [qs[2], qs[2], qs[0], qs[0]]):
        reply = e.targets
        assert e.student_ids == q.student_prompt + reply and e.teacher_ids == q.teacher_prompt + reply
        assert [e.student_ids[p + 1] for p in e.student_pos] == reply == [e.teacher_ids[p + 1] for p in e.teacher_pos]


def test_mix_takes_the_teachers_reply_for_a_seeded_fraction_of_slots(student, tok):
    model, _ = student
    _, qs = _questions(tok)
    assert _sampler(model, tok, qs, mix=1.0).before_step(0, [0, 1, 2])["student_replies"] == 0
    sampler = _sampler(model, tok, qs, mix=1.0)
    sampler.before_step(0, [1])
    assert [e.targets for e in sampler.batch([1])] == [qs[1].teacher_reply] * 2
    draws = [on_policy.off_policy(0, s, f"q{i}", j, 0.3) for s in range(50) for i in range(4) for j in range(2)]
    assert 0.2 < sum(draws) / len(draws) < 0.4
    assert draws == [on_policy.off_policy(0, s, f"q{i}", j, 0.3) for s in range(50) for i in range(4) for j in range(2)]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_on_policy_batch_loss_matches_float64_full_vocab_reference(student, tok, kind):
    model, _ = student
    _, qs = _questions(tok)
    sampler = _sampler(model, tok, qs)
    sampler.before_step(1, [0, 1])
    examples = sampler.batch([0, 1])
    dc = DistillConfig(loss=kind, jsd_beta=0.3, chunk_size=5)
    batch = collate(examples, pad_id=tok.pad_token_id, device="cpu")
    causal = model.get_base_model()
    kw = dict(kind=dc.loss, temperature=dc.temperature, scale_t2=dc.scale_t2, beta=dc.jsd_beta,
              chunk_size=dc.chunk_size)
    loss = batch_loss(model, causal.get_decoder(), causal.get_output_embeddings(), batch, dc, kw)
    loss = loss / batch["targets"].numel()

    T, b, per_tok = dc.temperature, dc.jsd_beta, []
    for e in examples:  # reference: plain full-sequence logits, one example at a time, float64
        s = model(torch.tensor([e.student_ids])).logits[0].double()[e.student_pos]
        with torch.no_grad(), model.disable_adapter():
            t = model(torch.tensor([e.teacher_ids])).logits[0].double()[e.teacher_pos]
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        if kind == "forward_kl":
            d = (lt.exp() * (lt - ls)).sum(-1)
        elif kind == "reverse_kl":
            d = (ls.exp() * (ls - lt)).sum(-1)
        else:
            lm = torch.logsumexp(torch.stack([lt + math.log(b), ls + math.log(1 - b)]), 0)
            d = b * (lt.exp() * (lt - lm)).sum(-1) + (1 - b) * (ls.exp() * (ls - lm)).sum(-1)
        per_tok.append(d * T * T)
    torch.testing.assert_close(loss.double(), torch.cat(per_tok).mean(), rtol=1e-5, atol=1e-6)


def test_teacher_prompt_by_hint(tok):
    row = {"id": "p", "question": "What is 2 + 3?", "answer": "5", "teacher_prompt_ids": [1, 2, 3]}
    pair = {"correct": "2 + 3 = 5. \\boxed{5}", "correct_answer": "5", "incorrect": "2 + 3 = 6. \\boxed{6}"}
    assert on_policy.teacher_prompt(row, "pair", tok, "guided") == [1, 2, 3]
    correct = tok.decode(on_policy.teacher_prompt(row, "correct", tok, "guided", pair=pair))
    assert "2 + 3 = 5" in correct and "2 + 3 = 6" not in correct and "INCORRECT" not in correct
    ref = tok.decode(on_policy.teacher_prompt(row, "reference", tok, "guided", solution="Two plus three is five."))
    assert "Two plus three is five." in ref and "\\boxed{5}" in ref
    with pytest.raises(SsbError, match="no reference solution"):
        on_policy.teacher_prompt(row, "reference", tok, "guided", solution=None)
    with pytest.raises(SsbError, match="no pair"):
        on_policy.teacher_prompt(row, "correct", tok, "guided", pair=None)


def test_gsm8k_problems_carry_their_worked_solution(data_dir):
    from ssb.data import DatasetConfig, load_problems

    (p,) = load_problems(DatasetConfig(name="gsm8k", split="train", limit=1), data_dir)
    assert p.answer == "72" and p.solution.startswith("Natalia sold 48/2 = 24 clips")
    assert "<<" not in p.solution and "####" not in p.solution


# ------------------------------------------------------------------------------------------ the distill stage
def _cfg(base, *extra):
    return load_config(None, ["distill.lr=1e-3", "distill.batch_size=8", "distill.schedule=constant",
                              "distill.lora_r=8", "distill.lora_alpha=16", "distill.sample_max_new_tokens=12",
                              *extra], base=to_dict(base))


def test_mix_one_is_exactly_off_policy_ssb(taught, tmp_path):
    """With every reply the teacher's, on-policy distill must reproduce SSB's loss curve and weights exactly:
    the same questions, order, alignment and loss."""
    base, src = taught
    runs = {}
    for name, extra in (("ssb", []), ("mix1", ["distill.targets=on_policy", "distill.mix=1", "distill.samples=1"])):
        d = copy_taught(src, tmp_path / name)
        runs[name] = (distill.run(_cfg(base, "distill.epochs=3", *extra), d), d)
    (_, d_ssb), (m_mix, d_mix) = runs["ssb"], runs["mix1"]
    l_ssb, l_mix = ([r["loss"] for r in read_rows(d / "distill" / "train_log.jsonl")] for d in (d_ssb, d_mix))
    assert len(l_ssb) == 3 and l_mix == l_ssb
    a, b = (load_file(str(d / "distill" / "adapter" / "adapter_model.safetensors")) for d in (d_ssb, d_mix))
    for k in a:
        assert torch.equal(a[k], b[k])
    assert m_mix["targets"] == "on_policy" and m_mix["mix"] == 1.0 and m_mix.get("generated_tokens", 0) == 0


def test_on_policy_stage_trains_and_records_its_sampling(taught, tmp_path):
    base, src = taught
    d = copy_taught(src, tmp_path)
    m = distill.run(_cfg(base, "distill.targets=on_policy", "distill.epochs=8", "distill.loss=reverse_kl"), d)
    log = read_rows(d / "distill" / "train_log.jsonl")
    losses = [r["loss"] for r in log]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert all(r["student_replies"] == m["counts"]["examples"] for r in log)
    assert m["generated_tokens"] == sum(r["sampled_tokens"] for r in log) > 0
    assert m["counts"]["trained_tokens"] == sum(r["tokens"] for r in log)
    assert (m["hint"], m["samples"], m["targets"]) == ("pair", 1, "on_policy")


@pytest.mark.slow
def test_on_policy_killed_then_resumed_ends_at_the_same_weights(taught, tmp_path, monkeypatch):
    from conftest import train_killed_at

    base, src = taught
    cfg = _cfg(base, "distill.targets=on_policy", "distill.epochs=4", "distill.batch_size=4", "distill.save_every=2")
    ref, crash = copy_taught(src, tmp_path / "ref"), copy_taught(src, tmp_path / "crash")
    distill.run(cfg, ref)
    with monkeypatch.context() as m:
        m.setattr("ssb.stages.distill.train", train_killed_at(4))
        with pytest.raises(KeyboardInterrupt):
            distill.run(cfg, crash)
    assert (crash / "distill" / "checkpoint" / "state.json").exists()
    distill.run(cfg, crash)
    assert [r["loss"] for r in read_rows(crash / "distill" / "train_log.jsonl")] == \
        [r["loss"] for r in read_rows(ref / "distill" / "train_log.jsonl")]
    a, b = (load_file(str(d / "distill" / "adapter" / "adapter_model.safetensors")) for d in (ref, crash))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_on_policy_config_refusals():
    from ssb.config import ConfigError

    with pytest.raises(ConfigError, match="on_policy"):
        load_config(None, ["distill.targets=on_policy", "distill.teacher=topk"])
    with pytest.raises(ConfigError, match="on_policy"):
        load_config(None, ["distill.targets=on_policy", "distill.kd_weight=0", "distill.ce_weight=1"])
    with pytest.raises(ConfigError, match="mix"):
        load_config(None, ["distill.targets=on_policy", "distill.mix=1.5"])


@pytest.mark.slow
def test_on_policy_two_processes_same_loss_curve_as_one(taught, tiny_model_dir, data_dir, tmp_path):
    from conftest import small_overrides
    from test_scale import _torchrun

    _, src = taught
    over = small_overrides(tiny_model_dir, data_dir) + [
        "rollout.data={name: arith, limit: 8}", "distill.lr=1e-3", "distill.batch_size=8", "distill.lora_r=8",
        "distill.lora_alpha=16", "distill.sample_max_new_tokens=12", "distill.targets=on_policy", "distill.epochs=3",
        "distill.samples=2"]
    logs = {}
    for n in (1, 2):
        d = copy_taught(src, tmp_path / f"n{n}")
        _torchrun(n, "distill", "--run-dir", str(d), *over)
        logs[n] = read_rows(d / "distill" / "train_log.jsonl")
    assert len(logs[1]) == len(logs[2]) == 3
    assert [r["sampled_tokens"] for r in logs[1]] == [r["sampled_tokens"] for r in logs[2]]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in logs[2]]),
                               torch.tensor([r["loss"] for r in logs[1]]), rtol=1e-4, atol=1e-6)
