"""Static int8's weight form on x86 without VNNI (pair_saturation): the model of the u8s8 kernel's
int16 pairs, checked against a brute-force oracle everywhere and against ONNX Runtime itself where
this host's kernel saturates; and the per-layer choice it drives."""
from __future__ import annotations

import platform

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.recipe import QuantizeStep
from tests.unit.pipeline import builders
from worker.pipeline import host
from worker.pipeline.data import bind
from worker.pipeline.quantize import int8_storage, pair_saturation
from worker.pipeline.quantize.static import quantize_static
from worker.pipeline.step import StepContext

X86_AVX2 = "model name\t: AMD EPYC 7402\nflags\t: sse4_2 avx avx2 fma f16c\n"
U8S8_SATURATES = platform.machine().lower() in ("x86_64", "amd64") and not int8_storage.cpu_has_vnni()


def _pairwise_oracle(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Every pair's sum clipped to int16, summed: the kernel's arithmetic written out."""
    k = matrix.shape[0]
    x = np.pad(rows.astype(np.int64), ((0, 0), (0, k % 2)))
    w = np.pad(matrix.astype(np.int64), ((0, k % 2), (0, 0)))
    pairs = x[:, 0::2, None] * w[None, 0::2, :] + x[:, 1::2, None] * w[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


@pytest.mark.parametrize("k", [64, 65])
def test_the_saturation_it_computes_is_the_pairwise_sum_clipped_to_int16(k):
    rng = np.random.default_rng(k)
    rows = rng.integers(0, 256, (40, k)).astype(np.uint8)
    matrix = rng.integers(-127, 128, (k, 24)).astype(np.int16)
    difference = pair_saturation.saturated_minus_exact(rows, matrix)
    exact = rows.astype(np.int64) @ matrix.astype(np.int64)
    np.testing.assert_array_equal(exact + difference, _pairwise_oracle(rows, matrix))
    assert np.abs(difference).max() > 0          # random full-range weights do saturate


@pytest.mark.parametrize("k", [64, 65])
def test_the_energy_from_float_rows_equals_the_one_from_their_uint8_values(k):
    """The sampler reads dequantized rows and converts only the values the reachable pairs use."""
    rng = np.random.default_rng(k + 1)
    step, zero = 0.02, 9
    q = rng.integers(0, 256, (50, k)).astype(np.uint8)
    x = ((q.astype(np.float32) - zero) * np.float32(step)).astype(np.float32)
    matrix = rng.integers(-127, 128, (k, 12)).astype(np.int16)
    column_scale = rng.uniform(0.5, 2.0, 12)
    expected = float(((pair_saturation.saturated_minus_exact(q, matrix) * column_scale) ** 2).sum())
    assert expected > 0
    assert pair_saturation.saturation_energy(x, matrix, column_scale, step, zero) == pytest.approx(expected, rel=1e-12)


def _conv_patches_and_matrices(x, w, zero, attrs):
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    spatial = x.ndim - 2
    everything = 10 ** 6
    rows = pair_saturation.gemm_rows(node, x, tuple(w.shape[2:]), zero, everything, np.random.default_rng(0))
    return rows, pair_saturation.gemm_matrices(node, w.astype(np.int16)), spatial


def _float_conv(x, w, attrs):
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "exact",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


CONVS = [
    ("pointwise", 8, 16, (1, 1), {}),
    ("3x3 padded", 8, 16, (3, 3), {"pads": [1, 1, 1, 1]}),
    ("odd channels, stride 2, uneven pads", 8, 7, (3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 2]}),
    ("two groups", 8, 16, (3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    ("dilated", 8, 16, (3, 3), {"dilations": [2, 2]}),
    ("1-D", 8, 16, (3,), {"pads": [1, 1]}),
]


def test_the_conv_patches_it_builds_give_the_convolution():
    """The GEMM it models (patch rows x per-group matrices) is the convolution, padding included."""
    rng = np.random.default_rng(5)
    for _, out_channels, channels, kernel, attrs in CONVS:
        w = rng.integers(-127, 128, (out_channels, channels // attrs.get("group", 1), *kernel)).astype(np.int8)
        x = rng.integers(0, 256, (2, channels, *([9] * len(kernel)))).astype(np.uint8)
        zero = 7
        rows, matrices, spatial = _conv_patches_and_matrices(x, w, zero, attrs)
        gemm = np.concatenate([(r.astype(np.int64) - zero) @ m.astype(np.int64) for r, m in zip(rows, matrices)], 1)
        exact = _float_conv(x.astype(np.float32) - zero, w, attrs)
        np.testing.assert_array_equal(gemm, exact.transpose(0, *range(2, 2 + spatial), 1).reshape(-1, out_channels))


def _qlinear_conv(w, scale, attrs, zero):
    out_channels = w.shape[0]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(1.0), "xs"),
             numpy_helper.from_array(np.uint8(zero), "xz"), numpy_helper.from_array(np.ones(out_channels, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(out_channels, np.int8), "wz"), numpy_helper.from_array(np.float32(scale), "ys"),
             numpy_helper.from_array(np.uint8(128), "yz")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], **attrs)
    g = helper.make_graph([node], "u8s8", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.skipif(not U8S8_SATURATES, reason="this host's u8s8 kernel accumulates in 32 bits (VNNI or not x86)")
@pytest.mark.parametrize("case", CONVS + [("depthwise", 16, 16, (3, 3), {"group": 16, "pads": [1, 1, 1, 1]})],
                         ids=lambda case: case[0])
def test_onnx_runtime_qlinearconv_returns_what_the_pair_model_predicts(case):
    _, out_channels, channels, kernel, attrs = case
    rng = np.random.default_rng(6)
    w = rng.integers(-127, 128, (out_channels, channels // attrs.get("group", 1), *kernel)).astype(np.int8)
    x = rng.integers(0, 256, (2, channels, *([9] * len(kernel)))).astype(np.uint8)
    zero = 7
    rows, matrices, spatial = _conv_patches_and_matrices(x, w, zero, attrs)
    exact = np.concatenate([(r.astype(np.int64) - zero) @ m.astype(np.int64) for r, m in zip(rows, matrices)], 1) \
        if matrices else _float_conv(x.astype(np.float32) - zero, w, attrs).transpose(0, 2, 3, 1).reshape(-1, out_channels)
    modelled = exact + (np.concatenate([pair_saturation.saturated_minus_exact(r, m) for r, m in zip(rows, matrices)], 1)
                        if matrices else 0)
    scale = np.abs(exact).max() / 120.0                  # fine enough that one saturated pair shows
    y = _qlinear_conv(w, scale, attrs, zero).run(None, {"x": x})[0]
    got = y.transpose(0, *range(2, 2 + spatial), 1).reshape(-1, out_channels).astype(np.int64)
    rounded = lambda acc: np.clip(np.rint(acc / scale) + 128, 0, 255)
    np.testing.assert_array_equal(got, rounded(modelled))
    if matrices:
        assert (got != rounded(exact)).any()             # it did saturate: the test shows the model
    else:
        assert not pair_saturation.gemm_matrices(helper.make_node("Conv", ["x", "w"], ["y"], **attrs), w)


@pytest.mark.skipif(not U8S8_SATURATES, reason="this host's u8s8 kernel accumulates in 32 bits (VNNI or not x86)")
def test_onnx_runtime_matmulinteger_returns_what_the_pair_model_predicts():
    rng = np.random.default_rng(7)
    w = rng.integers(-127, 128, (97, 40)).astype(np.int8)
    x = rng.integers(0, 256, (30, 97)).astype(np.uint8)
    node = helper.make_node("MatMulInteger", ["x", "w", "xz"], ["y"])
    g = helper.make_graph([node], "u8s8", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 97])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 40])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(9), "xz")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = (x.astype(np.int64) - 9) @ w.astype(np.int64)
    np.testing.assert_array_equal(y, exact + pair_saturation.saturated_minus_exact(x, w.astype(np.int16)))
    assert (y != exact).any()


# ------------------------------------------------------------------------------------ the choice

def _three_layers() -> onnx.ModelProto:
    """Three MatMul + bias layers, one per form:
    "W1": every column's two largest weights side by side with one sign (pairs at 127 + 127 saturate
          on large inputs), every weight a multiple of absmax / 63, so the 7-bit grid rounds nothing;
    "W3": the same large pairs among continuous weights: the 7-bit grid's rounding costs as much as
          saturation, too much;
    "W2": pairs that always differ in sign: nothing saturates."""
    rng = np.random.default_rng(8)
    w1 = np.rint(rng.uniform(-0.1, 0.1, (32, 16)) * 63) / 63
    w1[0:2] = 1.0
    w3 = rng.uniform(-0.1, 0.1, (16, 16))
    w3[0:2] = 1.0
    w2 = np.abs(rng.uniform(0.05, 1.0, (16, 8)))
    w2[1::2] *= -1
    nodes, inits = [], []
    for index, (name, weight, source, out) in enumerate((("W1", w1, "x", "h1"), ("W3", w3, "h1", "h3"),
                                                         ("W2", w2, "h3", "y"))):
        nodes += [helper.make_node("MatMul", [source, name], [f"{out}_mm"], name=f"layer{index}"),
                  helper.make_node("Add", [f"{out}_mm", f"b_{name}"], [out])]
        inits += [numpy_helper.from_array(weight.astype(np.float32), name),
                  numpy_helper.from_array(np.full(weight.shape[1], 0.1, np.float32), f"b_{name}")]
    g = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _stored(model, name):
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]


def _quantize(model, calibration, bias_correction=False, **options):
    ctx = StepContext(original=model, calibration=calibration, options=options)
    step = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "minmax"}, min_params=0,
                        min_products=0, bias_correction=bias_correction)
    return quantize_static(model, step, ctx), ctx


@pytest.mark.parametrize("bias_correction", [False, True], ids=["own pass", "riding bias correction's pass"])
def test_without_vnni_each_layer_takes_the_form_that_costs_least(monkeypatch, bias_correction):
    monkeypatch.setattr(host, "cpu_info", lambda: host.parse_cpu(X86_AVX2, "x86_64"))
    if bias_correction:       # one pass over the quantized model serves both
        monkeypatch.setattr(pair_saturation, "measure", lambda *args: pytest.fail("a second pass"))
    model = _three_layers()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    calibration = {"x": np.random.default_rng(9).uniform(0.0, 1.0, (64, 32)).astype(np.float32)}
    result, ctx = _quantize(model, calibration, bias_correction)
    assert result.metrics["bias_corrected"] == (3 if bias_correction else 0)
    # W1 saturates, and its weights sit on the 7-bit grid: that grid, stored int8
    q1, s1, z1 = _stored(result.model, "W1")
    assert q1.dtype == np.int8 and not z1.any() and ctx.layers["W1"].extra["pair_saturation"] > 0
    np.testing.assert_array_equal(q1, np.clip(np.rint(weights["W1"] / s1), -63, 63))
    assert np.abs(q1).max() == 63 and ctx.layers["W1"].grid["bits"] == 7
    assert ctx.layers["W1"].extra["weight_storage"] == pair_saturation.SEVEN_BIT_STORAGE
    # W3 saturates, and the 7-bit grid would cost as much: the exact uint8 + 128 form of the 8-bit grid
    q3, s3, z3 = _stored(result.model, "W3")
    assert q3.dtype == np.uint8 and (z3 == 128).all()
    assert ctx.layers["W3"].extra["pair_saturation"] > pair_saturation.SLACK
    np.testing.assert_array_equal(q3.astype(np.int16) - 128, np.clip(np.rint(weights["W3"] / s3), -127, 127))
    # W2: no pair shares a sign, nothing saturates: the contract's 8-bit grid stored int8
    q2, s2, z2 = _stored(result.model, "W2")
    assert q2.dtype == np.int8 and not z2.any() and ctx.layers["W2"].extra["pair_saturation"] == 0.0
    np.testing.assert_array_equal(q2, np.clip(np.rint(weights["W2"] / s2), -127, 127))
    assert np.abs(q2).max() == 127 and ctx.layers["W2"].extra["weight_storage"] == "int8"
    assert result.metrics["seven_bit_weights"] == 1
    [choice] = [c for c in ctx.options[host.CHOICES_KEY] if c["choice"] == "int8 weight storage per layer"]
    assert choice["value"] == "int8 on 1 integer layers, int8 on a 7-bit grid on 1, uint8 + 128 on 1"


def test_a_forced_storage_is_kept_on_every_layer(monkeypatch):
    monkeypatch.setattr(host, "cpu_info", lambda: host.parse_cpu(X86_AVX2, "x86_64"))
    calibration = {"x": np.random.default_rng(9).uniform(0.0, 1.0, (64, 32)).astype(np.float32)}
    result, ctx = _quantize(_three_layers(), calibration, integer_weights="uint8")
    for name in ("W1", "W2", "W3"):
        q, _, zero = _stored(result.model, name)
        assert q.dtype == np.uint8 and (zero == 128).all() and "pair_saturation" not in ctx.layers[name].extra
    assert result.metrics["seven_bit_weights"] == 0


def _measured(model, nodes, data, original):
    found = []
    weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    pair_saturation.measure(pair_saturation.Sampler(model, nodes, weights.__getitem__, found.extend), model, data)
    return found


def test_it_reads_rows_from_at_least_four_samples_and_stops_when_each_layer_has_enough(monkeypatch):
    """4096 output positions per image: ROWS from a quarter of each of the first samples, then it
    stops; a MatMul with a few rows per sample reads all SAMPLES."""
    read = []
    capture = pair_saturation.activations.capture_counted

    def counted(*args, **kwargs):
        for count, values in capture(*args, **kwargs):
            read.append(count)
            yield count, values
    monkeypatch.setattr(pair_saturation.activations, "capture_counted", counted)
    conv = builders.pointwise_conv(np.random.default_rng(10), 8, 8, 64)
    images = {"x": np.random.default_rng(11).uniform(0, 1, (32, 8, 64, 64)).astype(np.float32)}
    stored = _quantize(conv, images, integer_weights="uint8")[0].model
    read.clear()                          # the calibration pass's own reads
    [layer] = _measured(stored, {"c": "c.W"}, bind(stored, images), conv)
    assert layer.rows == pair_saturation.ROWS
    assert pair_saturation.MIN_SAMPLES <= sum(read) < 2 * pair_saturation.MIN_SAMPLES
    rows = {"x": np.random.default_rng(12).uniform(0, 1, (40, 32)).astype(np.float32)}
    three = _three_layers()
    stored = _quantize(three, rows, integer_weights="uint8")[0].model
    read.clear()
    measured = _measured(stored, {"layer0": "W1", "layer2": "W2"}, bind(stored, rows), three)
    assert [layer.rows for layer in measured] == [pair_saturation.SAMPLES] * 2 and sum(read) == pair_saturation.SAMPLES
