"""The ``cleanup`` step: graph rewrites that leave the outputs unchanged within float rounding.

Passes, repeated until none changes anything:

* local functions are inlined (``onnx.inliner``) and Constant nodes become initializers;
* Identity, inference-mode Dropout, Cast to the type the tensor already has, widening round trips
  (``Cast(Cast(x: T -> U) -> T)`` where U holds every T exactly), Reshape to the shape the tensor
  already has, and the first of two chained Reshapes (when the second's target has no 0, which would
  copy a dim from its input) are bypassed;
* constant folding: a node whose inputs are all initializers is evaluated once
  (``onnx.reference.ReferenceEvaluator``) and replaced by its outputs, unless it is random, has a
  subgraph, or its outputs would take more bytes than its inputs (folding a DequantizeLinear or a
  Tile would undo compression, not remove work);
* BatchNormalization after a Conv or Gemm whose output only it reads is folded into that layer:
  with ``s = gamma / sqrt(var + eps)``, ``W'[c] = s[c] W[c]`` along the output axis and
  ``b' = s (b - mean) + beta`` (Gemm: ``C' = s (beta_gemm C - mean) + beta``, ``beta_gemm := 1``);
* a LayerNormalization's scale and bias are folded into the MatMul / Gemm layers that read its
  output (``fold_layernorm``);
* nodes none of whose outputs is read (dead) are removed.

Then per-channel ``Mul`` / ``Add`` constants after a Conv, or in front of Convs only, are folded into
them and a hard-swish written out in elementwise ops becomes one HardSwish where the opset (>= 14) has
it (``quantize.conv_fusions``).

Then, once: ``MatMul(A, B) + C`` with A of rank 2, B a 2-D initializer and C a constant bias
broadcasting over rows becomes ``Gemm(A, B, C)`` (``fuse_matmul_add``; ONNX Runtime's own
MatMulAddFusion does the same for rank-2 inputs only, because at other ranks the reshapes around a
Gemm cost more than the separate Add; a rank-3 MatMul is therefore left alone); initializers with
equal type, shape and bytes are merged into one; initializers nothing reads are removed (those that
are also graph inputs stay: removing them would change the model's inputs).

Graph inputs and outputs keep their names: a bypassed node whose output is a graph output hands
that name to the producer of its input, or stays when its input is a graph input or initializer.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.recipe import CleanupStep
from worker.pipeline import subgraphs
from worker.pipeline.quantize import conv_fusions
from worker.pipeline.graph import attribute, sort_graph, unique_name
from worker.pipeline.step import StepContext, StepResult
from worker.pipeline.records import StepLog

name = "cleanup"
Params = CleanupStep

MAX_ROUNDS = 16
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})
_T = onnx.TensorProto
# (source, wide) pairs where Cast source -> wide -> source is the identity for every source value
WIDENING = frozenset({(_T.FLOAT16, _T.FLOAT), (_T.FLOAT16, _T.DOUBLE), (_T.FLOAT, _T.DOUBLE),
                      (_T.BFLOAT16, _T.FLOAT), (_T.BFLOAT16, _T.DOUBLE),
                      (_T.INT8, _T.INT16), (_T.INT8, _T.INT32), (_T.INT8, _T.INT64), (_T.INT16, _T.INT32),
                      (_T.INT16, _T.INT64), (_T.INT32, _T.INT64), (_T.UINT8, _T.UINT16), (_T.UINT8, _T.UINT32),
                      (_T.UINT8, _T.UINT64), (_T.UINT8, _T.INT16), (_T.UINT8, _T.INT32), (_T.UINT8, _T.INT64),
                      (_T.UINT16, _T.UINT32), (_T.UINT16, _T.INT32), (_T.UINT16, _T.INT64),
                      (_T.UINT32, _T.UINT64), (_T.UINT32, _T.INT64), (_T.BOOL, _T.INT32), (_T.BOOL, _T.INT64),
                      (_T.BOOL, _T.UINT8), (_T.BOOL, _T.INT8)})


class _Graph:
    """The model plus the indexes the passes need, rebuilt after every change."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.refresh()

    def refresh(self) -> None:
        graph = self.model.graph
        self.inputs = {value.name for value in graph.input}
        self.outputs = {value.name for value in graph.output}
        self.inits = {t.name: t for t in graph.initializer}
        self.constants = {k for k in self.inits if k not in self.inputs}   # graph inputs can override
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for tensor in set(node.input) | subgraphs.inner_reads(node):
                if tensor:
                    self.readers.setdefault(tensor, []).append(node)
        self.producer = {out: node for node in graph.node for out in node.output if out}

    def array(self, tensor: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[tensor])

    def types(self) -> dict[str, onnx.TypeProto]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # types are a hint for the passes; without them they just do less
            inferred = self.model
        found = {}
        for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            found[value.name] = value.type
        for tensor in self.model.graph.initializer:
            found[tensor.name] = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
        return found

    def rename_readers(self, old: str, new: str) -> None:
        for node in _all_nodes(self.model.graph):
            for index, tensor in enumerate(node.input):
                if tensor == old:
                    node.input[index] = new

    def bypass(self, node: onnx.NodeProto, src: str, dst: str) -> bool:
        """Drop ``node`` (which computes ``dst`` equal to ``src``), keeping graph output names."""
        if dst in self.outputs:
            producer = self.producer.get(src)
            if producer is None or src in self.outputs or src in self.inputs:
                return False
            for index, out in enumerate(producer.output):
                if out == src:
                    producer.output[index] = dst
            self.rename_readers(src, dst)
        else:
            self.rename_readers(dst, src)
        self.model.graph.node.remove(node)
        self.refresh()
        return True


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_nodes(sub)


