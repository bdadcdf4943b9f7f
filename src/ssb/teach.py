"""Stage 3, teach: the same model, shown the problem with a correct and an incorrect attempt, writes a clean
solution; only teacher replies that finish (end-of-turn) and grade correct are kept.

The teacher's reply is stored as the token ids it sampled — never decoded and re-encoded — because those exact
tokens are the positions at which the student is trained to match the teacher's distribution. The hinted prompt's
token ids are stored too, so the distill stage conditions the teacher on exactly what it was sampled from.

Files:

- ``teach/attempts.jsonl`` (working log, appended per batch; what makes the stage resumable): one row per teacher
  sample ``{"id", "attempt", "accepted", "finish_reason", "answer", "reply_text", "reply_ids"}``;
- ``teach/examples.jsonl`` (the contract, written at the end): per accepted pair, in pair order, at most
  ``teach.max_examples`` rows ``{"id", "question", "answer", "grader", "teacher_prompt_ids", "reply_ids",
  "reply_text", "attempt"}``.

Pairs are processed in batches; a pair whose sample is rejected is retried (``teach.attempts``) with a new seed.
Processing stops once ``max_examples`` pairs are accepted.
"""

from __future__ import annotations

import torch

from ssb import dist
from ssb.common import batch_seed
from ssb.config import Config, fingerprint
from ssb.engine import SamplingParams, make_engine
from ssb.errors import SsbError
from ssb.grading import extract_answer, grade
from ssb.models import load_tokenizer, render_chat
from ssb.progress import GenerationBar
from ssb.prompts import teacher_messages
from ssb.rundir import Stage, append_rows, batches, read_rows, require_done, write_rows


def stage_for(cfg: Config, run_dir, force: bool = False) -> Stage:
    up = require_done(run_dir, "curate")["fingerprint"]
    fp = fingerprint("teach", up, cfg.model, cfg.seed, cfg.teach, cfg.curate.strict, cfg.engine.backend)
    return Stage(run_dir, "teach", fp, {"model": cfg.model, "seed": cfg.seed, "teach": cfg.teach, "curate": up},
                 force)


def run(cfg: Config, run_dir, force: bool = False) -> dict:
    stage = stage_for(cfg, run_dir, force)
    if stage.is_done():
        return stage.manifest
    pairs = read_rows(stage.run_dir / "curate" / "pairs.jsonl")
    if not pairs:
        raise SsbError("curation kept 0 pairs (see curate/stats.json): nothing for the teacher to work on; "
                       "roll out more problems or samples")
    stage.begin()
    tc = cfg.teach
    params = SamplingParams(1, tc.temperature, tc.top_k, tc.top_p, tc.max_new_tokens)
    log_path = stage.path("attempts.jsonl")
    own_log = log_path if dist.world() == 1 else stage.path(f"attempts.jsonl.part{dist.rank()}")
    tries = _read_tries(log_path)

    def accepted_before(pid: str, attempt: int) -> bool:
        return any(r["accepted"] and r["attempt"] < attempt for r in tries.get(pid, []))

    def n_accepted() -> int:
        return sum(any(r["accepted"] for r in rs) for rs in tries.values())

    resumed_accepted, new_accepted = n_accepted(), 0

    tokenizer = load_tokenizer(cfg.model)
    prompts: dict[str, list[int]] = {}

    def prompt(p: dict) -> list[int]:
        if p["id"] not in prompts:
            msgs = teacher_messages(p["question"], p["correct"], p["incorrect"], tc.context)
            prompts[p["id"]] = render_chat(tokenizer, msgs)
        return prompts[p["id"]]

    engine, stats = None, {"generated_tokens": 0}
    bar = GenerationBar(len(pairs), "teach", "pair")
    for b, batch in batches(pairs, tc.batch_size):
        if b % dist.world() == 0:  # a round of `world` batches, one per rank; all ranks agree when to stop
            if resumed_accepted + int(dist.all_reduce_sum(torch.tensor(new_accepted))) >= tc.max_examples:
                break
        if b % dist.world() != dist.rank():
            continue
        for attempt in range(tc.attempts):
            live = [p for p in batch if not accepted_before(p["id"], attempt)]
            missing = [p for p in live if not any(r["attempt"] == attempt for r in tries.get(p["id"], []))]
            if not missing:
                continue
            if engine is None:
                engine = make_engine(cfg.model, engine_cfg=cfg.engine)
            hook = bar.begin(samples=len(live))
            outs = engine.generate([prompt(p) for p in live], params, batch_seed(cfg.seed, "teach", b, attempt),
                                   progress=hook)
            bar.end(tokens=sum(len(s.token_ids) for (s,) in outs))
            rows = []
            for p, (s,) in zip(live, outs):
                if p not in missing:
                    continue
                ok = s.finish_reason == "stop" and grade(s.text, p["answer"], p["grader"], strict=cfg.curate.strict)
                rows.append({"id": p["id"], "attempt": attempt, "accepted": ok, "finish_reason": s.finish_reason,
                             "answer": extract_answer(s.text), "reply_text": s.text, "reply_ids": s.token_ids})
                stats["generated_tokens"] += len(s.token_ids)
            append_rows(own_log, rows)
            new_accepted += sum(r["accepted"] for r in rows)
            for r in rows:
                tries.setdefault(r["id"], []).append(r)
        bar.note(accepted=n_accepted())
        bar.advance(len(batch))
    bar.close()
    if dist.world() > 1:
        stats["generated_tokens"] = int(dist.all_reduce_sum(torch.tensor(stats["generated_tokens"])))
        dist.barrier()  # every rank's part is complete
        if not dist.is_main():
            return stage.finish({})  # waits for rank 0's manifest
        tries = _read_tries(log_path)
        write_rows(log_path, [r for rs in tries.values() for r in rs])
        for part in stage.dir.glob("attempts.jsonl.part*"):
            part.unlink()

    examples = []
    for p in pairs:
        good = [r for r in tries.get(p["id"], []) if r["accepted"]]
        if good and len(examples) < tc.max_examples:
            r = min(good, key=lambda r: r["attempt"])
            examples.append({"id": p["id"], "question": p["question"], "answer": p["answer"],
                             "grader": p["grader"], "teacher_prompt_ids": prompt(p),
                             "reply_ids": r["reply_ids"], "reply_text": r["reply_text"], "attempt": r["attempt"]})
    if not examples:
        raise SsbError("the teacher produced 0 verified solutions; try teach.attempts > 1 or more pairs")
    write_rows(stage.path("examples.jsonl"), examples)
    processed = len(tries)
    counts = {"pairs": len(pairs), "pairs_tried": processed, "examples": len(examples),
              "samples": sum(len(v) for v in tries.values())}
    return stage.finish(counts, acceptance=round(n_accepted() / max(processed, 1), 4), **stats)


def _read_tries(log_path) -> dict[str, list[dict]]:
    """Every teacher sample so far, by pair id, from the log and any ranks' part files."""
    tries: dict[str, list[dict]] = {}
    for path in [log_path, *sorted(log_path.parent.glob(log_path.name + ".part*"))]:
        for r in read_rows(path, repair=True):
            tries.setdefault(r["id"], []).append(r)
    return tries
