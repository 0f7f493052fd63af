"""Small ONNX models built with onnx.helper for the pipeline tests (the pipeline is pure: tests build their models).

Each builder returns a ModelProto with fixed-seed weights, a dynamic batch axis named "batch"
unless said otherwise, and every node named.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _w(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * (scale if scale is not None else 1.0 / np.sqrt(fan_in))).astype(np.float32)


def pointwise_conv(rng: np.random.Generator, inputs: int, outputs: int, size: int) -> onnx.ModelProto:
    """x[batch, inputs, size, size] -> 1x1 Conv "c" (weight "c.W", a zero bias "c.b")
    -> y[batch, outputs, size, size]."""
    inits = [numpy_helper.from_array(_w(rng, outputs, inputs, 1, 1), "c.W"),
             numpy_helper.from_array(np.zeros(outputs, np.float32), "c.b")]
    return _model([helper.make_node("Conv", ["x", "c.W", "c.b"], ["y"], name="c")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs, size, size])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs, size, size])], inits)


def mlp(inputs: int = 128, hidden: int = 256, classes: int = 16, seed: int = 0, batch="batch",
        constants: bool = False, opset: int = OPSET) -> onnx.ModelProto:
    """x[batch, inputs] -> MatMul W1 + b1 -> Relu -> MatMul W2 + b2 -> logits[batch, classes].
    ``constants``: the weights sit in Constant nodes (as converters write them)."""
    rng = np.random.default_rng(seed)
    arrays = {"W1": _w(rng, inputs, hidden), "b1": _w(rng, hidden, scale=0.1),
              "W2": _w(rng, hidden, classes), "b2": _w(rng, classes, scale=0.1)}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["logits"], name="fc2_bias"),
    ]
    if constants:
        consts = [helper.make_node("Constant", [], [name], name=f"const_{name}",
                                   value=numpy_helper.from_array(value, name)) for name, value in arrays.items()]
        nodes, inits = consts + nodes, []
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, inputs])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], inits, opset)


def cnn_bn(seed: int = 0) -> onnx.ModelProto:
    """x[batch, 1, 8, 8] -> Conv 3x3 (8) -> BN -> Relu -> Conv 3x3 (32) -> BN -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm(transB) -> logits[batch, 10]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_w(rng, 8, 1, 3, 3), "conv1.W"),
        numpy_helper.from_array(_w(rng, 32, 8, 3, 3), "conv2.W"),
        numpy_helper.from_array(_w(rng, 10, 32), "fc.W"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"),
    ]
    for name, channels in (("bn1", 8), ("bn2", 32)):
        inits += [
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(channels)).astype(np.float32), f"{name}.scale"),
            numpy_helper.from_array((0.1 * rng.standard_normal(channels)).astype(np.float32), f"{name}.bias"),
            numpy_helper.from_array((0.1 * rng.standard_normal(channels)).astype(np.float32), f"{name}.mean"),
            numpy_helper.from_array((1 + 0.1 * rng.random(channels)).astype(np.float32), f"{name}.var"),
        ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.W"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.W"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn2.scale", "bn2.bias", "bn2.mean", "bn2.var"], ["n2"], name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.W", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)


def attention(d: int = 64, seq: int = 8, seed: int = 0) -> onnx.ModelProto:
    """One self-attention block: x[batch, seq, d] -> Q, K, V projections -> softmax(QK^T/sqrt(d)) V
    -> output projection -> residual -> LayerNormalization -> y[batch, seq, d]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, d, d), f"{n}.W") for n in ("q", "k", "v", "o")]
    inits += [numpy_helper.from_array(np.array(1.0 / np.sqrt(d), np.float32), "inv_sqrt_d"),
              numpy_helper.from_array(np.ones(d, np.float32), "ln.scale"),
              numpy_helper.from_array(np.zeros(d, np.float32), "ln.bias")]
    nodes = [
        helper.make_node("MatMul", ["x", "q.W"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "k.W"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "v.W"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
        helper.make_node("Mul", ["s0", "inv_sqrt_d"], ["s1"], name="scale"),
        helper.make_node("Softmax", ["s1"], ["a"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["a", "v"], ["ctx"], name="context"),
        helper.make_node("MatMul", ["ctx", "o.W"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "x"], ["res"], name="residual"),
        helper.make_node("LayerNormalization", ["res", "ln.scale", "ln.bias"], ["y"], name="ln", axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, d])], inits)


def embedding_gru(vocab: int = 256, dim: int = 32, hidden: int = 32, classes: int = 4, seq: int = 6,
                  seed: int = 0, cell: str = "GRU") -> onnx.ModelProto:
    """ids[batch, seq] int64 -> Gather(table[vocab, dim]) -> [seq, batch, dim] -> GRU (or LSTM)
    -> last hidden [batch, hidden] -> MLP head -> logits[batch, classes]. The cell's weights are
    named gru.W / gru.R / gru.B either way."""
    rng = np.random.default_rng(seed)
    gates = {"GRU": 3, "LSTM": 4}[cell]
    inits = [
        numpy_helper.from_array(_w(rng, vocab, dim, scale=1.0), "embedding"),
        numpy_helper.from_array(_w(rng, 1, gates * hidden, dim, scale=0.3), "gru.W"),
        numpy_helper.from_array(_w(rng, 1, gates * hidden, hidden, scale=0.3), "gru.R"),
        numpy_helper.from_array(_w(rng, 1, 2 * gates * hidden, scale=0.1), "gru.B"),
        numpy_helper.from_array(_w(rng, hidden, 4 * classes * 8), "head.W1"),
        numpy_helper.from_array(_w(rng, 4 * classes * 8, classes), "head.W2"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["e"], name="embed", axis=0),
        helper.make_node("Transpose", ["e"], ["et"], name="to_time_major", perm=[1, 0, 2]),
        helper.make_node(cell, ["et", "gru.W", "gru.R", "gru.B"], ["", "h"], name="gru", hidden_size=hidden),
        helper.make_node("Squeeze", ["h", "axes0"], ["hs"], name="squeeze"),
        helper.make_node("MatMul", ["hs", "head.W1"], ["z0"], name="head1"),
        helper.make_node("Relu", ["z0"], ["z1"], name="head_relu"),
        helper.make_node("MatMul", ["z1", "head.W2"], ["logits"], name="head2"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", seq])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)


def shared_weight(d: int = 64, seed: int = 0) -> onnx.ModelProto:
    """One weight W[d, d] read by two MatMuls: y = relu(x W) W."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h0"], name="first"),
        helper.make_node("Relu", ["h0"], ["h1"], name="relu"),
        helper.make_node("MatMul", ["h1", "W"], ["y"], name="second"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])],
                  [numpy_helper.from_array(_w(rng, d, d), "W")])


