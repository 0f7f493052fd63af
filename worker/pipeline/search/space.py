"""What the search may choose from, per model: families of settings and, inside a family, a level
per layer (``mixed_precision.Assignment``), and building one choice into a model.

Families (without a quantize step in the recipe; each only where the model has layers it applies to
and, for static int8, calibration data):
    weight-only int8 per channel      weights int8 | float per layer
    weight-only int4 per channel      weights int4 | int8 | float per layer (one scale per output
                                      channel: Conv weights too, where blocks of 32 along a
                                      depthwise Conv's 9 inputs would store a scale per weight)
    weight-only int4 block 32         weights int4 | int8 | float per layer (int8 / float where needed)
    int4 GPTQ block 32                the same levels, the int4 layers rounded by GPTQ (each on the
                                      Hessian of its calibration inputs, mse scales: the fixed
                                      ``ours-int4-gptq`` recipe); with calibration data only. Its
                                      per-layer sensitivity is its twin's (RTN int4 block 32, shared:
                                      GPTQ per probe run would be a Hessian solve each): it orders
                                      the layers, and the bisection on real GPTQ builds finds how far
                                      the path must go; not built where the twin, same file size,
                                      is already larger than a model that meets
    sparse 50% + int8                 weights pruned by magnitude (half of each layer) then int8 |
                                      int8 | float per layer; the pruned integer weights stored as
                                      bitmask + values (``sparse_storage``)
    low rank 50% + int8               MatMul / Gemm weights as two SVD factors holding half the
                                      parameters, then int8 | int8 | float per layer
    dynamic int8                      weights int8 | float per layer, activations quantized at run time
    static int8                       weights int8 | float, each activation int8 | float
    fp16                              one setting for the whole model
A family with a *transform* (``prune`` / ``lowrank``) has one level below its quantize setting,
``TRANSFORMED``: the layer transformed, then quantized. A layer the transform does not select
(an embedding, a depthwise Conv for low rank) starts at the quantize setting.
With a quantize step in the recipe, that step is the only family: its setting is where every layer
starts, and the search relaxes layers from there (int4 -> int8 -> float, int8 -> float); a recipe's
prune / lowrank steps run before the search as given.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import onnx

from core.errors import FeatherweightError, RecipeError
from core.recipe import Fp16Step, LowrankStep, PruneStep, QuantizeStep
from worker.pipeline import file_names, graph, registry, sensitivity
from worker.pipeline.finalize import drop_added_value_info
from worker.pipeline.quantize import mixed_precision, small_tensors, sparse_storage, zero_points
from worker.pipeline.step import StepContext, StepResult
from worker.pipeline.steps.lowrank import truncated_svd
from worker.pipeline.steps.quantize import run_once

GPTQ_FAMILY = "int4 GPTQ"
TRANSFORMED = 0              # a weight's level: the family's transform applied, then its quantize setting
SPARSITY = 0.5
RANK_RATIO = 0.5


@dataclass(frozen=True)
class Family:
    name: str
    params: QuantizeStep | None          # None: fp16
    transform: PruneStep | LowrankStep | None = None
    twin: str | None = None         # a family on the same grid (files the same size) that rounds another
                                    # way: its per-layer sensitivity is reused as this one's ranking

    @property
    def per_layer(self) -> bool:
        return self.params is not None

    def ladder(self, kind: str) -> list[int]:
        """A weight's or activation's levels, lowest first (bits; FLOAT; TRANSFORMED below the setting)."""
        levels = mixed_precision.ladder(self.params, kind)
        return [TRANSFORMED, *levels] if self.transform is not None and kind == "weight" else levels

    def bits(self, level: int) -> float:
        """Stored bits per weight of the original layer at ``level`` (what a move up costs)."""
        if level != TRANSFORMED:
            return float(level)
        base = self.params.weights.bits if self.params.weights is not None else 8
        if isinstance(self.transform, PruneStep):
            return base * (1.0 - self.transform.sparsity) + 1.0     # the kept values + a bitmask bit
        return base * self.transform.rank_ratio

    def transformable(self, model: onnx.ModelProto) -> set[str]:
        """The weights the transform selects (empty without one)."""
        if self.transform is None:
            return set()
        ops = ("MatMul", "Gemm") if isinstance(self.transform, LowrankStep) else sensitivity.PRUNABLE_OPS
        return {layer.weight for layer in graph.weight_layers(model, ops=ops, min_params=self.transform.min_params)}

    def transformed_weight(self, w: np.ndarray, layer: graph.WeightLayer) -> np.ndarray:
        """``w`` transformed as the build transforms it (low rank: in weight space, as a probe)."""
        if isinstance(self.transform, PruneStep):
            return sensitivity.fake_prune(w, layer, self.transform)
        matrix = np.asarray(w, np.float32)
        if layer.op == "Gemm" and layer.in_axis == 1:         # transB: W[N, K]
            matrix = matrix.T
        a, b, _, _ = truncated_svd(matrix, self.transform)
        approximation = a @ b
        return (approximation.T if layer.op == "Gemm" and layer.in_axis == 1 else approximation).astype(np.float32)

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
        # the static int8 recipe we ship, option for option (percentile ranges): its uniform build is
        # that recipe's file (minmax here left the classifier's 11 bytes above it: one range pair
        # not shared), and percentile kept the task metric as well or better on every real model
        families.insert(2, Family("static int8", _quantize({"weights": {"bits": 8}, "activations": {}})))
    int8 = _quantize({"weights": {"bits": 8, "granularity": "channel"}})
    families.append(Family("weight-only int4 per channel", _quantize({"weights": {"bits": 4, "granularity": "channel"}})))
    if has_calibration:
        # the recipe we ship for int4 (bench ``ours-int4-gptq``): on the PP-OCR recognizer it keeps the
        # task metric at 4.9x where RTN int4 misses the budget and the search fell back to fp16. Last
        # of the uniform builds (a GPTQ build solves every layer: the slowest), and not built where
        # RTN int4 in blocks of 32 (its twin) is already larger than a model that meets
        families.append(Family(GPTQ_FAMILY, _quantize({"weights": {"bits": 4, "granularity": "block",
                                                                   "block_size": 32, "scale_search": "mse"},
                                                       "method": "gptq"}), twin="weight-only int4"))
    families += [
        Family(f"sparse {SPARSITY:.0%} + int8", int8,
               PruneStep(op="prune", method="magnitude", sparsity=SPARSITY, scope="layer")),
        Family(f"low rank {RANK_RATIO:.0%} + int8", int8,
               LowrankStep(op="lowrank", rank_ratio=RANK_RATIO, conv="none")),
    ]
    return families


def recipe_family(step: QuantizeStep) -> Family:
    return Family("recipe quantize", step)


def quantize_once(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    return run_once(model, params, ctx)


def applies(family: Family, model: onnx.ModelProto, ctx: StepContext) -> str | None:
    """None when the family can be built on this model, else why not."""
    module = registry.step_module("fp16" if family.params is None else "quantize")
    check = getattr(module, "check", None)
    try:
        if check is not None:
            check(model, family.params or Fp16Step(op="fp16"), ctx)
        if family.transform is not None:
            model = sensitivity.prepared_copy(model)     # Constant-node weights as initializers
            registry.step_module(family.transform.op).check(model, family.transform, ctx)
    except RecipeError as exc:
        return exc.detail
    if family.transform is not None and not family.transformable(model):
        return f"no weight the {family.transform.op} step selects"
    return None


def written_form(model: onnx.ModelProto, family: Family, original: onnx.ModelProto,
                 file_node_names: set[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the lossless changes ``finalize`` makes to the file it writes: a
    quantized family's all-zero zero points dropped and identical scales / constants stored once,
    the node names the steps added cleared, the tensor names they invented made short and the shapes
    they inferred (value_info) left out. Sizes were
    measured before these, so the frontier's bytes were not the files' (a ViT's chosen candidate
    listed at 353,378 bytes, its model.onnx 326,021), and candidates were ranked on the wrong numbers."""
    written = onnx.ModelProto()
    written.CopyFrom(model)
    if family.params is not None:
        zero_points.drop_zero_points(written)
        small_tensors.lift_constants(written)
        small_tensors.share_identical(written)
    file_names.clear_added_node_names(written, original, file_node_names)
    file_names.shorten(written, original)
    drop_added_value_info(original, written)
    return written


