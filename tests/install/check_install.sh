#!/usr/bin/env bash
# check_install.sh BUILD_DIR SOURCE_ROOT [MPIEXEC MPIEXEC_FLAGS...]
# Installs the build into a temporary prefix and builds and runs one consumer of each kind:
#   1. CMake, C project: bnorm::bnorm (shared) and bnorm::bnorm_static; neither gets -fopenmp, and
#      neither needs MPI to be findable
#   2. CMake, C++-only project (no C compiler enabled): shared and static
#   3. pkg-config, shared: cc app.c $(pkg-config --cflags --libs bnorm) -Wl,-rpath,<libdir>, run
#      without LD_LIBRARY_PATH; `pkg-config --cflags bnorm` works without libcjson.pc on the path
#   4. pkg-config --static: the archive plus `pkg-config --static --libs bnorm` links and runs
#   5. the MPI component (when built): find_package(bnorm COMPONENTS mpi) and bnorm_mpi.pc, under
#      MPIEXEC with MPIEXEC_FLAGS on 2 ranks
#   6. the package files: versioned sonames (libbnorm.so.0.MINOR while the major version is 0, same for
#      libbnorm_mpi), bnorm_version.h installed, bnorm_mpi.h/bnorm_mpi.pc only with MPI
#   7. a second build without MPI, OpenMP or cJSON: no bnorm_mpi.h, find_package(bnorm COMPONENTS mpi)
#      fails with a clear message, find_package(bnorm) and the C consumer work.
set -euo pipefail
build=$(cd "$1" && pwd); root=$(cd "$2" && pwd); shift 2
src=$root/tests/install
mpiexec=${1:-}; [ $# -gt 0 ] && shift
mpiflags=("$@")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
passed=0
ok() { echo "install: ok   $*"; passed=$((passed + 1)); }
die() { echo "install: FAIL $*" >&2; exit 1; }
q() { "$@" >"$tmp/log" 2>&1 || { cat "$tmp/log" >&2; die "$*"; }; }

prefix=$tmp/prefix
q cmake --install "$build" --prefix "$prefix"
libdir=$(cd "$(dirname "$(ls "$prefix"/lib*/libbnorm.a)")" && pwd)
pcdir=$libdir/pkgconfig
version=$(sed -n 's/^Version: //p' "$pcdir/bnorm.pc")
major=${version%%.*}; minor=${version#*.}; minor=${minor%%.*}
if [ "$major" = 0 ]; then soname=0.$minor; else soname=$major; fi

# 6. package files
[ -f "$prefix/include/bnorm/bnorm_version.h" ] || die "bnorm_version.h not installed"
grep -q "define BNORM_VERSION_MINOR $minor\$" "$prefix/include/bnorm/bnorm_version.h" || die "bnorm_version.h disagrees with bnorm.pc ($version)"
readelf -d "$libdir/libbnorm.so" | grep -q "SONAME.*\[libbnorm.so.$soname\]" || die "libbnorm.so: soname is not libbnorm.so.$soname"
has_mpi=0
if [ -e "$libdir/libbnorm_mpi.so" ]; then
  has_mpi=1
  readelf -d "$libdir/libbnorm_mpi.so" | grep -q "SONAME.*\[libbnorm_mpi.so.$soname\]" || die "libbnorm_mpi.so: soname is not libbnorm_mpi.so.$soname"
  [ -f "$prefix/include/bnorm/bnorm_mpi.h" ] && [ -f "$pcdir/bnorm_mpi.pc" ] || die "MPI build without bnorm_mpi.h or bnorm_mpi.pc"
fi
ok "package files (version $version, soname .$soname, MPI $has_mpi)"

# 1. CMake, C: shared and static (the static one must not need libbnorm.so)
# (MPI made unfindable: an MPI-enabled install must not need MPI without COMPONENTS mpi)
q cmake -S "$src/consumer_c" -B "$tmp/c" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON
q cmake --build "$tmp/c"
q "$tmp/c/consumer"; q "$tmp/c/consumer_static"
readelf -d "$tmp/c/consumer_static" | grep -q "NEEDED.*libbnorm" && die "consumer_static depends on libbnorm.so"
ok "CMake C project: bnorm::bnorm and bnorm::bnorm_static"

# 2. CMake, C++ only
q cmake -S "$src/consumer_cxx" -B "$tmp/cxx" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON
q cmake --build "$tmp/cxx"
q "$tmp/cxx/consumer_cxx"; q "$tmp/cxx/consumer_cxx_static"
ok "CMake C++-only project: bnorm::bnorm and bnorm::bnorm_static"

# 3. pkg-config, shared; the .pc must not require libcjson.pc (PKG_CONFIG_LIBDIR hides the system's)
export PKG_CONFIG_LIBDIR=$pcdir PKG_CONFIG_PATH=
q pkg-config --cflags bnorm
q pkg-config --libs bnorm
pc_libdir=$(pkg-config --variable=libdir bnorm)
q cc -std=c99 -o "$tmp/pc" "$src/consumer.c" $(pkg-config --cflags --libs bnorm) -lm -Wl,-rpath,"$pc_libdir"
q env -u LD_LIBRARY_PATH "$tmp/pc"
ok "pkg-config shared (rpath)"

# 4. pkg-config --static: link the archive, the private libraries from Libs.private
static_libs=$(pkg-config --static --libs bnorm | sed 's/-lbnorm\b/-l:libbnorm.a/')
q cc -std=c99 -o "$tmp/pcs" "$src/consumer.c" $(pkg-config --cflags bnorm) $static_libs
readelf -d "$tmp/pcs" | grep -q "NEEDED.*libbnorm" && die "pkg-config --static consumer depends on libbnorm.so"
q "$tmp/pcs"
ok "pkg-config --static ($(pkg-config --static --libs-only-l bnorm | xargs))"
unset PKG_CONFIG_LIBDIR PKG_CONFIG_PATH

# 5. MPI component
if [ $has_mpi = 1 ]; then
  [ -n "$mpiexec" ] || die "bnorm_mpi installed but no mpiexec given"
  q cmake -S "$src/consumer_mpi" -B "$tmp/mpi" -DCMAKE_PREFIX_PATH="$prefix"
  q cmake --build "$tmp/mpi"
  q env OMP_WAIT_POLICY=PASSIVE "$mpiexec" "${mpiflags[@]}" -np 2 "$tmp/mpi/consumer_mpi"
  mpi_pc=$(PKG_CONFIG_PATH="$pcdir" pkg-config --cflags --libs bnorm_mpi)
  q cc -std=c99 -o "$tmp/pcmpi" "$src/consumer_mpi/consumer_mpi.c" $mpi_pc -lm -Wl,-rpath,"$pc_libdir"
  q env OMP_WAIT_POLICY=PASSIVE "$mpiexec" "${mpiflags[@]}" -np 2 "$tmp/pcmpi"
  ok "MPI component: find_package(bnorm COMPONENTS mpi) and bnorm_mpi.pc, 2 ranks"
fi

# 7. a build without MPI (nor OpenMP, nor cJSON)
q cmake -S "$root" -B "$tmp/b2" -DCMAKE_BUILD_TYPE=Release -DBNORM_MPI=OFF -DBNORM_OPENMP=OFF -DBNORM_STATE_IO=OFF \
    -DBNORM_BUILD_TESTS=OFF -DBNORM_BUILD_EXAMPLES=OFF -DBNORM_BUILD_BENCH=OFF
q cmake --build "$tmp/b2" -j2
q cmake --install "$tmp/b2" --prefix "$tmp/p2"
[ -e "$tmp/p2/include/bnorm/bnorm_mpi.h" ] && die "bnorm_mpi.h installed by a build without MPI"
ls "$tmp"/p2/lib*/pkgconfig/bnorm_mpi.pc >/dev/null 2>&1 && die "bnorm_mpi.pc installed by a build without MPI"
if cmake -S "$src/consumer_mpi" -B "$tmp/mpi2" -DCMAKE_PREFIX_PATH="$tmp/p2" >"$tmp/log" 2>&1; then
  die "find_package(bnorm COMPONENTS mpi) succeeded on a build without MPI"
fi
grep -q "built without MPI" "$tmp/log" || { cat "$tmp/log" >&2; die "find_package(bnorm COMPONENTS mpi): no clear message"; }
q cmake -S "$src/consumer_c" -B "$tmp/c2" -DCMAKE_PREFIX_PATH="$tmp/p2"
q cmake --build "$tmp/c2"
q "$tmp/c2/consumer"; q "$tmp/c2/consumer_static"
ok "build without MPI/OpenMP/cJSON: no MPI files, component mpi refused clearly, C consumers work"
echo "install: $passed passed, 0 failed"
