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


# ---- paired differences, cost with reused stages, waves ----

BASE = [[False, False], [True, False], [False, False], [True, True], [False, False], [False, True], [True, True]]
SSB = [[True, True], [True, True], [True, True], [True, False], [True, True], [True, True]]  # 6 problems: 7th unpaired
GRPO = [[True, False], [True, False], [False, True], [True, True], [False, False], [True, True]]


def scores(outcomes):
    return {f"arith-{i}": sum(f) / len(f) for i, f in enumerate(outcomes)}


@pytest.fixture
def family(tmp_path) -> dict[str, Path]:
    """base / ssb / sft / grpo runs; sft's rollout, curate and teach are symlinks into ssb's (relative links)."""
    root = tmp_path / "runs"
    base, ssb, sft, grpo = (root / n for n in ("base", "ssb", "sft", "grpo"))
    write_benchmark(base, "arith", BASE, None)
    for stage, wall, gpu, tok in (("rollout", 100.0, 200.0, 5000), ("curate", 1.0, 0.0, 0),
                                  ("teach", 50.0, 100.0, 2000), ("distill", 30.0, 60.0, 0)):
        counts = {"trained_tokens": 900} if stage == "distill" else {}
        write(ssb / stage / "manifest.json",
              manifest(stage, wall, counts, gpus=2, gpu_seconds=gpu, generated_tokens=tok))
    write(ssb / "curate" / "stats.json", {"problems": 40, "with_answer": 30, "kept": 20})
    write_benchmark(ssb, "arith", SSB, str(ssb / "distill" / "adapter"))
    for stage in ("rollout", "curate", "teach"):
        sft.mkdir(parents=True, exist_ok=True)
        (sft / stage).symlink_to(Path("..") / "ssb" / stage)
    write(sft / "distill" / "manifest.json", manifest("distill", 10.0, {}, gpus=2, gpu_seconds=20.0))
    write_benchmark(sft, "arith", BASE[:6], str(sft / "distill" / "adapter"))  # no better than base
    write(grpo / "grpo" / "manifest.json", manifest("grpo", 400.0, {}, gpus=2, gpu_seconds=800.0,
                                                    generated_tokens=9000))
    write_benchmark(grpo, "arith", GRPO, str(grpo / "grpo" / "adapter"))
    return {"base": base, "ssb": ssb, "sft": sft, "grpo": grpo}


def test_paired_differences_against_base_and_focus(family, tmp_path):
    from ssb.metrics import paired_bootstrap
    from ssb.report import main_report

    out = tmp_path / "out"
    dirs = [family[k] for k in ("base", "ssb", "sft", "grpo")]
    main_report(dirs, out, focus="ssb")
    paired = json.loads((out / "paired.json").read_text())
    assert paired["base"] == "base" and paired["focus"] == "ssb" and paired["skipped"] == []
    got = {(c["run"], c["against"]): c for c in paired["comparisons"]}
    assert list(got) == [("ssb", "base"), ("sft", "base"), ("grpo", "base"), ("ssb", "sft"), ("ssb", "grpo")]
    outcomes = {"base": BASE, "ssb": SSB, "sft": BASE[:6], "grpo": GRPO}
    for (run, against), c in got.items():
        want = paired_bootstrap(scores(outcomes[against]), scores(outcomes[run]))
        assert (c["n"], c["diff"], c["ci95"], c["ties"]) == (want["n"], want["diff"], want["ci95"], want["ties"])
        assert (c["run_accuracy"], c["against_accuracy"]) == (want["mean_b"], want["mean_a"])
        assert (c["run_wins"], c["run_losses"]) == (want["wins"], want["losses"])
        assert "mean_a" not in c and "wins" not in c  # no field whose side a reader must guess
        # a wrong sample answers i + 1, a right one i: the answers differ exactly where the outcomes do
        assert c["answers_changed"] == sum(outcomes[run][i] != outcomes[against][i] for i in range(6))
        assert c["benchmark"] == "arith" and c["n"] == 6  # base's 7th problem has no partner
    ssb = got[("ssb", "base")]
    assert ssb["diff"] == pytest.approx(3.5 / 6, abs=1e-6) and (ssb["run_wins"], ssb["run_losses"]) == (5, 1)
    assert ssb["run_accuracy"] > ssb["against_accuracy"]
    assert ssb["excludes_zero"] and ssb["ci95"][0] > 0
    assert got[("sft", "base")]["diff"] == 0 and not got[("sft", "base")]["excludes_zero"]

    text = (out / "report.md").read_text()
    assert "## Paired differences" in text
    row = table_row(text, "arith", "ssb − base", "+58.3")
    assert "| 6 | 5 / 1 | 6 | ▲ |" in row  # problems, wins / losses, answers changed, CI excludes 0
    assert table_row(text, "arith", "sft − base", "+0.0", "[+0.0, +0.0]", "6", "0 / 0", "0").endswith("|  |")
    table_row(text, "arith", "ssb − grpo")

    # --base picks another run; without --focus there are no focus rows; the CLI passes both through
    assert main(["report", *map(str, dirs), "--out", str(out), "--base", "grpo"]) == 0
    paired = json.loads((out / "paired.json").read_text())
    assert [(c["run"], c["against"]) for c in paired["comparisons"]] == [("base", "grpo"), ("ssb", "grpo"),
                                                                          ("sft", "grpo")]
    assert main(["report", *map(str, dirs), "--out", str(out), "--base", "sft", "--focus", "ssb"]) == 0
    paired = json.loads((out / "paired.json").read_text())
    assert [(c["run"], c["against"]) for c in paired["comparisons"]][-2:] == [("ssb", "base"), ("ssb", "grpo")]


