#!/usr/bin/env bash
# GPU benchmarks for one H200 (or any single GPU), in under 8 minutes:
#   1. matmul: the device's measured bf16 matmul peak                      (45 s limit)
#   2. train:  MFU of the LLaDA-8B-shape train step on 4 of the 32 layers,  (190 s limit)
#              full width, seq 4096, bf16 compute / fp32 master weights
#   3. sample: sampler tokens/s at LLaDA-8B shapes, random bf16 weights    (190 s limit)
# Each stage runs in its own process under a time limit, so one failure or overrun does not cost the
# others; results go to $OUT (or bench/results/gpu): matmul.json, train.json, sample.json, gpu.log,
# nvidia-smi.txt, summary.txt.
#
#   bash bench/gpu.sh                 # on the GPU machine, from the repository root
#   bash bench/gpu.sh --tiny          # tiny shapes on whatever backend is there (CPU: a check of the script)
#   LLADA_BENCH_TINY=1 bash bench/gpu.sh
#
# Needs: jax with CUDA (jax[cuda12]), flax, optax, ml_collections (the project's requirements). Uses
# $PYTHON if set, else python3.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
TINY=""
if [[ "${1:-}" == "--tiny" || "${LLADA_BENCH_TINY:-0}" == "1" ]]; then TINY="--tiny"; fi
LOG="$OUT_DIR/gpu.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
start=$(date +%s)

{
  echo "llada-jax GPU benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') ${TINY}"
  (nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi")
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
} | tee "$LOG"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

run_stage() {  # name, time limit (s), arguments...
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" bench/gpu_bench.py "$name" --out "$OUT_DIR" $TINY "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "{\"what\": \"$name\", \"error\": \"timed out after ${limit}s\"}" > "$OUT_DIR/$name.timeout.json"
  fi
}

run_stage matmul 45
run_stage train 190 --layers 4 --length 4096 --batch 4 --steps 8
run_stage sample 190 --batches 1 8 --prompt 128 --gen 256 --block 32 --steps 128 --reps 1

{
  echo "=== summary ($(( $(date +%s) - start )) s in all)"
  grep -h -E "^(matmul|train|sample):" "$LOG" || echo "no results (see gpu.log)"
} | tee "$OUT_DIR/summary.txt"
