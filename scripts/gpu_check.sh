#!/usr/bin/env bash
# The GPU figures of the training and scoring benchmarks in ONE prepared command, for a session
# that is lent a GPU machine for a few minutes (no Ray, Spark or deltalake needed there: the
# benchmarks import only torch, transformers, numpy and causalrec.models / causalrec.train).
#
#   bash scripts/gpu_check.sh            # on the GPU machine; ~6-8 minutes in all
#
# Each step has its own time limit, so one slow compile cannot eat the rest; a step that fails
# or runs out says so and the next one runs. JSON goes to $OUT (the device tool's folder) or
# bench_results/gpu_check/, with a log; copy the figures into bench_results/ and the README.
# Steps, best recorded setting first (H100: MFU 22.2%, 193k pairs/s), then what is untried:
#   1. scoring pairs/s (MF, two-tower, cross-encoder compiled, bf16, seq 64, batch 16384)
#   2. cross-encoder training MFU, compiled, no dropout, batch 8192, memory-efficient SDPA first
#   3. the same with Inductor's max-autotune (Triton GEMM templates with fused epilogues)
#   4. scoring with max-autotune
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${OUT:-bench_results/gpu_check}"
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
LOG="$DIR/gpu_check.log"

step() {  # step SECONDS LABEL COMMAND...
  local secs=$1 label=$2
  shift 2
  echo "== $label (limit ${secs}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $label: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name(0))"; } 2>&1 | tee -a "$LOG"

step 150 "1 scoring, compiled" "$PY" scripts/bench_score.py --device cuda --random-init --dtype bf16 --no-io \
  --no-tokenize --compile --text-batch 16384 --seconds 4 --out "$DIR/bench_score.json"
step 150 "2 training, compiled" "$PY" scripts/bench_train.py --device cuda --random-init --models cross_encoder \
  --compile --no-dropout --batch 8192 --steps 30 --key cuda_compiled_nodropout_b8192 --out "$DIR/bench_train.json"
step 200 "3 training, max-autotune" "$PY" scripts/bench_train.py --device cuda --random-init --models cross_encoder \
  --compile --compile-mode max-autotune-no-cudagraphs --no-dropout --batch 8192 --steps 30 \
  --key cuda_compiled_maxautotune_nodropout_b8192 --out "$DIR/bench_train.json"
step 120 "4 scoring, max-autotune" "$PY" scripts/bench_score.py --device cuda --random-init --dtype bf16 --no-io \
  --no-tokenize --compile --compile-mode max-autotune-no-cudagraphs --models cross_encoder --text-batch 16384 \
  --seconds 4 --out "$DIR/bench_score_maxautotune.json"
echo "results in $DIR" | tee -a "$LOG"
