#!/usr/bin/env bash
# demo.sh - README's first command: installs what it needs, builds bnorm and its examples, and trains
# a network with and without batch norm on the embedded UCI digits data (plot: build/digits_bn_vs_nobn.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh demo
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target train_digits >/dev/null
./build/examples/train_digits --plot build/digits_bn_vs_nobn.png --out build/train_digits_state "$@"
