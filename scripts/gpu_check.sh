#!/usr/bin/env bash
# gpu_check.sh - the one command that verifies the CUDA backend on a machine with an NVIDIA GPU
# (docs/cuda.md). Built for the lent H100/H200 machines (16 cores, CUDA 13, no network), it:
#   1. configures and builds with -DBNORM_CUDA=ON (NCCL and cuDNN from the CUDA prefix, or from the
#      Python wheels nvidia-nccl-cu13 / nvidia-cudnn-cu13 when the prefix lacks them),
#   2. runs every CUDA test (each compares the GPU with the CPU backend on the same inputs),
#   3. runs compute-sanitizer memcheck and racecheck on a small subset,
#   4. runs the benchmark against cuDNN and the D2D copy (and PyTorch's CUDA batch norm when torch
#      with CUDA is there),
# writing everything under $OUT (default ./gpu-check-out): gpu_check.log (all output), build.log,
# tests.log, sanitizer.log, cuda_bench.md (the table), cuda_bench.csv, torch_cuda.csv (7 files). Each step has a time
# limit; the whole should take about 4-5 minutes. Exit status: 0 only if every test and sanitizer
# run passed. Usage: bash scripts/gpu_check.sh   (device tool: run with command "bash scripts/gpu_check.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s) =="; }
fail=0
export PATH=/usr/local/cuda/bin:$PATH

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"
nvcc --version | tail -2
cmake --version | head -1
nproc

# A package's folder in the Python wheels (nvidia.cudnn, nvidia.nccl), if any.
wheel_dir() {
  python3 - "$1" <<'PY' 2>/dev/null
import importlib.util, sys
s = importlib.util.find_spec("nvidia." + sys.argv[1])
print(list(s.submodule_search_locations)[0])
PY
}
args=(-DCMAKE_BUILD_TYPE=Release -DBNORM_CUDA=ON -DBNORM_STATE_IO=OFF -DBNORM_BUILD_EXAMPLES=OFF)
if [ -f /usr/local/cuda/include/nccl.h ]; then
  args+=(-DBNORM_NCCL=ON)
elif d=$(wheel_dir nccl) && [ -f "$d/include/nccl.h" ]; then
  lib=$(ls "$d"/lib/libnccl.so* | head -1)
  args+=(-DBNORM_NCCL=ON -DNCCL_INCLUDE_DIR="$d/include" -DNCCL_LIBRARY="$lib")
  export LD_LIBRARY_PATH="$d/lib:${LD_LIBRARY_PATH:-}"
else
  echo "NCCL not found: test_cuda_nccl is not built"
fi
if [ ! -f /usr/local/cuda/include/cudnn.h ] && d=$(wheel_dir cudnn) && [ -f "$d/include/cudnn.h" ]; then
  lib=$(ls "$d"/lib/libcudnn.so* | head -1)
  args+=(-DCUDNN_INCLUDE_DIR="$d/include" -DCUDNN_LIBRARY="$lib")
  export LD_LIBRARY_PATH="$d/lib:${LD_LIBRARY_PATH:-}"
fi

step "configure and build (build-gpu/)"
{
  timeout 120 cmake -S . -B build-gpu "${args[@]}" ||
    { echo "configure failed; retrying without OpenMP"; timeout 120 cmake -S . -B build-gpu "${args[@]}" -DBNORM_OPENMP=OFF; }
} > "$OUT/build.log" 2>&1
targets=(test_cuda test_cuda_sync bnorm_cuda_bench)
grep -q "BNORM_NCCL:BOOL=ON" build-gpu/CMakeCache.txt 2>/dev/null && targets+=(test_cuda_nccl)
if ! timeout 420 cmake --build build-gpu -j"$(nproc)" --target "${targets[@]}" >> "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED:"; tail -40 "$OUT/build.log"; exit 1
fi
grep -E "warning|bnorm_cuda_bench:|bnorm_nccl:" "$OUT/build.log" | head -20

step "CUDA tests (each compares with the CPU backend)"
(cd build-gpu && timeout 300 ctest -L cuda --output-on-failure) > "$OUT/tests.log" 2>&1 || fail=1
cat "$OUT/tests.log"
# on a GPU machine a skipped CUDA test is a failure (no usable device, driver mismatch)
if grep -q "(Skipped)" "$OUT/tests.log"; then echo "CUDA tests were SKIPPED: the GPU was not usable"; fail=1; fi
grep -h "passed, .* failed" build-gpu/Testing/Temporary/LastTest.log 2>/dev/null

step "compute-sanitizer (small subset)"
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$san" ]; then
  for tool in memcheck racecheck; do
    echo "-- $tool test_cuda (2 random cases per dtype + the fixed ones)"
    BNORM_TEST_CUDA_CASES=2 timeout 200 "$san" --tool $tool --error-exitcode 9 build-gpu/tests/test_cuda \
      >> "$OUT/sanitizer.log" 2>&1; rc=$?
    echo "   exit $rc"; [ $rc -eq 0 ] || fail=1
  done
  echo "-- memcheck test_cuda_sync"
  timeout 120 "$san" --tool memcheck --error-exitcode 9 build-gpu/tests/test_cuda_sync >> "$OUT/sanitizer.log" 2>&1
  rc=$?; echo "   exit $rc"; [ $rc -eq 0 ] || fail=1
  grep -E "ERROR SUMMARY|========= (Invalid|Race|Error)" "$OUT/sanitizer.log" | sort | uniq -c | head -20
else
  echo "compute-sanitizer not found"; fail=1
fi

step "benchmark (bnorm vs cuDNN vs D2D copy)"
timeout 240 build-gpu/bench/bnorm_cuda_bench --out "$OUT/cuda_bench" || echo "benchmark exit $?"
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  step "PyTorch CUDA batch norm"
  PYTHONUNBUFFERED=1 timeout 150 python3 bench/torch_cuda_bench.py --out "$OUT/torch_cuda.csv" || echo "torch bench exit $?"
else
  echo "no torch with CUDA: PyTorch comparison skipped"
fi

step "summary"
[ -f "$OUT/cuda_bench.md" ] && head -40 "$OUT/cuda_bench.md"
if [ $fail -eq 0 ]; then echo "GPU CHECK PASSED"; else echo "GPU CHECK FAILED (see above and $OUT)"; fi
echo "total $(( $(date +%s) - start )) s"
exit $fail
