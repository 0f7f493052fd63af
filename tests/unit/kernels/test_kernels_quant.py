"""quantize / dequantize / pack / unpack / choose_qparams against numpy oracles (bit-exact)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fwk_oracles as O
import kernels as K

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

f32 = st.floats(width=32)  # includes NaN, +-Inf, subnormals
f32_finite = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-10000.0, max_value=10000.0)


def arrays(shape_st, elements=f32):
    return hnp.arrays(np.float32, shape_st, elements=elements)


shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7)


@st.composite
def quant_case(draw):
    x = draw(arrays(shapes))
    bits = draw(st.sampled_from([2, 4, 8]))
    signed = draw(st.booleans())
    qmin, qmax = O.qrange(bits, signed)
    kind = draw(st.sampled_from(["tensor", "axis", "block"]))
    axis = block = None
    pos_scale = st.floats(min_value=0.0009765625, max_value=50.0, width=32)
    if kind == "tensor":
        pshape = ()
    else:
        axis = draw(st.integers(-x.ndim, x.ndim - 1))
        ax = axis % x.ndim
        if kind == "axis":
            pshape = (x.shape[ax],)
        else:
            block = draw(st.sampled_from([1, 2, 3, 4, 16]))
            pshape = tuple(-(-d // block) if i == ax else d for i, d in enumerate(x.shape))
    s = draw(hnp.arrays(np.float32, pshape, elements=pos_scale))
    z = draw(hnp.arrays(np.int32, pshape, elements=st.integers(qmin, qmax)))
    return x, s, z, bits, signed, axis, block


@SETTINGS
@given(quant_case())
def test_quantize_matches_oracle(case):
    x, s, z, bits, signed, axis, block = case
    q = K.quantize(x, s, z, bits=bits, signed=signed, axis=axis, block_size=block)
    ref = O.quantize(x, s, z, bits, signed, axis, block)
    assert q.dtype == (np.int8 if signed else np.uint8)
    assert q.shape == x.shape
    np.testing.assert_array_equal(q, ref)


@SETTINGS
@given(quant_case())
def test_dequantize_matches_oracle(case):
    x, s, z, bits, signed, axis, block = case
    q = O.quantize(x, s, z, bits, signed, axis, block)
    d = K.dequantize(q, s, z, axis=axis, block_size=block)
    ref = O.dequantize(q, s, z, axis, block)
    assert d.dtype == np.float32
    np.testing.assert_array_equal(d.view(np.uint32), ref.view(np.uint32))


def test_quantize_special_values():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 2.5, 3.5, -2.5, 1e30, -1e30], np.float32)
    q = K.quantize(x, np.float32(1.0), np.int32(3), bits=8, signed=True)
    assert q.tolist() == [3, 127, -128, 3, 3, 5, 7, 1, 127, -128]
    q = K.quantize(x, np.float32(1.0), np.uint8(0), bits=4, signed=False)
    assert q.tolist() == [0, 15, 0, 0, 0, 2, 4, 0, 15, 0]


def test_round_half_even_and_float32_division():
    # 0.3 / 0.1 in float32 is exactly 3.0 (in float64 it is 2.9999999999999996)
    x = np.array([0.3, 0.5, 1.5, 2.5, -0.5, -1.5], np.float32)
    s = np.float32(0.1)
    q = K.quantize(x, s, 0, bits=8, signed=True)
    np.testing.assert_array_equal(q, O.quantize(x, s, 0, 8, True))
    q = K.quantize(x[1:], np.float32(1.0), 0, bits=8, signed=True)
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_large_tensor_threaded_matches_oracle():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((257, 1031)).astype(np.float32)
    s, z = K.choose_qparams(x, bits=8, symmetric=False, signed=False, axis=0)
    q = K.quantize(x, s, z, bits=8, signed=False, axis=0)
    np.testing.assert_array_equal(q, O.quantize(x, s, z, 8, False, 0))
    s, z = K.choose_qparams(x, bits=4, symmetric=True, axis=1, block_size=32)
    q = K.quantize(x, s, z, bits=4, signed=True, axis=1, block_size=32)
    np.testing.assert_array_equal(q, O.quantize(x, s, z, 4, True, 1, 32))
    d = K.dequantize(q, s, z, axis=1, block_size=32)
    np.testing.assert_array_equal(d, O.dequantize(q, s, z, 1, 32))


# ------------------------------------------------------------------ onnxruntime cross-check


def _ort_quantize(x, s, z, axis=None, block_size=None, zdtype=np.int8):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    ytype = {np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}[zdtype]
    graph = helper.make_graph(
        [node], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", ytype, list(x.shape))],
        initializer=[numpy_helper.from_array(np.asarray(s, np.float32), "s"),
                     numpy_helper.from_array(np.asarray(z, zdtype), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_matches_onnxruntime_quantizelinear():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 48)) * 3).astype(np.float32)
    # exact .5 ties after the division
    x[0, :8] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5], np.float32) * np.float32(0.05)
    s = np.float32(0.05)
    ours = K.quantize(x, s, np.int8(0), bits=8, signed=True)
    np.testing.assert_array_equal(ours, _ort_quantize(x, s, np.int8(0)))
    # per channel, uint8, asymmetric
    s, z = K.choose_qparams(x, bits=8, symmetric=False, signed=False, axis=1)
    ours = K.quantize(x, s, z, bits=8, signed=False, axis=1)
    np.testing.assert_array_equal(ours, _ort_quantize(x, s, z.astype(np.uint8), axis=1, zdtype=np.uint8))
    # blocked int8
    s, z = K.choose_qparams(x, bits=8, symmetric=True, axis=0, block_size=16)
    ours = K.quantize(x, s, z, bits=8, signed=True, axis=0, block_size=16)
    np.testing.assert_array_equal(ours, _ort_quantize(x, s, z.astype(np.int8), axis=0, block_size=16))


# ------------------------------------------------------------------ pack / unpack


@SETTINGS
@given(st.data())
def test_pack_unpack_roundtrip(data):
    bits = data.draw(st.sampled_from([1, 2, 4, 8]))
    signed = data.draw(st.booleans())
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    n = data.draw(st.integers(0, 67))
    q = np.array(data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)),
                 dtype=np.int8 if signed else np.uint8)
    p = K.pack(q, bits)
    assert p.dtype == np.uint8 and p.shape == ((n * bits + 7) // 8,)
    np.testing.assert_array_equal(p, O.pack(q, bits))
    u = K.unpack(p, bits, signed=signed, count=n)
    np.testing.assert_array_equal(u, q)
    np.testing.assert_array_equal(u, O.unpack(p, bits, signed, n))


def test_pack_onnx_layout():
    # int4: first element in the low nibble
    assert K.pack(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]
    assert K.pack(np.array([-1, 0], np.int8), 4).tolist() == [0x0F]
    assert K.pack(np.array([1, 2, 3, 0, 1], np.uint8), 2).tolist() == [0b00111001, 0b01]


def test_pack_rejects_out_of_range():
    with pytest.raises(K.KernelError, match="does not fit"):
        K.pack(np.array([8], np.int8), 4)
    with pytest.raises(K.KernelError, match="does not fit"):
        K.pack(np.array([16], np.uint8), 4)
    with pytest.raises(K.KernelError):
        K.unpack(np.zeros(1, np.uint8), 4, signed=True, count=3)


# ------------------------------------------------------------------ choose_qparams


@st.composite
def qp_case(draw):
    x = draw(arrays(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6),
                    elements=st.one_of(f32_finite, f32_finite, st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))))
    bits = draw(st.sampled_from([2, 4, 8]))
    signed = draw(st.booleans())
    symmetric = draw(st.booleans())
    kind = draw(st.sampled_from(["tensor", "axis", "block"]))
    axis = block = None
    if kind != "tensor":
        axis = draw(st.integers(-x.ndim, x.ndim - 1))
        if kind == "block":
            block = draw(st.sampled_from([1, 2, 4, 5]))
    method = draw(st.sampled_from(["absmax", "minmax", "mse"]))
    return x, bits, signed, symmetric, axis, block, method


@SETTINGS
@given(qp_case())
def test_choose_qparams_matches_oracle(case):
    x, bits, signed, symmetric, axis, block, method = case
    s, z = K.choose_qparams(x, bits=bits, symmetric=symmetric, signed=signed, axis=axis,
                            block_size=block, method=method)
    rs, rz, errs = O.choose_qparams(x, bits, symmetric, signed, axis, block, method)
    assert s.dtype == np.float32 and z.dtype == np.int32
    assert s.shape == np.shape(rs) and z.shape == np.shape(rz)
    if method != "mse":
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_array_equal(z, rz)
        return
    # MSE: our pick must be one of the candidates with the (numerically) smallest error
    qmin, qmax = O.qrange(bits, signed)
    sf, zf = np.asarray(s).reshape(-1), np.asarray(z).reshape(-1)
    for j, e in enumerate(errs):
        if e is None:
            np.testing.assert_array_equal(sf[j], np.asarray(rs).reshape(-1)[j])
            continue
        best = min(v[0] for v in e)
        mine = [v[0] for v in e if v[1] == sf[j] and v[2] == zf[j]]
        assert mine, "scale/zero point not among the MSE candidates"
        assert min(mine) <= best * (1 + 1e-9) + 1e-30


def test_choose_qparams_rules():
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    s, z = K.choose_qparams(x, bits=8, symmetric=True)
    assert s == np.float32(2.0) / np.float32(127) and z == 0 and s.shape == ()
    s, z = K.choose_qparams(x, bits=8, symmetric=True, signed=False)
    assert z == 128 and s == np.float32(2.0) / np.float32(127)
    s, z = K.choose_qparams(x, bits=8, symmetric=False, signed=False, method="minmax")
    assert s == np.float32(3.0) / np.float32(255)
    assert z == int(np.rint(np.float32(0) - np.float32(-1.0) / s))
    # all-zero slice -> scale 1
    s, z = K.choose_qparams(np.zeros((2, 3), np.float32), bits=4, symmetric=True, axis=0)
    assert s.tolist() == [1.0, 1.0] and z.tolist() == [0, 0]
    # non-finite values are ignored
    s, _ = K.choose_qparams(np.array([np.inf, -np.nan, 1.0], np.float32), bits=8, symmetric=True)
    assert s == np.float32(1.0) / np.float32(127)
    # MSE clips a far outlier
    rng = np.random.default_rng(0)
    w = rng.standard_normal(4096).astype(np.float32)
    w[0] = 40.0
    s_abs, _ = K.choose_qparams(w, bits=4, symmetric=True)
    s_mse, _ = K.choose_qparams(w, bits=4, symmetric=True, method="mse")
    assert s_mse < s_abs


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "call",
    [
        lambda: K.quantize(np.zeros(3, np.float64), 1.0, 0, bits=8, signed=True),
        lambda: K.quantize([1.0, 2.0], 1.0, 0, bits=8, signed=True),
        lambda: K.quantize(np.zeros(3, np.float32), 1.0, 0, bits=3, signed=True),
        lambda: K.quantize(np.zeros(3, np.float32), 1.0, 0, bits=8, signed="yes"),
        lambda: K.quantize(np.zeros(3, np.float32), 1.0, 200, bits=8, signed=True),
        lambda: K.quantize(np.zeros(3, np.float32), 1.0, 0.5, bits=8, signed=True),
        lambda: K.quantize(np.zeros(3, np.float32), np.ones(2, np.float32), 0, bits=8, signed=True),
        lambda: K.quantize(np.zeros((3, 4), np.float32), np.ones(3, np.float32), np.zeros(3, np.int8),
                           bits=8, signed=True, axis=1),
        lambda: K.quantize(np.zeros((3, 4), np.float32), np.ones(3, np.float32), 0, bits=8,
                           signed=True, axis=5),
        lambda: K.quantize(np.zeros((3, 4), np.float32), np.ones((3, 2), np.float32),
                           np.zeros((3, 2), np.int8), bits=8, signed=True, axis=1, block_size=1),
        lambda: K.quantize(np.zeros((3, 4), np.float32), np.ones((3, 2), np.float32),
                           np.zeros((3, 2), np.int8), bits=8, signed=True, axis=1, block_size=0),
        lambda: K.quantize(np.zeros((3, 4), np.float32), np.ones((3, 2), np.float32),
                           np.zeros((3, 2), np.int8), bits=8, signed=True, block_size=2),
        lambda: K.quantize(np.zeros(3, np.float32), "a", 0, bits=8, signed=True),
        lambda: K.dequantize(np.zeros(3, np.int16), 1.0, 0),
        lambda: K.dequantize(np.zeros(3, np.uint8), 1.0, -1),
        lambda: K.pack(np.zeros(3, np.int8), 3),
        lambda: K.pack(np.zeros(3, np.float32), 4),
        lambda: K.unpack(np.zeros(3, np.uint8), 4, signed=True, count=-1),
        lambda: K.choose_qparams(np.zeros(3, np.float32), bits=8, symmetric=True, method="foo"),
        lambda: K.choose_qparams(np.zeros(3, np.float32), bits=16, symmetric=True),
        lambda: K.choose_qparams(np.float32(3.0), bits=8, symmetric=True, axis=0),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(K.KernelError):
        call()


def test_non_contiguous_inputs_are_copied():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 10)).astype(np.float32)[:, ::2]
    s = np.float32(0.02)
    np.testing.assert_array_equal(K.quantize(x, s, 0, bits=8, signed=True),
                                  O.quantize(np.ascontiguousarray(x), s, 0, 8, True))
    xt = rng.standard_normal((6, 5)).astype(np.float32).T
    s, z = K.choose_qparams(xt, bits=8, symmetric=True, axis=0)
    np.testing.assert_array_equal(K.quantize(xt, s, z, bits=8, signed=True, axis=0),
                                  O.quantize(np.ascontiguousarray(xt), s, z, 8, True, 0))
