r"""``ssb grpo``: the RL baseline. GRPO with LoRA on the training problems, run by TRL's ``GRPOTrainer``.

Same problems (``rollout.data``), system prompt and chat template (``student_messages``) as the SSB stages, and the
same LoRA (``distill.lora_r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``), so ``ssb evaluate`` and
``ssb report`` compare the two adapters like for like. Reward: 1.0 when :func:`ssb.grading.grade` accepts the
completion's final answer, else 0.0; plus ``grpo.format_reward`` (off by default) for any complete ``\boxed{}``.

Outputs, like a stage: ``grpo/adapter/`` (a standard peft adapter: ``PeftModel.from_pretrained(base, path)``),
``grpo/train_log.jsonl`` (one row per logging step, appended as training goes: step, loss, reward, reward_std,
lr, grad_norm, completion_length, ... and TRL's other metrics under their own names), then ``grpo/manifest.json``.
A finished run is not redone.

Budget (for comparisons at equal cost). ``grpo.steps`` is the maximum; ``grpo.max_seconds`` (device-seconds: wall
seconds × GPUs in use, plain wall seconds on CPU, from the start of the stage, model loading included),
``grpo.max_cpu_seconds`` (the process's CPU time, every thread's, from the same start: the unit on a CPU shared
with other work, where wall seconds grow with the load) and ``grpo.max_generated_tokens`` (completion tokens) stop
training earlier, at the end of the step that reaches them (a TrainerCallback sets ``should_training_stop``); the
adapter and manifest are written as usual. The manifest records the totals over all processes that worked on the
run: ``wall_seconds``, ``device_seconds``, ``gpu_seconds``, ``cpu_seconds``, ``generated_tokens`` (also
``counts``: completions, correct), ``stopped_by`` (steps | seconds | cpu_seconds | tokens) and
``resumed_from_step``. A budget-stopped run does not complete a linear/cosine schedule, which is laid
out over ``steps``; use ``grpo.schedule=constant`` when the budget decides.

Resume. Every ``grpo.save_every`` steps the HF Trainer checkpoints (adapter, optimizer, scheduler, RNG, trainer
state) into ``grpo/.trl/checkpoint-<step>`` (the last two are kept: TRL rotates the older one out before ssb has
written the newer one's counters), and the budget counters are written next to it (``ssb_counters.json``, written
last: a checkpoint without it is incomplete and ignored). A rerun of the same
command resumes from the last complete checkpoint with ``trainer.train(resume_from_checkpoint=...)``, cuts
``train_log.jsonl`` back to that step, and continues the counters from it (work done after the checkpoint and lost
is redone and not counted). If that checkpoint already ended training (steps or budget reached, killed before the
manifest), its adapter is published without loading the model. Resumes are exact on CPU for the ``ssb`` and
``generate`` generators (tested: same adapter as an uninterrupted run). No checkpoint: the run starts afresh.
``save_every`` is not part of the fingerprint.

Generators (``grpo.generator``); all sample from the current LoRA policy (adapter on, weights of this step):

- ``ssb`` (default): ssb's own :class:`~ssb.engine.transformers_engine.TransformersEngine`, the generator of SSB's rollout / teach /
  evaluate stages, plugged in as TRL's ``rollout_func``: each prompt prefilled once for its ``num_generations``
  samples, continuous batching over a preallocated KV cache, CUDA-graph decode steps on GPU (``engine.*``
  settings). Samples are seeded by (seed, step), so a resumed step samples what it would have. Same generator for
  both methods, hence a fair comparison at equal GPU-seconds; runs on CPU. Each step it samples from a merged copy
  of the policy (``grpo.sample_merged``: base weights + LoRA delta, one matrix product per linear layer).
- ``generate``: TRL's default, one left-padded ``model.generate`` call per step (every sequence decodes until the
  longest finishes; dropout, if any, stays on while sampling).
- ``paged``: TRL's ``use_transformers_continuous_batching``, i.e. transformers' ``generate_batch`` (paged attention,
  background scheduler; TRL caps its KV cache at 50% of free GPU memory). Sampling depends on batch-mates and
  timing, so resumes are not exact. Runs on CPU but slowly (a thread polls for results); meant for GPU.

How this differs from textbook GRPO (DeepSeekMath), i.e. TRL's defaults, which we keep unless configured:

- ``loss_type=dapo``: token losses are averaged over all completion tokens of the optimizer batch, not per
  sequence first (``grpo.loss_type=grpo`` restores that, with its length bias).
- ``beta=0``: no KL penalty and no reference model (``grpo.beta`` enables it; the reference is then the base
  model, i.e. the adapter disabled).
- ``scale_rewards=group``: advantages are standardised within each group as in the paper; ``batch`` / ``none``
  (Dr. GRPO) are available.
- One generation batch per optimizer step and ``num_iterations=1``: fully on-policy, so the PPO ratio is 1 and the
  clipping (ε=0.2) never binds: the update is a plain group-baselined policy gradient.
- No vLLM; sampling with ``grpo.temperature`` / ``top_k`` / ``top_p`` by the generator chosen above.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from ssb.atomic import publishing
from ssb import usage
from ssb.config import Config
from ssb.reads import Reads
from ssb.data import load_problems
from ssb.engine import SamplingParams
from ssb.engine.merged import merged_copy
from ssb.engine.transformers_engine import TransformersEngine
from ssb.errors import SsbError
from ssb.grading import grade, has_box
from ssb.models import load_model, load_tokenizer, lora_config, render_chat, resolve_device, stop_token_ids
from ssb.prompts import student_messages
from ssb.rows import append_rows, read_json, read_rows, write_rows
from ssb.tracking import check_available, offline_by_default, tracker_dir
from ssb.stages import entry
from ssb.rundir import Stage
from ssb.stages.grpo_budget import COUNTER_KEYS, COUNTERS, budget_callback, budget_spent, last_checkpoint

LOG = "train_log.jsonl"
TRL_DIR = ".trl"  # TRL's output_dir: its checkpoints, removed when the stage finishes
# The config fields this stage reads (ssb.reads.Reads): the same problems and LoRA as SSB's; how it checkpoints
# and the engine knobs of its generator do not change what it trains
READS = Reads("grpo", result=("model", "seed", "rollout.data", "grpo", "distill.lora_r", "distill.lora_alpha",
                              "distill.lora_dropout", "distill.target_modules"),
              how=("data_dir", "grpo.save_every", "grpo.report_to", "engine"))
# TRL log key -> train_log.jsonl key (everything else TRL logs is kept under its own name)
_RENAME = {"learning_rate": "lr", "completions/mean_length": "completion_length"}


def _text(completion) -> str:
    """A completion as TRL passes it: plain text, or (conversational) a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")



