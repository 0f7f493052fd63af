"""The pipeline as a pure library: one model, one recipe, optional data -> a compressed model and
its report (docs/report.md). No HTTP, no database, no Celery: the worker task and
``featherweight compress`` both call ``run``.

Order of work:
1. Check everything before any work: the target, the model loads, calibration present where the
   recipe needs it (``RecipeError`` at ``steps.<i>.method`` ...), the data sets fit the model's
   inputs (``InvalidInput`` at ``["calibration", "<array>"]``), every step module exists and, where
   the module has a ``check(model, params, ctx)`` hook, accepts its params on this model (a
   ``RecipeError`` it raises gets ``["steps", i]`` put in front of its field path).
2. Run the steps in order through the closed registry, reporting overall progress with the stage
   ``"step 2/3: quantize"`` and checking ``cancelled`` between steps (``StepCancelled``).
   Before a quantize / prune step, per-layer sensitivity where the recipe asks for it or the
   step's ``max_output_error`` needs it (``sensitivity``). With a ``goal``, the quantize step is
   not run as written: after the other steps the goal search (``search.engine``) picks the model.
3. Put the result in its output format (``finalize``: dequantize form, sparse storage, the
   initializers' order).
4. Check the result (``onnx.checker.check_model(full_check=True)``; inputs and outputs with the
   original's names, dtypes and shapes), write ``workdir/model.onnx`` and ``workdir/report.json``.
5. Convert to each format the recipe's ``export`` lists besides onnx (``worker.pipeline.export``),
   beside model.onnx, each measured in its own runtime (``report["exports"]``); a format that
   fails is reported and leaves no file, the run still succeeds. A format whose optional extra is
   not installed is refused in step 1 (``RecipeError`` at ``export.<i>``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from core.errors import FeatherweightError, InvalidInput, InvalidModel, PipelineError, RecipeError
from core.exports import check_formats
from core.recipe import Recipe
from core.targets import Target
from worker.pipeline import data as data_mod
from worker.pipeline import artifacts, cost, file_names, graph, host, registry, sensitivity, sessions
from worker.pipeline.finalize import finalize
from worker.pipeline.report import build_report, json_safe, write_report, write_report_html
from worker.pipeline.search import engine as goal_search
from worker.pipeline.step import StepCancelled, StepContext

WEIGHT_STEPS = ("prune", "lowrank", "cluster", "quantize")    # the steps that choose weights by layout

STEPS_SHARE = 0.8          # fraction of the progress bar the steps take; checks and report the rest


@dataclass
class PipelineResult:
    model_path: Path
    report: dict


def _no_progress(fraction: float, stage: str) -> None:
    return None


def _never() -> bool:
    return False


def _path(dotted: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in dotted.split(".")]


def _refuse_non_tensor_io(model: onnx.ModelProto) -> None:
    """A model input or output that is a sequence, map or optional (a SequenceConstruct given out)
    cannot be fed from an .npz or compared element by element: refused up front, naming it (every
    recipe failed with a traceback after its work)."""
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                which = (value.type.WhichOneof("value") or "untyped").replace("_type", "")
                why = f"a {which}, not a tensor: only tensor inputs and outputs can be fed and compared"
                raise InvalidModel(f"the model's {kind[:-1]} {value.name!r} is {why}",
                                   [{"loc": ["model", kind, value.name], "msg": why}])


def _bind(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray] | None, field: str) -> data_mod.Dataset | None:
    if arrays is None:
        return None
    try:
        dataset = data_mod.bind(model, arrays)
    except data_mod.DataError as exc:
        raise InvalidInput(f"{field}: {exc}", [{"loc": [field, *exc.path], "msg": str(exc)}]) from None
    if dataset.size == 0:
        raise InvalidInput(f"{field}: the data set holds no samples", [{"loc": [field], "msg": "no samples"}])
    return dataset


def _arrays(dataset: data_mod.Dataset | None) -> dict[str, np.ndarray] | None:
    """The bound (dtype-converted) arrays, with ``_labels`` kept, for the steps' context."""
    if dataset is None:
        return None
    arrays = dict(dataset.arrays)
    if dataset.labels is not None:
        arrays[data_mod.LABELS] = dataset.labels
    return arrays


