"""setup.py - builds the bnorm Python package: the C library (with the project's own CMake build, as a
static library with position-independent code, OpenMP and safetensors state I/O) linked into the
extension module bnorm._bnorm. No download at build time:

    /usr/bin/python3 -m pip install --no-build-isolation --break-system-packages ./python

Needs Debian's python3-dev, python3-setuptools, python3-numpy, cmake and a C compiler.
Environment: BNORM_CMAKE_ARGS (extra CMake arguments), BNORM_BUILD_JOBS (default: CPU count).
"""
import os
import re
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class CMakeBuildExt(build_ext):
    """Builds libbnorm.a with CMake first, then links it into the extension."""

    def build_extension(self, ext):
        build_dir = os.path.abspath(os.path.join(self.build_temp, "libbnorm"))
        os.makedirs(build_dir, exist_ok=True)
        if not os.path.exists(os.path.join(ROOT, "include", "bnorm", "bnorm.h")):
            raise RuntimeError("bnorm: setup.py must run from python/ inside the bnorm source tree")
        cfg = ["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
               "-DCMAKE_POSITION_INDEPENDENT_CODE=ON", "-DBNORM_OPENMP=ON", "-DBNORM_STATE_IO=ON",
               "-DBNORM_MPI=OFF", "-DBNORM_BUILD_TESTS=OFF", "-DBNORM_BUILD_EXAMPLES=OFF",
               "-DBNORM_BUILD_BENCH=OFF"]
        cfg += os.environ.get("BNORM_CMAKE_ARGS", "").split()
        jobs = os.environ.get("BNORM_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "bnorm_static", "-j" + jobs])
        ext.include_dirs.append(os.path.join(ROOT, "include"))
        ext.include_dirs.append(os.path.join(build_dir, "include"))  # the generated bnorm_version.h
        lib = os.path.join(build_dir, "libbnorm.a")
        if lib not in ext.extra_objects:
            ext.extra_objects.append(lib)
        # build_ext relinks only when a source or a dependency is newer than the extension; the library is
        # neither by default, so a rebuilt libbnorm.a would leave a stale extension from an earlier build
        if lib not in ext.depends:
            ext.depends.append(lib)
        super().build_extension(ext)


def _version():
    """The project's one version: CMake's project(bnorm VERSION x.y.z)."""
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        m = re.search(r"project\(bnorm\s+VERSION\s+([0-9.]+)", f.read())
    if not m:
        raise RuntimeError("bnorm: no project(bnorm VERSION ...) in CMakeLists.txt")
    return m.group(1)


ext = Extension(
    "bnorm._bnorm",
    sources=["src/_bnorm.c"],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
    # the static library's symbols stay inside the extension; OpenMP as the library needs
    extra_link_args=["-fopenmp", "-Wl,--exclude-libs,ALL"],
    libraries=["m"],
)

setup(
    name="bnorm",
    version=_version(),
    description="Batch normalization (PyTorch/OneFlow/MegEngine semantics) on numpy arrays and CPU torch tensors",
    packages=["bnorm"],
    ext_modules=[ext],
    cmdclass={"build_ext": CMakeBuildExt},
    python_requires=">=3.8",
    install_requires=["numpy"],
)
