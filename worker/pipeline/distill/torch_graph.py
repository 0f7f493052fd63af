"""An ONNX graph run op by op in PyTorch, so ``kd`` can differentiate through it.

Why our own interpreter: PyTorch has no ONNX importer, and the converters that exist (onnx2torch
and the like) are extra dependencies with their own op gaps. Distillation needs only the forward
semantics of the ops exported classifiers and encoders use, written once in ``torch.nn.functional``,
plus control over which tensors are parameters. ``unsupported_ops`` lists what a model holds beyond
``OPS`` so the step is refused before any work; ``kd`` also checks the translation against ONNX
Runtime on real data before it trains.

Constant weights become trainable parameters (``trainable``); a weight behind a DequantizeLinear
(weight-only quantization) is a float parameter seen through fake quantization on its fixed grid
(straight-through gradient); a pruned weight is seen as ``parameter * mask``; a shared-value
(clustered) weight is ``centroids[labels]`` with the centroids the parameter (a zero centroid fixed
at zero). So the constraints hold during training and writing the weights back loses nothing.
Constant subgraphs (the cluster step's label decoding, Constant nodes) are evaluated once by ONNX
Runtime and enter as constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from worker.pipeline import graph
from worker.pipeline.distill.layers import Grid, constant_nodes

OPS = frozenset({
    "Abs", "Add", "And", "AveragePool", "BatchNormalization", "BitShift", "Cast", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "CumSum", "DequantizeLinear", "Div", "Dropout", "Equal", "Erf", "Exp", "Expand",
    "Flatten", "Gather", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "HardSigmoid", "HardSwish", "Identity", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "LogSoftmax", "LSTM", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "QuantizeLinear",
    "Range", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid",
    "Sign", "Size", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where",
})

# contrib ops with a translation: ORT's fused weight-only MatMul (its weight enters as a float tensor)
CONTRIB_OPS = frozenset({("com.microsoft", "MatMulNBits"), ("com.microsoft", "DynamicQuantizeMatMul")})

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.INT16: torch.int16,
}


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types (``domain::Op`` outside the default domain) the interpreter cannot run, sorted.
    Nodes computed from initializers alone do not count: ONNX Runtime evaluates them once."""
    missing = set()
    # nodes are keyed by their outputs: protobuf hands out a new wrapper object per access
    constant = {tuple(node.output) for node in constant_nodes(model)}
    for node in model.graph.node:
        if tuple(node.output) in constant or (node.domain, node.op_type) in CONTRIB_OPS:
            continue
        if node.domain not in ("", "ai.onnx"):
            missing.add(f"{node.domain}::{node.op_type}")
        elif node.op_type not in OPS:
            missing.add(node.op_type)
    if any(f.name for f in model.functions):
        missing.update(f"{f.domain}::{f.name}" for f in model.functions)
    return sorted(missing)


@dataclass
class WeightSpec:
    """How one trainable weight is seen by the graph."""

    name: str                         # the initializer written back (float, or integers behind a DQ)
    output: str                       # the tensor the graph reads (the initializer, or the DQ's output)
    mask: np.ndarray | None = None
    grid: Grid | None = None
    labels: np.ndarray | None = None  # codebook assignment per weight, with ``codebook`` the initial centroids
    codebook: np.ndarray | None = None
    source: Any = None                # a layers.WeightSource that reads and writes a packed layout (MatMulNBits)


_KEPT_INTS = (np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    # np.array(copy) rather than ascontiguousarray: the latter turns a 0-d array into shape [1]
    array = np.asarray(array)
    if array.dtype in (np.float16, np.float32):
        # computed in float32: what ORT's CPU kernels do for most float16 ops too
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    if array.dtype in _KEPT_INTS or array.dtype == np.float64:
        # int8 / uint8 kept: a QuantizeLinear's zero point type decides its range
        return torch.from_numpy(np.array(array, order="C"))
    return torch.from_numpy(np.array(array, dtype=np.int64, order="C"))   # int4 / int2 (ml_dtypes) and the rest


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, sign: bool) -> torch.Tensor:
    """Round onto the grid in the forward pass, identity in the backward (straight-through)."""
    if sign:
        deq = torch.where(w >= 0, 1.0, -1.0) * scale
    else:
        q = torch.clamp(torch.round(w / scale) + zero, qmin, qmax)   # torch.round: half to even, as ONNX
        deq = (q - zero) * scale
    return w + (deq - w).detach()


