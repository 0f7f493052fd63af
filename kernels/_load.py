"""Loading the compiled library: in a source checkout it is rebuilt in place when missing or older
than the C sources; then the ABI version is checked against this package's, and an
``FW_KERNELS_ISA`` the CPU cannot run is reported (the library falls back to what it can)."""

from __future__ import annotations

import glob
import os
import warnings

__all__ = ["ffi", "lib"]

_ABI_VERSION = 3

_HERE = os.path.dirname(os.path.abspath(__file__))


def _sources_newer_than(so_path: str) -> bool:
    so_m = os.path.getmtime(so_path)
    patterns = ("src/*.c", "src/*.h", "include/*.h", "build_ffi.py")
    for pat in patterns:
        for p in glob.glob(os.path.join(_HERE, pat)):
            if os.path.getmtime(p) > so_m:
                return True
    return False


def _maybe_build() -> None:
    """In a source checkout (setup.py next to the package), compile the extension in place when it
    is missing or older than the C sources. Installed packages are never rebuilt."""
    if os.environ.get("FW_KERNELS_NO_AUTOBUILD"):
        return
    root = os.path.dirname(_HERE)
    if not (
        os.path.exists(os.path.join(root, "setup.py"))
        and os.path.exists(os.path.join(_HERE, "build_ffi.py"))
        and os.path.isdir(os.path.join(_HERE, "src"))
    ):
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fw_kernels_build_ffi",
                                                  os.path.join(_HERE, "build_ffi.py"))
    build_ffi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_ffi)  # type: ignore[union-attr]

    def stale() -> bool:
        so = build_ffi.built_module_path()
        return so is None or _sources_newer_than(so)

    if not stale():
        return
    import fcntl

    lock_dir = os.path.join(root, "build")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, ".kernels-build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        still_stale = stale()
    if still_stale:  # (build_inplace takes the lock itself; a build that won the race is reused)
        build_ffi.build_inplace()


try:
    _maybe_build()
except Exception as exc:  # pragma: no cover - fall through to the import error below
    warnings.warn(f"kernels: in-place build failed: {exc}", RuntimeWarning, stacklevel=2)

try:
    from kernels._ffi import ffi, lib  # noqa: E402
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "kernels._ffi is not built: run `pip install -e .` or `python kernels/build_ffi.py`"
    ) from exc

if lib.fw_abi_version() != _ABI_VERSION:  # pragma: no cover
    raise ImportError(
        f"kernels._ffi ABI {lib.fw_abi_version()} != {_ABI_VERSION}: rebuild with "
        "`python kernels/build_ffi.py` (or `pip install -e .`)"
    )

_env_isa = os.environ.get("FW_KERNELS_ISA", "").strip()
if _env_isa and _env_isa != "auto" and ffi.string(lib.fw_isa()).decode() != _env_isa:
    warnings.warn(
        f"FW_KERNELS_ISA={_env_isa!r} is not supported here; using "
        f"{ffi.string(lib.fw_isa()).decode()!r}",
        RuntimeWarning,
        stacklevel=2,
    )
