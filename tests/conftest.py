"""Shared fixtures: the tiny arithmetic chat model (built once per session, in-process, saved with
save_pretrained), the offline data directory, and a small pipeline config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"


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
    if not DATA_DIR.is_dir():
        pytest.skip(f"offline data not found at {DATA_DIR}")
    return DATA_DIR


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