def _static_shape(type_proto: onnx.TypeProto | None) -> list[int] | None:
    if type_proto is None or not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim]
    return dims if None not in dims else None


def _elem_type(type_proto: onnx.TypeProto | None) -> int | None:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return None
    return type_proto.tensor_type.elem_type or None


# -- passes ------------------------------------------------------------------------------------------

def constants_to_initializers(g: _Graph) -> int:
    count = 0
    for node in list(g.model.graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            array = numpy_helper.to_array(value)
        elif attr.name in ("value_float", "value_floats"):
            array = np.array(value, dtype=np.float32)
        elif attr.name in ("value_int", "value_ints"):
            array = np.array(value, dtype=np.int64)
        else:
            continue
        g.model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        g.model.graph.node.remove(node)
        count += 1
    g.refresh()
    return count


def remove_no_ops(g: _Graph) -> int:
    count = 0
    types = g.types()
    for node in list(g.model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        src = node.input[0] if node.input else ""
        op = node.op_type
        if op == "Identity":
            count += g.bypass(node, src, node.output[0])
        elif op == "Dropout":
            mask_read = len(node.output) > 1 and node.output[1] and (g.readers.get(node.output[1]) or node.output[1] in g.outputs)
            training = len(node.input) > 2 and node.input[2]
            if training and not (node.input[2] in g.constants and not bool(g.array(node.input[2]))):
                continue
            if not mask_read:
                count += g.bypass(node, src, node.output[0])
        elif op == "Cast":
            to = attribute(node, "to")
            source = _elem_type(types.get(src))
            if source is not None and source == to:
                count += g.bypass(node, src, node.output[0])
                continue
            inner = g.producer.get(src)
            if inner is not None and inner.op_type == "Cast" and len(g.readers.get(src, [])) == 1 and src not in g.outputs:
                origin = _elem_type(types.get(inner.input[0]))
                if origin == to and (origin, attribute(inner, "to")) in WIDENING:
                    count += g.bypass(node, inner.input[0], node.output[0])
        elif op == "Reshape":
            before, after = _static_shape(types.get(src)), _static_shape(types.get(node.output[0]))
            if before is not None and before == after:
                count += g.bypass(node, src, node.output[0])
                continue
            inner = g.producer.get(src)
            if (inner is not None and inner.op_type == "Reshape" and len(g.readers.get(src, [])) == 1
                    and src not in g.outputs and node.input[1] in g.constants
                    and not attribute(node, "allowzero", 0) and 0 not in g.array(node.input[1]).tolist()):
                node.input[0] = inner.input[0]          # the second Reshape alone gives the same result
                g.refresh()
                count += 1
    return count


FOLD_ALWAYS_BYTES = 256        # a result this small folds even where its inputs stay (shapes, scalars)


def fold_constants(g: _Graph) -> int:
    from onnx.reference import ReferenceEvaluator

    count = 0
    for node in list(g.model.graph.node):
        inputs = [t for t in node.input if t]
        if (not inputs or not all(t in g.constants for t in inputs) or node.op_type in RANDOM_OPS
                or node.domain not in ("", "ai.onnx") or subgraphs.inner_reads(node) or node.op_type == "Constant"):
            continue
        graph = helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(o) for o in node.output if o],
                                  [g.inits[t] for t in set(inputs)])
        probe = helper.make_model(graph, opset_imports=list(g.model.opset_import), ir_version=g.model.ir_version)
        try:
            values = ReferenceEvaluator(probe).run(None, {})
        except Exception:  # an op the reference runtime lacks: leave the node to ONNX Runtime
            continue
        produced = sum(np.asarray(v).nbytes for v in values)
        # what the fold frees: inputs no other node reads (a tied table's Transpose folded while its
        # Gather still reads the table stored the table twice: a GPT-2 came out 0.81x its size)
        freed = sum(g.array(t).nbytes for t in set(inputs) if t not in g.outputs and len(g.readers.get(t, [])) == 1)
        if produced > max(freed, FOLD_ALWAYS_BYTES):
            continue
        if any(o in g.outputs for o in node.output if o):
            continue
        for out, value in zip((o for o in node.output if o), values):
            g.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), out))
        g.model.graph.node.remove(node)
        g.refresh()
        count += 1
    return count


