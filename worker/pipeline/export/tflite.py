"""``tflite``: a LiteRT flat buffer (``model.tflite``), run by ``ai-edge-litert``'s interpreter.

Needs the optional extra ``featherweight[tflite]`` (onnx2tf, TensorFlow, ai-edge-litert); without it
a recipe asking for the format is refused before any work (``core.exports``).

The compressed model is first made a plain float graph (``float_graph``: quantized weights as the
float values of their grid, activation quantize pairs as the Clip to their range), then converted
in a separate process (``tflite_convert``) with the quantization the recipe chose, so the
compression survives the conversion instead of being dequantized away:

- activations quantized with calibration (static int8) -> full-integer int8, calibrated on the
  job's calibration samples (the same data the ONNX model's ranges came from);
- dynamic int8 or weight-only quantization -> dynamic-range int8 (int8 weights per channel; a
  4- or 2-bit weight is stored in 8 bits: LiteRT has no narrower weight type);
- fp16 -> float16 weights; nothing quantized -> float32 (pruned zeros stay zeros, stored dense).

The file takes one sample per call, with the shapes of the measure data's first sample, in ONNX's
layout (``_layouts``). The report names the converter's versions, its mode
and the bytes of the float32 file of the same graph (``float32_bytes``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from worker.pipeline import artifacts, graph
from worker.pipeline.export import tflite_rewrites
from worker.pipeline.export.context import ExportContext
from worker.pipeline.export.float_graph import float_graph
from worker.pipeline.export.inline_if import inline_constant_ifs
from worker.pipeline.export.runtime import Runner

FILES = artifacts.EXPORT_FILES["tflite"]
RUNTIME = "ai-edge-litert"
SCRATCH = ".tflite"
CALIBRATION_SAMPLES = 256
DEFAULT_TIMEOUT_S = 900

MODES = {"static": "int8", "dynamic": "dynamic", "weights": "dynamic", "fp16": "fp16", "float": "float32"}
DESCRIPTIONS = {
    "int8": "full-integer int8: int8 weights per channel, int8 activations calibrated on the calibration data, "
            "float32 inputs and outputs",
    "dynamic": "dynamic-range int8: int8 weights per channel, activations quantized at run time",
    "fp16": "float16 weights",
    "float32": "float32",
}


def _io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits], [v.name for v in model.graph.output]


def _per_call_samples(dataset, limit: int) -> dict[str, np.ndarray]:
    """Up to ``limit`` feeds of one sample each (what the file takes per call), stacked on a new
    first axis: ``arrays[name][i]`` is the i-th call's input."""
    parts: dict[str, list[np.ndarray]] = {}
    for feeds in dataset.batches(1, limit):
        for name, value in feeds.items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.stack(values) for name, values in parts.items()}


def bool_expands_as_integers(model: onnx.ModelProto) -> int:
    """``Expand`` of a bool tensor becomes ``Cast(Expand(Cast(x -> int32)) -> bool)``, the same
    values: onnx2tf expands by multiplying with ones, which TensorFlow refuses for bool (a
    transformers BERT export builds its attention mask that way: all-MiniLM-L6-v2 failed with
    "Value passed to parameter 'x' has DataType bool"). Returns how many were rewritten."""
    try:
        types = {v.name: v.type.tensor_type.elem_type
                 for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    except Exception:       # without types nothing is known to be bool: nothing to rewrite
        return 0
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    rewritten: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        if node.op_type != "Expand" or types.get(node.input[0]) != onnx.TensorProto.BOOL:
            rewritten.append(node)
            continue
        wide, expanded = graph.unique_name(model, f"{node.input[0]}_as_int32"), graph.unique_name(model, f"{node.output[0]}_int32")
        rewritten += [onnx.helper.make_node("Cast", [node.input[0]], [wide], to=onnx.TensorProto.INT32,
                                            name=graph.unique_name(model, f"{node.name}_widen")),
                      onnx.helper.make_node("Expand", [wide, node.input[1]], [expanded],
                                            name=graph.unique_name(model, f"{node.name}_int32")),
                      onnx.helper.make_node("Cast", [expanded], [node.output[0]], to=onnx.TensorProto.BOOL,
                                            name=graph.unique_name(model, f"{node.name}_narrow"))]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    return count


TF_SCOPE_NAME = re.compile(r"[^A-Za-z0-9_./>-]")      # what TensorFlow refuses in a scope name


def fixed_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """The inputs' dims written as the one sample's, and the intermediate shapes dropped (onnx2tf
    infers them again from there). onnx2tf reads the graph's own input dims before its
    ``overwrite_input_shape`` applies: paddle2onnx writes -1 for the batch, which TensorFlow
    refuses ("Dimension -1 must be >= 0": the PP-OCR orientation classifier failed on it)."""
    for value in model.graph.input:
        if value.name not in shapes or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name]):
            dim.Clear()
            dim.dim_value = size
    for value in model.graph.output:      # a -1 there is no size either: left for inference
        for dim in value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else ():
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
    del model.graph.value_info[:]


