"""Channel pruning: remove whole output channels of Conv / features of Gemm and MatMul, and the
matching inputs of every layer that reads them, so tensors and MACs really shrink.

The analysis walks the graph once in topological order and gives every tensor that carries pruned
channels a *layout*: the axis the channels lie on and, along it, a list of segments
``(group, channels, repeat)`` — ``repeat`` consecutive positions per channel after a Flatten of
``[N, C, H, W]`` (H*W per channel), several segments after a Concat, ``group None`` for positions
that are never pruned. A *group* is a set of channels that must be removed together: each producer
(Conv group 1, Gemm, MatMul with a constant 2-D weight) starts one, and an elementwise op with two
grouped inputs (a residual Add, a gating Mul) unites their groups (union-find), because the
channels of both operands meet position by position.

Layouts pass through BatchNormalization / InstanceNormalization (their per-channel constants are
sliced), elementwise activations, constants that broadcast (sliced where they hold one value per
channel), pooling, depthwise Conv (its weight, bias and ``group`` shrink with it), Dropout, Concat
along the channel axis, Flatten and Reshape that keep or flatten the channel axis (an explicit
size in the shape constant is rewritten). Layers that read a layout (Conv, MatMul, Gemm) lose the
matching input rows. Anything else that reads a grouped tensor (a graph output, Softmax, a
LayerNormalization over the channels, a Reshape into attention heads that ``prune.heads`` does
not recognise, a Transpose, a subgraph) *blocks* its groups: they are left whole and reported with
the reason. So does a weight that several layers read: cutting it for one reader would split it
into a sliced copy per reader and grow the model.

Attention heads: where ``prune.heads`` finds a multi-head attention block that works head by
head, its Q, K, V projections make one group whose channels are the heads (``head_size`` columns
each, in each third of a packed projection); the Reshapes' head counts are rewritten and the output
projection loses the matching rows.

How many go: ``round(sparsity * sum C)`` over the groups that can be pruned, apportioned to the
groups in whole blocks of the target's channel block (``channel_block``, ``apportion``): ONNX
Runtime's convolutions run channels in blocks, and a count off the block wastes the saving.
Which go: in each group, the channels with the smallest importance
``sum_p ||W_p[c]||_2 * s_p[c] / mean_c(||W_p[c]||_2 * s_p[c])`` over the group's producers p, where ``s_p`` is ``|gamma| / sqrt(var + eps)`` of a BatchNormalization right
after the producer (1 otherwise): each producer's norms are made comparable before they are summed.

With calibration data, every layer that loses inputs is refit by least squares to reproduce its
original outputs from the inputs it keeps (``worker.pipeline.prune.compensate``), its bias
included: a MatMul's is the constant of the Add right after it. Heads are then chosen by what they
measurably add to the output projection (``_head_contributions``), not by weight norms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

import kernels
from core.recipe import PruneStep
from worker.pipeline import activations, host, subgraphs
from worker.pipeline.shape_inference import skeleton
from worker.pipeline.data import bind
from worker.pipeline.graph import attribute, topological_nodes, unique_name, weight_layers
from worker.pipeline.step import StepContext, StepResult, selects_no_weight
from worker.pipeline.prune.compensate import InputCut, compensate
from worker.pipeline.prune.heads import find_head_sites
from worker.pipeline.records import StepLog, layer_record, sparsity_of

UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
                   "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal",
                   "Identity", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Mish", "ThresholdedRelu", "Cast",
                   "Clip"})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"})
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclass(frozen=True)
class Segment:
    group: int | None
    channels: int
    repeat: int = 1


@dataclass(frozen=True)
class Layout:
    axis: int
    rank: int
    segments: tuple[Segment, ...]

    @property
    def positions(self) -> int:
        return sum(s.channels * s.repeat for s in self.segments)


@dataclass
class Producer:
    weight: str
    axis: int
    node: str
    output: str
    scale: np.ndarray | None = None
    span: tuple[int, int] = (1, 1)   # (copies, positions) per channel: a head is copies x head_size columns


@dataclass
class Action:
    """Slice initializer ``input_name`` (read by ``node`` at ``index``) along ``axis`` by ``layout``
    (kind ``slice``; ``input`` when they are the input features of a Conv / Gemm / MatMul weight);
    kind ``reshape`` rewrites entry ``axis`` of a shape constant; kind ``group`` a Conv attribute."""

    kind: str
    node: str
    index: int
    name: str
    axis: int
    layout: Layout


@dataclass
class ChannelGraph:
    parent: list[int] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)
    producers: list[list[Producer]] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    head_sizes: dict[int, int] = field(default_factory=dict)   # group -> head size, for groups of heads
    head_outputs: dict[int, str] = field(default_factory=dict)  # group of heads -> its output projection
    # weights whose output channels start no group, and why (the step lists them as skipped)
    not_grouped: dict[str, str] = field(default_factory=dict)

    def new_group(self, channels: int) -> int:
        self.parent.append(len(self.parent))
        self.channels.append(channels)
        self.reasons.append([])
        self.producers.append([])
        return len(self.parent) - 1

    def find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.reasons[ra].extend(self.reasons[rb])
            self.producers[ra].extend(self.producers[rb])

    def block(self, layout: Layout | None, reason: str) -> None:
        if layout is None:
            return
        for segment in layout.segments:
            if segment.group is not None:
                root = self.find(segment.group)
                if reason not in self.reasons[root]:
                    self.reasons[root].append(reason)

    def roots(self) -> list[int]:
        return sorted({self.find(g) for g in range(len(self.parent))})


class _Analysis:
    """One pass over the graph building the ChannelGraph (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, selected: set[str]):
        self.model = model
        self.selected = selected
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        overridable = {i.name for i in model.graph.input}
        self.inits = {k: v for k, v in self.inits.items() if k not in overridable}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, list[int | str | None]] = {}
        for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                           for d in value.type.tensor_type.shape.dim]
        for name, array in self.inits.items():
            self.shapes[name] = list(array.shape)
        self.readers: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        # a graph output is read too: a Dropout's mask or a MaxPool's indices given out as a model
        # output keep their channels (the shrunk mask clashed with its declared shape, exit 1)
        for output in model.graph.output:
            self.readers[output.name] = self.readers.get(output.name, 0) + 1
        # a weight that If / Loop / Scan bodies read as well is shared with layers this pass never sees
        for name in subgraphs.subgraph_reads(model, outer_only=True):
            self.readers[name] = self.readers.get(name, 0) + 1
        self.graph = ChannelGraph()
        self.layouts: dict[str, Layout] = {}
        self.sites = find_head_sites(model, self.inits, self.shapes)
        self.head_projections = {name: (index, copies) for index, site in enumerate(self.sites)
                                 for name, copies in site.projections}
        self.head_splits = {name for site in self.sites for name in site.splits}
        self.head_merges = {site.merge: index for index, site in enumerate(self.sites)}
        self.site_groups: dict[int, int] = {}

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def static(self, name: str, dims: range | list[int]) -> list[int] | None:
        shape = self.shapes.get(name)
        if shape is None:
            return None
        values = [shape[d] for d in dims]
        return values if all(isinstance(v, int) and v > 0 for v in values) else None

    def run(self) -> ChannelGraph:
        for node in topological_nodes(self.model):
            ins = [self.layouts.get(name) if name else None for name in node.input]
            hidden = subgraphs.inner_reads(node)
            grouped = any(layout is not None for layout in ins)
            if hidden:
                for name in hidden:
                    self.graph.block(self.layouts.get(name), f"subgraph of {node.op_type} {node.name} reads {name}")
            handler = self._handler(node)
            handled = handler(node, ins) if handler is not None else not grouped
            if not handled:
                for name, layout in zip(node.input, ins):
                    self.graph.block(layout, f"{node.op_type} {node.name} reads {name}")
        for output in self.model.graph.output:
            self.graph.block(self.layouts.get(output.name), f"graph output {output.name}")
        return self.graph

    def _handler(self, node: onnx.NodeProto):
        """The method that knows how ``node`` treats channels; None for every other op (custom
        domains included), which then blocks whatever grouped tensor it reads."""
        if node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op in UNARY:
            return self._unary
        if op in ELEMENTWISE:
            return self._elementwise
        if op in POOLS:
            return self._pool
        if op in NORMS:
            return self._norm
        return {"Conv": self._Conv, "MatMul": self._MatMul, "Gemm": self._Gemm, "Dropout": self._Dropout,
                "Concat": self._Concat, "Flatten": self._Flatten, "Reshape": self._Reshape}.get(op)

    # -- helpers -----------------------------------------------------------------------------
    def _act(self, kind: str, node: onnx.NodeProto, index: int, axis: int, layout: Layout) -> None:
        self.graph.actions.append(Action(kind, node.name, index, node.input[index], axis, layout))

    def _shared(self, weight: str) -> str | None:
        """Why ``weight`` cannot lose rows or columns for one of its readers: a weight several layers
        read would be split into a sliced copy per reader, and the model would grow (as lowrank
        says too, a shared weight is left whole)."""
        count = self.readers.get(weight, 0)
        return f"weight {weight} is shared by {count} readers" if count > 1 else None

    def _weight_input(self, node: onnx.NodeProto, axis: int, x: Layout) -> None:
        """``node``'s weight loses the input rows of the channels ``x`` loses, unless it is shared."""
        reason = self._shared(node.input[1])
        if reason is not None:
            self.graph.block(x, reason)
        else:
            self._act("input", node, 1, axis, x)

    def _produce(self, node: onnx.NodeProto, weight: str, axis: int, channels: int, rank: int | None) -> int | None:
        if rank is None:
            self.graph.not_grouped[weight] = (f"the rank of {node.op_type} {node.name}'s input is not known "
                                              "(shape inference could not type it)")
            return None
        group = self.graph.new_group(channels)
        self.graph.producers[group].append(Producer(weight, axis, node.name, node.output[0]))
        if weight not in self.selected:
            self.graph.reasons[group].append(f"{weight} is not selected (include / exclude / min_params)")
        shared = self._shared(weight)
        if shared is not None:
            self.graph.reasons[group].append(shared)
        self.layouts[node.output[0]] = Layout(1 if node.op_type in ("Conv", "Gemm") else rank - 1, rank,
                                              (Segment(group, channels),))
        return group

    # -- producers and consumers -----------------------------------------------------------------
    def _Conv(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        if len(node.input) < 2 or node.input[1] not in self.inits or any(ins[1:]):
            return ins[0] is None and not any(ins[1:])
        w = self.inits[node.input[1]]
        has_bias = len(node.input) > 2 and node.input[2] != ""
        if has_bias and node.input[2] not in self.inits:
            return ins[0] is None
        groups = attribute(node, "group", 1)
        if groups != 1:     # a depthwise one whose input channels are pruned is sliced with them
            self.graph.not_grouped[node.input[1]] = (f"a grouped convolution (group {groups}): its channels are "
                                                     "tied across the groups")
        x = ins[0]
        if x is not None:
            if x.axis != 1:
                return False
            if groups == 1:
                self._weight_input(node, 1, x)
            elif groups == x.positions and w.shape[0] == groups and w.shape[1] == 1 and self._shared(node.input[1]):
                self.graph.block(x, self._shared(node.input[1]))   # its channels stay; so does its output
                return True
            elif groups == x.positions and w.shape[0] == groups and w.shape[1] == 1:
                # depthwise: one filter per input channel, so the channels pass straight through
                self._act("slice", node, 1, 0, x)
                if has_bias:
                    self._act("slice", node, 2, 0, x)
                self._act("group", node, 1, 0, x)
                self.layouts[node.output[0]] = Layout(1, x.rank, x.segments)
                return True
            else:
                return False
        if groups == 1:
            group = self._produce(node, node.input[1], 0, int(w.shape[0]), len(w.shape))
            if group is not None:
                layout = self.layouts[node.output[0]]
                self._act("slice", node, 1, 0, layout)
                if has_bias:
                    self._act("slice", node, 2, 0, layout)
        return True

    def _MatMul(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        if ins[1] is not None:
            return False
        b = self.inits.get(node.input[1])
        if b is None or b.ndim != 2:
            return ins[0] is None
        x = ins[0]
        if x is not None:
            if x.axis != x.rank - 1:
                return False
            self._weight_input(node, 0, x)
        if node.name in self.head_projections:
            return self._head_projection(node)
        group = self._produce(node, node.input[1], 1, int(b.shape[1]), self.rank(node.input[0]))
        if group is not None:
            self._act("slice", node, 1, 1, self.layouts[node.output[0]])
        return True

    def _Gemm(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        if any(ins[1:]):
            return False
        b = self.inits.get(node.input[1])
        if b is None:
            return ins[0] is None
        trans_b = attribute(node, "transB", 0)
        x = ins[0]
        if x is not None:
            if attribute(node, "transA", 0) or x.axis != 1 or x.rank != 2:
                return False
            self._weight_input(node, 1 if trans_b else 0, x)
        out_axis = 0 if trans_b else 1
        group = self._produce(node, node.input[1], out_axis, int(b.shape[out_axis]), 2)
        layout = self.layouts[node.output[0]]
        self._act("slice", node, 1, out_axis, layout)
        if len(node.input) > 2 and node.input[2]:
            c = self.inits.get(node.input[2])
            if c is None:
                self.graph.reasons[group].append(f"Gemm {node.name} adds a computed C")
            elif c.ndim >= 1 and c.shape[-1] == b.shape[out_axis] and c.shape[-1] > 1:
                self._act("slice", node, 2, c.ndim - 1, layout)
        return True

    # -- attention heads (prune.heads) -------------------------------------------------------
    def _head_group(self, index: int) -> int:
        """The group whose channels are site ``index``'s heads; made, with the rewrite of every
        constant that holds the head count, by the site's first projection."""
        if index in self.site_groups:
            return self.site_groups[index]
        site = self.sites[index]
        group = self.graph.new_group(site.heads)
        self.graph.head_sizes[group] = site.head_size
        self.site_groups[index] = group
        for entry in site.shape_entries:
            layout = Layout(0, 1, (Segment(group, site.heads, entry.per_head),))
            self.graph.actions.append(Action("reshape", entry.node, entry.index, entry.name, entry.entry, layout))
        return group

    def _head_projection(self, node: onnx.NodeProto) -> bool:
        index, copies = self.head_projections[node.name]
        site, rank = self.sites[index], self.rank(node.input[0])
        if rank is None:
            return False
        group = self._head_group(index)
        self.graph.producers[group].append(Producer(node.input[1], 1, node.name, node.output[0],
                                                    span=(copies, site.head_size)))
        if node.input[1] not in self.selected:
            self.graph.reasons[group].append(f"{node.input[1]} is not selected (include / exclude / min_params)")
        layout = Layout(rank - 1, rank, (Segment(group, site.heads, site.head_size),) * copies)
        self.layouts[node.output[0]] = layout
        self._act("slice", node, 1, 1, layout)
        return True

    # -- pass-through ops ----------------------------------------------------------------------
    def _unary(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        if any(ins[1:]):
            return False
        if ins[0] is not None:
            for index in range(1, len(node.input)):      # Clip's min / max: scalars only
                if node.input[index] and (self.inits.get(node.input[index]) is None or self.inits[node.input[index]].size != 1):
                    return False
            self.layouts[node.output[0]] = ins[0]
        return True

    def _Dropout(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        if any(ins[1:]) or (ins[0] is not None and len(node.output) > 1 and node.output[1] and self.readers.get(node.output[1])):
            return False
        if ins[0] is not None:
            self.layouts[node.output[0]] = ins[0]
        return True

    def _pool(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        x = ins[0]
        if x is None:
            return True
        if x.axis != 1 or (len(node.output) > 1 and node.output[1] and self.readers.get(node.output[1])):
            return False
        self.layouts[node.output[0]] = x
        return True

    def _norm(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        x = ins[0]
        if x is None:
            return not any(ins[1:])
        if x.axis != 1 or any(ins[1:]) or any(node.input[i] not in self.inits for i in NORMS[node.op_type]):
            return False
        if len(node.output) > 1 and any(self.readers.get(o) for o in node.output[1:] if o):
            return False
        for index in NORMS[node.op_type]:
            self._act("slice", node, index, 0, x)
        if node.op_type == "BatchNormalization" and len(x.segments) == 1:
            # a BN right after its producer scales that producer's channels: fold into importance
            root = self.graph.find(x.segments[0].group) if x.segments[0].group is not None else None
            for producer in self.graph.producers[root] if root is not None else []:
                if producer.output == node.input[0]:
                    gamma, var = self.inits[node.input[1]], self.inits[node.input[4]]
                    producer.scale = np.abs(gamma) / np.sqrt(var + attribute(node, "epsilon", 1e-5))
        self.layouts[node.output[0]] = x
        return True

    def _elementwise(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        grouped = [layout for layout in ins if layout is not None]
        if not grouped:
            return True
        out_rank = self.rank(node.output[0])
        if out_rank is None:
            return False
        first = grouped[0]
        axis = first.axis + out_rank - first.rank
        for index, (name, layout) in enumerate(zip(node.input, ins)):
            if layout is not None:
                if layout.axis + out_rank - layout.rank != axis or \
                        [(s.channels, s.repeat, s.group is None) for s in layout.segments] != \
                        [(s.channels, s.repeat, s.group is None) for s in first.segments]:
                    return False
                for a, b in zip(first.segments, layout.segments):
                    if a.group is not None:
                        self.graph.union(a.group, b.group)
                continue
            shape = self.shapes.get(name)
            if shape is None:
                return False
            aligned = axis - (out_rank - len(shape))
            if aligned < 0 or shape[aligned] == 1:
                continue                                  # broadcasts over the channels
            if name in self.inits and shape[aligned] == first.positions:
                self._act("slice", node, index, aligned, first)
                continue
            return False
        self.layouts[node.output[0]] = Layout(axis, out_rank, first.segments)
        return True

    def _Concat(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        if not any(ins):
            return True
        rank = self.rank(node.output[0])
        if rank is None:
            return False
        axis = attribute(node, "axis") % rank
        segments: list[Segment] = []
        for name, layout in zip(node.input, ins):
            if layout is not None:
                if layout.axis != axis or layout.rank != rank:
                    return False
                segments.extend(layout.segments)
                continue
            size = self.static(name, [axis])
            if size is None:
                return False
            segments.append(Segment(None, size[0]))
        self.layouts[node.output[0]] = Layout(axis, rank, tuple(segments))
        return True

    def _flatten_tail(self, name: str, x: Layout) -> Layout | None:
        inner = self.static(name, range(x.axis + 1, x.rank))
        if inner is None:
            return None
        factor = int(np.prod(inner)) if inner else 1
        return Layout(x.axis, x.axis + 1, tuple(Segment(s.group, s.channels, s.repeat * factor) for s in x.segments))

    def _Flatten(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        x = ins[0]
        if x is None:
            return True
        if attribute(node, "axis", 1) % x.rank != x.axis:
            return False
        flat = self._flatten_tail(node.input[0], x)
        if flat is None:
            return False
        self.layouts[node.output[0]] = Layout(1, 2, flat.segments)
        return True

    def _Reshape(self, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        x = ins[0]
        if node.name in self.head_splits:
            return ins[1] is None          # into heads: the head count is rewritten by its shape entry
        if node.name in self.head_merges and x is None and ins[1] is None:
            site = self.sites[self.head_merges[node.name]]
            group = self.site_groups.get(self.head_merges[node.name])
            rank = self.rank(node.output[0])
            if group is not None and rank is not None:
                self.layouts[node.output[0]] = Layout(rank - 1, rank, (Segment(group, site.heads, site.head_size),))
                output = next(n for n in self.model.graph.node if n.name == site.output)
                # a head's rows of the output projection count in its importance, as its Q, K, V columns do
                self.graph.producers[group].append(Producer(output.input[1], 0, output.name, output.output[0],
                                                            span=(1, site.head_size)))
                self.graph.head_outputs[group] = output.name
            return True
        if x is None:
            return ins[1] is None
        target = self.inits.get(node.input[1])
        before, after = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if ins[1] is not None or target is None or before is None or after is None or attribute(node, "allowzero", 0):
            return False
        if len(after) > x.axis and after[:x.axis] == before[:x.axis] and None not in before[:x.axis]:
            if len(after) == x.axis + 1:
                layout = self._flatten_tail(node.input[0], x)       # [.., C, H, W] -> [.., C*H*W]
            elif after[x.axis] == before[x.axis] and isinstance(after[x.axis], int):
                layout = Layout(x.axis, len(after), x.segments)      # the channel axis stays as it is
            else:
                layout = None
            if layout is not None and target[x.axis] in (0, -1, layout.positions):
                if target[x.axis] == layout.positions:
                    self._act("reshape", node, 1, x.axis, layout)
                self.layouts[node.output[0]] = layout
                return True
        return False


def _checked_shapes(pruned: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """The pruned model with its shapes inferred strictly, so that a cut that left two readers of a
    tensor disagreeing on its channels fails here, not in the user's runtime. Where ONNX's
    inference cannot type the original either (GroupNormalization at opset 21 in onnx 1.x has no
    output type), strictness proves nothing: inference runs lenient, and the runner's own run of
    the result on the data is the check."""
    try:
        return onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    except onnx.shape_inference.InferenceError:
        try:
            onnx.shape_inference.infer_shapes(skeleton(original), strict_mode=True)
        except onnx.shape_inference.InferenceError:
            return onnx.shape_inference.infer_shapes(pruned)
        raise


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Constant nodes become initializers so the analysis can read and slice them."""
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            model.graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(node.attribute[0].t), node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _importance(graph: ChannelGraph, root: int, arrays: dict[str, np.ndarray]) -> np.ndarray:
    total = np.zeros(graph.channels[root], dtype=np.float64)
    for producer in graph.producers[root]:
        norms = kernels.channel_norms(np.ascontiguousarray(arrays[producer.weight], dtype=np.float32),
                                      axis=producer.axis, p=2).astype(np.float64)
        copies, positions = producer.span
        if (copies, positions) != (1, 1):   # a head: the L2 norm over all its columns (or rows)
            norms = np.sqrt((norms.reshape(copies, -1, positions) ** 2).sum(axis=(0, 2)))
        if producer.scale is not None:
            norms = norms * producer.scale
        mean = norms.mean()
        total += norms / mean if mean > 0 else norms
    return total


def _head_contributions(model: onnx.ModelProto, graph: ChannelGraph, roots: list[int], arrays: dict[str, np.ndarray],
                        ctx: StepContext) -> dict[int, np.ndarray]:
    """Per head of each group in ``roots``: the energy, over the calibration data, of what the head
    adds to its output projection's result, less its mean (the refit moves a mean into the bias).
    Weight norms say little about a head: on the bench transformer (one head of four removed per
    block, nothing refit) they chose a pair that left accuracy 0.933, this measure one that left
    0.949, where the best of the 16 pairs gives 0.951."""
    sites = {}
    nodes = {node.name: node for node in model.graph.node}
    for root in roots:
        if root in graph.head_outputs:
            output = nodes[graph.head_outputs[root]]
            sites[root] = (output.input[0], arrays[output.input[1]].astype(np.float64), graph.head_sizes[root])
    if not sites:
        return {}
    sums = {root: [0, 0.0, None] for root in sites}     # rows, sum of squares per head, sum per head
    for batch in activations.capture(model, bind(model, ctx.calibration), sorted({s[0] for s in sites.values()}),
                                     batch_size=64):
        for root, (tensor, weight, head_size) in sites.items():
            x = batch[tensor].reshape(-1, weight.shape[0]).astype(np.float64)
            heads = weight.shape[0] // head_size
            parts = np.stack([x[:, h * head_size:(h + 1) * head_size] @ weight[h * head_size:(h + 1) * head_size]
                              for h in range(heads)])                         # [heads, rows, outputs]
            acc = sums[root]
            acc[0] += x.shape[0]
            acc[1] = acc[1] + (parts ** 2).sum(axis=(1, 2))
            acc[2] = parts.sum(axis=1) if acc[2] is None else acc[2] + parts.sum(axis=1)
    return {root: rows_squares - (totals ** 2).sum(axis=1) / max(rows, 1)
            for root, (rows, rows_squares, totals) in sums.items()}


def _positions(layout: Layout, keep: dict[int, np.ndarray], graph: ChannelGraph) -> np.ndarray:
    out, offset = [], 0
    for segment in layout.segments:
        kept = keep.get(graph.find(segment.group)) if segment.group is not None else None
        channels = np.arange(segment.channels) if kept is None else kept
        out.append(offset + (channels[:, None] * segment.repeat + np.arange(segment.repeat)[None, :]).reshape(-1))
        offset += segment.channels * segment.repeat
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _compensation(model: onnx.ModelProto, graph: ChannelGraph, keep: dict[int, np.ndarray],
                  nodes: dict[str, onnx.NodeProto], readers: dict[str, int], arrays: dict[str, np.ndarray],
                  ctx: StepContext) -> dict[str, np.ndarray]:
    """Refit the layers that lose inputs on the calibration data (``prune.compensate``):
    returns new full-size weights and biases by initializer name."""
    cuts, names = [], {}
    for action in graph.actions:
        if action.kind != "input":
            continue
        positions = _positions(action.layout, keep, graph)
        node = nodes[action.node]
        weight_name = node.input[1]
        if positions.size == action.layout.positions or readers.get(weight_name, 0) > 1:
            continue
        bias_name = _following_bias(node, model, arrays) if node.op_type == "MatMul" else \
            node.input[2] if len(node.input) > 2 and node.input[2] else None
        bias = arrays.get(bias_name) if bias_name else None
        rows = arrays[weight_name].shape[0 if node.op_type == "Conv" or _gemm_trans_b(node) else 1]
        beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if bias is None or bias.shape != (rows,) or readers.get(bias_name, 0) > 1 or beta == 0:
            bias, bias_name = None, None
        cuts.append(InputCut(node, arrays[weight_name], None if bias is None else bias * beta, positions,
                             action.layout.positions))
        names[node.name] = (weight_name, bias_name, beta)
    refit = compensate(model, bind(model, ctx.calibration), cuts)
    updated = {}
    for node_name, (weight, bias) in refit.items():
        weight_name, bias_name, beta = names[node_name]
        updated[weight_name] = weight
        if bias_name is not None and bias is not None:
            updated[bias_name] = (bias / beta).astype(bias.dtype)
    return updated


def _following_bias(node: onnx.NodeProto, model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> str | None:
    """The constant vector added to MatMul ``node``'s output right after it (``Add(y, b)``, as exporters
    write a linear layer's bias), where nothing else reads that output: the refit can move the mean
    of what the removed inputs carried there."""
    readers = [n for n in model.graph.node if node.output[0] in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or node.output[0] in {o.name for o in model.graph.output}:
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    value = arrays.get(other)
    return other if value is not None and value.ndim == 1 else None


def _gemm_trans_b(node: onnx.NodeProto) -> bool:
    return node.op_type == "Gemm" and bool(attribute(node, "transB", 0))


def channel_block(target: str, options: dict | None = None) -> int:
    """Channels ONNX Runtime's convolution kernels process together on ``target``: MLAS's NCHWc
    layout works in blocks of 16 channels with AVX-512 and 8 with AVX2; a partly filled block
    costs about as much as a full one, and a ragged channel count can even fall off the fast
    path (measured on the digits CNN: 22 / 45 channels ran 1.4x slower than the original 32 / 64,
    16 / 48 ran 2x faster). GPUs' tensor cores want multiples of 8; NEON kernels 4. For cpu-x86
    the block reads this host's AVX-512, recorded in ``options`` (host.note_choice)."""
    if target == "cpu-arm":
        return 4
    if target == "gpu":
        return 8
    cpu = host.cpu_info()
    block = 16 if cpu.has("avx512") else 8
    host.note_choice(options, "channel block", block, host.feature_text(cpu, "avx512"))
    return block


def apportion(channels: list[int], sparsity: float, block: int) -> list[int]:
    """Channels to remove per group: ``round(sparsity * sum C)`` overall, in whole blocks where a
    group has at least two blocks (single channels otherwise), at least one block kept per group.

    Largest-remainder apportionment: every group first removes the whole units below its share
    ``sparsity * C``; then, groups in decreasing order of the fraction of a unit left over get one
    more unit while that brings the total closer to the request."""
    units = [block if c >= 2 * block and c % block == 0 else 1 for c in channels]
    shares = [sparsity * c / u for c, u in zip(channels, units)]
    removals = [int(np.floor(share)) * u for share, u in zip(shares, units)]
    removals = [min(r, c - u) for r, c, u in zip(removals, channels, units)]
    target = int(round(sparsity * sum(channels)))
    order = sorted(range(len(channels)), key=lambda i: (-(shares[i] - np.floor(shares[i])), i))
    for i in order:
        total = sum(removals)
        if removals[i] + units[i] <= channels[i] - units[i] and abs(total + units[i] - target) < abs(total - target):
            removals[i] += units[i]
    return removals


def prune_channels(model: onnx.ModelProto, params: PruneStep, ctx: StepContext) -> StepResult:
    """Remove ``sparsity`` of the channels of the groups that can be pruned safely (see ``apportion``)."""
    selected_layers = weight_layers(model, ops=("Conv", "Gemm", "MatMul"), include=params.include,
                                    exclude=params.exclude, min_params=params.min_params)
    if not selected_layers:
        raise selects_no_weight("prune", ("Conv", "Gemm", "MatMul"), params, model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _constants_to_initializers(out)
    graph = _Analysis(out, {layer.weight for layer in selected_layers}).run()
    arrays = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    params_before = {layer.weight: layer.params for layer in selected_layers}

    log = StepLog()
    keep: dict[int, np.ndarray] = {}
    prunable = []
    for root in graph.roots():
        producers = [p.weight for p in graph.producers[root]]
        if graph.reasons[root]:
            log.skip(", ".join(producers), "; ".join(graph.reasons[root]))
        else:
            prunable.append(root)
    grouped = {p.weight for root in graph.roots() for p in graph.producers[root]} | {a.name for a in graph.actions}
    for layer in selected_layers:
        if layer.weight not in grouped:
            # a layer no channel group starts from was in neither layers nor skipped
            log.skip(layer.weight, graph.not_grouped.get(layer.weight, "its output channels start no group the "
                                                        "channel analysis follows"))
    block = int(ctx.options.get("channel_block") or channel_block(ctx.target, ctx.options))
    removals = apportion([graph.channels[root] for root in prunable], params.sparsity, block)
    removed_total = sum(removals)
    channels_total = sum(graph.channels[root] for root in prunable)
    measured = _head_contributions(out, graph, [r for r, n in zip(prunable, removals) if n and r in graph.head_sizes],
                                   arrays, ctx) if ctx.calibration else {}
    for root, remove in zip(prunable, removals):
        channels = graph.channels[root]
        if remove > 0:
            importance = measured[root] if root in measured else _importance(graph, root, arrays)
            order = np.argsort(-importance, kind="stable")
            keep[root] = np.sort(order[:channels - remove])
        entry = {"name": ", ".join(p.weight for p in graph.producers[root]), "op": "channels",
                 "channels": channels, "kept": channels - remove, "removed": remove}
        if root in graph.head_sizes:
            entry.update(op="heads", head_size=graph.head_sizes[root])
        log.layers.append(entry)

    readers: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes = {node.name: node for node in out.graph.node}
    changed: set[str] = set()
    new_arrays: dict[str, np.ndarray] = {}
    if ctx.calibration and keep:
        new_arrays.update(_compensation(out, graph, keep, nodes, readers, arrays, ctx))
    sliced: dict[str, list[tuple[int, np.ndarray]]] = {}   # weight -> the (axis, kept index) cuts, in order
    for action in graph.actions:
        positions = _positions(action.layout, keep, graph)
        if positions.size == action.layout.positions:
            continue
        node = nodes[action.node]
        if action.kind == "group":
            for attr in node.attribute:
                if attr.name == "group":
                    attr.i = int(positions.size)
            changed.add(node.name)
            continue
        name = node.input[action.index]
        current = new_arrays.get(name, arrays[name])
        if action.kind == "reshape":
            updated = current.copy()
            updated[action.axis] = positions.size
        else:
            updated = np.take(current, positions, axis=action.axis)
            sliced.setdefault(action.name, []).append((action.axis, positions))
        if readers.get(name, 0) > 1:
            # shared constant: this reader gets its own sliced copy, the others keep theirs
            fresh = unique_name(out, f"{name}_pruned")
            out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(updated), fresh))
            readers[name] -= 1
            node.input[action.index] = fresh
            arrays[fresh] = updated
            readers[fresh] = 1
        else:
            new_arrays[name] = updated
        changed.add(name)
    for tensor in out.graph.initializer:
        if tensor.name in new_arrays:
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new_arrays[tensor.name]), tensor.name))
    # what If / Loop / Scan bodies read from the main graph stays too (silero-vad's LSTM weights)
    used = {name for node in out.graph.node for name in node.input} | subgraphs.subgraph_reads(out, outer_only=True)
    kept_inits = [t for t in out.graph.initializer if t.name in used or t.name in {o.name for o in out.graph.output}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits)
    del out.graph.value_info[:]
    out = _checked_shapes(out, model)

    after = {t.name: t for t in out.graph.initializer}
    params_after = sum(int(np.prod(after[layer.weight].dims)) for layer in selected_layers if layer.weight in after)
    # every layer that lost rows or columns gets a record, consumers included: distill refits them,
    # with an all-True mask (nothing inside the remaining tensor is pruned) or the earlier mask, sliced
    for layer in weight_layers(out, ops=("Conv", "Gemm", "MatMul"), min_params=0):
        if layer.weight not in sliced:
            continue
        array = numpy_helper.to_array(after[layer.weight])
        record = layer_record(ctx, layer)
        mask = record.mask
        for axis, index in sliced[layer.weight]:
            if mask is not None:
                mask = np.take(mask, index, axis=axis)
        record.mask = mask if mask is not None and mask.shape == array.shape else np.ones(array.shape, dtype=bool)
        record.sparsity = sparsity_of(array)
        record.extra["shape"] = list(array.shape)
        record.extra["structure"] = "channel"
        # which original output channels / input positions survive, so a teacher's tensors can be
        # sliced to match (layerwise distillation compares layer outputs position by position)
        for axis, index in sliced[layer.weight]:
            key = "kept_outputs" if axis == layer.out_axis else "kept_inputs" if axis == layer.in_axis else None
            if key is not None:
                record.extra[key] = index.astype(int).tolist()
    return StepResult(out, sorted(changed), log.metrics(
        structure="channel", channel_block=block, channel_sparsity=removed_total / channels_total if channels_total else 0.0,
        params_before=int(sum(params_before.values())), params_after=int(params_after),
        sparsity=removed_total / channels_total if channels_total else 0.0))
