"""report.json (docs/report.md defines each field): the numbers a run is judged by, built from the saved models.

``build_report`` measures the original and compressed files side by side (``metrics``) and lists the
steps and layers. Every float it writes is finite or null, so the report is plain JSON.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from worker.pipeline import data as data_mod
from worker.pipeline import file_names, graph, host, metrics, sessions
from worker.pipeline.data import Dataset
from worker.pipeline.step import LayerRecord


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, inf / NaN to null, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist()) if value.size <= 64 else None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Path):
        return str(value)
    return value


json_safe = _clean


def _structure(path: Path) -> onnx.ModelProto:
    """The model without its external data (those tensors are read one at a time when needed)."""
    return onnx.load(str(path), load_external_data=False)


def _model_summary(path: Path, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None
                   ) -> dict[str, Any]:
    params, nonzero = metrics.param_counts(model, path.parent)
    macs = metrics.mac_count(model, input_shapes)
    return {"bytes": metrics.file_bytes(path), "params": params, "nonzero_params": nonzero,
            "macs": macs.macs, "macs_lower_bound": macs.lower_bound}


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The main graph's initializers and Constant tensors by name: a step that lifts or folds a
    Constant (quantize, cleanup) names the weight after the Constant's output."""
    tensors = {node.output[0]: node.attribute[0].t for node in model.graph.node
               if node.op_type == "Constant" and node.output and len(node.attribute) == 1
               and node.attribute[0].type == onnx.AttributeProto.TENSOR}
    tensors.update(graph.initializers(model))
    return tensors


# a weight a step stored under a new name: fp16's float16 copy, lowrank's two factors
DERIVED_NAME = re.compile(r"^(?P<base>.+)_(?:fp16|lowrank_a|lowrank_b)(?:_\d+)?$")
CARRIED_KEYS = ("format", "granularity", "block_size", "symmetric", "storage", "weight_storage", "method", "rounding")


def _merge_derived(layers: Mapping[str, LayerRecord], shapes: Mapping[str, tuple]) -> dict[str, LayerRecord]:
    """One record per original weight: a later step's record of a derived name (``W_fp16``,
    ``W_lowrank_a``) folds into ``W``'s, which then says how the weight is stored after the recipe
    (fp16 then int4 read bits 16 under W and bits 4 under W_fp16, params null)."""
    merged = {name: record for name, record in layers.items()}
    for name, record in layers.items():
        match = DERIVED_NAME.match(name)
        if match is None or match.group("base") not in layers or name in shapes:
            continue
        base = merged[match.group("base")]
        base.bits = min(base.bits, record.bits)
        base.sparsity = max(base.sparsity, record.sparsity)
        base.extra.update({key: record.extra[key] for key in CARRIED_KEYS if key in record.extra})
        del merged[name]
    return merged


def _layer_rows(original: onnx.ModelProto, layers: Mapping[str, LayerRecord],
                errors: Mapping[str, float]) -> list[dict[str, Any]]:
    shapes = {name: tuple(t.dims) for name, t in _weights(original).items()}
    rows = []
    for name, record in _merge_derived(layers, shapes).items():
        params = int(np.prod(shapes[name])) if name in shapes else record.extra.get("params")
        row = {
            "name": name, "node": record.node, "op": record.op, "params": params,
            "bits": record.bits, "sparsity": record.sparsity, "rank": record.rank,
            "sqnr_db": record.extra.get("sqnr_db"),
        }
        if errors:
            row["output_rel_l2"] = errors.get(name)
        for key in (*CARRIED_KEYS, "pair_saturation"):
            if key in record.extra:
                row[key] = record.extra[key]
        rows.append(row)
    return rows


