#!/usr/bin/env bash
# The GPU halves of the memory (#7) and throughput (#9) benchmarks in one
# go, sized for one 10-minute call on a single H100/H200 (a session lent a
# GPU has 15 minutes of device time in all, so one call and a rerun).
#
#   OUT=/where/results/go bash launch/gpu_checks.sh      # default: benchmarks/results
#
# Writes memory-gpu.{json,png,md}, throughput-gpu.{json,md} and
# gpu-checks.log (at most 6 files, as the device machine returns). Each step
# has its own time limit, so one that overruns does not cost the others;
# the benchmarks record a case that timed out or failed in their JSON.
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
  mem=(--sizes 16 32 --cascade-sizes 64 --width-scale 0.0625 --hr-batch 2
       --measure compiled --timeout-s 120)
  thr=(--quick --only hr_forward cascade)
else
  # Every model to 512³, MEGAN's cascade to 1024³ (the figure to beat:
  # the same peak from 64³ to 1024³ within 1 %), both measures.
  mem=(--sizes 32 64 128 256 512 --cascade-sizes 64 128 256 512 1024
       --measure both --jobs 8 --timeout-s 90 --fast-compile)
  # HR forward fp32/bf16 with achieved FLOP/s (fraction of the device's
  # peak), the cascade at 512³ and 1024³ in bf16 (goal: 512³ under 10 s).
  thr=(--only hr_forward cascade --batches 8 32 --plain-batches 8
       --cascade-sizes 512 1024 --cascade-dtype bf16 --repeats 2
       --cascade-repeats 1)
fi

echo "== memory: ${mem[*]}" | tee -a "$log"
timeout 330 python -m benchmarks.memory "${mem[@]}" --out "$out" 2>&1 \
  | tee -a "$log"
echo "== memory rc=$?" | tee -a "$log"

echo "== throughput: ${thr[*]}" | tee -a "$log"
timeout 230 python -m benchmarks.throughput "${thr[@]}" --out "$out" 2>&1 \
  | tee -a "$log"
echo "== throughput rc=$?" | tee -a "$log"
ls -l "$out" | tee -a "$log"
