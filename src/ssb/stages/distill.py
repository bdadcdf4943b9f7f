"""Stage 4, distill: train a LoRA student to match the teacher's next-token distribution over the teacher's reply.

The student is the base model plus a LoRA adapter and sees only the system prompt and the bare question (same
chat template). The teacher is the *same* model with the adapter disabled, conditioned on the hinted prompt it
was sampled from. Both read the teacher's reply tokens; the reply token ``r[j]`` is predicted by the student at
position ``len(student_prompt) + j - 1`` and by the teacher at ``len(teacher_prompt) + j - 1``
(:func:`align`). Teacher signal (``distill.teacher``):

- ``online`` (default): the teacher runs every step from the frozen weights: exact, full-vocabulary, nothing stored.
- ``topk``: before training, one teacher pass over all examples (the base model, before the adapter exists) stores
  the top-``distill.topk`` log-probabilities of ``log_softmax(logits / distill.temperature)`` per reply token, their
  ids and the log of the remaining mass (:mod:`ssb.teacher_cache`; 388 bytes/token at k=64); training then reads the
  cache (no teacher forward) and uses :func:`ssb.chunked_losses.chunked_topk_distill_loss` with
  ``teacher_tempered=True``.
  The cache lives in ``distill/teacher_topk/`` because it is this stage's intermediate, valid only for this
  stage's inputs, k and temperature: the stage owns its directory (``--force`` wipes it with the rest), an
  interrupted distill resumes the cache build shard by shard, and a cache built at another k or temperature is
  refused with an error. (Reusing one cache across distill sweeps would need it outside the stage; not done.)

Memory: both models produce only final hidden states; logits are formed chunk by chunk through the lm_head and
reduced at once (:func:`ssb.chunked_losses.chunked_distill_loss`), so the (tokens × vocabulary) fp32 logits never
exist, neither in training nor in the cache build.

Ablations are switches of this stage, not separate code: SFT is ``kd_weight=0 ce_weight=1`` (cross-entropy on the
teacher's replies); RFT is ``targets=rollouts kd_weight=0 ce_weight=1`` (the student's own correct rollouts).
On-policy distillation is ``targets=on_policy`` (:mod:`ssb.stages.on_policy`): the same questions and teacher, but at every
step the student samples the replies it is trained on (through :func:`train`'s ``before_step`` hook).

Training (:mod:`ssb.train`) runs under torchrun with any number of processes and the same loss curve, and
checkpoints every ``save_every`` steps into ``distill/checkpoint/``; an interrupted distill resumes from there.
``distill.fsdp`` (with more than one process) shards the base model and the adapter with FSDP2 for models that do
not fit one GPU: every rank loads the model on the CPU, the adapter is attached, then :func:`ssb.dist.fsdp_shard`
puts each rank's shards on its device; the loss curve, checkpoints and adapter are the same as without it. The
top-k teacher cache is not supported with it (its build is a single-process pass over the whole model).

Outputs: ``distill/adapter/`` (a standard peft adapter: ``PeftModel.from_pretrained(base, path)`` loads it),
``distill/train_log.jsonl`` (per step: step, epoch, loss, grad_norm, lr, tokens, tokens_per_s, seconds; on-policy
also sampled_tokens, student_replies, sample_seconds).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ssb import dist
from ssb.atomic import publishing
from ssb.config import Config
from ssb.reads import Reads, fingerprint
from ssb.errors import SsbError
from ssb.chunked_losses import chunked_distill_loss, chunked_topk_distill_loss
from ssb.losses import topk_teacher
from ssb.models import (load_model, load_tokenizer, lora_config, render_chat, resolve_device, resolve_dtype,
                        stop_token_ids)
from ssb.progress import progress
from ssb.prompts import student_messages
from ssb.stages import entry
from ssb.rundir import Stage, batches, read_upstream
from ssb.tracking import check_available, open_tracker
from ssb.train import CKPT, TrainSpec, full_tensor, train, trainable_state
from ssb.teacher_cache import TopkCacheReader, TopkCacheWriter, bytes_per_token, check_existing

CACHE_DIR, CACHE_DTYPE = "teacher_topk", "float16"
# The config fields this stage reads (ssb.reads.Reads). teach.max_examples: how many problems RFT
# (targets=rollouts) trains on. fsdp decides how the training is spread, not its result;
# targets=on_policy also reads: teach.prompt (hint=correct renders the teacher's prompt as teach did),
# teach.max_new_tokens (the default longest student reply), rollout.data (hint=reference: reference solutions), and
# how: the engine's batch knobs, data_dir.
READS = Reads("distill", result=("model", "seed", "distill", "teach.max_examples", "teach.prompt",
                                 "teach.max_new_tokens", "rollout.data"),
              how=("distill.fsdp", "distill.report_to", "distill.sample_merged", "data_dir", "engine"))


@dataclass
class Example:
    student_ids: list[int]  # student prompt + reply
    teacher_ids: list[int]  # teacher prompt + reply
    student_pos: list[int]  # positions in student_ids whose next-token distribution is trained
    teacher_pos: list[int]  # the teacher positions predicting the same reply tokens
    targets: list[int]  # the reply tokens predicted at those positions


def align(student_prompt: list[int], teacher_prompt: list[int], reply: list[int]) -> Example:
    """Position ``student_pos[j]`` of the student and ``teacher_pos[j]`` of the teacher both predict ``reply[j]``.

    >>> e = align([1, 2], [7, 8, 9], [5, 6])
    >>> [e.student_ids[i + 1] for i in e.student_pos] == [e.teacher_ids[i + 1] for i in e.teacher_pos] == [5, 6]
    True
    """
    if not reply:
        raise ValueError("empty reply")
    n = len(reply)
    return Example(
        student_ids=student_prompt + reply, teacher_ids=teacher_prompt + reply,
        student_pos=list(range(len(student_prompt) - 1, len(student_prompt) - 1 + n)),
        teacher_pos=list(range(len(teacher_prompt) - 1, len(teacher_prompt) - 1 + n)),
        targets=list(reply),
    )


def reply_targets(reply: list[int], stop_ids: list[int], paper_format: bool) -> list[int]:
    """The reply tokens trained on: all of them, or in the authors' format all but a final end-of-turn token (a
    reply that is nothing else keeps it, so that every example has a target)."""
    reply = list(reply)
    return reply[:-1] if paper_format and len(reply) > 1 and reply[-1] in stop_ids else reply


def build_examples(rows: list[dict], tokenizer, stop_ids: list[int], paper_format: bool = False) -> list[Example]:
    """Training examples from ``teach/examples.jsonl`` rows. ``paper_format`` reproduces the authors: the student
    prompt is plain text without the chat template, and the end-of-turn token is not a target."""
    out = []
    for r in rows:
        reply = reply_targets(r["reply_ids"], stop_ids, paper_format)
        student = render_chat(tokenizer, student_messages(r["question"]), chat_template=not paper_format)
        teacher = student if r["teacher_prompt_ids"] is None else list(r["teacher_prompt_ids"])  # RFT: no teacher
        out.append(align(student, teacher, reply))
    return out


def collate(batch: list[Example], pad_id: int, device) -> dict:
    """Right-padded student and teacher inputs plus flat (batch index, position) gathers, aligned."""
    def pad(seqs):
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return ids.to(device), mask.to(device)

    s_ids, s_mask = pad([e.student_ids for e in batch])
    t_ids, t_mask = pad([e.teacher_ids for e in batch])
    rows = torch.tensor([i for i, e in enumerate(batch) for _ in e.targets], device=device)
    return {
        "s_ids": s_ids, "s_mask": s_mask, "t_ids": t_ids, "t_mask": t_mask, "rows": rows,
        "s_pos": torch.tensor([p for e in batch for p in e.student_pos], device=device),
        "t_pos": torch.tensor([p for e in batch for p in e.teacher_pos], device=device),
        "targets": torch.tensor([t for e in batch for t in e.targets], device=device),
        "seq_len": torch.tensor([len(e.targets) for e in batch for _ in e.targets], device=device),
    }


def rollout_targets(run_dir, max_examples: int, seed: int) -> list[dict]:
    """RFT rows: per problem (in order) one of the student's own correct, finished rollouts (seeded choice), as
    sampled, for at most ``max_examples`` problems. Both files are checked against their stages' manifests."""
    graded = {g["id"]: g["correct"] for g in read_upstream(run_dir, "curate", "graded.jsonl")}
    out = []
    for r in read_upstream(run_dir, "rollout", "rollouts.jsonl"):
        good = [s for s, ok in zip(r["samples"], graded.get(r["id"], [])) if ok and s["finish_reason"] == "stop"]
        if good and len(out) < max_examples:
            s = random.Random(f"{seed}:{r['id']}").choice(good)
            out.append({"id": r["id"], "question": r["question"], "reply_ids": s["token_ids"],
                        "teacher_prompt_ids": None})
    return out


