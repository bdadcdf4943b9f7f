"""Typed run configuration: the schema, one documented field at a time.

Each field reads ``name: type = _f(default, help, allowed)``. ``help`` is what ``ssb config --keys`` prints;
``allowed`` is what the value may be: a tuple of choices, or for a number its range (``gt(0)``: > 0, ``ge(0)``: >= 0,
``between(0, 1)``: in [0, 1]; every number declares one). Rules across fields are a section's ``check()``.

The defaults reproduce the paper (Qwen2.5-3B-Instruct, GSM8K train, K=4 rollouts at T=0.8 / top-k 50, teacher at
T=0.4, 256 teacher-verified examples, LoRA r=32 α=32 on all linear layers, lr 2e-4, batch 4, 3 epochs, forward KL at
T=2 scaled by T², no cross-entropy).

Loading (YAML files, ``key=value`` overrides, the checks of types, choices and ranges) is :mod:`ssb.configio`; what
each stage reads of the config, and its fingerprint, is :mod:`ssb.reads`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ssb.choices import HINTS, LOSSES, TEACHER_CONTEXTS, TEACHER_PROMPTS, TRACKERS
from ssb.errors import SsbError


class ConfigError(SsbError):
    """An invalid configuration file, key or value."""


# --------------------------------------------------------------------------------------------- how a field is declared

@dataclass(frozen=True)
class Range:
    """The numbers a field may take: from ``lo`` (excluded if ``lo_open``) up to ``hi`` (None: no upper bound)."""

    lo: float
    hi: float | None = None
    lo_open: bool = False

    def __contains__(self, value: float) -> bool:
        return (value > self.lo if self.lo_open else value >= self.lo) and (self.hi is None or value <= self.hi)

    def __str__(self) -> str:  # as the error message puts it: "> 0", ">= 0", "in (0, 1]"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"


def gt(lo: float) -> Range:
    """Greater than ``lo``."""
    return Range(lo, lo_open=True)


def ge(lo: float) -> Range:
    """``lo`` or more."""
    return Range(lo)


def between(lo: float, hi: float, lo_open: bool = False) -> Range:
    """From ``lo`` to ``hi``, both included (``lo`` excluded if ``lo_open``)."""
    return Range(lo, hi, lo_open)


FRACTION = between(0, 1, lo_open=True)  # in (0, 1]: top_p, a share of GPU memory
SCHEDULES = ("linear", "cosine", "constant")  # learning-rate schedules after warm-up (transformers' get_scheduler)


def _f(default: Any, help: str, allowed: tuple | Range | None = None):
    """A documented field: ``help`` for ``ssb config --keys``; ``allowed``: its choices or its range."""
    meta = {"help": help, "allowed": allowed}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------- the schema

@dataclass
class DatasetConfig:
    """One problem source: ``rollout.data`` and each of ``evaluate.benchmarks`` (a bare name means ``{name: ...}``)."""

    name: str = _f("gsm8k", "Known benchmark (gsm8k, math500, aime24, aime25, amc23), 'arith' (built-in synthetic "
                   "set), a hub dataset id ('openai/gsm8k'), or a local .jsonl/.json/.parquet file.")
    split: str | None = _f(None, "Hub split, and the file for known benchmarks' offline copies; None -> the "
                           "benchmark's default.")
    subset: str | None = _f(None, "Hub config name (gsm8k: 'main'); None -> the benchmark's default.")
    question_field: str | None = _f(None, "Column with the question; None -> the known default, else 'question' "
                                    "then 'problem'.")
    answer_field: str | None = _f(None, "Column with the gold answer; None -> the known default, else 'answer'.")
    id_field: str | None = _f(None, "Column with a stable id; None -> the known default or 'id' if present, else "
                              "'<name>-<row>'.")
    grader: str | None = _f(None, "Grading rules, one of ssb.choices.GRADERS (checked when the data is read); None -> "
                            "the benchmark's default, else 'math'.")
    skip: int = _f(0, "Drop the first N problems (after shuffling, before `limit`): a held-out slice disjoint from a "
                   "`limit`.", ge(0))
    limit: int | None = _f(None, "Keep the first N problems (after shuffling and `skip`); None -> all ('arith': 64).",
                           gt(0))
    shuffle: bool = _f(False, "Shuffle the problems (deterministically, by `seed`) before applying `limit`.")
    seed: int = _f(0, "Seed for `shuffle` and for generating 'arith' problems.", ge(0))


@dataclass
class ModelConfig:
    """``model``: the base model, teacher and student alike."""

    name_or_path: str = _f("Qwen/Qwen2.5-3B-Instruct", "Hub id or local directory of a causal LM with a chat "
                           "template; 'ssb-tiny-arith' builds the tiny CPU model used by the smoke run.")
    gguf_file: str | None = _f(None, "Load weights from this GGUF file inside name_or_path (dequantised once, "
                                    "cached in $SSB_CACHE/models).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit).")
    dtype: str = _f("auto", "Weights dtype: auto (bf16 on GPU and on a CPU with native bf16 matrix units, AMX or "
                    "AVX512-BF16; fp32 on other CPUs), bfloat16, float16, float32. Stages record the resolved one.",
                    ("auto", "bfloat16", "float16", "float32"))
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N, mps.")
    attn_implementation: str | None = _f(None, "Attention kernel (sdpa, flash_attention_2, eager); None = default.")
    trust_remote_code: bool = _f(False, "Run model code from the hub. Off: only enable for repositories you trust.")


@dataclass
class RolloutConfig:
    """``rollout`` (stage 1): the student's own attempts, K per training problem."""

    data: DatasetConfig = _f(DatasetConfig(name="gsm8k", split="train"), "Training problems.")
    samples: int = _f(4, "K: responses sampled per problem.", gt(0))
    temperature: float = _f(0.8, "Sampling temperature.", ge(0))
    top_k: int = _f(50, "Top-k sampling (0 = off).", ge(0))
    top_p: float = _f(1.0, "Nucleus sampling (1.0 = off).", FRACTION)
    max_new_tokens: int = _f(8192, "Longest response, in tokens; longer ones are cut and marked truncated.", gt(0))
    batch_size: int = _f(16, "Problems whose rows are appended together as they finish (what a crash can lose); all "
                             "missing problems go to the engine in one call.", gt(0))
    budget: str = _f("waves", "How many problems `ssb run` rolls out: waves (rollout -> curate -> teach in waves "
                     "until teach.max_examples verified examples exist; the same examples whatever the wave "
                     "sizes) or all (every problem of rollout.data, then curate, then teach).", ("waves", "all"))
    first_wave: int | None = _f(None, "budget=waves: problems in the first wave (None = teach.max_examples); later "
                                "waves are sized from the yield so far.", gt(0))


