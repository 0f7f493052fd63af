"""The closed registry of pipeline steps: recipe ``op`` -> the module that implements it.

An explicit table, never a package walk: a recipe can only pick one of these names, never name
code to load. Modules are imported on first use so a step's heavy dependencies (torch for ``distill``)
load only when a recipe asks for that step.
"""
from __future__ import annotations

import importlib
from types import ModuleType

STEP_MODULES: dict[str, str] = {
    "cleanup": "worker.pipeline.steps.cleanup",
    "prune": "worker.pipeline.steps.prune",
    "lowrank": "worker.pipeline.steps.lowrank",
    "cluster": "worker.pipeline.steps.cluster",
    "quantize": "worker.pipeline.steps.quantize",
    "distill": "worker.pipeline.steps.distill",
    "fp16": "worker.pipeline.steps.fp16",
}


def step_module(op: str) -> ModuleType:
    """Return the step module for ``op``; KeyError for an op outside the table."""
    module_name = STEP_MODULES[op]
    module = importlib.import_module(module_name)
    if getattr(module, "name", None) != op:
        raise RuntimeError(f"step module {module_name} declares name {getattr(module, 'name', None)!r}, not {op!r}")
    return module
