"""Sessions on in-memory models past protobuf's 2 GiB: the weights go to ONNX Runtime as external
data written once to a scratch file, so GPTQ, calibration and the fp16 overflow check work on them.

A real 2 GiB model would take minutes and gigabytes here; the threshold is lowered instead, so the
same code path runs on small models, and its results must equal the in-memory path's bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tests.unit.pipeline import builders
from tests.unit.pipeline.quantize.test_quantize_low_bit import correlated
from tests.unit.pipeline.quantize.test_quantize_weight_only import apply
from worker.pipeline import graph, sessions


@pytest.fixture
def tiny_threshold(monkeypatch):
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 1)


def test_big_model_session_reads_weights_from_scratch_and_leaves_the_model_intact(tiny_threshold):
    model = builders.mlp()
    before = model.SerializeToString()
    options = ort.SessionOptions()
    data, scratch = sessions.payload(model, options)
    assert scratch is not None and len(data) < len(before) // 10      # the structure only
    assert model.SerializeToString() == before                        # every weight read back
    feeds = builders.random_inputs(model)
    run = sessions.session(model, outputs=[model.graph.node[0].output[0]])
    expected = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(run.run([model.graph.output[0].name], feeds)[0], expected[0])
    assert model.SerializeToString() == before                        # extra outputs taken off again
    exposed = sessions.exposed_session(model, [model.graph.node[0].output[0]])
    assert len(exposed.get_outputs()) == len(model.graph.output) + 1


def test_session_hands_weights_over_as_values_and_serializes_the_structure_only():
    model = builders.mlp()
    before = model.SerializeToString()
    data, held = sessions.payload(model, ort.SessionOptions())
    assert len(data) < len(before) // 10 and held                     # the weights went as OrtValues
    assert model.SerializeToString() == before                        # the model is not touched
    structure = onnx.ModelProto.FromString(data)
    assert {t.name for t in structure.graph.initializer} == {t.name for t in model.graph.initializer}
    feeds = builders.random_inputs(model)
    expected = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(sessions.session(model).run(None, feeds)[0], expected[0])


def test_gptq_on_a_big_model_equals_gptq_in_memory(monkeypatch):
    spec = {"weights": {"bits": 4, "granularity": "block", "block_size": 32}, "method": "gptq"}
    calibration = correlated(builders.mlp(), 128, seed=1)
    small, _ = apply(builders.mlp(), spec, calibration=calibration)
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 1)
    big, ctx = apply(builders.mlp(), spec, calibration=calibration)
    assert {r.extra["method"] for r in ctx.layers.values()} == {"gptq"}
    stored = {t.name: numpy_helper.to_array(t) for t in small.model.graph.initializer}
    for tensor in big.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), stored[tensor.name])
    onnx.checker.check_model(big.model, full_check=True)


@pytest.mark.parametrize("calibration_mode", ["minmax", "dynamic"])
def test_static_and_dynamic_int8_on_a_big_model_equal_the_in_memory_result(monkeypatch, calibration_mode):
    spec = {"weights": {"bits": 8}, "activations": {"bits": 8, "calibration": calibration_mode}}
    calibration = builders.random_inputs(builders.mlp(), count=64, seed=3)
    small, _ = apply(builders.mlp(), spec, calibration=calibration)
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 1)
    big, _ = apply(builders.mlp(), spec, calibration=calibration)
    stored = {t.name: numpy_helper.to_array(t) for t in small.model.graph.initializer}
    assert set(stored) == {t.name for t in big.model.graph.initializer}
    for tensor in big.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), stored[tensor.name])


def test_session_without_arena_or_prepacking_runs_the_same():
    # segment sessions of a sequential propagation are built so: no arena keeping a high-water mark
    model = builders.mlp(inputs=8, hidden=16, classes=3)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    plain = sessions.session(model)
    lean = sessions.session(model, arena=False, prepack=False)
    assert plain.get_session_options().enable_cpu_mem_arena
    assert not lean.get_session_options().enable_cpu_mem_arena
    np.testing.assert_allclose(lean.run(None, feeds)[0], plain.run(None, feeds)[0], rtol=1e-6)


_HELD_AFTER_FREE = """
import sys
import numpy as np
from worker.pipeline import sessions
if sys.argv[1] == "fixed":
    assert sessions.return_big_buffers()
def rss_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
held = []
for _ in range(3):
    before = rss_kb()
    block = np.ones(4 << 20, np.float32)        # 16 MB, touched
    del block
    held.append(rss_kb() - before)
print(max(held))
"""


@pytest.mark.parametrize("mode", ["default", "fixed"])
def test_big_buffers_go_back_to_the_os_once_freed(mode):
    """With glibc's threshold fixed at 1 MiB, a freed 16 MB array is unmapped at once; glibc's
    default raises the threshold to 16 MB after the first such free and keeps the next ones in the
    heap (which a mix of sizes then fragments). In a fresh interpreter: a heap that already has a
    big free chunk serves the block from it either way."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    done = subprocess.run([sys.executable, "-c", _HELD_AFTER_FREE, mode], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[3])
    held_kb = int(done.stdout.split()[-1])
    if mode == "fixed":
        assert held_kb < 4_000
    else:
        assert held_kb > 12_000
