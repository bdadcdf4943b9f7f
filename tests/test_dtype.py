"""``model.dtype=auto``: bf16 on CUDA and on a CPU that multiplies bf16 natively (AMX, AVX512-BF16), fp32 on other
CPUs; the resolved dtype, and a GGUF model's content rather than its path, are what stage fingerprints and
manifests record."""

from __future__ import annotations

import shutil

import pytest
import torch

from ssb import models

from ssb.stages import rollout
from ssb.config import ModelConfig
from ssb.configio import load_config
from ssb.errors import SsbError
from ssb.models import load_model, native_cpu_bf16, resolve_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_cpu(monkeypatch, amx: bool, avx512_bf16: bool):
    """This process as if on a CPU with (or without) AMX tiles and AVX512-BF16."""
    monkeypatch.delenv("SSB_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize("amx,avx,want,kind", [(True, True, torch.bfloat16, "amx"),
                                               (False, True, torch.bfloat16, "avx512_bf16"),
                                               (False, False, torch.float32, None)])
def test_auto_follows_the_cpus_native_bf16(monkeypatch, amx, avx, want, kind):
    fake_cpu(monkeypatch, amx, avx)
    assert native_cpu_bf16() == kind
    assert resolve_dtype(ModelConfig(dtype="auto"), CPU) == want
    assert resolve_dtype(ModelConfig(dtype="auto"), CUDA) == torch.bfloat16
    assert resolve_dtype(ModelConfig(dtype="float32"), CPU) == torch.float32  # asked for: never changed
    assert resolve_dtype(ModelConfig(dtype="bfloat16"), CPU) == torch.bfloat16


def test_the_environment_overrides_the_check(monkeypatch):
    fake_cpu(monkeypatch, True, True)
    monkeypatch.setenv("SSB_CPU_BF16", "0")
    assert native_cpu_bf16() is None and resolve_dtype(ModelConfig(), CPU) == torch.float32
    fake_cpu(monkeypatch, False, False)
    monkeypatch.setenv("SSB_CPU_BF16", "1")
    assert resolve_dtype(ModelConfig(), CPU) == torch.bfloat16


def test_the_model_loads_in_the_resolved_dtype_and_says_so_once(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(models, "ANNOUNCED", set())
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")
    fake_cpu(monkeypatch, False, True)
    assert load_model(cfg).dtype == torch.bfloat16
    load_model(cfg)
    err = capsys.readouterr().err
    assert err.count("ssb: model dtype bfloat16 on cpu (auto: this CPU multiplies bf16 natively, avx512_bf16)") == 1
    fake_cpu(monkeypatch, False, False)
    assert load_model(cfg).dtype == torch.float32
    assert "model dtype float32 on cpu (auto: this CPU has no native bf16 matrix multiply)" in capsys.readouterr().err


def test_stages_record_the_resolved_dtype(tiny_model_dir, tmp_path, monkeypatch):
    """A run begun where auto meant bf16 is not continued in fp32 (or the reverse) on another CPU."""
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu"])
    fake_cpu(monkeypatch, False, True)
    native = rollout.stage_for(cfg, tmp_path)
    fake_cpu(monkeypatch, False, False)
    emulated = rollout.stage_for(cfg, tmp_path)
    assert native.config["model"]["dtype"] == "bfloat16" and emulated.config["model"]["dtype"] == "float32"
    assert native.fingerprint != emulated.fingerprint
    pinned = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=float32"])
    assert rollout.stage_for(pinned, tmp_path).fingerprint == emulated.fingerprint
    native.begin()
    native.finish({})
    with pytest.raises(SsbError, match=r"different configuration .*: model\.dtype: bfloat16 then, float32 now; "
                                       r"model\.dtype auto is bf16 only on a CPU that multiplies bf16 natively"):
        emulated.check()


def test_a_gguf_model_is_fingerprinted_by_its_content_not_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SSB_CACHE", str(tmp_path / "cache"))
    here, there = tmp_path / "here", tmp_path / "elsewhere" / "copy"
    here.mkdir()
    (here / "model.gguf").write_bytes(b"GGUF weights" * 100)
    shutil.copytree(here, there)
    (there / "renamed.gguf").write_bytes((here / "model.gguf").read_bytes())

    def fp(*overrides):
        return rollout.stage_for(load_config(None, ["model.device=cpu", *overrides]), tmp_path / "run").fingerprint

    a = fp(f"model.name_or_path={here}", "model.gguf_file=model.gguf")
    assert fp(f"model.name_or_path={there}", "model.gguf_file=renamed.gguf") == a
    assert fp("model.name_or_path=ignored/hub-id", f"model.gguf_file={there / 'model.gguf'}") == a
    assert fp(f"model.name_or_path={here}", "model.gguf_file=model.gguf", "model.dtype=float16") != a
    (there / "model.gguf").write_bytes(b"other weights")
    assert fp(f"model.name_or_path={there}", "model.gguf_file=model.gguf") != a
    # a GGUF file not on this machine (a hub repository's) keeps its names: nothing is downloaded to fingerprint it
    cfg = load_config(None, ["model.name_or_path=org/repo", "model.gguf_file=m.gguf"])
    values = rollout.READS.values(cfg)["model"]
    assert values["name_or_path"] == "org/repo" and values["gguf_file"] == "m.gguf" and "gguf_sha256" not in values
