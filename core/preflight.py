"""Preflight at submit: refuse, with 422 and field paths, a job that cannot succeed, before it is queued.

Works from what was recorded at upload (the model's inputs, opset and parameter count; each data
set's array names, shapes and dtypes), so the API never loads a model or a data set:

- the recipe needs calibration data (``Recipe.needs_calibration``) and none was named;
- each data set fits the model's inputs by the rules of docs/datasets.md (one array per input, the
  input's rank (concatenated) or one more (stacked), the fixed dims, a compatible dtype, the same
  number of samples everywhere, at least one, ``_labels`` of shape [N]), as the worker's binding
  checks them;
- a distill step's ``student_model_id`` names an uploaded model;
- weight steps have weights to work on;
- each ``export`` format can be produced here (its optional extra is installed: ``core.exports``);
- a ``goal`` fits the model's outputs and the data (core.goal: output, metric, labels);
- the format can be produced: sign / 2-bit weights need opset 25, and the model's opset must not be
  newer than the one this service's ONNX converts to.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from core.errors import InvalidInput, RecipeError
from core.exports import check_formats
from core.recipe import CleanupStep, DistillStep, Fp16Step, QuantizeStep, Recipe

LABELS = "_labels"
SIGN_OPSET = 25


def _dtype(name: Any) -> np.dtype | None:
    try:
        return np.dtype(str(name))
    except TypeError:
        return None


def check_dataset(inputs: list[dict[str, Any]], arrays: list[dict[str, Any]], field: str) -> None:
    """Raise InvalidInput at ``["body", field, <array>]`` when the data set does not fit the inputs."""
    given = {a["name"]: a for a in arrays}

    def refuse(name: str, message: str) -> InvalidInput:
        return InvalidInput(f"{field}: {message}", [{"loc": ["body", field, name], "msg": message}])

    expected = {i["name"] for i in inputs}
    extra = sorted(set(given) - expected - {LABELS})
    if extra:
        raise refuse(extra[0], f"array {extra[0]!r} matches no model input (inputs: {sorted(expected)})")
    sizes: dict[str, int] = {}
    for spec in inputs:
        name = spec["name"]
        if name not in given:
            raise refuse(name, f"missing array for model input {name!r}")
        shape, dtype = list(given[name]["shape"]), _dtype(given[name]["dtype"])
        want_shape, want_dtype = spec.get("shape"), _dtype(spec.get("dtype"))
        if want_shape is not None:
            rank = len(want_shape)
            if len(shape) == rank + 1:
                stacked, sample = True, shape[1:]
            elif len(shape) == rank and rank > 0:
                stacked, sample = False, shape
            else:
                raise refuse(name, f"array {name!r} has rank {len(shape)}; input rank is {rank} "
                                   f"(give rank {rank} concatenated or {rank + 1} stacked)")
            for axis, dim in enumerate(want_shape):
                if isinstance(dim, int) and dim > 0 and sample[axis] != dim:
                    if axis == 0 and not stacked and dim == 1:
                        continue
                    raise refuse(name, f"array {name!r} has shape {shape}; input wants {want_shape}")
        if shape:
            sizes[name] = shape[0]
        if dtype is not None and want_dtype is not None and dtype.kind != want_dtype.kind \
                and not (dtype.kind in "iu" and want_dtype.kind in "iu"):
            raise refuse(name, f"array {name!r} has dtype {dtype}; input wants {want_dtype}")
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:
        raise refuse(empty[0], f"array {empty[0]!r} holds 0 samples; a data set needs at least one")
    if len(set(sizes.values())) > 1:
        raise refuse(next(iter(sizes)), f"arrays hold different numbers of samples: {sizes}")
    if LABELS in given:
        labels = given[LABELS]
        size = next(iter(sizes.values()), None)
        if len(labels["shape"]) != 1 or (size is not None and labels["shape"][0] != size):
            raise refuse(LABELS, f"_labels must be integer class ids of shape [{size}]")


def check_job(recipe: Recipe, model: Any, *, calibration: list[dict[str, Any]] | None,
              evaluation: list[dict[str, Any]] | None, model_exists: Callable[[str], bool]) -> None:
    """Raise RecipeError / InvalidInput (paths under ``body``) when the job cannot succeed."""
    if calibration is None:
        needed = recipe.needs_calibration()
        if needed:
            paths = [["body", "recipe", *(int(p) if p.isdigit() else p for p in path.split("."))] for path in needed]
            raise RecipeError(
                f"invalid recipe: {needed[0]}: needs calibration data; give calibration_dataset_id",
                [*({"loc": p, "msg": "needs calibration data"} for p in paths),
                 {"loc": ["body", "calibration_dataset_id"], "msg": "required by this recipe"}])
    if calibration is not None:
        check_dataset(model.inputs, calibration, "calibration_dataset_id")
    if evaluation is not None:
        check_dataset(model.inputs, evaluation, "eval_dataset_id")
    check_formats(recipe.export, ["body", "recipe"])
    if recipe.goal is not None:
        from core.goal import check_goal

        data = evaluation if evaluation is not None else calibration
        labels = data is not None and any(a["name"] == LABELS for a in data)
        counts = [a["shape"][0] for a in (data or []) if a["name"] != LABELS and a.get("shape")]
        check_goal(recipe.goal, model.outputs or [], has_data=data is not None, has_labels=labels,
                   samples=min(counts) if counts else None, prefix=["body", "recipe"], inputs=model.inputs)
    newest = onnx.defs.onnx_opset_version()
    if model.opset > newest:
        raise InvalidInput(f"the model's opset {model.opset} is newer than this service's ONNX supports ({newest})",
                           [{"loc": ["body", "model_id"], "msg": "opset too new"}])
    for index, step in enumerate(recipe.steps):
        where = ["body", "recipe", "steps", index]
        if not isinstance(step, (CleanupStep, Fp16Step)) and not model.params:
            raise RecipeError(f"invalid recipe: steps.{index}: the model has no weights for {step.op!r} to work on",
                              [{"loc": where, "msg": "matches no tensor"}])
        if isinstance(step, DistillStep) and step.student_model_id is not None and not model_exists(step.student_model_id):
            raise RecipeError(f"invalid recipe: steps.{index}.student_model_id: no such model",
                              [{"loc": [*where, "student_model_id"], "msg": "no such model"}])
        if isinstance(step, QuantizeStep) and step.weights is not None and step.weights.bits <= 2 \
                and newest < SIGN_OPSET:
            raise RecipeError(f"invalid recipe: steps.{index}.weights.bits: {step.weights.bits}-bit weights need "
                              f"opset {SIGN_OPSET}; this service's ONNX stops at {newest}",
                              [{"loc": [*where, "weights", "bits"], "msg": f"needs opset {SIGN_OPSET}"}])