def stored_model(model: onnx.ModelProto, family: Family, by: str, original: onnx.ModelProto,
                 file_node_names: set[str] | None = None) -> onnx.ModelProto:
    """The model as the job would write it (``written_form``): a pruned family's integer weights in
    the sparse storage ``finalize`` gives them too, judged ``by`` raw or zstd bytes (each tensor
    alone: no whole-file trials)."""
    stored = written_form(model, family, original, file_node_names)
    if isinstance(family.transform, PruneStep):
        sparse_storage.store_sparse(stored, whole_file_work=0, by=by)
    return stored


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
    if family.transform is not None:
        # the layers still at TRANSFORMED (every one the assignment did not move up) transformed
        # first, on a copy with Constant-node weights lifted (the prune and lowrank steps read
        # initializers), with the trial's own layer records (a prune's masks reach the quantizer)
        own = sensitivity.prepared_copy(model)
        chosen = sorted(family.transformable(own) - set(assignment.weights))
        if chosen:
            ctx = replace(ctx, layers=copy.deepcopy(ctx.layers), options=dict(ctx.options))
            # low rank in weight space, as the sensitivity probe measured it: the output-aware SVD
            # captures every layer's input Hessian per build (115 s a build on all-MiniLM-L6-v2)
            transform_ctx = replace(ctx, calibration=None) if isinstance(family.transform, LowrankStep) else ctx
            step = family.transform.model_copy(update={"include": [sensitivity.glob_escape(n) for n in chosen]})
            model = registry.step_module(step.op).run(own, step, transform_ctx).model
    return mixed_precision.build(model, family.params, ctx, assignment, quantize_once)


BuildError = (FeatherweightError, ValueError, RuntimeError)
