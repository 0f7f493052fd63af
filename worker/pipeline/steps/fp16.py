"""The ``fp16`` step: float16 weights and compute, float32 graph inputs and outputs kept.

Which nodes compute in float16 (a node takes float16 for every type variable of its schema that
carries float32 here and allows float16 - so Resize's scales, LayerNormalization's Mean stay float):
- measured first: the float32 model runs on the calibration data (else evaluation, else generated
  inputs) with every intermediate tensor exposed; a node touching a tensor whose |max| exceeds
  65504 / 2 (or, for Exp and Pow outputs, 65504 / 100: they grow fastest past what was seen) stays
  float32, as does a node touching an initializer or Constant out of float16's range (an attention
  mask of -3.4e38) or a non-finite value;
- kept float32 always: integers computed through float (a Cast from an integer, float
  arithmetic on no weight, a Cast back to an integer: T5's position buckets), a static int8
  model's integer kernels (the nodes between an activation's Q/DQ pairs), ops whose outputs or
  attributes are typed float32 by construction (Range, ConstantOfShape, EyeLike, Random*), ops
  with subgraphs (If, Loop, Scan) and the producers of any tensor a subgraph reads, ops outside
  the default domain, and the recipe's ``op_block_list``;
- then checked in the target's ONNX Runtime provider (CUDA for ``gpu`` where it runs, else the
  CPU provider): an op without a float16 kernel there is put back to float32, and a node whose float16 output is NaN / Inf on the data where the float32 one was
  finite too, until the model loads and is finite on the data; then run once as users run it
  (every optimization on, no intermediate exposed).

Casts go where float16 and float32 meet (one per tensor and direction); float32 initializers read
only by float16 nodes are stored as float16; graph inputs and outputs keep float32.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.errors import PipelineError, RecipeError
from core.recipe import Fp16Step
from worker.pipeline import graph, metrics, sessions, subgraphs
from worker.pipeline.data import Dataset, bind, generated
from worker.pipeline.step import LayerRecord, StepContext, StepResult

name = "fp16"
Params = Fp16Step

FP16_MAX = 65504.0
OVERFLOW_LIMIT = FP16_MAX * 0.5
EXPLOSIVE_LIMIT = {"Exp": FP16_MAX * 0.01, "Pow": FP16_MAX * 0.01}
ALWAYS_FLOAT32 = frozenset({
    "Range", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "Multinomial", "If", "Loop", "Scan", "NonMaxSuppression",
})
MEASURE_SAMPLES = 32
MEASURE_BATCH = 8
MAX_ROUNDS = 32
FLOAT = onnx.TensorProto.FLOAT
FLOAT16 = onnx.TensorProto.FLOAT16
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'")


def check(model: onnx.ModelProto, params: Fp16Step, ctx: StepContext) -> None:
    if not params.keep_io_types:
        why = "the output contract keeps the original's input and output dtypes: keep_io_types must be true"
        raise RecipeError(why, [{"loc": ["keep_io_types"], "msg": why}])
    stored = graph.integer_weights(model, WEIGHT_ELEMENTS)
    if stored and not graph.weight_layers(model, min_params=WEIGHT_ELEMENTS):
        # an int8 model's float tensors are its scales: converting them only added Casts (+110 bytes)
        why = (f"the model's weights are integers already ({len(stored)} behind quantized ops, {stored[0]} first): "
               "fp16 would convert only their scales and add Casts; compress the float model it was quantized from")
        raise RecipeError(why, [{"loc": ["op"], "msg": why}])


WEIGHT_ELEMENTS = 1024      # a tensor this large behind a quantized op is a weight, not a zero point


# ---------------------------------------------------------------------------- measuring


@dataclass
class TensorStats:
    dtype: dict[str, int] = field(default_factory=dict)        # ONNX elem type of every known tensor
    peak: dict[str, float] = field(default_factory=dict)       # max |x| of float32 tensors (inf if not finite)


_NUMPY_TO_ONNX = {np.dtype(np.float32): FLOAT, np.dtype(np.float16): FLOAT16, np.dtype(np.float64): onnx.TensorProto.DOUBLE,
                  np.dtype(np.int64): onnx.TensorProto.INT64, np.dtype(np.int32): onnx.TensorProto.INT32,
                  np.dtype(np.int8): onnx.TensorProto.INT8, np.dtype(np.uint8): onnx.TensorProto.UINT8,
                  np.dtype(np.bool_): onnx.TensorProto.BOOL}


def _peak(array: np.ndarray) -> float:
    if array.size == 0:
        return 0.0
    if not np.isfinite(array).all():
        return math.inf
    return float(np.max(np.abs(array)))


def measure(model: onnx.ModelProto, data: Dataset) -> TensorStats:
    """dtype and peak magnitude of every graph input, initializer, Constant and node output."""
    stats = TensorStats()
    for tensor in model.graph.initializer:
        stats.dtype[tensor.name] = tensor.data_type
        if tensor.data_type == FLOAT:
            stats.peak[tensor.name] = _peak(numpy_helper.to_array(tensor))
    names = [out for node in model.graph.node for out in node.output if out]
    for spec in data.specs:
        stats.dtype[spec.name] = _NUMPY_TO_ONNX.get(spec.dtype, onnx.TensorProto.UNDEFINED)
    session = sessions.exposed_session(model, names)
    available = {o.name for o in session.get_outputs()}
    names = [n for n in names if n in available]
    for feeds in data.batches(MEASURE_BATCH, MEASURE_SAMPLES):
        for key, value in feeds.items():
            if value.dtype == np.float32:
                stats.peak[key] = max(stats.peak.get(key, 0.0), _peak(value))
        for key, value in zip(names, session.run(names, feeds)):
            if not isinstance(value, np.ndarray):
                continue
            stats.dtype[key] = _NUMPY_TO_ONNX.get(value.dtype, onnx.TensorProto.UNDEFINED)
            if value.dtype == np.float32:
                stats.peak[key] = max(stats.peak.get(key, 0.0), _peak(value))
    return stats


# ---------------------------------------------------------------------------- deciding


def _schema(node: onnx.NodeProto, opset: int):
    if node.domain not in ("", "ai.onnx"):
        return None
    try:
        return onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return None


def _type_str(formals, index: int) -> str | None:
    if not formals:
        return None
    formal = formals[min(index, len(formals) - 1)]
    if index >= len(formals) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return None
    return formal.type_str


@dataclass
class NodePlan:
    """For a float16 node: which input / output positions switch from float32 to float16."""

    inputs: list[int]
    outputs: list[int]


def plan_node(node: onnx.NodeProto, opset: int, stats: TensorStats) -> NodePlan | str:
    """The float16 plan of ``node``, or why it stays float32."""
    if node.op_type in ALWAYS_FLOAT32:
        return f"{node.op_type} stays float32"
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return "has a subgraph"
    schema = _schema(node, opset)
    if schema is None:
        return f"no ONNX schema for {node.domain or 'ai.onnx'}::{node.op_type}"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    variables: set[str] = set()
    touched: list[tuple[str, str]] = []
    for formals, names in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for index, tensor in enumerate(names):
            if tensor and stats.dtype.get(tensor) == FLOAT:
                var = _type_str(formals, index)
                if var in allowed and "tensor(float16)" in allowed[var]:
                    variables.add(var)
                    touched.append((tensor, var))
    if not variables:
        return "no float32 tensor it can take in float16"
    limit = EXPLOSIVE_LIMIT.get(node.op_type, OVERFLOW_LIMIT)
    for tensor, _ in touched:
        peak = stats.peak.get(tensor, 0.0)
        bound = limit if tensor in node.output else OVERFLOW_LIMIT
        if peak > bound:
            return f"|{tensor}| reaches {peak:.3g} (limit {bound:.3g})"
    inputs = [i for i, t in enumerate(node.input) if t and stats.dtype.get(t) == FLOAT and _type_str(schema.inputs, i) in variables]
    outputs = [i for i, t in enumerate(node.output) if t and stats.dtype.get(t) == FLOAT and _type_str(schema.outputs, i) in variables]
    if node.op_type == "Cast" and outputs == [] and stats.dtype.get(node.output[0]) == FLOAT:
        outputs = [0]
    return NodePlan(inputs, outputs)


INTEGER_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                           onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64,
                           onnx.TensorProto.UINT64, onnx.TensorProto.BOOL})


def _integer_kernels(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes of a quantized model's Q/DQ groups (name -> why they stay float32): a node reading an
    activation's DequantizeLinear or feeding a QuantizeLinear is an integer kernel ONNX Runtime fuses. In
    float16, behind Casts, it is no group: ONNX Runtime's full optimization then ran a ConvNeXt's
    depthwise Conv on a wrongly laid out input ("Input channels C is not equal to kernel channels
    * group") where the exposed-output check passed."""
    produced_by = {out: node for node in model.graph.node for out in node.output if out}
    kept: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        # an activation's DequantizeLinear (its input computed, a QuantizeLinear's): a weight-only
        # one (int4 weights, float16 compute) reads an initializer and converts with its layer
        reads_dq = any(produced_by.get(t) is not None and produced_by[t].op_type == "DequantizeLinear"
                       and produced_by[t].input[0] in produced_by for t in node.input if t)
        if reads_dq:
            kept[node.name] = "reads a quantized activation: part of an int8 kernel"
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input and node.input[0] in produced_by:
            source = produced_by[node.input[0]]
            if source.op_type != "DequantizeLinear":
                kept.setdefault(source.name, "feeds a QuantizeLinear: part of an int8 kernel")
    return kept