class TorchGraph(torch.nn.Module):
    """``forward(feeds) -> {name: tensor}`` for the graph's outputs plus any ``extra_outputs``."""

    def __init__(self, model: onnx.ModelProto, weights: list[WeightSpec], extra_outputs: list[str] = (),
                 folded: dict[str, np.ndarray] | None = None):
        """``folded``: values of constant tensors evaluated elsewhere (``layers.constant_values``);
        the constant nodes that compute them are skipped."""
        super().__init__()
        self.model = model
        self.opset = graph.opset(model)
        self.nodes = graph.topological_nodes(model)
        self.outputs = [o.name for o in model.graph.output] + [n for n in extra_outputs]
        self.specs = {spec.output: spec for spec in weights}
        self.params = torch.nn.ParameterDict()
        self.buffers_ = {}
        self._keys: dict[str, str] = {}
        trained = {spec.output for spec in weights}
        constant = constant_nodes(model)
        if folded is None:
            # only the nodes computing trained weights (a DequantizeLinear, a codebook lookup) are skipped
            self.skip_nodes = {tuple(n.output) for n in constant if all(o in trained for o in n.output if o)}
        else:
            # every constant node: what the rest of the graph reads is in ``folded`` or trained
            self.skip_nodes = {tuple(n.output) for n in constant}
        for index, spec in enumerate(weights):
            key = f"w{index}"
            self._keys[spec.output] = key
            if spec.labels is not None:
                codebook = np.asarray(spec.codebook, np.float32).reshape(-1)
                self.params[key] = torch.nn.Parameter(torch.tensor(codebook))
                self.buffers_[key + ".labels"] = torch.from_numpy(np.asarray(spec.labels, np.int64))
                # a zero centroid holds pruned weights: it stays zero
                self.buffers_[key + ".live"] = torch.from_numpy((codebook != 0).astype(np.float32))
            else:
                if spec.source is not None:
                    initial = spec.source.read(model)
                elif spec.grid is not None:
                    initial = spec.grid.dequantize(graph.get_array(model, spec.name).astype(np.int64))
                else:
                    initial = np.asarray(graph.get_array(model, spec.name), np.float32)
                self.params[key] = torch.nn.Parameter(torch.tensor(np.asarray(initial, np.float32)))
            if spec.mask is not None:
                self.buffers_[key + ".mask"] = torch.from_numpy(np.asarray(spec.mask, np.float32))
            if spec.grid is not None:
                self.buffers_[key + ".scale"] = torch.from_numpy(np.asarray(spec.grid.scale, np.float32))
                self.buffers_[key + ".zero"] = torch.from_numpy(np.asarray(spec.grid.zero_point, np.float32))
        trainable_names = {spec.output for spec in weights}
        self.constants = {t.name: _to_torch(numpy_helper.to_array(t)) for t in model.graph.initializer
                          if t.name not in trainable_names}
        self.constants.update({name: _to_torch(value) for name, value in (folded or {}).items()
                               if name not in trainable_names})
        # weights of the contrib MatMuls left out of training still enter as the float matrix they stand for
        from worker.pipeline.distill.layers import linear_layer

        for node in self.nodes:
            if (node.domain, node.op_type) in CONTRIB_OPS and node.input[1] not in trainable_names:
                layer, why = linear_layer(model, node)
                if layer is None:
                    raise ValueError(f"{node.op_type} {node.name}: {why}")
                self.constants[node.input[1]] = torch.from_numpy(layer.weight.read(model))

    def weight(self, output: str) -> torch.Tensor:
        """The weight as the graph sees it, constraints applied."""
        spec = self.specs[output]
        key = self._keys[output]
        param = self.params[key]
        w = (param * self.buffers_[key + ".live"])[self.buffers_[key + ".labels"]] if spec.labels is not None else param
        if spec.mask is not None:
            w = w * self.buffers_[key + ".mask"]
        if spec.grid is not None:
            w = _fake_quant(w, self.buffers_[key + ".scale"], self.buffers_[key + ".zero"], spec.grid.qmin,
                            spec.grid.qmax, spec.grid.sign)
        return w

    def final_weights(self) -> dict[str, np.ndarray]:
        """Each trainable weight's float value after training, constraints applied (weight layout)."""
        with torch.no_grad():
            return {spec.name: self.weight(output).detach().numpy().copy() for output, spec in self.specs.items()}

    def centroids(self) -> dict[str, np.ndarray]:
        """The trained codebook of each shared-value weight, by the codebook's name."""
        with torch.no_grad():
            return {spec.name: (self.params[self._keys[o]] * self.buffers_[self._keys[o] + ".live"]).detach().numpy().copy()
                    for o, spec in self.specs.items() if spec.labels is not None}

    def forward(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = dict(self.constants)
        for output in self.specs:
            env[output] = self.weight(output)
        env.update(feeds)
        env[""] = None
        for node in self.nodes:
            if tuple(node.output) in self.skip_nodes:
                continue
            args = [env[name] for name in node.input]
            results = _run_node(node, args, self.opset)
            for name, value in zip(node.output, results):
                if name:
                    env[name] = value
        return {name: env[name] for name in self.outputs}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    values = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        values[attr.name] = value.decode() if isinstance(value, bytes) else value
    return values


def _ints(value: torch.Tensor | None) -> list[int] | None:
    return None if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _pads_for(x: torch.Tensor, a: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [begin..., end...], SAME_* resolved from the input's spatial size."""
    dims = len(kernel)
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID":
        return [0] * (2 * dims)
    return list(a.get("pads", [0] * (2 * dims)))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] -> F.pad's last-axis-first [b2, e2, b1, e1]."""
    dims = len(pads) // 2
    out = []
    for axis in reversed(range(dims)):
        out += [pads[axis], pads[axis + dims]]
    return out


def _conv(x, w, b, a):
    dims = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(a.get("strides", [1] * dims))
    dilations = list(a.get("dilations", [1] * dims))
    pads = _pads_for(x, a, kernel, strides, dilations)
    if any(pads):
        x = F.pad(x, _torch_pad(pads))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return fn(x, w, b, stride=strides, dilation=dilations, groups=int(a.get("group", 1)))


def _pool(x, a, kind: str):
    kernel = list(a["kernel_shape"])
    dims = len(kernel)
    strides = list(a.get("strides", [1] * dims))
    dilations = list(a.get("dilations", [1] * dims))
    pads = _pads_for(x, a, kernel, strides, dilations)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        if any(pads):
            x = F.pad(x, _torch_pad(pads), value=float("-inf"))
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
        return fn(x, kernel, strides, 0, dilations, ceil_mode=ceil)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    symmetric = pads[:dims] == pads[dims:] and all(p <= k // 2 for p, k in zip(pads[:dims], kernel))
    include = bool(a.get("count_include_pad", 0))
    if any(pads) and not symmetric:
        x = F.pad(x, _torch_pad(pads))
        if not include:
            raise ValueError("AveragePool with asymmetric padding that excludes the pad is not supported")
        return fn(x, kernel, strides, 0, ceil)
    return fn(x, kernel, strides, pads[:dims], ceil, count_include_pad=include)


def _axes(args, a, index: int = 1) -> list[int] | None:
    if len(args) > index and args[index] is not None:
        return _ints(args[index])
    return list(a["axes"]) if "axes" in a else None


def _reduce(x, args, a, fn):
    axes = _axes(args, a)
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return fn(x, dim=[ax % x.dim() for ax in axes], keepdim=keep)


def _softmax(x, a, opset: int, log: bool):
    fn = torch.log_softmax if log else torch.softmax
    if opset >= 13:
        return fn(x, dim=int(a.get("axis", -1)))
    axis = int(a.get("axis", 1)) % x.dim()
    # before opset 13 the input is coerced to 2-D at ``axis``
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
    return fn(flat, dim=1).reshape(x.shape)


def _slice(x, args):
    starts, ends = _ints(args[1]), _ints(args[2])
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    backwards = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step == 0:
            raise ValueError("Slice with step 0")
        if step > 0:
            index[axis % x.dim()] = slice(start, end, step)
        else:
            backwards.append((start, end, axis % x.dim(), step))
    x = x[tuple(index)]
    for start, end, axis, step in backwards:
        # torch has no negative-step slice: the positions ONNX reads (start, end counted from the
        # end when negative, then clamped to [0, n-1] and [-1, n-1]) gathered with index_select
        size = x.shape[axis]
        start, end = start + size if start < 0 else start, end + size if end < 0 else end
        start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
        x = x.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))
    return x