def float16_mlp() -> onnx.ModelProto:
    """mlp with its weights, inputs and outputs in float16 (opset 17), as a model
    converted to half precision before upload comes."""
    model = mlp()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return model


def save_external(model: onnx.ModelProto, path) -> None:
    """Save with every tensor in ``<name>.data`` beside the model."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def random_inputs(model: onnx.ModelProto, count: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    """Concatenated samples for every input (floats N(0, 1), ids in 0..9)."""
    from worker.pipeline.data import generated

    return dict(generated(model, count=count, seed=seed).arrays)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_l2(a, b) -> float:
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in a])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in b])
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def io_of(model: onnx.ModelProto):
    """(inputs, outputs) as (name, element type, dims) lists, initializers listed as inputs left out."""
    def describe(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
    inits = {t.name for t in model.graph.initializer}
    return describe([v for v in model.graph.input if v.name not in inits]), describe(model.graph.output)


def lstm_in_if(d: int = 32, hidden: int = 64, seq: int = 5) -> onnx.ModelProto:
    """A streaming VAD's shape: h = x W (main graph); If(cond) then: LSTM over h with its own W and R
    ([1, 4H, d], [1, 4H, H]) and bias, else: zeros. The recurrent weights are the model's largest."""
    rng = np.random.default_rng(3)
    lstm = helper.make_node("LSTM", ["h", "lstm_W", "lstm_R", "lstm_B"], ["seq_out", "y_h"], hidden_size=hidden,
                            name="cell")
    squeeze = helper.make_node("Squeeze", ["y_h", "axes0"], ["t"], name="drop_direction")
    then_branch = helper.make_graph(
        [lstm, squeeze], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", hidden])],
        [numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, d)) / 6).astype(np.float32), "lstm_W"),
         numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, hidden)) / 8).astype(np.float32), "lstm_R"),
         numpy_helper.from_array((rng.standard_normal((1, 8 * hidden)) / 10).astype(np.float32), "lstm_B"),
         numpy_helper.from_array(np.array([0], np.int64), "axes0")])
    else_branch = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["e"], name="zeros")], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", hidden])],
        [numpy_helper.from_array(np.array([1, hidden], np.int64), "shape")])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="outer"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, 1, d])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])],
                               [numpy_helper.from_array((rng.standard_normal((d, d)) / 4).astype(np.float32), "W"),
                                numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def bag_in_loop(rows: int = 200, width: int = 64, per_bag: int = 4, classes: int = 16) -> onnx.ModelProto:
    """PyTorch's EmbeddingBag(mode="mean") as it exports: a Loop over the bags whose body gathers
    the bag's rows from the main graph's ``table`` and averages them; then logits = bags W."""
    rng = np.random.default_rng(5)
    body = helper.make_graph(
        [helper.make_node("Gather", ["ids", "i"], ["bag_ids"], axis=0, name="bag_ids"),
         helper.make_node("Gather", ["table", "bag_ids"], ["bag_rows"], axis=0, name="bag_rows"),
         helper.make_node("ReduceMean", ["bag_rows"], ["bag_mean"], axes=[0], keepdims=0, name="bag_mean"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")],
        "bag_body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("bag_mean", TensorProto.FLOAT, [width])])
    nodes = [helper.make_node("Shape", ["ids"], ["ids_shape"], name="ids_shape"),
             helper.make_node("Gather", ["ids_shape", "zero"], ["bags"], axis=0, name="bag_count"),
             helper.make_node("Loop", ["bags", "go"], ["means"], body=body, name="bag_loop"),
             helper.make_node("MatMul", ["means", "W"], ["logits"], name="classify")]
    graph_ = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["bags", per_bag])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["bags", classes])],
        [numpy_helper.from_array(rng.standard_normal((rows, width)).astype(np.float32), "table"),
         numpy_helper.from_array((rng.standard_normal((width, classes)) / 8).astype(np.float32), "W"),
         numpy_helper.from_array(np.array(0, np.int64), "zero"),
         numpy_helper.from_array(np.array(True), "go")])
    return helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
