"""The attention layout rewrite (quantize.attention_layout) and the shared run-time quantization
(quantize.shared_quantization): each fires on its exact pattern only, the result passes the checker,
keeps the original I/O, and computes what the original computes (bit for bit where the arithmetic
is the same; within float rounding where ONNX Runtime's own MatMulScaleFusion would differ too)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.recipe import QuantizeStep
from tests.unit.pipeline import builders
from worker.pipeline.quantize.dynamic import quantize_dynamic
from worker.pipeline.quantize.attention_layout import fuse_attention_heads
from worker.pipeline.quantize.shared_quantization import share_input_quantization
from worker.pipeline.step import StepContext
from tests.conftest import require_torch

FLOAT_MIN = float(np.finfo(np.float32).min)


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_node", value=numpy_helper.from_array(np.asarray(value), name))


def packed_attention(d: int = 32, heads: int = 4, seq: int = 6, seed: int = 0, perm=(2, 0, 3, 1, 4),
                     scale_op: str = "Mul", softmax_axis: int = -1, packed_read_elsewhere: bool = False,
                     scale_from_input: bool = False, leading=(0, 1)) -> onnx.ModelProto:
    """The torch TorchScript export of ``qkv(x).reshape(B, S, 3, N, H).permute(2, 0, 3, 1, 4)``,
    ``softmax(q @ k^T * c + mask) @ v``, back to [B, S, D], then an output projection; the knobs
    break the pattern one way each (a different permutation, a Div scale, another softmax axis, the
    packed projection read a second time, a scale that is a graph input, leading dims regrouped)."""
    rng = np.random.default_rng(seed)
    head = d // heads
    inits = [numpy_helper.from_array((rng.standard_normal((d, 3 * d)) / np.sqrt(d)).astype(np.float32), "W_qkv"),
             numpy_helper.from_array((rng.standard_normal(3 * d) * 0.1).astype(np.float32), "b_qkv"),
             numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), "W_o")]
    nodes = [
        helper.make_node("MatMul", ["x", "W_qkv"], ["qkv_mm"], name="qkv/MatMul"),
        helper.make_node("Add", ["b_qkv", "qkv_mm"], ["qkv"], name="qkv/Add"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        _const("i0", np.array(leading[0], np.int64)), _const("i1", np.array(leading[1], np.int64)),
        _const("ax0", np.array([0], np.int64)),
        helper.make_node("Gather", ["shape", "i0"], ["batch"], name="batch", axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["length"], name="length", axis=0),
        helper.make_node("Unsqueeze", ["batch", "ax0"], ["batch1"], name="batch1"),
        helper.make_node("Unsqueeze", ["length", "ax0"], ["length1"], name="length1"),
        _const("three", np.array([3], np.int64)), _const("nheads", np.array([heads], np.int64)),
        _const("hsize", np.array([head], np.int64)),
        helper.make_node("Concat", ["batch1", "length1", "three", "nheads", "hsize"], ["heads_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["qkv", "heads_shape"], ["qkv5"], name="reshape"),
        helper.make_node("Transpose", ["qkv5"], ["qkv_t"], name="transpose", perm=list(perm)),
        _const("ones3", np.array([1, 1, 1], np.int64)),
        helper.make_node("Split", ["qkv_t", "ones3"], ["s0", "s1", "s2"], name="split", axis=0),
        helper.make_node("Squeeze", ["s0", "ax0"], ["q"], name="sq_q"),
        helper.make_node("Squeeze", ["s1", "ax0"], ["k"], name="sq_k"),
        helper.make_node("Squeeze", ["s2", "ax0"], ["v"], name="sq_v"),
        helper.make_node("Transpose", ["k"], ["k_t"], name="k_t", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "k_t"], ["qk"], name="qk"),
    ]
    scale_value = np.float32(head ** -0.5) if scale_op == "Mul" else np.float32(head ** 0.5)
    if scale_from_input:
        scale_name = "c"
    else:
        nodes.append(_const("c", scale_value))
        scale_name = "c"
    nodes += [
        helper.make_node(scale_op, ["qk", scale_name], ["scaled"], name="scale"),
        _const("ax1", np.array([1], np.int64)), _const("ax2", np.array([2], np.int64)),
        helper.make_node("Unsqueeze", ["mask", "ax1"], ["mask1"], name="mask1"),
        helper.make_node("Unsqueeze", ["mask1", "ax2"], ["mask2"], name="mask2"),
        helper.make_node("Add", ["scaled", "mask2"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=softmax_axis),
        helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
        helper.make_node("Transpose", ["context"], ["context_t"], name="context_t", perm=[0, 2, 1, 3]),
        _const("flat", np.array([0, 0, d], np.int64)),
        helper.make_node("Reshape", ["context_t", "flat"], ["merged"], name="merge"),
        helper.make_node("MatMul", ["merged", "W_o"], ["y"], name="out/MatMul"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, d])]
    if packed_read_elsewhere:      # the packed projection read by something else too
        outputs.append(helper.make_tensor_value_info("qkv_sum", TensorProto.FLOAT, ["batch", seq]))
        nodes.append(helper.make_node("ReduceSum", ["qkv", "ax2"], ["qkv_sum"], name="qkv_sum", keepdims=0))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, d]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", seq])]
    if scale_from_input:
        inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, []))
    return builders._model(nodes, inputs, outputs, inits)


def _feeds(model: onnx.ModelProto, count: int = 5, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    d = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    mask = np.zeros((count, seq), np.float32)
    for row in range(count):                         # padded tails, as exported models feed them
        mask[row, rng.integers(1, seq + 1):] = FLOAT_MIN
    feeds = {"x": rng.standard_normal((count, seq, d)).astype(np.float32), "mask": mask}
    if any(i.name == "c" for i in model.graph.input):
        feeds["c"] = np.array(0.25, np.float32)
    return feeds


def _io(model: onnx.ModelProto):
    def describe(values):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values]
    inits = {t.name for t in model.graph.initializer}
    return describe([v for v in model.graph.input if v.name not in inits]), describe(model.graph.output)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_packed_attention_is_relaid_and_computes_the_same_values():
    model = packed_attention()
    fused = _copy(model)
    split = fuse_attention_heads(fused)
    onnx.checker.check_model(fused, full_check=True)
    assert split == {"W_qkv": ["W_qkv_q", "W_qkv_k", "W_qkv_v"]}
    ops = _ops(fused)
    assert "Split" not in ops and "Squeeze" not in ops and "Softmax" in ops
    assert ops.count("FusedMatMul") == 2 and ops.count("MatMul") == 4          # q, k, v, out projections
    scores = next(n for n in fused.graph.node if n.op_type == "FusedMatMul" and n.output[0] == "scaled")
    attrs = {a.name: helper.get_attribute_value(a) for a in scores.attribute}
    assert (attrs["transB"], attrs["transBatchA"], attrs["transBatchB"]) == (1, 1, 1)
    assert attrs["alpha"] == pytest.approx(float(np.float32(8 ** -0.5)), rel=1e-7)
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in fused.graph.initializer if t.name == "W_qkv_k")),
                                  numpy_helper.to_array(model.graph.initializer[0])[:, 32:64])
    assert _io(fused) == _io(model)
    for count in (1, 5):
        feeds = _feeds(model, count)
        expected, got = builders.run_ort(model, feeds)[0], builders.run_ort(fused, feeds)[0]
        # The same products in the same order: equal to float rounding of the scale placement.
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_div_scale_becomes_reciprocal_alpha():
    model = packed_attention(scale_op="Div")
    fused = _copy(model)
    assert fuse_attention_heads(fused)
    scores = next(n for n in fused.graph.node if n.op_type == "FusedMatMul" and n.output[0] == "scaled")
    alpha = next(helper.get_attribute_value(a) for a in scores.attribute if a.name == "alpha")
    assert alpha == pytest.approx(float(np.float32(1) / np.float32(8 ** 0.5)), rel=1e-7)
    feeds = _feeds(model)
    np.testing.assert_allclose(builders.run_ort(fused, feeds)[0], builders.run_ort(model, feeds)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("knobs", [{"perm": (2, 0, 1, 3, 4)}, {"softmax_axis": 2}, {"packed_read_elsewhere": True},
                                   {"scale_from_input": True}, {"leading": (1, 0)}],
                         ids=["other-permutation", "other-softmax-axis", "projection-read-elsewhere", "runtime-scale",
                              "leading-dims-swapped"])
def test_near_misses_are_left_alone(knobs):
    model = packed_attention(**knobs)
    untouched = _copy(model)
    assert fuse_attention_heads(untouched) == {}
    assert untouched == model


def test_only_selected_weights_are_split():
    model = packed_attention()
    untouched = _copy(model)
    assert fuse_attention_heads(untouched, weights={"W_o"}) == {}
    assert untouched == model


def _params(**overrides) -> QuantizeStep:
    fields = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}, "min_params": 0}
    fields.update(overrides)
    return QuantizeStep(**fields)


def _dynamic(model, relayout: bool = True, **overrides):
    ctx = StepContext(original=model, options={"dynamic_layout_rewrites": relayout})
    result = quantize_dynamic(model, _params(**overrides), ctx)
    onnx.checker.check_model(result.model, full_check=True)
    return result, ctx


def test_dynamic_step_relays_attention_and_matches_the_plain_dynamic_model():
    model = packed_attention(d=64, heads=4, seq=8)
    result, ctx = _dynamic(model)
    ops = _ops(result.model)
    assert result.metrics["attention_blocks_relaid"] == 1 and result.metrics["shared_input_quantizations"] == 1
    assert ops.count("MatMulIntegerToFloat") == 3 and ops.count("DynamicQuantizeLinear") == 1
    assert ops.count("DynamicQuantizeMatMul") == 1 and "Split" not in ops               # the out projection
    quantize = next(n for n in result.model.graph.node if n.op_type == "DynamicQuantizeLinear")
    assert quantize.input[0] == "x"                     # quantized before the transpose: uint8 moves
    assert {ctx.layers[name].extra["split_from"] for name in ("W_qkv_q", "W_qkv_k", "W_qkv_v")} == {"W_qkv"}
    assert _io(result.model) == _io(model)
    plain, _ = _dynamic(model, relayout=False)
    assert "Split" in _ops(plain.model) and plain.metrics["attention_blocks_relaid"] == 0
    for count in (1, 7):
        feeds = _feeds(model, count)
        relaid, reference = builders.run_ort(result.model, feeds)[0], builders.run_ort(plain.model, feeds)[0]
        # Same per-tensor uint8 activations, same int8 weights, exact integer sums: only the float
        # scale placement (alpha) may round differently.
        np.testing.assert_allclose(relaid, reference, rtol=1e-5, atol=1e-5)
        assert builders.rel_l2(builders.run_ort(model, feeds), [relaid]) < 0.03


def test_per_tensor_weights_keep_the_packed_tensors_one_scale():
    model = packed_attention(d=64, heads=4, seq=8)
    per_tensor = {"bits": 8, "granularity": "tensor"}
    result, _ = _dynamic(model, weights=per_tensor)
    names = {n.input[3] for n in result.model.graph.node if n.op_type == "MatMulIntegerToFloat"}
    scales = {float(numpy_helper.to_array(t)) for t in result.model.graph.initializer if t.name in names}
    packed = numpy_helper.to_array(model.graph.initializer[0])
    assert scales == {float(np.float32(np.abs(packed).max()) / np.float32(127))}
    plain, _ = _dynamic(model, relayout=False, weights=per_tensor)
    feeds = _feeds(model)
    np.testing.assert_allclose(builders.run_ort(result.model, feeds)[0], builders.run_ort(plain.model, feeds)[0],
                               rtol=1e-5, atol=1e-5)


def _two_readers(transposed: bool, transpose_read_elsewhere: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    w2 = rng.integers(-127, 128, (16, 12)).astype(np.int8)
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(np.full(8, 0.01, np.float32), "s1"),
             numpy_helper.from_array(np.float32(0.02), "s2"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1")]
    source, rows = "x", [3, 5]
    nodes = []
    if transposed:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[1, 0, 2]))
        source, rows = "xt", [5, 3]
    outputs = [helper.make_tensor_value_info("y1", TensorProto.FLOAT, rows + [8]),
               helper.make_tensor_value_info("y2", TensorProto.FLOAT, rows + [12])]
    if transpose_read_elsewhere:
        outputs.append(helper.make_tensor_value_info("xt", TensorProto.FLOAT, rows + [16]))
    nodes += [helper.make_node("DynamicQuantizeMatMul", [source, "W1", "s1", "", "b1"], ["y1"], name="p1", domain="com.microsoft"),
              helper.make_node("DynamicQuantizeMatMul", [source, "W2", "s2"], ["y2"], name="p2", domain="com.microsoft")]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, 16])], outputs, inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("transposed", [False, True])
def test_shared_quantization_is_bit_exact(transposed):
    model = _two_readers(transposed)
    shared = _copy(model)
    assert share_input_quantization(shared) == 1
    onnx.checker.check_model(shared, full_check=True)
    assert _ops(shared).count("MatMulIntegerToFloat") == 2 and "DynamicQuantizeMatMul" not in _ops(shared)
    quantize = next(n for n in shared.graph.node if n.op_type == "DynamicQuantizeLinear")
    assert quantize.input[0] == "x"
    x = {"x": np.random.default_rng(4).standard_normal((3, 5, 16)).astype(np.float32) * 3}
    for got, expected in zip(builders.run_ort(shared, x), builders.run_ort(model, x)):
        np.testing.assert_array_equal(got, expected)


def test_transpose_read_elsewhere_stays_float():
    model = _two_readers(True, transpose_read_elsewhere=True)
    shared = _copy(model)
    assert share_input_quantization(shared) == 1
    onnx.checker.check_model(shared, full_check=True)
    quantize = next(n for n in shared.graph.node if n.op_type == "DynamicQuantizeLinear")
    assert quantize.input[0] == "xt"
    x = {"x": np.random.default_rng(4).standard_normal((3, 5, 16)).astype(np.float32)}
    for got, expected in zip(builders.run_ort(shared, x), builders.run_ort(model, x)):
        np.testing.assert_array_equal(got, expected)


def test_single_reader_is_left_as_the_fused_op():
    model = builders.mlp()
    result, _ = _dynamic(model)
    assert "MatMulIntegerToFloat" not in _ops(result.model) and result.metrics["shared_input_quantizations"] == 0
    assert result.metrics["attention_blocks_relaid"] == 0


def _torch_encoder(d: int = 32, heads: int = 4, seq: int = 7, layers: int = 2) -> onnx.ModelProto:
    """A small pre-norm encoder written the way the bench transformer is, exported by torch's
    TorchScript exporter: the exporter's own graph, not a hand-built copy of it."""
    torch = require_torch()
    import io

    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x, mask):
            batch, length, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(batch, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            weights = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5 + mask[:, None, None, :], dim=-1)
            x = x + self.out((weights @ v).transpose(1, 2).reshape(batch, length, d))
            return x + self.mlp(self.norm2(x))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.head = nn.Linear(d, 3)

        def forward(self, x, mask):
            for block in self.blocks:
                x = block(x, mask)
            return self.head(x.mean(1))

    torch.manual_seed(0)
    net = Encoder().eval()
    buffer = io.BytesIO()
    args = (torch.randn(2, seq, d), torch.zeros(2, seq))
    torch.onnx.export(net, args, buffer, input_names=["x", "mask"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"x": {0: "batch"}, "mask": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def test_torch_exported_encoder_is_relaid_in_every_block():
    model = _torch_encoder()
    float_only = _copy(model)
    assert len(fuse_attention_heads(float_only)) == 2
    onnx.checker.check_model(float_only, full_check=True)
    feeds = _feeds(model, count=6)
    np.testing.assert_allclose(builders.run_ort(float_only, feeds)[0], builders.run_ort(model, feeds)[0],
                               rtol=1e-5, atol=1e-6)
    result, _ = _dynamic(model)
    assert result.metrics["attention_blocks_relaid"] == 2 and _io(result.model) == _io(model)
    plain, _ = _dynamic(model, relayout=False)
    np.testing.assert_allclose(builders.run_ort(result.model, feeds)[0], builders.run_ort(plain.model, feeds)[0],
                               rtol=1e-5, atol=1e-5)
