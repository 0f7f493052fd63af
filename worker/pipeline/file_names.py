"""The names the pipeline invented, made short in the output file.

Every step that rewrites a layer names what it adds after what it rewrote: ``<weight>_quantized``,
``<weight>_scale``, ``<activation>_QuantizeLinear_Output``, ``<weight>_DequantizeLinear`` for the
node, and on exported models whose names are long (an inlined If branch:
``If_0_then_branch__Inline_0__decoder.rnn.weight_hh_LSTM_R_scale``) each such name is written once
where it is defined and once more per reader. On the PP-OCR orientation classifier as static int8
these names were ~25 KB of a 229 KB file: 11% of its size, for nothing ONNX Runtime reads.

So, as the file's last step (``finalize``):
- a node whose name the original model did not have loses it (ONNX names are optional; ONNX Runtime
  names unnamed nodes itself). The original's node names, those the report's layers give, stay;
- a main-graph tensor (initializer or node output) whose name the original did not have gets the
  shortest name free in the model (``0``, ``1``, ... ``z``, ``10`` ...). Kept as they are: every
  name the original had (the graph's inputs and outputs, the layers' output tensors the report
  measures, the original weights), and names that an If / Loop / Scan body reads from the main
  graph (a body's scope would need renaming too).

Exact by construction: only names change, every reader follows its tensor. ``shorten`` returns the
map from each new name to the one it replaced, so that the report reads the file under the names
the steps wrote (``report.build_report``'s ``stored_names``).
"""
from __future__ import annotations

from typing import Iterator

import onnx

from worker.pipeline import graph as graph_mod, subgraphs

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every body inside it, at any depth."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for body in attribute.graphs:
                    yield from _graphs(body)


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name in the model, bodies included."""
    names: set[str] = set()
    for graph in _graphs(model.graph):
        names.update(value.name for value in (*graph.input, *graph.output, *graph.value_info))
        names.update(tensor.name for tensor in graph.initializer)
        names.update(tensor.name for tensor in graph.sparse_initializer)
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def node_names(model: onnx.ModelProto) -> set[str]:
    return {node.name for graph in _graphs(model.graph) for node in graph.node if node.name}


def _short_names(taken: set[str]) -> Iterator[str]:
    """``0``, ``1``, ... ``z``, ``10``, ... skipping names in ``taken``."""
    count = 0
    while True:
        value, digits = count, ""
        while True:
            value, digit = divmod(value, len(ALPHABET))
            digits = ALPHABET[digit] + digits
            if not value:
                break
        count += 1
        if digits not in taken:
            yield digits


def clear_added_node_names(model: onnx.ModelProto, original: onnx.ModelProto, kept: set[str] | None = None) -> int:
    """Clear the names of nodes (bodies included) whose name the original did not have; how many.
    ``kept``: the names the uploaded file itself had, where ``original`` is the copy the runner named."""
    kept = node_names(original) if kept is None else kept
    cleared = 0
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.HasField("name") and node.name not in kept:
                node.ClearField("name")          # an empty name set is still 2 bytes in the file
                cleared += 1
    return cleared


def shorten(model: onnx.ModelProto, original: onnx.ModelProto) -> dict[str, str]:
    """Give the main graph's tensors the original did not name the shortest free names, in place
    (see the module doc); returns {new name: the name it replaced}."""
    graph = model.graph
    kept = tensor_names(original) | subgraphs.subgraph_reads(model) \
        | {value.name for value in (*graph.input, *graph.output)}
    defined = [tensor.name for tensor in graph.initializer] + [name for node in graph.node for name in node.output]
    invented = [name for name in dict.fromkeys(defined) if name and name not in kept]
    if not invented:
        return {}
    fresh = _short_names(tensor_names(model) | kept)
    renamed = {name: next(fresh) for name in invented}
    _rename(graph, renamed)
    return {new: old for old, new in renamed.items()}


def restore(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Undo ``shorten`` on ``model`` (a copy read for the report), given its returned map."""
    if not names:
        return
    _rename(model.graph, names)


def _rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """The main graph's initializers, value infos and node inputs / outputs renamed as mapped."""
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for value in graph.value_info:
        value.name = renames.get(value.name, value.name)
    graph_mod.rename_node_tensors(graph.node, renames)
