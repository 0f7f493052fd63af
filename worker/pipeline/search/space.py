"""What the search may choose from, per model: families of settings and, inside a family, a level
per layer (``mixed_precision.Assignment``), and building one choice into a model.

Families (without a quantize step in the recipe; each only where the model has layers it applies to
and, for static int8, calibration data):
    weight-only int8 per channel      weights int8 | float per layer
    weight-only int4 block 32         weights int4 | int8 | float per layer (int8 / float where needed)
    dynamic int8                      weights int8 | float per layer, activations quantized at run time
    static int8                       weights int8 | float, each activation int8 | float
    fp16                              one setting for the whole model
With a quantize step in the recipe, that step is the only family: its setting is where every layer
starts, and the search relaxes layers from there (int4 -> int8 -> float, int8 -> float).
Sparsity and low rank are not searched (yet): a recipe's prune / lowrank steps run before the search.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import onnx

from core.errors import FeatherweightError, RecipeError
from core.recipe import Fp16Step, QuantizeStep
from worker.pipeline import registry
from worker.pipeline.quantize import mixed_precision
from worker.pipeline.step import StepContext, StepResult
from worker.pipeline.steps.quantize import run_once


@dataclass(frozen=True)
class Family:
    name: str
    params: QuantizeStep | None          # None: fp16

    @property
    def per_layer(self) -> bool:
        return self.params is not None

    def kinds(self) -> tuple[str, ...]:
        if self.params is None:
            return ()
        static = self.params.activations is not None and self.params.activations.calibration != "dynamic"
        return ("weight", "activation") if static else ("weight",)


def _quantize(spec: dict) -> QuantizeStep:
    return QuantizeStep.model_validate({"op": "quantize", **spec})


def default_families(has_calibration: bool) -> list[Family]:
    families = [
        Family("weight-only int8", _quantize({"weights": {"bits": 8, "granularity": "channel"}})),
        Family("dynamic int8", _quantize({"weights": {"bits": 8}, "activations": {"calibration": "dynamic"}})),
        Family("fp16", None),
        Family("weight-only int4", _quantize({"weights": {"bits": 4, "granularity": "block", "block_size": 32}})),
    ]
    if has_calibration:
        families.insert(2, Family("static int8", _quantize({"weights": {"bits": 8},
                                                            "activations": {"calibration": "minmax"}})))
    return families


def recipe_family(step: QuantizeStep) -> Family:
    return Family("recipe quantize", step)


def quantize_once(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    return run_once(model, params, ctx)


def applies(family: Family, model: onnx.ModelProto, ctx: StepContext) -> str | None:
    """None when the family can be built on this model, else why not."""
    module = registry.step_module("fp16" if family.params is None else "quantize")
    check = getattr(module, "check", None)
    if check is None:
        return None
    try:
        check(model, family.params or Fp16Step(op="fp16"), ctx)
    except RecipeError as exc:
        return exc.detail
    return None


def keep_io_annotations(source: onnx.ModelProto, built: onnx.ModelProto) -> None:
    """Give ``built``'s graph inputs and outputs ``source``'s type annotations. The opset upgrade
    int4 needs rewrites fixed dims it cannot re-derive as new dim_params (all-MiniLM-L6-v2's
    ``sentence_embedding`` [batch, 384] came back [batch, 'Divsentence_embedding_dim_1']), which the
    runner's interface check refuses after the whole search; the values computed are the same."""
    for theirs, ours in ((source.graph.input, built.graph.input), (source.graph.output, built.graph.output)):
        by_name = {value.name: value for value in theirs}
        for value in ours:
            if value.name in by_name and value.type != by_name[value.name].type:
                value.type.CopyFrom(by_name[value.name].type)


def build(model: onnx.ModelProto, family: Family, assignment: mixed_precision.Assignment,
          ctx: StepContext) -> tuple[StepResult, StepContext]:
    """The model with ``family`` at ``assignment`` (a trial: the job's layer records untouched)."""
    result, work = _build(model, family, assignment, ctx)
    keep_io_annotations(model, result.model)
    return result, work


def _build(model: onnx.ModelProto, family: Family, assignment: mixed_precision.Assignment,
           ctx: StepContext) -> tuple[StepResult, StepContext]:
    if family.params is None:
        work = replace(ctx, layers=copy.deepcopy(ctx.layers), options=dict(ctx.options))
        own = onnx.ModelProto()
        own.CopyFrom(model)
        return registry.step_module("fp16").run(own, Fp16Step(op="fp16"), work), work
    return mixed_precision.build(model, family.params, ctx, assignment, quantize_once)


BuildError = (FeatherweightError, ValueError, RuntimeError)