def _index_arithmetic(model: onnx.ModelProto, stats: TensorStats) -> dict[str, str]:
    """Nodes that compute integers through float (name -> why they stay float32): the float cone
    between a Cast from an integer and a Cast back to one, touching no weight. T5's relative
    position buckets are ``int(log(distance / 8) / log(16) * 8)``: in float16 a distance of 16
    gives 1.99 where float32 gives 2.0, and the bias table is read at the wrong row (a sweep's T5
    came out at rel_l2 0.019 where fp16 keeps 0.0003 elsewhere). Such cones are scalar-sized
    arithmetic on positions and shapes; float32 costs nothing there. A cone that reaches no integer
    again (token ids cast to float and fed to a network) is data, not an index, and converts."""
    constants = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = 1 if not node.attribute or not node.attribute[0].t.dims else \
                int(np.prod(node.attribute[0].t.dims))
    derived: set[str] = set()           # float tensors computed from integers only
    producer: dict[str, onnx.NodeProto] = {}
    sinks: list[onnx.NodeProto] = []
    for node in model.graph.node:
        floats = [t for t in node.input if t and stats.dtype.get(t) == FLOAT]
        if node.op_type == "Cast" and node.input and stats.dtype.get(node.input[0]) in INTEGER_TYPES:
            ok = stats.dtype.get(node.output[0]) == FLOAT
        elif node.op_type == "Cast" and floats and floats[0] in derived \
                and stats.dtype.get(node.output[0]) in INTEGER_TYPES:
            sinks.append(node)
            continue
        else:
            ok = (bool(floats) and any(t in derived for t in floats)
                  and all(t in derived or constants.get(t, WEIGHT_ELEMENTS) < WEIGHT_ELEMENTS for t in floats))
        if ok:
            for out in node.output:
                if out and stats.dtype.get(out) == FLOAT:
                    derived.add(out)
                    producer[out] = node
    why = "computes integers through float (an index: float16 would move it)"
    constant_nodes = {node.output[0]: node for node in model.graph.node if node.op_type == "Constant"}
    kept: dict[str, str] = {}
    pending = [sink.input[0] for sink in sinks if producer.get(sink.input[0]) is not None]
    # the Cast back reads float32, and the cone's Constants keep their float32 values (log(16)
    # rounded to float16 moves the bucket as surely as the arithmetic)
    kept.update({sink.name: why for sink in sinks if producer.get(sink.input[0]) is not None})
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in kept:
            continue
        kept[node.name] = why
        pending.extend(t for t in node.input if t in derived)
        kept.update({constant_nodes[t].name: why for t in node.input if t in constant_nodes})
    return kept


