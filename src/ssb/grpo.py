r"""``ssb grpo``: the RL baseline. GRPO with LoRA on the training problems, run by TRL's ``GRPOTrainer``.

Same problems (``rollout.data``), system prompt and chat template (``student_messages``) as the SSB stages, and the
same LoRA (``distill.lora_r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``), so ``ssb evaluate`` and
``ssb report`` compare the two adapters like for like. Reward: 1.0 when :func:`ssb.grading.grade` accepts the
completion's final answer, else 0.0; plus ``grpo.format_reward`` (off by default) for any complete ``\boxed{}``.

Outputs, like a stage: ``grpo/adapter/`` (a standard peft adapter: ``PeftModel.from_pretrained(base, path)``),
``grpo/train_log.jsonl`` (one row per logging step, appended as training goes: step, loss, reward, reward_std,
lr, grad_norm, completion_length, ... and TRL's other metrics under their own names), then ``grpo/manifest.json``.
An interrupted run restarts from scratch; a finished one is not redone.

How this differs from textbook GRPO (DeepSeekMath), i.e. TRL's defaults, which we keep unless configured:

- ``loss_type=dapo``: token losses are averaged over all completion tokens of the optimizer batch, not per
  sequence first (``grpo.loss_type=grpo`` restores that, with its length bias).
- ``beta=0``: no KL penalty and no reference model (``grpo.beta`` enables it; the reference is then the base
  model, i.e. the adapter disabled).
- ``scale_rewards=group``: advantages are standardised within each group as in the paper; ``batch`` / ``none``
  (Dr. GRPO) are available.
- One generation batch per optimizer step and ``num_iterations=1``: fully on-policy, so the PPO ratio is 1 and the
  clipping (ε=0.2) never binds: the update is a plain group-baselined policy gradient.
- Generation uses ``model.generate`` (no vLLM); sampling with ``grpo.temperature`` / ``top_k`` / ``top_p``.
"""

from __future__ import annotations

import json
import shutil
import time

import torch

from ssb.config import Config, Reads
from ssb.data import load_problems
from ssb.errors import SsbError
from ssb.grading import _BOX_RE, _box_content, grade
from ssb.models import load_model, load_tokenizer, resolve_device, stop_token_ids
from ssb.prompts import student_messages
from ssb.rundir import Stage, append_rows, locking

LOG = "train_log.jsonl"
# The config fields this stage reads (ssb.config.Reads): the same problems and LoRA as SSB's
READS = Reads("grpo", result=("model", "seed", "rollout.data", "grpo", "distill.lora_r", "distill.lora_alpha",
                              "distill.lora_dropout", "distill.target_modules"), how=("data_dir",))
# TRL log key -> train_log.jsonl key (everything else TRL logs is kept under its own name)
_RENAME = {"learning_rate": "lr", "completions/mean_length": "completion_length"}


def lora_fields(cfg: Config) -> dict:
    d = cfg.distill
    return {"lora_r": d.lora_r, "lora_alpha": d.lora_alpha, "lora_dropout": d.lora_dropout,
            "target_modules": d.target_modules}


def stage_for(cfg: Config, run_dir, force: bool = False) -> Stage:
    return Stage(run_dir, "grpo", READS.fingerprint(cfg), READS.values(cfg), force)


def _text(completion) -> str:
    """A completion as TRL passes it: plain text, or (conversational) a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")


def has_box(text: str) -> bool:
    r"""True if ``text`` has a complete, non-empty ``\boxed{...}`` (balanced braces)."""
    return any((_box_content(text, m.end()) or "").strip() for m in _BOX_RE.finditer(text))


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


def _peft_config(cfg: Config):
    from peft import LoraConfig

    d = cfg.distill
    targets = d.target_modules if d.target_modules == "all-linear" else [
        t.strip() for t in d.target_modules.split(",") if t.strip()]
    return LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha, lora_dropout=d.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


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


@locking
def run(cfg: Config, run_dir, force: bool = False) -> dict:
    cfg = READS.view(cfg)
    stage = stage_for(cfg, run_dir, force)
    if stage.is_done():
        return stage.manifest
    gc = cfg.grpo
    completions_per_step = gc.batch_size * gc.num_generations
    if gc.num_generations < 2:
        raise SsbError("grpo.num_generations: GRPO needs at least 2 completions per prompt")
    if completions_per_step % gc.micro_batch_size:
        raise SsbError(f"grpo.micro_batch_size ({gc.micro_batch_size}) must divide batch_size × num_generations "
                       f"({gc.batch_size} × {gc.num_generations} = {completions_per_step})")
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SsbError(f"ssb grpo needs TRL: pip install 'ssb[grpo]' ({e})") from None
    problems = load_problems(cfg.rollout.data, cfg.data_dir)
    if not problems:
        raise SsbError("rollout.data has no problems: nothing to train on")
    tokenizer = load_tokenizer(cfg.model)
    device = resolve_device(cfg.model.device)
    model = load_model(cfg.model, device=device)
    stage.begin()  # the model has loaded: from here on the stage counts as started
    stage.path(LOG).unlink(missing_ok=True)  # a restarted run starts its log afresh
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model)  # stop (and mask) at end of turn
    dataset = Dataset.from_list([{"prompt": student_messages(p.question), "answer": p.answer, "grader": p.grader}
                                 for p in problems])
    out_tmp = stage.path(".trl")
    args = GRPOConfig(
        output_dir=str(out_tmp), seed=cfg.seed, data_seed=cfg.seed, max_steps=gc.steps,
        per_device_train_batch_size=gc.micro_batch_size,
        gradient_accumulation_steps=completions_per_step // gc.micro_batch_size,
        generation_batch_size=completions_per_step, num_generations=gc.num_generations,
        max_completion_length=gc.max_new_tokens, temperature=gc.temperature, top_k=gc.top_k, top_p=gc.top_p,
        learning_rate=gc.lr, lr_scheduler_type=gc.schedule, warmup_steps=gc.warmup_steps,
        weight_decay=gc.weight_decay, max_grad_norm=gc.max_grad_norm, beta=gc.beta or 0.0,
        loss_type=gc.loss_type, scale_rewards=gc.scale_rewards, num_iterations=1,
        gradient_checkpointing=gc.gradient_checkpointing, bf16=model.dtype == torch.bfloat16, fp16=False,
        use_cpu=device.type == "cpu", logging_steps=gc.logging_steps, save_strategy="no",
        report_to="none", disable_tqdm=False, remove_unused_columns=False, dataloader_num_workers=0,
    )
    stats: dict = {}
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs(gc.format_reward, stats), args=args,
                          train_dataset=dataset, processing_class=tokenizer, peft_config=_peft_config(cfg),
                          callbacks=[_log_callback(stage.path(LOG), stage.heartbeat)])
    t_start = time.time()
    result = trainer.train()

    out, tmp = stage.path("adapter"), stage.path(".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(out_tmp, ignore_errors=True)
    counts = {"steps": trainer.state.global_step, "problems": len(problems),
              "completions": stats.get("completions", 0), "correct": stats.get("correct", 0),
              "generated_tokens": stats.get("generated_tokens", 0)}
    return stage.finish(counts, generated_tokens=counts["generated_tokens"],
                        train_seconds=round(time.time() - t_start, 3), train_loss=result.training_loss)
