"""Which static-int8 layers keep float activations (their weight int8 behind a DequantizeLinear, the
layer computed in float): where quantizing the activation costs accuracy out of proportion to what an
integer kernel saves. Owns only the choice; ``static`` applies it.

Two cases, each a recipe option (defaults measured on the real-model bench, README):

- ``min_products``: a Conv with fewer multiply-adds per output value than this (``C_in / group * kh * kw``;
  a 3x3 depthwise conv has 9). Each output sums so few products that the input's rounding error does
  not average out, and such layers are a small share of the compute (on the PP-OCRv4 detector the
  depthwise convs and the 3-channel stem are ~4% of the multiply-adds), so the integer kernel buys
  little there while every per-tensor activation grid in front of a depthwise conv must span all its
  channels' ranges.
- ``float_gelu_inputs``: a MatMul / Gemm whose input is a GELU output (Erf or Tanh form, or the
  com.microsoft fused ops). GELU's output is one-sided with a long positive tail (min about -0.17),
  so an 8-bit grid over it spends almost all its levels on the rare tail; on all-MiniLM-L6-v2 these
  six FFN-down MatMuls were most of the static model's Spearman loss.
"""
from __future__ import annotations

import math

import onnx

from core.recipe import QuantizeStep
from worker.pipeline import graph

GELU_OPS = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")
_GELU_CORE = ("Erf", "Tanh")
_GELU_TAIL = ("Mul", "Add", "Div")     # what follows Erf / Tanh inside an exported GELU
_GELU_DEPTH = 4


def products_per_output(layer: graph.WeightLayer) -> int:
    """Multiply-adds per output value: the weight's elements per output channel."""
    return math.prod(layer.shape) // max(layer.shape[layer.out_axis], 1) if layer.shape else 1


def gelu_outputs(model: onnx.ModelProto) -> set[str]:
    """Tensors that are the output of a GELU: a fused GELU op, or a Mul reached from an Erf / Tanh
    through at most a few Mul / Add / Div (how exporters write ``0.5 x (1 + erf(x / sqrt 2))``)."""
    producers = graph.producers(model)
    found = set()
    for node in model.graph.node:
        if node.op_type in GELU_OPS:
            found.add(node.output[0])
            continue
        if node.op_type != "Mul":
            continue
        frontier, depth = [node], 0
        while frontier and depth < _GELU_DEPTH:
            parents = [producers[name] for current in frontier for name in current.input if name in producers]
            if any(parent.op_type in _GELU_CORE for parent in parents):
                found.add(node.output[0])
                break
            frontier = [parent for parent in parents if parent.op_type in _GELU_TAIL]
            depth += 1
    return found


def choose(model: onnx.ModelProto, layers: list[graph.WeightLayer], params: QuantizeStep) -> dict[str, str]:
    """node name -> why, for the selected ``layers`` that keep float activations."""
    gelu = gelu_outputs(model) if params.float_gelu_inputs else set()
    nodes = {node.name: node for node in model.graph.node}
    chosen: dict[str, str] = {}
    for layer in layers:
        node = nodes.get(layer.node)
        if node is None:
            continue
        if layer.op == "Conv" and products_per_output(layer) < params.min_products:
            chosen[layer.node] = f"{products_per_output(layer)} products per output < min_products {params.min_products}"
        elif layer.op in ("MatMul", "Gemm") and node.input[0] in gelu:
            chosen[layer.node] = "input is a GELU output (float_gelu_inputs)"
    return chosen
