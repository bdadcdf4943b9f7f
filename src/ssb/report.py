"""``ssb report RUN_DIR [RUN_DIR ...] --out DIR``: compare run directories side by side.

Writes ``DIR/report.md`` and PNG plots next to it:

- one table row per (run, benchmark): accuracy with its 95% bootstrap CI, strict accuracy, pass@k / maj@k when
  there are several samples per problem, response length, truncation, and the adapter that was evaluated. Metrics
  are recomputed from ``evaluate/<bench>/samples.jsonl`` with :func:`ssb.metrics.summarize` (so runs evaluated by
  an older ssb get the same columns); ``metrics.json`` is the fallback when the samples are gone;
- paired differences per benchmark (:func:`paired_rows`): every run minus the base run (``base``, default the
  first), and with ``focus`` the focus run minus every other non-base run, on the problems both were evaluated on,
  with a paired-bootstrap 95% CI (:func:`ssb.metrics.paired_bootstrap`); the same data goes to ``DIR/paired.json``;
- the curation funnel per run (``curate/stats.json``, ``teach/manifest.json``: counts, and the teacher prompt
  variant and acceptance when recorded), the generation waves of ``rollout/manifest.json`` when recorded, and the
  cost per run: every stage manifest's ``wall_seconds``, ``gpu_seconds``, ``generated_tokens`` (distill's
  ``trained_tokens``), training stages (:data:`TRAINING`) summed apart from evaluation;
- ``accuracy.png``, ``lengths.png``, ``loss.png``, ``reward.png``, ``cost.png`` (see :mod:`ssb.plots`).

Stage folders may be symlinks into another run (an ablation reusing the SSB run's rollout/curate/teach): they are
read through the link, their cost counts for every run that uses them (so a run's training cost includes work
another run paid for), and the cost table marks them as reused. Anything a run lacks (a base-model run has only
``evaluate/``) is left out; a path that is not a run directory is an :class:`~ssb.errors.SsbError`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ssb.atomic import write_text
from ssb.errors import SsbError
from ssb.metrics import changed_answers, paired_bootstrap, per_problem_answers, per_problem_scores, summarize
from ssb.plots import plot_accuracy, plot_cost, plot_lengths, plot_loss, plot_reward
from ssb.rows import read_json, read_rows
from ssb.run_results import Bench, Run
from ssb.rundir import MANIFEST
from ssb.stages import STAGES as _REGISTRY, TRAINING

STAGES = tuple(_REGISTRY)  # a run's stages, ssb run's and grpo (the RL baseline)
N_BOOT, SEED = 1000, 0  # of the paired bootstrap


def _json(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def _adapter_name(adapter: str | None, run_path: Path) -> str:
    if not adapter:
        return "base"
    try:
        return str(Path(adapter).resolve().relative_to(run_path.resolve()))
    except ValueError:
        return str(adapter)


def load_run(path: str | Path, label: str) -> Run:
    path = Path(path)
    if not path.is_dir() or not ((path / "config.yaml").exists() or any((path / s).is_dir() for s in STAGES)):
        raise SsbError(f"not a run directory: {path} (expected config.yaml or stage folders such as evaluate/)")
    run = Run(label, path)
    for d in sorted(p for p in (path / "evaluate").glob("*") if p.is_dir()):
        manifest, saved = _json(d / MANIFEST), _json(d / "metrics.json")
        rows = read_rows(d / "samples.jsonl")
        if not rows and saved is None:
            continue
        metrics = summarize(rows) if rows else saved
        adapter = (saved or {}).get("adapter") or ((manifest or {}).get("config") or {}).get("adapter")
        tokens = [s["n_tokens"] for r in rows for s in r["samples"]]
        run.benches[d.name] = Bench(metrics, tokens, _adapter_name(adapter, path), manifest is not None,
                                    per_problem_scores(rows) if rows else None,
                                    per_problem_answers(rows) if rows else None)
    stats, teach = _json(path / "curate" / "stats.json"), _json(path / "teach" / MANIFEST)
    if stats is not None or teach is not None:
        stats, teach = stats or {}, teach or {}
        counts = teach.get("counts", {})
        run.funnel = {"problems": stats.get("problems"), "with_answer": stats.get("with_answer"),
                      "pairs": stats.get("kept", counts.get("pairs")), "pairs_tried": counts.get("pairs_tried"),
                      "examples": counts.get("examples"), "prompt": teach.get("prompt"),
                      "acceptance": teach.get("acceptance")}
    run.waves = list((_json(path / "rollout" / MANIFEST) or {}).get("waves") or [])
    run.cost = _cost(path)
    log = read_rows(path / "distill" / "train_log.jsonl")
    run.losses = [(r["step"], r["loss"]) for r in log if "step" in r and "loss" in r]
    log = read_rows(path / "grpo" / "train_log.jsonl")
    run.rewards = [(r["step"], r["reward"]) for r in log if "step" in r and r.get("reward") is not None]
    return run


def _cost(path: Path) -> dict | None:
    """Wall seconds per stage, training and evaluation totals, and the stages read through a link out of the run."""
    keys = [s for s in STAGES if s != "evaluate"]
    keys += [f"evaluate/{d.name}" for d in sorted((path / "evaluate").glob("*"))]
    manifests = {k: m for k in keys if (m := _json(path / k / MANIFEST))}
    root = path.resolve()
    broken = [s for s in STAGES if (path / s).is_symlink() and not (path / s).exists()]
    if not manifests and not broken:
        return None
    reused = {k: str((path / k).resolve()) for k in manifests if not (path / k).resolve().is_relative_to(root)}
    wall = {s: sum(m.get("wall_seconds", 0) for k, m in manifests.items() if k.split("/")[0] == s)
            for s in STAGES if any(k.split("/")[0] == s for k in manifests)}
    training = [m for k, m in manifests.items() if k in TRAINING]
    evaluation = [m for k, m in manifests.items() if k.startswith("evaluate/")]
    return {"wall": wall, "training": cost_totals(training), "evaluation": cost_totals(evaluation),
            "generated_tokens": sum(m.get("generated_tokens", 0) for m in manifests.values()),
            "trained_tokens": (manifests.get("distill") or {}).get("counts", {}).get("trained_tokens"),
            "reused": reused, "broken": broken}


def cost_totals(manifests: list[dict]) -> dict:
    """Summed cost (``gpu_seconds`` / ``cpu_seconds`` None when a manifest predates their recording) and the highest
    peak RSS of any stage."""
    gpu, cpu = ([m.get(k) for m in manifests] for k in ("gpu_seconds", "cpu_seconds"))
    return {"wall_seconds": sum(m.get("wall_seconds", 0) for m in manifests),
            "gpu_seconds": None if None in gpu else sum(gpu),
            "cpu_seconds": None if None in cpu else sum(cpu),
            "peak_rss_bytes": max([m.get("peak_rss_bytes") or 0 for m in manifests] or [0]) or None,
            "generated_tokens": sum(m.get("generated_tokens", 0) for m in manifests)}


def paired_rows(runs: list[Run], base: Run, focus: Run | None = None, n_boot: int = N_BOOT,
                seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Per benchmark: each run minus ``base``, then ``focus`` minus each other non-base run, paired by problem id
    (lenient correctness). Returns (comparisons, skipped); a pair is skipped when one side lacks the benchmark's
    per-problem samples. ``diff`` and ``ci95`` are fractions (``run`` minus ``against``); ``run_accuracy`` and
    ``against_accuracy`` are each side's accuracy over the shared problems; ``run_wins`` / ``run_losses`` count the
    problems where ``run`` scored higher / lower than ``against``; ``answers_changed`` the shared problems whose
    answer differs at all (right or wrong; see :func:`ssb.metrics.changed_answers`)."""
    pairs = [(r, base, "vs_base") for r in runs if r is not base]
    if focus is not None and focus is not base:
        pairs += [(focus, r, "focus_vs_other") for r in runs if r is not base and r is not focus]
    done, skipped = [], []
    for bench in sorted({b for r in runs for b in r.benches}):
        for run, against, kind in pairs:
            head = {"benchmark": bench, "run": run.label, "against": against.label, "kind": kind}
            x, y = against.benches.get(bench), run.benches.get(bench)
            if x is None or y is None:
                continue
            if x.scores is None or y.scores is None:
                skipped.append({**head, "reason": "no per-problem samples (samples.jsonl missing)"})
                continue
            r = paired_bootstrap(x.scores, y.scores, n_boot, seed)
            # named by role, as "run" and "against" are: paired_bootstrap's a is `against`, its b is `run`
            r = {"n": r["n"], "diff": r["diff"], "ci95": r["ci95"], "run_accuracy": r["mean_b"],
                 "against_accuracy": r["mean_a"], "run_wins": r["wins"], "run_losses": r["losses"], "ties": r["ties"],
                 "answers_changed": changed_answers(x.answers, y.answers)}
            done.append({**head, **r, "excludes_zero": r["n"] > 0 and (r["ci95"][0] > 0 or r["ci95"][1] < 0)})
    return done, skipped


