#!/usr/bin/env bash
# Table-1 comparison (MEGAN vs patch-wise GAN, small GAN + upsampling, NLM,
# input) on your BRATS volumes, T1 -> T2, with the paper's brain config
# (ngf 64, LR 64 + 2 HR scales, 155x240x240). Needs a GPU for sensible times.
#
# Usage: launch/table1_brats.sh DATA_DIR [STEPS] [extra table1.py args]
#   DATA_DIR/train/target/*.nii.gz  T2 volumes of the training subjects
#   DATA_DIR/test/source/*.nii.gz   T1 volumes of the test subjects
#   DATA_DIR/test/target/*.nii.gz   their T2 volumes (same file names)
#   DATA_DIR/test/mask/*.nii.gz     optional brain masks (metrics inside)
# Results: benchmarks/results/table1-brats_t1t2.{json,md,png}; runs under
# runs/table1-brats_t1t2/. The comparison runs without tumour masks on the
# sketch (no baseline could use them).
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
exec python "$(dirname "$0")/table1.py" --data "$data" --task brats_t1t2 \
  --config brats_t2 --config.edges.use_label=False --steps "$steps" "$@"
