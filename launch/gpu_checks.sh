#!/usr/bin/env bash
# The GPU halves of the memory (#7) and throughput (#9) benchmarks in one
# go, sized for one 10-minute call on a single H100/H200 (a session lent a
# GPU has 15 minutes of device time in all, so one call and a rerun).
#
#   OUT=/where/results/go bash launch/gpu_checks.sh      # default: benchmarks/results
#
# Writes memory-gpu.{json,png,md}, throughput-gpu.{json,md} and
# gpu-checks.log (at most 6 files, as the device machine returns). Each step
# (memory compiled, memory peak, throughput) has its own time limit, so one
# that overruns does not cost the others; the benchmarks record a case that
# timed out or failed in their JSON.
# Smoke-test on a CPU with GPU_CHECKS_QUICK=1 (tiny sizes, same commands).
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/gpu-checks.log"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
quick=${GPU_CHECKS_QUICK:-0}

python - <<'EOF' 2>&1 | tee "$log"
import jax
print("jax", jax.__version__, jax.default_backend(), jax.devices())
EOF

if [ "$quick" = 1 ]; then
  sizes=(--sizes 16 32 --cascade-sizes 64 --width-scale 0.0625 --hr-batch 2)
  peak_models=(--models megan_hr_step pix2pix)
  thr=(--quick --only hr_forward cascade edges)
else
  # Every model to 512³, MEGAN's cascade to 1024³ (the figure to beat:
  # the same peak from 64³ to 1024³ within 1 %).
  sizes=(--sizes 32 64 128 256 512 --cascade-sizes 64 128 256 512 1024)
  peak_models=()
  # HR forward fp32/bf16 with achieved FLOP/s (fraction of the device's
  # peak), the cascade at 512³ and 1024³ in bf16 (goal: 512³ under 10 s)
  # with the patch batch picked from the device memory (the GPU default,
  # --cascade-batch auto; at most infer.AUTO_MAX_BATCH["gpu"]), and the
  # edge sketch's engines (jax on the GPU, numpy on the host's threads) at
  # 256³ and 512³, last (the JSON is written after each section).
  thr=(--only hr_forward cascade edges --batches 8 32 --plain-batches 8
       --cascade-sizes 512 1024 --cascade-dtype bf16 --repeats 2
       --cascade-repeats 1 --edge-sizes 256 512)
fi

# The memory suite writes its JSON after every finished case, so a step cut
# short by its limit keeps what it measured (meta.complete says so).
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== $name rc=$?" | tee -a "$log"
}
step 150 "memory compiled" python -m benchmarks.memory "${sizes[@]}" \
  --measure compiled --fast-compile --jobs 8 --timeout-s 120 --out "$out"
step 200 "memory peak" python -m benchmarks.memory "${sizes[@]}" \
  "${peak_models[@]}" --measure peak --timeout-s 60 --merge --out "$out"
step 220 "throughput" python -m benchmarks.throughput "${thr[@]}" --out "$out"
ls -l "$out" | tee -a "$log"
