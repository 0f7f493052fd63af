"""cffi build script for the kernel library (out-of-line API mode).

* `pip install .` / `pip install -e .` compile it through setup.py's
  `cffi_modules=["kernels/build_ffi.py:ffibuilder"]`.
* `python kernels/build_ffi.py` compiles it in place (kernels/_ffi.*.so) for development;
  `kernels/__init__.py` calls `build_inplace()` itself when the module is missing or older than
  the C sources (source checkouts only).

The cdef is the part of include/fw_kernels.h between CDEF-BEGIN and CDEF-END, so the header is the
single source of truth for the API. Every C file is compiled on every platform; ISA-specific files
guard themselves with #if on the architecture, and use per-function target attributes, so the
library itself is built for the baseline ISA and picks AVX2 / AVX-512 / NEON at load time.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "include")
SRC = os.path.join(HERE, "src")
HEADER = os.path.join(INCLUDE, "fw_kernels.h")

# -ffp-contract=off: no implicit FMA, so scalar and SIMD variants round identically (the
# algorithms write fmaf() explicitly where they specify a fused multiply-add).
# -fno-math-errno lets nearbyintf / floorf / sqrt inline; it changes no values.
EXTRA_COMPILE_ARGS = [
    "-O3",
    "-std=c11",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fvisibility=hidden",
    "-pthread",
    "-Wall",
    "-Wno-unused-function",
]
EXTRA_LINK_ARGS = ["-pthread"]


def read_cdef() -> str:
    with open(HEADER, encoding="utf-8") as f:
        text = f.read()
    try:
        return text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    except IndexError as exc:  # pragma: no cover - header edited badly
        raise RuntimeError("fw_kernels.h lacks the CDEF-BEGIN / CDEF-END markers") from exc


def c_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(SRC, "*.c")))


def _rel(path: str) -> str:
    # setuptools prefers source paths relative to the project root (the cwd of a build)
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def make_builder(absolute: bool = False) -> FFI:
    rel = (lambda p: p) if absolute else _rel
    ffi = FFI()
    ffi.cdef(read_cdef())
    ffi.set_source(
        "kernels._ffi",
        '#include "fw_kernels.h"\n',
        sources=[rel(p) for p in c_sources()],
        include_dirs=[rel(INCLUDE), rel(SRC)],
        extra_compile_args=EXTRA_COMPILE_ARGS,
        extra_link_args=EXTRA_LINK_ARGS,
        libraries=["m"],
    )
    return ffi


ffibuilder = make_builder()


def built_module_path() -> str | None:
    """The compiled module `import kernels._ffi` would load (suffixes in the interpreter's
    order: an in-place build, then e.g. the abi3 build of an editable install), or None."""
    from importlib.machinery import EXTENSION_SUFFIXES

    for suffix in EXTENSION_SUFFIXES:
        path = os.path.join(HERE, "_ffi" + suffix)
        if os.path.exists(path):
            return path
    return None


def build_inplace(verbose: bool = False) -> str:
    """Compile into kernels/ (atomically replacing any previous build); returns the .so path.

    Each build uses its own temporary directory (cffi would skip compiling when its generated
    wrapper is unchanged, whatever happened to the C sources, and concurrent builds in a shared
    checkout must not share object files); builds are serialised by a lock file."""
    import fcntl
    import tempfile

    root = os.path.dirname(HERE)
    build_root = os.path.join(root, "build")
    os.makedirs(build_root, exist_ok=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    dest = os.path.join(HERE, "_ffi" + suffix)
    with open(os.path.join(build_root, ".kernels-build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmpdir = tempfile.mkdtemp(prefix="cffi-kernels-", dir=build_root)
        try:
            ffi = make_builder(absolute=True)  # cffi compiles from inside tmpdir
            so = ffi.compile(tmpdir=tmpdir, verbose=verbose)
            staging = dest + ".tmp%d" % os.getpid()
            shutil.copyfile(so, staging)
            os.chmod(staging, 0o755)
            os.replace(staging, dest)  # atomic: a concurrent import sees the old or the new file
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return dest


if __name__ == "__main__":
    path = build_inplace(verbose="-v" in sys.argv)
    print(path)
