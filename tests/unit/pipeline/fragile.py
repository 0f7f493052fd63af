"""A small MLP with one fragile layer, for the sensitivity, error-bound and goal-search tests.

x[batch, 64] -> (MatMul W_i + b_i -> Relu) x depth -> MatMul W_out -> y[batch, 8]. Layer
``fragile`` (>= 1) has its input row 3 ``outlier`` x its largest weight, and the layer before never
lets feature 3 through (its column 3 is zero and its bias -1, so the ReLU gives 0): in float the row
does nothing, but it sets every per-tensor, per-channel and per-block scale of the layer, so
quantizing that layer alone rounds the rest of it away and costs far more than any other layer.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def fragile_mlp(depth: int = 4, width: int = 64, fragile: int = 1, seed: int = 0,
                outlier: float = 200.0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = (rng.standard_normal(width) * 0.1).astype(np.float32)
        if i == fragile:
            w[3, :] = outlier * float(np.abs(w).max())
        if i == fragile - 1:
            w[:, 3], b[3] = 0.0, -1.0
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"fc{i}_bias"),
                  helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}")]
        x = f"h{i}"
    inits.append(numpy_helper.from_array((rng.standard_normal((width, 8)) / np.sqrt(width)).astype(np.float32), "Wout"))
    nodes.append(helper.make_node("MatMul", [x, "Wout"], ["y"], name="fc_out"))
    g = helper.make_graph(nodes, "fragile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def inputs(count: int = 64, width: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)}
