"""Per-layer sensitivity: what one layer (or one activation tensor) compressed alone, the rest of the
model float, does to the model's output, measured on a bounded subset of the data.

For a quantize step: each selected weight at the step's setting (bits, granularity, symmetry; the
rounding is round-to-nearest even where the step uses GPTQ), and, under static activation
quantization, each tensor the static quantizer would put a QuantizeLinear / DequantizeLinear on,
at the range it calibrates on the subset. For a prune step: each selected weight at the step's
sparsity and structure (magnitude: the smallest |w| of the layer, the smallest of each M along the
input axis for N:M, the output channels of least L2 norm for ``channel``).

Cost: ONE ONNX Runtime session for all candidates of a step, not one per candidate:
- every candidate weight is also declared as a graph input, so its initializer is only a default
  that a feed overrides (ONNX IR >= 4): one candidate = one run with its compressed copy fed;
- every candidate activation ``t`` is rewired through ``If(g_t, DQ(Q(t)), t)`` with a boolean gate
  ``g_t`` (an overridable initializer, false): feeding ``g_t = true`` quantizes that tensor alone,
  and a closed gate runs only an Identity.
A run with no overrides gives the float reference, so N candidates cost N + 1 forward passes of the
subset. Graph optimisation stays at the basic level so that ONNX Runtime neither folds the
overridable weights nor fuses anything across a gate.

The error of a candidate is ``loss(reference outputs, outputs)``; by default the relative L2 norm
over every float output, as the report's fidelity measures it.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import kernels
from core.recipe import PruneStep, QuantizeStep, WeightQuantSpec
from worker.pipeline import calibrate, graph, sessions
from worker.pipeline.data import Dataset, bind, generated
from worker.pipeline.quantize import lift_constants, static, weight_only
from worker.pipeline.step import StepCancelled
from worker.pipeline.steps.prune import PRUNABLE_OPS

DEFAULT_SAMPLES = 32
GATE_SUFFIX = "__fw_sensitivity_gate"

Loss = Callable[[list[np.ndarray], list[np.ndarray]], float]


class OutOfTime(Exception):
    """The caller's time ran out while measuring."""


@dataclass
class Entry:
    """One candidate's measured effect. ``exclude``: patterns a recipe's ``exclude`` takes to keep it float."""

    name: str
    kind: str                   # "weight" | "activation"
    op: str
    node: str
    params: int
    setting: str
    error: float
    exclude: list[str] = field(default_factory=list)


@dataclass
class Sensitivity:
    step: int | None
    op: str
    setting: str
    metric: str
    samples: int
    seconds: float
    entries: list[Entry]        # most sensitive first
    data: str = "calibration"   # which data set the subset came from

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["entries"] = [asdict(e) for e in self.entries]
        return out

    def ranked(self, kind: str | None = None) -> list[Entry]:
        return [e for e in self.entries if kind is None or e.kind == kind]


