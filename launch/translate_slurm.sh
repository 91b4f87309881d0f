#!/bin/bash
# Translates a volume with a trained megan_jax run on several GPU nodes.
#
#   sbatch launch/translate_slurm.sh RUN IN.nii.gz OUT.nii.gz [megan translate options]
#   sbatch launch/translate_slurm.sh RUN @inputs.txt OUTDIR/ [--skip-existing ...]
#
# The second form translates every volume listed in inputs.txt (one path per
# line) into OUTDIR under its own name, compiling once.
#
# One process (SLURM task) per GPU. jax.distributed reads everything from
# SLURM's environment: the coordinator (the first node, on a port derived from
# the job id), the number of processes (SLURM_NTASKS), this process's rank
# (SLURM_PROCID) and its GPU (SLURM_LOCALID). The patches of every HR scale are
# split over all GPUs of all nodes; process 0 writes OUT, and the resume folder
# beside it (.OUT.partial): sbatch the same command again after a kill or a
# time-out and it continues where it stopped.
#
# Every node must read RUN and IN at the same paths (a shared file system),
# and the same files: every process checks that its checkpoints and its
# input's voxels are those of the others, and the job stops with an error if
# not. Put OUT on the shared file system too. A task that fails (bad input,
# a full disk) exits at once and srun's --kill-on-bad-exit ends the others;
# scancel sends SIGKILL after the KillWait (XLA takes SIGTERM as a
# preemption notice and goes on).
#
# EDIT the #SBATCH lines for your cluster: nodes, GPUs per node (tasks per node
# = GPUs per node), CPUs, time, and your partition/account.
#SBATCH --job-name=megan-translate
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=megan-translate-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-account

set -euo pipefail
usage="usage: sbatch $0 RUN IN.nii.gz OUT.nii.gz [megan translate options]"
case "${1:-}" in
  -h|--help) echo "$usage"; exit 0 ;;
esac
if [ $# -lt 3 ]; then
  echo "$usage" >&2
  exit 2
fi
RUN=$1 IN=$2 OUT=$3
shift 3

# EDIT: make megan_jax and a CUDA build of jax importable, e.g.
# module load cuda/12
# source "$HOME/venvs/megan/bin/activate"

# Each task sees every GPU of its node and takes GPU number SLURM_LOCALID.
# EDIT if your site hands each task only its own GPU (CUDA_VISIBLE_DEVICES
# holds one id, e.g. with --gpus-per-task=1): then that GPU is number 0.
# export JAX_LOCAL_DEVICE_IDS=0
# EDIT for one task per node instead (--ntasks-per-node=1), using all GPUs:
# export JAX_LOCAL_DEVICE_IDS=0,1,2,3

# Joins the job (megan_jax.sharding.initialize_distributed detects SLURM),
# then runs `megan translate` in every task: the same arguments everywhere.
# --cpus-per-task again: Slurm 22.05 to 23.02 do not pass it from sbatch to
# srun, which would leave each task one CPU for its host-side work (edges,
# stitching).
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  megan --distributed translate \
  --workdir "$RUN" -i "$IN" -o "$OUT" --quiet "$@"
