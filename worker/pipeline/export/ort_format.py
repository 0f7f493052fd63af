"""``ort``: ONNX Runtime's ORT format (a flat buffer ONNX Runtime Mobile and minimal builds load
without protobuf) and the reduced-build operator config that names every operator, opset and
type the model needs (``build.py --include_ops_by_config`` builds a runtime with just those).

The graph is optimized once, at conversion ("fixed" style, as ``python -m
onnxruntime.tools.convert_onnx_models_to_ort`` does by default), never with the NCHWc layout
transformer: its blocked-layout kernels exist only on x86, and an ORT file is meant to run on
phones too. The full level's constant folding can dequantize weights into float initializers (a
file four times the size, the compression silently undone), so three settings are converted and
the smallest file kept (``CANDIDATES``; the report names the choice and every size). On ``cpu-arm`` QDQ pairs may become signed int8 kernels
(``session.qdqisint8allowed``), as the converter does for ARM.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from worker.pipeline import artifacts
from worker.pipeline.export.context import ExportContext
from worker.pipeline.export.runtime import Runner

FILES = artifacts.EXPORT_FILES["ort"]
RUNTIME = f"onnxruntime {ort.__version__}"
DISABLED_OPTIMIZERS = ["NchwcTransformer"]


# (name, level, optimizers left out): ONNX Runtime's constant folding turns a weight's dequantize
# form (int8 -> Cast -> Mul, an fp16 weight's Cast to float) into a float initializer, which would
# undo the compression in the file; the full level also inserts float casts around fp16 ops
CANDIDATES = (
    ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ["NchwcTransformer"]),
    ("all without constant folding", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ["NchwcTransformer", "ConstantFolding"]),
    ("basic without constant folding", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ["NchwcTransformer", "ConstantFolding"]),
)


def _write(source: Path, target: Path, level: ort.GraphOptimizationLevel, disabled: list[str], int8_qdq: bool) -> int:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.add_session_config_entry("session.qdqisint8allowed", "1" if int8_qdq else "0")
    # building the session is the conversion: it optimizes and writes optimized_model_filepath
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    if not target.is_file():
        raise RuntimeError("ONNX Runtime wrote no ORT file")
    return target.stat().st_size


# tensor types the ORT format of this ONNX Runtime cannot hold: it writes the file, then refuses to
# load it ("Unsupported tensor data type"); its operator-config tool fails on them first (KeyError 22)
_NOT_IN_ORT_FORMAT = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4"}
for _name in ("INT2", "UINT2"):     # int2 / sign weights: the ONNX release may or may not name them
    if hasattr(onnx.TensorProto, _name):
        _NOT_IN_ORT_FORMAT[getattr(onnx.TensorProto, _name)] = _name.lower()


def _unsupported_types(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return sorted({_NOT_IN_ORT_FORMAT[t.data_type] for t in model.graph.initializer if t.data_type in _NOT_IN_ORT_FORMAT})


def convert(ctx: ExportContext) -> dict:
    """Write ``model.ort`` (the smallest of ``CANDIDATES``: the one that kept the compression) and
    its operator config; return the converter's choices."""
    unsupported = _unsupported_types(ctx.model_path)
    if unsupported:
        raise RuntimeError(f"{RUNTIME}'s ORT format holds no {' / '.join(unsupported)} tensors (this model's "
                           "sub-byte weights): use the .onnx file, or 8-bit weights for an ORT-format build")
    from onnxruntime.tools.ort_format_model import create_config_from_models

    target = ctx.workdir / FILES[0]
    int8_qdq = ctx.target == "cpu-arm"
    sizes: dict[str, int] = {}
    best: tuple[int, str] | None = None
    for name, level, disabled in CANDIDATES:
        candidate = ctx.workdir / f".{name.replace(' ', '_')}.ort"
        sizes[name] = _write(ctx.model_path, candidate, level, disabled, int8_qdq)
        if best is None or sizes[name] < best[0]:
            if best is not None:
                (ctx.workdir / f".{best[1].replace(' ', '_')}.ort").unlink(missing_ok=True)
            best = (sizes[name], name)
        else:
            candidate.unlink()
    assert best is not None
    (ctx.workdir / f".{best[1].replace(' ', '_')}.ort").replace(target)
    config = ctx.workdir / FILES[1]
    create_config_from_models([target], config, enable_type_reduction=True)
    # the generated header names the model by its path on this worker: name the artifact instead
    lines = config.read_text().splitlines()
    config.write_text("\n".join(f"# - {FILES[0]}" if line.startswith("# - ") else line for line in lines) + "\n")
    return {"converter": RUNTIME, "optimization": f"{best[1]} (fixed at conversion; never NchwcTransformer)",
            "candidate_bytes": sizes, "qdq_int8_kernels": int8_qdq, "operator_config": "with type reduction"}


def required_operators(config: Path) -> list[str]:
    """``domain;opset;Op,Op`` lines of an operator config, as ``domain:opset:Op`` entries."""
    entries = []
    for line in config.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        domain, opset, ops = line.split(";", 2)
        for op in ops.split(","):
            entries.append(f"{domain}:{opset}:{op.split('{')[0]}")
    return entries


def load(path: Path) -> ort.InferenceSession:
    """A session on the ORT-format file itself (not the ONNX it came from)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.load_model_format", "ORT")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(ctx: ExportContext) -> Runner | ort.InferenceSession:
    return load(ctx.workdir / FILES[0])
