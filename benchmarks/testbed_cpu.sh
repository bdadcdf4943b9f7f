#!/usr/bin/env bash
# The CPU testbed comparison (configs/testbed-cpu.yaml: base, SSB, GRPO at SSB's cost, SFT, RFT, on-policy), which
# takes more than one working session on a few cores: run it, save its small files into the repository after each
# finished step, and restore them on a fresh machine to continue instead of redoing.
#
#   bash benchmarks/testbed_cpu.sh run     [RUN_DIR [KEY=VALUE ...]]  # ssb compare, every run; rerun to continue
#   bash benchmarks/testbed_cpu.sh save    [RUN_DIR] [DEST]   # RUN_DIR's small files -> DEST (to commit)
#   bash benchmarks/testbed_cpu.sh restore [DEST] [RUN_DIR]   # DEST -> RUN_DIR, ready for `run`
#   bash benchmarks/testbed_cpu.sh report  [RUN_DIR] [OUT]    # the report of every evaluated run -> OUT
#
# Defaults: RUN_DIR=runs/testbed-cpu, DEST=benchmarks/testbed-cpu-2026-12-02, the model in ./testbed
# (../shared/testbed/fetch.sh testbed; MODEL=DIR elsewhere: a GGUF model is fingerprinted by its content, so the
# restored stages are accepted wherever the same file lies) and RUNS=base,ssb,grpo,sft,rft,onpolicy.
# What is saved: everything but weights (adapters, training checkpoints, GRPO's TRL checkpoints, the top-k teacher
# cache), lock and temp files; JSONL over 1 MB gzipped (restore unpacks them byte for byte, as the manifests'
# sha256 expect). A distill whose adapter was not kept is rerun by the evaluation that needs it (seeded and
# deterministic: it prints whether its train_log.jsonl reproduces the saved loss curve).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:?usage: testbed_cpu.sh run|save|restore ...}
case "$cmd" in
  run)
    run=${2:-runs/testbed-cpu}; shift $(( $# > 1 ? 2 : 1 ))
    ssb compare --config configs/testbed-cpu.yaml --run-dir "$run" --runs "${RUNS:-base,ssb,grpo,sft,rft,onpolicy}" \
      model.name_or_path="${MODEL:-testbed}" "$@" ;;
  save)
    run=${2:-runs/testbed-cpu}; dest=${3:-benchmarks/testbed-cpu-2026-12-02}
    rm -rf "$dest" && mkdir -p "$dest"
    tar -C "$run" -cf - --exclude=adapter --exclude=.adapter.tmp --exclude=checkpoint --exclude='checkpoint-*' \
        --exclude=teacher_topk --exclude='*.safetensors' --exclude='.lock' --exclude='*.tmp*' . | tar -C "$dest" -xf -
    find "$dest" -name '*.jsonl' -size +1M -exec gzip -n -9 {} +
    du -sh "$dest" ;;
  restore)
    dest=${2:-benchmarks/testbed-cpu-2026-12-02}; run=${3:-runs/testbed-cpu}
    mkdir -p "$run"
    tar -C "$dest" -cf - . | tar -C "$run" -xf -
    find "$run" -name '*.jsonl.gz' -exec gunzip -f {} +
    echo "restored $dest -> $run; continue with: bash benchmarks/testbed_cpu.sh run $run" ;;
  report)
    # every run of RUN_DIR evaluated on the GSM8K test, and SSB's variant chosen on held-out GSM8K train (KD at T=1,
    # evaluated on the test set once; from benchmarks/testbed-cpu-heldout/var-t1, its held-out evaluation left out)
    run=${2:-runs/testbed-cpu}; out=${3:-benchmarks/testbed-cpu-report}
    held=benchmarks/testbed-cpu-heldout/var-t1; var=runs/var-t1
    rm -rf "$var" && mkdir -p "$var/evaluate"
    cp -r "$held/config.yaml" "$held/distill" "$var/" && cp -r "$held/evaluate/gsm8k_test" "$var/evaluate/"
    find "$var" -name '*.jsonl.gz' -exec gunzip -f {} +
    dirs=(); labels=()
    for r in base base-rerun ssb ssb-t1 grpo sft rft onpolicy; do
      d=$run/$r; [ "$r" = ssb-t1 ] && d=$var
      if [ -f "$d/evaluate/gsm8k_test/metrics.json" ]; then dirs+=("$d"); labels+=("$r"); fi
    done
    ssb report "${dirs[@]}" --out "$out" --labels "$(IFS=,; echo "${labels[*]}")" --base base --focus ssb ;;
  *) echo "testbed_cpu.sh: unknown command $cmd (run, save, restore, report)" >&2; exit 2 ;;
esac