def reward_funcs(format_bonus: float | None = None, stats: dict | None = None) -> list:
    """TRL reward functions ``(prompts, completions, **columns) -> list[float]``; ``answer`` and ``grader`` are
    dataset columns. ``stats`` (if given) accumulates completions, correct ones and generated tokens."""

    def correct(prompts, completions, answer, grader, completion_ids=None, **_):
        out = [1.0 if grade(_text(c), gold, g) else 0.0 for c, gold, g in zip(completions, answer, grader)]
        if stats is not None:
            stats["completions"] = stats.get("completions", 0) + len(out)
            stats["correct"] = stats.get("correct", 0) + int(sum(out))
            stats["generated_tokens"] = stats.get("generated_tokens", 0) + sum(map(len, completion_ids or []))
        return out

    def boxed(prompts, completions, **_):
        return [format_bonus if has_box(_text(c)) else 0.0 for c in completions]

    return [correct] if format_bonus is None else [correct, boxed]



def _log_callback(path, heartbeat=None):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends each training log (TRL's averaged metrics) to ``path`` as one JSON line; calls ``heartbeat``
        (the stage's cost ledger) on every log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if heartbeat is not None:
                heartbeat()
            if not logs or "train_runtime" in logs or "loss" not in logs:  # the end-of-training summary
                return
            row = {"step": state.global_step, "epoch": logs.get("epoch"), "loss": logs["loss"],
                   "reward": logs.get("reward"), "reward_std": logs.get("reward_std")}
            row.update({_RENAME.get(k, k): v for k, v in logs.items() if k not in row})
            append_rows(path, [json.loads(json.dumps(row, default=float))])  # numpy/tensor scalars -> float

    return JsonlLog()


def _step_seed(seed: int, step: int) -> int:
    """The engine seed of the generation batch of optimizer step ``step`` (0-based): fixed by (seed, step), so a
    resumed run samples what an uninterrupted one would have."""
    h = hashlib.blake2b(f"grpo:{seed}:{step}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def ssb_rollout_func(cfg: Config, tokenizer, stop_ids: list[int]):
    """A TRL ``rollout_func`` that samples with :class:`ssb.engine.transformers_engine.TransformersEngine` from the trainer's current
    model (the LoRA policy, adapter on, eval mode, no gradient checkpointing while it generates).

    TRL hands it the generation batch's prompts with each prompt repeated ``num_generations`` times in a row; each
    run of copies becomes one prompt with ``n`` samples (prefilled once), as in the rollout stage."""
    from trl.models import unwrap_model_for_generation

    gc, ec = cfg.grpo, cfg.engine

    def rollout(prompts: list, trainer) -> dict:
        ids = [render_chat(tokenizer, p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)[
            "input_ids"] for p in prompts]
        runs: list[list] = []  # [prompt ids, copies in a row]
        for p in ids:
            if runs and runs[-1][0] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        n = runs[0][1] if len({c for _, c in runs}) == 1 else 1
        unique = [p for p, _ in runs] if n > 1 else ids
        params = SamplingParams(n, gc.temperature, gc.top_k, gc.top_p, gc.max_new_tokens)
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs
                                         ) as model:
            was_training = model.training
            model.eval()
            try:
                policy = merged_copy(model) if gc.sample_merged else model
                engine = TransformersEngine(policy, tokenizer, stop_ids, max_batch_size=ec.max_batch_size,
                                            prefill_tokens=ec.prefill_tokens, cuda_graphs=ec.cuda_graphs)
                samples = engine.generate(unique, params, _step_seed(cfg.seed, trainer.state.global_step))
                del engine, policy
            finally:
                model.train(was_training)
        return {"prompt_ids": ids, "completion_ids": [s.token_ids for group in samples for s in group],
                "logprobs": None}

    return rollout


def _publish_adapter(stage: Stage, save) -> None:
    """``save(tmp_dir)`` writes the adapter; it then replaces ``grpo/adapter`` in one rename."""
    with publishing(stage.path("adapter")) as tmp:
        save(tmp)


@entry("grpo")
def run(cfg: Config, stage: Stage, callbacks: list | None = None) -> dict:
    """Train (or resume, or do nothing if finished). ``callbacks``: extra TrainerCallbacks (tests)."""
    t0, cpu0 = time.time(), usage.cpu_seconds()  # this process's budget clocks: from the start of the stage
    gc = cfg.grpo
    _check_batch_shape(gc)
    _require_trl()
    check_available(gc.report_to, "grpo.report_to")
    problems = load_problems(cfg.rollout.data, cfg.data_dir)
    if not problems:
        raise SsbError("rollout.data has no problems: nothing to train on")
    tokenizer = load_tokenizer(cfg.model)
    stage.begin()
    ckpt, carried = _resume_point(stage)
    resumed_from = None if ckpt is None else carried["step"]
    if ckpt is not None and (why := budget_spent(gc, carried)):  # it had finished training: publish that state
        _publish_adapter(stage, lambda tmp: _copy_adapter(ckpt, tmp))
        return _finish(stage, len(problems), resumed_from, carried["step"], why, carried)

    stats: dict = {}
    budget = budget_callback(gc, t0, cpu0, carried, stats)
    trainer = _trainer(cfg, stage, problems, tokenizer, reward_funcs(gc.format_reward, stats),
                       [_log_callback(stage.path(LOG), stage.heartbeat), budget, *(callbacks or [])])
    t_start = time.time()
    with scoring_labelled_positions_only():
        result = trainer.train(resume_from_checkpoint=None if ckpt is None else str(ckpt))

    _publish_adapter(stage, lambda tmp: trainer.model.save_pretrained(str(tmp)))
    return _finish(stage, len(problems), resumed_from, trainer.state.global_step, budget.stopped_by or "steps",
                   budget.totals(), train_seconds=round(time.time() - t_start, 3), train_loss=result.training_loss)


@contextlib.contextmanager
def scoring_labelled_positions_only():
    """TRL's fused log-prob head (``add_fused_lm_head``) projects through the lm_head only the positions that have a
    label (a step's completion tokens) on Triton devices; elsewhere it scores every position, prompt and padding
    too, and zeroes them after, so that a compiler (Neuron) sees fixed tile shapes. Nothing is compiled on a CPU,
    where the lm_head product and the fp32 log-softmax over the vocabulary are most of a GRPO step: there, within
    this context, only the labelled positions are scored. The same per-token values (each position's are computed on
    their own; equal up to the rounding of a differently blocked product) from fewer positions: about half at
    GSM8K lengths (``benchmarks/grpo_scoring.py``). A TRL without that switch is left as it is."""
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    if use_triton is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    try:
        yield
    finally:
        trl_utils._use_triton = use_triton


def _check_batch_shape(gc) -> None:
    """Refuse a generation batch GRPO cannot use: fewer than 2 completions per prompt, or one that micro-batches
    do not divide."""
    completions_per_step = gc.batch_size * gc.num_generations
    if gc.num_generations < 2:
        raise SsbError("grpo.num_generations: GRPO needs at least 2 completions per prompt")
    if completions_per_step % gc.micro_batch_size:
        raise SsbError(f"grpo.micro_batch_size ({gc.micro_batch_size}) must divide batch_size × num_generations "
                       f"({gc.batch_size} × {gc.num_generations} = {completions_per_step})")


def _require_trl() -> None:
    """One line, before any work, if TRL (or the GRPO part of it) is missing."""
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SsbError(f"ssb grpo needs TRL: pip install 'ssb[grpo]' ({e})") from None
    del Dataset, GRPOConfig, GRPOTrainer  # imported again where used (_trainer, _grpo_args)


def _resume_point(stage: Stage) -> tuple[Path | None, dict]:
    """The last complete checkpoint and its counters, with what is newer than it removed and the training log cut
    back to its step; or, with none, (None, zero counters) and nothing left of an earlier start."""
    trl_dir, log = stage.path(TRL_DIR), stage.path(LOG)
    ckpt = last_checkpoint(trl_dir)
    if ckpt is None:  # nothing to resume: start afresh
        shutil.rmtree(trl_dir, ignore_errors=True)
        log.unlink(missing_ok=True)
        return None, dict.fromkeys(COUNTER_KEYS, 0)
    carried = read_json(ckpt / COUNTERS)
    write_rows(log, [r for r in read_rows(log, repair=True) if r["step"] <= carried["step"]])
    for p in trl_dir.glob("checkpoint-*"):  # incomplete ones newer than it
        if p != ckpt:
            shutil.rmtree(p, ignore_errors=True)
    return ckpt, carried


def _copy_adapter(ckpt: Path, tmp: Path) -> None:
    """Copy a checkpoint's adapter into ``tmp`` (see :func:`_publish_adapter`)."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(ckpt / name, tmp / name)


def _trainer(cfg: Config, stage: Stage, problems: list, tokenizer, rewards: list, callbacks: list):
    """TRL's GRPOTrainer over ``problems``, training a LoRA on the base model (loaded here), checkpointing into
    ``grpo/.trl``."""
    from datasets import Dataset
    from trl import GRPOTrainer

    gc = cfg.grpo
    device = resolve_device(cfg.model.device)
    model = load_model(cfg.model, device=device)
    stop_ids = stop_token_ids(tokenizer, model)
    model.generation_config.eos_token_id = stop_ids  # stop (and mask) at end of turn
    dataset = Dataset.from_list([{"prompt": student_messages(p.question), "answer": p.answer, "grader": p.grader}
                                 for p in problems])
    if gc.report_to == "tensorboard":  # TRL's output dir (grpo/.trl) goes at the end: log beside the adapter
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tracker_dir(stage.dir))
    offline_by_default(gc.report_to)
    args = _grpo_args(cfg, stage.path(TRL_DIR), bf16=model.dtype == torch.bfloat16, cpu=device.type == "cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rollout_func.*experimental", category=UserWarning)
        return GRPOTrainer(
            model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
            processing_class=tokenizer, peft_config=lora_config(cfg.distill),
            rollout_func=ssb_rollout_func(cfg, tokenizer, stop_ids) if gc.generator == "ssb" else None,
            callbacks=callbacks)


def _grpo_args(cfg: Config, trl_dir: Path, bf16: bool, cpu: bool):
    """TRL's GRPOConfig from ``cfg.grpo``: one generation batch (``batch_size`` prompts × ``num_generations``) per
    optimizer step, in micro-batches of ``micro_batch_size`` completions."""
    from trl import GRPOConfig

    gc = cfg.grpo
    completions_per_step = gc.batch_size * gc.num_generations
    return GRPOConfig(
        output_dir=str(trl_dir), seed=cfg.seed, data_seed=cfg.seed, max_steps=gc.steps,
        per_device_train_batch_size=gc.micro_batch_size,
        gradient_accumulation_steps=completions_per_step // gc.micro_batch_size,
        generation_batch_size=completions_per_step, num_generations=gc.num_generations,
        max_completion_length=gc.max_new_tokens, temperature=gc.temperature, top_k=gc.top_k, top_p=gc.top_p,
        learning_rate=gc.lr, lr_scheduler_type=gc.schedule, warmup_steps=gc.warmup_steps,
        weight_decay=gc.weight_decay, max_grad_norm=gc.max_grad_norm, beta=gc.beta or 0.0,
        loss_type=gc.loss_type, scale_rewards=gc.scale_rewards, num_iterations=1,
        use_transformers_continuous_batching=gc.generator == "paged",
        gradient_checkpointing=gc.gradient_checkpointing, bf16=bf16, fp16=False,
        use_cpu=cpu, logging_steps=gc.logging_steps,
        save_strategy="steps" if gc.save_every else "no", save_steps=gc.save_every or 500, save_total_limit=2,
        report_to=gc.report_to, disable_tqdm=False, remove_unused_columns=False, dataloader_num_workers=0,
    )


def _finish(stage: Stage, problems: int, resumed_from: int | None, steps: int, stopped_by: str, counters: dict,
            **extra) -> dict:
    """Remove TRL's checkpoints and write the manifest (``counters``: the totals over every process)."""
    shutil.rmtree(stage.path(TRL_DIR), ignore_errors=True)
    counts = {"steps": steps, "problems": problems, "completions": counters["completions"],
              "correct": counters["correct"], "generated_tokens": counters["generated_tokens"]}
    return stage.finish(counts, generated_tokens=counters["generated_tokens"], stopped_by=stopped_by,
                        wall_seconds=round(counters["wall_seconds"], 3),
                        device_seconds=round(counters["device_seconds"], 3),
                        gpu_seconds=round(counters["gpu_seconds"], 3),
                        cpu_seconds=round(counters.get("cpu_seconds", 0.0), 3), resumed_from_step=resumed_from,
                        **extra)
