"""Each stage's fingerprint follows from the config fields it declares it reads (``READS`` in its module, see
:class:`ssb.reads.Reads`), and a stage cannot read a field it has not declared. Changing any field must change
the fingerprint of every stage that reads it (and of the stages after those) and of no other."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from ssb.stages import STAGES, curate, distill, evaluate, grpo, rollout, teach
from ssb.config import Config, DatasetConfig
from ssb.configio import load_config
from ssb.reads import UndeclaredConfigRead, get_path

READS = {"rollout": rollout.READS, "rollout-waves": rollout.WAVES_READS, "curate": curate.READS,
         "teach": teach.READS, "distill": distill.READS, "evaluate": evaluate.READS, "grpo": grpo.READS}
ENGINE_KNOBS = {f"engine.{f.name}" for f in dataclasses.fields(Config().engine)} - {"engine.backend"}
# Fields read but deliberately not in the fingerprint: how the work runs, not what it produces (and evaluate's
# lists, which enter each benchmark's fingerprint as its one benchmark and the resolved adapter).
NOT_HASHED = {
    "rollout": ENGINE_KNOBS | {"data_dir"},
    "rollout-waves": ENGINE_KNOBS | {"data_dir"},
    "curate": set(),
    "teach": ENGINE_KNOBS,
    "distill": ENGINE_KNOBS | {"engine.backend", "data_dir", "distill.fsdp", "distill.report_to",
                               "distill.sample_merged"},
    "evaluate": ENGINE_KNOBS | {"data_dir", "evaluate.benchmarks", "evaluate.adapter"},
    "grpo": ENGINE_KNOBS | {"engine.backend", "data_dir", "grpo.save_every", "grpo.report_to"},
}


def leaves(obj=None, prefix: str = "") -> list[str]:
    """Every leaf field of the config (a dataset is one leaf)."""
    obj = Config() if obj is None else obj
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, DatasetConfig):
            out += leaves(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 1
    if isinstance(value, DatasetConfig):
        return dataclasses.replace(value, limit=(value.limit or 0) + 1)
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else value + value
    raise AssertionError(f"no change for {value!r}")


def with_field(cfg: Config, key: str) -> Config:
    cfg = copy.deepcopy(cfg)
    *parents, last = key.split(".")
    node = get_path(cfg, ".".join(parents)) if parents else cfg
    setattr(node, last, changed(getattr(node, last)))
    return cfg


def fingerprints(cfg: Config, run_dir) -> dict[str, str]:
    fp = {"rollout": rollout.stage_for(cfg, run_dir).fingerprint,
          "rollout-waves": rollout.stage_for(cfg, run_dir, waves=True).fingerprint,
          "grpo": STAGES["grpo"].stage(cfg, run_dir).fingerprint}
    for name in ("curate", "teach", "distill"):
        fp[name] = STAGES[name].stage(cfg, run_dir, up=fp[STAGES[name].upstream(cfg)[0]]).fingerprint
    fp["evaluate"] = "/".join(s.fingerprint for _, s in evaluate.stages_for(cfg, run_dir,
                                                                          adapter=("adapter", fp["distill"])))
    return fp


def expected(cfg: Config, key: str) -> set[str]:
    """The stages whose fingerprint a change of ``key`` must change: those whose declared result fields cover it,
    and every stage after one of those."""
    direct = {s for s, r in READS.items() if r.covers(key)} | ({"evaluate"} if key == "evaluate.benchmarks" else set())
    out = set(direct)
    for stage, up in (("curate", "rollout"), ("teach", "curate"), ("distill", STAGES["distill"].upstream(cfg)[0]),
                      ("evaluate", "distill")):
        if up in out:
            out.add(stage)
    return out


@pytest.mark.parametrize("targets", ["teacher", "rollouts"])
def test_changing_a_field_changes_the_stages_that_read_it_and_no_other(targets, tmp_path):
    base = load_config(None, [f"distill.targets={targets}", "distill.kd_weight=0", "distill.ce_weight=1"])
    before = fingerprints(base, tmp_path)
    wrong = {}
    for key in leaves():
        after = fingerprints(with_field(base, key), tmp_path)
        moved = {s for s in before if before[s] != after[s]}
        if moved != expected(base, key):
            wrong[key] = (sorted(moved), sorted(expected(base, key)))
    assert not wrong, wrong


def test_rft_distill_covers_the_example_budget_it_reads(tmp_path):
    """The issue's case: with distill.targets=rollouts, distill reads teach.max_examples (how many problems it
    trains on) while its upstream is curate, which does not: a changed budget must not reuse the old adapter."""
    base = load_config(None, ["distill.targets=rollouts", "distill.kd_weight=0", "distill.ce_weight=1"])
    before, after = fingerprints(base, tmp_path), fingerprints(with_field(base, "teach.max_examples"), tmp_path)
    assert before["curate"] == after["curate"] and before["distill"] != after["distill"]


def test_the_fields_left_out_of_fingerprints_are_only_the_declared_how_ones():
    for stage, reads in READS.items():
        readable = {k for k in leaves() if any(k == p or k.startswith(p + ".") for p in reads.result + reads.how)}
        assert {k for k in readable if not reads.covers(k)} == NOT_HASHED[stage], stage


def test_a_stage_cannot_read_a_field_it_does_not_declare():
    cfg = Config()
    view = distill.READS.view(cfg)
    assert view.teach.max_examples == cfg.teach.max_examples and view.distill is cfg.distill
    with pytest.raises(UndeclaredConfigRead, match="teach.attempts"):
        view.teach.attempts
    with pytest.raises(UndeclaredConfigRead, match="'rollout'"):
        curate.READS.view(cfg).rollout
    with pytest.raises(AttributeError):
        view.seed = 1
