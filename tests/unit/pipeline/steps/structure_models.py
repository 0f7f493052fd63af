"""Small models built with onnx.helper for the structural steps' tests: an MLP, a CNN with
BatchNorm, Dropout, Identity and a residual Add, and a transformer attention block."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(seed: int = 0, hidden: int = 128) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    inits = [_init("w1", f(64, hidden)), _init("b1", rng.standard_normal(hidden).astype(np.float32) * 0.1),
             _init("w2", f(hidden, 64)), _init("b2", rng.standard_normal(64).astype(np.float32) * 0.1),
             _init("w3", f(10, 64)), _init("b3", np.zeros(10, np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Add", ["h1", "b1"], ["a1"], name="fc1_bias"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Add", ["h2", "b2"], ["a2"], name="fc2_bias"),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="head", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)


def cnn(seed: int = 0) -> onnx.ModelProto:
    """conv1-bn1-relu -> conv2-bn2-relu -> conv3-bn3 -> Add(residual from relu1) -> relu -> Dropout
    -> MaxPool -> conv4-relu -> Identity -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    conv = lambda o, i, k: (rng.standard_normal((o, i, k, k)) * np.sqrt(2.0 / (i * k * k))).astype(np.float32)  # noqa: E731
    inits, nodes = [], []

    def bn(tag: str, c: int, src: str, dst: str) -> None:
        inits.extend([_init(f"{tag}_scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
                      _init(f"{tag}_bias", rng.standard_normal(c).astype(np.float32) * 0.1),
                      _init(f"{tag}_mean", rng.standard_normal(c).astype(np.float32) * 0.1),
                      _init(f"{tag}_var", rng.uniform(0.5, 2.0, c).astype(np.float32))])
        nodes.append(helper.make_node("BatchNormalization", [src, f"{tag}_scale", f"{tag}_bias", f"{tag}_mean",
                                                             f"{tag}_var"], [dst], name=tag, epsilon=1e-5))

    inits += [_init("conv1_w", conv(16, 3, 3)), _init("conv2_w", conv(16, 16, 3)), _init("conv3_w", conv(16, 16, 3)),
              _init("conv4_w", conv(32, 16, 3)), _init("conv4_b", rng.standard_normal(32).astype(np.float32) * 0.1),
              _init("fc_w", (rng.standard_normal((10, 32)) / np.sqrt(32)).astype(np.float32)),
              _init("fc_b", np.zeros(10, np.float32))]
    nodes.append(helper.make_node("Conv", ["x", "conv1_w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]))
    bn("bn1", 16, "c1", "n1")
    nodes.append(helper.make_node("Relu", ["n1"], ["r1"], name="relu1"))
    nodes.append(helper.make_node("Conv", ["r1", "conv2_w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    bn("bn2", 16, "c2", "n2")
    nodes.append(helper.make_node("Relu", ["n2"], ["r2"], name="relu2"))
    nodes.append(helper.make_node("Conv", ["r2", "conv3_w"], ["c3"], name="conv3", pads=[1, 1, 1, 1]))
    bn("bn3", 16, "c3", "n3")
    nodes += [helper.make_node("Add", ["n3", "r1"], ["s"], name="residual"),
              helper.make_node("Relu", ["s"], ["r3"], name="relu3"),
              helper.make_node("Dropout", ["r3"], ["d"], name="dropout"),
              helper.make_node("MaxPool", ["d"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Conv", ["p", "conv4_w", "conv4_b"], ["c4"], name="conv4", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c4"], ["r4"], name="relu4"),
              helper.make_node("Identity", ["r4"], ["i4"], name="identity"),
              helper.make_node("GlobalAveragePool", ["i4"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)


def attention(seed: int = 0, d: int = 32, heads: int = 4, ffn: int = 128) -> onnx.ModelProto:
    """Pre-norm encoder block: x + Wo·softmax(QK^T/sqrt(dh))V, then + FFN(gelu)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    dh = d // heads
    inits = [_init("ln1_g", np.ones(d, np.float32)), _init("ln1_b", np.zeros(d, np.float32)),
             _init("ln2_g", np.ones(d, np.float32)), _init("ln2_b", np.zeros(d, np.float32)),
             _init("wq", f(d, d)), _init("wk", f(d, d)), _init("wv", f(d, d)), _init("wo", f(d, d)),
             _init("w_up", f(d, ffn)), _init("b_up", rng.standard_normal(ffn).astype(np.float32) * 0.1),
             _init("w_down", f(ffn, d)), _init("b_down", np.zeros(d, np.float32)),
             _init("heads_shape", np.array([0, 0, heads, dh], np.int64)),
             _init("merge_shape", np.array([0, 0, d], np.int64)),
             _init("inv_sqrt_dh", np.array(1.0 / np.sqrt(dh), np.float32)),
             _init("half", np.array(0.5, np.float32)), _init("one", np.array(1.0, np.float32)),
             _init("sqrt2", np.array(np.sqrt(2.0), np.float32))]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln1_g", "ln1_b"], ["n1"], name="ln1", axis=-1)]
    for tag in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["n1", f"w{tag}"], [f"{tag}"], name=f"proj_{tag}"),
                  helper.make_node("Reshape", [f"{tag}", "heads_shape"], [f"{tag}_h"], name=f"split_{tag}"),
                  helper.make_node("Transpose", [f"{tag}_h"], [f"{tag}_t"], name=f"perm_{tag}",
                                   perm=[0, 2, 3, 1] if tag == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["q_t", "k_t"], ["scores"], name="qk"),
              helper.make_node("Mul", ["scores", "inv_sqrt_dh"], ["scaled"], name="scale"),
              helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v_t"], ["ctx"], name="attend"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="unperm", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge"),
              helper.make_node("MatMul", ["merged", "wo"], ["attn"], name="proj_o"),
              helper.make_node("Add", ["x", "attn"], ["x1"], name="residual1"),
              helper.make_node("LayerNormalization", ["x1", "ln2_g", "ln2_b"], ["n2"], name="ln2", axis=-1),
              helper.make_node("MatMul", ["n2", "w_up"], ["up"], name="ffn_up"),
              helper.make_node("Add", ["up", "b_up"], ["up_b"], name="ffn_up_bias"),
              helper.make_node("Div", ["up_b", "sqrt2"], ["gx"], name="gelu_div"),
              helper.make_node("Erf", ["gx"], ["ge"], name="gelu_erf"),
              helper.make_node("Add", ["ge", "one"], ["g1"], name="gelu_add"),
              helper.make_node("Mul", ["up_b", "g1"], ["g2"], name="gelu_mul"),
              helper.make_node("Mul", ["g2", "half"], ["act"], name="gelu_half"),
              helper.make_node("MatMul", ["act", "w_down"], ["down"], name="ffn_down"),
              helper.make_node("Add", ["down", "b_down"], ["down_b"], name="ffn_down_bias"),
              helper.make_node("Add", ["x1", "down_b"], ["y"], name="residual2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])], inits)


def inputs_for(model: onnx.ModelProto, count: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = [d.dim_value or (count if i == 0 else 6) for i, d in enumerate(model.graph.input[0].type.tensor_type.shape.dim)]
    return {model.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)}


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_valid_same_io(model: onnx.ModelProto, original: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The contract every step's output meets: checker (full), ORT CPU, the original's I/O."""
    onnx.checker.check_model(model, full_check=True)
    assert [(i.name, i.type) for i in model.graph.input if i.name in feeds] == \
           [(i.name, i.type) for i in original.graph.input if i.name in feeds]
    assert [(o.name, o.type) for o in model.graph.output] == [(o.name, o.type) for o in original.graph.output]
    got = run_model(model, feeds)
    want = run_model(original, feeds)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
    return got


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def mlp_fp16(seed: int = 0) -> onnx.ModelProto:
    """A float16 MLP (float16 inputs, weights and outputs): steps must keep the weights' dtype."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", (rng.standard_normal((64, 96)) / 8).astype(np.float16)),
             _init("b1", rng.standard_normal(96).astype(np.float16)),
             _init("w2", (rng.standard_normal((96, 32)) / 10).astype(np.float16))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["a"], name="fc1_bias"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 32])], inits)