def fold_batchnorm(g: _Graph) -> int:
    count = 0
    for bn in list(g.model.graph.node):
        if bn.op_type != "BatchNormalization" or (len(bn.output) > 1 and any(bn.output[1:])):
            continue
        layer = g.producer.get(bn.input[0])
        if (layer is None or layer.op_type not in ("Conv", "Gemm") or len(g.readers.get(bn.input[0], [])) != 1
                or bn.input[0] in g.outputs or not all(t in g.constants for t in bn.input[1:5])
                or layer.input[1] not in g.constants):
            continue
        has_bias = len(layer.input) > 2 and layer.input[2] != ""
        if has_bias and layer.input[2] not in g.constants:
            continue
        gamma, beta, mean, var = (g.array(t).astype(np.float64) for t in bn.input[1:5])
        scale = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
        w = g.array(layer.input[1])
        if layer.op_type == "Conv":
            out_axis = 0
            bias = g.array(layer.input[2]).astype(np.float64) if has_bias else np.zeros(w.shape[0])
            new_bias = scale * (bias - mean) + beta
        else:
            if attribute(layer, "transA", 0) or w.ndim != 2:
                continue
            out_axis = 0 if attribute(layer, "transB", 0) else 1
            bias = g.array(layer.input[2]).astype(np.float64) if has_bias else np.zeros(1)
            if bias.size not in (1, w.shape[out_axis]) or bias.ndim > 1 and bias.shape[0] != 1:
                continue
            new_bias = scale * (attribute(layer, "beta", 1.0) * bias.reshape(-1) - mean) + beta
        shape = [1] * w.ndim
        shape[out_axis] = -1
        new_w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
        w_name = unique_name(g.model, f"{layer.input[1]}_bn") if len(g.readers.get(layer.input[1], [])) > 1 else layer.input[1]
        b_name = unique_name(g.model, f"{bn.name or bn.output[0]}_folded_bias")
        _put(g.model, w_name, new_w)
        _put(g.model, b_name, new_bias.astype(w.dtype))
        layer.input[1] = w_name
        if has_bias:
            layer.input[2] = b_name
        else:
            layer.input.append(b_name)
        if layer.op_type == "Gemm":
            _set_attr(layer, "beta", 1.0)
        layer.output[0] = bn.output[0]
        g.model.graph.node.remove(bn)
        g.refresh()
        count += 1
    return count


SHAPE_ONLY_READERS = frozenset({"Shape", "Size"})     # read a tensor's shape, never its values


