"""ssb signal: the per-token teacher/student divergence before training, against plain float64 references."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import copy_taught
from ssb.cli import main
from ssb.kd_signal import summarize, token_stats
from ssb.rows import read_json, read_rows


def _reference_kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    ps, pt = (torch.softmax(x.double() / temp, -1) for x in (s, t))
    return (pt * (pt.log() - ps.log())).sum(-1)


def test_token_stats_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g) * 3
    targets = torch.randint(0, 50, (7,), generator=g)
    got = token_stats(s.bfloat16(), t.bfloat16(), targets, temperature=2.0)
    sb, tb = s.bfloat16().double(), t.bfloat16().double()  # what the function sees
    torch.testing.assert_close(got["kl"].double(), 4.0 * _reference_kl(sb, tb, 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["kl_t1"].double(), _reference_kl(sb, tb, 1.0), rtol=1e-5, atol=1e-6)
    assert got["same_argmax"].tolist() == (sb.argmax(-1) == tb.argmax(-1)).double().tolist()
    nll = -torch.log_softmax(sb, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got["student_nll"].double(), nll, rtol=1e-5, atol=1e-6)
    unscaled = token_stats(s, t, targets, temperature=2.0, scale_t2=False)["kl"]
    torch.testing.assert_close(unscaled.double(), _reference_kl(s, t, 2.0), rtol=1e-5, atol=1e-6)


def test_the_same_distribution_carries_no_signal():
    s = torch.randn(5, 30)
    got = token_stats(s, s.clone(), torch.zeros(5, dtype=torch.long), temperature=2.0)
    assert got["kl"].abs().max() < 1e-6 and got["same_argmax"].min() == 1
    summary = summarize(got, [2, 3])
    assert summary["top1pct_share"] == 0.0 and summary["examples_mean_kl_under_0.01"] == 1.0


def test_summary_shares_and_per_example_means():
    kl = torch.tensor([99.0] + [1.0 / 99] * 99)  # one token carries 99 of the 100
    ones = torch.ones(100)
    stats = {"kl": kl, "kl_t1": kl / 4, "same_argmax": torch.tensor([0.0] + [1.0] * 99), "student_nll": ones,
             "teacher_nll": ones / 2}
    s = summarize(stats, [1, 99])
    assert s["tokens"] == 100 and s["examples"] == 2
    assert s["top1pct_share"] == pytest.approx(0.99) and s["kl_mean"] == pytest.approx(1.0)
    assert s["top10pct_share"] == pytest.approx((99 + 9 / 99) / 100)
    assert s["kl_max"] == 99.0 and s["kl_median"] == pytest.approx(1 / 99)
    assert s["examples_mean_kl_under_0.01"] == 0.0 and s["example_kl_mean_median"] == pytest.approx((99 + 1 / 99) / 2)
    assert s["argmax_agreement"] == pytest.approx(0.99) and s["teacher_nll_mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        summarize(stats, [1, 98])


def test_ssb_signal_on_a_run_directory_and_with_an_untrained_adapter(taught, tmp_path, capsys):
    from peft import get_peft_model

    from ssb.stages.distill import training_rows
    from ssb.models import load_model, lora_config

    cfg, src = taught
    run = copy_taught(src, tmp_path / "run")
    overrides = [f"model.name_or_path={cfg.model.name_or_path}", "model.device=cpu"]
    assert main(["signal", "--run-dir", str(run), *overrides]) == 0
    assert "top 1% of tokens carry" in capsys.readouterr().out
    record = read_json(run / "signal" / "signal.json")
    rows = training_rows(cfg, run)
    per = read_rows(run / "signal" / "signal.jsonl")
    assert [p["id"] for p in per] == [r["id"] for r in rows]
    assert record["summary"]["tokens"] == sum(len(r["reply_ids"]) for r in rows) == sum(p["tokens"] for p in per)
    assert record["summary"]["kl_mean"] > 0 and record["adapter"] is None and record["loss"]["temperature"] == 2.0
    weighted = sum(p["kl_mean"] * p["tokens"] for p in per) / record["summary"]["tokens"]
    assert weighted == pytest.approx(record["summary"]["kl_mean"], rel=1e-5)

    # a fresh LoRA adapter (B = 0) is the base model: the same signal, measured through the adapter path
    adapter = tmp_path / "adapter"
    get_peft_model(load_model(cfg.model), lora_config(cfg.distill)).save_pretrained(adapter)
    out = tmp_path / "with_adapter"
    assert main(["signal", "--run-dir", str(run), "--adapter", str(adapter), "--out", str(out), "--limit", "2",
                 *overrides]) == 0
    got = read_json(out / "signal.json")
    assert got["summary"]["examples"] == 2 and got["adapter"] == str(adapter)
    first_two = per[:2]
    assert [p["kl_mean"] for p in read_rows(out / "signal.jsonl")] == pytest.approx([p["kl_mean"] for p in first_two],
                                                                                   rel=1e-4, abs=1e-6)


def test_ssb_signal_refuses_a_run_without_teacher_prompts(taught, tmp_path, capsys):
    cfg, src = taught
    run = copy_taught(src, tmp_path / "run")
    assert main(["signal", "--run-dir", str(run), f"model.name_or_path={cfg.model.name_or_path}",
                 "model.device=cpu", "distill.targets=rollouts", "distill.kd_weight=0",
                 "distill.ce_weight=1"]) == 2
    assert "no teacher prompt" in capsys.readouterr().err
