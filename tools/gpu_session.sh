#!/usr/bin/env bash
# What the CUDA engine has to show, in one run of at most ~8 minutes on a GPU machine, in order of
# information per minute. Run from the repository root:
#
#     bash tools/gpu_session.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu_out
#
# Every step runs under `timeout` (its budget in seconds below) and a failed step does not stop the
# next ones, except the build. After every step the logs so far are packed into OUT_DIR, which
# holds at most four files whatever happens: steps.log (each step's exit code and seconds),
# logs.tgz (every log), bench.md and bench.csv (the benchmark). Environment: PYTHON (default
# python3), ARCH (default 9.0: the H200's sm_90, and nothing else, to build fast), BUILT=1 (the
# extension is already built in place: a rerun on a machine still warm skips the build).
#
#  step          budget  what
#  versions          20  GPU, driver, torch, CUDA, nvcc; the C++ standard the build passes
#  build            300  the extension for $ARCH only, with the test-only ops, MAX_JOBS=16
#  smoke             60  one call per GEMM (loop, tiled, grouped), printing the rule's choice and
#                        the GEMM kernel that ran
#  test_inproc      150  test_cuda's in-process tests (pytest --timeout 90 each)
#  memcheck         150  ONE compute-sanitizer memcheck process, caching allocator off, over a
#                        handful of small cases that reach all three GEMMs
#  test_rest        180  the rest of test_cuda: a process per forced GEMM, gloo ranks on one GPU
#  bench            120  world size 1 over NCCL, the four GPU anchors, few runs, 16-thread reference
set -uo pipefail
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
export py="${PYTHON:-python3}"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
started=$(date +%s)

# step NAME BUDGET COMMAND...: runs COMMAND under timeout, its output in $logs/NAME.log (and the
# last lines on the console), then packs the logs into $out.
step() {
  local name=$1 budget=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name (budget ${budget}s, at +$((t0 - started))s)"
  timeout --kill-after=10 "$budget" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  tail -15 "$logs/$name.log"
  printf '%-12s exit %3d  %4ds  (budget %ds)\n' "$name" "$rc" "$(($(date +%s) - t0))" "$budget" \
    | tee -a "$out/steps.log"
  tar czf "$out/logs.tgz" -C "$logs" .
  return "$rc"
}

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2
  grep -o -- '-std=c++[0-9]*' setup.py | sort -u
}

build() {
  TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}" MAX_JOBS=16 GMM_TESTING=1 \
    "$py" setup.py build_ext --inplace && grep -o -- '-std=c++[0-9]*' -r build/ 2>/dev/null | sort -u
}

smoke() {
  local failed=0
  for gemm in loop tiled grouped; do
    GMM_CUDA_GEMM=$gemm "$py" tests/cuda_gemm_main.py smoke || { echo "$gemm: failed"; failed=1; }
  done
  return $failed
}

export -f versions build smoke  # for `timeout bash -c NAME`

# test_cuda's tests that start processes of their own (a forced GEMM per process, gloo ranks).
SPAWNING="every_strategy or gloo_on_one_gpu or reduce_scatter_and_reduce_dtype"

: >"$out/steps.log"
step versions 20 bash -c versions
[ "${BUILT:-0}" = 1 ] || step build 300 bash -c build || { echo "the build failed: see logs.tgz"; exit 1; }
step smoke 60 bash -c smoke
step test_inproc 150 "$py" -m pytest -q -p no:cacheprovider --timeout 90 tests/test_cuda.py \
  -k "not ($SPAWNING)"
step memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --error-exitcode 9 "$py" tests/cuda_gemm_main.py memcheck
step test_rest 180 "$py" -m pytest -q -p no:cacheprovider --timeout 170 tests/test_cuda.py \
  -k "$SPAWNING"
step bench 120 "$py" -m gmm_allreduce.bench --device cuda --backend nccl --world-size 1 \
  --scenarios moe8_big moe64_ffn moe64_small moe64_tiny --methods fused grouped_mm flat_loop dense \
  --runs 10 --warmup 3 --threads 16 --markdown --csv "$out/bench.csv"
sed -n '/^|/,$p' "$logs/bench.log" >"$out/bench.md"
echo "total $(($(date +%s) - started))s" | tee -a "$out/steps.log"