def fold_layernorm(g: _Graph) -> int:
    """Fold a LayerNormalization's scale and bias into the linear layers it feeds. Where every
    reader of ``y = n * gamma + beta`` (n the normalized input, over the last axis only) is a MatMul
    or Gemm (transA 0) taking y as A with a constant 2-D weight W [in, out] (shape-only readers
    aside), ``y W + b = n (gamma[:, None] W) + (beta W + b)``: the weight's rows are scaled by
    gamma, beta W joins the layer's bias (MatMul: the constant of the one Add that reads it), and
    the normalization keeps a scale of ones and no bias.

    Why: two float vectors fewer per normalization in the file (on the bench encoder, two blocks of
    width 128, 4 KB: 1.5 % of its zstd bytes once pruned 50 % and quantized int8), and the weights a
    later prune step ranks by magnitude are then the ones the normalized activations meet (that
    encoder pruned 50 %: accuracy 0.9556 -> 0.9578)."""
    count = 0
    for ln in list(g.model.graph.node):
        if ln.op_type != "LayerNormalization" or len(ln.output) > 1 and any(ln.output[1:]) \
                or ln.output[0] in g.outputs or ln.input[1] not in g.constants:
            continue
        has_beta = len(ln.input) > 2 and ln.input[2] != ""
        if has_beta and ln.input[2] not in g.constants:
            continue
        gamma = g.array(ln.input[1]).astype(np.float64)
        beta = g.array(ln.input[2]).astype(np.float64) if has_beta else np.zeros_like(gamma)
        if gamma.ndim != 1 or beta.shape != gamma.shape or attribute(ln, "axis", -1) != -1 \
                or not np.any(beta) and np.all(gamma == 1):       # nothing to fold (or folded already)
            continue
        plans = _layernorm_readers(g, ln, gamma.size, needs_bias=bool(np.any(beta)))
        if plans is None:
            continue
        for layer, w_name, bias_name, out_axis, weight_scale in plans:
            w = g.array(w_name)
            shape = [1, 1]
            shape[1 - out_axis] = -1          # the input axis
            wide = w.astype(np.float64)
            new_w = (wide * gamma.reshape(shape)).astype(w.dtype)
            _put(g.model, w_name, new_w)
            if bias_name is not None:
                shift = weight_scale * (beta @ (wide if out_axis == 1 else wide.T))
                bias = g.array(bias_name)
                new_bias = (bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype)
                new_b_name = unique_name(g.model, f"{bias_name}_ln") \
                    if len(g.readers.get(bias_name, [])) > 1 else bias_name
                _put(g.model, new_b_name, new_bias)
                reader = layer if layer.op_type == "Gemm" else g.readers[layer.output[0]][0]
                for index, tensor in enumerate(reader.input):
                    if tensor == bias_name:
                        reader.input[index] = new_b_name
        ones_name = unique_name(g.model, f"{ln.input[1]}_ones")
        _put(g.model, ones_name, np.ones_like(g.array(ln.input[1])))
        ln.input[1] = ones_name
        if has_beta:
            del ln.input[2]
        g.refresh()
        count += 1
    return count


def _layernorm_readers(g: _Graph, ln: onnx.NodeProto, width: int, needs_bias: bool) -> list[tuple] | None:
    """For each value reader of ``ln``'s output: (layer, weight, bias or None, output axis of the
    weight, the factor beta W is added with); None where one of them cannot take the fold."""
    plans = []
    for layer in g.readers.get(ln.output[0], []):
        if layer.op_type in SHAPE_ONLY_READERS:
            continue
        if layer.op_type not in ("MatMul", "Gemm") or list(layer.input).count(ln.output[0]) != 1 \
                or layer.input[0] != ln.output[0] or layer.input[1] not in g.constants:
            return None
        w = g.array(layer.input[1])
        # a weight other nodes read too (a tied embedding) would have to be copied: the file grows
        if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating) or len(g.readers.get(layer.input[1], [])) > 1:
            return None
        bias_name, weight_scale, out_axis = None, 1.0, 1
        if layer.op_type == "Gemm":
            if attribute(layer, "transA", 0):
                return None
            out_axis = 0 if attribute(layer, "transB", 0) else 1
            has_c = len(layer.input) > 2 and layer.input[2] != ""
            if needs_bias:
                beta_gemm = attribute(layer, "beta", 1.0)
                if not has_c or layer.input[2] not in g.constants or beta_gemm == 0:
                    return None
                bias_name, weight_scale = layer.input[2], attribute(layer, "alpha", 1.0) / beta_gemm
        elif needs_bias:
            adds = g.readers.get(layer.output[0], [])
            if len(adds) != 1 or adds[0].op_type != "Add" or layer.output[0] in g.outputs:
                return None
            others = [t for t in adds[0].input if t != layer.output[0]]
            if len(others) != 1 or others[0] not in g.constants:
                return None
            bias_name = others[0]
        if w.shape[1 - out_axis] != width:
            return None
        if bias_name is not None:
            bias = g.array(bias_name)
            if bias.size != w.shape[out_axis] or bias.ndim > 1 and bias.shape[-1] != bias.size:
                return None          # a bias broadcast from fewer values cannot take beta W
        plans.append((layer, layer.input[1], bias_name, out_axis, weight_scale))
    return plans or None


def remove_dead(g: _Graph) -> int:
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(g.model.graph.node):
            if not any(o and (g.readers.get(o) or o in g.outputs) for o in node.output):
                g.model.graph.node.remove(node)
                g.refresh()
                count += 1
                changed = True
    return count