def _transposes_ort_crashes_on(model: onnx.ModelProto, plans: dict[str, NodePlan]) -> dict[str, str]:
    """Float16 Transposes to keep float32 because ONNX Runtime dies loading them (name -> why).

    ONNX Runtime 1.32's NchwcTransformer (ORT_ENABLE_ALL, every session's default) segfaults on a
    float16 Transpose (perm [1, 0, 2], [1, 2, 0], [1, 2, 0, 3], seen on a CPU with AVX512-FP16) that
    feeds a MatMul whose other operand is a constant or folds to one (a tied weight behind an
    Identity): ``nn.MultiheadAttention(batch_first=True)`` and a batch-first RNN's output into a
    Linear export exactly that. The checks below never see it: their sessions expose every tensor,
    which blocks the rewrite. A Transpose only moves data: kept float32 with a Cast after it, the
    MatMul still computes in float16 on float16 weights. A Cast or Identity between the two counts as
    nothing (ONNX Runtime drops no-op ones first)."""
    inputs = {i.name for i in model.graph.input}
    constants = {t.name for t in model.graph.initializer if t.name not in inputs}
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.input and all(not t or t in constants for t in node.input)):
            constants.update(o for o in node.output if o)
    # every such MatMul, planned or not: in a model already float16 its inputs are float16 and it has
    # no plan, yet ONNX Runtime still fuses the Transpose into it
    beside_a_constant = {t for node in model.graph.node
                         if node.op_type == "MatMul" and any(t in constants for t in node.input)
                         for t in node.input}
    # through Casts and Identities, which ONNX Runtime removes before that rewrite: a model this step
    # converted before carries Transpose (float32) -> Cast -> MatMul, and converting it again made
    # that Transpose float16 and crashed
    producers = graph.producers(model)
    pending = list(beside_a_constant)
    while pending:
        node = producers.get(pending.pop())
        if node is not None and node.op_type in ("Cast", "Identity") and node.input[0] not in beside_a_constant:
            beside_a_constant.add(node.input[0])
            pending.append(node.input[0])
    # a Transpose of a constant (a tied embedding table's) is folded away at load, not the crash's
    # pattern: kept float32 it stored the table twice (fp16 of a tied LM came out larger than float32)
    return {node.name: "a float16 Transpose into a MatMul with a constant crashes ONNX Runtime's NchwcTransformer"
            for node in model.graph.node
            if node.op_type == "Transpose" and node.name in plans and node.output[0] not in constants
            and any(o in beside_a_constant for o in node.output)}


