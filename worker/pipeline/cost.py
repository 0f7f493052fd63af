"""What a job costs: each step's wall time split into phases, and its peak memory.

A step wraps its work in ``with ctx.cost.phase("capture"): ...`` (phases: ``capture`` running the
model to get activations, ``statistics`` accumulating Hessians / histograms from them, ``solve`` the
per-layer math, ``write`` putting results into the model, ``evaluate`` measuring candidates). Time
outside any phase is the step's ``other``. Phases may nest: the inner one's time is taken out of
the outer one's, so the phases of a step never add up to more than the step.

Peak memory is the process's resident-set high-water mark (``VmHWM``), reset at the start of each
step where Linux allows it (``/proc/self/clear_refs``), so each step reports its own peak; where it
cannot be reset the peak is the process's since it started, and ``peak_rss_scope`` says so.

``LayerClock`` turns "layer k of n done" into the progress stage the job shows: the layer, the
phase, and an ETA from the time the layers done so far took.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

PHASES = ("capture", "statistics", "solve", "write", "evaluate")


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident memory now (bytes), None where /proc is not there."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Resident-memory high-water mark (bytes) since start or the last ``reset_peak``."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Restart the high-water mark at the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


@dataclass
class CostMeter:
    """Phase times of one step (wall seconds, and CPU seconds of every thread: on a machine other
    jobs share, the CPU time is what the work cost) and its peak memory."""

    phases: dict[str, float] = field(default_factory=dict)
    phases_cpu: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    started_cpu: float = field(default_factory=time.process_time)
    peak_scope: str = "process"
    _stack: list[list] = field(default_factory=list)

    def start(self) -> None:
        self.phases.clear()
        self.phases_cpu.clear()
        self.started, self.started_cpu = time.perf_counter(), time.process_time()
        self.peak_scope = "step" if reset_peak() else "process"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        # name, wall start, cpu start, wall and cpu time spent in nested phases
        entry = [name, time.perf_counter(), time.process_time(), 0.0, 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            wall, cpu = time.perf_counter() - entry[1], time.process_time() - entry[2]
            self.phases[name] = self.phases.get(name, 0.0) + wall - entry[3]
            self.phases_cpu[name] = self.phases_cpu.get(name, 0.0) + cpu - entry[4]
            if self._stack:
                self._stack[-1][3] += wall
                self._stack[-1][4] += cpu

    def row(self, seconds: float | None = None) -> dict:
        """The step's cost for the report: phases (with ``other``), peak memory, slowest phase."""
        total = time.perf_counter() - self.started if seconds is None else seconds
        total_cpu = time.process_time() - self.started_cpu
        phases = {name: round(value, 4) for name, value in self.phases.items() if value > 0}
        phases["other"] = round(max(total - sum(self.phases.values()), 0.0), 4)
        cpu = {name: round(value, 4) for name, value in self.phases_cpu.items() if name in phases}
        cpu["other"] = round(max(total_cpu - sum(self.phases_cpu.values()), 0.0), 4)
        slowest = max(phases.items(), key=lambda item: item[1])
        return {"phases": phases, "phases_cpu": cpu, "cpu_seconds": round(total_cpu, 4),
                "peak_rss_bytes": peak_rss_bytes(), "peak_rss_scope": self.peak_scope, "slowest_phase": slowest[0]}


def slowest(steps: list[dict]) -> dict | None:
    """The (step, phase) that took longest over a report's steps, ``other`` included."""
    best = None
    for index, step in enumerate(steps):
        for phase, seconds in (step.get("phases") or {}).items():
            if best is None or seconds > best["seconds"]:
                best = {"step": index, "op": step.get("op"), "phase": phase, "seconds": seconds}
    return best


class LayerClock:
    """Progress of a per-layer loop: ``tick(k, name, phase)`` -> the stage with an ETA from the
    layers done so far (none before the first is done)."""

    def __init__(self, total: int, progress: Callable[[float, str], None], *, share: tuple[float, float] = (0.0, 1.0)):
        self.total = max(total, 1)
        self.progress = progress
        self.share = share
        self.started = time.perf_counter()

    def tick(self, done: int, name: str, phase: str) -> None:
        elapsed = time.perf_counter() - self.started
        eta = f", ETA {elapsed / done * (self.total - done):.0f} s" if done else ""
        low, high = self.share
        self.progress(low + (high - low) * done / self.total,
                      f"layer {min(done + 1, self.total)}/{self.total} {name}: {phase}{eta}")
