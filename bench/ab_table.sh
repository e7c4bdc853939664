#!/bin/sh
# bench/ab_table.sh OLD_LIB NEW_LIB [ROUNDS] - the before/after table of docs/performance.md (session 8):
# bnorm_ab (bench/ab.c) on NHWC / (N,C) float32 shapes, three ops, 1 and 2 threads, with the library's
# own workspace and with malloc-like buffers (caller workspace 16 bytes past a page, tensors 16 bytes
# past a line). Prints a Markdown table of medians (ms), OLD -> NEW. Needs a build with the benchmark
# (BUILD, default build-bench). SHAPES overrides the shapes (space-separated N,C[,d...]).
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
ab=${BUILD:-$here/build-bench}/bench/bnorm_ab
old=$1 new=$2 rounds=${3:-11}
[ -x "$ab" ] && [ -n "$old" ] && [ -n "$new" ] || { echo "usage: $0 OLD_LIB NEW_LIB [ROUNDS] (bnorm_ab: $ab)" >&2; exit 2; }
med() { "$ab" "$old" "$new" --rounds "$rounds" "$@" | awk '{for (i = 1; i < NF; i++) if ($i == "median") v[n++] = $(i + 1)} END {printf "%.2f -> %.2f", v[0], v[1]}'; }
echo "| shape | op | own, 1 thread | own, 2 threads | malloc-like, 1 thread | malloc-like, 2 threads |"
echo "|---|---|---|---|---|---|"
for sh in ${SHAPES:-32,64,112,112 32,64,56,56 32,512,28,28 32,1024,14,14 32,2048,7,7 4096,1024}; do
  for op in fwd_infer fwd_train bwd_train; do
    row="| $(echo "$sh" | tr , x) | $op"
    for cfg in own malloc; do
      for th in 1 2; do
        if [ "$cfg" = own ]; then cell=$(med --shape "$sh" --op "$op" --threads "$th")
        else cell=$(med --shape "$sh" --op "$op" --threads "$th" --ws-offset 16 --offset 16); fi
        row="$row | $cell"
      done
    done
    echo "$row |"
  done
done
