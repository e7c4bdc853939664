#!/bin/sh
# bench/run.sh - builds bnorm (Release) with the benchmark and runs the full comparison:
# every op on the ResNet-50, BatchNorm1d and large shape sets, both layouts, 1 and 2 threads,
# float32 (bf16/f16 at the largest thread count), against oneDNN (same process) and PyTorch.
# Results: $BUILD/bench/results.{csv,json,png} (BUILD defaults to build-bench). Extra arguments go
# to bnorm_bench (e.g. --threads 2 --sets large --shape 64,256,1024).
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-$here/build-bench}
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target bnorm_bench -j "$(nproc 2>/dev/null || echo 2)" >/dev/null
exec "$build/bench/bnorm_bench" --full --out "$build/bench/results" "$@"
