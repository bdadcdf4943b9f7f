"""Distillation internals on the tiny model: position alignment, the adapter-disabled teacher, and the loss
against a float64 full-vocabulary reference computed from plain full-sequence logits."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from ssb.config import DistillConfig
from conftest import copy_taught
from ssb.stages.distill import align, attach_lora, batch_loss, build_examples, collate, teacher_hidden


def test_alignment_student_and_teacher_predict_the_same_reply_token():
    rng = random.Random(0)
    for _ in range(50):
        sp = [rng.randrange(100) for _ in range(rng.randint(1, 9))]
        tp = [rng.randrange(100) for _ in range(rng.randint(1, 20))]
        reply = [rng.randrange(100) for _ in range(rng.randint(1, 9))]
        e = align(sp, tp, reply)
        assert [e.student_ids[i + 1] for i in e.student_pos] == reply
        assert [e.teacher_ids[j + 1] for j in e.teacher_pos] == reply
        assert e.targets == reply
    with pytest.raises(ValueError):
        align([1], [2], [])


def test_paper_format_drops_template_and_end_of_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    row = {"question": "What is 1 + 2?", "teacher_prompt_ids": [1, 2, 3], "reply_ids": [10, 11, eot]}
    (ours,) = build_examples([row], tok, [eot])
    (paper,) = build_examples([row], tok, [eot], paper_format=True)
    assert ours.targets == [10, 11, eot] and paper.targets == [10, 11]
    assert "<|im_start|>" in tok.decode(ours.student_ids) and "<|im_start|>" not in tok.decode(paper.student_ids)


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = attach_lora(base, DistillConfig(lora_r=4, lora_alpha=8), seed=0)
    with torch.no_grad():  # make the adapter non-trivial (B is zero at init)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def test_adapter_disabled_teacher_equals_the_base_model(tiny_model_dir, peft_model):
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 7, 30, 42, 5, 2]])
    with torch.no_grad():
        base_logits = fresh(ids).logits
        with peft_model.disable_adapter():
            teacher = peft_model(ids).logits
        student = peft_model(ids).logits
    torch.testing.assert_close(teacher, base_logits)
    assert not torch.allclose(student, base_logits)


def test_teacher_runs_without_dropout_while_the_student_trains(tiny_model_dir):
    """With dropout in the base model the teacher must still be the deterministic base model (eval mode), and the
    student's training mode must survive the teacher's forward."""
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attention_dropout=0.9)

    model = attach_lora(load(), DistillConfig(lora_r=4, lora_alpha=8), seed=0)
    batch = collate([align([1, 9, 4], [1, 8, 8, 8, 3], [20, 21, 22, 2])], pad_id=0, device="cpu")
    decoder = model.get_base_model().get_decoder()
    model.train()
    with torch.no_grad():
        noisy = decoder(input_ids=batch["t_ids"], attention_mask=batch["t_mask"]).last_hidden_state
        again = decoder(input_ids=batch["t_ids"], attention_mask=batch["t_mask"]).last_hidden_state
    assert not torch.allclose(noisy, again)  # dropout is live in train mode
    ref = load().eval().get_decoder()(input_ids=batch["t_ids"], attention_mask=batch["t_mask"]).last_hidden_state
    got = teacher_hidden(model, decoder, batch)
    torch.testing.assert_close(got, ref.detach()[batch["rows"], batch["t_pos"]])
    assert model.training and decoder.training


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_batch_loss_matches_float64_full_vocab_reference(peft_model, average):
    examples = [align([1, 9, 4], [1, 8, 8, 8, 3], [20, 21, 22, 2]), align([1, 5], [1, 6, 7], [30, 2])]
    dc = DistillConfig(average=average, chunk_size=3)
    batch = collate(examples, pad_id=0, device="cpu")
    causal = peft_model.get_base_model()
    kw = dict(kind=dc.loss, temperature=dc.temperature, scale_t2=dc.scale_t2, beta=dc.jsd_beta,
              chunk_size=dc.chunk_size)
    total = batch_loss(peft_model, causal.get_decoder(), causal.get_output_embeddings(), batch, dc, kw)
    loss = total / (batch["targets"].numel() if average == "token" else len(examples))

    T, per_seq = dc.temperature, []
    for e in examples:  # reference: plain full-sequence logits, unbatched, float64
        s = peft_model(torch.tensor([e.student_ids])).logits[0].double()[e.student_pos]
        with torch.no_grad(), peft_model.disable_adapter():
            t = peft_model(torch.tensor([e.teacher_ids])).logits[0].double()[e.teacher_pos]
        pt = F.softmax(t / T, -1)
        kl = (pt * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1) * T * T
        per_seq.append(kl)
    ref = torch.cat(per_seq).mean() if average == "token" else torch.stack([k.mean() for k in per_seq]).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the distill stage
def _distill_cfg(base, *extra):
    from ssb.configio import load_config, to_dict

    return load_config(None, ["distill.lr=1e-3", "distill.batch_size=8", "distill.epochs=12",
                              "distill.schedule=constant", "distill.lora_r=8", "distill.lora_alpha=16",
                              "distill.topk=8", *extra], base=to_dict(base))


@pytest.mark.parametrize("teacher", ["online", "topk"])
def test_distill_stage_trains_with_decreasing_loss(taught, tmp_path, monkeypatch, teacher):
    from peft import PeftModel

    from ssb.stages import distill
    from ssb.rows import read_rows

    base_cfg, src = taught
    d = copy_taught(src, tmp_path)
    cfg = _distill_cfg(base_cfg, f"distill.teacher={teacher}")
    if teacher == "topk":  # the cached teacher must not run the model with the adapter disabled while training
        monkeypatch.setattr(PeftModel, "disable_adapter", lambda self: pytest.fail("online teacher forward"))
    manifest = distill.run(cfg, d)
    losses = [r["loss"] for r in read_rows(d / "distill" / "train_log.jsonl")]
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.9
    assert manifest["teacher"] == teacher
    assert ("teacher_cache" in manifest) == (teacher == "topk") == (d / "distill" / "teacher_topk").is_dir()
    if teacher == "topk":
        _check_cache_matches_base_model(cfg, d, manifest["teacher_cache"])


def _check_cache_matches_base_model(cfg, d, info):
    """Cached values are the top-k of the base model's log_softmax(logits / T) at the teacher's reply positions."""
    from transformers import AutoModelForCausalLM

    from ssb.losses import topk_teacher
    from ssb.rows import read_json, read_rows
    from ssb.teacher_cache import TopkCacheReader

    rows = read_rows(d / "teach" / "examples.jsonl")
    index = read_json(d / "distill" / "teacher_topk" / "index.json")
    assert index["complete"] and index["k"] == info["k"] == 8 and index["temperature"] == cfg.distill.temperature
    assert info["bytes_per_token"] == 8 * 6 + 4 and info["tokens"] == sum(len(r["reply_ids"]) for r in rows)
    reader = TopkCacheReader(d / "distill" / "teacher_topk", 8, cfg.distill.temperature)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    for r in rows[:2]:
        e = align([0], list(r["teacher_prompt_ids"]), list(r["reply_ids"]))
        with torch.no_grad():
            logits = base(torch.tensor([e.teacher_ids])).logits[0][e.teacher_pos]
        lp, ids, tail = topk_teacher(logits, 8, temperature=cfg.distill.temperature)
        got_lp, got_ids, got_tail = reader[r["id"]]
        assert torch.equal(got_ids.long(), ids)
        torch.testing.assert_close(got_lp.float(), lp, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got_tail, tail, rtol=1e-4, atol=1e-4)


def test_distill_refuses_a_cache_built_at_another_temperature(taught, tmp_path, monkeypatch):
    from ssb.stages import distill
    from ssb.errors import SsbError
    from ssb.teacher_cache import TopkCacheWriter

    base_cfg, src = taught
    d = copy_taught(src, tmp_path)
    cfg = _distill_cfg(base_cfg, "distill.teacher=topk", "distill.temperature=2.0")
    TopkCacheWriter(d / "distill" / "teacher_topk", 8, 1.0).finish()  # e.g. copied in from a T=1 run
    monkeypatch.setattr(distill, "load_model", lambda *a, **k: pytest.fail("refused only after loading"))
    with pytest.raises(SsbError, match="temperature") as err:
        distill.run(cfg, d)
    assert "\n" not in str(err.value)
