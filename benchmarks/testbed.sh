#!/usr/bin/env bash
# The testbed run: `ssb compare` on Qwen2.5-Coder-0.5B-Instruct (GGUF) with the paper's settings on one GPU, plus
# the teacher-prompt variants measured on a held-out slice of GSM8K train (never a test set).
#
#   benchmarks/testbed.sh MODEL_DIR DATA_DIR OUT     # MODEL_DIR holds model.gguf (../shared/testbed/fetch.sh)
#   QUICK=1 benchmarks/testbed.sh ...                # the same steps on a CPU in minutes, with the tiny model
#
# Runs go to RUNS (default runs/testbed), logs to RUNS/logs; OUT receives summary.md (report + teacher variants)
# and runs.tar.gz (run directories and logs; adapters left out). The runs are concurrent processes on the one GPU
# (a 0.5B model leaves it mostly idle per process), each started as soon as what it needs exists:
#   ssb (budgeted rollout -> curate -> teach -> distill -> evaluate) | base | held-out teacher variants
#   after ssb's teach: sft, rft, onpolicy      after ssb's distill: grpo, given ssb's training device-seconds
# The held-out teacher-prompt variants (measured on 2026-11-30, benchmarks/RESULTS.md) run only with HELDOUT=1.
# Concurrency lengthens every run's wall (so GPU-) seconds; GRPO's budget is SSB's, measured under the same
# sharing. `ssb compare` runs its runs one after another and holds the lock of every run directory it reads, so
# the concurrent steps here are its pieces: `ssb compare --runs ssb`, then for each ablation SSB's finished upstream
# stages copied (not linked: a link would lock R/ssb, which the SSB step holds) and `ssb run --stages
# distill,evaluate` with the ablation's overrides (ssb.compare.OVERRIDES), and `ssb grpo` with
# ssb.compare.grpo_overrides, then `ssb evaluate`; `ssb report` at the end. Everything stops by DEADLINE_S after the start (SIGINT: a cut step leaves a resumable run directory,
# rerunning this script continues it), then the report is written from what finished.
set -uo pipefail
model=${1:?usage: testbed.sh MODEL_DIR DATA_DIR OUT}; data=${2:?}; out=${3:?}
R=${RUNS:-runs/testbed}; C=configs/testbed.yaml
deadline=$((SECONDS + ${DEADLINE_S:-540}))
mkdir -p "$R/logs" "$out"
common=("model.name_or_path=$model" "data_dir=$data")
heldout='rollout.data={name: gsm8k, split: train, skip: 7000, limit: 256}'
if [ -n "${QUICK:-}" ]; then  # every step of the script, in minutes on a CPU: the tiny model on arithmetic
  common+=(model.name_or_path=ssb-tiny-arith model.gguf_file=null model.device=cpu
           rollout.max_new_tokens=24 rollout.batch_size=8 teach.max_new_tokens=24 teach.batch_size=8 distill.epochs=1
           evaluate.max_new_tokens=24 evaluate.batch_size=16
           "evaluate.benchmarks=[{name: arith, seed: 1, limit: 16}, {name: gsm8k, split: test, limit: 4}]"
           grpo.steps=4 grpo.batch_size=2 grpo.num_generations=2 grpo.micro_batch_size=4 grpo.max_new_tokens=16)
  train=("rollout.data={name: arith, limit: 64}" teach.max_examples=8)
  heldout='rollout.data={name: arith, seed: 7, limit: 16}'
else
  train=()
