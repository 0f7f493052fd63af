"""Streaming calibration: ranges by minmax / percentile / entropy from fixed-size histograms,
mask sentinels detected and kept out of the ranges, and ranges of intermediate tensors through ORT."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.pipeline import calibrate
from worker.pipeline.data import bind

FLOAT_MIN = float(np.finfo(np.float32).min)


def _stream(values: np.ndarray, batches: int = 8, bins: int = 2048) -> calibrate.ActivationStatistics:
    statistics = calibrate.ActivationStatistics(["t"], bins=bins)
    for chunk in np.array_split(values, batches):
        statistics.update("t", chunk)
    return statistics


def test_minmax_is_the_exact_extremes_over_all_batches():
    values = np.random.default_rng(0).normal(1.0, 2.0, 10_000).astype(np.float32)
    found = _stream(values).range("t", "minmax")
    assert (found.lo, found.hi) == (float(values.min()), float(values.max()))
    assert found.samples == values.size and not found.masked


def test_ranges_always_hold_zero():
    positive = np.random.default_rng(1).uniform(2.0, 5.0, 1000).astype(np.float32)
    found = _stream(positive).range("t", "minmax")
    assert found.lo == 0.0 and found.hi == pytest.approx(float(positive.max()))


def test_percentile_matches_numpy_within_one_bin():
    values = np.random.default_rng(2).standard_normal(50_000).astype(np.float32)
    statistics = _stream(values)
    found = statistics.range("t", "percentile", percentile=99.0)
    bin_width = 2 * statistics.histograms["t"].range / statistics.bins
    assert abs(found.hi - np.percentile(values, 99.0)) <= 2 * bin_width
    assert abs(found.lo - np.percentile(values, 1.0)) <= 2 * bin_width
    assert found.hi < values.max() and found.lo > values.min()


def test_entropy_clips_a_rare_outlier():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(100_000), [80.0, -75.0]]).astype(np.float32)
    statistics = _stream(values)
    entropy = statistics.range("t", "entropy")
    minmax = statistics.range("t", "minmax")
    assert minmax.hi == pytest.approx(80.0) and minmax.lo == pytest.approx(-75.0)
    # The KL search cannot cut below num_quant_bins (128) of the histogram's bins, which grew to
    # cover the outliers; it still drops at least half of the range they stretched.
    assert 1.0 < entropy.hi <= 0.5 * minmax.hi and 0.5 * minmax.lo <= entropy.lo < -1.0


@pytest.mark.parametrize("low, high", [(0.38, 0.61), (2.0, 3.0)])
def test_entropy_keeps_values_that_sit_far_from_zero(low, high):
    # a squeeze-excite Sigmoid's output: the KL search alone put the clip at the bulk's first bin
    # (everything folded into one bin matches exactly) and clipped 99.8 % of the values
    values = np.random.default_rng(8).uniform(low, high, 24 * 64).astype(np.float32)
    found = _stream(values).range("t", "entropy")
    assert (values > found.hi).mean() <= calibrate.ENTROPY_MAX_CLIPPED
    assert found.hi <= values.max()


def test_mask_sentinels_mark_the_tensor_and_stay_out_of_the_range():
    values = np.random.default_rng(4).standard_normal((64, 16)).astype(np.float32)
    values[:, 10:] = FLOAT_MIN
    for method in calibrate.METHODS:
        found = _stream(values).range("t", method)
        assert found.masked
        assert found.lo >= -10.0 and found.hi <= 10.0     # the ordinary values' range, not 1e38
    assert _stream(values).range("t", "minmax").samples == 64 * 10


def test_non_finite_values_count_as_sentinels():
    values = np.array([1.0, -2.0, np.inf, np.nan, 3.0], dtype=np.float32)
    found = _stream(values, batches=1).range("t", "minmax")
    assert found.masked and (found.lo, found.hi) == (-2.0, 3.0)


def test_histogram_memory_does_not_grow_with_the_data():
    statistics = calibrate.ActivationStatistics(["t"], bins=512)
    rng = np.random.default_rng(5)
    sizes = set()
    for scale in (1.0, 10.0, 1000.0):          # ranges that grow force re-binning, never growth
        for _ in range(20):
            statistics.update("t", (rng.standard_normal(4096) * scale).astype(np.float32))
            sizes.add(statistics.histograms["t"].counts.nbytes)
    assert sizes == {512 * 8}
    assert statistics.range("t", "minmax").samples == 3 * 20 * 4096


def test_unseen_tensor_has_no_range_and_unknown_method_is_refused():
    statistics = calibrate.ActivationStatistics(["t"])
    assert statistics.range("t", "minmax") is None
    statistics.update("t", np.ones(3, np.float32))
    with pytest.raises(ValueError):
        statistics.range("t", "median")


def _affine_model() -> onnx.ModelProto:
    """x[batch, 4] -> h = x * 3 - 1 -> y = Relu(h)."""
    nodes = [helper.make_node("Mul", ["x", "three"], ["m"], name="mul"),
             helper.make_node("Sub", ["m", "one"], ["h"], name="sub"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(np.array(3.0, np.float32), "three"),
                               numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_calibrate_streams_intermediate_tensors_through_onnxruntime():
    model = _affine_model()
    x = np.random.default_rng(6).standard_normal((300, 4)).astype(np.float32)
    seen = []
    ranges = calibrate.calibrate(model, bind(model, {"x": x}), ["h", "y"], method="minmax", batch_size=32,
                                 progress=lambda fraction, message: seen.append(fraction))
    h = x * np.float32(3) - np.float32(1)
    assert ranges["h"].lo == pytest.approx(float(h.min()), rel=1e-6)
    assert ranges["h"].hi == pytest.approx(float(h.max()), rel=1e-6)
    assert ranges["y"].lo == 0.0 and ranges["y"].samples == x.size
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


def test_entropy_ignores_the_exact_zeros_of_a_relu():
    values = np.maximum(np.random.default_rng(7).normal(0.0, 1.4, 60_000), 0.0).astype(np.float32)
    found = _stream(values).range("t", "entropy")
    # half the values are exact zeros; the threshold must still keep nearly all positive values
    assert found.lo == 0.0
    assert (values > found.hi).mean() < 0.01
