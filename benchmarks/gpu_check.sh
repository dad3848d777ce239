#!/usr/bin/env bash
# The GPU check (a lent H100/H200): build with the CUDA kernels, run the CUDA tests (both DCN paths),
# compute-sanitizer memcheck on a small case of every kernel, benchmark the AECR-Net DCN shape (B16, 256->256,
# 64x64, 3x3) in fp32, TF32 and bf16 (simple and implicit-GEMM paths, each also deterministic) against
# torchvision and cuDNN conv2d, a FastDeconv training step against the original algorithm, and an AECR-Net
# training step (batch 16, 240x240, L1 + CR; fp32, TF32, bf16 autocast) and 1080p inference against the same
# network built from torchvision's deform_conv2d and the original FastDeconv.
# Results: $OUT/gpu_check.json (+ logs), with `targets`: each GPU target of the performance issue, met or not.
# About 6 minutes; at most 8.
#
#   bash benchmarks/gpu_check.sh          (OUT defaults to ./gpu_check_out)
# Then copy gpu_check.json to benchmarks/results/<date>-<gpu>.json and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export CUBLAS_WORKSPACE_CONFIG=":4096:8"
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
start=$(date +%s)
if ! timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED after $(( $(date +%s) - start ))s"
  exit 1
fi
echo "build: $(( $(date +%s) - start ))s"
timeout 420 "$PY" benchmarks/gpu_check.py
echo "total: $(( $(date +%s) - start ))s"
