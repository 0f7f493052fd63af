"""The deploy-format bars: a CNN classifier trained on digits and a transformer encoder, quantized int8 static and
exported to onnx, ort and tflite. Every artifact loads in its own runtime (ONNX Runtime from the
ORT flat buffer, LiteRT's interpreter) and agrees with the compressed ONNX model on held-out data
(top-1 agreement >= 0.99 for the classifier, cosine >= 0.99 for the embeddings); the tflite file is
full-integer int8 and at least 3.5x smaller than the float32 tflite of the same graph.

Needs the optional extra ``featherweight[tflite]``; each conversion takes TensorFlow some seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from core.exports import missing_extra
from core.recipe import parse_recipe
from tests.unit.pipeline.export import models
from worker.pipeline import runner
from worker.pipeline.export import ort_format

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(missing_extra("tflite") is not None, reason="featherweight[tflite] not installed")]

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"bits": 8}}],
          "export": ["onnx", "ort", "tflite"]}


def _litert(path: Path, feeds: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert source["dtype"] == np.float32    # float I/O, int8 inside
    outputs = []
    for sample in feeds:
        interpreter.set_tensor(source["index"], sample[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(sink["index"]).copy())
    return np.concatenate(outputs)


def _int8_weights(path: Path) -> int:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return sum(int(np.prod(t["shape"])) for t in interpreter.get_tensor_details()
               if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) > 1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _model_and_data(which: str):
    """(model, calibration, evaluation, held-out inputs): the classifier trained on digits (its
    held-out images), or the encoder on N(0, 1) sequences."""
    if which == "cnn":
        model, calibration, evaluation = models.digits_cnn()
        return model, calibration, {name: value[:256] for name, value in evaluation.items()}, evaluation["x"][256:]
    model = models.encoder()
    return model, models.samples(model, 64, seed=1), models.samples(model, 64, seed=2), models.samples(model, 32, seed=3)["x"]


@pytest.mark.parametrize("which", ["cnn", "encoder"])
def test_int8_static_exports_agree_and_tflite_keeps_the_compression(which, tmp_path):
    model, calibration, evaluation, held_out = _model_and_data(which)
    path = tmp_path / f"{which}.onnx"
    onnx.save_model(model, str(path))
    result = runner.run(path, parse_recipe(RECIPE), calibration=calibration, evaluation=evaluation,
                        workdir=tmp_path / "work", options={"latency_runs": 3, "latency_budget_s": 0.2,
                                                            "layer_errors": False})
    rows = result.report["exports"]
    assert rows["ort"]["state"] == "ok" and rows["tflite"]["state"] == "ok", rows

    want = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"]).run(None, {"x": held_out})[0]
    from_ort = ort_format.load(tmp_path / "work" / "model.ort").run(None, {"x": held_out})[0]
    from_tflite = _litert(tmp_path / "work" / "model.tflite", held_out)
    for fmt, got in (("ort", from_ort), ("tflite", from_tflite)):
        assert got.shape == want.shape
        assert _cosine(got, want) >= 0.99, fmt
        if which == "cnn":
            # the bar on a classifier, on 241 held-out digits the calibration never saw
            assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99, fmt

    tflite = rows["tflite"]
    assert tflite["converter"]["mode"] == "int8"
    # the weights are stored int8 per channel: the compression survived the conversion
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) >= 2)
    assert _int8_weights(tmp_path / "work" / "model.tflite") >= params
    assert tflite["converter"]["float32_bytes"] / tflite["bytes"] >= 3.5
    assert tflite["agreement"]["cosine"] >= 0.99 and rows["ort"]["agreement"]["cosine"] >= 0.99
    if which == "cnn":      # labelled data: the report judged the formats on top-1 too
        assert tflite["top1_bound"].startswith("applied") and tflite["agreement"]["top1_agreement"] >= 0.99
    else:                   # embeddings: cosine only
        assert tflite["top1_bound"].startswith("not applied")
