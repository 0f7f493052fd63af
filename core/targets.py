"""Compression targets and the Celery queue each one is served from.

A job names a target; it is enqueued on the queue of the same name, and only a worker started with
``featherweight worker --queue <name>`` (a machine that can run that target) consumes it.
"""
from __future__ import annotations

import enum
import platform


class Target(str, enum.Enum):
    CPU_X86 = "cpu-x86"
    CPU_ARM = "cpu-arm"
    GPU = "gpu"

    def __str__(self) -> str:
        return self.value


QUEUES: tuple[str, ...] = tuple(t.value for t in Target)

# The ONNX Runtime execution provider a worker of each target evaluates and times models with.
PROVIDERS: dict[Target, str] = {
    Target.CPU_X86: "CPUExecutionProvider",
    Target.CPU_ARM: "CPUExecutionProvider",
    Target.GPU: "CUDAExecutionProvider",
}


def queue_for(target: Target | str) -> str:
    """The queue a job for ``target`` goes to (ValueError for an unknown target)."""
    return Target(target).value


def native_target(machine: str | None = None) -> Target:
    """The CPU target this machine runs natively: cpu-arm on aarch64/arm64, cpu-x86 otherwise."""
    machine = (machine or platform.machine()).lower()
    if machine in {"aarch64", "arm64", "armv8l", "armv8b"}:
        return Target.CPU_ARM
    return Target.CPU_X86
