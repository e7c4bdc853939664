#!/usr/bin/env bash
# test.sh - the one command that builds bnorm and runs every test (README: "Run the tests").
#   1. installs missing Debian packages (apt-get, as root),
#   2. builds the library with MPI and runs the whole ctest suite (unit, PyTorch fixtures and the CNN
#      inference example, MPI with real processes, state I/O and its fuzzer, demo and docs/demo.md's
#      numbers, the installed package's consumers, the README's example and commands, benchmark smoke),
#   3. installs the Python package (python/) with pip and runs its pytest suite (numpy and torch modules
#      against PyTorch, SyncBatchNorm over gloo and mpirun + mpi4py), then the torch tests again with
#      an ASan + UBSan build of the native backward node (scripts/asan_autograd.sh),
#   4. rebuilds with AddressSanitizer + UndefinedBehaviorSanitizer and runs the suite again,
#   5. rebuilds the embedding tests with ThreadSanitizer (OpenMP off: libgomp is not instrumented, so
#      the threads are a caller's pthread pool) and runs them,
#   6. builds the CUDA backend's kernels and tests on its CPU emulation and runs them; where nvcc
#      exists, builds the real CUDA backend too and runs its tests (they skip without a GPU),
#   7. runs the core tests under valgrind.
# Build trees: build/, build-asan/, build-tsan/, build-emu/, build-cuda/ (reused when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh test
jobs=$(nproc)

echo "== build (Release, MPI on) =="
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBNORM_MPI=ON >/dev/null
cmake --build build -j"$jobs" >/dev/null
echo "== tests =="
(cd build && ctest --output-on-failure -j1)

echo "== Python package: install (pip, no download) and pytest =="
# The documented install (README, docs/python.md); as a non-root user it installs with --user instead.
pip_where=(--break-system-packages)
[ "$(id -u)" = 0 ] || pip_where=(--user --break-system-packages)
BNORM_BUILD_JOBS="$jobs" /usr/bin/python3 -m pip install -q --no-build-isolation "${pip_where[@]}" ./python
# libtorch-dev and pybind11-dev are installed above, so bnorm.torch's native backward node must be built
(cd python/tests && BNORM_REQUIRE_NATIVE=1 /usr/bin/python3 -m pytest -q -p no:cacheprovider .)
echo "== Python: bnorm.torch's native backward node under ASan + UBSan =="
bash scripts/asan_autograd.sh

echo "== build (ASan + UBSan) =="
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DBNORM_SANITIZE=ON -DBNORM_MPI=ON -DBNORM_BUILD_BENCH=OFF >/dev/null
cmake --build build-asan -j"$jobs" >/dev/null
echo "== tests under ASan + UBSan =="
# OpenMPI's own allocations are reported as leaks by LeakSanitizer; leaks are checked by valgrind below.
(cd build-asan && ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j1 -E "fuzz|interop_regen|fixtures_regen")

echo "== build (ThreadSanitizer, OpenMP off) =="
cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBNORM_SANITIZE_THREAD=ON -DBNORM_OPENMP=OFF \
  -DBNORM_BUILD_EXAMPLES=OFF -DBNORM_BUILD_BENCH=OFF >/dev/null
cmake --build build-tsan -j"$jobs" --target test_embed >/dev/null
echo "== tests under ThreadSanitizer =="
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" build-tsan/tests/test_embed

echo "== CUDA backend: its kernels and tests on the CPU emulation of CUDA =="
cmake -S . -B build-emu -DCMAKE_BUILD_TYPE=Release -DBNORM_CUDA_EMULATE=ON -DBNORM_BUILD_EXAMPLES=OFF \
  -DBNORM_BUILD_BENCH=OFF >/dev/null
cmake --build build-emu -j"$jobs" --target test_cuda_emu test_cuda_sync_emu >/dev/null
(cd build-emu && ctest --output-on-failure -L cuda_emu)
nvcc_bin=$(command -v nvcc || true)
[ -n "$nvcc_bin" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc_bin=/usr/local/cuda/bin/nvcc; }
if [ -n "$nvcc_bin" ]; then
  echo "== CUDA backend: real build with $nvcc_bin (its tests skip without a GPU) =="
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DBNORM_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc_bin" \
    -DBNORM_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build build-cuda -j"$jobs" >/dev/null
  (cd build-cuda && ctest --output-on-failure -L cuda)
else
  echo "== CUDA backend: no nvcc on this machine, real build skipped =="
fi

echo "== valgrind =="
vg=(valgrind -q --error-exitcode=1 --leak-check=full --show-possibly-lost=no --errors-for-leak-kinds=definite)
for t in test_errors test_layer test_hard test_pytorch test_state test_embed; do
  [ -x "build/tests/$t" ] || continue
  echo "valgrind $t"
  "${vg[@]}" "build/tests/$t" >/dev/null
done
echo "all test stages passed"