# ---- markdown ----

def pct(x) -> str:
    """A fraction as a percentage with one decimal, ``–`` for None (the report's and the model card's cells)."""
    return "–" if x is None else f"{100 * x:.1f}"


def _acc(m: dict, prefix: str = "") -> str:
    ci = m.get(f"{prefix}accuracy_ci95")
    return pct(m.get(f"{prefix}accuracy")) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


def _at_k(d: dict | None, skip_one: bool = False) -> str:
    items = [f"@{k} {pct(v)}" for k, v in (d or {}).items() if not (skip_one and k == "1")]
    return " · ".join(items) or "–"


def _cell(x) -> str:
    return "–" if x is None else str(x).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows), ""]


def _funnel_cell(n, total) -> str:
    return "–" if n is None else (f"{n} ({100 * n / total:.0f}%)" if total else str(n))


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def render_markdown(runs: list[Run], plots: list[str], paired: dict | None = None) -> str:
    """The report; ``paired`` is what :func:`main_report` writes to ``paired.json`` (no section when None)."""
    out = ["# ssb report", "", "Runs: " + ", ".join(f"`{r.label}` ({r.path})" for r in runs), ""]
    out += _evaluation_md(runs)
    out += _paired_md(paired) if paired and len(runs) > 1 else []
    out += _funnel_md(runs) + _waves_md(runs) + _cost_md(runs)
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})\n" for p in plots]
    out += ["## How the numbers are computed", "",
            "- Accuracy is the mean over all samples (pass@1 as avg@n); the 95% CI is a percentile bootstrap over "
            "problems (1000 resamples, seed 0). Strict = the paper's exact `\\boxed{}` match.",
            "- pass@k is the unbiased estimator of Chen et al. (2021); maj@k votes over each problem's first k samples "
            "(answers grouped by `answer_key`; ties go to the answer seen first; unanswered samples do not vote).",
            "- Paired differences: per problem, the mean correctness over its samples; the difference of the means "
            "over the problems both runs were evaluated on; the CI resamples those problems (1000 resamples, seed 0).",
            "- Metrics are recomputed from `samples.jsonl`; `metrics.json` is used only when the samples are missing.",
            ""]
    return "\n".join(out)


