"""Sign quantization (``weights: {bits: 1}``): ``w' = alpha * sign(w)``, one alpha per output
channel, ``alpha = mean(|w|)`` over the channel (the L2-optimal scale for a fixed sign pattern);
``sign(0) = +1``. Computed by ``kernels.sign_quantize``.

Stored as INT2 values in {-1, +1} (one bit of information, two of storage: ONNX has no 1-bit type)
feeding a per-axis DequantizeLinear with scale alpha along the weight's output axis (opset 25); a
MatMul weight may instead go to a 2-bit MatMulNBits with alpha repeated in every block (``format``,
measured when ``auto``, as for the other weight-only grids).
Where the installed ONNX Runtime cannot run an INT2 DequantizeLinear, the same values are stored as
INT4 (opset 21) and the step's metrics say so.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper, numpy_helper

import kernels
from core.recipe import QuantizeStep
from worker.pipeline import graph, sessions
from worker.pipeline.quantize import matmulnbits, weight_only
from worker.pipeline.quantize.grid import Grid, dequantize
from worker.pipeline.step import StepContext, StepResult


@functools.lru_cache(maxsize=1)
def ort_runs_int2() -> bool:
    """Whether this ONNX Runtime runs DequantizeLinear on INT2 (a 4-element probe model)."""
    q = helper.make_tensor("q", onnx.TensorProto.INT2, [2, 2], vals=bytes([0b01110111]), raw=True)  # -1 1 -1 1
    s = numpy_helper.from_array(np.ones(2, np.float32), "s")
    node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0)
    g = helper.make_graph([node], "probe", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])], [q, s])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 25)])
    try:
        out = sessions.session(model, log_severity=4).run(None, {})[0]
    except Exception:   # any failure to load or run the probe means: not supported here
        return False
    return bool(np.array_equal(out, np.array([[-1, 1], [-1, 1]], np.float32)))


def quantize_sign(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    storage_bits = 2 if ort_runs_int2() else 4
    model, lifted = weight_only.prepare(model, params, 25 if storage_bits == 2 else 21)
    layers = weight_only.candidate_layers(model, params)
    inits = graph.initializers(model)
    changed: list[str] = []
    packs: list[tuple[matmulnbits.Packed, int]] = []
    for position, layer in enumerate(layers):
        ctx.check_cancelled()
        tensor = inits[layer.weight]
        w = numpy_helper.to_array(tensor).astype(np.float32)
        signs, alpha = kernels.sign_quantize(np.ascontiguousarray(w), axis=layer.out_axis)
        grid = Grid(bits=storage_bits, signed=True, symmetric=True, axis=layer.out_axis,
                                block_size=None, method="sign")
        zero = np.zeros(alpha.shape, np.int32)
        changed += weight_only.replace_with_dequantize(model, layer, signs, alpha, zero, grid, tensor.data_type)
        w_hat = dequantize(signs, alpha, zero, grid)
        record = weight_only.record_layer(ctx, layer, grid, w_hat, w, alpha, zero, format="qdq", method="sign",
                                          storage=f"int{storage_bits}")
        record.bits = 1
        record.grid["bits"] = 1
        if layer.op == "MatMul":
            packed = matmulnbits.from_grid(layer.weight, signs, alpha, zero, bits=storage_bits, signed=True,
                                           symmetric=True, axis=layer.out_axis, block_size=None)
            if packed is not None:
                packs.append((packed, tensor.data_type))
        ctx.progress(0.9 * (position + 1) / max(len(layers), 1), f"sign {layer.weight}")
    graph.sort_graph(model)
    model, formats, timing = weight_only.choose_format(model, params, layers, packs, ctx)
    for weight, chosen in formats.items():
        ctx.layers[weight].extra["format"] = chosen
    metrics = {"mode": "sign", "bits": 1, "storage": f"int{storage_bits}", "quantized": len(layers),
               "lifted_constants": lifted, "formats": formats,
               "opset": graph.opset(model), "skipped": weight_only.skipped_weights(model)}
    if timing:
        metrics["format_latency_ms"] = timing
        for weight, measured in timing.items():
            ctx.layers[weight].extra["format_latency_ms"] = measured
    if storage_bits != 2:
        metrics["note"] = "this ONNX Runtime has no INT2 DequantizeLinear: signs stored as INT4"
    return StepResult(model, changed, metrics)
