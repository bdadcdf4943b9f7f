"""Stage tests: the exact files each stage writes, their schema, resume after a crash, config-change detection,
and the adapter's contract. One small pipeline on the tiny model is run once per module and inspected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import small_overrides
from ssb.stages import curate, distill, evaluate, rollout, teach
from ssb.configio import load_config
from ssb.engine.transformers_engine import TransformersEngine
from ssb.errors import SsbError
from ssb.rows import read_rows


def _cfg(tiny_model_dir, data_dir, *extra):
    return load_config(None, small_overrides(tiny_model_dir, data_dir) + list(extra))


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tiny_model_dir, data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = _cfg(tiny_model_dir, data_dir)
    for stage in (rollout, curate, teach, distill, evaluate):
        stage.run(cfg, run_dir)
    return cfg, run_dir


def test_rollout_files_and_schema(run):
    cfg, d = run
    assert _files(d / "rollout") == {"rollouts.jsonl", "started.json", "manifest.json", "cost.json"}
    rows = read_rows(d / "rollout" / "rollouts.jsonl")
    assert [r["id"] for r in rows] == [f"arith-{i}" for i in range(24)]
    eos = 2  # <|im_end|> in the tiny tokenizer
    for r in rows:
        assert set(r) == {"id", "question", "answer", "grader", "samples"}
        assert len(r["samples"]) == cfg.rollout.samples
        for s in r["samples"]:
            assert set(s) == {"text", "token_ids", "finish_reason"}
            assert (s["token_ids"][-1] == eos) == (s["finish_reason"] == "stop")
            assert eos not in s["token_ids"][:-1]
    m = json.loads((d / "rollout" / "manifest.json").read_text())
    assert m["counts"]["problems"] == 24 and m["counts"]["samples"] == 24 * cfg.rollout.samples
    assert {"fingerprint", "wall_seconds", "versions", "git_commit", "config"} <= set(m)


def test_curate_files_stats_and_choices(run):
    _, d = run
    assert _files(d / "curate") == {"graded.jsonl", "pairs.jsonl", "stats.json", "started.json", "manifest.json",
                                    "cost.json"}
    stats = json.loads((d / "curate" / "stats.json").read_text())
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["problems"] == 24
    assert stats["kept"] > 0
    graded = {g["id"]: g for g in read_rows(d / "curate" / "graded.jsonl")}
    for p in read_rows(d / "curate" / "pairs.jsonl"):
        g = graded[p["id"]]
        assert g["correct"][p["correct_index"]] and not g["correct"][p["incorrect_index"]]
        assert g["answers"][p["incorrect_index"]] == p["incorrect_answer"] is not None


def test_teach_keeps_only_correct_finished_replies_as_sampled(run):
    _, d = run
    assert _files(d / "teach") == {"attempts.jsonl", "examples.jsonl", "started.json", "manifest.json", "cost.json"}
    from ssb.grading import grade
    from ssb.models import load_tokenizer

    cfg = run[0]
    tok = load_tokenizer(cfg.model)
    examples = read_rows(d / "teach" / "examples.jsonl")
    assert 0 < len(examples) <= cfg.teach.max_examples
    for e in examples:
        assert e["reply_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert grade(e["reply_text"], e["answer"], e["grader"])
        assert tok.decode(e["reply_ids"][:-1]) == e["reply_text"]
        prompt = tok.decode(e["teacher_prompt_ids"])
        assert "CORRECT" in prompt and "INCORRECT" in prompt and e["question"] in prompt
        assert prompt.endswith("<|im_start|>assistant\n")


def test_distill_writes_a_plain_peft_adapter_that_changes_outputs(run):
    cfg, d = run
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "train_log.jsonl",
            "manifest.json"} <= _files(d / "distill")
    log = read_rows(d / "distill" / "train_log.jsonl")
    assert len(log) == json.loads((d / "distill" / "manifest.json").read_text())["counts"]["steps"] > 0
    assert {"step", "loss", "grad_norm", "lr", "tokens_per_s"} <= set(log[0])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(d / "distill" / "adapter"))
    for n, p in tuned.named_parameters():
        if "lora_" in n:
            assert p.dtype == torch.float32
    assert not torch.allclose(tuned(ids).logits, before)


def test_evaluate_files_and_metrics(run):
    _, d = run
    assert _files(d / "evaluate" / "arith") == {"samples.jsonl", "metrics.json", "started.json", "manifest.json",
                                                "cost.json"}
    m = json.loads((d / "evaluate" / "arith" / "metrics.json").read_text())
    assert m["problems"] == 8 and 0 <= m["accuracy"] <= 1
    assert m["adapter"].endswith("adapter")
    for r in read_rows(d / "evaluate" / "arith" / "samples.jsonl"):
        (s,) = r["samples"]
        assert set(s) >= {"text", "answer", "correct", "strict_correct", "n_tokens", "finish_reason"}


def test_each_evaluation_bills_only_its_own_time(run, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """A benchmark's cost is its own: neither the distill that a saved run's evaluation reruns first
    (``restore_weights``) nor the benchmarks evaluated before it in the same command. (Every benchmark's clock used
    to run from when the command built them all: RFT's MATH500 evaluation billed itself its 1,982 s distill rerun.)"""
    import shutil
    from types import SimpleNamespace

    from ssb import rundir

    _, d = run
    for s in ("rollout", "curate", "teach", "distill"):
        shutil.copytree(d / s, tmp_path / s)
    cfg = _cfg(tiny_model_dir, data_dir, "evaluate.benchmarks=[{name: arith, seed: 1, limit: 4}, "
                                         "{name: arith, split: b, seed: 2, limit: 4}]")
    skew, real = [0.0], rundir.time.time
    monkeypatch.setattr(rundir, "time", SimpleNamespace(time=lambda: real() + skew[0]))  # the stages' clock

    def taking(seconds, f):  # f, which the stages' clock sees take `seconds` more
        def g(*a, **k):
            out = f(*a, **k)
            skew[0] += seconds
            return out
        return g

    monkeypatch.setattr(evaluate, "restore_weights", taking(1000.0, lambda *a, **k: None))
    monkeypatch.setattr(evaluate, "generate_rows", taking(100.0, evaluate.generate_rows))
    evaluate.run(cfg, tmp_path)
    walls = [json.loads((tmp_path / "evaluate" / b / "manifest.json").read_text())["wall_seconds"]
             for b in ("arith", "arith_b")]
    assert all(100.0 <= w < 160.0 for w in walls), walls


def test_a_saved_run_without_its_adapter_reruns_distill_with_the_same_loss_curve(run, tmp_path, capsys):
    cfg, d = run
    import shutil

    from ssb.stages import curve_agreement

    for s in ("rollout", "curate", "teach", "distill"):  # as benchmarks/testbed_cpu.sh saves a run: no weights
        shutil.copytree(d / s, tmp_path / s, ignore=shutil.ignore_patterns("adapter") if s == "distill" else None)
    evaluate.run(cfg, tmp_path)

    losses = [[r["loss"] for r in read_rows(x / "distill" / "train_log.jsonl")] for x in (d, tmp_path)]
    assert losses[0] == losses[1] and len(losses[0]) > 0
    assert "reproduces the saved loss curve" in capsys.readouterr().err
    assert (tmp_path / "evaluate" / "arith" / "samples.jsonl").read_bytes() == \
        (d / "evaluate" / "arith" / "samples.jsonl").read_bytes()  # the same adapter: the same greedy replies
    assert curve_agreement([1.0, 2.0], [1.0, 2.1]).startswith("WARNING: the rerun does NOT reproduce")
    assert "WARNING" in curve_agreement([1.0], [1.0, 2.0])
    (tmp_path / "distill" / "adapter" / "adapter_config.json").unlink()  # some weights there: not rerun, refused
    shutil.rmtree(tmp_path / "evaluate")
    with pytest.raises(SsbError, match="adapter_config.json: missing"):
        evaluate.run(cfg, tmp_path)


def forbid_model_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a finished stage loaded a model")

    for target in ("ssb.stages.rollout.make_engine", "ssb.stages.teach.make_engine", "ssb.stages.evaluate.make_engine",
                   "ssb.stages.distill.load_model", "ssb.models.load_model"):
        monkeypatch.setattr(target, boom)


def test_finished_stages_do_no_work(run, monkeypatch):
    cfg, d = run
    forbid_model_loading(monkeypatch)
    def stamps():  # every file but the lock (its holder line is rewritten by whoever takes it)
        return {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file() and p.name != ".lock"}

    before = stamps()
    for stage in (rollout, curate, teach, distill, evaluate):
        stage.run(cfg, d)
    assert before == stamps()


def test_changed_config_is_refused_then_forced(run, tmp_path):
    cfg, d = run
    import shutil

    copy = tmp_path / "r"
    shutil.copytree(d / "rollout", copy / "rollout")
    changed = load_config(None, [f"model.name_or_path={cfg.model.name_or_path}", "rollout.samples=2",
                                 "rollout.data={name: arith, limit: 4}", "rollout.max_new_tokens=8",
                                 "model.device=cpu"])
    with pytest.raises(SsbError, match="--force"):
        rollout.run(changed, copy)
    rollout.run(changed, copy, force=True)
    assert len(read_rows(copy / "rollout" / "rollouts.jsonl")) == 4


def test_interrupted_rollout_resumes_without_duplicates(tiny_model_dir, data_dir, tmp_path, monkeypatch, run):
    cfg = _cfg(tiny_model_dir, data_dir)
    real = TransformersEngine.generate
    calls = {"n": 0}

    def crash_after_sixteen(self, prompts, params, seed, progress=None, on_done=None):
        def done(i, samples):  # the 17th problem to finish crashes the call: two appends of 8 rows were made
            calls["n"] += 1
            if calls["n"] > 16:
                raise RuntimeError("simulated crash")
            on_done(i, samples)
        return real(self, prompts, params, seed, progress, done)

    monkeypatch.setattr(TransformersEngine, "generate", crash_after_sixteen)
    with pytest.raises(RuntimeError):
        rollout.run(cfg, tmp_path)
    path = tmp_path / "rollout" / "rollouts.jsonl"
    assert len(read_rows(path)) == 16 and not (tmp_path / "rollout" / "manifest.json").exists()
    with open(path, "a") as f:  # and a torn write at the end
        f.write('{"id": "arith-16", "quest')
    monkeypatch.setattr(TransformersEngine, "generate", real)
    rollout.run(cfg, tmp_path)
    rows = read_rows(path)
    assert [r["id"] for r in rows] == [f"arith-{i}" for i in range(24)]
    assert rows == read_rows(run[1] / "rollout" / "rollouts.jsonl")  # same as the uninterrupted run
    # the cost is both processes' together: the same tokens as the uninterrupted run, the wall time of both
    resumed, whole = (json.loads((d / "rollout" / "manifest.json").read_text()) for d in (tmp_path, run[1]))
    assert resumed["generated_tokens"] == whole["generated_tokens"] > 0
    attempts = json.loads((tmp_path / "rollout" / "cost.json").read_text())["attempts"]
    assert resumed["attempts"] == len(attempts) == 2 and all(a["wall_seconds"] > 0 for a in attempts)
    assert resumed["wall_seconds"] == pytest.approx(sum(a["wall_seconds"] for a in attempts), abs=2e-3)
    assert sum(a["counters"]["generated_tokens"] for a in attempts) == resumed["generated_tokens"]


def test_teach_resumes_after_crash(run, tmp_path, monkeypatch):
    cfg, d = run
    import shutil

    for s in ("rollout", "curate"):
        shutil.copytree(d / s, tmp_path / s)
    real = TransformersEngine.generate
    monkeypatch.setattr(TransformersEngine, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        teach.run(cfg, tmp_path)
    monkeypatch.setattr(TransformersEngine, "generate", real)
    teach.run(cfg, tmp_path)
    assert read_rows(tmp_path / "teach" / "examples.jsonl") == read_rows(d / "teach" / "examples.jsonl")


def test_zero_pairs_is_a_clear_error(run, tmp_path):
    cfg, d = run
    import shutil

    shutil.copytree(d / "rollout", tmp_path / "rollout")
    rows = read_rows(tmp_path / "rollout" / "rollouts.jsonl")
    for r in rows:
        r["answer"] = "-1"  # nothing is ever correct
    from ssb.rundir import file_record
    from ssb.rows import write_rows

    write_rows(tmp_path / "rollout" / "rollouts.jsonl", rows)
    manifest = json.loads((tmp_path / "rollout" / "manifest.json").read_text())  # as if rollout had written them
    manifest["files"]["rollouts.jsonl"] = file_record(tmp_path / "rollout" / "rollouts.jsonl")
    (tmp_path / "rollout" / "manifest.json").write_text(json.dumps(manifest))
    curate.run(cfg, tmp_path)
    with pytest.raises(SsbError, match="0 pairs"):
        teach.run(cfg, tmp_path)
    assert not (tmp_path / "teach").exists()
