#!/usr/bin/env bash
# deps.sh - installs, with apt-get, the Debian packages bnorm's build, tests, demo and benchmark use,
# when they are missing. Sourced by scripts/test.sh and scripts/demo.sh; needs root for installs.
#   usage: scripts/deps.sh [core|test|demo|mpi|bench]...
set -euo pipefail

pkgs_core=(build-essential cmake pkg-config)
pkgs_test=(libopenmpi-dev openmpi-bin python3 python3-numpy python3-torch clang libclang-rt-14-dev valgrind zlib1g-dev
           libcjson-dev python3-dev python3-pip python3-setuptools python3-wheel python3-pytest python3-mpi4py
           libtorch-dev pybind11-dev)
pkgs_demo=(zlib1g-dev gnuplot-nox)
pkgs_mpi=(libopenmpi-dev openmpi-bin zlib1g-dev)
pkgs_bench=(libdnnl-dev python3-torch gnuplot-nox)

want=("${pkgs_core[@]}")
for part in "$@"; do
  case "$part" in
    core) ;;
    test) want+=("${pkgs_test[@]}" "${pkgs_demo[@]}") ;;
    demo) want+=("${pkgs_demo[@]}") ;;
    mpi) want+=("${pkgs_mpi[@]}") ;;
    bench) want+=("${pkgs_bench[@]}") ;;
    *) echo "deps.sh: unknown part '$part'" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "deps.sh: missing Debian packages: ${missing[*]} (run as root, or install them: apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "deps.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