def _fake_quant_activation(x, scale, zero, a):
    """Scale and zero point as float tensors broadcast along ``axis`` where per channel."""
    axis = int(a.get("axis", 1))
    scale = scale.to(torch.float32)
    zero = zero.to(torch.float32) if zero is not None else torch.zeros((), dtype=torch.float32)
    if scale.dim() == 1 and scale.numel() > 1:
        view = [1] * x.dim()
        view[axis % x.dim()] = -1
        scale, zero = scale.reshape(view), zero.reshape(view)
    return scale, zero


PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _pad(x: torch.Tensor, args: list, a: dict) -> torch.Tensor:
    """ONNX Pad (pads as an input, opset >= 11; ``axes`` when given): torch's pad lists the last
    axis first, begin then end."""
    pads = _ints(args[1])
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(x.dim()))
    axes = [axis % x.dim() for axis in axes]
    begin, end = pads[:len(axes)], pads[len(axes):]
    per_axis = {axis: (b, e) for axis, b, e in zip(axes, begin, end)}
    flat: list[int] = []
    for axis in range(x.dim() - 1, -1, -1):
        flat += list(per_axis.get(axis, (0, 0)))
    while len(flat) > 2 and flat[-2:] == [0, 0]:     # unpadded leading axes: reflect pads at most 3 axes
        flat = flat[:-2]
    mode = PAD_MODES[a.get("mode", "constant")]
    if mode == "constant":
        value = float(args[2]) if len(args) > 2 and args[2] is not None and args[2].numel() else 0.0
        return F.pad(x, flat, mode="constant", value=value)
    return F.pad(x, flat, mode=mode)


