"""The run directory as a hostile user finds it: a second process, a stale lock, a torn or edited finished file,
a refused command, a mistyped model path, a run directory that is a file or read-only, and cost across resumes.

Most cases build finished upstream stages by hand (through :class:`ssb.rundir.Stage`, as a stage would), so they
need no model; the command line is run in-process and must end in one ``ssb: error:`` line and exit status 2."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, small_overrides, train_killed_at
from ssb.stages import distill, rollout, waves
from ssb.cli import main
from ssb.configio import dump_yaml, load_config
from ssb.errors import SsbError
from ssb.rundir import Stage
from ssb.rows import read_json, read_rows, write_rows

LOCK = ".lock"  # RUN_DIR/.lock (spelled out: these tests must also run, and fail, on code without it)

HOLD = """
import sys, time
from ssb.lock import locked
with locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert err.startswith("ssb: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def holder():
    """Start a process that holds a run directory's lock; yields a function (run_dir -> Popen)."""
    procs = []

    def start(run_dir: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, env=env)
        procs.append(p)
        assert p.stdout.readline().strip() == b"locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _finished(run_dir: Path, name: str, files: dict, fingerprint: str = "handmade") -> dict:
    """A finished stage with these files (rows for lists, bytes otherwise), written the way a stage writes."""
    stage = Stage(run_dir, name, fingerprint)
    stage.begin()
    for fname, content in files.items():
        path = stage.path(fname)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            write_rows(path, content)
        else:
            path.write_bytes(content)
    return stage.finish({})


def _rollouts(n: int = 4) -> list[dict]:
    samples = [{"text": f"The answer is \\boxed{{{a}}}.", "token_ids": [5, 6, 2], "finish_reason": "stop"}
               for a in (2, 2, 3, 4)]
    return [{"id": f"p{i}", "question": "What is 1 + 1?", "answer": "2", "grader": "gsm8k", "samples": samples}
            for i in range(n)]


def _truncate_last_line(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))


# ------------------------------------------------------------------------------------------------ the lock

def test_a_second_process_is_refused_naming_the_holder(tmp_path, capsys, holder):
    run_dir = tmp_path / "r"
    p = holder(run_dir)
    err = _one_line_error(*_cli(capsys, "curate", "--run-dir", run_dir))
    assert f"pid {p.pid} on host {platform.node()} since " in err and "in use" in err
    assert not (run_dir / "config.yaml").exists()
    p.kill()
    p.wait()  # the OS drops a dead process's lock: the directory is not wedged
    err = _one_line_error(*_cli(capsys, "curate", "--run-dir", run_dir))
    assert "stage 'rollout' has not finished" in err


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": platform.node(),
                                            "started_at": "2020-01-01T00:00:00+00:00", "command": "ssb run"}))
    err = _one_line_error(*_cli(capsys, "curate", "--run-dir", run_dir))
    assert "has not finished" in err


def test_a_stage_reached_through_a_link_locks_the_directory_holding_it(tmp_path, capsys, holder):
    """compare's ablations link SSB's stages (R/sft/teach -> ../ssb/teach): working on R/sft while another
    process holds R/ssb is refused."""
    root = tmp_path / "R"
    _finished(root / "ssb", "teach", {"examples.jsonl": [{"id": "a"}]})
    (root / "sft").mkdir()
    (root / "sft" / "teach").symlink_to(Path("..") / "ssb" / "teach", target_is_directory=True)
    p = holder(root / "ssb")
    err = _one_line_error(*_cli(capsys, "distill", "--run-dir", root / "sft"))
    assert f"pid {p.pid}" in err and str(root / "ssb") in err


# ------------------------------------------------------------------------------------------------ verified inputs

def test_a_torn_finished_rollout_is_refused_by_curate(tmp_path, capsys):
    run_dir = tmp_path / "r"
    _finished(run_dir, "rollout", {"rollouts.jsonl": _rollouts()})
    manifest = read_json(run_dir / "rollout" / "manifest.json")
    assert manifest["files"]["rollouts.jsonl"]["rows"] == 4 and len(manifest["files"]["rollouts.jsonl"]["sha256"]) == 64
    _truncate_last_line(run_dir / "rollout" / "rollouts.jsonl")
    err = _one_line_error(*_cli(capsys, "curate", "--run-dir", run_dir))
    assert str(run_dir / "rollout" / "rollouts.jsonl") in err and "3 rows, the manifest 4" in err
    assert not (run_dir / "curate").exists()


