"""Shared fixtures: the tiny arithmetic chat model (built once per session, in-process, saved with
save_pretrained), the data directories, and a small pipeline config.

Data: `data_dir` is the slice bundled with ssb (``data_dir=builtin``), so every test that needs problems runs in
any checkout, offline. Only tests marked ``full_data`` read the full offline data sets, through the
`full_data_dir` fixture: ``$SSB_TEST_DATA``, else ``../shared/data`` beside the repository. Without them such a
test skips with the reason, except under ``CI=true``, where missing full data is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FULL_DATA_DIR = Path(os.environ.get("SSB_TEST_DATA") or REPO.parent / "shared" / "data")
FULL_DATA_FILES = ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "math500/test.jsonl", "aime24/test.jsonl")
# model.dtype=auto resolves to bf16 on a CPU with native bf16 matrix units and to fp32 on others: the suite (and the
# processes it starts) runs as on a CPU without them, so that exact comparisons hold on every CI machine. Tests of
# the resolution itself set this themselves.
os.environ["SSB_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """SSB_CACHE for the session, so the name 'ssb-tiny-arith' resolves to the fixture's model."""
    d = Path(os.environ.get("SSB_CACHE") or tmp_path_factory.mktemp("ssb-cache"))
    old = os.environ.get("SSB_CACHE")
    os.environ["SSB_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SSB_CACHE", None)


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir) -> Path:
    from ssb.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data slices bundled with ssb (what ``data_dir=builtin`` names): in every checkout and install."""
    from ssb.data import BUILTIN_DIR

    return BUILTIN_DIR


@pytest.fixture
def full_data_dir(request) -> Path:
    """The full offline data sets, for tests marked ``full_data`` (the marker lets a run deselect them)."""
    if request.node.get_closest_marker("full_data") is None:
        raise RuntimeError(f"{request.node.nodeid} uses full_data_dir: mark it @pytest.mark.full_data")
    missing = [f for f in FULL_DATA_FILES if not (FULL_DATA_DIR / f).is_file()]
    if missing:
        reason = (f"full data sets not found: {', '.join(missing)} missing under {FULL_DATA_DIR} "
                  f"(set SSB_TEST_DATA to the directory of the offline copies)")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    return FULL_DATA_DIR


def small_overrides(model_dir: Path, data_dir: Path) -> list[str]:
    """A pipeline config that runs in seconds on the tiny model."""
    return [
        f"model.name_or_path={model_dir}", "model.device=cpu", f"data_dir={data_dir}",
        "rollout.data={name: arith, limit: 24}", "rollout.max_new_tokens=24", "rollout.batch_size=8",
        "teach.max_new_tokens=24", "teach.attempts=2", "teach.max_examples=8", "teach.batch_size=8",
        "distill.lr=1e-3", "distill.epochs=1", "distill.chunk_size=16",
        "evaluate.benchmarks=[{name: arith, seed: 1, limit: 8}]", "evaluate.max_new_tokens=24",
        "evaluate.batch_size=8",
    ]


@pytest.fixture(scope="session")
def taught(tiny_model_dir, data_dir, tmp_path_factory):
    """(config, run dir) with real rollout -> curate -> teach outputs on the tiny model (a few seconds); tests copy
    the stages out (:func:`copy_taught`) before writing anything."""
    from ssb.stages import curate, rollout, teach
    from ssb.configio import load_config

    d = tmp_path_factory.mktemp("taught")
    cfg = load_config(None, small_overrides(tiny_model_dir, data_dir) + ["rollout.data={name: arith, limit: 8}"])
    for stage in (rollout, curate, teach):
        stage.run(cfg, d)
    return cfg, d


def copy_taught(src: Path, dst: Path) -> Path:
    """A new run directory ``dst`` holding copies of ``src``'s rollout, curate and teach stages."""
    import shutil

    for s in ("rollout", "curate", "teach"):
        shutil.copytree(src / s, dst / s)
    return dst


def train_killed_at(call: int):
    """A stand-in for ``ssb.stages.distill.train`` whose ``call``-th step raises KeyboardInterrupt (a simulated kill)."""
    import ssb.train

    orig, calls = ssb.train.train, {"n": 0}

    def train(model, spec, stage_dir, step_loss, norm_of, *hooks, **kw):
        def counted(idx):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt("simulated kill")
            return step_loss(idx)
        return orig(model, spec, stage_dir, counted, norm_of, *hooks, **kw)

    return train
