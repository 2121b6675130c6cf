#!/usr/bin/env bash
# GPU check (issue #7): images/s of the full-size ADM-64 (fp16 + fp32 classifier, guided, batch 64) and
# DDPM CIFAR-10 (fp32, ddim, batch 256) networks with random weights, DDIM vs PFDiff at NFE 4 and 10,
# Inception feature images/s, sampler overhead/memory on the device; issue #20: the fast-path sweep
# (precision, attention, batch) also over NCSN++ (ScoreSDE CIFAR-10) and the SD-1.5 UNet (CFG, skipped
# without diffusers), FLOPs, TFLOP/s, fraction of peak, and the projected hours of each paper table.
# No network, no checkpoint.
# Under 8 minutes on one H100 (internal budget 420 s, hard timeout 470 s).
#
#   scripts/gpu_check.sh                       # JSON -> $OUT or benchmarks/results/gpu_check.json
#   OUT=$OUT/gpu_check.json scripts/gpu_check.sh
#   scripts/gpu_check.sh --smoke               # CPU self-test, < 1 min on quiet cores (small architectures)
#   PYTHON=python3 scripts/gpu_check.sh        # interpreter (default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then PY="$(command -v python3 || command -v python)"; fi
TARGET="${OUT:-benchmarks/results/gpu_check.json}"
case "$TARGET" in *.json) ;; *) TARGET="$TARGET/gpu_check.json" ;; esac  # OUT may name a folder
mkdir -p "$(dirname "$TARGET")"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$PY" -m benchmarks.gpu_check --out "$TARGET" "$@"
