#!/usr/bin/env bash
# check_repo.sh SOURCE_ROOT BUILD_DIR - what a newcomer meets before any test of the library itself:
#   license     LICENSE is a standard license the README names
#   changelog   CHANGELOG.md has an entry for the project version and states the soname rule
#   version     the version is written once (CMakeLists.txt): no version macro or "X.Y.Z" literal in
#               include/ or src/, and the generated header is what the build uses
#   cuda        when -DBNORM_CUDA=ON stops, every document its message names exists and talks about CUDA
#   torch       the PyTorch tests are registered even when a cache says "no torch" (a demo configured
#               build/ before python3-torch was installed)
#   example     README's short example is examples/readme_example.c, character for character
#   consumer    README's install-and-link block runs as written (prefix set to a temporary directory)
#   mpi         README's `scripts/mpirun.sh` lines run as written (root, more ranks than cores), when
#               BUILD_DIR has the MPI examples
#   standalone  the demo program holds no path into the source tree and runs from another directory
set -euo pipefail
root=$(cd "$1" && pwd); build=$(cd "$2" && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
passed=0; failed=0
ok() { echo "repo: ok   $1"; passed=$((passed + 1)); }
bad() { echo "repo: FAIL $1" >&2; failed=$((failed + 1)); }
readme=$root/README.md
# the fenced block after the line "<!-- check: NAME ... -->" in README.md
block() { awk -v name="$1" '
  $0 ~ "^<!-- check: " name "( |-->)" { want = 1; next }
  want && /^```/ { if (inblock) exit; inblock = 1; next }
  inblock { print }' "$readme"; }
version=$(sed -n 's/^project(bnorm VERSION \([0-9.]*\).*/\1/p' "$root/CMakeLists.txt")

# license
if [ -f "$root/LICENSE" ] && head -1 "$root/LICENSE" | grep -Eq "^(MIT License|Apache License|BSD [0-9]-Clause)" &&
   grep -q "LICENSE" "$readme"; then ok "license ($(head -1 "$root/LICENSE"))"; else bad "license: no standard LICENSE named by the README"; fi

# changelog
if [ -n "$version" ] && grep -q "^## $version\$" "$root/CHANGELOG.md" 2>/dev/null &&
   grep -q "libbnorm.so.0.MINOR" "$root/CHANGELOG.md"; then ok "changelog ($version)"
else bad "changelog: CHANGELOG.md lacks '## $version' or the soname rule"; fi

# version
lits=$(grep -rnE '"[0-9]+\.[0-9]+\.[0-9]+"' "$root/include" "$root/src" || true)
macros=$(grep -rn "define BNORM_VERSION_M" "$root/include" "$root/src" || true)
gen=$build/include/bnorm/bnorm_version.h
if [ -z "$lits$macros" ] && [ -f "$gen" ] && grep -q "BNORM_VERSION_STRING \"$version\"" "$gen"; then ok "version (one source: $version)"
else bad "version: written outside CMakeLists.txt: ${lits}${macros} (or $gen missing/stale)"; fi

# cuda
if cmake -S "$root" -B "$tmp/cuda" -DBNORM_CUDA=ON -DBNORM_BUILD_TESTS=OFF -DBNORM_BUILD_EXAMPLES=OFF \
     -DBNORM_BUILD_BENCH=OFF >"$tmp/cuda.log" 2>&1; then
  ok "cuda (-DBNORM_CUDA=ON configures: a backend is built)"
else
  docs=$(grep -oE '(README\.md|docs/[A-Za-z0-9_./-]+\.md)' "$tmp/cuda.log" | sort -u)
  missing=""
  for d in $docs; do grep -q CUDA "$root/$d" 2>/dev/null || missing="$missing $d"; done
  if [ -n "$docs" ] && [ -z "$missing" ]; then ok "cuda (message points to: $(echo $docs))"
  else bad "cuda: the message names no document, or ones that say nothing about CUDA:${missing:- none named}"; fi
fi

# torch
cmake -S "$root" -B "$tmp/torch" -DBNORM_HAVE_PYTHON_TORCH=OFF -DBNORM_BUILD_BENCH=OFF >/dev/null 2>&1 || true
list=$(cd "$tmp/torch" 2>/dev/null && ctest -N 2>/dev/null || true)
miss=""
for t in test_pytorch_fixtures_current test_state_interop_torch example_cnn_inference; do
  grep -q " $t\$" <<<"$list" || miss="$miss $t"
done
if [ -z "$miss" ]; then ok "torch (PyTorch tests registered whatever the cache says)"
else bad "torch: not registered when the cache says no torch:$miss"; fi

# example
if [ -f "$root/examples/readme_example.c" ] && diff <(block example) "$root/examples/readme_example.c" >"$tmp/ex.diff"; then
  ok "example (README == examples/readme_example.c)"
else bad "example: README's short example is not examples/readme_example.c: $(head -5 "$tmp/ex.diff" 2>/dev/null)"; fi

# consumer: run in a directory where build/ and examples/ are this tree's
mkdir -p "$tmp/run"; ln -s "$build" "$tmp/run/build"; ln -s "$root/examples" "$tmp/run/examples"; ln -s "$root/scripts" "$tmp/run/scripts"
if [ -z "$(block consumer)" ]; then bad "consumer: README has no checked install-and-link block"
elif (cd "$tmp/run" && block consumer | sed "s|^prefix=.*|prefix=$tmp/prefix|" | bash -euo pipefail) >"$tmp/consumer.log" 2>&1; then
  ok "consumer (README's pkg-config block: rpath, LD_LIBRARY_PATH, static)"
else bad "consumer: README's block failed:"; tail -15 "$tmp/consumer.log" >&2; fi

# mpi
if [ -x "$build/examples/sync_train" ]; then
  lines=$(block mpi | grep -E '^(scripts/mpirun\.sh|mpirun|mpiexec) ' || true)
  [ -n "$lines" ] || lines=$(grep -E '^(mpirun|mpiexec) ' "$readme" || true)
  if [ -z "$lines" ]; then bad "mpi: README has no MPI run commands"
  elif (cd "$tmp/run" && bash -euo pipefail <<<"$lines") >"$tmp/mpi.log" 2>&1; then ok "mpi (README's MPI commands, as $(id -un))"
  else bad "mpi: README's MPI commands failed:"; tail -8 "$tmp/mpi.log" >&2; fi
else echo "repo: note mpi: $build has no MPI examples (-DBNORM_MPI=ON): README's MPI lines not run"; fi

# standalone
td=$build/examples/train_digits
if [ -x "$td" ]; then
  mkdir -p "$tmp/elsewhere"; cp "$td" "$tmp/elsewhere/"
  if grep -aq "$root/data" "$td"; then bad "standalone: train_digits reads its data from $root/data"
  elif (cd "$tmp/elsewhere" && ./train_digits --quick --no-plot --out "$tmp/elsewhere/state") >"$tmp/td.log" 2>&1; then
    ok "standalone (train_digits copied elsewhere runs on its built-in data)"
  else bad "standalone: train_digits copied elsewhere failed:"; tail -3 "$tmp/td.log" >&2; fi
fi

echo "repo: $passed passed, $failed failed"
[ "$failed" = 0 ]
