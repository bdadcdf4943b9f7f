"""ssb report: fake run directories written file by file (same schemas as a real run), compared via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssb.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, list):
        path.write_text("".join(json.dumps(r) + "\n" for r in obj))
    else:
        path.write_text(json.dumps(obj))


def manifest(stage: str, wall: float, counts: dict, **extra) -> dict:
    return {"stage": stage, "fingerprint": "0123456789abcdef", "counts": counts, "wall_seconds": wall,
            "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01+00:00",
            "versions": {"python": "3.11"}, "git_commit": None, "host": "test", "config": {}, **extra}


def write_benchmark(run: Path, name: str, outcomes: list[list[bool]], adapter: str | None, tokens: int = 20):
    rows = []
    for i, flags in enumerate(outcomes):
        samples = [{"text": f"The answer is \\boxed{{{i if ok else i + 1}}}.", "answer": str(i if ok else i + 1),
                    "correct": ok, "strict_correct": ok and j == 0, "n_tokens": tokens + i + j,
                    "finish_reason": "length" if j == 1 else "stop"} for j, ok in enumerate(flags)]
        rows.append({"id": f"{name}-{i}", "question": f"q{i}", "answer": str(i), "grader": "gsm8k",
                     "samples": samples})
    d = run / "evaluate" / name
    write(d / "samples.jsonl", rows)
    n = sum(len(r["samples"]) for r in rows)
    metrics = {"benchmark": name, "adapter": adapter, "problems": len(rows), "samples": n}
    write(d / "metrics.json", metrics)
    write(d / "manifest.json", manifest(f"evaluate/{name}", 0.5, {"problems": len(rows), "samples": n},
                                        metrics=metrics, generated_tokens=tokens * n))


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    """``ssb_run``: a full pipeline run (4 samples per problem); ``base``: evaluate/ only (1 sample)."""
    full = tmp_path / "ssb_run"
    (full / "config.yaml").parent.mkdir(parents=True)
    (full / "config.yaml").write_text("seed: 0\n")
    write(full / "rollout" / "manifest.json", manifest("rollout", 17.25, {"problems": 48, "samples": 192},
                                                       generated_tokens=3470))
    stats = {"problems": 48, "with_answer": 46, "kept": 38, "dropped": {"no_answer": 2, "no_correct": 5,
             "no_incorrect": 3}, "over_max_pairs": 0, "sample_accuracy": 0.48, "answered_fraction": 0.99}
    write(full / "curate" / "stats.json", stats)
    write(full / "curate" / "manifest.json", manifest("curate", 0.05, {"problems": 48, "pairs": 38}, stats=stats))
    write(full / "teach" / "manifest.json", manifest("teach", 20.75, {"pairs": 38, "pairs_tried": 32,
                                                                     "examples": 16, "samples": 47},
                                                     acceptance=0.6875, generated_tokens=865))
    write(full / "distill" / "manifest.json", manifest("distill", 1.5, {"examples": 16, "steps": 8,
                                                                       "trained_tokens": 572}))
    write(full / "distill" / "train_log.jsonl",
          [{"step": s, "epoch": s // 5, "loss": 1.0 / s, "grad_norm": 0.5, "lr": 1e-3, "tokens": 70,
            "tokens_per_s": 400.0, "seconds": 0.17} for s in range(1, 9)])
    write_benchmark(full, "arith", [[True, True, False, True], [False, False, True, False], [True] * 4, [False] * 4],
                    str(full / "distill" / "adapter"))
    base = tmp_path / "base"
    write_benchmark(base, "arith", [[True], [False], [False], [True]], None, tokens=40)
    write_benchmark(base, "gsm8k_test", [[False], [True]], None)
    return full, base


def table_row(text: str, *cells: str) -> str:
    start = "| " + " | ".join(cells) + " |"
    hits = [line for line in text.splitlines() if line.startswith(start)]
    assert len(hits) == 1, f"no single row starting with {start!r} in:\n{text}"
    return hits[0]


def test_report_compares_runs(runs, tmp_path, capsys):
    full, base = runs
    out = tmp_path / "out"
    assert main(["report", str(full), str(base), "--out", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    text = (out / "report.md").read_text()

    full_arith = table_row(text, "ssb_run", "arith", "distill/adapter", "4", "4")
    assert "50.0 [" in full_arith and "12.5 [" in full_arith  # accuracy 8/16, strict 2/16
    assert "@1 50.0 · @2 50.0 · @4 50.0" in full_arith  # maj@k
    assert "@2 " in full_arith and "@4 75.0" in full_arith  # pass@4: 3 of 4 problems solved at least once
    base_arith = table_row(text, "base", "arith", "base", "4", "1")
    assert "50.0 [" in base_arith and base_arith.count("–") >= 2  # no pass@k / maj@k with one sample
    table_row(text, "base", "gsm8k_test", "base", "2", "1")

    assert table_row(text, "ssb_run", "48", "46 (96%)", "38 (79%)", "32 (67%)", "16 (33%)")
    cost = table_row(text, "ssb_run", "17.2", "0.1", "20.8", "1.5", "0.5")
    assert "3470" not in cost and str(3470 + 865 + 20 * 16) in cost and "572" in cost
    table_row(text, "base", "–", "–", "–", "–", "1.0")

    for name in ("accuracy.png", "lengths.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_base_only_run_and_labels(runs, tmp_path):
    _, base = runs
    out = tmp_path / "out"
    assert main(["report", str(base), "--out", str(out), "--labels", "qwen-base"]) == 0
    text = (out / "report.md").read_text()
    table_row(text, "qwen-base", "arith")
    assert "Curation funnel" not in text
    assert not (out / "loss.png").exists()
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_metrics_json_fallback_and_missing_pieces(runs, tmp_path):
    full, _ = runs
    (full / "evaluate" / "arith" / "samples.jsonl").unlink()
    metrics = {"benchmark": "arith", "adapter": None, "problems": 3, "samples": 3, "accuracy": 1 / 3,
               "strict_accuracy": 0.0, "mean_response_tokens": 12.0, "median_response_tokens": 12.0,
               "truncated_fraction": 0.0, "no_answer_fraction": 0.0}  # an older metrics.json: no CI keys
    write(full / "evaluate" / "arith" / "metrics.json", metrics)
    (full / "teach" / "manifest.json").unlink()
    (full / "distill" / "train_log.jsonl").unlink()
    out = tmp_path / "out"
    assert main(["report", str(full), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "33.3" in table_row(text, "ssb_run", "arith", "base", "3")
    table_row(text, "ssb_run", "48", "46 (96%)", "38 (79%)", "–", "–")
    assert not (out / "loss.png").exists()


def test_not_a_run_dir_is_a_clean_error(runs, tmp_path, capsys):
    full, _ = runs
    bogus = tmp_path / "nothing_here"
    bogus.mkdir()
    for path in (bogus, tmp_path / "does_not_exist"):
        assert main(["report", str(full), str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ssb: error: not a run directory") and str(path) in err
        assert len(err.strip().splitlines()) == 1
    assert main(["report", str(full), "--out", str(tmp_path / "out"), "--labels", "a,b"]) == 2
    assert "--labels" in capsys.readouterr().err
