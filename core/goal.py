"""Whether a recipe's ``goal`` fits the model and data it will run on, from what upload recorded
(the model's outputs: name, shape, dtype; the data sets' arrays), so the API refuses at submit and
the worker refuses before any work, with the same field paths (``["goal", "output"]`` ...).

- ``output`` names one of the model's outputs (default: the first);
- every metric compares float outputs (an argmax needs scores too);
- ``top1_agreement`` / ``accuracy`` / ``ctc_agreement`` need a last axis of 2 or more (the classes);
  ``ctc_agreement`` a sequence (a time axis before the classes) and its ``blank`` among the classes;
- ``accuracy`` needs ``_labels`` in the evaluation data (or, without it, the calibration data);
- the search needs evaluation or calibration data; ``spearman`` needs 3 or more samples to rank;
- ``carry`` maps outputs of the model to inputs of the model (of the same element type where both
  are recorded).
"""
from __future__ import annotations

from typing import Any, Sequence

from core.errors import RecipeError
from core.recipe import GoalSpec

FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")


def _refuse(field: str, message: str, prefix: Sequence[Any]) -> RecipeError:
    loc = [*prefix, "goal", field]
    return RecipeError(f"invalid recipe: {'.'.join(str(p) for p in loc)}: {message}", [{"loc": loc, "msg": message}])


def check_goal(goal: GoalSpec, outputs: Sequence[dict[str, Any]], *, has_data: bool, has_labels: bool,
               samples: int | None = None, prefix: Sequence[Any] = (),
               inputs: Sequence[dict[str, Any]] | None = None) -> None:
    """Raise RecipeError at ``prefix + ["goal", <field>]`` when the goal cannot be measured on this model
    (``inputs``: the model's, for ``carry``; None skips that check)."""
    names = [o.get("name") for o in outputs]
    _check_carry(goal, outputs, inputs, prefix)
    if goal.output is not None and goal.output not in names:
        raise _refuse("output", f"the model has no output {goal.output!r} (outputs: {names})", prefix)
    chosen = next((o for o in outputs if o.get("name") == (goal.output or names[0])), None) if names else None
    if chosen is None:
        raise _refuse("output", "the model has no outputs", prefix)
    dtype = str(chosen.get("dtype") or "")
    if dtype and dtype not in FLOAT_DTYPES:
        raise _refuse("metric", f"{goal.metric} compares float outputs; {chosen['name']!r} is {dtype}", prefix)
    shape = chosen.get("shape")
    if goal.metric in ("top1_agreement", "accuracy", "ctc_agreement"):
        if shape is not None and len(shape) == 0:
            raise _refuse("metric", f"{goal.metric} takes an argmax over the last axis; {chosen['name']!r} is a scalar",
                          prefix)
        if shape and isinstance(shape[-1], int) and shape[-1] < 2:
            raise _refuse("metric", f"{goal.metric} takes an argmax over the last axis; {chosen['name']!r} has "
                                    f"{shape[-1]} element(s) there", prefix)
    if goal.metric == "ctc_agreement":
        _check_ctc(goal, chosen["name"], shape, prefix)
    if not has_data:
        raise _refuse("metric", "a goal is measured on evaluation data: give evaluation or calibration data", prefix)
    if goal.metric == "accuracy" and not has_labels:
        raise _refuse("metric", "accuracy needs _labels in the evaluation data (or the calibration data)", prefix)
    if goal.metric == "spearman" and samples is not None and samples < 3:
        raise _refuse("metric", f"spearman ranks pairs of samples: needs 3 or more, the data has {samples}", prefix)


def _check_ctc(goal: GoalSpec, name: str, shape: Sequence[Any] | None, prefix: Sequence[Any]) -> None:
    """A CTC output is [batch, time, classes] (time may be split over more axes): two axes or more
    after the batch's, and the blank one of the classes."""
    if shape is None:
        return
    if len(shape) < 3:
        raise _refuse("metric", f"ctc_agreement decodes a sequence of class scores [batch, time, classes]; "
                                f"{name!r} has {len(shape)} axes", prefix)
    if isinstance(shape[-1], int) and goal.blank is not None and goal.blank >= shape[-1]:
        raise _refuse("blank", f"blank {goal.blank} is not one of {name!r}'s {shape[-1]} classes", prefix)
    beyond = [c for c in goal.trim if isinstance(shape[-1], int) and c >= shape[-1]]
    if beyond:
        raise _refuse("trim", f"trim {beyond} are not among {name!r}'s {shape[-1]} classes", prefix)


def _check_carry(goal: GoalSpec, outputs: Sequence[dict[str, Any]], inputs: Sequence[dict[str, Any]] | None,
                 prefix: Sequence[Any]) -> None:
    by_output = {o.get("name"): o for o in outputs}
    by_input = {i.get("name"): i for i in inputs} if inputs is not None else None
    for output, target in goal.carry.items():
        if output not in by_output:
            raise _refuse("carry", f"the model has no output {output!r} to feed back (outputs: {list(by_output)})",
                          prefix)
        if by_input is None:
            continue
        if target not in by_input:
            raise _refuse("carry", f"the model has no input {target!r} to feed {output!r} to (inputs: "
                                   f"{list(by_input)})", prefix)
        theirs, ours = str(by_output[output].get("dtype") or ""), str(by_input[target].get("dtype") or "")
        if theirs and ours and theirs != ours:
            raise _refuse("carry", f"output {output!r} is {theirs}, input {target!r} is {ours}", prefix)
        # a state fed back must fit its input: a rank or a fixed size that differs failed in ONNX
        # Runtime at the search's first stream step (exit 1), not here
        given, wanted = by_output[output].get("shape"), by_input[target].get("shape")
        if isinstance(given, (list, tuple)) and isinstance(wanted, (list, tuple)) and (
                len(given) != len(wanted) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                                 for a, b in zip(given, wanted))):
            raise _refuse("carry", f"output {output!r} has shape {list(given)}, input {target!r} takes "
                                   f"{list(wanted)}", prefix)
