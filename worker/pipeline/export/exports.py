"""Convert the compressed model to each format the recipe's ``export`` lists, and judge each.

For every format, in the recipe's order: convert (the format's module writes its ``FILES`` into the
workdir), load the main file in the format's own runtime, and measure on the report's data (the
evaluation set, else the calibration set, else generated inputs):

- ``agreement``: its outputs against the compressed ONNX model's, run by ONNX Runtime (what the
  conversion itself changed: ``rel_l2``, ``cosine``, ``top1_agreement`` as in docs/report.md), fed
  the same way (one sample per call where the format takes one);
- ``fidelity``: the same against the original model's, beside the report's own ``fidelity``, and
  ``accuracy`` against ``_labels`` where the data has them;
- ``latency_ms``: p50 / p95 of one sample on this worker, in the format's runtime;
- ``bytes`` and ``size_ratio`` (original ONNX bytes / this format's model file), each file's sha256.

A conversion that raises, or whose ``agreement`` falls below the recipe's ``export_min_cosine``
or, on a classifier (``classifier_evidence``), ``export_min_top1_agreement``, fails that format alone: ``state: failed`` with its ``reason``,
its files deleted (so no artifact is stored for it); model.onnx and the other formats stand.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import onnx

from worker.pipeline import data as data_mod
from worker.pipeline import metrics, sessions
from worker.pipeline.data import Dataset
from worker.pipeline.export.context import ExportContext
from worker.pipeline.export.runtime import Runner

FIDELITY_SAMPLES = 512     # samples each format is measured on: as many as the report's fidelity


def format_module(fmt: str) -> ModuleType:
    """The closed registry: format name -> its module (imported on use: the heavy converters are extras)."""
    if fmt == "ort":
        from worker.pipeline.export import ort_format as module
    elif fmt == "pytorch":
        from worker.pipeline.export import torchscript as module
    elif fmt == "tflite":
        from worker.pipeline.export import tflite as module
    else:
        raise KeyError(f"no exporter for format {fmt!r}")
    return module


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _fidelity_row(fid: metrics.Fidelity) -> dict[str, Any]:
    return {"rel_l2": fid.rel_l2, "cosine": fid.cosine, "top1_agreement": fid.top1_agreement}


CLASS_SCORE_OPS = ("Softmax", "LogSoftmax")     # an output they produce is class scores by construction
TOP1_GOAL_METRICS = ("accuracy", "top1_agreement")


def classifier_evidence(ctx: ExportContext) -> str | None:
    """Why the model's outputs are class scores, or None: the top-1 bound applies only then.

    A 2-D output is not a classifier by its shape alone: a sentence embedding ``[N, 384]`` has no
    class axis, and its argmax (the largest coordinate) flips between two nearly equal coordinates
    while the vectors agree to cosine 0.999 (all-MiniLM-L6-v2's PyTorch module: top-1 0.94, cosine
    0.9991). So the job must say it: labels in the data (accuracy is measured against them), a goal
    scored by ``accuracy`` / ``top1_agreement``, or a Softmax / LogSoftmax producing an output."""
    if ctx.measure_data.labels is not None:
        return "the data has _labels"
    goal = getattr(ctx.recipe, "goal", None)
    if goal is not None and goal.metric in TOP1_GOAL_METRICS:
        return f"the goal's metric is {goal.metric}"
    model = onnx.load(str(ctx.model_path), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type in CLASS_SCORE_OPS and outputs.intersection(node.output):
            return f"an output is a {node.op_type}'s"
    return None


def _drift(recipe: Any, fid: metrics.Fidelity, classifier: bool = True) -> str | None:
    """Why the converted model drifted too far from the compressed ONNX model, or None; the top-1
    bound is checked only on a ``classifier`` (``classifier_evidence``)."""
    if not fid.cosine >= recipe.export_min_cosine:
        return (f"its outputs drift from the compressed ONNX model's: cosine {fid.cosine:.4f} < "
                f"export_min_cosine {recipe.export_min_cosine}")
    if classifier and fid.top1_agreement is not None and not fid.top1_agreement >= recipe.export_min_top1_agreement:
        return (f"its outputs drift from the compressed ONNX model's: top-1 agreement {fid.top1_agreement:.4f} < "
                f"export_min_top1_agreement {recipe.export_min_top1_agreement}")
    return None


def export_one(fmt: str, ctx: ExportContext, original_path: Path, provider: str) -> dict[str, Any]:
    """Convert and measure one format; its row of ``exports`` in the report (never raises for the format's faults)."""
    row: dict[str, Any] = {"state": "failed"}
    started = time.perf_counter()
    module = None
    try:
        module = format_module(fmt)
        row["runtime"] = module.RUNTIME
        row["converter"] = module.convert(ctx)
        runtime = module.runner(ctx)
    except Exception as exc:  # a converter's failure is this format's, reported, never the job's
        row["reason"] = f"conversion failed: {_first_line(exc)}"
        _remove(module, ctx)
        row["seconds"] = time.perf_counter() - started
        return row
    main = ctx.workdir / module.FILES[0]
    row["files"] = [{"name": name, "bytes": (ctx.workdir / name).stat().st_size, "sha256": _digest(ctx.workdir / name)}
                    for name in module.FILES if (ctx.workdir / name).is_file()]
    row["bytes"] = main.stat().st_size
    row["size_ratio"] = metrics.file_bytes(original_path) / row["bytes"] if row["bytes"] else None
    # the same samples as the report's fidelity, so the formats' figures sit beside ONNX's
    limit = int(ctx.options.get("export_fidelity_samples", ctx.options.get("fidelity_samples", FIDELITY_SAMPLES)))
    data = ctx.measure_data
    if hasattr(runtime, "batched_inputs"):
        runtime.batched_inputs = data.batchable
    try:
        compressed = _alike(sessions.file_session(ctx.model_path, provider), runtime, data.batchable)
        agreement = metrics.fidelity(compressed, runtime, data, limit=limit)
        row["agreement"] = _fidelity_row(agreement)
        original = _alike(sessions.file_session(original_path, provider), runtime, data.batchable)
        against_original = metrics.fidelity(original, runtime, data, limit=limit)
        row["fidelity"] = _fidelity_row(against_original)
        # with _labels: the format's own accuracy, beside the report's accuracy.compressed
        row["accuracy"] = against_original.accuracy_compressed
        del original
        del compressed
        sessions.release_memory()
        # measured alone: ONNX Runtime's pool threads spin after each run and would starve a
        # runtime interleaved with it (TorchScript read 100x slower that way)
        feeds = next(data.head(1).batches(1))
        row["latency_ms"] = metrics.latency([runtime], feeds, runs=int(ctx.options.get("latency_runs", 50)),
                                            budget_s=float(ctx.options.get("latency_budget_s", 10.0)))[0]
    except Exception as exc:  # the runtime refused the converted file or its outputs do not fit
        row["reason"] = f"the {fmt} runtime could not run the converted model: {_first_line(exc)}"
        _remove(module, ctx, row)
        row["seconds"] = time.perf_counter() - started
        return row
    finally:
        del runtime
        sessions.release_memory()
    evidence = classifier_evidence(ctx)
    row["top1_bound"] = f"applied: {evidence}" if evidence else \
        "not applied: nothing says the outputs are class scores (no _labels, no accuracy goal, no Softmax output)"
    reason = _drift(ctx.recipe, agreement, classifier=evidence is not None)
    if reason is not None:
        row["reason"] = reason
        _remove(module, ctx, row)
    else:
        row["state"] = "ok"
    row["seconds"] = time.perf_counter() - started
    return row


def _alike(session: Any, runtime: Any, batchable: bool) -> Any:
    """The ONNX session fed as ``runtime`` is: one sample per call where the format takes one
    (dynamic quantization finds its ranges per call, so a batch of 64 and 64 single samples differ
    in the ONNX model itself)."""
    if not getattr(runtime, "per_sample", False):
        return session
    names = [o.name for o in session.get_outputs()]
    return Runner(names, lambda feeds: dict(zip(names, session.run(names, feeds))), per_sample=True,
                  batched_inputs=batchable)


def _remove(module: ModuleType | None, ctx: ExportContext, row: dict[str, Any] | None = None) -> None:
    """Delete a failed format's files (so none is stored) and take them off its row."""
    if row is not None:
        row.pop("files", None)
    for name in getattr(module, "FILES", ()):
        (ctx.workdir / name).unlink(missing_ok=True)


def _finite(value: Any) -> Any:
    """JSON-safe: inf / NaN (a diverged conversion) become null."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_exports(ctx: ExportContext, original_path: Path, provider: str,
                progress: Callable[[str], None] = lambda stage: None) -> dict[str, dict[str, Any]]:
    """``exports`` of the report: one row per format the recipe lists besides onnx."""
    rows: dict[str, dict[str, Any]] = {}
    for fmt in ctx.recipe.extra_formats():
        progress(f"exporting {fmt}")
        rows[fmt] = _finite(export_one(fmt, ctx, original_path, provider))
    return rows


def measure_data(source: str, evaluation: Dataset | None, calibration: Dataset | None, original_path: Path,
                 generated_samples: int) -> Dataset:
    """The data the report's ``fidelity`` used (its ``fidelity_data``), for the formats to be measured on too."""
    if source == "evaluation" and evaluation is not None:
        return evaluation
    if source == "calibration" and calibration is not None:
        return calibration
    return data_mod.generated(onnx.load(str(original_path), load_external_data=False), count=generated_samples)
