import dataclasses
import typing

import pytest

from ssb.config import Config, ConfigError, Range
from ssb.configio import describe, load_config
from ssb.reads import fingerprint


def test_defaults_reproduce_the_paper():
    c = Config()
    assert c.model.name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert (c.rollout.samples, c.rollout.temperature, c.rollout.top_k) == (4, 0.8, 50)
    assert c.rollout.data.name == "gsm8k" and c.rollout.data.split == "train"
    assert c.teach.temperature == 0.4 and c.teach.max_examples == 256 and c.rollout.max_new_tokens == 8192
    d = c.distill
    assert (d.loss, d.temperature, d.scale_t2, d.ce_weight) == ("forward_kl", 2.0, True, 0.0)
    assert (d.lora_r, d.lora_alpha, d.target_modules, d.lr, d.batch_size, d.epochs) == (
        32, 32, "all-linear", 2e-4, 4, 3)


def test_yaml_files_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  samples: 8\ndistill:\n  lr: 1.0e-4\n")
    c = load_config(f, ["rollout.temperature=1.0", "evaluate.benchmarks=[math500, {name: gsm8k, split: test}]",
                        "distill.lr=3e-4"])
    assert c.rollout.samples == 8 and c.rollout.temperature == 1.0 and c.distill.lr == 3e-4
    assert [b.name for b in c.evaluate.benchmarks] == ["math500", "gsm8k"]
    assert c.evaluate.benchmarks[1].split == "test"


@pytest.mark.parametrize("override, message", [
    ("rollout.sample=3", "unknown config key 'rollout.sample'"),
    ("rollout.samples=many", "rollout.samples: expected an integer"),
    ("rollout.samples=0", "rollout.samples: must be > 0"),
    ("distill.loss=mse", "distill.loss: must be one of"),
    ("curate.strict=maybe", "curate.strict: expected true or false"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
    ("rollout", "not of the form"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_fingerprint_changes_with_config_and_every_key_is_documented():
    assert fingerprint(Config()) == fingerprint(Config())
    assert fingerprint(Config()) != fingerprint(load_config(None, ["seed=1"]))
    rows = describe()
    assert all(help for _, _, help in rows) and any(k == "distill.temperature" for k, _, _ in rows)


def test_every_number_declares_its_range():
    """A number without a declared range would take any value; every section's and every dataset's number has one."""
    def numbers(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            kinds = set(typing.get_args(tp)) | {tp, typing.get_origin(tp)}
            if dataclasses.is_dataclass(tp) or list in kinds:
                inner = tp if dataclasses.is_dataclass(tp) else typing.get_args(tp)[0]
                yield from numbers(inner, f"{prefix}{f.name}.")
            elif kinds & {int, float}:
                yield prefix + f.name, f.metadata.get("allowed")

    found = dict(numbers(Config))
    assert "rollout.data.limit" in found and "distill.jsd_beta" in found and "seed" in found
    assert [k for k, allowed in found.items() if not isinstance(allowed, Range)] == []


def test_shipped_configs_load():
    from pathlib import Path

    names = sorted(f.name for f in (Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {"default.yaml", "smoke.yaml", "grpo_smoke.yaml", "testbed.yaml"} <= set(names)
    for name in names:
        cfg = load_config(Path(__file__).parents[1] / "configs" / name)
        assert cfg.model.name_or_path  # every shipped config names its model
