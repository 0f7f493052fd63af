"""Static int8 QDQ in the form TensorRT takes, for ``gpu`` jobs where the TensorRT provider runs.

TensorRT builds int8 engines from explicit QuantizeLinear / DequantizeLinear pairs only when they
are symmetric: int8 activations with zero point 0 and weights int8 with zero point 0, one scale per
output channel (its documented "explicit quantization" rules; an asymmetric uint8 activation or a
per-tensor weight scale makes it fall back to float or refuse the layer). ONNX Runtime's CUDA
provider runs the same symmetric QDQ model, so nothing is lost where TensorRT is absent at run time.

``adapt`` rewrites the recipe's static int8 spec to that form when the job's target is ``gpu`` and
ONNX Runtime here offers TensorRT on a GPU that runs (``host.tensorrt_present``); elsewhere the
recipe is used as written. The change is recorded as a host choice, so the report names it.
"""
from __future__ import annotations

from core.recipe import QuantizeStep, WeightQuantSpec
from worker.pipeline import host
from worker.pipeline.step import StepContext


def tensorrt_form(params: QuantizeStep) -> QuantizeStep:
    """``params`` with symmetric int8 activations and symmetric per-channel int8 weights."""
    if params.activations is None:
        return params
    weights = params.weights or WeightQuantSpec()
    if weights.bits == 8 and (not weights.symmetric or weights.granularity != "channel"):
        weights = weights.model_copy(update={"symmetric": True, "granularity": "channel", "block_size": None})
    activations = params.activations.model_copy(update={"symmetric": True})
    return params.model_copy(update={"activations": activations, "weights": weights})


def adapt(params: QuantizeStep, ctx: StepContext) -> QuantizeStep:
    """The spec static quantization should use for ``ctx.target`` on this host (see module doc)."""
    if ctx.target != "gpu" or params.activations is None or not host.tensorrt_present():
        return params
    adapted = tensorrt_form(params)
    if adapted is not params:
        host.note_choice(ctx.options, "int8 QDQ form", "TensorRT: symmetric int8 activations, per-channel symmetric weights",
                         f"{host.TENSORRT_PROVIDER} offered by this ONNX Runtime ({host.onnxruntime_version()}) on a GPU that runs")
    return adapted
