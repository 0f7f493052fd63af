"""The models the deploy-format bars are measured on, built here with onnx.helper: a CNN classifier
trained here on scikit-learn's digits (``digits_cnn``), an untrained CNN and a transformer encoder
block, big enough that weights dominate every file format."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.unit.pipeline.builders import _model, _w


def cnn(seed: int = 0) -> onnx.ModelProto:
    """x[batch, 3, 16, 16] -> 4 x (Conv 3x3 + Relu), the second strided -> GlobalAveragePool
    -> Flatten -> Gemm -> logits[batch, 10]; ~250k weights."""
    rng = np.random.default_rng(seed)
    shapes = {"c1": (32, 3, 3, 3), "c2": (64, 32, 3, 3), "c3": (128, 64, 3, 3), "c4": (128, 128, 3, 3)}
    inits = [numpy_helper.from_array(_w(rng, *shape), f"{name}.W") for name, shape in shapes.items()]
    inits += [numpy_helper.from_array(_w(rng, shape[0], scale=0.05), f"{name}.b") for name, shape in shapes.items()]
    inits += [numpy_helper.from_array(_w(rng, 10, 128), "fc.W"), numpy_helper.from_array(_w(rng, 10, scale=0.05), "fc.b")]
    nodes, last = [], "x"
    for name, stride in (("c1", 1), ("c2", 2), ("c3", 1), ("c4", 1)):
        nodes += [helper.make_node("Conv", [last, f"{name}.W", f"{name}.b"], [f"{name}.y"], name=name,
                                   pads=[1, 1, 1, 1], strides=[stride, stride]),
                  helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu")]
        last = f"{name}.r"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.W", "fc.b"], ["logits"], name="fc", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)


def encoder(d: int = 192, seq: int = 16, seed: int = 0) -> onnx.ModelProto:
    """One post-norm transformer encoder layer: x[batch, seq, d] -> self-attention (one head) ->
    residual -> LayerNorm -> MatMul d x 4d -> Relu -> MatMul 4d x d -> residual -> LayerNorm
    -> y[batch, seq, d] (embeddings); ~440k weights."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, d, d), f"{n}.W") for n in ("q", "k", "v", "o")]
    inits += [numpy_helper.from_array(_w(rng, d, 4 * d), "ff1.W"), numpy_helper.from_array(_w(rng, 4 * d, d), "ff2.W"),
              numpy_helper.from_array(_w(rng, 4 * d, scale=0.05), "ff1.b"),
              numpy_helper.from_array(_w(rng, d, scale=0.05), "ff2.b"),
              numpy_helper.from_array(np.array(1.0 / np.sqrt(d), np.float32), "inv_sqrt_d")]
    for ln in ("ln1", "ln2"):
        inits += [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), f"{ln}.scale"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), f"{ln}.bias")]
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "q.W"], ["q"], name="q_proj"),
        node("MatMul", ["x", "k.W"], ["k"], name="k_proj"),
        node("MatMul", ["x", "v.W"], ["v"], name="v_proj"),
        node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["s0"], name="scores"),
        node("Mul", ["s0", "inv_sqrt_d"], ["s1"], name="scale"),
        node("Softmax", ["s1"], ["a"], name="softmax", axis=-1),
        node("MatMul", ["a", "v"], ["ctx"], name="context"),
        node("MatMul", ["ctx", "o.W"], ["o"], name="o_proj"),
        node("Add", ["o", "x"], ["res1"], name="residual1"),
        node("LayerNormalization", ["res1", "ln1.scale", "ln1.bias"], ["h"], name="ln1", axis=-1),
        node("MatMul", ["h", "ff1.W"], ["f0"], name="ff1"),
        node("Add", ["f0", "ff1.b"], ["f1"], name="ff1_bias"),
        node("Relu", ["f1"], ["f2"], name="ff_relu"),
        node("MatMul", ["f2", "ff2.W"], ["f3"], name="ff2"),
        node("Add", ["f3", "ff2.b"], ["f4"], name="ff2_bias"),
        node("Add", ["f4", "h"], ["res2"], name="residual2"),
        node("LayerNormalization", ["res2", "ln2.scale", "ln2.bias"], ["y"], name="ln2", axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, d])], inits)


def samples(model: onnx.ModelProto, count: int, seed: int) -> dict[str, np.ndarray]:
    """N(0, 1) inputs of the model's shape, ``count`` concatenated along the batch axis."""
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    dims = [count] + [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
    return {value.name: rng.standard_normal(dims).astype(np.float32)}


def digits_cnn(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A CNN classifier trained here (torch, CPU, a few seconds) on scikit-learn's 8x8 digits:
    x[batch, 1, 8, 8] (pixels / 16) -> Conv 3x3 16 + Relu -> Conv 3x3 32 stride 2 + Relu -> Flatten
    -> Gemm 512 + Relu -> Gemm 10 -> logits; ~270k weights, most in the Gemms (cheap to train).
    Returns the ONNX model, 256 training images (calibration) and the 497 held-out images with
    ``_labels`` (evaluation). A trained classifier's logits have margins, so top-1 agreement
    measures the conversion, not ties between random logits."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    digits = load_digits()
    images = (digits.images[:, None] / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    train, held_out = order[:1300], order[1300:]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # small batches: one thread is as fast, and spins no idle ones on a busy machine
    try:
        for _ in range(12):
            for batch in torch.randperm(len(train), generator=generator).split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    state = {name: value.detach().numpy().astype(np.float32) for name, value in net.state_dict().items()}
    names = {"0": "c1", "2": "c2", "5": "fc1", "7": "fc2"}
    inits = [numpy_helper.from_array(state[f"{index}.{part}"], f"{name}.{'W' if part == 'weight' else 'b'}")
             for index, name in names.items() for part in ("weight", "bias")]
    node = helper.make_node
    nodes = [node("Conv", ["x", "c1.W", "c1.b"], ["c1.y"], name="c1", pads=[1, 1, 1, 1]),
             node("Relu", ["c1.y"], ["c1.r"], name="c1.relu"),
             node("Conv", ["c1.r", "c2.W", "c2.b"], ["c2.y"], name="c2", pads=[1, 1, 1, 1], strides=[2, 2]),
             node("Relu", ["c2.y"], ["c2.r"], name="c2.relu"),
             node("Flatten", ["c2.r"], ["f"], name="flatten"),
             node("Gemm", ["f", "fc1.W", "fc1.b"], ["h"], name="fc1", transB=1),
             node("Relu", ["h"], ["h.r"], name="fc1.relu"),
             node("Gemm", ["h.r", "fc2.W", "fc2.b"], ["logits"], name="fc2", transB=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    calibration = {"x": images[train[:256]]}
    evaluation = {"x": images[held_out], "_labels": labels[held_out]}
    return model, calibration, evaluation