# ---------------------------------------------------------------------------- rewriting


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]) -> None:
        self.model = model
        self.inits = inits
        self.casts: dict[tuple[str, int], str] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.taken = (set(inits) | {n.name for n in model.graph.node}
                      | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
                      | {o.name for o in model.graph.output})

    def fresh(self, base: str) -> str:
        return graph.fresh_name(base, self.taken)

    def as_type(self, tensor: str, to: int) -> str:
        """``tensor`` in type ``to``: a float16 copy of an initializer, or one Cast per tensor."""
        key = (tensor, to)
        if key in self.casts:
            return self.casts[key]
        new = self.fresh(f"{tensor}_{'fp16' if to == FLOAT16 else 'fp32'}")
        init = self.inits.get(tensor)
        if init is not None and to == FLOAT16:
            self.new_inits.append(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), new))
        else:
            self.new_nodes.append(helper.make_node("Cast", [tensor], [new], name=self.fresh(f"Cast_{new}"), to=to))
        self.casts[key] = new
        return new


def _constant_to_float16(node: onnx.NodeProto) -> None:
    """A float32 Constant (value / value_float / value_floats) rewritten as a float16 ``value``."""
    attr = node.attribute[0]
    value = helper.get_attribute_value(attr)
    array = numpy_helper.to_array(value) if attr.type == onnx.AttributeProto.TENSOR else np.asarray(value, np.float32)
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(array.astype(np.float16))))


def _copy_fields(source, target, skip: tuple[str, ...] = ()) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):            # repeated
            getattr(target, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):        # message
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every field but the initializers (and the stale value_info)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer", "value_info"))
    return out