def _sqnr_from_models(original: onnx.ModelProto, compressed: onnx.ModelProto, layers: Mapping[str, LayerRecord],
                      original_dir: Path, compressed_dir: Path) -> None:
    """SQNR for layers whose step left the weight in float under its own name (pruning,
    clustering) and did not record one: compare the two initializers directly."""
    inits = graph.initializers(compressed)
    originals = _weights(original)
    for name, record in layers.items():
        if "sqnr_db" in record.extra or name not in inits or name not in originals:
            continue
        after = metrics.tensor_values(inits[name], compressed_dir)
        before = metrics.tensor_values(originals[name], original_dir)
        if after.shape == before.shape and after.dtype.kind == "f":
            record.extra["sqnr_db"] = metrics.sqnr_db(before, after)


def _sqnr_from_stored_integers(original: onnx.ModelProto, compressed: onnx.ModelProto,
                               layers: Mapping[str, LayerRecord], original_dir: Path, compressed_dir: Path) -> None:
    """SQNR for layers quantized to integers on a per-tensor or per-axis grid (static and dynamic
    int8 store ``<weight>_quantized``, ``_scale``, ``_zero_point``) that did not record one: the
    stored integers dequantized, ``(q - zero_point) * scale``, against the original weight."""
    inits = graph.initializers(compressed)
    originals = _weights(original)
    for name, record in layers.items():
        if "sqnr_db" in record.extra or not record.grid or record.grid.get("block_size") or name not in originals:
            continue
        stored, scale_t = inits.get(f"{name}_quantized"), inits.get(f"{name}_scale")
        if stored is None or scale_t is None:
            continue
        before = metrics.tensor_values(originals[name], original_dir)
        q = metrics.tensor_values(stored, compressed_dir).astype(np.float64)
        scale = metrics.tensor_values(scale_t, compressed_dir).astype(np.float64)
        zero_t = inits.get(f"{name}_zero_point")
        zero = metrics.tensor_values(zero_t, compressed_dir).astype(np.float64) if zero_t is not None else 0.0 * scale
        # the folded form stores a per-axis scale shaped [1, .., C, .., 1] (dequantize_form): its values, flat
        scale, zero = (v.reshape(-1) if v.ndim > 1 and v.size == max(v.shape) else v for v in (scale, zero))
        if q.shape != before.shape or before.dtype.kind != "f" or zero.shape != scale.shape:
            continue
        if scale.size > 1:
            axis = record.grid.get("axis")
            if axis is None or scale.ndim != 1 or not -before.ndim <= axis < before.ndim \
                    or before.shape[axis] != scale.size:
                continue
            shape = [1] * before.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        record.extra["sqnr_db"] = metrics.sqnr_db(before, (q - zero) * scale)


def _layer_output_pairs(original: onnx.ModelProto, compressed: onnx.ModelProto,
                        layers: Mapping[str, LayerRecord]) -> dict[str, tuple[str, str]]:
    """For each layer: its node's first output in the original and the same tensor in the
    compressed model (steps keep the consumer's output name when they rewrite a layer). Where a
    step folded what followed the layer into it (BatchNormalization, a per-channel Mul / Add:
    ``quantize.conv_fusions``), the layer now writes the folded chain's last tensor, and that is
    compared (23 of the PP-OCR recognizer's 36 layers had dropped out of the per-layer errors)."""
    outputs_o = {node.name: node.output[0] for node in original.graph.node if node.output}
    readers_o = graph.consumers(original)
    produced_c = {out for node in compressed.graph.node for out in node.output}
    pairs = {}
    for name, record in layers.items():
        tensor = outputs_o.get(record.node)
        for _ in range(FOLDED_CHAIN):
            found = readers_o.get(tensor, []) if tensor and tensor not in produced_c else []
            if len(found) != 1 or found[0][0].op_type not in ("Mul", "Add", "BatchNormalization"):
                break
            tensor = found[0][0].output[0]
        if tensor and tensor in produced_c:
            pairs[name] = (tensor, tensor)
    return pairs


FOLDED_CHAIN = 4          # nodes a fold may have merged into a layer (BatchNormalization, Mul, Add)


