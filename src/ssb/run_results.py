"""What ``ssb report`` and its plots read from a run directory: a :class:`Run` with its :class:`Bench` results
(loaded by :func:`ssb.report.load_run`). Plain records, so that the report and the plots depend on them and not on
each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Bench:
    metrics: dict
    tokens: list[int]
    adapter: str
    finished: bool
    scores: dict[str, float] | None = None  # problem id -> mean correctness; None when only metrics.json is left
    answers: dict[str, tuple] | None = None  # problem id -> its samples' answer keys; None as scores


@dataclass
class Run:
    label: str
    path: Path
    benches: dict[str, Bench] = field(default_factory=dict)
    funnel: dict | None = None
    waves: list[dict] = field(default_factory=list)
    cost: dict | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    rewards: list[tuple[int, float]] = field(default_factory=list)
