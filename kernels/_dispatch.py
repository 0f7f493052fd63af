"""Wrappers of dispatch.c: which per-ISA table of primitives runs (read, switch, try one for a block)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from kernels._args import _check
from kernels._load import ffi, lib


def isa() -> str:
    """The primitive variant in use: 'ref', 'avx2', 'avx512' or 'neon'."""
    return ffi.string(lib.fw_isa()).decode()


def isa_supported(name: str) -> bool:
    return bool(lib.fw_isa_supported(str(name).encode()))


def set_isa(name: str) -> str:
    """Switch the variant at run time ('auto', 'ref', 'avx2', 'avx512', 'neon'); returns the old."""
    old = isa()
    _check(lib.fw_set_isa(str(name).encode()))
    return old


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    old = set_isa(name)
    try:
        yield isa()
    finally:
        lib.fw_set_isa(old.encode())
