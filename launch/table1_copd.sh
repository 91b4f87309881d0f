#!/usr/bin/env bash
# Table-1 comparison on your COPD thorax CTs, sharp kernel -> soft kernel
# (e.g. B80f -> B20f), with the paper's CT config (ngf 64, HU window
# -1024..1024, LR 64 + 3 HR scales, ~512^3). Needs a GPU for sensible times.
#
# Usage: launch/table1_copd.sh DATA_DIR [STEPS] [extra table1.py args]
#   DATA_DIR/train/target/*.nii.gz  soft-kernel (B20f) CTs of the training subjects
#   DATA_DIR/test/source/*.nii.gz   sharp-kernel (B80f or B50f) CTs of the test subjects
#   DATA_DIR/test/target/*.nii.gz   their B20f CTs (same file names)
#   DATA_DIR/test/mask/*.nii.gz     optional body/lung masks (metrics inside)
# Metrics are computed on each target's [min, max] mapped to [0, 1] (every
# prediction mapped the same way, then clipped to [0, 1]).
# Results: benchmarks/results/table1-copd_kernel.{json,md,png}.
set -euo pipefail
usage="usage: $0 DATA_DIR [STEPS] [extra table1.py args]"
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  ""|-*) echo "$usage" >&2; exit 2 ;;
esac
data=$1
shift
steps=20000
if [[ ${1:-} =~ ^[0-9]+$ ]]; then  # STEPS is optional before extra args
  steps=$1
  shift
fi
exec python "$(dirname "$0")/table1.py" --data "$data" --task copd_kernel \
  --config copd_ct --steps "$steps" "$@"
