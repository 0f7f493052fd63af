"""Per-layer bookkeeping the structural steps share: the ``LayerRecord`` for a weight (created on
first touch, keyed by the original float weight's initializer name) and the list of what a step left
alone and why, which the step's metrics carry to the report."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.pipeline.graph import WeightLayer
from worker.pipeline.step import LayerRecord, StepContext


def layer_record(ctx: StepContext, layer: WeightLayer) -> LayerRecord:
    """The record of ``layer``'s weight, created if no earlier step made one."""
    record = ctx.layers.get(layer.weight)
    if record is None:
        record = LayerRecord(weight=layer.weight, node=layer.node, op=layer.op)
        ctx.layers[layer.weight] = record
    return record


def sparsity_of(array: np.ndarray) -> float:
    """Fraction of exact zeros: what shows in the file and what the report counts."""
    return float(np.count_nonzero(array == 0) / array.size) if array.size else 0.0


@dataclass
class StepLog:
    """Per-layer metrics and skip reasons of one step, in the shape the report reads."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)     # e.g. what the activation propagation cost

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})

    def metrics(self, **extra: Any) -> dict[str, Any]:
        return {"layers": self.layers, "skipped": self.skipped, **self.extra, **extra}
