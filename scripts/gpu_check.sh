#!/usr/bin/env bash
# One prepared check of every GPU claim, for the rare minutes a CUDA GPU is at hand (issue 19).
#
#   bash scripts/gpu_check.sh                 # on a machine with one CUDA GPU; <= 9 minutes
#   bash scripts/gpu_check.sh --cpu-dry-run   # the same steps at toy size on CPU (CI runs this)
#
# Writes JSON under $OUT (default: results/gpu_check, or the device tool's $OUT) after each step, so a run cut short
# keeps what it measured:
#   steps.json            every step: command, exit status, seconds (rewritten after each step)
#   bench_decode.json     AR generate vs the block sampler, eager and compiled (static cache + torch.compile):
#                         Qwen3-0.6B shape, random weights, bf16, prompt 300, 128 new tokens, block 32, 4 tokens/step,
#                         batch 1 and 16
#   bench_train_sdpa.json / bench_train_flex.json
#                         CFT step vs SFT step with sdpa and with flex attention (flex also checks its loss against sdpa)
#   bench_memory.json     peak GPU memory (torch.cuda.max_memory_allocated) of one OPD step (local teacher, default
#                         settings) and one GRPO step (likelihood_recompute, one stream per forward) at Qwen3's real
#                         vocabulary (151,936) and 32,000, completion length 128 and 512, 4 prompts x 4 generations,
#                         tiny-width models (targets: OPD at 152k <= 1.5x at 32k; GRPO at 512 <= 2x at 128)
#   pipeline_report.json  the gpu-small pipeline, trimmed to fit (fewer steps, 200 test rows), its report (the dry
#                         run writes the trimmed overrides, and tests/test_gpu_check.py checks them against the
#                         preset; the suite runs the smoke pipeline)
#
# On the GPU host (torch and transformers preinstalled, no package index) trl and datasets come from the wheels that
# ../shared/gpu/fetch-wheels.sh puts into .whl/ (carry .whl); they are installed into /tmp/site as
# ../shared/gpu/README.md says, when one is not importable. The semantic IDs and baselines need scikit-learn and scipy,
# which that set lacks: fetch them too, with
#   bash ../shared/gpu/fetch-wheels.sh scikit-learn==1.9.1 scipy==1.17.1 threadpoolctl==3.8.0 joblib==1.6.0
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; elif [[ -n "${1:-}" ]]; then
  echo "usage: bash scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2
fi
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"

if [[ $DRY == 0 ]]; then
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA GPU here; use --cpu-dry-run" >&2; exit 2; }
  if ! python3 -c "import trl, datasets, sklearn, scipy" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: trl, datasets, scikit-learn or scipy is missing and .whl/ is empty (run, where pip works: bash ../shared/gpu/fetch-wheels.sh scikit-learn==1.9.1 scipy==1.17.1 threadpoolctl==3.8.0 joblib==1.6.0)" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
  DEVICE=cuda DTYPE=bfloat16 SHAPE=qwen3-0.6b PROMPT=300 NEW=128 BATCHES="1 16" REPEATS=3 COMPILE=true
  TRAIN_BATCH=8 TRAIN_PROMPT=300 TRAIN_COMPLETION=200 STEP_LIMIT=240
  MEMORY_CASES=opd:32000:128,opd:151936:128,grpo:151936:128,grpo:151936:512
else
  DEVICE=cpu DTYPE=float32 SHAPE=tiny PROMPT=16 NEW=16 BATCHES="1 2" REPEATS=1 COMPILE=false
  TRAIN_BATCH=2 TRAIN_PROMPT=8 TRAIN_COMPLETION=8 STEP_LIMIT=600
  MEMORY_CASES=opd:600:8,grpo:600:8
fi
OVERRIDES="$OUT/pipeline_overrides.yaml"
cat > "$OVERRIDES" <<'YAML'
# gpu-small trimmed to fit the check's budget: fewer steps everywhere, 200 test rows
ar_mid: {mid_max_steps: 300}
ar_sft: {sft_max_steps: 100}
ar_rl: {rl_max_steps: 2}
cft: {max_steps: 60}
opd: {max_steps: 4}
rl: {max_steps: 2}
evaluate: {limit: 200}
decode: {limit: 8}
YAML
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

STEPS_JSON="$OUT/steps.json"
echo "[]" > "$STEPS_JSON"
record() {  # name, exit status, seconds, command: appended to steps.json (rewritten whole, atomically)
  python3 - "$STEPS_JSON" "$1" "$2" "$3" "$4" "$DRY" <<'PY'
import json, os, sys
path, name, rc, seconds, command, dry = sys.argv[1:]
steps = json.load(open(path))
steps.append({"step": name, "exit_status": int(rc), "seconds": float(seconds), "command": command,
              "cpu_dry_run": dry == "1"})
tmp = path + ".tmp"
json.dump(steps, open(tmp, "w"), indent=2)
os.replace(tmp, path)
PY
}
FAILED=0
step() {  # name, then the diffgr2 arguments
  local name=$1; shift
  local t0=$SECONDS
  echo "== gpu_check: $name" >&2
  timeout "$STEP_LIMIT" python3 -c "import sys; from diffgr2_trl.cli import console_main; sys.exit(console_main(sys.argv[1:]))" "$@"
  local rc=$?
  record "$name" "$rc" "$((SECONDS - t0))" "diffgr2 $*"
  [[ $rc == 0 ]] || FAILED=1
}

# shellcheck disable=SC2086  # BATCHES is a list
step bench_decode bench-decode --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch_sizes $BATCHES \
  --block_sizes 32 --tokens_per_step 4 --taus 0.9 --prompt_len "$PROMPT" --new_tokens "$NEW" --repeats "$REPEATS" \
  --compile "$COMPILE" --json "$OUT/bench_decode.json"
step bench_train_sdpa bench-train --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch_size "$TRAIN_BATCH" \
  --prompt_len "$TRAIN_PROMPT" --completion_len "$TRAIN_COMPLETION" --block_size 32 --repeats "$REPEATS" \
  --attn_implementation sdpa --json "$OUT/bench_train_sdpa.json"
if [[ $DRY == 0 ]]; then  # torch has no flex-attention backward on CPU
  step bench_train_flex bench-train --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch_size "$TRAIN_BATCH" \
    --prompt_len "$TRAIN_PROMPT" --completion_len "$TRAIN_COMPLETION" --block_size 32 --repeats "$REPEATS" \
    --attn_implementation flex_attention --json "$OUT/bench_train_flex.json"
fi
step bench_memory bench-memory --cases "$MEMORY_CASES" --grpo_config '{"likelihood_recompute": true, "max_streams_per_forward": 1}' \
  --timeout 200 --json "$OUT/bench_memory.json"
if [[ $DRY == 0 ]]; then
  step pipeline pipeline --preset gpu-small --output_dir "$OUT/pipeline" --overrides "$OVERRIDES"
  [[ -f "$OUT/pipeline/report.json" ]] && cp "$OUT/pipeline/report.json" "$OUT/pipeline_report.json"
fi  # the dry run leaves the trimmed overrides for its test, which checks them against the preset in-process
    # (a process of its own only to import the trainer configs cost 12 s of the suite)
exit $FAILED