def fuse_matmul_add(g: _Graph) -> int:
    count = 0
    types = g.types()
    for node in list(g.model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in g.constants:
            continue
        a_shape = types.get(node.input[0])
        rank = len(a_shape.tensor_type.shape.dim) if a_shape is not None and a_shape.tensor_type.HasField("shape") else None
        b = g.array(node.input[1])
        readers = g.readers.get(node.output[0], [])
        if rank != 2 or b.ndim != 2 or len(readers) != 1 or node.output[0] in g.outputs or readers[0].op_type != "Add":
            continue
        add = readers[0]
        bias_name = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        if bias_name not in g.constants or bias_name == node.output[0]:
            continue
        bias = g.array(bias_name)
        if bias.dtype != b.dtype or not (bias.ndim == 1 or (bias.ndim == 2 and bias.shape[0] == 1)) \
                or bias.shape[-1] not in (1, b.shape[1]):
            continue
        gemm = helper.make_node("Gemm", [node.input[0], node.input[1], bias_name], [add.output[0]],
                                name=node.name or unique_name(g.model, "Gemm"))
        position = list(g.model.graph.node).index(node)
        g.model.graph.node.remove(add)
        g.model.graph.node.remove(node)
        g.model.graph.node.insert(position, gemm)
        g.refresh()
        count += 1
    return count


def merge_identical_initializers(g: _Graph) -> int:
    seen: dict[tuple, str] = {}
    count = 0
    for tensor in list(g.model.graph.initializer):
        if tensor.name in g.inputs or tensor.name in g.outputs:
            continue
        raw = numpy_helper.to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(np.ascontiguousarray(raw).tobytes()).hexdigest())
        keeper = seen.get(key)
        if keeper is None:
            seen[key] = tensor.name
            continue
        g.rename_readers(tensor.name, keeper)
        g.model.graph.initializer.remove(tensor)
        count += 1
    g.refresh()
    return count


def remove_unused_initializers(g: _Graph) -> int:
    unused = [t for t in g.model.graph.initializer
              if not g.readers.get(t.name) and t.name not in g.outputs and t.name not in g.inputs]
    for tensor in unused:
        g.model.graph.initializer.remove(tensor)
    g.refresh()
    return len(unused)


def _put(model: onnx.ModelProto, tensor_name: str, array: np.ndarray) -> None:
    tensor = numpy_helper.from_array(np.ascontiguousarray(array), tensor_name)
    for existing in model.graph.initializer:
        if existing.name == tensor_name:
            existing.CopyFrom(tensor)
            return
    model.graph.initializer.append(tensor)


def _set_attr(node: onnx.NodeProto, key: str, value) -> None:
    for attr in node.attribute:
        if attr.name == key:
            node.attribute.remove(attr)
            break
    node.attribute.append(helper.make_attribute(key, value))


def run(model: onnx.ModelProto, params: CleanupStep, ctx: StepContext) -> StepResult:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counts: dict[str, int] = {}
    if out.functions:
        out = onnx.inliner.inline_local_functions(out)
        counts["inlined_functions"] = len(model.functions)
    sort_graph(out)
    del out.graph.value_info[:]
    g = _Graph(out)
    nodes_before = len(model.graph.node)
    init_bytes_before = sum(t.ByteSize() for t in model.graph.initializer)

    def count(key: str, value: int) -> int:
        counts[key] = counts.get(key, 0) + value
        return value

    count("constants_to_initializers", constants_to_initializers(g))
    for _ in range(MAX_ROUNDS):
        ctx.check_cancelled()
        changed = (count("no_ops_removed", remove_no_ops(g)) + count("constants_folded", fold_constants(g))
                   + count("batchnorms_folded", fold_batchnorm(g)) + count("layernorms_folded", fold_layernorm(g))
                   + count("dead_nodes_removed", remove_dead(g)))
        if not changed:
            break
    # per-channel Mul / Add around Convs folded into them, hard-swish as one op where the opset has it
    # (``quantize.conv_fusions``; on the PP-OCRv4 detector 0.085 -> 0.063 s per batch, one thread)
    count("affine_folded", len(conv_fusions.fold_channel_affine(g.model)))
    count("hard_swish_fused", len(conv_fusions.fuse_hard_swish(g.model)))
    count("affine_folded", len(conv_fusions.fold_input_affine(g.model)))
    g.refresh()
    if params.fuse_matmul_add:
        count("matmul_add_fused", fuse_matmul_add(g))
    count("initializers_merged", merge_identical_initializers(g))
    count("initializers_removed", remove_unused_initializers(g))
    sort_graph(g.model)
    log = StepLog()
    changed_names = sorted({n.name for n in model.graph.node} - {n.name for n in g.model.graph.node})
    return StepResult(g.model, changed_names, log.metrics(
        **counts, nodes_before=nodes_before, nodes_after=len(g.model.graph.node),
        initializer_bytes_before=int(init_bytes_before),
        initializer_bytes_after=int(sum(t.ByteSize() for t in g.model.graph.initializer))))
