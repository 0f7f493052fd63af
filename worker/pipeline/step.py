"""The contract every pipeline step follows: one entry module per recipe op.

A step is one module under ``worker/pipeline/steps`` exposing:

    name: str                      # the recipe's ``op``
    Params: type[pydantic.BaseModel]  # extra="forbid"; the step's recipe fields (core.recipe re-uses it)
    def run(model: onnx.ModelProto, params: Params, ctx: StepContext) -> StepResult

``run`` checks everything before it mutates anything, and returns a new (or the same, mutated)
ModelProto that passes ``onnx.checker.check_model(full_check=True)`` and runs in ONNX Runtime with
the original's inputs and outputs.

What one step learns about a layer that a later step or the report needs (a sparsity mask, the
quantization grid, a rank) goes into ``ctx.layers[<weight initializer name>]`` as a ``LayerRecord``,
so that ``distill`` can re-impose the constraints and the report can show bits / sparsity / rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from core.errors import RecipeError
from worker.pipeline.cost import CostMeter

ProgressFn = Callable[[float, str], None]  # (fraction of this step in 0..1, message)


class StepCancelled(Exception):
    """Raised inside a step when ctx.check_cancelled() finds the job cancelled."""


@dataclass
class LayerRecord:
    """What the pipeline knows about one weight tensor after the steps so far.

    ``weight`` is the initializer name of the *float* weight as the original model named it;
    ``node`` the node consuming it (MatMul / Gemm / Conv / Gather ...).
    """

    weight: str
    node: str
    op: str
    bits: int = 32
    sparsity: float = 0.0
    rank: int | None = None
    mask: np.ndarray | None = None            # True where the weight is kept (pruning)
    grid: dict[str, Any] | None = None        # quantization grid: scale, zero_point, axis, block_size, bits, signed
    codebook: np.ndarray | None = None        # clustering centroids
    factors: tuple[str, str] | None = None    # low-rank factor initializer names (U, V)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """Everything a step may use besides the model. Pure data: no DB, no HTTP, no Celery."""

    original: onnx.ModelProto                              # the teacher, never mutated
    calibration: Mapping[str, np.ndarray] | None = None    # docs/datasets.md arrays, keyed by input name
    evaluation: Mapping[str, np.ndarray] | None = None
    target: str = "cpu-x86"
    workdir: Path | None = None
    progress: ProgressFn = lambda fraction, message: None
    cancelled: Callable[[], bool] = lambda: False
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"student_model": ModelProto}
    cost: CostMeter = field(default_factory=CostMeter)     # the running step's phases and peak memory

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise StepCancelled("job cancelled")


@dataclass
class StepResult:
    model: onnx.ModelProto
    changed: list[str] = field(default_factory=list)   # names of initializers / nodes it changed
    metrics: dict[str, Any] = field(default_factory=dict)


def selects_no_weight(op: str, ops: tuple[str, ...], params: Any, model: onnx.ModelProto | None = None) -> RecipeError:
    """The refusal of a step whose selection (``include`` / ``exclude`` / ``min_params``) matches
    no weight, saying what it looked for: a model whose layers are all of other kinds, or small,
    is refused with the reason, not only the field. With ``model``: the layers inside If / Loop /
    Scan bodies it would have selected are named too (this step does not reach them; a model whose
    weights all sit in a Scan body read as having none)."""
    among = f"matching include {list(params.include)}" if params.include else "in the model"
    unless = f", exclude {list(params.exclude)}" if params.exclude else ""
    why = f"no {' / '.join(ops)} weight of {params.min_params} or more elements {among}{unless}"
    if model is not None:
        from worker.pipeline import graph
        if not params.include and not params.exclude:
            why += graph.unreadable_note(model, params.min_params)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)            # body_layers names unnamed body nodes
        inside = graph.body_layers(copy, ops, set(), include=params.include, exclude=params.exclude,
                                   min_params=params.min_params)
        if inside:
            why += (f" outside control flow; {len(inside)} inside If / Loop / Scan bodies ({inside[0].weight} first), "
                    f"which {op} does not reach (quantize does)")
    loc = "include" if params.include else "exclude" if params.exclude else "min_params"
    return RecipeError(f"{op} selects no weight tensor: {why}", [{"loc": [loc], "msg": why}])
