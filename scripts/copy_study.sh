#!/usr/bin/env bash
# The copy-learning lever study (results/copy_learning.md): one bench-copy run per variant, one at a time, same seed,
# same held-out lists. Usage: bash scripts/copy_study.sh PREPARED_DIR OUT_DIR [VARIANT ...]
# Time it on a quiet machine: nothing else running (the load average at each start is recorded in curve.json).
set -euo pipefail
prepared=${1:?usage: copy_study.sh PREPARED_DIR OUT_DIR [VARIANT ...]}
out=${2:?usage: copy_study.sh PREPARED_DIR OUT_DIR [VARIANT ...]}
shift 2
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(baseline id_line id_line_front constant_lr)
# EVAL_STEPS: a held-out evaluation (64 greedy decodes) costs ~30-60 s on 2 cores, so 200 keeps runs short
common=(--dataset_name "$prepared" --shape mini --threads 2 --batch_size 32 --max_steps 1300 --eval_steps "${EVAL_STEPS:-200}"
        --eval_lists 64 --stop_at_exact 0.97 --seed 0)
PRESET_MIX=front=0.3,repeat=0.05,drop=0.1,next=0.05,rerank=0.5
for v in "${variants[@]}"; do
  case $v in
    baseline)      extra=() ;;                                        # (a) today's prompt and task mix
    id_line)       extra=(--id_line) ;;                               # (b) + the ID line
    id_line_front) extra=(--id_line --mix front=0.7,repeat=0.1,drop=0.1,next=0.1) ;;  # (b) + more front lists
    constant_lr)   extra=(--id_line --schedule constant) ;;           # (e) no decay
    wide)          extra=(--id_line --shape small) ;;                 # (e) shape: 4x the compute per token
    batch64)       extra=(--id_line --batch_size 64 --max_steps 650 --eval_steps 50 --learning_rate 0.004) ;;  # (e)
    # The cpu preset's mid-training mix (half re-ranking rows), judged on 64 held-out re-ranking rows of the valid
    # split (bare lists stop tracking re-ranking validity once re-ranking rows are in the mix), 28,800 lists each:
    rerank50_s900) extra=(--id_line --mix $PRESET_MIX --max_steps 900 --eval_steps 300 --eval_rerank_rows 64) ;;
    rerank80_s900) extra=(--id_line --mix front=0.1,drop=0.05,next=0.05,rerank=0.8 --max_steps 900 --eval_steps 300
                          --eval_rerank_rows 64) ;;                   # more full-prompt rows
    rerank50_b16)  extra=(--id_line --mix $PRESET_MIX --batch_size 16 --max_steps 1800 --eval_steps 600
                          --eval_rerank_rows 64) ;;                   # (e) twice the updates on the same lists
    rerank50_b8)   extra=(--id_line --mix $PRESET_MIX --batch_size 8 --max_steps 3600 --eval_steps 1200
                          --eval_rerank_rows 64) ;;                   # (e) four times the updates
    rerank50_b16_lr6e-3) extra=(--id_line --mix $PRESET_MIX --batch_size 16 --max_steps 1800 --eval_steps 600
                          --learning_rate 0.006 --eval_rerank_rows 64) ;;  # (e) and twice the learning rate
    curriculum_s900) extra=(--id_line --mix front=0.55,repeat=0.1,drop=0.15,next=0.1,rerank=0.1
                          --mix_end front=0.15,drop=0.1,rerank=0.75 --max_steps 900 --eval_steps 300
                          --eval_rerank_rows 64) ;;                   # (c) lists first, re-ranking rows last
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  echo "== $v (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  diffgr2 bench-copy "${common[@]}" "${extra[@]}" --output_dir "$out/$v" --label "$v"
done