def glob_escape(name: str) -> str:
    """A pattern that matches exactly ``name`` under fnmatch (``[`` ``]`` ``*`` ``?`` made literal)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def rel_l2(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """sqrt(sum ||y' - y||^2) / sqrt(sum ||y||^2) over every float output (report.fidelity's rel_l2)."""
    diff2 = ref2 = 0.0
    for y, z in zip(reference, outputs):
        if np.asarray(y).dtype.kind != "f":
            continue
        y64 = np.asarray(y, dtype=np.float64).ravel()
        d = np.asarray(z, dtype=np.float64).ravel() - y64
        if not np.isfinite(d).all():
            return math.inf
        diff2 += float(d @ d)
        ref2 += float(y64 @ y64)
    if ref2 == 0:
        return 0.0 if diff2 == 0 else math.inf
    return math.sqrt(diff2 / ref2)


# ------------------------------------------------------------------------------ one layer, compressed


def weight_spec(step: QuantizeStep) -> WeightQuantSpec:
    """The grid a quantize step gives weights: its own, or int8 per channel (static / dynamic)."""
    return step.weights or WeightQuantSpec(bits=8, granularity="channel")


def setting_label(step: QuantizeStep | PruneStep) -> str:
    if isinstance(step, PruneStep):
        return f"{step.method} {step.structure} sparsity {step.sparsity:g}"
    spec = weight_spec(step)
    weights = ("sign" if spec.bits == 1 else
               f"int{spec.bits} {spec.granularity}" + (f" {spec.block_size}" if spec.block_size else ""))
    if step.activations is None:
        return f"weights {weights}"
    return f"weights {weights}, activations int8 {step.activations.calibration}"


def fake_quantize(w: np.ndarray, layer: graph.WeightLayer, spec: WeightQuantSpec) -> np.ndarray:
    """w' = dequantize(quantize(w)) on the grid ``spec`` gives this layer (round to nearest even)."""
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    if spec.bits == 1:
        axes = tuple(i for i in range(w32.ndim) if i != layer.out_axis)
        alpha = np.mean(np.abs(w32), axis=axes, keepdims=True)
        return np.where(w32 >= 0, alpha, -alpha).astype(np.float32)
    grid = weight_only.grid_for(layer, spec)
    if grid.block_size is not None and w32.shape[grid.axis] % grid.block_size:
        grid = weight_only.Grid(grid.bits, grid.signed, grid.symmetric, layer.out_axis, None, grid.method)
    q, scale, zero_point = weight_only.quantize_rtn(w32, grid)
    return weight_only.dequantize(q, scale, zero_point, grid).astype(np.float32)