def _lstm(args: list, a: dict) -> list:
    """ONNX LSTM, one forward direction, default activations (sigmoid, tanh, tanh), no peepholes,
    every sequence full length; gates in ONNX's order i, o, f, c. Y[seq, 1, batch, H], Y_h, Y_c."""
    if a.get("direction", "forward") != "forward" or a.get("activations") or a.get("clip") \
            or a.get("input_forget", 0) or a.get("layout", 0):
        raise ValueError("LSTM: only a forward LSTM with default activations, no clip, layout 0 is translated")
    if (len(args) > 4 and args[4] is not None) or (len(args) > 7 and args[7] is not None):
        raise ValueError("LSTM: sequence_lens and peepholes are not translated")
    x, w, r = args[0], args[1][0], args[2][0]
    hidden = int(a["hidden_size"])
    bias = args[3][0] if len(args) > 3 and args[3] is not None else torch.zeros(8 * hidden, dtype=x.dtype)
    batch = x.shape[1]
    h = args[5][0] if len(args) > 5 and args[5] is not None else torch.zeros(batch, hidden, dtype=x.dtype)
    c = args[6][0] if len(args) > 6 and args[6] is not None else torch.zeros(batch, hidden, dtype=x.dtype)
    projected = torch.matmul(x, w.t()) + bias[:4 * hidden] + bias[4 * hidden:]
    steps = []
    for t in range(x.shape[0]):
        gates = projected[t] + torch.matmul(h, r.t())
        i, o, f, g = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        steps.append(h)
    return [torch.stack(steps).unsqueeze(1), h.unsqueeze(0), c.unsqueeze(0)]


