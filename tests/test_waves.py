"""Budgeted generation (ssb.stages.waves): rollout -> curate -> teach in waves until teach.max_examples examples exist.
The examples must not depend on the wave sizes or on an interruption; far fewer problems are rolled out."""

from __future__ import annotations

import json
import time

import pytest

from conftest import small_overrides
from ssb.stages import teach, waves
from ssb.cli import main
from ssb.configio import load_config
from ssb.rows import read_rows


def _cfg(tiny_model_dir, data_dir, *extra):
    over = small_overrides(tiny_model_dir, data_dir) + ["rollout.data={name: arith, limit: 96}", "teach.attempts=1"]
    return load_config(None, over + list(extra))


def _examples(run_dir) -> list[tuple]:
    return [(r["id"], tuple(r["reply_ids"])) for r in read_rows(run_dir / "teach" / "examples.jsonl")]


def test_next_total_sizes_waves_from_the_yield():
    assert waves.next_total(100, 25, 50, 1000, 1) == 210  # 25 more at 0.25/problem, +10%
    assert waves.next_total(100, 0, 50, 150, 1) == 150  # no yield yet: double, capped by the data
    assert waves.next_total(10, 9, 10, 1000, 8) == 18  # at least min_wave more


ELAPSED: dict = {}


@pytest.fixture(scope="module")
def budgeted(tiny_model_dir, data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("waves")
    cfg = _cfg(tiny_model_dir, data_dir, "rollout.first_wave=4")
    t0 = time.time()
    waves.run(cfg, run_dir)
    ELAPSED[run_dir] = time.time() - t0
    return cfg, run_dir


def test_the_waves_time_is_split_between_the_stages_not_counted_three_times(budgeted):
    cfg, d = budgeted
    walls = {s: json.loads((d / s / "manifest.json").read_text())["wall_seconds"] for s in ("rollout", "curate",
                                                                                            "teach")}
    assert all(w > 0 for w in walls.values())
    assert sum(walls.values()) <= ELAPSED[d] + 0.5


def test_waves_roll_out_only_what_the_examples_need(budgeted):
    cfg, d = budgeted
    m = json.loads((d / "rollout" / "manifest.json").read_text())
    assert len(_examples(d)) == cfg.teach.max_examples == 8
    assert m["counts"]["problems"] < 96 / 2
    assert len(m["waves"]) >= 2 and m["waves"][-1]["examples_total"] == 8
    assert sum(w["problems"] for w in m["waves"]) == m["counts"]["problems"]
    assert m["problems_needed"] <= m["counts"]["problems"]
    ids = [r["id"] for r in read_rows(d / "rollout" / "rollouts.jsonl")]
    assert len(ids) == len(set(ids)) == m["counts"]["problems"]
    t = json.loads((d / "teach" / "manifest.json").read_text())
    assert t["prompt"] == "guided" and t["funnel"]["pairs_tried"] >= 8


def test_same_examples_whatever_the_wave_size(budgeted, tiny_model_dir, data_dir, tmp_path):
    cfg, d = budgeted
    other = _cfg(tiny_model_dir, data_dir, "rollout.first_wave=16")
    waves.run(other, tmp_path)
    assert _examples(tmp_path) == _examples(d)
    small, big = read_rows(d / "rollout" / "rollouts.jsonl"), read_rows(tmp_path / "rollout" / "rollouts.jsonl")
    n = min(len(small), len(big))
    assert small[:n] == big[:n]  # the same problems get the same samples


def test_interrupted_waves_resume_to_the_same_examples(budgeted, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    cfg, d = budgeted
    calls = {"n": 0}
    work = teach.Teacher.work

    def crash_on_second_wave(self, pairs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return work(self, pairs)

    monkeypatch.setattr(teach.Teacher, "work", crash_on_second_wave)
    with pytest.raises(KeyboardInterrupt):
        waves.run(cfg, tmp_path)
    assert not (tmp_path / "teach" / "manifest.json").exists()
    monkeypatch.setattr(teach.Teacher, "work", work)
    waves.run(cfg, tmp_path)
    assert _examples(tmp_path) == _examples(d)
    assert read_rows(tmp_path / "rollout" / "rollouts.jsonl") == read_rows(d / "rollout" / "rollouts.jsonl")


def test_ssb_run_uses_waves_and_budget_all_rolls_out_everything(tiny_model_dir, data_dir, tmp_path):
    over = small_overrides(tiny_model_dir, data_dir) + ["rollout.data={name: arith, limit: 40}"]
    assert main(["run", "--run-dir", str(tmp_path / "w"), "--stages", "rollout,curate,teach", *over]) == 0
    assert main(["run", "--run-dir", str(tmp_path / "a"), "--stages", "rollout,curate,teach", *over,
                 "rollout.budget=all"]) == 0
    rolled = {k: len(read_rows(tmp_path / k / "rollout" / "rollouts.jsonl")) for k in ("w", "a")}
    assert rolled["a"] == 40 and rolled["w"] < 40
    assert "waves" in json.loads((tmp_path / "w" / "rollout" / "manifest.json").read_text())

