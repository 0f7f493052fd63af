"""The compressions the real-model bench compares: ours (the pipeline with a recipe), ONNX Runtime's
quantizers and NNCF, each a function ``(RealModel, out_path) -> dict`` of notes on what it did.

    ours-static        quantize: weights int8 per channel, activations static, every option default
                       (percentile calibration)
    ours-static-pct    the same with percentile calibration named (the recipe issue #14 measured)
    ours-static-minmax the same with minmax calibration
    ours-static-mse    the same with mse calibration (each tensor's range minimising its rounding error)
    ours-static-adaround  ours-static with weights.rounding: adaround (learned rounding, issue #14)
    ours-static-cle    ours-static with equalize: true (cross-layer equalization)
    ours-static-cle-hba  ours-static with equalize and high_bias_absorption: true
    ours-static-s8     ours-static with integer_weights: int8 (the 8-bit grid stored int8 on every layer:
                       u8s8 kernels, which saturate on AVX2 without VNNI)
    ours-static-u8     ours-static with integer_weights: uint8 (the 8-bit grid stored uint8 + 128 on every
                       layer: the exact u8u8 kernels; the default picks per layer on AVX2 without VNNI)
    ours-static-int-all  ours-static with min_products: 0 (every Conv on integer activations, the
                       depthwise ones and the stem included: the default keeps those float)
    ours-static-min256 / ours-static-min0  ours-static with min_params: 256 / 0 (the weights of fewer than
                       1024 elements the default leaves float, quantized too)
    ours-dynamic       quantize: weights int8, activations dynamic
    ours-int4-gptq     quantize: weights int4 block 32, GPTQ (models with MatMul weights only)
    ours-int4-rtn      int4 block 32, mse scales, round to nearest (no calibration): adaround's baseline
    ours-int4-adaround int4 block 32, mse scales, RTN with weights.rounding: adaround (no GPTQ)
    ours-fp16          fp16 with the defaults (inputs / outputs kept float32)
    ort-static-minmax  onnxruntime.quantization.quantize_static: QDQ, per_channel, uint8 activations,
    ort-static-pct     int8 weights, MinMax / Percentile / Entropy, after ORT's quant_pre_process
    ort-static-entropy
    ort-dynamic        quantize_dynamic, per_channel, int8 weights
    ort-int4-rtn       MatMulNBitsQuantizer, 4 bits, symmetric, block 32, RTN (MatMul weights)
    ort-int4-gptq      the same with GPTQ (ORT's bundled Intel Neural Compressor port), same calibration
    nncf-performance   nncf.quantize on the ONNX model, preset PERFORMANCE (symmetric activations; NNCF's default)
    nncf-mixed         the same, preset MIXED (asymmetric activations, symmetric weights)
    nncf-transformer   the same, model_type=nncf.ModelType.TRANSFORMER (as NNCF documents for transformers;
                       its own preset, MIXED); models with MatMul weights only
Each NNCF preset is a method of its own, so "NNCF's best preset" in a findings line is the best of
those that ran, measured, not assumed.

Peers get the shipped file upgraded to opset 13 first when it is older (per-channel QDQ needs
DequantizeLinear's ``axis``, opset 13; ORT's own quantize_static writes an unloadable file otherwise):
the row's ``notes`` say so. Ours gets the file as shipped: the pipeline upgrades what it needs.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx

BLOCK_SIZE = 32
PEER_MIN_OPSET = 13

METHODS = {
    "ours-static": "ours static int8, default options",
    "ours-static-pct": "ours static int8, percentile",
    "ours-static-minmax": "ours static int8, minmax",
    "ours-static-mse": "ours static int8, mse",
    "ours-static-adaround": "ours static int8, adaround rounding",
    "ours-static-cle": "ours static int8, cross-layer equalization",
    "ours-static-cle-hba": "ours static int8, equalization + high-bias absorption",
    "ours-static-s8": "ours static int8, int8 weight storage (u8s8)",
    "ours-static-u8": "ours static int8, uint8 + 128 weight storage (u8u8)",
    "ours-static-int-all": "ours static int8, every Conv on integer activations (min_products 0)",
    "ours-static-min256": "ours static int8, weights of 256 elements or more (min_params 256)",
    "ours-static-min0": "ours static int8, every weight (min_params 0)",
    "ours-dynamic": "ours dynamic int8",
    "ours-int4-gptq": f"ours int4 GPTQ b{BLOCK_SIZE}, mse scales",
    "ours-int4-rtn": f"ours int4 RTN b{BLOCK_SIZE}, mse scales",
    "ours-int4-adaround": f"ours int4 RTN b{BLOCK_SIZE}, mse scales, adaround rounding",
    "ours-fp16": "ours fp16",
    "ort-static-minmax": "ORT quantize_static QDQ per-channel MinMax",
    "ort-static-pct": "ORT quantize_static QDQ per-channel Percentile",
    "ort-static-entropy": "ORT quantize_static QDQ per-channel Entropy",
    "ort-dynamic": "ORT quantize_dynamic per-channel",
    "ort-int4-rtn": f"ORT MatMulNBits int4 RTN b{BLOCK_SIZE}",
    "ort-int4-gptq": f"ORT MatMulNBits int4 GPTQ b{BLOCK_SIZE}",
    "nncf-performance": "NNCF quantize, preset PERFORMANCE",
    "nncf-mixed": "NNCF quantize, preset MIXED",
    "nncf-transformer": "NNCF quantize, model_type TRANSFORMER",
}
MATMUL_ONLY = {"ours-int4-gptq", "ours-int4-rtn", "ours-int4-adaround", "ort-int4-rtn", "ort-int4-gptq", "nncf-transformer"}


def has_matmul_weights(path: Path) -> bool:
    model = onnx.load(str(path))
    # Weights are initializers, or Constant nodes where the exporter wrote them so (paddle2onnx).
    weights = {i.name for i in model.graph.initializer}
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return any(n.op_type == "MatMul" and any(i in weights for i in n.input) for n in model.graph.node)


def _feeds(real, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    from bench.real_models import batches, input_ranks

    return list(batches(real.calibration, input_ranks(real.path), batch_size))


def _constants_to_initializers(model: onnx.ModelProto) -> int:
    """Main-graph Constant nodes holding a tensor become initializers (exact); how many moved.

    Constants read by a Cast stay nodes: they are never weights, and NNCF 3.4's nop-Cast pass
    crashes on a Cast of an initializer (it reads ``.type`` from the TensorProto)."""
    cast_inputs = {i for n in model.graph.node if n.op_type == "Cast" for i in n.input}
    moved, kept = 0, []
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None
                and node.output[0] not in cast_inputs):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return moved


def _peer_source(real, out_path: Path, notes: list[str]) -> Path:
    """The model file a peer starts from: upgraded to opset 13 when older, and with its weights
    as initializers where the exporter wrote Constant nodes (paddle2onnx does): ORT's quantizers
    and NNCF quantize initializer weights only, and a user would make this exact change first."""
    model = onnx.load(str(real.path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    changed = False
    if opset < PEER_MIN_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, PEER_MIN_OPSET)
        notes.append(f"opset {opset}->{PEER_MIN_OPSET} first")
        changed = True
    moved = _constants_to_initializers(model)
    if moved:
        notes.append(f"{moved} Constant nodes -> initializers first")
        changed = True
    if not changed:
        return real.path
    path = out_path.with_name(out_path.stem + "-source.onnx")
    onnx.save(model, str(path))
    return path


def _reader(real):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """ORT's calibration reader over the model's calibration set (deep-copyable, re-iterable)."""

        def __init__(self, feeds):
            self.feeds, self.at = feeds, 0

        def get_next(self):
            if self.at >= len(self.feeds):
                return None
            self.at += 1
            return self.feeds[self.at - 1]

        def rewind(self):
            self.at = 0

    return Reader(_feeds(real))


def compress_ort(method: str, real, out_path: Path) -> dict:
    from onnxruntime import quantization as q

    notes: list[str] = []
    source = _peer_source(real, out_path, notes)
    if method.startswith("ort-static"):
        prepared = out_path.with_name(out_path.stem + "-pre.onnx")
        # ORT's recommended pre-processing; where its symbolic shape inference gives up (it does on
        # paddle2onnx exports), retried without it, as ORT's message suggests; else the raw model.
        for skip_symbolic in (False, True):
            try:
                q.shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=skip_symbolic)
            except Exception as error:
                notes.append(f"quant_pre_process{' (no symbolic shapes)' if skip_symbolic else ''} failed: "
                             f"{str(error)[:80] or type(error).__name__}")
                continue
            source = prepared
            break
        calibrate = {"ort-static-minmax": q.CalibrationMethod.MinMax, "ort-static-pct": q.CalibrationMethod.Percentile,
                     "ort-static-entropy": q.CalibrationMethod.Entropy}[method]
        q.quantize_static(str(source), str(out_path), _reader(real), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=calibrate)
    elif method == "ort-dynamic":
        q.quantize_dynamic(str(source), str(out_path), per_channel=True, weight_type=q.QuantType.QInt8)
    elif method in ("ort-int4-rtn", "ort-int4-gptq"):
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        if method == "ort-int4-rtn":
            config = nbits.DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, bits=4)
        else:
            config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(real))
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=BLOCK_SIZE,
                                               is_symmetric=True, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out_path))
    else:
        raise ValueError(method)
    return {"notes": notes}


def compress_nncf(method: str, real, out_path: Path) -> dict:
    import nncf

    notes: list[str] = []
    source = _peer_source(real, out_path, notes)
    feeds = _feeds(real)
    options = {"nncf-performance": {"preset": nncf.QuantizationPreset.PERFORMANCE},
               "nncf-mixed": {"preset": nncf.QuantizationPreset.MIXED},
               "nncf-transformer": {"model_type": nncf.ModelType.TRANSFORMER}}[method]
    quantized = nncf.quantize(onnx.load(str(source)), nncf.Dataset(feeds), subset_size=len(feeds) * 8, **options)
    onnx.save(quantized, str(out_path))
    return {"notes": notes}


def _recipe(method: str) -> dict:
    if method == "ours-static":
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {}}
    elif method in ("ours-static-pct", "ours-static-minmax", "ours-static-mse"):
        calibration = {"ours-static-pct": "percentile", "ours-static-minmax": "minmax", "ours-static-mse": "mse"}[method]
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": calibration}}
    elif method in ("ours-static-s8", "ours-static-u8"):
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {},
                "integer_weights": "int8" if method == "ours-static-s8" else "uint8"}
    elif method == "ours-static-int-all":
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {}, "min_products": 0}
    elif method in ("ours-static-min256", "ours-static-min0"):
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {},
                "min_params": 256 if method == "ours-static-min256" else 0}
    elif method == "ours-static-adaround":
        step = {"op": "quantize", "weights": {"bits": 8, "rounding": "adaround"}, "activations": {}}
    elif method in ("ours-static-cle", "ours-static-cle-hba"):
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {}, "equalize": True,
                "high_bias_absorption": method == "ours-static-cle-hba"}
    elif method in ("ours-int4-rtn", "ours-int4-adaround"):
        rounding = "adaround" if method == "ours-int4-adaround" else "nearest"
        step = {"op": "quantize", "weights": {"bits": 4, "granularity": "block", "block_size": BLOCK_SIZE,
                                            "scale_search": "mse", "rounding": rounding}}
    elif method == "ours-dynamic":
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}}
    elif method == "ours-int4-gptq":
        step = {"op": "quantize", "weights": {"bits": 4, "granularity": "block", "block_size": BLOCK_SIZE,
                                            "scale_search": "mse"}, "method": "gptq"}
    elif method == "ours-fp16":
        step = {"op": "fp16"}
    else:
        raise ValueError(method)
    return {"steps": [step]}


def compress_ours(method: str, real, out_path: Path) -> dict:
    """The pipeline's run, as `featherweight compress` calls it, with the report's extras trimmed.
    Its ``compress_seconds``: from here (the pipeline's imports included, as ORT's figure includes
    importing its quantizer) to model.onnx written, the report not counted."""
    parse_started, parse_started_cpu = time.perf_counter(), time.process_time()
    from core.recipe import parse_recipe
    from worker.pipeline import artifacts
    from worker.pipeline.runner import run

    recipe = parse_recipe(_recipe(method))
    workdir = out_path.with_name(out_path.stem + "-work")
    if workdir.exists():
        shutil.rmtree(workdir)
    # The report's own measurements (latency, per-layer errors) are trimmed: this bench measures.
    options = {"latency_runs": 3, "latency_budget_s": 2, "layer_errors": False, "fidelity_samples": 32}
    calibration = {k: v for k, v in real.calibration.items() if k != "_labels"}
    started, started_cpu = time.perf_counter(), time.process_time()
    result = run(real.path, recipe, calibration=calibration, workdir=workdir, options=options)
    shutil.move(str(workdir / artifacts.MODEL_FILE), str(out_path))
    data = workdir / artifacts.MODEL_DATA_FILE
    if data.exists():
        shutil.move(str(data), artifacts.external_data_file(str(out_path)))
    cost = result.report["cost"]
    # the span ORT's figure covers: imports and the recipe above, then the pipeline up to model.onnx written
    before, before_cpu = started - parse_started, started_cpu - parse_started_cpu
    return {"notes": [], "compress_seconds": before + cost["compress_seconds"],
            "compress_cpu_seconds": before_cpu + cost["compress_cpu_seconds"]}


def compress(method: str, real, out_path: Path) -> dict:
    if method.startswith("ours-"):
        return compress_ours(method, real, out_path)
    if method.startswith("ort-"):
        return compress_ort(method, real, out_path)
    if method.startswith("nncf-"):
        return compress_nncf(method, real, out_path)
    print(f"unknown method {method}", file=sys.stderr)
    raise ValueError(method)
