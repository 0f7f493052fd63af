"""The worker's cores for the solvers' numpy / LAPACK work: independent pieces (row pieces of the
layer-wise statistics, one masked least-squares solve per output column) on a small thread pool,
each piece on one BLAS thread.

Why not OpenBLAS's own threads: on a busy machine they spin while they wait for each other. A
14400 x 864 float32 ``X^T X`` took 0.26 CPU s on OpenBLAS's two threads against 0.093 on one (load
15 on 2 cores), and was slower in wall time too; the same product split into two row halves, one
per Python thread with BLAS serial, took 0.098 CPU s and the least wall time (numpy and LAPACK
release the GIL while they compute). On an idle machine the split keeps both cores busy as
OpenBLAS's threads would.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0
_SERIAL_DEPTH = 0


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:       # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def _pool() -> ThreadPoolExecutor:
    """The pool of this process: a forked child (the worker's job processes) inherits the parent's
    pool object but not its threads, and would wait on them forever; it makes its own."""
    global _POOL, _POOL_PID
    with _LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL = ThreadPoolExecutor(max_workers=cores(), thread_name_prefix="fw-solve")
            _POOL_PID = os.getpid()
        return _POOL


@lru_cache(maxsize=1)
def _blas():
    """The BLAS controller, made on first use (scipy and threadpoolctl cost ~1 s of CPU to load,
    which a job that never solves should not pay), after scipy's BLAS is loaded: a controller
    limits only the libraries loaded when it was made, and the solves call scipy's LAPACK."""
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def serial_blas():
    """BLAS / LAPACK on one thread inside (re-entrant: only the outermost call switches, since a
    switch costs a call into every loaded BLAS library)."""
    global _SERIAL_DEPTH
    if _SERIAL_DEPTH:
        _SERIAL_DEPTH += 1
        try:
            yield
        finally:
            _SERIAL_DEPTH -= 1
        return
    with _blas().limit(limits=1, user_api="blas"):
        _SERIAL_DEPTH = 1
        try:
            yield
        finally:
            _SERIAL_DEPTH = 0


def map_serial(function: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map(function, items)`` on the pool, results in order, BLAS on one thread in each. The
    caller consumes the results in its own thread (writes into shared arrays belong there)."""
    items = list(items)
    if len(items) <= 1 or cores() == 1:
        with serial_blas():
            yield from map(function, items)
        return
    with serial_blas():
        yield from _pool().map(function, items)