@dataclass
class CurateConfig:
    """``curate`` (stage 2): per problem, one correct attempt and one incorrect one."""

    strict: bool = _f(False, "Paper grading: last \\boxed{} string equals the gold string exactly.")
    max_pairs: int | None = _f(None, "Keep at most this many pairs (in dataset order); None = all.", gt(0))


@dataclass
class TeachConfig:
    """``teach`` (stage 3): the teacher (the base model, shown the attempts) writes a verified solution."""

    context: str = _f("both", "What the teacher sees: both attempts (paper), the correct one only, or none.",
                      TEACHER_CONTEXTS)
    prompt: str = _f("guided", "Teacher instructions: guided (incorrect attempt first, correct attempt last, the "
                     "verified answer stated; chosen by teacher acceptance, see benchmarks/RESULTS.md), paper (the "
                     "authors' instructions: match the correct attempt's answer, guard against the mistake, never "
                     "mention the attempts), resolve (ssb's first prompt: study the attempts, solve from scratch).",
                     TEACHER_PROMPTS)
    temperature: float = _f(0.4, "Teacher sampling temperature.", ge(0))
    top_k: int = _f(50, "Top-k sampling (0 = off).", ge(0))
    top_p: float = _f(1.0, "Nucleus sampling (1.0 = off).", FRACTION)
    max_new_tokens: int = _f(8192, "Longest teacher reply; truncated replies are never kept.", gt(0))
    attempts: int = _f(1, "Teacher samples tried per pair until one grades correct (1 = no retry).", gt(0))
    max_examples: int = _f(256, "Stop once this many teacher-verified examples exist.", gt(0))
    batch_size: int = _f(16, "Pairs whose rows are appended together as they finish; all missing pairs go to the "
                             "engine in one call.", gt(0))