def convert(model: onnx.ModelProto, plans: dict[str, NodePlan]) -> tuple[onnx.ModelProto, int]:
    """A float16 copy of ``model`` where the nodes in ``plans`` compute in float16. Returns (model,
    number of Casts inserted). Only the initializers that stay float32 are copied."""
    out = _without_initializers(model)
    rewriter = _Rewriter(out, graph.initializers(model))
    graph_outputs = {o.name for o in out.graph.output}
    fp16_tensors: set[str] = set()
    for node in out.graph.node:
        plan = plans.get(node.name)
        if plan is None:
            continue
        for index in plan.outputs:
            fp16_tensors.add(node.output[index])
        if node.op_type == "Cast" and plan.outputs:
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = FLOAT16
        if node.op_type == "Constant" and plan.outputs:
            _constant_to_float16(node)
    # graph outputs produced in float16: the node writes <name>_fp16, a Cast restores <name>
    renamed: dict[str, str] = {}
    for name in sorted(fp16_tensors & graph_outputs):
        renamed[name] = rewriter.fresh(f"{name}_fp16")
    graph.rename_node_tensors(out.graph.node, renamed)
    fp16_tensors = {renamed.get(t, t) for t in fp16_tensors}
    for name, new in renamed.items():
        rewriter.new_nodes.append(helper.make_node("Cast", [new], [name], name=rewriter.fresh(f"Cast_{name}"), to=FLOAT))
    # inputs: float16 nodes read float16, float32 nodes read float32
    for node in list(out.graph.node):
        plan = plans.get(node.name)
        wanted = set(plan.inputs) if plan is not None else set()
        for index, tensor in enumerate(node.input):
            if not tensor:
                continue
            if index in wanted and tensor not in fp16_tensors:
                node.input[index] = rewriter.as_type(tensor, FLOAT16)
            elif index not in wanted and tensor in fp16_tensors:
                node.input[index] = rewriter.as_type(tensor, FLOAT)
    # float32 initializers no longer read by anything are dropped (their float16 copies remain)
    read = {t for n in list(out.graph.node) + rewriter.new_nodes for t in n.input} | graph_outputs | subgraphs.subgraph_reads(out, outer_only=True)
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name in read)
    out.graph.initializer.extend(rewriter.new_inits)
    out.graph.node.extend(rewriter.new_nodes)
    graph.sort_graph(out)
    casts = sum(1 for n in rewriter.new_nodes if n.op_type == "Cast")
    return out, casts


# ---------------------------------------------------------------------------- checking in ORT


def problems(converted: onnx.ModelProto, plans: dict[str, NodePlan], data: Dataset,
             stats: TensorStats, provider: str = "CPUExecutionProvider") -> dict[str, str]:
    """Float16 nodes to put back to float32 (name -> why); empty when the model loads in
    ``provider`` (the target's: CUDA's float16 kernels for gpu) and its float16 tensors stay
    finite on the data wherever the float32 ones were."""
    watched = [t for n in converted.graph.node if n.name in plans for t in n.output if t]
    where = f"ONNX Runtime's {provider}"
    try:
        session = sessions.exposed_session(converted, watched, provider)
    except Exception as exc:   # ORT raises its own exception types for a missing kernel
        match = _NO_KERNEL.search(str(exc))
        if match is None:
            raise PipelineError(f"fp16: ONNX Runtime refuses the converted model: {str(exc).splitlines()[0]}") from exc
        op_type = match.group(1)
        nodes = {n.name for n in converted.graph.node if n.op_type == op_type} & set(plans)
        if not nodes:
            raise PipelineError(f"fp16: no float16 kernel for {op_type} in {where}") from exc
        return {n: f"no float16 {op_type} kernel in {where}" for n in nodes}
    available = {o.name for o in session.get_outputs()}
    watched = [t for t in watched if t in available]
    producer = {t: n.name for n in converted.graph.node for t in n.output}
    bad: dict[str, str] = {}
    for feeds in data.batches(MEASURE_BATCH, MEASURE_SAMPLES):
        for tensor, value in zip(watched, session.run(watched, feeds)):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                # a renamed graph output is not in stats: its float32 value was finite (or it would
                # have kept float32 by the peak rule)
                if math.isfinite(stats.peak.get(tensor, 0.0)):
                    bad[producer[tensor]] = f"float16 {tensor} is not finite on the data"
        if bad:
            break
    return bad


