#!/usr/bin/env bash
# `alignlab bench --gpu` on a GPU machine where AlignLab is not installed (torch, timm, numpy,
# pyyaml and pyarrow are enough; no Ray, no MLflow, no network). Run from the repository root:
#
#   OUT=/some/dir bash experiments/gpu_check.sh [--peak-tflops X]
#
# It maps the repository's platform/ and models/ onto alignlab.* through symlinks (as
# pyproject.toml's package-dir does), prints the GPU and torch versions, and runs the bench under
# a 420 s timeout. Figures: $OUT/bench_gpu.json (rewritten after every row, so a timeout keeps
# what was measured); log: $OUT/bench_gpu.log.
set -uo pipefail
OUT="${OUT:-.}"
mkdir -p "$OUT"
LOG="$OUT/bench_gpu.log"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKG=/tmp/alignlab_pkg
rm -rf "$PKG"
mkdir -p "$PKG/alignlab"
ln -s "$ROOT/platform" "$PKG/alignlab/platform"
ln -s "$ROOT/models" "$PKG/alignlab/models"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
} 2>&1 | tee "$LOG"
timeout 420 python3 -m alignlab.platform.bench --gpu --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu_check: stopped by the 420 s timeout; $OUT/bench_gpu.json holds the rows measured" | tee -a "$LOG"
exit "$status"
