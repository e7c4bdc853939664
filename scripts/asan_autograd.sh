#!/usr/bin/env bash
# asan_autograd.sh - bnorm.torch's native backward node (python/src/_autograd.cpp) under AddressSanitizer
# and UndefinedBehaviorSanitizer: builds an instrumented copy of bnorm._autograd next to a copy of the
# installed package and runs the torch tests with it (libasan preloaded into /usr/bin/python3; leaks
# are not checked: CPython and torch keep memory until exit). Run after the package is installed
# (scripts/test.sh does); needs libtorch-dev and pybind11-dev.
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=$(cd /tmp && /usr/bin/python3 -c "import bnorm, os; print(os.path.dirname(bnorm.__file__))")
inc=$(ls -d python/build/temp*/libbnorm/include | head -1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -p "$out/bnorm"
cp "$pkg"/*.py "$pkg"/_bnorm*.so "$out/bnorm/"
abi=$(/usr/bin/python3 -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
g++ -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -shared -fPIC \
  -std=c++17 -D_GLIBCXX_USE_CXX11_ABI="$abi" $(/usr/bin/python3-config --includes) -Iinclude -I"$inc" \
  python/src/_autograd.cpp -o "$out/bnorm/_autograd$(/usr/bin/python3-config --extension-suffix)" \
  -ltorch_python -ltorch -ltorch_cpu -lc10
(cd python/tests && LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH="$out" BNORM_REQUIRE_NATIVE=1 \
  /usr/bin/python3 -m pytest -q -p no:cacheprovider test_autograd_native.py test_torch.py)