fi
PY=${PYTHON:-python3}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
log() { echo "[$(date -u +%T) +${SECONDS}s] $*"; }
left() { echo $((deadline - SECONDS)); }
step() {  # step NAME ssb-args...: one logged ssb command, interrupted at the deadline
  local name=$1; shift
  log "start $name ($(left)s left)"
  timeout -s INT -k 15 "$(left)" $PY -m ssb.cli "$@" "${common[@]}" >"$R/logs/$name.log" 2>&1
  log "end $name (exit $?)"; grep -E "^(rollout|curate|teach|distill|evaluate|grpo|ssb)[: ]" "$R/logs/$name.log" | tail -6
}
after() {  # after FILE: wait until an upstream stage has finished (or the deadline is near)
  while [ ! -f "$1" ]; do [ "$(left)" -gt 30 ] || return 1; sleep 2; done
}
compare_args() {  # compare_args FUNCTION [RUN]: override lines from ssb.compare (OVERRIDES[RUN], grpo_overrides)
  $PY - "$1" "${2:-}" "$C" "$R/ssb" "${common[@]}" "${train[@]}" <<'PY'
import sys
from ssb import compare
from ssb.configio import load_config
fn, run, config, ssb_dir, *over = sys.argv[1:]
print("\n".join(compare.OVERRIDES[run] if fn == "OVERRIDES" else compare.grpo_overrides(load_config(config, over), ssb_dir)))
PY
}
ablation() {  # ablation RUN: SSB's finished upstream stages copied into R/RUN, then distill + evaluate
  local r=$1 s over
  mkdir -p "$R/$r"
  for s in ${UPSTREAM[$r]}; do [ -d "$R/$r/$s" ] || cp -r "$R/ssb/$s" "$R/$r/$s"; done
  mapfile -t over < <(compare_args OVERRIDES "$r")
  step "$r" run --config $C --run-dir "$R/$r" --stages distill,evaluate "${train[@]}" "${over[@]}"
}
declare -A UPSTREAM=([sft]="rollout curate teach" [rft]="rollout curate" [onpolicy]="rollout curate teach")

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo cpu)"
$PY -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
log "load the model once (GGUF -> safetensors cache)"
$PY - "$C" "${common[@]}" <<'PY'
import sys, time
from ssb.configio import load_config
from ssb.models import load_model, load_tokenizer
t = time.time(); cfg = load_config(sys.argv[1], sys.argv[2:])
load_tokenizer(cfg.model); load_model(cfg.model); print(f"model ready in {time.time() - t:.1f}s")
PY

step ssb compare --config $C --run-dir "$R" --runs ssb "${train[@]}" &
step base evaluate --config $C --run-dir "$R/base" evaluate.adapter=none &
for r in sft rft onpolicy; do
  (after "$R/ssb/teach/manifest.json" && ablation $r) &
done
(after "$R/ssb/distill/manifest.json" && mapfile -t over < <(compare_args grpo_overrides) \
  && step grpo grpo --config $C --run-dir "$R/grpo" "${train[@]}" "${over[@]}" \
  && step grpo-eval evaluate --config $C --run-dir "$R/grpo" "${train[@]}" "${over[@]}") &
[ "${HELDOUT:-0}" = 1 ] && (
  step heldout run --config $C --run-dir "$R/heldout" --stages rollout,curate rollout.budget=all "$heldout"
  for v in guided paper resolve; do
    mkdir -p "$R/heldout-$v"; for s in rollout curate; do [ -d "$R/heldout-$v/$s" ] || cp -r "$R/heldout/$s" "$R/heldout-$v/$s"; done
    step "heldout-$v" teach --config $C --run-dir "$R/heldout-$v" teach.prompt=$v teach.max_examples=100000 \
      rollout.budget=all "$heldout" &
  done; wait
) &
wait

log "report"
present=(); for r in base ssb grpo sft rft onpolicy; do [ -d "$R/$r/evaluate" ] && present+=("$R/$r"); done
$PY -m ssb.cli report "${present[@]}" --out "$R/report" --base base --focus ssb >"$R/logs/report.log" 2>&1
tail -1 "$R/logs/report.log"
$PY - "$R" >"$R/report/teacher_variants.md" <<'PY'
import json, sys, pathlib
R = pathlib.Path(sys.argv[1])
rows = ["| teacher prompt (held-out GSM8K train) | pairs tried | accepted | acceptance | rejected samples: truncated / "
        "no answer / gave the incorrect attempt's answer |", "|---|---|---|---|---|"]
for v in ("guided", "paper", "resolve"):
    m = R / f"heldout-{v}" / "teach" / "manifest.json"
    if m.exists():
        m = json.loads(m.read_text()); f = m["funnel"]
        rows.append(f"| {v} | {f['pairs_tried']} | {f['accepted']} | {m['acceptance']:.3f} | {f['rejected_truncated']} / "
                    f"{f['rejected_no_answer']} / {f['rejected_gave_incorrect_attempts_answer']} |")
print("\n".join(rows))
PY
cat "$R/report/teacher_variants.md"
cat "$R/report/report.md" "$R/report/teacher_variants.md" >"$out/summary.md" 2>/dev/null
tar czf "$out/runs.tar.gz" --exclude='adapter' --exclude='checkpoint' --exclude='teacher_topk' --exclude='.trl' "$R"
log "done; $(du -h "$out/runs.tar.gz" | cut -f1) of run directories in $out/runs.tar.gz"
