#!/usr/bin/env bash
# Everything the CUDA engine still has to show, in one run on a GPU machine (written without a GPU
# and never run yet: it logs each step's start time in steps.log, to size it). Run from the
# repository root:
#
#     bash tools/gpu_session.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu_out
#
# It builds the extension against the machine's CUDA torch (for its GPU's arch), runs
# tests/test_cuda.py, runs compute-sanitizer (memcheck on the three GEMM strategies, initcheck and
# racecheck on the tiled kernel), and benchmarks the GPU scenarios at world
# size 1 over NCCL (the op next to torch._grouped_mm, the per-group loop and a dense mm; then the
# op under each forced strategy, to calibrate the rule in csrc/gemm/choice.h) and at world sizes
# 2 and 4 over gloo with a comm_turn sweep. Logs, CSVs and Markdown tables land in OUT_DIR.
set -uo pipefail
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
py="${PYTHON:-python}"
step() { echo "== $* ($(date +%T))" | tee -a "$out/steps.log"; }

step "device and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
"$py" -c "import torch; print(torch.__version__, torch.version.cuda)" | tee -a "$out/device.txt"

step "build"
GMM_TESTING=1 MAX_JOBS=16 "$py" -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }

step "tests/test_cuda.py"
"$py" -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log" | tail -30

step "compute-sanitizer: memcheck on every strategy, initcheck and racecheck on the tiled kernel"
if command -v compute-sanitizer >/dev/null; then
  for run in memcheck:loop memcheck:tiled memcheck:grouped initcheck:tiled racecheck:tiled; do
    tool=${run%%:*} s=${run##*:}
    GMM_CUDA_GEMM=$s compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$py" tests/cuda_gemm_main.py >"$out/${tool}_$s.log" 2>&1
    echo "$tool $s: exit $?" | tee -a "$out/steps.log"
  done
else
  echo "no compute-sanitizer on PATH" | tee -a "$out/steps.log"
fi

bench() { "$py" -m gmm_allreduce.bench --device cuda --markdown --runs 50 --warmup 5 "$@"; }

step "GPU scenarios, world size 1, NCCL: the op and the library baselines"
bench --backend nccl --world-size 1 --methods fused flat_loop grouped_mm mm_loop dense \
  --csv "$out/gpu_w1.csv" >"$out/gpu_w1.md" 2>"$out/gpu_w1.err"
tail -25 "$out/gpu_w1.md"

for s in loop tiled grouped; do
  step "world size 1, GMM_CUDA_GEMM=$s"
  GMM_CUDA_GEMM=$s bench --backend nccl --world-size 1 --methods fused \
    --csv "$out/gpu_w1_$s.csv" >"$out/gpu_w1_$s.md" 2>"$out/gpu_w1_$s.err"
  tail -8 "$out/gpu_w1_$s.md"
done

for w in 2 4; do
  step "world size $w on the one GPU over gloo, comm_turn sweep"
  bench --backend gloo --world-size "$w" --comm-turns 0 1 2 4 8 --runs 20 \
    --scenarios moe8_big moe64_ffn moe64_small \
    --csv "$out/gpu_w$w.csv" >"$out/gpu_w$w.md" 2>"$out/gpu_w$w.err"
  tail -20 "$out/gpu_w$w.md"
done
step "done"