@dataclass
class DistillConfig:
    """``distill`` (stage 4): LoRA on the student, trained towards the teacher on its verified replies."""

    loss: str = _f("forward_kl", "Divergence to the teacher.", LOSSES)
    temperature: float = _f(2.0, "Softmax temperature of both distributions in the divergence.", gt(0))
    scale_t2: bool = _f(True, "Multiply the divergence by T² (Hinton et al.; the paper).")
    jsd_beta: float = _f(0.5, "β of the generalised JSD (loss=jsd only).", between(0, 1))
    kd_weight: float = _f(1.0, "Weight of the divergence term.", ge(0))
    ce_weight: float = _f(0.0, "Weight of cross-entropy on the teacher's tokens (paper: 0).", ge(0))
    average: str = _f("token", "Average the loss over all reply tokens in a batch, or per sequence first.",
                      ("token", "sequence"))
    lora_r: int = _f(32, "LoRA rank.", gt(0))
    lora_alpha: int = _f(32, "LoRA α.", gt(0))
    lora_dropout: float = _f(0.0, "LoRA dropout.", ge(0))
    target_modules: str = _f("all-linear", "LoRA targets: 'all-linear' or comma-separated module names.")
    lr: float = _f(2e-4, "Peak learning rate (AdamW).", gt(0))
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge(0))
    warmup_steps: int = _f(0, "Linear warm-up steps.", ge(0))
    schedule: str = _f("linear", "Learning-rate schedule after warm-up.", SCHEDULES)
    batch_size: int = _f(4, "Examples per optimizer step.", gt(0))
    epochs: int = _f(3, "Passes over the teacher-verified examples.", gt(0))
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (None = epochs decide).", gt(0))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", ge(0))
    chunk_size: int = _f(1024, "Reply positions per lm_head chunk in the loss (memory vs. speed).", gt(0))
    gradient_checkpointing: bool = _f(False, "Recompute student activations in backward to save memory.")
    paper_student_format: bool = _f(False, "Reproduce the authors: student prompt without the chat template "
                                    "and no end-of-turn target. Off by default.")
    teacher: str = _f("online", "Teacher signal: online (frozen base, adapter off, full vocabulary, every step) or "
                      "topk (one teacher pass before training caches its top-k log-probs at the training "
                      "temperature in distill/teacher_topk/; no teacher forward while training).", ("online", "topk"))
    topk: int = _f(64, "k of the cached top-k teacher (teacher=topk only): 388 bytes per reply token at k=64.", gt(0))
    targets: str = _f("teacher", "Training targets: the teacher's verified replies (SSB, and SFT with kd_weight=0), "
                      "the student's own correct rollouts (rollouts: rejection-sampling fine-tuning, RFT; "
                      "needs kd_weight=0, ce_weight=1; at most teach.max_examples problems), or replies the student "
                      "samples at every step, scored by the hinted teacher (on_policy: on-policy self-distillation "
                      "on the questions of teach/examples.jsonl; teacher=online only).",
                      ("teacher", "rollouts", "on_policy"))
    hint: str = _f("pair", "targets=on_policy: what the teacher sees with the question: pair (the teach stage's "
                   "hinted prompt: a correct and the most common incorrect attempt), correct (the correct attempt "
                   "only), reference (the training set's reference solution, e.g. GSM8K's worked solution).",
                   HINTS)
    samples: int = _f(1, "targets=on_policy: replies the student samples per question at every step.", gt(0))
    sample_temperature: float = _f(1.0, "targets=on_policy: the student's sampling temperature.", gt(0))
    sample_max_new_tokens: int | None = _f(None, "targets=on_policy: longest student reply (None = "
                                           "teach.max_new_tokens); a cut reply is trained on as far as it goes.",
                                           gt(0))
    mix: float = _f(0.0, "targets=on_policy: fraction of training replies that are the teacher's verified reply "
                    "(off-policy, as SSB) instead of a fresh student sample, drawn per reply and step (GKD's 1-λ).",
                    between(0, 1))
    sample_merged: bool = _f(True, "targets=on_policy: sample from a copy of the student with the adapter merged "
                             "(one matrix product per linear layer; kept across steps and rewritten in place from "
                             "the adapter before each step's sampling, so one model copy of memory) instead of "
                             "through the unmerged LoRA layers. How the work runs, not what it computes: not part "
                             "of the stage's fingerprint. In bf16 the merged weights round the delta to bf16 "
                             "(a weight moves once its delta reaches half a bf16 step, as in TRL's weight sync to "
                             "vLLM); unmerged, it is applied in fp32.")
    save_every: int = _f(100, "Checkpoint adapter + optimizer + RNG + data position every N steps (0 = never); "
                         "an interrupted distill resumes from the last checkpoint.", ge(0))
    fsdp: bool = _f(False, "Shard the frozen base model and the LoRA weights across ranks with FSDP2 "
                    "(torch.distributed.fsdp.fully_shard) for models that do not fit one GPU (torchrun with more "
                    "than one process; ignored in a single process). Same loss curve as without; teacher=online only.")
    report_to: str = _f("none", "Also log the training curve (train_log.jsonl's loss, grad norm, lr, tokens/s, "
                        "skipped steps, on-policy sampling) to this tracker, through accelerate's tracking layer: "
                        "tensorboard writes RUN_DIR/distill/tracker/ (pip install tensorboard); wandb runs offline "
                        "unless WANDB_MODE or WANDB_API_KEY is set. Not part of the stage's fingerprint.", TRACKERS)

    def check(self) -> None:
        """Rules across fields (each field's own choices or range are checked with its type, when loading)."""
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ConfigError("distill: kd_weight and ce_weight are both 0; nothing to train")
        if self.targets == "on_policy" and (self.kd_weight == 0 or self.teacher != "online"):
            raise ConfigError("distill.targets=on_policy: the student's replies are new at every step and only the "
                              "teacher scores them: it needs distill.kd_weight > 0 and distill.teacher=online")
        if self.targets == "rollouts" and self.kd_weight != 0:
            raise ConfigError("distill.targets=rollouts (RFT) trains on the student's own samples, which have no "
                              "teacher: set distill.kd_weight=0 distill.ce_weight=1")


