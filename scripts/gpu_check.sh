#!/usr/bin/env bash
# The whole GPU check in one call of under 8 minutes (docs/benchmarks.md, "GPU"):
#   1. B0 at 224 px and 2. B4 at 380 px: training images/s, ours (bfloat16; a cold and a warm
#      process, so compile and cache-load times too) against PyTorch AMP bfloat16 channels-last;
#   3. B7 at 600 px: the largest batch whose training step runs, ours against PyTorch's;
#   4. B0 at 224 px in float16 with dynamic loss scaling against PyTorch AMP float16 with its
#      GradScaler (GPUs without bfloat16: V100, T4);
#   5. B7 compile time with and without the scanned blocks, if time is left.
# Each part has its own time limit and writes its rows to $OUT (or ./gpu_check_out), so a part
# that runs out of time costs only itself; the last lines are a summary.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh          # needs python3 with jax[cuda], flax, optax,
#                                                   # torch and timm or efficientnet_pytorch
# Only the model and the training step are imported: no TensorFlow, tfds, clu or ml_collections.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-460}  # all parts together
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Let JAX's allocator grow to almost the whole GPU, as PyTorch's does, for the largest batch.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
start=$(date +%s)

part() {  # part NAME CAP_SECONDS ARGS...: one benchmark run, cut at min(CAP, what is left)
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - start)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped (${left}s of the budget left)"
    return
  fi
  echo "== $name (limit ${limit}s): scripts/benchmark_train.py $*"
  local t0=$(date +%s)
  timeout "$limit" "$PY" scripts/benchmark_train.py "$@" --json >"$OUT/$name.json" \
    2>"$OUT/$name.log"
  local rc=$?
  echo "   rc=$rc after $(($(date +%s) - t0))s; stderr tail:"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import sys, jax, flax, optax, torch; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__, jax.devices())'
} 2>&1 | tee "$OUT/environment.txt"

part b0_224 100 --model b0 --resolution 224 --batch 256 --dtype bfloat16 --steps 10 --torch
part b4_380 130 --model b4 --resolution 380 --batch 64 --dtype bfloat16 --steps 10 --torch
part b7_600_max_batch 200 --model b7 --resolution 600 --batch 16 --dtype bfloat16 --steps 3 \
  --max-batch --torch
part b0_224_fp16 60 --model b0 --resolution 224 --batch 256 --dtype float16 --steps 10 --torch \
  --cache-dir "$(mktemp -d)"
part b7_600_compile 120 --model b7 --resolution 600 --batch 8 --dtype bfloat16 --steps 2 \
  --scan-blocks both --cache-dir "$(mktemp -d)"

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, sys
print('== summary (rows from', sys.argv[1] + ')')
keys = ('framework', 'model', 'resolution', 'batch', 'cache', 'scan_blocks', 'memory_format',
        'train_img_s', 'ours_speedup', 'max_batch', 'failed_batch', 'time_to_first_step_s',
        'trace_s', 'compile_s', 'peak_mem_gib', 'source')
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):
    text = open(path).read()
    try:
        rows = json.loads(text[text.index('['):])
    except ValueError:
        print(os.path.basename(path), ': no rows (cut or failed; see the .log)')
        continue
    for r in rows:
        print(os.path.basename(path)[:-5], ' '.join(
            f'{k}={r[k]:.3g}' if isinstance(r[k], float) else f'{k}={r[k]}'
            for k in keys if k in r))
EOF
echo "total $(($(date +%s) - start))s"
