"""Weights held in Constant nodes (common in converted models) lifted to initializers, so the
steps that select and rewrite weights by initializer name see them.

Only a Constant whose float tensor is read where a layer takes its weight (``graph.weight_layers``'
positions: MatMul / Gemm B, Conv / ConvTranspose W, Gather's table; ``core.onnx_weights`` decides)
is lifted; the initializer takes the Constant's output name, so every reader keeps reading the same
name.

Weights inside If / Loop / Scan bodies held in Constant nodes, or computed from constants by layout
ops, become main-graph initializers too (``body_weights``).
"""
from __future__ import annotations

from typing import Iterator

import onnx

from core import onnx_weights
from worker.pipeline import body_weights, graph, subgraphs

# Which Constants hold weights is decided in core, so the upload counts exactly what is lifted here.
constant_weights = onnx_weights.constant_weights


def lift_constant_weights(model: onnx.ModelProto) -> list[str]:
    """Move weight-carrying Constant nodes' tensors to initializers, and bodies' Constant or
    constant-computed weights to the main graph (``body_weights``); return the lifted names."""
    lifted = _lift(model, constant_weights(model))
    lifted += body_weights.lift_body_weights(model)
    if lifted:
        graph.sort_graph(model)
    return lifted


def _lift(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[str]:
    """Each Constant node of ``nodes`` replaced by an initializer under its output's name."""
    graph_outputs = {o.name for o in model.graph.output}
    lifted = []
    for node in nodes:
        name = node.output[0]
        if name in graph_outputs:
            continue     # an initializer cannot be a graph output by itself; leave it
        tensor = onnx.TensorProto()
        tensor.CopyFrom(onnx_weights.constant_tensor(node))
        tensor.name = name
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)
        lifted.append(name)
    return lifted


def lift_batchnorm_parameters(model: onnx.ModelProto) -> list[str]:
    """BatchNormalization's scale / bias / mean / var held in Constant nodes (paddle2onnx writes
    them so) moved to initializers, so that ``static.fold_batchnorm`` can fold the BN into the Conv
    before it: an unfolded BN leaves the Conv's output grid on the pre-BN values, per tensor, when
    the BN rescales each channel (35 such BNs on the PP-OCR orientation classifier)."""
    wanted = {name for node in model.graph.node if node.op_type == "BatchNormalization" for name in node.input[1:5]}
    return _lift(model, [node for node in model.graph.node
                         if node.output and node.output[0] in wanted and onnx_weights.constant_tensor(node) is not None])


def lift_biases(model: onnx.ModelProto) -> list[str]:
    """Conv and Gemm biases held in Constant nodes (paddle2onnx and tf2onnx write them so) moved to
    initializers: static int8's bias correction and int32 biases, cross-layer equalization and
    high-bias absorption (``quantize.equalize``) rescale and shift them, and dynamic int8's fused
    Gemm takes only an initializer bias (it refused every such Gemm, naming rules the layer met)."""
    wanted = {node.input[2] for node in model.graph.node if node.op_type in ("Conv", "Gemm") and len(node.input) > 2}
    return _lift(model, [node for node in model.graph.node if node.op_type == "Constant" and node.output
                         and node.output[0] in wanted and onnx_weights.constant_tensor(node) is not None])


def as_checked(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """``model``, then, only if a step's up-front check asks on (nothing selected as it is), a
    lifted copy: a step that lifts Constant weights when it runs must find them when checked, and
    the copy is made only where it can change the answer."""
    yield model
    yield lifted_copy(model)


def lifted_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose weights are all main-graph initializers (Constant weights lifted,
    control-flow bodies' weights hoisted), with every node named: the form static int8 and the
    sensitivity probe select weights on."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    lift_constant_weights(copy)
    subgraphs.hoist_weights(copy)
    graph.ensure_node_names(copy)
    return copy