def io_signature(model: onnx.ModelProto) -> tuple[list[tuple], list[tuple]]:
    """(inputs, outputs) as (name, elem_type, dims) with dims as ints or dim_param names."""
    inits = {t.name for t in model.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> tuple:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        return value.name, tensor_type.elem_type, dims

    inputs = [describe(v) for v in model.graph.input if v.name not in inits]
    outputs = [describe(v) for v in model.graph.output]
    return inputs, outputs


def check_result(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    """The output contract: a valid model with the original's inputs and outputs (PipelineError)."""
    before, after = io_signature(original), io_signature(compressed)
    for kind, want, got in (("inputs", before[0], after[0]), ("outputs", before[1], after[1])):
        if want != got:
            raise PipelineError(f"the compressed model's {kind} differ from the original's: {got} != {want}")
    if compressed.ByteSize() < graph.EXTERNAL_DATA_THRESHOLD:
        try:
            onnx.checker.check_model(compressed, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise PipelineError(f"the compressed model is not valid ONNX: {str(exc).splitlines()[0]}") from exc


def _check_file(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PipelineError(f"the compressed model is not valid ONNX: {str(exc).splitlines()[0]}") from exc


def _exports(recipe: Recipe, original_path: Path, compressed_path: Path, report: dict, target: str,
             evaluation: data_mod.Dataset | None, calibration: data_mod.Dataset | None, options: dict,
             progress: Callable[[float, str], None]) -> dict:
    """The report's ``exports``: each format the recipe lists, converted beside model.onnx and measured."""
    from worker.pipeline.export.context import ExportContext
    from worker.pipeline.export.exports import measure_data, run_exports

    data = measure_data(report.get("fidelity_data", ""), evaluation, calibration, original_path,
                        int(options.get("generated_samples", 32)))
    ctx = ExportContext(model_path=compressed_path, workdir=compressed_path.parent, recipe=recipe, target=target,
                        calibration=calibration, measure_data=data, options=options)
    return run_exports(ctx, original_path, sessions.provider_for(target),
                       progress=lambda stage: progress(STEPS_SHARE + 0.1, stage))


def _if_quantized_already(exc: RecipeError, model: onnx.ModelProto, step: Any) -> RecipeError:
    """A refusal for selecting no weight, on a model quantized before it came, says that is why."""
    selecting = [e for e in exc.errors if list(e.get("loc", []))[-1:] in (["include"], ["exclude"], ["min_params"])]
    stored = graph.integer_weights(model, getattr(step, "min_params", 0)) if selecting else []
    if not stored:
        return exc
    hint = (f"; the model's weights are integers already ({len(stored)} behind quantized ops, {stored[0]} first): "
            "compress the float model it was quantized from")
    errors = [{**e, "msg": e.get("msg", "") + hint} if e is selecting[0] else e for e in exc.errors]
    return RecipeError(exc.detail + hint, errors)


STORING_STEPS = ("quantize", "cluster")       # steps after which a weight is no longer a float initializer


def _earlier_storing(earlier: Sequence[Any]) -> str | None:
    found = [f"steps.{i} ({step.op})" for i, step in enumerate(earlier) if step.op in STORING_STEPS]
    return ", ".join(found) if found else None


def _after_earlier_steps(exc: RecipeError, earlier: Sequence[Any]) -> RecipeError:
    """A refusal for selecting no weight, after a quantize or cluster step of the same recipe, says
    that step already stores them (cluster then static int8 read 'no weight has 1024 or more
    elements', of a model with four)."""
    selecting = [e for e in exc.errors if list(e.get("loc", []))[-1:] in (["include"], ["exclude"], ["min_params"])]
    storing = _earlier_storing(earlier)
    if not selecting or storing is None:
        return exc
    hint = (f"; {storing} already stores the weights it selected as integers or a codebook: "
            "each weight is compressed by one quantize or cluster step")
    errors = [{**e, "msg": e.get("msg", "") + hint} if e is selecting[0] else e for e in exc.errors]
    return RecipeError(exc.detail + hint, errors)


def _refuse_if_nothing_left(step: Any, index: int, result: Any, earlier: Sequence[Any]) -> None:
    """A quantize or cluster step that changed no weight because an earlier one of the recipe took
    them all is refused rather than reported as done (static int8 then int4 wrote 'quantized: 0')."""
    storing = _earlier_storing(earlier)
    if step.op not in STORING_STEPS or result.changed or storing is None:
        return
    why = (f"{step.op} found no float weight left: {storing} already stores the weights it selects "
           "as integers or a codebook; each weight is compressed by one quantize or cluster step")
    raise RecipeError(f"invalid recipe: steps.{index}: {why}", [{"loc": ["steps", index, "op"], "msg": why}])


def _at_step(exc: RecipeError, index: int) -> RecipeError:
    """``exc`` with ``["steps", index]`` in front of every field path not already absolute."""
    if exc.errors and all(list(e.get("loc", []))[:1] == ["steps"] for e in exc.errors):
        return exc
    errors = [{**e, "loc": list(e.get("loc", []))} for e in exc.errors]
    for error in errors:
        if error["loc"][:1] != ["steps"]:
            error["loc"] = ["steps", index, *error["loc"]]
    errors = errors or [{"loc": ["steps", index], "msg": exc.detail}]
    where = ".".join(str(p) for p in errors[0]["loc"])
    return RecipeError(f"invalid recipe: {where}: {errors[0].get('msg', '') or exc.detail}", errors)


def run(model_path: Path, recipe: Recipe, *, calibration: dict[str, np.ndarray] | None = None,
        evaluation: dict[str, np.ndarray] | None = None, target: str = "cpu-x86", workdir: Path,
        progress: Callable[[float, str], None] = _no_progress, cancelled: Callable[[], bool] = _never,
        options: dict | None = None) -> PipelineResult:
    """Compress ``model_path`` with ``recipe`` into ``workdir/model.onnx`` and measure it.

    ``options`` go to every step's context and tune the report: ``latency_runs`` (50),
    ``latency_budget_s`` (10), ``fidelity_samples`` (512), ``layer_errors`` (True),
    ``layer_error_samples`` (64), ``generated_samples`` (32); ``model_name`` titles report.html;
    ``sparse_storage`` (True): false keeps every quantized weight dense; ``allow_target_mismatch``
    (False): run a ``gpu`` job where CUDA cannot run, measured on the CPU (the report says so).
    """
    began, began_cpu = time.perf_counter(), time.process_time()
    model_path, workdir = Path(model_path), Path(workdir)
    options = dict(options or {})
    try:
        target = Target(target).value
    except ValueError:
        raise InvalidInput(f"unknown target {target!r}", [{"loc": ["target"], "msg": f"one of {[t.value for t in Target]}"}]) from None
    host.require_target(target, bool(options.get("allow_target_mismatch")))
    sessions.return_big_buffers()       # before the first activation-sized buffer is freed

    # 1. checks, before any work
    check_formats(recipe.export)
    if calibration is None:
        needed = recipe.needs_calibration()
        if needed:
            raise RecipeError(f"invalid recipe: {needed[0]}: needs calibration data, and none was given",
                              [{"loc": _path(p), "msg": "needs calibration data"} for p in needed])
    try:
        model = graph.load_model(model_path)
    except Exception as exc:  # any parse failure of an uploaded file is the file's fault
        raise InvalidModel(f"cannot load the model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                           [{"loc": ["model"], "msg": "not a loadable ONNX model"}]) from None
    graph.weights_out_of_inputs(model)
    graph.resolve_weight_aliases(model)
    graph.fold_weight_transposes(model)
    _refuse_non_tensor_io(model)
    # nodes in the order they compute: ONNX Runtime runs a file listed out of order, GPTQ, cluster and
    # channel pruning did not ('tensor is not alive at node 0', an invalid result)
    graph.sort_graph(model)
    # the names the file had: the steps' records need every node named, the written file does not
    # (a cleanup of an unnamed export came out 79 bytes larger than it went in)
    options.setdefault("file_node_names", file_names.node_names(model))
    graph.ensure_node_names(model)
    cal_set = _bind(model, calibration, "calibration")
    eval_set = _bind(model, evaluation, "evaluation")
    held_out = None
    if recipe.goal is not None:
        cal_set, eval_set, held_out = goal_search.check_and_split(model, recipe.goal, cal_set, eval_set)

    student_path = options.pop("student_model_path", None)
    if student_path is not None and "student_model" not in options:
        try:
            options["student_model"] = graph.load_model(student_path)
        except Exception as exc:  # the student is an uploaded file too: its fault, not ours
            raise InvalidModel(f"cannot load the student model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                               [{"loc": ["student_model"], "msg": "not a loadable ONNX model"}]) from None

    original = onnx.ModelProto()
    original.CopyFrom(model)
    ctx = StepContext(original=original, calibration=_arrays(cal_set), evaluation=_arrays(eval_set),
                      target=target, workdir=workdir, progress=_no_progress, cancelled=cancelled,
                      options=options)
    count = len(recipe.steps)
    modules = []
    for index, step in enumerate(recipe.steps):
        try:
            module = registry.step_module(step.op)
        except (KeyError, ImportError) as exc:
            raise PipelineError(f"step {step.op!r} is not available in this build: {exc}") from exc
        check = getattr(module, "check", None)
        ctx.options["step_index"] = index   # lets a step's own errors carry the absolute path
        if check is not None:
            try:
                check(model, step, ctx)
            except RecipeError as exc:
                raise _at_step(_if_quantized_already(exc, model, step), index) from None
        modules.append(module)

    # 2. the steps
    workdir.mkdir(parents=True, exist_ok=True)
    step_rows: list[dict[str, Any]] = []
    measured: list[sensitivity.Sensitivity] = []
    for index, (step, module) in enumerate(zip(recipe.steps, modules)):
        if cancelled():
            raise StepCancelled("job cancelled")
        if recipe.goal is not None and step.op == "quantize":
            continue          # the goal search varies it per layer (below)
        stage = f"step {index + 1}/{count}: {step.op}"

        def step_progress(fraction: float, message: str = "", _index: int = index, _stage: str = stage) -> None:
            fraction = min(max(float(fraction), 0.0), 1.0)
            # the step's own message (epoch and loss while distilling) reaches the job and the CLI
            progress(STEPS_SHARE * (_index + fraction) / count, f"{_stage}: {message}" if message else _stage)

        ctx.progress = step_progress
        ctx.options["step_index"] = index
        progress(STEPS_SHARE * index / count, stage)
        ctx.cost = cost.CostMeter()
        ctx.cost.start()
        started = time.perf_counter()
        ctx.options.pop("sensitivity", None)
        if sensitivity.wanted(recipe, step):
            data, source = sensitivity.data_for(cal_set, eval_set, original)
            spec = recipe.sensitivity
            found = sensitivity.measure(model, step, data, samples=spec.samples if spec else sensitivity.DEFAULT_SAMPLES,
                                        step_index=index, cancelled=cancelled,
                                        progress=lambda f, m, _p=step_progress: _p(0.3 * f, m))
            found.data = source
            measured.append(found)
            ctx.options["sensitivity"] = found      # the step's error bound starts from it
        # the steps before this one that ran (a goal's quantize steps do not run as written)
        earlier = [s for s in recipe.steps[:index] if recipe.goal is None or s.op != "quantize"]
        try:
            result = module.run(model, step, ctx)
        except RecipeError as exc:
            # a refusal only the steps before could reveal (a layer channel pruning took under
            # min_params): the same field path as a refusal up front
            raise _at_step(_after_earlier_steps(exc, earlier), index) from None
        except (FeatherweightError, StepCancelled):
            raise
        except Exception as exc:
            raise PipelineError(f"{stage} failed: {type(exc).__name__}: {exc}") from exc
        _refuse_if_nothing_left(step, index, result, earlier)
        unreadable = graph.unreadable_weights(model, getattr(step, "min_params", 0)) if step.op in WEIGHT_STEPS else {}
        if unreadable:
            # weights in a layout no step reads stay float: listed, not silently passed over
            skipped = result.metrics.setdefault("skipped", [])
            named = {entry.get("name") for entry in skipped}
            skipped.extend({"name": name, "reason": why} for name, why in unreadable.items()
                           if name not in named and name not in result.changed)
        model = result.model
        seconds = time.perf_counter() - started
        step_rows.append({"op": step.op, "seconds": seconds, **result.metrics, **ctx.cost.row(seconds)})
        del result          # the previous model may be freed while the next step runs
    if cancelled():
        raise StepCancelled("job cancelled")
    searched = None
    if recipe.goal is not None:
        progress(STEPS_SHARE * 0.5, "goal search")
        ctx.progress = lambda fraction, message="": progress(
            STEPS_SHARE * (0.5 + 0.5 * min(max(float(fraction), 0.0), 1.0)), message or "goal search")
        started = time.perf_counter()
        searched = goal_search.run_goal(model, original, recipe, ctx, eval_set, cal_set is not None, workdir)
        model, ctx.layers = searched.model, searched.layers
        step_rows.append({"op": "goal", "seconds": time.perf_counter() - started, "family": searched.chosen.family,
                          "label": searched.chosen.label, **searched.chosen.step_metrics})

    # 3. the output format
    formatting, formatting_cpu = time.perf_counter(), time.process_time()
    stored_names = finalize(model, recipe, step_rows, ctx, evaluation=eval_set, calibration=cal_set,
                            chosen=searched.params if searched is not None else None)
    formatting, formatting_cpu = time.perf_counter() - formatting, time.process_time() - formatting_cpu

    # 4. check, write, measure
    progress(STEPS_SHARE, "checking the result")
    check_result(original, model)
    too_big_to_check_in_memory = model.ByteSize() >= graph.EXTERNAL_DATA_THRESHOLD
    out_path = graph.save_model(model, workdir / artifacts.MODEL_FILE)
    if too_big_to_check_in_memory:
        _check_file(out_path)
    # what ONNX Runtime's quantize_static counts (load, calibrate, quantize, write): the report is extra
    written, written_cpu = time.perf_counter() - began, time.process_time() - began_cpu
    # the report reads both models from their files: the weights are not held twice meanwhile
    layers = ctx.layers
    del model, original, ctx
    sessions.release_memory()
    progress(STEPS_SHARE + 0.05, "measuring")
    measuring = time.perf_counter()
    cost.reset_peak()
    report = build_report(original_path=model_path, compressed_path=out_path, target=target, steps=step_rows,
                          layers=layers, evaluation=eval_set, calibration=cal_set, options=options,
                          stored_names=stored_names)
    if searched is not None:
        for name, path in searched.artifacts.items():
            check_result(graph.load_model(model_path, load_external_data=False), graph.load_model(path))
        report["goal"] = json_safe({**searched.goal_report, "evaluation_data": held_out or "the evaluation data"})
        report["candidates"] = json_safe([c.row(recipe.goal) for c in searched.candidates])
    if measured:
        top = recipe.sensitivity.top if recipe.sensitivity else 50
        report["sensitivity"] = json_safe(sensitivity.report_rows(measured, top))
        sensitivity.write_artifact(measured, workdir / artifacts.SENSITIVITY_FILE)
    report["cost"] = {"steps_seconds": sum(row["seconds"] for row in step_rows),
                      "compress_seconds": written, "compress_cpu_seconds": written_cpu,
                      "output_format_seconds": formatting, "output_format_cpu_seconds": formatting_cpu,
                      "measure_seconds": time.perf_counter() - measuring,
                      "measure_peak_rss_bytes": cost.peak_rss_bytes(),
                      "peak_rss_bytes": max([row.get("peak_rss_bytes") or 0 for row in step_rows] + [cost.peak_rss_bytes() or 0]),
                      "slowest_phase": cost.slowest(step_rows)}
    if recipe.extra_formats():
        report["exports"] = _exports(recipe, model_path, out_path, report, target, eval_set, cal_set, options, progress)
    write_report(report, workdir / artifacts.REPORT_FILE)
    write_report_html(report, workdir / artifacts.REPORT_HTML_FILE, title=f"{options.get('model_name') or Path(model_path).name}: compression report")
    progress(1.0, "done")
    return PipelineResult(model_path=out_path, report=report)
