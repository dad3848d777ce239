#!/usr/bin/env bash
# The GPU check, for a lent H100/H200 (at most 10 minutes, build included). Correctness before speed:
#   1. build: python3 -m pip install --no-build-isolation --no-deps -e . (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0,
#      MAX_JOBS=16), then `import aecr_ops` with its CUDA kernels;
#   2. the CUDA tests: tests/test_deform_conv_cuda.py and tests/test_fastdeconv_cuda.py first (the simple DCN path
#      and FastDeconv), then every other test marked cuda;
#   3. compute-sanitizer memcheck, racecheck, synccheck and initcheck on benchmarks/sanitizer_case.py (small
#      cases of every CUDA kernel);
#   4. the benchmark suite on CUDA (pytest benchmarks --benchmark-only --bench-device cuda, in five parts):
#      deform_conv2d at AECR-Net's shape (B16, 256 -> 256, 64 x 64, 3 x 3) in fp32, fp32 with TF32 and bf16 (both
#      DCN paths where they apply, each also deterministic) against torchvision and cuDNN conv2d, with the
#      gradient subsets and the scaling sweeps in fp32; FastDeconv's ops and training step against the original;
#      an AECR-Net training step and 1080p inference against the network on torchvision's DCN and the original.
# Each step has its own time limit (benchmarks/gpu_check.py: STEPS); they add up to less than this script's
# outer limit. $OUT/gpu_check.json is rewritten after every step (so a timeout keeps what ran before it) with
# every step's status, limit, time and summary, the benchmark results, `suite` (the suite's pytest-benchmark JSON,
# all parts, without raw timings) and `targets` (each GPU target of the performance issue: goal, measured, met).
# All step output: $OUT/gpu_check.log. Nothing else goes to $OUT.
#
#   bash benchmarks/gpu_check.sh              (OUT defaults to ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --dry-run    (no GPU needed: the same steps without the CUDA work, ~1 minute)
#   bash benchmarks/gpu_check.sh --steps build cuda_tests_simple_fastdeconv      (a subset, e.g. to rerun)
# PYTHON picks the interpreter (default: python3; for --dry-run, .venv/bin/python when it exists).
# Then copy gpu_check.json to benchmarks/results/<date>-<gpu>.json, and its `suite` to
# benchmarks/results/cuda-<gpu>/<date-time>-full.json (the run later ones are compared with), and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTER_LIMIT=590   # the device tool allows 600 s a command; gpu_check.py's step limits add up to less

dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
  esac
done

export OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT" || exit 1
export PYTHONUNBUFFERED=1 FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export CUBLAS_WORKSPACE_CONFIG=":4096:8"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi

start=$(date +%s)
rm -f "$OUT/gpu_check.json"
timeout -k 5 "$OUTER_LIMIT" "$PY" benchmarks/gpu_check.py --outer-limit "$OUTER_LIMIT" "$@"
rc=$?
if [ ! -s "$OUT/gpu_check.json" ]; then
  # The harness could not start (or was killed before its first write): say so in the JSON all the same.
  printf '{"schema_version": 2, "finished": false, "exit_code": %s, "steps": [], "targets": [],\n "error": "%s"}\n' \
    "$rc" "benchmarks/gpu_check.py exited with code $rc before writing gpu_check.json (python: $PY); see its output" \
    > "$OUT/gpu_check.json"
fi
echo "gpu_check.sh: exit code $rc after $(( $(date +%s) - start )) s; results in $OUT/gpu_check.json"
exit $rc