# ---------------------------------------------------------------------------- the step


def _dataset(model: onnx.ModelProto, ctx: StepContext) -> tuple[Dataset, str]:
    if ctx.calibration is not None:
        return bind(model, ctx.calibration), "calibration"
    if ctx.evaluation is not None:
        return bind(model, ctx.evaluation), "evaluation"
    return generated(model, count=MEASURE_SAMPLES), "generated"


def _record_weights(model: onnx.ModelProto, converted: onnx.ModelProto, ctx: StepContext) -> None:
    """Float weights now stored in float16: bits 16 and the SQNR of the rounding."""
    stored16 = {t.name for t in converted.graph.initializer if t.data_type == FLOAT16}
    for layer in graph.weight_layers(model):
        copies = [n for n in stored16 if n == f"{layer.weight}_fp16" or n.startswith(f"{layer.weight}_fp16_")]
        if not copies:
            continue
        w = graph.get_array(model, layer.weight).astype(np.float32)
        record = ctx.layers.get(layer.weight) or LayerRecord(layer.weight, layer.node, layer.op)
        if record.bits > 16:
            record.bits = 16
            try:
                reference = graph.get_array(ctx.original, layer.weight).astype(np.float32)
            except KeyError:
                reference = w
            if reference.shape != w.shape:
                reference = w
            record.extra["sqnr_db"] = metrics.sqnr_db(reference, w.astype(np.float16).astype(np.float32))
        ctx.layers[layer.weight] = record


def run(model: onnx.ModelProto, params: Fp16Step, ctx: StepContext) -> StepResult:
    graph.ensure_node_names(model)
    data, source = _dataset(model, ctx)
    ctx.progress(0.05, "measuring activations")
    stats = measure(model, data)
    sessions.release_memory()
    opset = graph.opset(model)
    block = set(params.op_block_list)
    pinned = subgraphs.subgraph_reads(model, outer_only=True)
    plans: dict[str, NodePlan] = {}
    kept: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in block:
            kept[node.name] = "in op_block_list"
            continue
        if pinned & set(node.output):
            kept[node.name] = "a subgraph reads its output"
            continue
        plan = plan_node(node, opset, stats)
        if isinstance(plan, NodePlan):
            plans[node.name] = plan
        elif "no float32 tensor" not in plan:
            kept[node.name] = plan
    for node_name, why in _integer_kernels(model).items():
        if plans.pop(node_name, None) is not None:
            kept[node_name] = why
    for node_name, why in _index_arithmetic(model, stats).items():
        if plans.pop(node_name, None) is not None:
            kept[node_name] = why
    for node_name, why in _transposes_ort_crashes_on(model, plans).items():
        plans.pop(node_name)
        kept[node_name] = why
    # which float16 kernels exist is the target's provider's business: CUDA has many the CPU lacks
    provider = sessions.provider_for(ctx.target)
    for round_ in range(MAX_ROUNDS):
        ctx.check_cancelled()
        ctx.progress(0.3 + 0.6 * round_ / MAX_ROUNDS, "converting")
        converted, casts = convert(model, plans)
        found = problems(converted, plans, data, stats, provider)
        sessions.release_memory()
        if not found:
            break
        for node_name, why in found.items():
            plans.pop(node_name, None)
            kept[node_name] = why
    else:
        raise PipelineError(f"fp16: no float16 assignment ran cleanly after {MAX_ROUNDS} rounds")
    try:    # as users run it: every optimization on, no output exposed (the check above exposes them)
        sessions.session(converted, sessions.providers_for(provider)).run(None, next(data.batches(MEASURE_BATCH, 1)))
    except Exception as exc:
        raise PipelineError(f"fp16: ONNX Runtime fails to run the converted model: {str(exc).splitlines()[0]}") from exc
    _record_weights(model, converted, ctx)
    changed = sorted(plans)
    return StepResult(converted, changed, {
        "fp16_nodes": len(plans), "float32_nodes": len(kept), "casts": casts, "measured_on": source,
        "kernels_checked_in": provider,
        "kept_float32": [{"node": n, "reason": why} for n, why in kept.items()],
    })