def scope_safe_node_names(model: onnx.ModelProto) -> int:
    """Node names TensorFlow takes as scope names (onnx2tf names its layers after the nodes):
    other characters become ``_`` ("'Softmax@0' is not a valid scope name", paddle2onnx's naming).
    Names only: the graph computes the same. Returns how many were renamed."""
    taken = {node.name for node in model.graph.node}
    renamed = 0
    for node in model.graph.node:
        if not TF_SCOPE_NAME.search(node.name):
            continue
        node.name = graph.fresh_name(TF_SCOPE_NAME.sub("_", node.name) or node.op_type, taken)
        renamed += 1
    return renamed


def pre_rewrites(model: onnx.ModelProto, sample: dict[str, np.ndarray] | None = None) -> dict[str, int]:
    """The graph made into ops onnx2tf converts right, each rewrite computing the same values in
    float for inputs of ``sample``'s shapes; in place. Returns each rewrite's count (the report's
    ``converter.rewrites``)."""
    folded = tflite_rewrites.shape_computations_folded(model, sample) if sample is not None else 0
    types, ranks = _types_and_ranks(model)
    return {"shape_computations_folded": folded,
            "bool_wheres_as_arithmetic": tflite_rewrites.bool_wheres_as_arithmetic(model, types, ranks),
            "bool_expands_as_integers": bool_expands_as_integers(model),
            "erf_gelus_as_gelu": tflite_rewrites.erf_gelus_as_gelu(model),
            "constant_first_adds_swapped": tflite_rewrites.constant_first_adds_swapped(model),
            "scope_safe_node_names": scope_safe_node_names(model)}


