#!/usr/bin/env bash
# The GPU halves of the memory (#7) and throughput (#9) benchmarks in one
# go, sized for one 10-minute call on a single H100/H200 (a session lent a
# GPU has 15 minutes of device time in all, so one call and a rerun).
#
#   OUT=/where/results/go bash launch/gpu_checks.sh      # default: runs/gpu-checks
#
# Writes memory-gpu.{json,png,md}, throughput-gpu.{json,md},
# profile-gpu.{json,md} and gpu-checks.log (8 files: the most the device
# machine returns); commit them with the card in the name where another
# card's are there (session 18: *-gpu-h100.*, beside the H200's *-gpu.*). On this
# workplace's device machine put the image's python first on the PATH
# (PATH=/opt/torch/.venv/bin:$PATH; a symlink to it loses its venv) and
# carry nibabel and ml-collections as wheels (launch/README.md). The
# benchmarks record a case that timed out or failed in their JSON.
# Smoke-test on a CPU with GPU_CHECKS_QUICK=1 (tiny sizes, same commands).
# GPU_CHECKS_STEPS picks steps (default "1 2 3 4"; e.g. "2 3" for a
# second, memory-only call), the last one picked taking the budget's rest;
# GPU_CHECKS_CASE_S: step 3's limit per baseline case (default 100 s).
# Exit status: 0 when every step picked ran to its end or its time limit,
# 1 when one failed otherwise (the log says which), 2 for bad settings.
set -uo pipefail
# The steps' time budget counts from here, the setup checks included.
SECONDS=0
if [ $# -gt 0 ]; then
  case "$1" in
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_checks.sh: $1: takes no arguments (its settings are" \
            "environment variables; --help)" >&2; exit 2 ;;
  esac
fi
bad() { echo "gpu_checks.sh: $*" >&2; exit 2; }
budget=${GPU_CHECKS_BUDGET_S:-570}
case_s=${GPU_CHECKS_CASE_S:-100}
for v in "GPU_CHECKS_BUDGET_S=$budget" "GPU_CHECKS_CASE_S=$case_s"; do
  [[ ${v#*=} =~ ^[0-9]+$ ]] && [ "${v#*=}" -gt 0 ] \
    || bad "$v: a whole number of seconds > 0"
done
steps=" ${GPU_CHECKS_STEPS:-1 2 3 4} "
for n in $steps; do
  [[ $n =~ ^[1-5]$ ]] || bad "GPU_CHECKS_STEPS=\"$(echo $steps)\": steps are 1-5"
done
[ -n "$(echo $steps)" ] || bad "GPU_CHECKS_STEPS is empty: no step to run"
t_end=$((SECONDS + budget))
out=${OUT:-runs/gpu-checks}
[ ! -e "$out" ] || [ -d "$out" ] || bad "OUT=$out: exists and is not a folder"
if [ "$(realpath -m "$out")" = "$(realpath -m benchmarks/results)" ]; then
  # Several cards' committed results are there under their own names; the
  # benchmarks would merge into (or refuse) the plain-named H200 ones.
  bad "OUT=$out: must be another folder (several cards' committed results" \
      "are there; this card's are copied into OUT first: commit them back" \
      "with the card in the name)"
fi
mkdir -p "$out" || bad "OUT=$out: cannot be made"
log="$out/gpu-checks.log"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
quick=${GPU_CHECKS_QUICK:-0}

# Everything the steps import, first: a wrong python costs seconds, not
# the steps' limits (session 15's first two calls).
if ! python -c "import jax, flax, optax, nibabel, ml_collections, megan_jax" \
    2>&1 | tee "$log"; then
  echo "gpu_checks.sh: this python cannot import the steps' packages" \
       "($(command -v python)); see launch/README.md" | tee -a "$log" >&2
  exit 3
fi
python - <<'EOF' 2>&1 | tee -a "$log"
import importlib.metadata as md, platform, jax
print("python", platform.python_version(), "|", ", ".join(
    f"{n} {md.version(n)}" for n in ("jax", "jaxlib", "flax", "optax",
                                     "orbax-checkpoint", "numpy")))
print("jax", jax.__version__, jax.default_backend(), jax.devices())
EOF

# Both benchmarks add to the committed GPU results of this kind of device
# (benchmarks/results/{memory,throughput}-gpu.json: session 15's H200;
# {memory,throughput}-gpu-h100.json: session 18's H100; copied into $OUT
# under the plain name): the memory suite runs only what they lack
# (--merge --only-missing), so sessions' runs under a time limit add up;
# the throughput benchmark replaces the sections it runs (the cascade's
# rows it runs again) and keeps the others. Only results of the same kind
# of device are added to (both benchmarks refuse another's), and a file
# already in $OUT is kept.
if [ "$quick" != 1 ]; then
  python -m benchmarks.same_card benchmarks/results memory-gpu \
      throughput-gpu | while read -r name f; do
    [ -e "$out/$name.json" ] || cp "$f" "$out/$name.json"
  done
fi

# Steps in order of what the open goals need most, each with its own time
# limit (seconds), so one that overruns does not cost the others; all of
# them within GPU_CHECKS_BUDGET_S (default 570, for a 595-s call), the last
# step picked taking what the others left:
#  1. throughput: the bf16 cascade at 1024³ first (#9's last GPU size: cut
#     by the step's limit in sessions 15 and 18, when it came last; timed
#     once, --cascade-budget-s), then 512³ (8.85 s on an H100 in session
#     18: the < 10 s goal met) as the same run's baseline, again with impl
#     fast-blocked (the two skinny convs as convs over blocks, see step 4)
#     and with the sparse edge transfer (1.46 s against 2.05 for the 512³
#     sketch on the H100, not yet timed in the cascade); the patch batch
#     picked from the device memory (the GPU default --cascade-batch auto);
#     each case is saved as it finishes, the cases share their random
#     weights, and --merge keeps the committed rows not run again.
#  2. memory, compiled: every model to 512³, the cascade to 1024³, every
#     model's smallest sizes first; only what the card's file lacks (on
#     the H100 mostly from 256³: PGGAN from 128³, the LR step and the
#     cascade from 512³; the H200's file has none); XLA's autotuning off
#     (--no-autotune: with it on, 8 parallel compiles took 10-80 s a case
#     at 64³-128³ on the H100; rows marked).
#  3. memory, measured peak of the baselines from 128³ (the H200's file has
#     them from 32³; compiled covers the small sizes), smallest sizes
#     first, until each runs out of memory or time (GPU_CHECKS_CASE_S a
#     case, default 100); autotuning off (their 256³ peaks, autotuned, did
#     not compile and run in 45 s on the H100; the compile's own high-water
#     mark is recorded beside each peak).
#  4. op_profile: where the bf16 forward's time goes on the device (session
#     18, H100: the 7³ conv to 1 channel took 58 % of it, at 1 % of the
#     peak), impl fast against fast-blocked (that conv over 4³ blocks, a 3³
#     conv 4096 -> 64 channels; the first conv, on 2 channels, over 2³),
#     and the edge sketch's phases at 512³ per engine.
#  5. (not run by default: both cards' files have them, flat) memory,
#     measured peak of MEGAN: the cascade at 64³ and 1024³, its training
#     steps at 32³ and 512³; only what the file lacks.
# (The HR forward against PyTorch, `--only hr_forward`, ran on both cards
# in sessions 15 and 18; it is no longer a step.)
if [ "$quick" = 1 ]; then
  mem=(--width-scale 0.0625 --hr-batch 2)
  compiled=(--sizes 16 32 --cascade-sizes 64)
  megan_peak=(--models megan_cascade megan_hr_step --sizes 16 32
              --cascade-sizes 64)
  peak=(--models pix2pix --sizes 16 32)
  thr_cascade=(--quick --cascade-sizes 64 --cascade-blocked-sizes 64
               --cascade-sparse-edges-sizes 64)
  profile=(--quick --impl fast fast-blocked)
else
  mem=()
  compiled=(--sizes 32 64 128 256 512 --cascade-sizes 64 128 256 512 1024)
  megan_peak=(--models megan_cascade megan_lr_step megan_hr_step
              --sizes 32 512 --cascade-sizes 64 1024)
  peak=(--models dcgan pix2pix pggan --sizes 128 256 512)
  thr_cascade=(--cascade-sizes 1024 512 --cascade-blocked-sizes 512
               --cascade-sparse-edges-sizes 512 --cascade-dtype bf16
               --cascade-repeats 2 --cascade-budget-s 60)
  profile=(--batch 32 --edge-size 512 --repeats 2 --impl fast fast-blocked)
fi

# The benchmarks write their JSON as cases finish, so a step cut short by
# its limit keeps what it measured (memory: meta.complete says so).
last_step=$(echo $steps | tr ' ' '\n' | sort -n | tail -1)
failed=()
step() {  # step N SECONDS|rest NAME COMMAND...: at most what the budget left
  local n=$1 limit=$2 name=$3 left=$((t_end - SECONDS))
  shift 3
  if [ "${steps/ $n /}" = "$steps" ]; then
    echo "== $name: not picked (GPU_CHECKS_STEPS=$(echo $steps))" \
      | tee -a "$log"
    return
  fi
  if [ "$n" = "$last_step" ]; then limit=rest; fi
  if [ "$limit" = rest ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, $left s left of the $budget s budget" \
      | tee -a "$log"
    return
  fi
  echo "== $name ($limit s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name rc=$rc ($((t_end - SECONDS)) s left)" | tee -a "$log"
  # 124: cut by its limit (what it measured is saved); others: it failed.
  if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then failed+=("$name (rc $rc)"); fi
}
step 1 240 "throughput: cascade" python -m benchmarks.throughput \
  --only cascade "${thr_cascade[@]}" --merge --out "$out"
step 2 100 "memory compiled" python -m benchmarks.memory ${mem[@]+"${mem[@]}"} \
  "${compiled[@]}" --measure compiled --fast-compile --no-autotune --jobs 8 \
  --timeout-s 90 --order size --merge --only-missing --out "$out"
step 3 135 "memory peak: baselines" python -m benchmarks.memory \
  ${mem[@]+"${mem[@]}"} "${peak[@]}" --measure peak --no-autotune \
  --timeout-s "$case_s" --order size --merge --only-missing --out "$out"
step 4 75 "op profile" python -m benchmarks.op_profile "${profile[@]}" \
  --out "$out"
step 5 45 "memory peak: MEGAN" python -m benchmarks.memory \
  ${mem[@]+"${mem[@]}"} "${megan_peak[@]}" --measure peak --timeout-s 30 \
  --merge --only-missing --out "$out"
ls -l "$out" | tee -a "$log"
if [ ${#failed[@]} -gt 0 ]; then
  printf '== failed: %s\n' "${failed[@]}" | tee -a "$log" >&2
  exit 1
fi
