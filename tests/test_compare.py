"""`ssb compare` end to end on the tiny model: all six runs (base, SSB, GRPO at SSB's cost, SFT, RFT, on-policy), the links
that let the ablations reuse SSB's upstream stages, the paired statistics and the cost plot; a rerun does nothing."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import small_overrides
from ssb import compare
from ssb.cli import main
from ssb.configio import load_config
from ssb.errors import SsbError
from ssb.rows import read_rows

GRPO = ["grpo.steps=2", "grpo.batch_size=2", "grpo.num_generations=2", "grpo.micro_batch_size=4",
        "grpo.max_new_tokens=8", "grpo.save_every=0"]


@pytest.fixture(scope="module")
def compared(tiny_model_dir, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    over = small_overrides(tiny_model_dir, data_dir) + ["rollout.data={name: arith, limit: 48}", *GRPO]
    assert main(["compare", "--run-dir", str(root), *over]) == 0
    return root, over


def test_every_run_is_evaluated_on_the_same_problems(compared):
    root, _ = compared
    ids = {r: [row["id"] for row in read_rows(root / r / "evaluate" / "arith" / "samples.jsonl")]
           for r in compare.RUNS}
    assert len(set(map(tuple, ids.values()))) == 1 and len(ids["base"]) == 8
    adapters = {r: json.loads((root / r / "evaluate" / "arith" / "metrics.json").read_text())["adapter"]
                for r in compare.RUNS}
    assert adapters["base"] is None and adapters["grpo"].endswith("grpo/adapter")
    assert all(adapters[r].endswith("distill/adapter") for r in ("ssb", "sft", "rft", "onpolicy"))


def test_ablations_link_ssb_upstream_stages(compared):
    root, _ = compared
    for run, stages in compare.SSB_UPSTREAM.items():
        for s in stages:
            assert (root / run / s).is_symlink() and os.readlink(root / run / s) == f"../ssb/{s}"
    assert not (root / "rft" / "teach").exists()  # RFT needs no teacher
    sft = yaml.safe_load((root / "sft" / "config.yaml").read_text())["distill"]
    rft = yaml.safe_load((root / "rft" / "config.yaml").read_text())["distill"]
    assert (sft["kd_weight"], sft["ce_weight"], sft["targets"]) == (0.0, 1.0, "teacher")
    assert (rft["kd_weight"], rft["ce_weight"], rft["targets"]) == (0.0, 1.0, "rollouts")
    onp = yaml.safe_load((root / "onpolicy" / "config.yaml").read_text())["distill"]
    assert (onp["kd_weight"], onp["targets"], onp["hint"]) == (1.0, "on_policy", "pair")


def test_on_policy_run_records_its_generation_cost(compared):
    root, _ = compared
    m = json.loads((root / "onpolicy" / "distill" / "manifest.json").read_text())
    log = read_rows(root / "onpolicy" / "distill" / "train_log.jsonl")
    assert m["targets"] == "on_policy" and m["generated_tokens"] == sum(r["sampled_tokens"] for r in log) > 0
    assert "onpolicy" in (root / "report" / "report.md").read_text()


def test_grpo_gets_ssb_training_cost_and_problems(compared):
    root, _ = compared
    cfg = yaml.safe_load((root / "grpo" / "config.yaml").read_text())
    cost = compare.training_cost(root / "ssb")
    assert cost["gpu_seconds"] == 0 and cost["cpu_seconds"] > 0  # on a CPU the budget is SSB's CPU-seconds
    assert cfg["grpo"]["max_cpu_seconds"] == pytest.approx(cost["cpu_seconds"]) and cfg["grpo"]["max_seconds"] is None
    rolled = json.loads((root / "ssb" / "rollout" / "manifest.json").read_text())["counts"]["problems"]
    assert cfg["rollout"]["data"]["limit"] == rolled < 48


def test_a_grpo_budget_given_to_compare_is_kept(compared):
    root, over = compared
    for budget in ("grpo.max_cpu_seconds=123.0", "grpo.max_seconds=45.0"):
        extra = compare.grpo_overrides(load_config(None, [*over, budget]), root / "ssb")
        assert not any(e.startswith(("grpo.max_seconds", "grpo.max_cpu_seconds")) for e in extra)
        assert extra[0].startswith("rollout.data=")
    measured = compare.grpo_overrides(load_config(None, over), root / "ssb")
    assert measured[0].startswith("grpo.max_cpu_seconds=")


def test_report_has_paired_differences_and_cost_plot(compared):
    root, _ = compared
    paired = json.loads((root / "report" / "paired.json").read_text())
    pairs = {(c["run"], c["against"]) for c in paired["comparisons"] if c["benchmark"] == "arith"}
    assert {(r, "base") for r in ("ssb", "grpo", "sft", "rft", "onpolicy")} | {("ssb", r) for r in ("grpo", "sft", "rft", "onpolicy")} <= pairs
    for c in paired["comparisons"]:
        assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    assert (root / "report" / "cost.png").stat().st_size > 0
    assert "Paired differences" in (root / "report" / "report.md").read_text()


def test_rerun_does_nothing(compared):
    root, over = compared
    manifests = sorted(root.glob("*/**/manifest.json"))
    before = {p: p.stat().st_mtime_ns for p in manifests}
    assert main(["compare", "--run-dir", str(root), *over]) == 0
    assert {p: p.stat().st_mtime_ns for p in manifests} == before


def test_ablation_without_ssb_is_refused(tiny_model_dir, data_dir, tmp_path):
    from ssb.configio import load_config

    cfg = load_config(None, small_overrides(tiny_model_dir, data_dir))
    with pytest.raises(SsbError, match="needs the ssb run's finished teach stage"):
        compare.run(cfg, tmp_path, runs=["sft"])
    with pytest.raises(SsbError, match="unknown run"):
        compare.run(cfg, tmp_path, runs=["ppo"])