def test_paired_needs_samples_and_known_labels(family, tmp_path, capsys):
    (family["grpo"] / "evaluate" / "arith" / "samples.jsonl").unlink()  # metrics.json only: cannot pair
    write(family["grpo"] / "evaluate" / "arith" / "metrics.json", {"accuracy": 0.5, "problems": 6})
    out = tmp_path / "out"
    assert main(["report", str(family["base"]), str(family["grpo"]), "--out", str(out)]) == 0
    paired = json.loads((out / "paired.json").read_text())
    assert paired["comparisons"] == [] and paired["skipped"][0]["run"] == "grpo"
    assert "Not paired (no per-problem samples): arith: grpo − base" in (out / "report.md").read_text()
    for flag in ("--base", "--focus"):
        assert main(["report", str(family["base"]), "--out", str(out), flag, "nope"]) == 2
        err = capsys.readouterr().err
        assert flag in err and "'nope'" in err and "base" in err


def test_training_cost_counts_reused_stages_and_funnel_reads_through_links(family, tmp_path):
    from ssb.plots import training_cost_axis
    from ssb.report import load_run

    out = tmp_path / "out"
    assert main(["report", *(str(family[k]) for k in ("base", "ssb", "sft", "grpo")), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    # stage walls, training wall / GPU-s / CPU-s / tokens, eval wall / GPU-s / tokens, total tokens, trained tokens,
    # peak RSS, reused
    ssb = table_row(text, "ssb", "100.0", "1.0", "50.0", "30.0", "0.5", "–", "181.0", "360.0", "–", "7000", "0.5")
    assert ssb.endswith(f"| {7000 + 20 * 12} | 900 | – | – |")
    sft = table_row(text, "sft", "100.0*", "1.0*", "50.0*", "10.0", "0.5", "–", "161.0", "320.0", "–", "7000")
    assert sft.endswith("| rollout, curate, teach from `ssb` |")
    table_row(text, "grpo", "–", "–", "–", "–", "0.5", "400.0", "400.0", "800.0", "–", "9000")
    table_row(text, "base", "–", "–", "–", "–", "0.5", "–", "0.0", "0.0", "0.0", "0")
    assert table_row(text, "sft", "40", "30 (75%)", "20 (50%)") == table_row(text, "ssb", "40", "30 (75%)")\
        .replace("| ssb |", "| sft |")  # the funnel is read through the links
    assert (out / "cost.png").read_bytes()[:8] == PNG_MAGIC and "](cost.png)" in text

    runs = [load_run(family[k], k) for k in ("base", "ssb", "sft", "grpo")]
    label, cost = training_cost_axis(runs)
    assert "GPU-seconds" in label and cost == {"base": 0, "ssb": 360.0, "sft": 320.0, "grpo": 800.0}
    for r in runs:  # on CPU every gpu_seconds is 0: the x axis falls back to wall seconds
        for t in r.cost["training"], r.cost["evaluation"]:
            t["gpu_seconds"] = 0.0
    label, cost = training_cost_axis(runs)
    assert "wall seconds" in label and cost == {"base": 0, "ssb": 181.0, "sft": 161.0, "grpo": 400.0}


def test_broken_stage_link_is_reported(family, tmp_path):
    (family["sft"] / "teach").unlink()
    (family["sft"] / "teach").symlink_to(Path("..") / "gone" / "teach")
    out = tmp_path / "out"
    assert main(["report", str(family["ssb"]), str(family["sft"]), "--out", str(out)]) == 0
    row = table_row((out / "report.md").read_text(), "sft", "100.0*", "1.0*", "–")
    assert row.endswith("| rollout, curate from `ssb`; teach (broken link) |")


def test_waves_and_teacher_prompt_when_recorded(runs, tmp_path):
    full, base = runs
    out = tmp_path / "out"
    assert main(["report", str(full), str(base), "--out", str(out)]) == 0
    old = (out / "report.md").read_text()
    assert "Generation waves" not in old and "Teacher prompt" not in old  # older runs: not shown
    assert table_row(old, "ssb_run", "48", "46 (96%)").endswith("| 16 (33%) | 68.8 |")  # acceptance was recorded

    waves = [{"wave": 0, "problems": 256, "problems_total": 256, "pairs": 118, "teacher_samples": 118,
              "accepted": 90, "examples_total": 90},
             {"wave": 1, "problems": 128, "problems_total": 384, "pairs": 50, "teacher_samples": 61,
              "accepted": 30, "examples_total": 120}]
    rollout = json.loads((full / "rollout" / "manifest.json").read_text())
    write(full / "rollout" / "manifest.json", {**rollout, "waves": waves})
    teach = json.loads((full / "teach" / "manifest.json").read_text())
    write(full / "teach" / "manifest.json", {**teach, "prompt": "hinted-v2", "acceptance": 0.5})
    assert main(["report", str(full), str(base), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Generation waves" in text and "### ssb_run" in text and "### base" not in text
    assert "| wave | problems | problems_total | pairs | teacher_samples | accepted | examples_total |" in text
    table_row(text, "0", "256", "256", "118", "118", "90", "90")
    table_row(text, "1", "128", "384", "50", "61", "30", "120")
    assert table_row(text, "ssb_run", "48", "46 (96%)").endswith("| 16 (33%) | hinted-v2 | 50.0 |")
    assert "| Teacher prompt | Acceptance % |" in text


def test_the_cost_table_shows_cpu_seconds_and_the_highest_peak_rss(runs, tmp_path):
    full, base = runs
    paths = [full / s / "manifest.json" for s in ("rollout", "curate", "teach", "distill")]
    for i, p in enumerate(paths + [full / "evaluate" / "arith" / "manifest.json"]):
        m = json.loads(p.read_text())
        write(p, {**m, "cpu_seconds": 10.0 * (i + 1), "peak_rss_bytes": [3, 1, 2, 7, 5][i] * 10**9})
    out = tmp_path / "out"
    assert main(["report", str(full), str(base), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Run | rollout s"))
    cells = [c.strip() for c in table_row(text, "ssb_run", "17.2").split("|")[1:-1]]
    named = dict(zip([c.strip() for c in header.split("|")[1:-1]], cells))
    assert named["Training CPU-s"] == "100.0" and named["Peak RSS GB"] == "7.0"  # 10+20+30+40; distill's peak
    base_cells = dict(zip(named, [c.strip() for c in table_row(text, "base", "–").split("|")[1:-1]]))
    assert base_cells["Training CPU-s"] == "0.0" and base_cells["Peak RSS GB"] == "–"  # not recorded
