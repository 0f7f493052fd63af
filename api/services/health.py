"""Readiness: each dependency is checked; the first failure raises ``Unavailable`` naming all failures."""
from __future__ import annotations

from collections.abc import Callable

from core import db, queue, storage
from core.errors import FeatherweightError, Unavailable


def _check(name: str, probe: Callable[[], None]) -> str | None:
    try:
        probe()
    except FeatherweightError as exc:
        return f"{name}: {exc.detail}"
    except Exception as exc:  # a readiness probe reports any failure instead of raising it
        return f"{name}: {type(exc).__name__}: {exc}"
    return None


def readiness() -> dict[str, object]:
    checks = {
        "database": lambda: db.ping(),
        "broker": queue.check_broker,
        "storage": lambda: storage.get_store().check(),
    }
    failures = [msg for name, probe in checks.items() if (msg := _check(name, probe))]
    if failures:
        raise Unavailable("not ready: " + "; ".join(failures),
                          [{"loc": [m.split(":", 1)[0]], "msg": m.split(":", 1)[1].strip()} for m in failures])
    return {"status": "ready", "checks": {name: "ok" for name in checks}}