def _evaluation_md(runs: list[Run]) -> list[str]:
    out, rows = ["## Evaluation", ""], []
    for r in runs:
        for name, b in r.benches.items():
            m, multi = b.metrics, b.metrics.get("samples_per_problem", 1) > 1
            rows.append([r.label, name + ("" if b.finished else " (unfinished)"), b.adapter, m.get("problems"),
                         m.get("samples_per_problem", "–"), _acc(m), _acc(m, "strict_"),
                         _at_k(m.get("pass_at_k"), skip_one=True) if multi else "–",
                         _at_k(m.get("maj_at_k")) if multi else "–", f"{m.get('mean_response_tokens', 0):.1f}",
                         pct(m.get("truncated_fraction")), pct(m.get("no_answer_fraction"))])
    if rows:
        out += _table(["Run", "Benchmark", "Adapter", "Problems", "Samples/problem", "Accuracy % [95% CI]",
                       "Strict % [95% CI]", "pass@k %", "maj@k %", "Mean tokens", "Truncated %", "No answer %"], rows)
    missing = [r.label for r in runs if not r.benches]
    out += [f"No evaluation results in: {', '.join(missing)}.", ""] if missing else []
    return out + (["No evaluation results.", ""] if not rows else [])


def _paired_md(paired: dict) -> list[str]:
    focus = f", then `{paired['focus']}` minus each other non-base run" if paired["focus"] else ""
    out = ["## Paired differences", "",
           f"Each run minus the base run `{paired['base']}`{focus}, per benchmark, on the problems both were evaluated "
           "on (lenient correctness, per-problem mean over samples), in accuracy points, with a 95% paired-bootstrap "
           "CI. Wins / losses: problems where the first run scores higher / lower. ▲ / ▼: the CI excludes 0 (the "
           "first run is better / worse). Answers changed: problems whose answer differs at all, right or wrong. Data: "
           "`paired.json`.", ""]
    rows = []
    for c in paired["comparisons"]:
        lo, hi = c["ci95"]
        rows.append([c["benchmark"], f"{c['run']} − {c['against']}", _signed(c["diff"]) if c["n"] else None,
                     f"[{_signed(lo)}, {_signed(hi)}]" if c["n"] else None, c["n"], f"{c['run_wins']} / {c['run_losses']}",
                     c.get("answers_changed"), ("▲" if lo > 0 else "▼") if c["excludes_zero"] else ""])
    out += _table(["Benchmark", "Comparison", "Δ points", "95% CI", "Problems", "Wins / losses", "Answers changed",
                   "CI excludes 0"],
                  rows) if rows else ["No benchmark shared by the compared runs.", ""]
    skipped = [f"{c['benchmark']}: {c['run']} − {c['against']}" for c in paired["skipped"]]
    return out + ([f"Not paired (no per-problem samples): {'; '.join(skipped)}.", ""] if skipped else [])


