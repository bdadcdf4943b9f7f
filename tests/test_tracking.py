"""distill.report_to / grpo.report_to: training curves in TensorBoard event files, read back and checked against
train_log.jsonl; a missing tracker package is a one-line error before any model loads."""

from __future__ import annotations

import pytest

from conftest import copy_taught
from ssb.cli import main
from ssb.rows import read_json, read_rows

pytest.importorskip("tensorboard")


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {log_dir}"
    out = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_distill_logs_its_curve_to_tensorboard(taught, tmp_path):
    from ssb.stages import distill
    from ssb.configio import load_config

    cfg, src = taught
    run = copy_taught(src, tmp_path / "run")
    over = [f"model.name_or_path={cfg.model.name_or_path}", "model.device=cpu", f"data_dir={cfg.data_dir}",
            "distill.epochs=2", "distill.chunk_size=16", "teach.max_examples=8", "rollout.data={name: arith, limit: 8}"]
    plain = copy_taught(src, tmp_path / "plain")
    distill.run(load_config(None, over), plain)
    m = distill.run(load_config(None, over + ["distill.report_to=tensorboard"]), run)
    assert m["fingerprint"] == read_json(plain / "distill" / "manifest.json")["fingerprint"]  # a view, not a result
    log = read_rows(run / "distill" / "train_log.jsonl")
    got = _scalars(run / "distill" / "tracker")
    assert sorted(got["distill/loss"]) == [r["step"] for r in log] and len(log) == m["counts"]["steps"] > 1
    for r in log:
        assert got["distill/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert got["distill/lr"][r["step"]] == pytest.approx(r["lr"], rel=1e-6)
        assert got["distill/grad_norm"][r["step"]] == pytest.approx(r["grad_norm"], rel=1e-6)
        assert got["distill/skipped"][r["step"]] == 0.0
    assert set(got) >= {"distill/tokens_per_s", "distill/tokens", "distill/epoch"}


def test_grpo_logs_its_curve_to_tensorboard(tiny_model_dir, data_dir, tmp_path):
    from ssb.stages import grpo
    from ssb.configio import load_config

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", f"data_dir={data_dir}",
                             "rollout.data={name: arith, limit: 8}", "grpo.steps=2", "grpo.batch_size=2",
                             "grpo.num_generations=2", "grpo.micro_batch_size=4", "grpo.max_new_tokens=8",
                             "grpo.logging_steps=1", "grpo.report_to=tensorboard"])
    grpo.run(cfg, tmp_path)
    got = _scalars(tmp_path / "grpo" / "tracker")
    rewards = {r["step"]: r["reward"] for r in read_rows(tmp_path / "grpo" / "train_log.jsonl") if "reward" in r}
    assert rewards and {s: got["train/reward"][s] for s in rewards} == pytest.approx(rewards, rel=1e-5)


def test_a_tracker_that_is_not_installed_is_refused_first(taught, tmp_path, capsys, monkeypatch):
    import importlib.util

    cfg, src = taught
    run = copy_taught(src, tmp_path / "run")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["distill", "--run-dir", str(run), f"model.name_or_path={cfg.model.name_or_path}", "model.device=cpu",
                 "distill.report_to=wandb"]) == 2
    assert "distill.report_to=wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not (run / "distill").exists()
