"""Runs upload validation in a separate process, so the API process's memory stays flat.

Parsing a protobuf of up to ``max_upload_bytes`` takes that much memory and more; done in the API
it would grow every API process by the largest model ever uploaded. ``validate_model`` hands the
file path to a long-lived helper process (spawned, not forked, so it shares nothing with the API's
threads and sockets) whose address space is capped at ``validation_max_memory_bytes``: a model that
needs more is refused with 422, and a helper that dies is replaced for the next upload.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
from pathlib import Path

from core.errors import InvalidModel
from core.onnx_guard import ModelInfo, validate
from core.settings import Settings

_lock = threading.Lock()
_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_memory: int | None = None


def _limit_memory(max_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


def _validate_in_child(path: str, settings: Settings) -> ModelInfo:
    try:
        return validate(Path(path), settings)
    except MemoryError:
        raise InvalidModel(f"the model needs more than {settings.validation_max_memory_bytes} bytes of memory "
                           "to validate", [{"loc": ["file"], "msg": "too large to validate"}]) from None


def _executor(settings: Settings) -> concurrent.futures.ProcessPoolExecutor:
    global _pool, _pool_memory
    if _pool is None or _pool_memory != settings.validation_max_memory_bytes:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_limit_memory, initargs=(settings.validation_max_memory_bytes,))
        _pool_memory = settings.validation_max_memory_bytes
    return _pool


def validate_model(path: Path, settings: Settings) -> ModelInfo:
    """``onnx_guard.validate`` in the helper process (in this process when validation_in_process)."""
    if settings.validation_in_process:
        return validate(path, settings)
    global _pool
    for _ in range(2):  # a helper found dead (killed since the last upload) is replaced once
        with _lock:
            executor = _executor(settings)
        try:
            return executor.submit(_validate_in_child, str(path), settings).result()
        except concurrent.futures.process.BrokenProcessPool:
            with _lock:
                if _pool is executor:
                    _pool = None
    raise InvalidModel("the model could not be validated within the memory limit",
                       [{"loc": ["file"], "msg": "validation process died"}])


def helper_pids() -> list[int]:
    """Process ids of the running validation helpers (for tests and operators)."""
    pool = _pool
    return sorted(pool._processes) if pool is not None and pool._processes else []


def shutdown() -> None:
    """Stop the helper process (the API calls this when it shuts down)."""
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
            _pool = None