def _funnel_md(runs: list[Run]) -> list[str]:
    funnels = [r for r in runs if r.funnel]
    if not funnels:
        return []
    extra = [(k, h) for k, h in (("prompt", "Teacher prompt"), ("acceptance", "Acceptance %"))
             if any(r.funnel.get(k) is not None for r in funnels)]  # recorded by newer runs only
    out = ["## Curation funnel", "", "problems → with an answer → usable pairs (a correct and an incorrect "
           "answer) → teacher-verified examples (% of problems). Acceptance: teacher-verified share of the pairs "
           "tried.", ""]
    return out + _table(["Run", "Problems", "With an answer", "Usable pairs", "Pairs tried by teacher",
                         "Teacher-verified", *(h for _, h in extra)],
                        [[r.label, f.get("problems"),
                          *(_funnel_cell(f.get(k), f.get("problems"))
                            for k in ("with_answer", "pairs", "pairs_tried", "examples")),
                          *(pct(f.get(k)) if k == "acceptance" else f.get(k) for k, _ in extra)]
                         for r in funnels for f in [r.funnel]])


def _waves_md(runs: list[Run]) -> list[str]:
    runs = [r for r in runs if r.waves]
    if not runs:
        return []
    out = ["## Generation waves", "", "Per wave of `rollout` (from `rollout/manifest.json`).", ""]
    for r in runs:
        keys = list(dict.fromkeys(k for w in r.waves for k in w))
        out += [f"### {r.label}", ""] + _table(keys, [[w.get(k) for k in keys] for w in r.waves])
    return out


def _cost_md(runs: list[Run]) -> list[str]:
    costs = [r for r in runs if r.cost]
    if not costs:
        return []
    out = ["## Cost", "", f"Wall-clock seconds per stage (summed over benchmarks for evaluate); training "
           f"({', '.join(TRAINING)}) summed apart from evaluation: wall seconds, GPU-seconds (wall × GPUs; "
           "0 on CPU), CPU-seconds (every thread's; unlike wall seconds they do not grow when other jobs share the "
           "cores), tokens generated; the highest peak RSS of any stage; tokens trained on by distill. * = a stage reused from another run (a "
           "symlinked stage folder): its cost counts for every run that uses it.", ""]
    rows = []
    for r in costs:
        c, stages = r.cost, {k.split("/")[0] for k in r.cost["reused"]}
        tr, ev = c["training"], c["evaluation"]
        rows.append([r.label, *(f"{c['wall'][s]:.1f}" + ("*" if s in stages else "") if s in c["wall"] else None
                                for s in STAGES),
                     f"{tr['wall_seconds']:.1f}", _secs(tr["gpu_seconds"]), _secs(tr["cpu_seconds"]),
                     tr["generated_tokens"], f"{ev['wall_seconds']:.1f}", _secs(ev["gpu_seconds"]),
                     ev["generated_tokens"], c["generated_tokens"], c["trained_tokens"], _gb(_peak(r)),
                     _reused_cell(r, runs)])
    return out + _table(["Run", *(f"{s} s" for s in STAGES), "Training wall s", "Training GPU-s (incl. reused)",
                         "Training CPU-s", "Training tokens generated", "Eval wall s", "Eval GPU-s",
                         "Eval tokens generated", "Total tokens generated", "Trained tokens", "Peak RSS GB",
                         "Reused stages"], rows)


