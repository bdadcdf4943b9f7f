"""ssb export: a distilled tiny run exported as a plain transformers model (same logits as base + adapter) with its
card's numbers taken from the run, the adapter alone, and the curated data set loadable with ``datasets``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import copy_taught
from ssb.cli import main
from ssb.rows import read_json, read_rows


@pytest.fixture(scope="module")
def compared(taught, tmp_path_factory):
    """ROOT/base (evaluated, no adapter) and ROOT/ssb (distilled + evaluated), laid out as ssb compare does."""
    from ssb.stages import distill, evaluate
    from ssb.configio import load_config

    cfg, src = taught
    root = tmp_path_factory.mktemp("compared")
    run = copy_taught(src, root / "ssb")
    cfg = load_config(None, [f"model.name_or_path={cfg.model.name_or_path}", "model.device=cpu",
                             f"data_dir={cfg.data_dir}", "distill.lr=5e-2", "distill.epochs=2",
                             "distill.chunk_size=16", "evaluate.benchmarks=[{name: arith, seed: 1, limit: 16}]",
                             "evaluate.max_new_tokens=24", "evaluate.batch_size=16", "teach.max_examples=8",
                             "rollout.data={name: arith, limit: 8}"])
    distill.run(cfg, run)
    evaluate.run(cfg, run)
    base_cfg = load_config(None, [f"model.name_or_path={cfg.model.name_or_path}", "model.device=cpu",
                                  f"data_dir={cfg.data_dir}", "evaluate.adapter=none",
                                  "evaluate.benchmarks=[{name: arith, seed: 1, limit: 16}]",
                                  "evaluate.max_new_tokens=24", "evaluate.batch_size=16"])
    evaluate.run(base_cfg, root / "base")
    return cfg, root


def _args(cfg):
    return [f"model.name_or_path={cfg.model.name_or_path}", "model.device=cpu", f"data_dir={cfg.data_dir}",
            "distill.lr=5e-2", "distill.epochs=2", "distill.chunk_size=16",
            "evaluate.benchmarks=[{name: arith, seed: 1, limit: 16}]", "evaluate.max_new_tokens=24",
            "evaluate.batch_size=16", "teach.max_examples=8", "rollout.data={name: arith, limit: 8}"]


def test_exported_model_loads_in_plain_transformers_with_the_adapters_logits(compared, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ssb.models import load_model

    cfg, root = compared
    out = tmp_path / "model"
    assert main(["export", "--run-dir", str(root / "ssb"), "--out", str(out), *_args(cfg)]) == 0
    assert f"exported model to {out}" in capsys.readouterr().out
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)])
    adapter = root / "ssb" / "distill" / "adapter"
    with torch.no_grad():
        got = model(ids).logits
        unmerged = load_model(cfg.model, adapter=adapter)(ids).logits
        base = load_model(cfg.model)(ids).logits
    torch.testing.assert_close(got, unmerged, rtol=1e-4, atol=1e-4)  # base + adapter, merged once
    assert not torch.allclose(got, base, atol=1e-3)  # and the adapter did change the model
    gen = GenerationConfig.from_pretrained(out)
    assert gen.do_sample is False and gen.max_new_tokens == 24
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id

    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and header["license"] == "other" and "ssb" in header["tags"]
    metrics = read_json(root / "ssb" / "evaluate" / "arith" / "metrics.json")
    base_metrics = read_json(root / "base" / "evaluate" / "arith" / "metrics.json")
    row = next(line for line in card.splitlines() if line.startswith("| arith |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "16" and cells[2].startswith(f"{100 * metrics['accuracy']:.1f} [")
    assert cells[3] == f"{100 * base_metrics['accuracy']:.1f}"
    assert cells[4].startswith(f"{100 * (metrics['accuracy'] - base_metrics['accuracy']):+.1f} [")
    examples = read_json(root / "ssb" / "distill" / "manifest.json")["counts"]["examples"]
    assert f"**Training data:** {examples} examples" in card and "Semantic Soft Bootstrapping" in card
    assert json.loads((out / "ssb_export.json").read_text())["method"] == "SSB"


def test_adapter_only_export_and_a_refused_target(compared, tmp_path, capsys):
    from peft import PeftModel

    from ssb.models import load_model

    cfg, root = compared
    out = tmp_path / "adapter"
    assert main(["export", "--run-dir", str(root / "ssb"), "--out", str(out), "--adapter-only", *_args(cfg)]) == 0
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert header["library_name"] == "peft"
    from transformers import AutoTokenizer, GenerationConfig

    stops = GenerationConfig.from_pretrained(out).eos_token_id  # the merged export's, without loading weights
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>") in stops
    ids = torch.tensor([[1, 7, 30, 42, 5, 2]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(load_model(cfg.model), str(out))(ids).logits
        want = load_model(cfg.model, adapter=root / "ssb" / "distill" / "adapter")(ids).logits
    torch.testing.assert_close(got, want)
    capsys.readouterr()
    assert main(["export", "--run-dir", str(root / "ssb"), "--out", str(out), *_args(cfg)]) == 2  # not empty
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", "--run-dir", str(root / "base"), "--out", str(tmp_path / "x"), *_args(cfg)]) == 2
    assert "no trained adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_curated_data_set_loads_with_datasets(compared, tmp_path):
    import datasets

    cfg, root = compared
    out = tmp_path / "data"
    assert main(["export", "--run-dir", str(root / "ssb"), "--out", str(out), "--dataset", *_args(cfg)]) == 0
    ds = datasets.load_dataset(str(out), split="train")
    examples = read_rows(root / "ssb" / "teach" / "examples.jsonl")
    pairs = {p["id"]: p for p in read_rows(root / "ssb" / "curate" / "pairs.jsonl")}
    assert ds.num_rows == len(examples) > 0
    assert ds["id"] == [str(e["id"]) for e in examples] and ds["solution"] == [e["reply_text"] for e in examples]
    assert ds["correct_attempt"] == [pairs[e["id"]]["correct"] for e in examples]
    assert ds["incorrect_attempt"] == [pairs[e["id"]]["incorrect"] for e in examples]
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert header["configs"][0]["data_files"][0]["split"] == "train" and header["license"] == "other"
