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


def _torch_native():
    """Compile and link flags for bnorm._autograd (bnorm.torch's native backward node), or None where
    torch or its C++ headers are missing (Debian: libtorch-dev, pybind11-dev) or BNORM_TORCH_NATIVE=0."""
    if os.environ.get("BNORM_TORCH_NATIVE", "auto") == "0":
        return None
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any failure to import torch means: no native node
        print("bnorm: torch not importable (%s): bnorm._autograd not built" % e)
        return None
    incs = [d for d in cpp_extension.include_paths() + ["/usr/include"] if os.path.isdir(d)]
    if not any(os.path.exists(os.path.join(d, "torch", "csrc", "autograd", "function.h")) for d in incs) or \
            not any(os.path.exists(os.path.join(d, "pybind11", "pybind11.h")) for d in incs + ["/usr/include"]):
        print("bnorm: torch's C++ headers not found (Debian: apt-get install libtorch-dev pybind11-dev): "
              "bnorm.torch keeps its Python autograd.Function")
        return None
    libdirs = [d for d in cpp_extension.library_paths() if os.path.isdir(d)]
    abi = "1" if torch._C._GLIBCXX_USE_CXX11_ABI else "0"
    return dict(include_dirs=[d for d in incs if d != "/usr/include"], library_dirs=libdirs,
                runtime_library_dirs=libdirs, define_macros=[("_GLIBCXX_USE_CXX11_ABI", abi)],
                libraries=["torch_python", "torch", "torch_cpu", "c10"])


class CMakeBuildExt(build_ext):
    """Builds libbnorm.a with CMake first, then links it into the extension."""

    def run(self):
        # a bnorm._autograd left in build/ by an earlier build must not ship when this build has none (no
        # headers now, BNORM_TORCH_NATIVE=0, or its optional build failed)
        if not any(e.name == "bnorm._autograd" for e in self.extensions):
            self._remove_native()
        super().run()

    def _remove_native(self):
        stale = os.path.join(self.build_lib, self.get_ext_filename("bnorm._autograd"))
        if os.path.exists(stale):
            os.remove(stale)

    def build_extension(self, ext):
        if ext.name == "bnorm._autograd":  # C++, over bnorm._bnorm's capsule: no library of its own
            ext.include_dirs.append(os.path.join(ROOT, "include"))
            ext.include_dirs.append(os.path.join(os.path.abspath(self.build_temp), "libbnorm", "include"))
            try:
                super().build_extension(ext)
            except Exception:
                self._remove_native()
                raise
            return
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
    depends=["src/bnpy_capi.h"],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
    # the static library's symbols stay inside the extension; OpenMP as the library needs
    extra_link_args=["-fopenmp", "-Wl,--exclude-libs,ALL"],
    libraries=["m"],
)

ext_modules = [ext]
native = _torch_native()
if native is not None:
    ext_modules.append(Extension(
        "bnorm._autograd",
        sources=["src/_autograd.cpp"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-Wall", "-Wno-unused-parameter"],
        depends=["src/bnpy_capi.h"],
        optional=True,  # a failed build leaves bnorm.torch on its Python Function (the tests say so)
        **native))

setup(
    name="bnorm",
    version=_version(),
    description="Batch normalization (PyTorch/OneFlow/MegEngine semantics) on numpy arrays and CPU torch tensors",
    packages=["bnorm"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuildExt},
    python_requires=">=3.8",
    install_requires=["numpy"],
)
