"""Build script: the pure-Python package, plus the native CPU extension when possible.

The extension ``eagle2_kernels._C`` (sources in csrc/, built by CMakeLists.txt with CMake
and Ninja) is compiled against the torch that is already installed, so install with

    pip install --no-build-isolation .        # or -e . for a development install

Switches (environment variables):
    EAGLE2_KERNELS_BUILD_EXT=1   build the extension; fail the install if it cannot be built
    EAGLE2_KERNELS_BUILD_EXT=0   skip it: a pure-Python install (the ops use the torch reference)
    (unset)                      try to build it; on failure (no compiler, no torch, ...) warn
                                 and install the pure-Python package
    MAX_JOBS=N                   parallel compile jobs (default: the CPU count)
    EAGLE2_KERNELS_BUILD_TYPE    CMake build type (default Release)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_ENV = "EAGLE2_KERNELS_BUILD_EXT"


def build_mode() -> str:
    """'auto', 'on' or 'off' from EAGLE2_KERNELS_BUILD_EXT."""
    value = os.environ.get(BUILD_ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    raise ValueError(f"{BUILD_ENV}={value!r} is not valid: use 1 (build), 0 (skip) or leave it unset")


def _find_tool(name: str, module: str) -> str | None:
    """A build tool from PATH, else from its PyPI package (cmake / ninja wheels)."""
    path = shutil.which(name)
    if path:
        return path
    try:
        mod = __import__(module)
        candidate = os.path.join(getattr(mod, "BIN_DIR", getattr(mod, "CMAKE_BIN_DIR", "")), name)
        return candidate if os.path.isfile(candidate) else None
    except ImportError:
        return None


def _drop_foreign_cache(build_dir: str) -> None:
    """Remove a build tree configured for another source directory (a copied checkout):
    CMake refuses to reuse it."""
    cache = os.path.join(build_dir, "CMakeCache.txt")
    if not os.path.isfile(cache):
        return
    with open(cache, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("CMAKE_HOME_DIRECTORY:"):
                source = line.split("=", 1)[1].strip()
                if os.path.realpath(source) != os.path.realpath(ROOT):
                    shutil.rmtree(build_dir, ignore_errors=True)
                return


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt; in 'auto' mode a failure only warns."""

    def run(self) -> None:
        mode = build_mode()
        if mode == "off":
            return
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure means: no extension
            if mode == "on":
                raise
            self.warn(
                f"eagle2_kernels: the native extension was not built ({exc}); installing the "
                f"pure-Python package (the ops use the torch reference on CPU). Set "
                f"{BUILD_ENV}=1 to make this an error."
            )

    def build_extension(self, ext: Extension) -> None:
        try:
            import pybind11
            import torch.utils
        except ImportError as exc:
            raise RuntimeError(
                f"building the extension needs torch and pybind11 importable ({exc}); install "
                "them first and use pip install --no-build-isolation"
            ) from exc
        cmake = _find_tool("cmake", "cmake")
        if cmake is None:
            raise RuntimeError("cmake was not found (pip install cmake, or the system package)")
        ninja = _find_tool("ninja", "ninja")

        ext_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(ext_path)
        os.makedirs(out_dir, exist_ok=True)
        # A persistent build tree per interpreter makes rebuilds incremental.
        key = hashlib.sha1(sys.executable.encode()).hexdigest()[:8]
        build_dir = os.path.join(ROOT, "build", f"cmake-{sysconfig.get_platform()}-{key}")
        _drop_foreign_cache(build_dir)
        os.makedirs(build_dir, exist_ok=True)

        build_type = os.environ.get("EAGLE2_KERNELS_BUILD_TYPE", "Release")
        prefix = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        configure = [
            cmake, "-S", ROOT, "-B", build_dir,
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DEAGLE2_OUTPUT_DIR={out_dir}",
        ]
        if ninja is not None and not os.path.exists(os.path.join(build_dir, "Makefile")):
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        if not jobs.isdigit() or int(jobs) < 1:
            raise ValueError(f"MAX_JOBS={jobs!r} must be a positive integer")
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", build_dir, "--parallel", jobs], check=True)
        # CMake names the module from the interpreter's extension suffix, like setuptools.
        if not os.path.exists(ext_path):
            raise RuntimeError(f"the CMake build did not produce {ext_path}")


ext_modules = [] if build_mode() == "off" else [CMakeExtension("eagle2_kernels._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild}, zip_safe=False)
