#!/usr/bin/env bash
# mpirun.sh ARGS... - mpirun for one machine, the way the README runs the MPI examples: with Open MPI
# it adds what a container or a fresh machine needs (running as root, more ranks than cores, TCP over
# the loopback interface only, no core binding) - the same flags CMake puts in BNORM_MPIEXEC_FLAGS for
# the tests - and OMP_WAIT_POLICY=PASSIVE so that ranks sharing cores do not spin. Other MPIs get the
# arguments unchanged. Set BNORM_MPIEXEC_FLAGS to replace the flags (e.g. on a cluster).
#   example: scripts/mpirun.sh -np 3 build/examples/sync_train
set -euo pipefail
mpirun=${MPIEXEC:-mpirun}
command -v "$mpirun" >/dev/null || { echo "mpirun.sh: $mpirun not found (Debian: apt-get install openmpi-bin)" >&2; exit 127; }
if [ -n "${BNORM_MPIEXEC_FLAGS+x}" ]; then
  read -r -a flags <<<"$BNORM_MPIEXEC_FLAGS"
elif "$mpirun" --version 2>/dev/null | grep -Eq "Open MPI|OpenRTE"; then
  flags=(--oversubscribe --allow-run-as-root --bind-to none --mca pml ob1 --mca btl self,tcp
         --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo)
else
  flags=()
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$mpirun" "${flags[@]}" "$@"