def build_report(*, original_path: Path, compressed_path: Path, target: str, steps: Sequence[dict[str, Any]],
                 layers: Mapping[str, LayerRecord], evaluation: Dataset | None, calibration: Dataset | None,
                 options: Mapping[str, Any] | None = None, stored_names: Mapping[str, str] | None = None
                 ) -> dict[str, Any]:
    """The report (docs/report.md) of the two model files; external-data tensors are read one at a time.
    ``stored_names``: the compressed file's short names -> the names the steps wrote (``finalize``);
    the per-layer analysis reads the file under the latter."""
    options = dict(options or {})
    original, compressed = _structure(original_path), _structure(compressed_path)
    file_names.restore(compressed, dict(stored_names or {}))
    provider = sessions.provider_for(target)
    if evaluation is not None:
        dataset, source = evaluation, "evaluation"
    elif calibration is not None:
        dataset, source = calibration, "calibration"
    else:
        dataset, source = data_mod.generated(original, count=int(options.get("generated_samples", 32))), "generated"
    feeds = next(dataset.head(1).batches(1))
    # MACs of one sample of the user's data: its shapes fill the dynamic dims (a recognizer's width).
    sample_shapes = {name: tuple(value.shape) for name, value in feeds.items()} if source != "generated" else None
    before = _model_summary(original_path, original, sample_shapes)
    after = _model_summary(compressed_path, compressed, sample_shapes)
    before.pop("nonzero_params")

    s_orig = sessions.file_session(original_path, provider)
    s_comp = sessions.file_session(compressed_path, provider)
    provider_used = s_comp.get_providers()[0]
    fid = metrics.fidelity(s_orig, s_comp, dataset, limit=int(options.get("fidelity_samples", 512)))

    lat_o, lat_c = metrics.latency([s_orig, s_comp], feeds, runs=int(options.get("latency_runs", 50)),
                                   budget_s=float(options.get("latency_budget_s", 10.0)))
    before["latency_ms"], after["latency_ms"] = lat_o, lat_c
    del s_orig, s_comp
    sessions.release_memory()

    _sqnr_from_models(original, compressed, layers, original_path.parent, compressed_path.parent)
    _sqnr_from_stored_integers(original, compressed, layers, original_path.parent, compressed_path.parent)
    errors: dict[str, float] = {}
    if layers and options.get("layer_errors", True):
        pairs = _layer_output_pairs(original, compressed, layers)
        errors = metrics.tensor_errors(original_path, compressed_path, pairs, dataset, provider=provider,
                                       scratch=compressed_path.parent / ".layer_errors",
                                       limit=int(options.get("layer_error_samples", 64)))

    report = {
        "original": before,
        "compressed": after,
        "size_ratio": before["bytes"] / after["bytes"],
        "transport_size_ratio": metrics.zstd_bytes(original_path) / metrics.zstd_bytes(compressed_path),
        "latency_ratio": lat_o["p50"] / lat_c["p50"] if lat_c["p50"] > 0 else None,
        "fidelity": {"rel_l2": fid.rel_l2, "cosine": fid.cosine, "top1_agreement": fid.top1_agreement},
        "fidelity_data": source,
        "fidelity_samples": fid.samples,
        "fidelity_outputs": fid.outputs,
        "accuracy": (None if fid.accuracy_original is None else
                     {"original": fid.accuracy_original, "compressed": fid.accuracy_compressed}),
        "target": target,
        "provider": provider_used,
        "measured_on": host.measured_on(provider_used, options),
        "target_match": host.target_match(target, provider_used),
        "target_notice": host.target_notice(target, provider_used,
                                            allowed_mismatch=bool(options.get("allow_target_mismatch"))),
        "target_mismatch_allowed": bool(options.get("allow_target_mismatch")),
        "steps": list(steps),
        "layers": _layer_rows(original, layers, errors),
    }
    return _clean(report)


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def write_report_html(report: Mapping[str, Any], path: str | Path, *, title: str) -> Path:
    """report.html beside report.json: the same figures, one self-contained page."""
    from worker.pipeline.report_html import render_html
    from worker.pipeline.report_search_html import sections

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(render_html(dict(report), title=title, extra=sections(dict(report))), encoding="utf-8")
    tmp.replace(path)
    return path