@dataclass
class EvaluateConfig:
    """``evaluate`` (stage 5): accuracy on the benchmarks."""

    benchmarks: list[DatasetConfig] = _f(
        [DatasetConfig(name="math500"), DatasetConfig(name="aime24")], "Benchmarks (names or dataset mappings).")
    adapter: str = _f("auto", "auto: this run's distill adapter if present, else its grpo adapter, else the base model; "
                      "none: base model; or a path to a peft adapter directory.")
    samples: int = _f(1, "Responses per problem (pass@1 is their mean).", gt(0))
    temperature: float = _f(0.0, "0 = greedy.", ge(0))
    top_k: int = _f(0, "Top-k sampling (0 = off).", ge(0))
    top_p: float = _f(1.0, "Nucleus sampling (1.0 = off).", FRACTION)
    max_new_tokens: int = _f(8192, "Longest response.", gt(0))
    batch_size: int = _f(16, "Problems whose rows are appended together as they finish; all missing problems go to "
                             "the engine in one call.", gt(0))
    strict: bool = _f(False, "Also report the paper's exact-string scoring (always recorded per sample).")


@dataclass
class GrpoConfig:
    """``grpo``, the RL baseline (``ssb grpo``, not part of ``ssb run``): TRL's GRPOTrainer on the rollout problems,
    with the LoRA settings of ``distill``."""

    steps: int = _f(200, "Optimizer steps (one fresh generation batch per step: fully on-policy).", gt(0))
    batch_size: int = _f(4, "Prompts per optimizer step; each gets num_generations completions.", gt(0))
    num_generations: int = _f(8, "G: completions sampled per prompt (the group the advantage is relative to; "
                              ">= 2).", gt(0))
    micro_batch_size: int = _f(8, "Completions per forward/backward pass (memory knob; must divide "
                               "batch_size × num_generations; the rest is gradient accumulation).", gt(0))
    temperature: float = _f(0.8, "Sampling temperature (the paper's rollout setting).", ge(0))
    top_k: int = _f(50, "Top-k sampling (0 = off); rollout's default.", ge(0))
    top_p: float = _f(1.0, "Nucleus sampling (1.0 = off).", FRACTION)
    max_new_tokens: int = _f(1024, "Longest completion in tokens (TRL max_completion_length); longer ones are cut "
                             "and usually earn reward 0. GSM8K solutions of a 3B instruct model fit easily.", gt(0))
    lr: float = _f(1e-5, "Peak learning rate (AdamW). 1e-5 is TRL's 'LoRA Without Regret' GRPO recipe (LoRA needs "
                   "~10x the 1e-6 of full-FT GRPO; with α fixed the best LoRA lr is roughly rank-independent).", gt(0))
    schedule: str = _f("cosine", "Learning-rate schedule after warm-up (the recipe above uses cosine).", SCHEDULES)
    warmup_steps: int = _f(0, "Linear warm-up steps.", ge(0))
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge(0))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", ge(0))
    beta: float | None = _f(None, "KL coefficient to the base model (adapter disabled); null = no KL term and no "
                            "reference pass (TRL's default β=0, as in DAPO / Dr. GRPO; DeepSeek-R1 used 0.001).",
                            ge(0))
    loss_type: str = _f("dapo", "TRL loss aggregation: dapo (TRL default: token-mean over the whole batch, no length "
                        "bias), grpo (textbook: mean per sequence, then over sequences), dr_grpo (sum / "
                        "max_new_tokens), bnpo (token-mean per micro-batch).", ("dapo", "grpo", "dr_grpo", "bnpo"))
    scale_rewards: str = _f("group", "Advantage = (r - group mean) / std: std of the group (textbook GRPO, TRL "
                            "default), of the whole batch, or none (Dr. GRPO: mean-centred only).",
                            ("group", "batch", "none"))
    format_reward: float | None = _f(None, "Bonus added when a completion has a complete \\boxed{} answer, right or "
                                     "wrong (e.g. 0.1); null = off: the reward is correctness only (1 or 0).", ge(0))
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    logging_steps: int = _f(1, "Write a grpo/train_log.jsonl row every this many steps (TRL averages in "
                            "between).", gt(0))
    max_seconds: float | None = _f(None, "Budget: stop once this stage's device-seconds reach this (wall seconds x "
                                   "GPUs in use on GPU; plain wall seconds on CPU), counted from the start of the stage "
                                   "(model loading included) and summed over resumes; checked after each optimizer "
                                   "step, so the last step may overshoot. `steps` stays the maximum. A budget-stopped "
                                   "run does not finish a linear/cosine schedule (it is laid out over `steps`): use "
                                   "schedule=constant for budgeted runs. null = no limit.", gt(0))
    max_cpu_seconds: float | None = _f(None, "Budget: stop once this stage's CPU-seconds (the process's CPU time, "
                                       "every thread's, from the start of the stage, summed over resumes) reach "
                                       "this; checked like max_seconds. The budget unit on a CPU shared with other "
                                       "work, where wall seconds grow with the load and CPU-seconds hardly do. "
                                       "null = no limit.", gt(0))
    max_generated_tokens: int | None = _f(None, "Budget: stop once this many completion tokens have been generated "
                                          "(summed over resumes; checked after each step, like max_seconds; same "
                                          "schedule caveat). null = no limit.", gt(0))
    save_every: int = _f(50, "Checkpoint (adapter, optimizer, scheduler, RNG, budget counters) every N steps with "
                         "TRL's own machinery in grpo/.trl (0 = never); a rerun of an interrupted grpo resumes from "
                         "the last checkpoint. Not part of the stage's fingerprint.", ge(0))
    generator: str = _f("ssb", "Who samples the completions, always from the current LoRA policy: ssb (ssb's own "
                        "continuous-batching engine, as rollout/teach/evaluate use, with engine.max_batch_size, "
                        "prefill_tokens and cuda_graphs; per-step seeded, so resumes are exact), generate (TRL's "
                        "default: one padded model.generate call per step), paged (TRL's "
                        "use_transformers_continuous_batching: transformers' generate_batch with a paged KV cache; "
                        "meant for GPU, runs but is slow on CPU).", ("ssb", "generate", "paged"))
    sample_merged: bool = _f(True, "ssb generator: sample each step from a merged copy of the policy (a copy of the "
                             "base weights with the LoRA delta added, in the model's dtype; the training model is "
                             "never merged in place, where bf16 merge + unmerge would drift) instead of the LoRA "
                             "layers unmerged: one matrix product per linear layer. Costs one model copy of "
                             "memory while sampling; false samples through the adapter as before. In bf16 a "
                             "delta under half a bf16 step of its weight is rounded away: a small update (the "
                             "testbed's GRPO at lr 1e-5: 87% of the entries) is sampled nearer the base model; "
                             "benchmarks/merged_precision.py measures it for a saved adapter.")
    report_to: str = _f("none", "TRL's report_to: also log GRPO's curves (loss, reward, lr, completion length) to "
                        "this tracker; tensorboard writes RUN_DIR/grpo/tracker/. Not part of the stage's "
                        "fingerprint.", TRACKERS)