def attach_lora(model, dc, seed: int):
    """``model`` with a fresh LoRA adapter as ``dc`` sets it (r, alpha, dropout, target modules), its initial weights
    drawn from ``seed``."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(dc))


def training_rows(cfg: Config, run_dir) -> list[dict]:
    """The rows trained on: ``teach/examples.jsonl`` (SSB, SFT, on-policy questions) or the student's own correct
    rollouts (RFT)."""
    if cfg.distill.targets == "rollouts":
        rows = rollout_targets(run_dir, cfg.teach.max_examples, cfg.seed)
        what = "no correct rollouts"
    else:
        rows, what = read_upstream(run_dir, "teach", "examples.jsonl"), "teach/examples.jsonl"
    if not rows:
        raise SsbError(f"no training examples ({what}): nothing to distill")
    return rows


def _check_setup(dc, fsdp: bool) -> None:
    if fsdp and dc.teacher == "topk" and dc.kd_weight > 0:
        raise SsbError("distill.fsdp does not support distill.teacher=topk (the cache is built by one process from "
                       "the whole model); use teacher=online, or fsdp=false")
    if fsdp and dc.targets == "on_policy":
        raise SsbError("distill.fsdp does not support distill.targets=on_policy (every rank samples replies of its "
                       "own lengths, which sharded forwards cannot follow); use fsdp=false")


def _load(cfg: Config, fsdp: bool):
    device = resolve_device(dist.device_for_rank(cfg.model.device))
    if fsdp:  # whole model in CPU memory only; fsdp_shard moves this rank's shards to `device`
        dtype = str(resolve_dtype(cfg.model, device)).removeprefix("torch.")
        return device, load_model(replace(cfg.model, dtype=dtype), device=torch.device("cpu"))
    return device, load_model(cfg.model, device=device)


@entry("distill")
def run(cfg: Config, stage: Stage) -> dict:
    run_dir, dc = stage.run_dir, cfg.distill
    rows = training_rows(cfg, run_dir)
    fsdp = dc.fsdp and dist.world() > 1
    _check_setup(dc, fsdp)
    check_available(dc.report_to, "distill.report_to")  # before minutes of loading
    use_cache = dc.teacher == "topk" and dc.kd_weight > 0
    keys = [str(r.get("id", i)) for i, r in enumerate(rows)]
    cache_fp = fingerprint("teacher_topk", stage.config["upstream"], cfg.model, dc.topk, dc.temperature,
                           dc.paper_student_format, CACHE_DTYPE)
    if use_cache:
        if len(set(keys)) != len(keys):
            raise SsbError("teach/examples.jsonl has duplicate ids; the top-k teacher cache is keyed by id")
        check_existing(stage.path(CACHE_DIR), dc.topk, dc.temperature, cache_fp)  # before loading the model
    tokenizer = load_tokenizer(cfg.model)
    device, model = _load(cfg, fsdp)
    stop_ids = stop_token_ids(tokenizer, model)
    examples = build_examples(rows, tokenizer, stop_ids, dc.paper_student_format)
    teacher_prompts = None
    if dc.targets == "on_policy":
        from ssb.stages import on_policy  # with the generation engine: imported only for targets=on_policy

        teacher_prompts = on_policy.hinted_prompts(cfg, run_dir, rows, tokenizer)
    stage.begin()  # inputs read and checked, model loaded: from here on the stage counts as started
    cache, cache_info = None, {}
    if use_cache:  # before the adapter exists: the plain base model is the teacher
        cache, cache_info = _teacher_cache(model, examples, keys, dc, stage, cache_fp, tokenizer.pad_token_id,
                                           device)
    model, decoder, lm_head = _student(model, dc, cfg.seed, fsdp, device)
    sampler = None
    if teacher_prompts is not None:
        sampler = on_policy.make_sampler(cfg, model, tokenizer, stop_ids=stop_ids, rows=rows, examples=examples,
                                         teacher_prompts=teacher_prompts, stage=stage,
                                         make_example=partial(_reply_example, dc.paper_student_format, stop_ids))
    objective = _Objective(model, decoder, lm_head, dc=dc, examples=examples, pad_id=tokenizer.pad_token_id,
                           device=device, stage=stage, cached=cache and (cache, keys), sampler=sampler)
    spec = _train_spec(dc, len(examples), cfg.seed)
    tracker = open_tracker(dc.report_to, "distill", stage.dir, f"{Path(run_dir).resolve().name}-distill",
                           stage.config)
    try:
        result = train(model, spec, stage.dir, objective.step_loss, objective.norm_of,
                       sampler.before_step if sampler else None, on_log=tracker and tracker.log)
    finally:
        if tracker is not None:
            tracker.close()
    _save_adapter(stage, model, fsdp)
    # trained_tokens: of every process since the start (through the checkpoints), as in an uninterrupted run;
    # skipped_steps: steps with non-finite gradients skipped since the start (carried through the checkpoints)
    counts = {"examples": len(examples), "steps": result["steps"], "trained_tokens": result["trained_tokens"],
              "skipped_steps": len(result["skipped_steps"])}
    sampling = {"hint": dc.hint, "samples": dc.samples, "mix": dc.mix} if sampler else {}
    return stage.finish(counts, train_seconds=result["train_seconds"], skipped_steps=result["skipped_steps"],
                        teacher=dc.teacher, targets=dc.targets, world_size=dist.world(), fsdp=fsdp,
                        **sampling, **cache_info)


def _student(model, dc, seed: int, fsdp: bool, device):
    """The base model with the LoRA adapter attached (and sharded with FSDP): (model, decoder, lm_head)."""
    if dc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = attach_lora(model, dc, seed)
    causal = model.get_base_model()
    decoder, lm_head = causal.get_decoder(), causal.get_output_embeddings()
    if fsdp:
        decoder = dist.fsdp_shard(model, device)  # the FSDP root: runs the decoder, returns hidden states
    return model, decoder, lm_head


def _train_spec(dc, n_examples: int, seed: int) -> TrainSpec:
    return TrainSpec(n_examples=n_examples, batch_size=dc.batch_size, epochs=dc.epochs, max_steps=dc.max_steps,
                     lr=dc.lr, weight_decay=dc.weight_decay, warmup_steps=dc.warmup_steps, schedule=dc.schedule,
                     max_grad_norm=dc.max_grad_norm, save_every=dc.save_every, seed=seed)


class _Objective:
    """What :func:`ssb.train.train` asks each step: the loss of a share of the batch and the batch's normaliser.
    The replies are the examples' (the teacher's, or RFT's rollouts) or, on-policy, the step's samples; the teacher
    is online (adapter disabled), cached (``cached``: the top-k reader and the examples' keys) or absent (SFT, RFT)."""

    def __init__(self, model, decoder, lm_head, *, dc, examples: list[Example], pad_id: int, device, stage: Stage,
                 cached=None, sampler=None):
        self.model, self.decoder, self.lm_head, self.dc = model, decoder, lm_head, dc
        self.examples, self.pad_id, self.device, self.stage = examples, pad_id, device, stage
        self.cached, self.sampler = cached, sampler
        self.loss_kw = dict(kind=dc.loss, temperature=dc.temperature, scale_t2=dc.scale_t2, beta=dc.jsd_beta,
                            chunk_size=dc.chunk_size)

    def step_loss(self, idx: list[int]) -> tuple[torch.Tensor, int]:
        self.stage.heartbeat()  # a killed process's time still counts (the cost ledger, at most every few seconds)
        examples = self.sampler.batch(idx) if self.sampler else [self.examples[i] for i in idx]
        batch = collate(examples, self.pad_id, self.device)
        cached = None
        if self.cached is not None:
            reader, keys = self.cached
            cached = reader.batch([keys[i] for i in idx], self.device)
        loss = batch_loss(self.model, self.decoder, self.lm_head, batch, self.dc, self.loss_kw, cached)
        return loss, int(batch["targets"].numel())

    def norm_of(self, idx: list[int]) -> float:
        if self.dc.average == "sequence":
            return float(len(idx) * (self.dc.samples if self.sampler else 1))
        if self.sampler:
            return self.sampler.global_tokens  # the step's sampled replies, every rank's (before_step)
        return float(sum(len(self.examples[i].targets) for i in idx))


def _teacher_cache(model, examples, keys, dc, stage: Stage, cache_fp: str, pad_id: int, device):
    """Build (or finish) the top-k teacher cache; returns the reader and its manifest entry."""
    t_cache = time.time()
    if not dist.is_main():
        dist.barrier()  # rank 0 builds the cache; the others then only read it
    cache = build_topk_cache(model, examples, keys, dc, stage.path(CACHE_DIR), cache_fp, pad_id, device)
    if dist.is_main():
        dist.barrier()
    return cache, {"teacher_cache": {"path": CACHE_DIR, "k": cache.k, "temperature": cache.temperature,
                                     "tokens": cache.total_tokens, "stored_bytes": cache.stored_bytes(),
                                     "bytes_per_token": bytes_per_token(cache.k, CACHE_DTYPE),
                                     "seconds": round(time.time() - t_cache, 3)}}


def _reply_example(paper: bool, stop_ids: list[int], student: list[int], teacher: list[int],
                   reply: list[int]) -> Example:
    """On-policy: the training example of a sampled reply (as :func:`build_examples` treats a stored one)."""
    return align(student, teacher, reply_targets(reply, stop_ids, paper))


def _save_adapter(stage: Stage, model, fsdp: bool) -> None:
    lora = trainable_state(model) if fsdp else None  # shards gathered on every rank
    if dist.is_main():
        with publishing(stage.path("adapter")) as tmp:
            model.save_pretrained(str(tmp), state_dict=lora)
        shutil.rmtree(stage.path(CKPT), ignore_errors=True)


@torch.no_grad()
def build_topk_cache(model, examples: list[Example], keys: list[str], dc, path, cache_fp: str, pad_id: int,
                     device) -> TopkCacheReader:
    """One teacher pass (``model`` = the adapter-free base) over the examples not yet cached, a shard per batch of
    ``dc.batch_size`` examples; logits are formed ``dc.chunk_size`` reply positions at a time. Returns a reader
    checked against the examples (ids and token counts)."""
    writer = TopkCacheWriter(path, dc.topk, dc.temperature, CACHE_DTYPE, cache_fp)
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    if dc.topk > lm_head.weight.shape[0]:
        raise SsbError(f"distill.topk={dc.topk} exceeds the vocabulary size {lm_head.weight.shape[0]}")
    todo = [i for i, key in enumerate(keys) if key not in writer.done]
    if not writer.complete and todo:
        bar = progress(len(todo), "teacher top-k", "example")
        for _, chunk in batches(todo, dc.batch_size):
            batch = collate([examples[i] for i in chunk], pad_id, device)
            th = decoder(input_ids=batch["t_ids"], attention_mask=batch["t_mask"]).last_hidden_state
            hidden = th[batch["rows"], batch["t_pos"]]
            parts = [topk_teacher(F.linear(hidden[s:s + dc.chunk_size], lm_head.weight, lm_head.bias), dc.topk,
                                  dc.temperature) for s in range(0, hidden.shape[0], dc.chunk_size)]
            lens = [len(examples[i].targets) for i in chunk]
            lp, ids, tail = (torch.cat([p[j] for p in parts]).cpu().split(lens) for j in range(3))
            writer.write_shard([keys[i] for i in chunk], list(lp), list(ids), list(tail))
            bar.update(len(chunk))
        bar.close()
    if not writer.complete:
        writer.finish()
    reader = TopkCacheReader(path, dc.topk, dc.temperature, cache_fp)
    for key, e in zip(keys, examples):
        if key not in reader or reader.tokens(key) != len(e.targets):
            raise SsbError(f"teacher cache {path} does not match example {key!r} (missing or another reply length); "
                           f"rerun distill with --force")
    return reader


def batch_loss(model, decoder, lm_head, batch: dict, dc, loss_kw: dict, cached=None) -> torch.Tensor:
    """Sum of the per-token losses of a batch, each weighted 1 (``average=token``) or 1/len(its sequence)
    (``sequence``); the caller divides by the global batch's tokens or sequences.
    ``cached``: the batch's (logprobs, ids, tail) from the top-k teacher cache; None = online teacher."""
    student = _hidden(decoder, batch["s_ids"], batch["s_mask"])[batch["rows"], batch["s_pos"]]
    teacher = teacher_hidden(model, decoder, batch) if dc.kd_weight > 0 and cached is None else None
    weights = None if dc.average == "token" else 1.0 / batch["seq_len"].float()
    common = dict(lm_head_bias=full_tensor(lm_head.bias), kd_weight=dc.kd_weight, ce_weight=dc.ce_weight,
                  targets=batch["targets"], weights=weights, **loss_kw)
    if cached is not None:
        total = chunked_topk_distill_loss(student, *cached, full_tensor(lm_head.weight), teacher_tempered=True,
                                          **common)
    else:
        total = chunked_distill_loss(student, teacher, full_tensor(lm_head.weight), **common)
    return total


def teacher_hidden(model, decoder, batch: dict) -> torch.Tensor:
    """The frozen teacher's last hidden states at the reply positions: the base model (adapter off, no gradient) in
    eval mode, so that a model with dropout is a deterministic teacher while the student trains; the model's
    training mode is restored after."""
    training = model.training
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        try:
            return _hidden(decoder, batch["t_ids"], batch["t_mask"])[batch["rows"], batch["t_pos"]]
        finally:
            model.train(training)


def _hidden(decoder, ids, mask) -> torch.Tensor:
    """Last hidden state of the decoder, or of the FSDP root (:func:`ssb.dist.fsdp_shard`), which returns it."""
    out = decoder(input_ids=ids, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state