def fake_prune(w: np.ndarray, layer: graph.WeightLayer, step: PruneStep) -> np.ndarray:
    """The layer's weight with ``step.sparsity`` of it zeroed by magnitude (see the module docstring)."""
    w = np.asarray(w, dtype=np.float32)
    out = w.copy()
    if step.structure == "channel":
        moved = np.moveaxis(out, layer.out_axis, 0)
        norms = np.sqrt((moved.reshape(moved.shape[0], -1) ** 2).sum(axis=1))
        drop = int(math.floor(step.sparsity * moved.shape[0]))
        moved[np.argsort(norms, kind="stable")[:drop]] = 0.0
        return out
    n_m = step.n_m
    if n_m is not None:
        n, m = n_m
        moved = np.moveaxis(out, layer.in_axis, -1)
        k = moved.shape[-1] - moved.shape[-1] % m
        groups = moved[..., :k].reshape(*moved.shape[:-1], k // m, m)
        order = np.argsort(np.abs(groups), axis=-1, kind="stable")
        np.put_along_axis(groups, order[..., : m - n], 0.0, axis=-1)
        moved[..., :k] = groups.reshape(*moved.shape[:-1], k)
        return out
    drop = int(math.floor(step.sparsity * out.size))
    if drop:
        flat = out.reshape(-1)
        flat[np.argpartition(np.abs(flat), drop - 1)[:drop]] = 0.0
    return out


# ------------------------------------------------------------------------------ the probe model


# weights as main-graph initializers (Constant weights lifted, control-flow bodies' hoisted)
prepared_copy = lift_constants.lifted_copy


def candidate_weights(model: onnx.ModelProto, step: QuantizeStep | PruneStep) -> list[graph.WeightLayer]:
    """The main-graph weights the step would touch (the quantizer's own selection)."""
    inits = graph.initializers(model)
    if isinstance(step, PruneStep):
        found = graph.weight_layers(model, ops=PRUNABLE_OPS, include=step.include, exclude=step.exclude,
                                    min_params=step.min_params)
    elif step.activations is not None and step.activations.calibration != "dynamic":
        # the int8 embedding tables too: left out, a max_output_error never moved them and pushed
        # every other layer to float trying to reach a bound the tables' own error was above
        found = static.selected_layers(model, step) + static.embedding_layers(model, step)
    else:
        found = weight_only.candidate_layers(model, step)
    return [layer for layer in found if layer.weight in inits
            and inits[layer.weight].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]


def static_activations(model: onnx.ModelProto, step: QuantizeStep,
                       layers: list[graph.WeightLayer]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(tensor -> tensor whose range it takes, tensor -> compute nodes that read it) as the static
    quantizer plans them."""
    decided = static.plan(model, step, layers)
    readers = graph.consumers(model)
    inits = graph.initializers(model)
    compute = {node.name for node in decided.compute_nodes}
    produced_by = {static._layer_output(node, readers, inits): node.name for node in decided.compute_nodes}
    outputs = {o.name for o in model.graph.output}
    # the layers whose exclusion keeps the tensor float: those that read it and the one whose output it is
    # (a ReLU folded into a tensor's quantization: the ReLU's readers read the quantized tensor)
    read_as = {t: [t] + ([decided.relu_folds[t].output[0]] if t in decided.relu_folds else []) for t in decided.calibrated}
    readers_of = {t: sorted({n.name for r in read_as[t] for n, _ in readers.get(r, []) if n.name in compute}
                            | ({produced_by[t]} if t in produced_by else set())) for t in decided.calibrated}
    return ({t: s for t, s in decided.calibrated.items() if t not in outputs}, readers_of)


def _gate(model: onnx.ModelProto, tensor: str, scale: float, zero_point: int, signed: bool) -> str:
    """Rewire ``tensor``'s readers through ``If(gate, DQ(Q(tensor)), tensor)``; returns the gate's
    name. ONNX Runtime runs only the branch taken, so a closed gate costs next to nothing (a gated
    arithmetic blend ``t + g * (DQ(Q(t)) - t)`` computed every Q/DQ on every run: on the PP-OCR
    detector, 200 of them made each probe run several times slower than the model)."""
    base = graph.unique_name(model, tensor + GATE_SUFFIX)
    names = {k: graph.unique_name(model, f"{base}_{k}") for k in ("s", "z", "q", "dq", "same", "out")}
    zdtype = np.int8 if signed else np.uint8
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(False), base))
    model.graph.input.append(helper.make_tensor_value_info(base, onnx.TensorProto.BOOL, []))
    quantized = helper.make_graph(
        [helper.make_node("QuantizeLinear", [tensor, names["s"], names["z"]], [names["q"]], name=names["q"]),
         helper.make_node("DequantizeLinear", [names["q"], names["s"], names["z"]], [names["dq"]], name=names["dq"])],
        names["dq"] + "_branch", [], [helper.make_tensor_value_info(names["dq"], onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(scale, dtype=np.float32), names["s"]),
         numpy_helper.from_array(np.asarray(zero_point, dtype=zdtype), names["z"])])
    unchanged = helper.make_graph(
        [helper.make_node("Identity", [tensor], [names["same"]], name=names["same"])],
        names["same"] + "_branch", [], [helper.make_tensor_value_info(names["same"], onnx.TensorProto.FLOAT, None)])
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == tensor:
                node.input[index] = names["out"]
    model.graph.node.append(helper.make_node("If", [base], [names["out"]], name=names["out"],
                                             then_branch=quantized, else_branch=unchanged))
    return base


def _overridable(model: onnx.ModelProto, names: Sequence[str]) -> None:
    inits = graph.initializers(model)
    present = {i.name for i in model.graph.input}
    for name in names:
        if name not in present:
            tensor = inits[name]
            model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))


@dataclass
class Probe:
    """One session over a subset, able to measure any override set; also the goal search's tool."""

    session: ort.InferenceSession
    feeds: list[dict[str, np.ndarray]]
    reference: list[list[np.ndarray]]
    output_names: list[str]

    def run(self, overrides: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        return [self.session.run(self.output_names, {**feeds, **overrides}) for feeds in self.feeds]

    def error(self, overrides: dict[str, np.ndarray], loss: Loss) -> float:
        got = self.run(overrides)
        # outputs whose shape depends on the data (NonMaxSuppression) are compared where they can be:
        # an output whose shape moved on some batch leaves the comparison (as in the report's fidelity)
        kept = [i for i in range(len(self.output_names))
                if all(np.shape(want[i]) == np.shape(have[i]) for want, have in zip(self.reference, got))]
        if not kept:
            return math.inf

        def pick(batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
            return [[batch[i] for i in kept] for batch in batches]
        return loss(_concat(pick(self.reference)), _concat(pick(got)))


def _concat(batches: list[list[np.ndarray]]) -> list[np.ndarray]:
    if len(batches) == 1:
        return batches[0]
    return [np.concatenate([np.asarray(b[i]).reshape(1, *np.shape(b[i])) if np.ndim(b[i]) == 0 else b[i]
                            for b in batches], axis=0) for i in range(len(batches[0]))]


def build_probe(model: onnx.ModelProto, data: Dataset, weights: Sequence[str],
                gates: dict[str, tuple[float, int, bool]], *, samples: int) -> tuple[Probe, dict[str, str]]:
    """A session on a copy of ``model`` with ``weights`` overridable and ``gates`` (tensor -> scale,
    zero point, signed) inserted; returns it and tensor -> gate input name."""
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    _overridable(probe_model, weights)
    gate_names = {t: _gate(probe_model, t, *grid) for t, grid in gates.items()}
    graph.sort_graph(probe_model)
    session = sessions.probe_session(probe_model)
    del probe_model
    feeds = list(data.batches(64, limit=samples))
    names = [o.name for o in model.graph.output]
    reference = [session.run(names, f) for f in feeds]
    return Probe(session, feeds, reference, names), gate_names


# ------------------------------------------------------------------------------ measuring


def measure(model: onnx.ModelProto, step: QuantizeStep | PruneStep, data: Dataset, *,
            samples: int = DEFAULT_SAMPLES, step_index: int | None = None, loss: Loss = rel_l2,
            metric: str = "rel_l2", cancelled: Callable[[], bool] = lambda: False,
            progress: Callable[[float, str], None] = lambda f, m: None,
            out_of_time: Callable[[], bool] = lambda: False) -> Sensitivity:
    """Every candidate of ``step`` alone on ``model`` over the first ``samples`` samples of ``data``;
    ``OutOfTime`` as soon as ``out_of_time()`` says so (the goal search's budget)."""
    started = time.perf_counter()
    prepared = prepared_copy(model)
    if isinstance(step, QuantizeStep) and step.activations is not None \
            and step.activations.calibration != "dynamic" and graph.opset(prepared) < 13:
        prepared = static.prepare(prepared)       # static quantizes per axis at opset >= 13, BatchNorm folded
    data = bind(prepared, {**data.arrays, **({} if data.labels is None else {"_labels": data.labels})}).head(samples)
    layers = candidate_weights(prepared, step)

    gates: dict[str, tuple[float, int, bool]] = {}
    readers_of: dict[str, list[str]] = {}
    if isinstance(step, QuantizeStep) and step.activations is not None and step.activations.calibration != "dynamic":
        plan, readers_of = static_activations(prepared, step, layers)
        spec = step.activations
        ranges = calibrate.calibrate(prepared, data, sorted(set(plan.values())), method=spec.calibration,
                                     percentile=spec.percentile)
        for tensor, source in plan.items():
            found = ranges.get(source)
            if found is None or found.masked:
                continue
            bounds = np.array([found.lo, found.hi], dtype=np.float32)
            if spec.symmetric:
                scale, zero = kernels.choose_qparams(bounds, bits=8, symmetric=True, signed=True, method="absmax")
            else:
                scale, zero = kernels.choose_qparams(bounds, bits=8, symmetric=False, signed=False, method="minmax")
            gates[tensor] = (float(np.asarray(scale).reshape(-1)[0]), int(np.asarray(zero).reshape(-1)[0]), spec.symmetric)

    probe, gate_names = build_probe(prepared, data, [layer.weight for layer in layers], gates, samples=samples)
    label = setting_label(step)
    entries: list[Entry] = []
    total = len(layers) + len(gates)
    for index, layer in enumerate(layers):
        if cancelled():
            raise StepCancelled("job cancelled")
        if out_of_time():
            raise OutOfTime(f"sensitivity stopped after {index} of {total} candidates")
        tensor = graph.initializers(prepared)[layer.weight]
        w = numpy_helper.to_array(tensor)
        compressed = (fake_prune(w, layer, step) if isinstance(step, PruneStep)
                      else fake_quantize(w, layer, weight_spec(step)))
        error = probe.error({layer.weight: compressed.astype(w.dtype)}, loss)
        entries.append(Entry(layer.weight, "weight", layer.op, layer.node, layer.params, label, error,
                             [glob_escape(layer.weight)]))
        progress((index + 1) / max(total, 1), f"sensitivity {index + 1}/{total}")
    for index, (tensor, gate) in enumerate(gate_names.items()):
        if cancelled():
            raise StepCancelled("job cancelled")
        if out_of_time():
            raise OutOfTime(f"sensitivity stopped after {len(layers) + index} of {total} candidates")
        error = probe.error({gate: np.asarray(True)}, loss)
        entries.append(Entry(tensor, "activation", "QuantizeLinear", ", ".join(readers_of.get(tensor, [])), 0,
                             f"activations int8 {step.activations.calibration}", error,
                             [glob_escape(n) for n in readers_of.get(tensor, [])]))
        progress((len(layers) + index + 1) / max(total, 1), f"sensitivity {len(layers) + index + 1}/{total}")
    entries.sort(key=lambda e: (-e.error if math.isfinite(e.error) else -math.inf, e.name))
    return Sensitivity(step_index, step.op, label, metric, data.size, time.perf_counter() - started, entries)


def report_rows(results: Sequence[Sensitivity], top: int | None = None) -> list[dict[str, Any]]:
    """report.json ``sensitivity``: one row per measured step, entries ranked (``top`` of them)."""
    rows = []
    for result in results:
        row = result.as_dict()
        if top is not None and len(row["entries"]) > top:
            row["entries_shown"] = top
            row["entries"] = row["entries"][:top]
        rows.append(row)
    return rows


def artifact(results: Sequence[Sensitivity]) -> dict[str, Any]:
    """sensitivity.json: every measured entry, plus, per step, the ``exclude`` lines that keep its
    most sensitive tenth float (at least one), ready to paste into the step."""
    steps = []
    for result in results:
        row = result.as_dict()
        keep = max(1, len(result.entries) // 10) if result.entries else 0
        row["suggested_exclude"] = sorted({p for e in result.entries[:keep] for p in e.exclude})
        steps.append(row)
    return {"metric": results[0].metric if results else "rel_l2",
            "about": "each entry: that weight or activation compressed alone, the rest float; error of the "
                     "model's outputs on the subset. Copy an entry's exclude patterns into the step's exclude.",
            "steps": steps}


def wanted(recipe: Any, step: Any) -> bool:
    """Measured before this step: the recipe asks for it, or the step's error bound needs it."""
    if not isinstance(step, (QuantizeStep, PruneStep)):
        return False
    return recipe.sensitivity is not None or (isinstance(step, QuantizeStep) and step.max_output_error is not None)


def data_for(calibration: Dataset | None, evaluation: Dataset | None, model: onnx.ModelProto) -> tuple[Dataset, str]:
    """The calibration data, else the evaluation data, else generated inputs (and which it was)."""
    if calibration is not None:
        return calibration, "calibration"
    if evaluation is not None:
        return evaluation, "evaluation"
    return generated(model, count=DEFAULT_SAMPLES), "generated"


def write_artifact(results: Sequence[Sensitivity], path: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(_finite(artifact(results)), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