def _run_node(node: onnx.NodeProto, args: list, opset: int) -> list:
    op, a = node.op_type, _attrs(node)
    x = args[0] if args else None
    if op == "LSTM":
        return _lstm(args, a)
    if op == "Pad":
        return [_pad(x, args, a)]
    if op == "Size":
        return [torch.tensor(int(x.numel()), dtype=torch.int64)]
    if op == "MatMul":
        return [torch.matmul(args[0], args[1])]
    if op == "MatMulNBits":
        # args[1] is the dequantized W[K, N] (a trained parameter or a constant), not the packed bytes
        out = torch.matmul(args[0], args[1])
        return [out + args[5] if len(args) > 5 and args[5] is not None else out]
    if op == "DynamicQuantizeMatMul":
        # args[1] is the dequantized weight; A goes through ORT's run-time uint8 quantization
        # (DynamicQuantizeLinear: range over [min(x, 0), max(x, 0)]), straight-through
        a = args[0]
        with torch.no_grad():
            low, high = torch.clamp(a.min(), max=0.0), torch.clamp(a.max(), min=0.0)
            scale = (high - low) / 255.0
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.clamp(torch.round(-low / scale), 0, 255)
        deq = (torch.clamp(torch.round(a / scale) + zero, 0, 255) - zero) * scale
        out = torch.matmul(a + (deq - a).detach(), args[1])
        return [out + args[4] if len(args) > 4 and args[4] is not None else out]
    if op == "Gemm":
        left = args[0].t() if a.get("transA", 0) else args[0]
        right = args[1].t() if a.get("transB", 0) else args[1]
        out = float(a.get("alpha", 1.0)) * (left @ right)
        if len(args) > 2 and args[2] is not None:
            out = out + float(a.get("beta", 1.0)) * args[2]
        return [out]
    if op == "Conv":
        return [_conv(x, args[1], args[2] if len(args) > 2 else None, a)]
    if op == "BatchNormalization":
        return [F.batch_norm(x, args[3], args[4], args[1], args[2], training=False, eps=float(a.get("epsilon", 1e-5)))]
    if op == "LayerNormalization":
        axis = int(a.get("axis", -1)) % x.dim()
        shape = list(x.shape[axis:])
        bias = args[2] if len(args) > 2 else None
        weight = args[1].expand(shape) if args[1].shape != tuple(shape) else args[1]
        if bias is not None and bias.shape != tuple(shape):
            bias = bias.expand(shape)
        return [F.layer_norm(x, shape, weight, bias, eps=float(a.get("epsilon", 1e-5)))]
    if op == "Relu":
        return [torch.relu(x)]
    if op == "LeakyRelu":
        return [F.leaky_relu(x, float(a.get("alpha", 0.01)))]
    if op == "Sigmoid":
        return [torch.sigmoid(x)]
    if op == "HardSigmoid":
        return [torch.clamp(float(a.get("alpha", 0.2)) * x + float(a.get("beta", 0.5)), 0, 1)]
    if op == "HardSwish":
        return [F.hardswish(x)]
    if op == "Tanh":
        return [torch.tanh(x)]
    if op == "Gelu":
        return [F.gelu(x, approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")]
    if op == "Erf":
        return [torch.erf(x)]
    if op in ("Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal"):
        return [{"Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
                 "Reciprocal": torch.reciprocal}[op](x)]
    if op in ("Add", "Sub", "Mul", "Div", "Pow"):
        left, right = args
        if op == "Div" and not left.is_floating_point() and not right.is_floating_point():
            return [torch.div(left, right, rounding_mode="trunc")]
        return [{"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow}[op](left, right)]
    if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or"):
        return [{"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
                 "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or}[op](args[0], args[1])]
    if op == "Range":     # (a transformers export builds its attention mask's positions with it)
        start, limit, delta = (arg.reshape(()) for arg in args[:3])
        return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]
    if op == "Not":
        return [torch.logical_not(x)]
    # the sparse storage's bitmask decoding (``sparse_form``), where the model runs it per call
    if op == "BitShift":
        shift = torch.bitwise_left_shift if a.get("direction") == b"LEFT" or a.get("direction") == "LEFT" \
            else torch.bitwise_right_shift
        return [shift(args[0], args[1].to(args[0].dtype))]
    if op == "CumSum":
        axis = int(_ints(args[1])[0])
        values = x.flip(axis) if a.get("reverse", 0) else x
        out = torch.cumsum(values, dim=axis).to(x.dtype)
        if a.get("exclusive", 0):
            out = out - values
        return [out.flip(axis) if a.get("reverse", 0) else out]
    if op == "Sign":
        return [torch.sign(x)]
    if op in ("Max", "Min"):
        out = args[0]
        for other in args[1:]:
            out = torch.maximum(out, other) if op == "Max" else torch.minimum(out, other)
        return [out]
    if op == "Where":
        return [torch.where(args[0], args[1], args[2])]
    if op == "Clip":
        lo = args[1] if len(args) > 1 and args[1] is not None else a.get("min")
        hi = args[2] if len(args) > 2 and args[2] is not None else a.get("max")
        if isinstance(lo, torch.Tensor):
            lo = lo.item()
        if isinstance(hi, torch.Tensor):
            hi = hi.item()
        return [torch.clamp(x, lo, hi)]
    if op in ("Identity", "Dropout"):
        return [x] + ([torch.ones_like(x, dtype=torch.bool)] if op == "Dropout" and len(node.output) > 1 else [])
    if op == "Constant":
        for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
            if key in a:
                value = a[key]
                array = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
                return [_to_torch(array)]
        raise ValueError("Constant without a supported value attribute")
    if op == "ConstantOfShape":
        value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        if value.dtype == np.bool_:
            # a bool fill traces to aten::full(bool), which TorchScript's alias analysis refuses
            # (all-MiniLM-L6-v2's mask); ones / zeros of bool trace to ops it knows
            make = torch.ones if bool(value.reshape(-1)[0]) else torch.zeros
            return [make(_ints(x), dtype=torch.bool)]
        return [torch.full(_ints(x), value.reshape(-1)[0].item(), dtype=_to_torch(value).dtype)]
    if op == "Cast":
        return [x.to(_DTYPES[int(a["to"])])]
    if op == "Shape":
        dims = list(x.shape)
        start, end = int(a.get("start", 0)), a.get("end")
        return [torch.tensor(dims[start:end if end is None else int(end)], dtype=torch.int64)]
    if op == "Reshape":
        shape = _ints(args[1])
        if not a.get("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Flatten":
        # axis is in [-rank, rank]: axis == rank gives [N, 1] (a transformers mask flattens so)
        axis = int(a.get("axis", 1))
        axis = axis + x.dim() if axis < 0 else axis
        return [x.reshape(int(np.prod(x.shape[:axis])), -1)]
    if op == "Transpose":
        perm = a.get("perm", list(reversed(range(x.dim()))))
        return [x.permute(*perm)]
    if op == "Squeeze":
        axes = _axes(args, a)
        if axes is None:
            return [x.squeeze()]
        for axis in sorted((ax % x.dim() for ax in axes), reverse=True):
            x = x.squeeze(axis)
        return [x]
    if op == "Unsqueeze":
        axes = _axes(args, a)
        rank = x.dim() + len(axes)
        for axis in sorted(ax % rank for ax in axes):
            x = x.unsqueeze(axis)
        return [x]
    if op == "Concat":
        axis = int(a["axis"])
        return [torch.cat(args, dim=axis)]
    if op == "Expand":
        return [x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(args[1]))))]
    if op == "Gather":
        axis = int(a.get("axis", 0)) % x.dim()
        indices = args[1].to(torch.int64)
        indices = torch.where(indices < 0, indices + x.shape[axis], indices)
        flat = torch.index_select(x, axis, indices.reshape(-1))
        return [flat.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1:]))]
    if op == "Split":
        axis = int(a.get("axis", 0)) % x.dim()
        sizes = _ints(args[1]) if len(args) > 1 and args[1] is not None else a.get("split")
        if sizes is None:
            count = int(a.get("num_outputs", len(node.output)))
            chunk = -(-x.shape[axis] // count)
            sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(count)]
        return list(torch.split(x, list(sizes), dim=axis))
    if op == "Slice":
        return [_slice(x, args)]
    if op in ("Softmax", "LogSoftmax"):
        return [_softmax(x, a, opset, op == "LogSoftmax")]
    if op == "ReduceMean":
        return [_reduce(x, args if opset >= 18 else [x], a, torch.mean)]
    if op == "ReduceSum":
        return [_reduce(x, args if opset >= 13 else [x], a, torch.sum)]
    if op == "ReduceMax":
        return [_reduce(x, args if opset >= 18 else [x], a, torch.amax)]
    if op == "ReduceL2":   # sqrt of the sum of squares (a sentence encoder's L2 normalization)
        return [torch.sqrt(_reduce(x * x, args if opset >= 18 else [x], a, torch.sum))]
    if op == "MaxPool":
        return [_pool(x, a, "max")] + ([None] if len(node.output) > 1 and node.output[1] else [])
    if op == "AveragePool":
        return [_pool(x, a, "avg")]
    if op == "GlobalAveragePool":
        return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]
    if op == "GlobalMaxPool":
        return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]
    if op == "QuantizeLinear":
        # activations stay float through the pair: q is held as a float tensor of integers
        zero_in = args[2] if len(args) > 2 else None
        scale, zero = _fake_quant_activation(x, args[1], zero_in, a)
        # the zero point's type is the output type; uint8 when absent
        signed = zero_in is not None and zero_in.dtype == torch.int8
        lo, hi = (-128, 127) if signed else (0, 255)
        q = torch.clamp(torch.round(x / scale) + zero, lo, hi)
        return [x / scale + zero + (q - (x / scale + zero)).detach()]
    if op == "DequantizeLinear":
        scale, zero = _fake_quant_activation(x, args[1], args[2] if len(args) > 2 else None, a)
        if int(a.get("block_size", 0) or 0):
            raise ValueError("blocked DequantizeLinear on a non-constant input is not supported")
        return [(x.to(torch.float32) - zero) * scale]
    raise ValueError(f"no torch translation for {op}")
