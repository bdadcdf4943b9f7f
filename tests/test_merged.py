"""Sampling through a merged copy (:mod:`ssb.engine.merged`): the copy kept across steps and rewritten in place
holds, after a training step, exactly what a fresh ``merge_and_unload`` copy holds, and the model being trained is
never changed by it."""

from __future__ import annotations

import pytest
import torch

from ssb.config import DistillConfig
from ssb.engine.merged import MergedCopy, merged_copy
from ssb.models import lora_config


def _student(tiny_model_dir, dtype, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the adapter's initial A and the random B below
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    cfg = lora_config(DistillConfig(lora_r=4, lora_alpha=8))
    model = get_peft_model(base, LoraConfig(**{**cfg.to_dict(), **lora}) if lora else cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter: a delta that changes the outputs
    return model


def _step(model, ids):
    """One SGD step on the adapter (what a training step does between two samplings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.5 * p.grad
            p.grad = None


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refreshed_copy_equals_a_fresh_merge_after_each_step(tiny_model_dir, dtype):
    model = _student(tiny_model_dir, dtype)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    merged = MergedCopy(model)
    first = merged.refresh()
    assert not any("lora_" in n for n, _ in first.named_parameters())
    assert _same(first, merged_copy(model))
    for _ in range(2):
        with torch.no_grad():
            old = first(ids).logits.clone()
        _step(model, ids)
        before = {n: p.clone() for n, p in model.named_parameters()}
        again = merged.refresh()
        assert again is first  # the same copy, rewritten in place
        assert _same(again, merged_copy(model))  # bit for bit what a fresh merge holds
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model is untouched
        with torch.no_grad():
            assert not torch.equal(again(ids).logits, old)  # it follows the adapter
            exact = dtype == torch.float32  # bf16: logits of ~10 round at ~0.06, and the two paths round apart
            assert torch.allclose(again(ids).logits.float(), model(ids).logits.float(), atol=1e-4 if exact else 0.25,
                                  rtol=0 if exact else 0.02)


def test_a_lora_variant_is_merged_afresh_every_time(tiny_model_dir):
    model = _student(tiny_model_dir, torch.float32, use_dora=True)
    merged = MergedCopy(model)
    first = merged.refresh()
    _step(model, torch.tensor([[1, 5, 9, 13, 2, 7]]))
    second = merged.refresh()
    assert second is not first and _same(second, merged_copy(model))


def test_a_model_without_an_adapter_is_sampled_as_it_is(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert MergedCopy(base).refresh() is base and merged_copy(base) is base
