#!/usr/bin/env bash
# The GPU halves of the memory (#7) and throughput (#9) benchmarks in one
# go, sized for one 10-minute call on a single H100/H200 (a session lent a
# GPU has 15 minutes of device time in all, so one call and a rerun).
#
#   OUT=/where/results/go bash launch/gpu_checks.sh      # default: benchmarks/results
#
# Writes memory-gpu.{json,png,md}, throughput-gpu.{json,md} and
# gpu-checks.log (at most 6 files, as the device machine returns). The
# benchmarks record a case that timed out or failed in their JSON.
# Smoke-test on a CPU with GPU_CHECKS_QUICK=1 (tiny sizes, same commands).
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/gpu-checks.log"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
quick=${GPU_CHECKS_QUICK:-0}

python - <<'EOF' 2>&1 | tee "$log"
import importlib.metadata as md, platform, jax
print("python", platform.python_version(), "|", ", ".join(
    f"{n} {md.version(n)}" for n in ("jax", "jaxlib", "flax", "optax",
                                     "orbax-checkpoint", "numpy")))
print("jax", jax.__version__, jax.default_backend(), jax.devices())
EOF

# Steps in order of what the open goals need most, each with its own time
# limit (seconds; sum 560), so one that overruns does not cost the others:
#  1. throughput: HR forward fp32/bf16 with achieved FLOP/s (fraction of the
#     device's peak) and the bf16 cascade at 512³ (goal: under 10 s) then
#     1024³, the patch batch picked from the device memory (the GPU default
#     --cascade-batch auto); each cascade size is saved as it finishes.
#  2. memory, compiled: every model to 512³, the cascade to 1024³.
#  3. memory, measured peak of MEGAN: the cascade at 64³, 256³ and 1024³
#     (the figure to beat: the same peak within 1 %), its steps at two sizes.
#  4. memory, measured peak of the baselines, smallest sizes first, until
#     each runs out of memory or the step's time does.
#  5. throughput --merge: the edge sketch's engines (jax on the GPU, numpy on
#     the host's threads) at 256³ and 512³.
if [ "$quick" = 1 ]; then
  mem=(--width-scale 0.0625 --hr-batch 2)
  compiled=(--sizes 16 32 --cascade-sizes 64)
  peak_megan=(--models megan_cascade megan_hr_step --sizes 16
              --cascade-sizes 64)
  peak_base=(--models pix2pix --sizes 16 32)
  thr=(--quick --batches 1 --plain-batches 1 --cascade-sizes 64)
  thr_edges=(--quick --edge-sizes 48)
else
  mem=()
  compiled=(--sizes 32 64 128 256 512 --cascade-sizes 64 128 256 512 1024)
  peak_megan=(--models megan_cascade megan_lr_step megan_hr_step
              --sizes 32 512 --cascade-sizes 64 256 1024)
  peak_base=(--models dcgan pix2pix pggan --sizes 32 64 128 256 512
             --order size)
  thr=(--batches 8 32 --plain-batches 8 --repeats 2 --cascade-sizes 512 1024
       --cascade-dtype bf16 --cascade-repeats 2)
  thr_edges=(--edge-sizes 256 512 --repeats 2)
fi

# The benchmarks write their JSON as cases finish, so a step cut short by
# its limit keeps what it measured (memory: meta.complete says so).
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name ($limit s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== $name rc=${PIPESTATUS[0]}" | tee -a "$log"
}
step 160 "throughput: forward, cascade" python -m benchmarks.throughput \
  --only hr_forward cascade "${thr[@]}" --out "$out"
step 130 "memory compiled" python -m benchmarks.memory "${mem[@]}" \
  "${compiled[@]}" --measure compiled --fast-compile --jobs 8 --timeout-s 120 \
  --out "$out"
step 90 "memory peak: MEGAN" python -m benchmarks.memory "${mem[@]}" \
  "${peak_megan[@]}" --measure peak --timeout-s 60 --merge --out "$out"
step 120 "memory peak: baselines" python -m benchmarks.memory "${mem[@]}" \
  "${peak_base[@]}" --measure peak --timeout-s 60 --merge --out "$out"
step 60 "throughput: edges" python -m benchmarks.throughput --only edges \
  "${thr_edges[@]}" --merge --out "$out"
ls -l "$out" | tee -a "$log"