def _peak(run: Run) -> int | None:
    """The highest peak RSS of any of the run's stages, training or evaluation (None if not recorded)."""
    got = [c["peak_rss_bytes"] for c in (run.cost["training"], run.cost["evaluation"]) if c["peak_rss_bytes"]]
    return max(got) if got else None


def _gb(x) -> str | None:
    return None if x is None else f"{x / 1e9:.1f}"


def _secs(x) -> str | None:
    return None if x is None else f"{x:.1f}"


def _reused_cell(run: Run, runs: list[Run]) -> str:
    by_owner: dict[str, list[str]] = {}
    for key, target in run.cost["reused"].items():
        owner = next((f"`{r.label}`" for r in runs if r is not run and Path(target).is_relative_to(r.path.resolve())),
                     str(Path(target).parent))
        by_owner.setdefault(owner, []).append(key)
    parts = [f"{', '.join(keys)} from {owner}" for owner, keys in by_owner.items()]
    parts += [f"{s} (broken link)" for s in run.cost["broken"]]
    return "; ".join(parts) or "–"


def _labels(run_dirs: list, labels: str | list[str] | None) -> list[str]:
    if isinstance(labels, str):
        labels = [s.strip() for s in labels.split(",")]
    if labels is not None and len(labels) != len(run_dirs):
        raise SsbError(f"--labels: got {len(labels)} labels for {len(run_dirs)} run directories")
    names = list(labels) if labels is not None else [Path(d).resolve().name for d in run_dirs]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # two runs both called "run" become "run" and "run-2"
        seen[n] = seen.get(n, 0) + 1
        names[i] = n if seen[n] == 1 else f"{n}-{seen[n]}"
    return names


def _find(runs: list[Run], label: str | None, option: str) -> Run | None:
    if label is None:
        return None
    hit = next((r for r in runs if r.label == label), None)
    if hit is None:
        raise SsbError(f"{option}: no run labelled '{label}' (labels: {', '.join(r.label for r in runs)})")
    return hit


def main_report(run_dirs: list, out, labels: str | list[str] | None = None, base: str | None = None,
                focus: str | None = None) -> Path:
    """Write ``out/report.md`` (and its plots, and ``paired.json``) comparing ``run_dirs``; returns the report's
    path. ``base``/``focus`` are run labels: the paired differences are against ``base`` (default: the first run),
    and ``focus`` (default: none) is also compared with every other non-base run."""
    if not run_dirs:
        raise SsbError("report: give at least one run directory")
    runs = [load_run(d, name) for d, name in zip(run_dirs, _labels(run_dirs, labels))]
    base_run, focus_run = _find(runs, base, "--base") or runs[0], _find(runs, focus, "--focus")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    comparisons, skipped = paired_rows(runs, base_run, focus_run)
    paired = {"base": base_run.label, "focus": focus_run.label if focus_run else None, "metric": "correct",
              "n_boot": N_BOOT, "seed": SEED, "comparisons": comparisons, "skipped": skipped}
    write_text(out / "paired.json", json.dumps(paired, indent=2) + "\n")
    plots = [name for name, fn in (("accuracy.png", plot_accuracy), ("lengths.png", plot_lengths),
                                   ("loss.png", plot_loss), ("reward.png", plot_reward), ("cost.png", plot_cost))
             if fn(runs, out / name)]
    report = out / "report.md"
    write_text(report, render_markdown(runs, plots, paired))
    return report
