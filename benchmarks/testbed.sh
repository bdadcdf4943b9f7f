#!/usr/bin/env bash
# The testbed run: `ssb compare` on Qwen2.5-Coder-0.5B-Instruct (GGUF) with the paper's settings on one GPU, plus
# the teacher-prompt variants measured on a held-out slice of GSM8K train. Everything lands in RUNS (default
# runs/testbed); a summary and a tarball of the run directories (adapters left out) land in OUT.
#
#   benchmarks/testbed.sh MODEL_DIR DATA_DIR OUT            # MODEL_DIR holds model.gguf (../shared/testbed/fetch.sh)
#   QUICK=1 benchmarks/testbed.sh ...                       # CPU dry run of the same steps with tiny limits
#   PHASES=1 ... then PHASES=2 ...                          # the two phases in separate calls (resumable)
#
# Steps run in two phases of concurrent processes on the one GPU (a 0.5B model leaves it mostly idle per process):
#   1. ssb (budgeted rollout -> curate -> teach -> distill -> evaluate) | base evaluate | held-out teacher variants
#   2. grpo at ssb's training device-seconds | sft | rft   (each finishes ssb/base first if phase 1 was cut)
# Concurrency makes every run's wall (and so GPU-) seconds longer than alone; the budget GRPO gets is SSB's, measured
# under the same sharing. Each phase has a deadline (PHASE1_S, PHASE2_S): a step cut by it is interrupted (SIGINT),
# leaves a resumable run directory, and the report shows what finished. Logs go to RUNS/logs; OUT receives only
# summary.md (report + teacher variants) and runs.tar.gz (the run directories and logs, adapters left out).
set -uo pipefail
model=${1:?usage: testbed.sh MODEL_DIR DATA_DIR OUT}; data=${2:?}; out=${3:?}
R=${RUNS:-runs/testbed}; C=configs/testbed.yaml
PHASE1_S=${PHASE1_S:-300}; PHASE2_S=${PHASE2_S:-240}; PHASES=${PHASES:-1 2}
mkdir -p "$R/logs" "$out"
common=("model.name_or_path=$model" "data_dir=$data")
heldout='rollout.data={name: gsm8k, split: train, skip: 7000, limit: 256}'
if [ -n "${QUICK:-}" ]; then  # every step of the script, in minutes on a CPU: the tiny model on arithmetic
  common+=(model.name_or_path=ssb-tiny-arith model.gguf_file=null model.device=cpu "rollout.data={name: arith, limit: 64}"
           rollout.max_new_tokens=24 rollout.batch_size=8 teach.max_new_tokens=24 teach.max_examples=8
           teach.batch_size=8 distill.epochs=1 evaluate.max_new_tokens=24 evaluate.batch_size=16
           "evaluate.benchmarks=[{name: arith, seed: 1, limit: 16}, {name: gsm8k, split: test, limit: 4}]"
           grpo.steps=4 grpo.batch_size=2 grpo.num_generations=2 grpo.micro_batch_size=4 grpo.max_new_tokens=16)
  heldout='rollout.data={name: arith, seed: 7, limit: 16}'
fi
log() { echo "[$(date -u +%T) +${SECONDS}s] $*"; }
PY=${PYTHON:-python3}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
ssb() { $PY -m ssb.cli "$@"; }
step() {  # step NAME DEADLINE_S ssb-args...: one logged, deadline-bound ssb command
  local name=$1 t=$2; shift 2
  log "start $name"
  timeout -s INT -k 20 "$t" $PY -m ssb.cli "$@" "${common[@]}" >"$R/logs/$name.log" 2>&1
  log "end $name (exit $?)"; grep -E "^(rollout|curate|teach|distill|evaluate|grpo|ssb)[: ]" "$R/logs/$name.log" | tail -8
}

log "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo cpu)"
$PY -c "import torch, transformers, peft, trl, ssb; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
log "load the model once (GGUF -> safetensors cache)"
$PY - "$C" "${common[@]}" <<'PY'
import sys, time
from ssb.config import load_config
from ssb.models import load_model, load_tokenizer
t = time.time(); cfg = load_config(sys.argv[1], sys.argv[2:])
load_tokenizer(cfg.model); load_model(cfg.model); print(f"model ready in {time.time() - t:.1f}s")
PY

if [[ " $PHASES " == *" 1 "* ]]; then
  log "phase 1: ssb | base | held-out teacher variants"; t1=$SECONDS
  step ssb "$PHASE1_S" compare --config $C --run-dir "$R" --runs ssb &
  step base "$PHASE1_S" evaluate --config $C --run-dir "$R/base" evaluate.adapter=none &
  (
    step heldout "$PHASE1_S" run --config $C --run-dir "$R/heldout" --stages rollout,curate rollout.budget=all "$heldout"
    for v in guided paper resolve; do
      mkdir -p "$R/heldout-$v"; for s in rollout curate; do ln -sfn ../heldout/$s "$R/heldout-$v/$s"; done
      step "heldout-$v" $((PHASE1_S - SECONDS + t1)) teach --config $C --run-dir "$R/heldout-$v" teach.prompt=$v \
        teach.max_examples=100000 rollout.budget=all "$heldout" &
    done; wait
  ) &
  wait
fi
if [[ " $PHASES " == *" 2 "* ]]; then
  log "phase 2: grpo (after ssb, if phase 1 left it unfinished) | sft | rft | base (if unfinished)"
  t2=$SECONDS
  (step ssb2 "$PHASE2_S" compare --config $C --run-dir "$R" --runs ssb
   step grpo $((PHASE2_S - SECONDS + t2)) compare --config $C --run-dir "$R" --runs grpo) &
  step base2 "$PHASE2_S" evaluate --config $C --run-dir "$R/base" evaluate.adapter=none &
  for r in sft rft; do step $r "$PHASE2_S" compare --config $C --run-dir "$R" --runs $r & done
  wait
fi

log "report"
present=(); for r in base ssb grpo sft rft; do [ -d "$R/$r/evaluate" ] && present+=("$R/$r"); done
ssb report "${present[@]}" --out "$R/report" --base base --focus ssb >"$R/logs/report.log" 2>&1
tail -1 "$R/logs/report.log"
$PY - "$R" >"$R/report/teacher_variants.md" <<'PY'
import json, sys, pathlib
R = pathlib.Path(sys.argv[1]); rows = ["| teacher prompt | pairs tried | accepted | acceptance | samples rejected: truncated / no answer / gave the incorrect attempt's answer |", "|---|---|---|---|---|"]
for v in ("guided", "paper", "resolve"):
    m = R / f"heldout-{v}" / "teach" / "manifest.json"
    if m.exists():
        m = json.loads(m.read_text()); f = m["funnel"]
        rows.append(f"| {v} | {f['pairs_tried']} | {f['accepted']} | {m['acceptance']:.3f} | {f['rejected_truncated']} / {f['rejected_no_answer']} / {f['rejected_gave_incorrect_attempts_answer']} |")
print("\n".join(rows))
PY
cat "$R/report/teacher_variants.md"
cat "$R/report/report.md" "$R/report/teacher_variants.md" >"$out/summary.md" 2>/dev/null
tar czf "$out/runs.tar.gz" --exclude='adapter' --exclude='checkpoint' --exclude='teacher_topk' --exclude='.trl' "$R"
log "done; $(du -h "$out/runs.tar.gz" | cut -f1) of run directories in $out/runs.tar.gz"