def test_every_reader_checks_its_upstream_files(tmp_path, capsys, tiny_model_dir, data_dir):
    """curate (rollouts), teach (pairs), distill (examples; RFT: graded and rollouts), evaluate (the adapter) and
    the waves resuming after rollout finished: each refuses an edited file, naming it, before loading a model."""
    run_dir = tmp_path / "r"
    _finished(run_dir, "rollout", {"rollouts.jsonl": _rollouts()})
    assert _cli(capsys, "curate", "--run-dir", run_dir)[0] == 0
    pairs = run_dir / "curate" / "pairs.jsonl"
    assert len(read_rows(pairs)) == 4
    original = pairs.read_bytes()
    pairs.write_bytes(original.replace(b'"p1"', b'"p9"'))
    err = _one_line_error(*_cli(capsys, "teach", "--run-dir", run_dir))
    assert str(pairs) in err and "4 rows, the manifest 4; the content differs" in err
    pairs.write_bytes(original)

    rft = ["distill.targets=rollouts", "distill.kd_weight=0", "distill.ce_weight=1"]
    (run_dir / "curate" / "graded.jsonl").unlink()
    err = _one_line_error(*_cli(capsys, "distill", "--run-dir", run_dir, *rft))
    assert str(run_dir / "curate" / "graded.jsonl") in err and "missing" in err

    _finished(run_dir, "teach", {"examples.jsonl": [{"id": "p0"}, {"id": "p1"}]})
    _truncate_last_line(run_dir / "teach" / "examples.jsonl")
    err = _one_line_error(*_cli(capsys, "distill", "--run-dir", run_dir))
    assert str(run_dir / "teach" / "examples.jsonl") in err

    _finished(run_dir, "distill", {"adapter/adapter_config.json": b"{}", "adapter/adapter_model.safetensors": b"w"})
    (run_dir / "distill" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    err = _one_line_error(*_cli(capsys, "evaluate", "--run-dir", run_dir))
    assert str(run_dir / "distill" / "adapter" / "adapter_model.safetensors") in err

    cfg = load_config(None, small_overrides(tiny_model_dir, data_dir))
    budgeted = tmp_path / "w"
    _finished(budgeted, "rollout", {"rollouts.jsonl": _rollouts()},
              fingerprint=rollout.stage_for(cfg, budgeted, waves=True).fingerprint)
    _truncate_last_line(budgeted / "rollout" / "rollouts.jsonl")
    with pytest.raises(SsbError, match="rollouts.jsonl has changed"):
        waves.run(cfg, budgeted)


# ------------------------------------------------------------------------------------------------ refusals

def test_a_refused_config_change_leaves_config_yaml_alone(tmp_path, capsys, tiny_model_dir, data_dir):
    over = small_overrides(tiny_model_dir, data_dir)
    cfg = load_config(None, over)
    run_dir = tmp_path / "r"
    _finished(run_dir, "rollout", {"rollouts.jsonl": _rollouts()},
              fingerprint=rollout.stage_for(cfg, run_dir).fingerprint)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    err = _one_line_error(*_cli(capsys, "run", "--run-dir", run_dir, "--stages", "rollout", *over,
                                "rollout.samples=3"))
    assert "--force" in err
    assert before == {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}  # the lock file included
    code, err = _cli(capsys, "run", "--run-dir", run_dir, "--stages", "rollout")  # the saved config still works
    assert code == 0 and "(already done)" in err


def test_a_later_stage_refused_is_refused_before_an_earlier_one_runs(tmp_path, capsys, tiny_model_dir, data_dir,
                                                                     monkeypatch):
    over = small_overrides(tiny_model_dir, data_dir)
    run_dir = tmp_path / "r"
    _finished(run_dir, "rollout", {"rollouts.jsonl": _rollouts()})
    Stage(run_dir, "teach", "another").begin()  # teach started with another configuration
    monkeypatch.setattr("ssb.stages.curate.select", lambda *a, **k: pytest.fail("curate ran"))
    err = _one_line_error(*_cli(capsys, "run", "--run-dir", run_dir, "--stages", "curate,teach", *over))
    assert str(run_dir / "teach") in err and "--force" in err
    assert not (run_dir / "curate").exists() and not (run_dir / "config.yaml").exists()


def test_a_mistyped_model_path_leaves_nothing_behind(tmp_path, capsys, data_dir):
    run_dir = tmp_path / "r"
    missing = tmp_path / "models" / "no-such-model"
    err = _one_line_error(*_cli(capsys, "rollout", "--run-dir", run_dir, f"model.name_or_path={missing}",
                                f"data_dir={data_dir}", "rollout.data={name: arith, limit: 4}"))
    assert f"no such directory: {missing}" in err and "Repo id" not in err
    assert not run_dir.exists()  # not even an empty directory: a corrected command starts clean

    _finished(run_dir, "rollout", {"rollouts.jsonl": _rollouts()})  # a stage that loads its model after its inputs
    assert _cli(capsys, "curate", "--run-dir", run_dir)[0] == 0
    err = _one_line_error(*_cli(capsys, "teach", "--run-dir", run_dir, f"model.name_or_path={missing}"))
    assert "no such directory" in err
    assert not (run_dir / "teach").exists()


# ------------------------------------------------------------------------------------------------ user errors

def test_a_run_directory_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("not a directory\n")
    for command in ("run", "curate", "compare"):
        err = _one_line_error(*_cli(capsys, command, "--run-dir", path))
        assert "not a directory" in err
    assert path.read_text() == "not a directory\n"


def test_a_read_only_run_directory(tmp_path, capsys, monkeypatch):
    """As on a read-only mount (simulated: tests may run as root, whom permissions do not stop)."""
    ro = tmp_path / "ro"
    (ro / "existing").mkdir(parents=True)

    def read_only(path):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_mkdir, real_open = pathlib.Path.mkdir, os.open

    def mkdir(self, *a, **k):
        if not self.exists():
            read_only(self)
        return real_mkdir(self, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            read_only(path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    for run_dir in (ro / "new", ro / "existing"):
        err = _one_line_error(*_cli(capsys, "run", "--run-dir", run_dir))
        assert "Read-only file system" in err and str(run_dir) in err


def test_a_file_system_error_inside_a_stage_is_one_line(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "r"
    _finished(run_dir, "rollout", {"rollouts.jsonl": _rollouts()})
    real_mkdir = pathlib.Path.mkdir

    def full(self, *a, **k):
        if self.name == "curate":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", full)
    err = _one_line_error(*_cli(capsys, "curate", "--run-dir", run_dir))
    assert "No space left on device" in err


# ------------------------------------------------------------------------------------------------ cost

def _examples(tokenizer, n: int) -> list[dict]:
    from ssb.models import render_chat
    from ssb.prompts import student_messages

    out = []
    for i in range(n):
        q = f"What is {i} + 1?"
        reply = tokenizer(f"{i} + 1 = {i + 1}.", add_special_tokens=False)["input_ids"] + [2]
        out.append({"id": f"e{i}", "question": q, "answer": str(i + 1), "grader": "gsm8k",
                    "teacher_prompt_ids": render_chat(tokenizer, student_messages(f"Hint. {q}")),
                    "reply_ids": reply, "reply_text": "", "attempt": 0})
    return out


def test_distill_cost_adds_up_across_a_checkpoint_resume(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    from ssb.models import load_tokenizer

    cfg = load_config(None, small_overrides(tiny_model_dir, data_dir) + [
        "distill.batch_size=1", "distill.max_steps=3", "distill.save_every=1"])
    examples = _examples(load_tokenizer(cfg.model), 3)
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    for d in (ref, crash):
        _finished(d, "teach", {"examples.jsonl": examples})
    distill.run(cfg, ref)

    orig_train = distill.train
    monkeypatch.setattr(distill, "train", train_killed_at(3))
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg, crash)
    first = read_json(crash / "distill" / "cost.json")["attempts"]
    assert len(first) == 1 and first[0]["wall_seconds"] > 0
    monkeypatch.setattr(distill, "train", orig_train)
    distill.run(cfg, crash)

    want, got = (read_json(d / "distill" / "manifest.json") for d in (ref, crash))
    assert got["counts"]["trained_tokens"] == want["counts"]["trained_tokens"] > 0  # not the last process's only
    attempts = read_json(crash / "distill" / "cost.json")["attempts"]
    assert got["attempts"] == len(attempts) == 2 and attempts[0]["wall_seconds"] >= first[0]["wall_seconds"]
    assert got["wall_seconds"] == pytest.approx(sum(a["wall_seconds"] for a in attempts), abs=2e-3)
    assert got["wall_seconds"] > attempts[1]["wall_seconds"]
    assert got["gpu_seconds"] == pytest.approx(sum(a["wall_seconds"] * a["gpus"] for a in attempts), abs=2e-3)


def test_each_stage_records_its_own_cpu_time_and_peak_memory(tmp_path):
    big = 400 << 20
    first, second = Stage(tmp_path, "first", "f1"), Stage(tmp_path, "second", "f2")
    first.begin()
    block = b"\x01" * big  # written, so resident
    busy = sum(range(2_000_000))
    del block
    m1 = first.finish({"busy": busy})
    second.begin()
    m2 = second.finish({})

    assert m1["peak_rss_bytes"] >= big and m1["cpu_seconds"] > 0
    assert m1["cpu_seconds"] <= m1["wall_seconds"] * (os.cpu_count() or 1) + 0.05
    if Path("/proc/self/clear_refs").exists():  # Linux: the peak starts again at each stage's begin
        assert 0 < m2["peak_rss_bytes"] < m1["peak_rss_bytes"] - big // 2
    attempt = read_json(tmp_path / "first" / "cost.json")["attempts"][0]
    assert attempt["peak_rss_bytes"] == m1["peak_rss_bytes"] and attempt["cpu_seconds"] == m1["cpu_seconds"]
    assert m1["peak_gpu_bytes"] == 0


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_release_memory_gives_freed_heap_back_to_the_system():
    code = """
from ssb.usage import release_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024
blocks = [bytes([i % 251]) * 65536 for i in range(4000)]  # 256 MB of heap: below glibc's mmap threshold
keep = blocks[-1]  # the top of the heap stays in use, so free() alone cannot shrink it
del blocks
freed = rss()
release_memory()
print(freed, rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    freed, released = map(int, out.split())
    assert freed > 200 << 20 and released < freed - (150 << 20)


def test_time_lent_to_another_stage_is_not_counted_as_cpu_time_either(tmp_path):
    host, guest = Stage(tmp_path, "host", "h"), Stage(tmp_path, "guest", "g")
    host.begin()
    guest.begin()
    guest.pause()
    with host.lend(guest):
        sum(range(3_000_000))
    assert guest.cpu_seconds() > host.cpu_seconds()
