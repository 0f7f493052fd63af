"""ONNX helpers every step shares: load/save (external data, > 2 GB), initializers <-> numpy,
which weights feed which layers, name selection, consumers, opset upgrades.

Steps never reach into protobuf fields for these themselves; they call here, so the rules (which
axis is a weight's output channel, how include / exclude / min_params select) live in one place.
"""
from __future__ import annotations

import fnmatch
import itertools
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.onnx_weights import LAYOUT_OPS
from worker.pipeline import artifacts, subgraphs

# Protobuf refuses to serialize a message past 2 GiB; stay clear of it with a margin.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=load_external_data)


# IR 4 made listing initializers among the graph inputs optional (IR 3 required it)
MIN_IR_WITHOUT_WEIGHT_INPUTS = 4


def weights_out_of_inputs(model: onnx.ModelProto) -> list[str]:
    """Drop the graph inputs that name an initializer (IR < 4 required them; PyTorch writes them with
    ``keep_initializers_as_inputs=True``) and raise such a model's IR version to 4. Every step
    renames, splits or replaces weights: an input left behind by a weight a step replaced became a
    required input without a value (fp16, lowrank and the goal search failed; IR 3 models failed in
    every quantize). ONNX Runtime lists these as overridable initializers, not as the model's inputs,
    so the model's inputs as a user runs it are unchanged. Returns the names dropped."""
    inits = {t.name for t in model.graph.initializer}
    dropped = [value.name for value in model.graph.input if value.name in inits]
    if dropped:
        kept = [value for value in model.graph.input if value.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(kept)
    if model.ir_version < MIN_IR_WITHOUT_WEIGHT_INPUTS:
        model.ir_version = MIN_IR_WITHOUT_WEIGHT_INPUTS
    return dropped


def fold_weight_transposes(model: onnx.ModelProto) -> list[str]:
    """Store each initializer that only a Transpose reads already transposed, and let the Transpose's
    readers read it. PyTorch exports with ``do_constant_folding=False`` (and some converters) write
    every Linear as ``W -> Transpose -> MatMul``: no step saw a MatMul weight there, so static and
    dynamic int8 refused the model as weightless, GPTQ stored the weights as 8-bit tables, and a
    ``cleanup`` first did not help (each step's checks read the model as uploaded). The fold is
    exact (a layout change, the same bytes); ONNX Runtime makes it at load anyway. A weight that
    something else reads too (a tied embedding's Gather) keeps its Transpose. Returns the weights
    folded."""
    inits = initializers(model)
    reads = Counter(name for node in model.graph.node for name in node.input if name)
    inner = subgraphs.subgraph_reads(model)
    reads.update(inner)
    pinned = {value.name for value in model.graph.output} | inner
    folded: dict[str, str] = {}         # Transpose output -> the weight now read in its place
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or not node.input or node.input[0] not in inits:
            continue
        source, out = node.input[0], node.output[0]
        if reads[source] != 1 or source in pinned or out in pinned or reads[out] == 0:
            continue
        array = numpy_helper.to_array(inits[source])
        perm = attribute(node, "perm", None) or list(reversed(range(array.ndim)))
        set_array(model, source, np.transpose(array, perm))
        model.graph.node.remove(node)
        folded[out] = source
    _read_instead(model, folded, stale=set(folded) | set(folded.values()))
    return list(folded.values())


def resolve_weight_aliases(model: onnx.ModelProto) -> list[str]:
    """Let the readers of ``Identity(initializer)`` read the initializer itself. PyTorch's exporter
    stores a parameter once and writes every other use as an Identity of it (ALBERT's layers
    reusing one block's weights; GPT-2's zero biases, equal in value): the layers behind the
    Identity had no weight any step saw (dynamic int8 kept 6 of a GPT-2's 8 Gemms float and
    unlisted, and an ALBERT's float weights beside their int8 copies). Exact (ONNX Runtime drops
    such Identities at load). An Identity whose output is a graph output or read inside a control
    flow body stays. Returns the aliases resolved."""
    inits = initializers(model)
    pinned = {value.name for value in model.graph.output} | subgraphs.subgraph_reads(model)
    aliases = {node.output[0]: node.input[0] for node in model.graph.node
               if node.op_type == "Identity" and node.input and node.input[0] in inits and node.output[0] not in pinned}
    if not aliases:
        return []
    kept = [node for node in model.graph.node if not (node.op_type == "Identity" and node.output[0] in aliases)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _read_instead(model, aliases, stale=set(aliases))
    return list(aliases)


def _read_instead(model: onnx.ModelProto, renames: dict[str, str], *, stale: set[str]) -> None:
    """The main graph's readers of each ``renames`` key read its value instead; the value_info of
    the ``stale`` names (gone, or of another shape now) is dropped."""
    rename_node_tensors(model.graph.node, renames)
    values = [value for value in model.graph.value_info if value.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(values)


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path``; tensors go to ``<name>.data`` beside it when the model is too big
    for one protobuf. Written to a temporary name first, then renamed, so a crash leaves no half file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=artifacts.external_data_file(path.name), size_threshold=1024)
    else:
        onnx.save_model(model, str(tmp))
    tmp.replace(path)
    return path


def check_if_in_memory(model: onnx.ModelProto) -> None:
    """``onnx.checker`` (full) on a model that fits one protobuf; a bigger one is checked from its
    file once the runner has written it (the checker refuses in-memory models past 2 GiB)."""
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model, full_check=True)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def get_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(f"no initializer named {name!r}")


def set_array(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Replace (or add) the initializer ``name`` with ``array``, keeping its position."""
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")   # np.ascontiguousarray would turn a 0-d scale into shape (1,)
    tensor = numpy_helper.from_array(array, name)
    for index, existing in enumerate(model.graph.initializer):
        if existing.name == name:
            model.graph.initializer[index].CopyFrom(tensor)
            return
    model.graph.initializer.append(tensor)


def remove_initializers(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Drop the initializers ``names``, in place: deleting by index moves the remaining entries, where
    clearing the list and extending it with the kept ones deep-copies every tensor's bytes (static
    int8 removes one weight at a time: 36 copies of a BERT's 90 MB, 10 CPU seconds). An initializer
    that is itself a graph output stays whatever reads it (callers that drop what no node reads
    broke such a model: "Graph output 'tbl' is not an output of any node")."""
    drop = set(names) - {output.name for output in model.graph.output}
    initializers = model.graph.initializer
    for index in reversed(range(len(initializers))):
        if initializers[index].name in drop:
            del initializers[index]


def consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """tensor name -> [(node, input index)] over the main graph."""
    table: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name:
                table.setdefault(name, []).append((node, index))
    return table


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output if name}


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


@dataclass(frozen=True)
class WeightLayer:
    """A float weight initializer and the layer that consumes it.

    ``out_axis`` is the weight axis that indexes the layer's output channels (per-channel scales run
    along it); ``in_axis`` the axis that is reduced against the layer's input (GPTQ columns, N:M groups).
    """

    weight: str
    node: str
    op: str
    shape: tuple[int, ...]
    out_axis: int
    in_axis: int

    @property
    def params(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def _weight_axes(node: onnx.NodeProto, input_index: int, rank: int) -> tuple[int, int] | None:
    if node.op_type == "MatMul" and input_index == 1 and rank == 2:
        return 1, 0                                   # x[.., K] @ W[K, N]
    if node.op_type == "Gemm" and input_index == 1 and rank == 2:
        return (0, 1) if attribute(node, "transB", 0) else (1, 0)
    if node.op_type == "Conv" and input_index == 1 and rank >= 3:
        return 0, 1                                   # W[O, I/g, k...]
    if node.op_type == "ConvTranspose" and input_index == 1 and rank >= 3:
        return 1, 0                                   # W[I, O/g, k...]
    if node.op_type == "Gather" and input_index == 0 and rank == 2 and attribute(node, "axis", 0) == 0:
        return 0, 1                                   # embedding table [V, D]: one row per token
    if node.op_type in ("LSTM", "GRU", "RNN") and input_index in (1, 2) and rank == 3:
        return 1, 2                                   # W / R [directions, gates * hidden, inputs]: one row per gate unit
    return None


def _take(layer: WeightLayer, seen: set[str], found: list[WeightLayer], include: Sequence[str],
          exclude: Sequence[str], min_params: int) -> None:
    """``layer`` added to ``found`` (its weight to ``seen``) where it passes the recipe's selection."""
    if layer.params >= min_params and selected(layer, include, exclude):
        seen.add(layer.weight)
        found.append(layer)


DEFAULT_DOMAINS = ("", "ai.onnx")
# float tensors of reduced precision a graph may cast to float32 on the fly
NARROW_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def weight_layers(model: onnx.ModelProto, *, ops: Sequence[str] = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"),
                  include: Sequence[str] = (), exclude: Sequence[str] = (), min_params: int = 0) -> list[WeightLayer]:
    """Float weights consumed by layers of ``ops``, in graph order, filtered by the recipe's selection.

    A weight shared by two layers is reported once, for its first consumer.
    """
    inits = initializers(model)
    found: list[WeightLayer] = []
    seen: set[str] = set()
    for node in model.graph.node:
        # ONNX's own ops only: com.microsoft.nchwc::Conv keeps its weight in a blocked layout (a low
        # rank factorization of one made a model ONNX Runtime could not run)
        if node.op_type not in ops or node.domain not in DEFAULT_DOMAINS:
            continue
        for index, name in enumerate(node.input):
            tensor = inits.get(name)
            if tensor is None or name in seen or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                continue
            axes = _weight_axes(node, index, len(tensor.dims))
            if axes is None:
                continue
            _take(WeightLayer(name, node.name, node.op_type, tuple(tensor.dims), *axes), seen, found,
                  include, exclude, min_params)
    return found


def unreadable_weights(model: onnx.ModelProto, min_params: int = 0) -> dict[str, str]:
    """Float weights of at least ``min_params`` elements read in a layout no weight step handles:
    {weight: why}. ``W @ x`` (the weight as MatMul's first operand), batched per-head weights
    ``x[.., K] @ W[H, K, N]``, Gemm's A, a tied table's transpose (a GPT-2's output projection;
    steps that compress tables still take it as one), a float16 / bfloat16 weight read through a
    Cast, and a weight only fused ops outside ONNX's domain read (FusedConv, Attention, NCHWc Conv
    of a file ONNX Runtime optimized). Each step leaves them float; they are named so that a user
    sees why (they were 70 % of a model's parameters and appeared nowhere)."""
    inits = initializers(model)
    found: dict[str, str] = {}
    readable = {layer.weight for layer in weight_layers(model)}
    transposed = {node.output[0]: node for node in model.graph.node
                  if node.op_type == "Transpose" and node.input and node.input[0] in inits}
    cast = {node.output[0]: node for node in model.graph.node
            if node.op_type == "Cast" and node.input and node.input[0] in inits
            and inits[node.input[0]].data_type in NARROW_FLOATS}
    for node in model.graph.node:
        for name in node.input:
            source = cast[name].input[0] if name in cast else name
            tensor = inits.get(source)
            if tensor is None or source in readable or source in found or len(tensor.dims) < 2:
                continue
            elements = int(np.prod(tensor.dims))
            if elements < max(min_params, 2) or tensor.data_type not in (onnx.TensorProto.FLOAT, *NARROW_FLOATS):
                continue
            if name in cast:
                # a float16 / bfloat16 checkpoint cast to float32 in the graph
                found[source] = (f"{elements} elements stored {onnx.TensorProto.DataType.Name(tensor.data_type).lower()} "
                                 f"and read through Cast {cast[name].name}: no weight step reads a weight through a Cast")
            elif node.domain not in DEFAULT_DOMAINS:
                # an upload saved after ONNX Runtime's optimizations (FusedConv, Attention, NCHWc Conv)
                found[source] = (f"{elements} elements read by {node.domain}::{node.op_type} {node.name}: no weight "
                                 "step rewrites a fused op; upload the model as exported, before ONNX Runtime's "
                                 "graph optimizations")
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for index, name in enumerate(node.input[:2]):
            through = transposed.get(name)
            if through is not None and index == 1:
                # a tied table (its Gather reads it too, so the Transpose stays): the layer steps
                # see a table, not this MatMul's weight
                source = inits[through.input[0]]
                elements = int(np.prod(source.dims)) if source.dims else 1
                if elements >= max(min_params, 2) and through.input[0] not in found:
                    found[through.input[0]] = (f"{elements} elements: read by {node.op_type} {node.name} through "
                                               f"Transpose {through.name}, and as a table by other nodes (tied)")
                continue
            tensor = inits.get(name)
            if (tensor is None or name in readable or name in found
                    or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)):
                continue
            elements = int(np.prod(tensor.dims)) if tensor.dims else 1
            if elements < max(min_params, 2) or len(tensor.dims) < 2:
                continue
            where = f"{node.op_type} {node.name}".strip()
            if index == 0:
                found[name] = f"{elements} elements: the first operand of {where} (W @ x), a layout no weight step reads"
            else:
                found[name] = (f"{elements} elements, shape {list(tensor.dims)}: a batched weight of {where}, "
                               "a layout no weight step reads")
    return found


def unreadable_note(model: onnx.ModelProto, min_params: int = 0) -> str:
    """``unreadable_weights`` for a refusal's message ("" when there are none)."""
    found = unreadable_weights(model, min_params)
    if not found:
        return ""
    name, why = next(iter(found.items()))
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return f"; {name} ({why}){more}"


def read_as_data(model: onnx.ModelProto, weights: Iterable[str], ops: Sequence[str]) -> dict[str, str]:
    """Of ``weights``, those a main-graph node other than a layer of ``ops`` (or a layout op, as a
    tied weight's Transpose) reads: {weight: "op node"}. There the values are data (a ReduceSum of
    the weight that is a model output): pruning or clustering them changes that result too, which
    the step's own error measure never sees (measured: SparseGPT left such an output at rel_l2 0.62)."""
    wanted = set(weights)
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ops or node.op_type in LAYOUT_OPS:
            continue
        for name in node.input:
            if name in wanted and name not in found:
                found[name] = f"{node.op_type} {node.name}".strip()
    return found


# ops that read a weight already stored as integers (QDQ, QOperator, ONNX Runtime's fused forms)
INTEGER_WEIGHT_READERS = frozenset({"DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                                    "ConvInteger", "MatMulNBits", "DynamicQuantizeMatMul", "GatherBlockQuantized"})
_INTEGER_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                            onnx.TensorProto.UINT4, onnx.TensorProto.INT16, onnx.TensorProto.UINT16})


def integer_weights(model: onnx.ModelProto, min_params: int = 0) -> list[str]:
    """Integer initializers of at least ``min_params`` elements that a quantized op reads: the
    weights of a model that was quantized before it came (none of the float weight steps apply)."""
    inits = initializers(model)
    found = []
    for node in model.graph.node:
        # a Cast of an int8 / int4 initializer to float is the same thing where DequantizeLinear has
        # no kernel: the int4 block weights of a quantized Conv decode so (Cast, then block scales)
        to_float = node.op_type == "Cast" and attribute(node, "to", 0) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        if node.op_type not in INTEGER_WEIGHT_READERS and not to_float:
            continue
        for name in node.input:
            tensor = inits.get(name)
            if (tensor is not None and tensor.data_type in _INTEGER_TYPES and name not in found
                    and int(np.prod(tensor.dims)) >= max(min_params, 2)):
                found.append(name)
    return found


def selected(layer: WeightLayer, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """include / exclude are glob patterns matched against the weight's and the node's names."""
    names = (layer.weight, layer.node)
    if include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
        return False
    return not any(fnmatch.fnmatchcase(n, p) for n in names for p in exclude)


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name, so layers can be reported and selected by name."""
    taken = {node.name for node in model.graph.node if node.name}
    counter = itertools.count()
    for node in model.graph.node:
        if not node.name:
            name = f"{node.op_type}_{next(counter)}"
            while name in taken:
                name = f"{node.op_type}_{next(counter)}"
            node.name = name
            taken.add(name)


def rename_node_tensors(nodes: Iterable[onnx.NodeProto], renames: dict[str, str]) -> None:
    """Rename, in place, every input and output of ``nodes`` that ``renames`` maps (this graph's
    nodes only: a subgraph's reads are the caller's to follow)."""
    for node in nodes:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
        for index, name in enumerate(node.output):
            if name in renames:
                node.output[index] = renames[name]


def fresh_name(base: str, taken: set[str], *, numbered: bool = False) -> str:
    """The one maker of new names: ``base`` where ``taken`` lacks it (``numbered``: never bare),
    else ``base_<n>`` with the smallest free n (from 1; from 0 when ``numbered``). The name is
    added to ``taken``."""
    if not numbered and base not in taken:
        taken.add(base)
        return base
    for suffix in itertools.count(0 if numbered else 1):
        candidate = f"{base}_{suffix}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise AssertionError("unreachable")


_RESERVED: dict[int, set[str]] = {}     # id(model) -> its names, inside ``naming(model)``


def _names(model: onnx.ModelProto) -> set[str]:
    taken = {t.name for t in model.graph.initializer} | {n.name for n in model.graph.node}
    return taken | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


def unique_name(model: onnx.ModelProto, base: str) -> str:
    """A name no initializer, node, node output or graph input of ``model`` has (see ``fresh_name``)."""
    reserved = _RESERVED.get(id(model))
    return fresh_name(base, reserved if reserved is not None else _names(model))


@contextmanager
def naming(model: onnx.ModelProto) -> Iterator[None]:
    """Inside, ``unique_name(model, ...)`` reads the model's names once, then every name it hands
    out is added to them, instead of collecting every name of the graph on each call (quadratic:
    static int8 asks for about six names per quantized tensor; 0.2 to 0.4 CPU seconds of a job
    on the PP-OCR recognizer). For loops that add names only through ``unique_name`` (or reuse
    names the model has): a name set some other way inside would not be seen. The names handed out
    only grow, so a name stays unique even where its node is removed again."""
    key = id(model)
    if key in _RESERVED:
        yield
        return
    _RESERVED[key] = _names(model)
    try:
        yield
    finally:
        del _RESERVED[key]


def opset(model: onnx.ModelProto, domain: str = "") -> int:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return 0


def ensure_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Raise the default-domain opset to at least ``version`` (ONNX's version converter), keeping
    the IR version new enough for it. Returns the model to use from then on."""
    if opset(model) >= version:
        return model
    converted = onnx.version_converter.convert_version(model, version)
    return converted


def ensure_domain(model: onnx.ModelProto, domain: str, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain == domain:
            entry.version = max(entry.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def topological_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced before it is read (ONNX requires the graph
    to be sorted already; this also tolerates graphs a rewrite left unsorted)."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    produced = {name for node in model.graph.node for name in node.output}
    # an If / Loop / Scan also waits for what its bodies read from this graph (implicit inputs)
    pending = [(node, list(node.input) + sorted(subgraphs.outer_reads(node) & produced)) for node in model.graph.node]
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for node, needs in pending:
            if all(name in available for name in needs):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append((node, needs))
        if not progressed:
            ordered.extend(node for node, _ in rest)
            break
        pending = rest
    return ordered


def sort_graph(model: onnx.ModelProto) -> None:
    nodes = topological_nodes(model)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def layers_with_bodies(model: onnx.ModelProto, ops: Sequence[str], *, include: Sequence[str] = (),
                       exclude: Sequence[str] = (), min_params: int = 0) -> list[WeightLayer]:
    """``weight_layers``, then the layers inside If / Loop / Scan bodies that read a main-graph weight
    none of those took (an EmbeddingBag's table, gathered in a Loop)."""
    main = weight_layers(model, ops=ops, include=include, exclude=exclude, min_params=min_params)
    inits = initializers(model)
    return main + [layer for layer in body_layers(model, ops, {layer.weight for layer in main}, include=include,
                                                  exclude=exclude, min_params=min_params)
                   if layer.weight in inits]


def body_layers(model: onnx.ModelProto, ops: Sequence[str], seen: set[str], *, include: Sequence[str] = (),
                exclude: Sequence[str] = (), min_params: int = 0) -> list[WeightLayer]:
    """Layers inside bodies whose weight is a main-graph float initializer not in ``seen`` (read from
    the outer scope) or the body's own (before ``subgraphs.hoist_weights`` moved it), filtered like
    ``weight_layers``. Unnamed body nodes are named here (``<control-flow node>/<op>_<n>``)
    so the report and include / exclude can address them."""
    inits = initializers(model)
    names = {n.name for _, n, _ in subgraphs.body_nodes(model) if n.name} | {n.name for n in model.graph.node}
    found: list[WeightLayer] = []
    for top, node, body in subgraphs.body_nodes(model):
        if node.op_type not in ops:
            continue
        own = subgraphs.scope_names(body)
        local = {t.name: t for t in body.initializer}
        for index, name in enumerate(node.input):
            if name in local and name in inits:     # shadows an outer name: hoisting leaves it in the body
                continue
            tensor = local.get(name, inits.get(name))
            if tensor is None or name in seen or name in own or tensor.data_type not in subgraphs.FLOAT_TYPES:
                continue
            axes = _weight_axes(node, index, len(tensor.dims))
            if axes is None:
                continue
            if not node.name:
                node.name = fresh_name(f"{top.name or top.op_type}/{node.op_type}", names, numbered=True)
            _take(WeightLayer(name, node.name, node.op_type, tuple(tensor.dims), *axes), seen, found,
                  include, exclude, min_params)
    return found
