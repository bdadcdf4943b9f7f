"""Data parallelism on CPU (torchrun, gloo) and checkpoint/resume of distill, on the tiny model.

The torchrun commands here are the README's "Scaling up" commands with the CPU backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_overrides, train_killed_at
from ssb.stages import curate, distill, rollout, teach
from ssb.configio import load_config
from ssb.rows import read_rows

pytestmark = pytest.mark.slow


def _torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ssb.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr  # whole: a failing rank's traceback comes before the launcher's report


@pytest.fixture(scope="module")
def base(tiny_model_dir, data_dir, tmp_path_factory):
    """One single-process run of rollout → curate → teach; the reference for everything below."""
    d = tmp_path_factory.mktemp("single")
    over = small_overrides(tiny_model_dir, data_dir) + ["distill.batch_size=4", "distill.epochs=2"]
    cfg = load_config(None, over)
    for stage in (rollout, curate, teach):
        stage.run(cfg, d)
    return over, d


def test_sharded_rollout_with_two_workers_equals_one(base, tmp_path):
    over, single = base
    _torchrun(2, "rollout", "--run-dir", str(tmp_path), *over)
    assert read_rows(tmp_path / "rollout" / "rollouts.jsonl") == read_rows(single / "rollout" / "rollouts.jsonl")
    assert not list((tmp_path / "rollout").glob("*.part*"))  # parts merged and removed


def test_sharded_teach_with_two_workers_equals_one(base, tmp_path):
    over, single = base
    for s in ("rollout", "curate"):
        shutil.copytree(single / s, tmp_path / s)
    _torchrun(2, "teach", "--run-dir", str(tmp_path), *over)
    assert read_rows(tmp_path / "teach" / "examples.jsonl") == read_rows(single / "teach" / "examples.jsonl")


def test_ddp_distill_two_processes_same_loss_curve_as_one(base, tmp_path):
    over, single = base
    runs = {}
    for n in (1, 2):
        d = tmp_path / f"n{n}"
        for s in ("rollout", "curate", "teach"):
            shutil.copytree(single / s, d / s)
        _torchrun(n, "distill", "--run-dir", str(d), *over)
        runs[n] = d
    l1 = [r["loss"] for r in read_rows(runs[1] / "distill" / "train_log.jsonl")]
    l2 = [r["loss"] for r in read_rows(runs[2] / "distill" / "train_log.jsonl")]
    assert len(l1) == len(l2) > 2
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-6)
    w1 = load_file(str(runs[1] / "distill" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(runs[2] / "distill" / "adapter" / "adapter_model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5)


def test_distill_killed_then_resumed_ends_at_the_same_weights(base, tmp_path, monkeypatch):
    over, single = base
    cfg = load_config(None, over + ["distill.save_every=2"])
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    for d in (ref, crash):
        for s in ("rollout", "curate", "teach"):
            shutil.copytree(single / s, d / s)
    distill.run(cfg, ref)

    import ssb.train

    orig_train = ssb.train.train
    calls = {"n": 0, "crash_at": 4}

    def counting_train(model, spec, stage_dir, step_loss, norm_of, *hooks, **kw):
        def counted(idx):  # one call per optimizer step in a single process
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise KeyboardInterrupt("simulated kill")
            return step_loss(idx)
        return orig_train(model, spec, stage_dir, counted, norm_of, *hooks, **kw)

    monkeypatch.setattr("ssb.stages.distill.train", counting_train)
    with pytest.raises(KeyboardInterrupt):  # killed during step 4; the last checkpoint is at step 2
        distill.run(cfg, crash)
    assert (crash / "distill" / "checkpoint" / "state.json").exists()
    assert not (crash / "distill" / "manifest.json").exists()
    calls.update(n=0, crash_at=-1)
    distill.run(cfg, crash)
    total = len(read_rows(ref / "distill" / "train_log.jsonl"))
    assert calls["n"] == total - 2  # resumed at step 2, not restarted
    log = read_rows(crash / "distill" / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))  # no duplicated or missing steps
    a = load_file(str(ref / "distill" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crash / "distill" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    assert not (crash / "distill" / "checkpoint").exists()  # removed once the adapter is written
    m_ref, m_crash = (json.loads((d / "distill" / "manifest.json").read_text()) for d in (ref, crash))
    assert m_crash["counts"]["trained_tokens"] == m_ref["counts"]["trained_tokens"]  # both processes' tokens
    assert m_crash["attempts"] == 2


def _fsdp_runs(base, tmp_path, extra: list[str]):
    """A single-process distill (no FSDP) and a 2-process FSDP one of the same config, with a global batch of
    n - 1 examples so that one step gives rank 1 no example (it must still take part in FSDP's collectives)."""
    over, single = base
    n = len(read_rows(single / "teach" / "examples.jsonl"))
    assert n >= 3
    over = over + [f"distill.batch_size={n - 1}"] + extra
    runs = {n: tmp_path / f"n{n}" for n in (1, 2)}
    for d in runs.values():
        for s in ("rollout", "curate", "teach"):
            shutil.copytree(single / s, d / s)
    return over, runs


def test_fsdp_distill_two_processes_same_loss_curve_as_one(base, tmp_path):
    over, runs = _fsdp_runs(base, tmp_path, ["distill.save_every=1"])  # also gathers shards into checkpoints
    distill.run(load_config(None, over), runs[1])
    _torchrun(2, "distill", "--run-dir", str(runs[2]), *over, "distill.fsdp=true")
    log1, log2 = (read_rows(runs[n] / "distill" / "train_log.jsonl") for n in (1, 2))
    assert len(log1) == len(log2) > 2
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([r[key] for r in log2]), torch.tensor([r[key] for r in log1]),
                                   rtol=1e-4, atol=1e-6)
    manifest = json.loads((runs[2] / "distill" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["fsdp"] is True
    assert not (runs[2] / "distill" / "checkpoint").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, over)
    adapters = {}
    for n, d in runs.items():  # the FSDP adapter is a plain peft adapter
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path),
                                      str(d / "distill" / "adapter"))
        adapters[n] = {k: v for k, v in m.state_dict().items() if "lora_" in k}
    assert adapters[1] and adapters[1].keys() == adapters[2].keys()
    for k, v in adapters[1].items():  # AdamW turns summation-order noise in near-zero gradients into up to lr
        torch.testing.assert_close(adapters[2][k], v, rtol=1e-3, atol=1e-4)
    assert any(v.abs().sum() > 0 for k, v in adapters[2].items() if "lora_B" in k)  # trained, not the init