def _types_and_ranks(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element type and rank of every value ONNX's shape inference knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:       # nothing known: the rewrites that need types find nothing to do
        return {}, {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    return types, ranks


def convert(ctx: ExportContext) -> dict:
    model = graph.load_model(ctx.model_path)
    sample = next(ctx.measure_data.head(1).batches(1))
    inlined = inline_constant_ifs(model, sample)
    plain, folded = float_graph(model)
    rewrites = pre_rewrites(plain, sample)
    inputs, _ = _io(plain)
    del model
    work = ctx.workdir / SCRATCH
    work.mkdir(exist_ok=True)
    try:
        shapes = {name: [int(d) for d in np.shape(sample[name])] for name in inputs}
        fixed_input_shapes(plain, shapes)
        onnx.save_model(plain, str(work / "float.onnx"))
        mode = MODES[ctx.quantization()]
        job = {"float_onnx": str(work / "float.onnx"), "folder": str(work), "output": str(ctx.workdir / FILES[0]),
               "mode": mode, "shapes": shapes, **_layouts(plain, inputs, shapes)}
        if mode == "int8":
            data = ctx.calibration if ctx.calibration is not None else ctx.measure_data
            np.savez(work / "calibration.npz", **_per_call_samples(data, CALIBRATION_SAMPLES))
            job["calibration"] = str(work / "calibration.npz")
        (work / "job.json").write_text(json.dumps(job))
        done = subprocess.run([sys.executable, "-m", "worker.pipeline.export.tflite_convert", str(work / "job.json")],
                              capture_output=True, text=True, cwd=os.getcwd(),
                              timeout=float(ctx.options.get("export_timeout_s", DEFAULT_TIMEOUT_S)),
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0 or not (ctx.workdir / FILES[0]).is_file():
            crashed = f"the converter crashed (signal {-done.returncode})" if done.returncode < 0 else ""
            raise RuntimeError(crashed or _last_error(done.stderr) or f"the converter exited with status {done.returncode}")
        versions = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return {"converter": f"onnx2tf {versions['onnx2tf']} + TensorFlow {versions['tensorflow']} LiteRT converter",
            "mode": mode, "quantization": DESCRIPTIONS[mode], "input_shapes": shapes,
            "float32_bytes": versions.get("float32_bytes"), "ifs_inlined": inlined, "rewrites": rewrites, **folded}


SPATIAL_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
               "BatchNormalization", "InstanceNormalization", "Resize", "DepthToSpace", "SpaceToDepth"}


# ops a channel-first tensor passes through on its way to a spatial op, keeping its axes' meaning
LAYOUT_KEEPING_OPS = {"Cast", "Identity", "Pad", "Relu", "Clip", "Add", "Sub", "Mul", "Div", "Abs", "Neg", "Sqrt",
                      "Pow", "Exp", "Log", "QuantizeLinear", "DequantizeLinear"}


def _feeds_spatial_op(model: onnx.ModelProto, name: str) -> bool:
    """Whether ``name`` reaches a ``SPATIAL_OPS`` node through layout-keeping ops only (an image
    into its first Conv), not through a Slice, Gather or LSTM (a recurrent state beside the audio)."""
    readers = graph.consumers(model)
    stack, seen = [name], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for node, _ in readers.get(current, []):
            if node.op_type in SPATIAL_OPS:
                return True
            if node.op_type in LAYOUT_KEEPING_OPS:
                stack.extend(out for out in node.output if out)
    return False


def _layouts(model: onnx.ModelProto, inputs: list[str], shapes: dict[str, list[int]]) -> dict[str, list[str]]:
    """How onnx2tf must read each input of rank 3 to 5 so that the file takes ONNX's arrays as they
    are: channel-first (``keep_ncw``: an image or a signal a Conv reads; onnx2tf goes NHWC inside
    and transposes once at the input) where it feeds a spatial op (``_feeds_spatial_op``), else
    exactly as given (``keep_as_is``: a sequence of embeddings ``[batch, seq, d]`` or an LSTM state
    ``[2, batch, hidden]``, which have no channel axis to move; read as channel-first, onnx2tf
    mis-shapes the residual Adds, and silero-vad's LSTM refused its state as (128, 1))."""
    ranked = [name for name in inputs if 3 <= len(shapes[name]) <= 5]
    spatial = {name for name in ranked if _feeds_spatial_op(model, name)}
    return {"keep_ncw": [name for name in ranked if name in spatial],
            "keep_as_is": [name for name in ranked if name not in spatial]}


ABSL_LOG_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d|^WARNING: All log messages")   # TensorFlow's own logging
MISSING_OP = re.compile(r"No module named 'onnx2tf\.ops\.(\w+)'")


def _last_error(stderr: str) -> str:
    """The converter's own message: the last line that reads like an error, TensorFlow's log lines
    left out (a crash after "Could not find cuda drivers" read as that line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not ABSL_LOG_LINE.match(line.strip())]
    missing = next((MISSING_OP.search(line) for line in reversed(lines) if MISSING_OP.search(line)), None)
    if missing:         # onnx2tf imports one module per ONNX op: a missing one is an op it does not translate
        return f"onnx2tf has no translation for {missing.group(1)}"
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line[:500]
    return lines[-1][:500] if lines else ""


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def _match_inputs(details: list[dict], names: list[str]) -> list[tuple[str, dict]]:
    """Each ONNX input with its LiteRT tensor: by name (``serving_default_x:0`` for ``x``), else in order."""
    def bare(name: str) -> str:
        return name.removeprefix("serving_default_").split(":")[0]

    by_name = {bare(d["name"]): d for d in details}
    if all(name in by_name for name in names):
        return [(name, by_name[name]) for name in names]
    return list(zip(names, details))


def ordered_outputs(interpreter) -> list[dict]:
    """The output tensors in the ONNX model's order: onnx2tf's signature names them ``output_<i>``
    after the ONNX output's index, while the interpreter lists them in its own order (silero-vad's
    ``stateN`` came first)."""
    details = interpreter.get_output_details()
    try:
        signature = interpreter._get_full_signature_list()["serving_default"]["outputs"]
    except (AttributeError, KeyError):      # no signature: the interpreter's order is all there is
        return details
    by_index = {detail["index"]: detail for detail in details}
    numbered = {int(name.rsplit("_", 1)[1]): index for name, index in signature.items()
                if name.rsplit("_", 1)[-1].isdigit() and index in by_index}
    if sorted(numbered) != list(range(len(details))):
        return details
    return [by_index[numbered[position]] for position in range(len(details))]


def runner(ctx: ExportContext) -> Runner:
    """The saved flat buffer in LiteRT's interpreter, one sample per call."""
    interpreter = _interpreter(ctx.workdir / FILES[0])
    inputs, outputs = _io(onnx.load(str(ctx.model_path), load_external_data=False))
    matched = _match_inputs(interpreter.get_input_details(), inputs)
    output_details = ordered_outputs(interpreter)
    if len(output_details) != len(outputs):
        raise ValueError(f"the LiteRT model has {len(output_details)} outputs; the ONNX model {len(outputs)}")

    def call(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, detail in matched:
            interpreter.set_tensor(detail["index"], np.asarray(feeds[name], dtype=detail["dtype"]).reshape(detail["shape"]))
        interpreter.invoke()
        return {name: interpreter.get_tensor(detail["index"]).copy() for name, detail in zip(outputs, output_details)}

    return Runner(outputs, call, per_sample=True)
