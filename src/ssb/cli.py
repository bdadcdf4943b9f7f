"""The ``ssb`` command line: ``ssb run`` for the whole pipeline, one subcommand per stage, ``ssb config``, and the
analysis commands (``ssb report``, ``ssb signal``, ``ssb prompts``).

Configuration: ``--config FILE`` if given, else the run directory's saved ``config.yaml``, else the defaults; then
``section.key=value`` overrides. Errors in the user's input print one line and exit with status 2; so do a run
directory in use by another process (:mod:`ssb.rundir`'s lock), one that is a file, and one on a read-only or full
file system.

A command first checks every stage it was asked to run against what the run directory holds (:func:`check_stages`),
so a changed configuration is refused before anything is written; ``config.yaml`` is saved when the first stage
begins (or when the command ends, if every stage was already done), never by a refused or failed command.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from ssb.config import Config
from ssb.compare import RUNS
from ssb.configio import describe, dump_yaml, load_config
from ssb import dist
from ssb.errors import SsbError
from ssb.pipeline import run_stages
from ssb.lock import locked
from ssb.stages import PIPELINE, STAGES as REGISTRY

STAGES = PIPELINE  # the stages of `ssb run`, in order


def resolve_config(args) -> Config:
    saved = Path(args.run_dir) / "config.yaml" if getattr(args, "run_dir", None) else None
    path = args.config or (saved if saved is not None and saved.exists() else None)
    return load_config(path, args.overrides)


def _common(p, run_dir_required: bool = True) -> None:
    p.add_argument("--run-dir", required=run_dir_required, help="Directory holding every stage's outputs.")
    p.add_argument("--config", help="YAML config file (default: RUN_DIR/config.yaml, else built-in defaults).")
    p.add_argument("--force", action="store_true", help="Discard this stage's earlier outputs and redo it.")
    _overrides(p)


def _overrides(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="Config overrides.")


def _config_file(p) -> None:
    p.add_argument("--config", help="YAML config file (default: RUN_DIR/config.yaml, else built-in defaults).")


def _stage_parsers(sub) -> None:
    """``ssb run`` and one command per stage of the registry."""
    p = sub.add_parser("run", help="Run every stage (skipping finished ones).")
    _common(p)
    p.add_argument("--stages", default=",".join(STAGES), help="Comma-separated subset of stages to run, in order.")
    for name, spec in REGISTRY.items():
        alone = "alone" if spec.in_run else "(not part of `ssb run`)"
        _common(sub.add_parser(name, help=f"Run the {name} stage {alone}: {spec.summary}; writes RUN_DIR/{name}/."))
    p = sub.add_parser("compare", help="One command, one harness: base, SSB, GRPO at SSB's training cost, SFT, RFT "
                       "and on-policy, each in RUN_DIR/<run>, then RUN_DIR/report (paired differences, accuracy vs "
                       "cost).")
    _common(p)
    p.add_argument("--runs", default=None, help=f"Comma-separated subset of the runs (default: all: "
                   f"{', '.join(RUNS)}).")


def _tool_parsers(sub) -> None:
    """The commands around the stages: config, prompts, signal."""
    p = sub.add_parser("config", help="Print the resolved config, or every key with its help (--keys).")
    _common(p, run_dir_required=False)
    p.add_argument("--keys", action="store_true")
    p = sub.add_parser("prompts", help="Audit the prompts before spending GPU time: render the student, teacher and "
                       "evaluation prompts of the first problems as text and token ids (tokenizer only, no weights) "
                       "and flag a doubled BOS, a cut prompt, end-of-turn missing from the targets, student and "
                       "teacher under different templates. Exit status 1 if any finding is an error.")
    _config_file(p)
    p.add_argument("--run-dir", help="A run directory whose curate/pairs.jsonl and teach/examples.jsonl supply real "
                   "attempts and replies (default: labelled placeholders). Nothing is written.")
    p.add_argument("--n", type=int, default=2, help="Training problems to render (default 2).")
    p.add_argument("--full", action="store_true", help="Print long prompts and id lists whole.")
    _overrides(p)
    p = sub.add_parser("signal", help="Where the distillation signal is, before training: per reply token, the KL "
                       "between the hinted teacher and the bare student over teach/examples.jsonl "
                       "(RUN_DIR/signal/signal.json).")
    p.add_argument("--run-dir", required=True, help="A run directory with a finished teach stage.")
    _config_file(p)
    p.add_argument("--adapter", help="Measure a trained student (a peft adapter directory) instead of the base model.")
    p.add_argument("--limit", type=int, help="Only the first N examples.")
    p.add_argument("--out", help="Output directory (default: RUN_DIR/signal, or RUN_DIR/signal-adapter).")
    _overrides(p)


def _output_parsers(sub) -> None:
    """The commands that turn runs into something to share: export, report."""
    p = sub.add_parser("export", help="A run's trained model as a standalone Hugging Face model directory (LoRA "
                       "merged, safetensors, tokenizer, generation config, model card with the run's evaluation "
                       "against base), or with --dataset its curated examples as Parquet with a dataset card.")
    p.add_argument("--run-dir", required=True, help="A run directory with a finished distill or grpo stage.")
    p.add_argument("--out", required=True, help="Directory to create (must not exist, or be empty).")
    _config_file(p)
    p.add_argument("--adapter-only", action="store_true", help="Keep the LoRA adapter instead of merging it.")
    p.add_argument("--dataset", action="store_true", help="Export the teacher-verified examples instead of the model.")
    p.add_argument("--base", metavar="DIR", help="The base model's run directory for the card's paired comparison "
                   "(default: ../base beside RUN_DIR, as ssb compare lays it out).")
    p.add_argument("--base-model", metavar="NAME", help="The base model's hub id for the card (default: "
                   "model.name_or_path).")
    p.add_argument("--license", help="License in the card's header (default: other for a model; the source data "
                   "set's for --dataset).")
    _overrides(p)
    p = sub.add_parser("report", help="Compare run directories: DIR/report.md with tables and plots.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="Directory to write report.md and its plots to.")
    p.add_argument("--labels", help="Comma-separated run labels (default: the directories' names).")
    p.add_argument("--base", metavar="LABEL", help="Run the paired differences are taken against (default: the first).")
    p.add_argument("--focus", metavar="LABEL",
                   help="Also compare this run with every other non-base run (paired differences; default: none).")


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(prog="ssb", description="Semantic Soft Bootstrapping: distil a model's own "
                                  "hinted solutions into it with LoRA, without RL.")
    sub = out.add_subparsers(dest="command", required=True)
    _stage_parsers(sub)
    _tool_parsers(sub)
    _output_parsers(sub)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS.get(args.command, _stages)(args)
    except SsbError as e:
        if not getattr(e, "quiet", False):  # a torchrun rank following rank 0's refusal says nothing more
            print(f"ssb: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"ssb: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssb: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


# the user's environment, not a bug: one line and exit 2
_USER_OS_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}


def _report(args) -> int:
    from ssb.report import main_report

    print(f"ssb: report written to {main_report(args.run_dirs, args.out, args.labels, args.base, args.focus)}")
    return 0


def _config(args) -> int:
    if args.keys:
        for key, default, help in describe():
            print(f"{key} = {default}\n    {help}")
    else:
        print(dump_yaml(resolve_config(args)), end="")
    return 0


def _prompts(args) -> int:
    from ssb.audit.command import audit_prompts

    _quiet_libraries()
    return audit_prompts(resolve_config(args), args.run_dir, n=args.n, full=args.full)


def _signal(args) -> int:
    from ssb import kd_signal

    _quiet_libraries()
    print(kd_signal.describe(kd_signal.measure(resolve_config(args), args.run_dir, args.adapter, args.limit, args.out)))
    return 0


def _export(args) -> int:
    from ssb import export

    _quiet_libraries()
    cfg = resolve_config(args)
    if args.dataset:
        out = export.export_dataset(cfg, args.run_dir, args.out, license=args.license)
    else:
        out = export.export_model(cfg, args.run_dir, args.out, adapter_only=args.adapter_only,
                                  base_dir=args.base, base_model=args.base_model, license=args.license or "other")
    print(f"ssb: exported {'data set' if args.dataset else 'model'} to {out}")
    return 0


def _compare(args) -> int:
    from ssb import compare

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    dist.init()
    runs = compare.RUNS if args.runs is None else [r.strip() for r in args.runs.split(",") if r.strip()]
    with locked(*compare.run_dirs(Path(args.run_dir), runs), collective=True):
        path = compare.run(cfg, Path(args.run_dir), runs, force=args.force)
    if dist.is_main():
        print(f"ssb: comparison written to {path}", file=sys.stderr)
    return 0


def _stages(args) -> int:
    """``ssb run`` and the single-stage commands."""
    cfg = resolve_config(args)
    run_dir = Path(args.run_dir)
    if args.command == "run":
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise SsbError(f"--stages: unknown stage '{bad[0]}'; stages are {', '.join(STAGES)}")
    else:
        stages = [args.command]
    _quiet_libraries()
    dist.init()
    with locked(run_dir, collective=True):
        save = args.command == "run" or not (run_dir / "config.yaml").exists()
        run_stages(cfg, run_dir, stages, force=args.force, budgeted=args.command == "run", save_config=save)
    if dist.is_main():
        print(f"ssb: done; results in {run_dir}", file=sys.stderr)
    return 0


COMMANDS = {"report": _report, "config": _config, "prompts": _prompts, "signal": _signal, "export": _export,
            "compare": _compare}  # every other command runs stages


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # per-file "Loading weights" bars; ours remain
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