@dataclass
class EngineConfig:
    """``engine``: how rollout, teach and evaluate generate."""

    backend: str = _f("transformers", "Generation engine: the embedded transformers one (no extra dependency) or "
                      "vLLM (pip install ssb[vllm]).", ("transformers", "vllm"))
    max_batch_size: int = _f(256, "transformers: most sequences decoded at once (finished ones are refilled).", gt(0))
    prefill_tokens: int | None = _f(None, "transformers: prompt tokens (padding included) per prefill forward (None = "
                                    "16384 on a GPU, 2048 on a CPU, where big forwards are slower per token: "
                                    "benchmarks/prefill_budget.py).", gt(0))
    cuda_graphs: bool = _f(True, "transformers, CUDA only: capture the fixed-shape decode step in a CUDA graph "
                           "(false = eager steps).")
    gpu_memory_utilization: float = _f(0.9, "vllm: fraction of GPU memory vLLM may use.", FRACTION)
    tensor_parallel_size: int = _f(1, "vllm: GPUs one model is split over.", gt(0))
    max_model_len: int | None = _f(None, "vllm: longest prompt + reply (None = the model's).", gt(0))


@dataclass
class Config:
    """A whole run: the base model, the seed, where data lives, and one section per stage."""

    model: ModelConfig = _f(ModelConfig(), "The base model (teacher and student).")
    seed: int = _f(0, "Seed for sampling, curation tie-breaks, LoRA init and data order.", ge(0))
    data_dir: str | None = _f(None, "Directory with local copies of known datasets (e.g. ../shared/data), or "
                              "'builtin': the small slices shipped with ssb (only unshuffled requests with a limit "
                              "inside them); also $SSB_DATA_DIR. None -> the hub.")
    rollout: RolloutConfig = _f(RolloutConfig(), "Stage 1.")
    curate: CurateConfig = _f(CurateConfig(), "Stage 2.")
    teach: TeachConfig = _f(TeachConfig(), "Stage 3.")
    distill: DistillConfig = _f(DistillConfig(), "Stage 4.")
    evaluate: EvaluateConfig = _f(EvaluateConfig(), "Stage 5.")
    engine: EngineConfig = _f(EngineConfig(), "Generation engine (rollout, teach, evaluate).")
    grpo: GrpoConfig = _f(GrpoConfig(), "The GRPO baseline (`ssb grpo`), not part of `ssb run`.")
