"""The command line: one-line errors with exit code 2, and the end-to-end smoke run from the README."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from ssb.cli import main
from test_pipeline import forbid_model_loading


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "--run-dir", "{tmp}/r", "rollout.samples=x"], "rollout.samples: expected an integer"),
    (["run", "--run-dir", "{tmp}/r", "--config", "{tmp}/missing.yaml"], "config file not found"),
    (["run", "--run-dir", "{tmp}/r", "--stages", "rollout,fly"], "unknown stage 'fly'"),
    (["curate", "--run-dir", "{tmp}/r"], "stage 'rollout' has not finished"),
    (["evaluate", "--run-dir", "{tmp}/r", "evaluate.adapter={tmp}/nothing"], "not a peft adapter directory"),
])
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    code, err = _run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert err.startswith("ssb: error: ") and message in err and err.count("\n") == 1


def test_malformed_data_names_file_and_line(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"question": oops}\n')
    code, err = _run(capsys, "rollout", "--run-dir", str(tmp_path / "r"), f"model.name_or_path={tiny_model_dir}",
                     f"rollout.data.name={data}")
    assert code == 2 and f"{data}:2" in err
    assert not (tmp_path / "r" / "rollout").exists()


def test_smoke_config_end_to_end_then_nothing_to_do(tmp_path, capsys, monkeypatch, cache_dir):
    monkeypatch.chdir(REPO)  # README's command, from the repository root
    monkeypatch.delenv("SSB_DATA_DIR", raising=False)
    import datasets

    def no_hub(*a, **k):
        raise AssertionError(f"the smoke run reached for the hub: {a} {k}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)  # offline: it reads only the data bundled with ssb
    run_dir = tmp_path / "smoke"
    code, err = _run(capsys, "run", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir))
    assert code == 0, err
    assert f"results in {run_dir}" in err
    for f in ("config.yaml", "rollout/manifest.json", "curate/stats.json", "curate/manifest.json",
              "teach/examples.jsonl", "teach/manifest.json", "distill/adapter/adapter_model.safetensors",
              "distill/manifest.json", "evaluate/arith/metrics.json", "evaluate/gsm8k_test/metrics.json"):
        assert (run_dir / f).is_file(), f
    metrics = json.loads((run_dir / "evaluate/arith/metrics.json").read_text())
    assert metrics["problems"] == 32 and 0 < metrics["accuracy"] <= 1
    assert json.loads((run_dir / "evaluate/gsm8k_test/metrics.json").read_text())["problems"] == 8

    forbid_model_loading(monkeypatch)
    code, err = _run(capsys, "run", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir))
    assert code == 0, err
    assert err.count("(already done)") == 4