def test_fsdp_distill_resumes_a_single_process_checkpoint(base, tmp_path, monkeypatch):
    """Checkpoints hold whole tensors whatever the sharding: a 2-process FSDP run resumes a 1-process one's."""
    over, runs = _fsdp_runs(base, tmp_path, ["distill.save_every=2"])
    cfg = load_config(None, over)
    ref = tmp_path / "ref"
    shutil.copytree(runs[1], ref)
    distill.run(cfg, ref)

    monkeypatch.setattr("ssb.stages.distill.train", train_killed_at(3))
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg, runs[1])
    assert (runs[1] / "distill" / "checkpoint" / "state.json").exists()
    _torchrun(2, "distill", "--run-dir", str(runs[1]), *over, "distill.fsdp=true")
    log = read_rows(runs[1] / "distill" / "train_log.jsonl")
    ref_log = read_rows(ref / "distill" / "train_log.jsonl")
    assert [r["step"] for r in log] == [r["step"] for r in ref_log]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in log]), torch.tensor([r["loss"] for r in ref_log]),
                               rtol=1e-4, atol=1e-6)
    a = load_file(str(ref / "distill" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs[1] / "distill" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_fsdp_refuses_the_topk_teacher_cache(base, tmp_path):
    over, single = base
    for s in ("rollout", "curate", "teach"):
        shutil.copytree(single / s, tmp_path / s)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ssb.cli",
           "distill", "--run-dir", str(tmp_path), *over, "distill.fsdp=true", "distill.teacher=topk"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "distill.fsdp does not support distill.teacher=topk" in r.stderr + r.stdout


def test_the_ranks_of_one_job_share_the_lock(base, tmp_path):
    """Only rank 0 takes the run directory's lock; when another process holds it, every rank of the job is
    refused together (exit 2 each), with one error line naming the holder."""
    run_dir = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    hold = "import sys, time\nfrom ssb.lock import locked\nwith locked(sys.argv[1]):\n    print('locked', " \
           "flush=True)\n    time.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        env = {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ssb.cli",
               "curate", "--run-dir", str(run_dir)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        holder.kill()
        holder.wait()
    out = r.stderr + r.stdout
    assert r.returncode != 0 and out.count("ssb: error: ") == 1 and f"in use by pid {holder.pid}" in out, out[-3000:]
    assert "exitcode  : 2" in out or "exit code 2" in out or "exitcode: 2" in out, out[-3000:]
    over, single = base  # and a job that holds the lock itself works through it on every rank
    for s in ("rollout",):
        shutil.copytree(single / s, run_dir / s)
    _torchrun(2, "curate", "--run-dir", str(run_dir), *over)
    assert (run_dir / "curate" / "manifest.json").exists()


def test_on_gpus_the_process_group_also_reduces_cpu_tensors(monkeypatch):
    """Under torchrun on GPUs the stages all-reduce CPU tensors (token counts, step stats) beside the CUDA gradients;
    nccl alone refuses a CPU tensor, so the group pairs it with gloo. On CPUs gloo does both."""
    from ssb import dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(i))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dist.init()
    assert calls == [1, "cpu:gloo,cuda:nccl"]
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dist.init()
    assert calls == ["gloo"]
