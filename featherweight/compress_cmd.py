"""``featherweight compress``: the pipeline on one local file, no server (docs/cli.md).

    featherweight compress MODEL.onnx --recipe R.yaml [--calibration C.npz] [--eval E.npz]
                           [--target cpu-x86|cpu-arm|gpu] [--student S.onnx] -o OUT.onnx
                           [--report REPORT.json] [--report-html REPORT.html] [--allow-target-mismatch]
                           [--export onnx,ort,tflite,pytorch]

``--export`` (or the recipe's ``export``) writes each deploy format beside ``-o`` under its name:
``OUT.ort`` and ``OUT.required_operators_and_types.config``, ``OUT.pt`` and ``OUT.state_dict.pt``,
``OUT.tflite``; a format that failed writes nothing and the printed summary says why.

``--target gpu`` where CUDA cannot run a model is bad input (exit 2) unless
``--allow-target-mismatch`` is given; any run measured off the target's hardware prints a notice.

A recipe that measures sensitivity also writes OUT.sensitivity.json; a goal's next best verified
candidates are written as OUT.candidate-1.onnx ... (the job artifacts of the same names).

Bad input (a recipe, data set or model that cannot be used) prints one line,
``featherweight: error: <file>: <field path>: <message>``, and exits 2; a failure of the
compression itself exits 1. Nothing is left at ``-o`` unless the run succeeded: the model is built
in a scratch directory beside it and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from featherweight.remote_cmds import parse_export_formats

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _BadInput(Exception):
    def __init__(self, file: str, loc: list[Any], message: str):
        super().__init__(message)
        self.file, self.loc, self.message = file, loc, message

    def line(self) -> str:
        where = ".".join(str(part) for part in self.loc)
        parts = [self.file] + ([where] if where else []) + [self.message]
        return "featherweight: error: " + ": ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to compress")
    parser.add_argument("--recipe", required=True, metavar="RECIPE.yaml", help="recipe, YAML or JSON (docs/recipes.md)")
    parser.add_argument("--calibration", metavar="CAL.npz", help="calibration data, .npz (docs/datasets.md)")
    parser.add_argument("--eval", dest="evaluation", metavar="EVAL.npz", help="evaluation data for the report")
    parser.add_argument("--target", default=None, choices=("cpu-x86", "cpu-arm", "gpu"),
                        help="where the model will run (default: this machine's CPU)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the compressed model")
    parser.add_argument("--report", metavar="REPORT.json", help="also write the report here")
    parser.add_argument("--student", metavar="STUDENT.onnx",
                        help="distill into this smaller model (same inputs and outputs) instead of the original")
    parser.add_argument("--report-html", metavar="REPORT.html", help="also write the HTML report here")
    parser.add_argument("--allow-target-mismatch", action="store_true",
                        help="compress for --target even where this machine cannot run it (gpu without CUDA): "
                             "latency is then measured here, and the report says so")
    parser.add_argument("--export", type=parse_export_formats, metavar="FORMATS",
                        help="deploy formats, comma-separated: onnx, ort, tflite, pytorch (overrides the recipe's export)")


def _with_export(recipe, formats: list[str] | None, path: str):
    """The recipe with ``export`` replaced by the command line's formats (validated as the recipe is)."""
    if formats is None:
        return recipe
    from core.errors import RecipeError
    from core.recipe import parse_recipe

    try:
        return parse_recipe({**recipe.model_dump(mode="json", exclude_none=True), "export": formats})
    except RecipeError as exc:
        first = exc.errors[0] if exc.errors else {"loc": [], "msg": exc.detail}
        raise _BadInput("--export", list(first["loc"])[1:], first["msg"]) from None


def _place_exports(workdir: Path, output: Path, report: dict) -> dict[str, list[str]]:
    """Move each exported format's files beside ``output`` (``model.ort`` -> ``OUT.ort``)."""
    from worker.pipeline import artifacts

    placed: dict[str, list[str]] = {}
    for fmt, row in (report.get("exports") or {}).items():
        for name in artifacts.EXPORT_FILES.get(fmt, ()):
            source = workdir / name
            if row.get("state") == "ok" and source.is_file():
                target = output.with_name(output.stem + name.removeprefix("model"))
                source.replace(target)
                placed.setdefault(fmt, []).append(str(target))
    return placed


def _load_recipe(path: str):
    from core.errors import RecipeError
    from core.recipe import MAX_RECIPE_BYTES, parse_recipe

    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise _BadInput(path, [], exc.strerror or str(exc)) from None
    try:
        return parse_recipe(text)
    except RecipeError as exc:
        first = exc.errors[0] if exc.errors else {"loc": [], "msg": exc.detail}
        raise _BadInput(path, list(first["loc"]), first["msg"]) from None


def _load_data(path: str | None) -> dict | None:
    if path is None:
        return None
    from worker.pipeline.data import load_npz

    try:
        return load_npz(path)
    except (OSError, ValueError, EOFError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _BadInput(path, [], f"not a readable .npz without pickles: {message}") from None


def _relocate_external_data(model_file: Path, output: Path) -> list[Path]:
    """A model written with external data names ``model.onnx.data``; rename that file after the
    output and point the model at it. Returns the data files in their final names (to rename)."""
    import onnx

    from worker.pipeline import artifacts

    data_file = model_file.with_name(artifacts.external_data_file(model_file.name))
    if not data_file.exists():
        return []
    model = onnx.load(str(model_file), load_external_data=False)
    new_location = artifacts.external_data_file(output.name)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = new_location
    onnx.save_model(model, str(model_file))
    return [data_file]


def _keep_extras(scratch: Path, output: Path) -> list[str]:
    """sensitivity.json and a goal's next best candidates, beside the output as OUT.sensitivity.json,
    OUT.candidate-1.onnx ... (the job's artifacts of the same names)."""
    from worker.pipeline import artifacts

    kept = []
    names = [artifacts.SENSITIVITY_FILE,
             *(artifacts.candidate_file(rank) for rank in range(1, artifacts.CANDIDATE_COUNT + 1))]
    for source in (scratch / name for name in names):
        if source.is_file():
            target = output.with_name(f"{output.stem}.{source.name}")
            source.replace(target)
            kept.append(str(target))
    return kept


def main(args: argparse.Namespace) -> int:
    from core.errors import FeatherweightError, InvalidInput
    from core.targets import native_target
    from worker.pipeline import artifacts, runner
    from worker.pipeline.report import write_report, write_report_html

    output = Path(args.output)
    files = {"calibration": args.calibration, "evaluation": args.evaluation, "recipe": args.recipe,
             "model": args.model, "target": "--target", "student_model": args.student}
    try:
        recipe = _with_export(_load_recipe(args.recipe), getattr(args, "export", None), args.recipe)
        calibration = _load_data(args.calibration)
        evaluation = _load_data(args.evaluation)
        if not Path(args.model).is_file():
            raise _BadInput(args.model, [], "no such file")
        if args.student and not Path(args.student).is_file():
            raise _BadInput(args.student, [], "no such file")
        if not output.parent.is_dir():
            raise _BadInput(str(output), [], "the output's directory does not exist")
        target = args.target or native_target().value
        scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        try:
            options: dict[str, Any] = {"allow_target_mismatch": bool(args.allow_target_mismatch)}
            if args.student:
                options["student_model_path"] = Path(args.student)
            result = runner.run(Path(args.model), recipe, calibration=calibration, evaluation=evaluation,
                                target=target, workdir=scratch, options=options)
            data_files = _relocate_external_data(result.model_path, output)
            for data_file in data_files:
                data_file.replace(output.with_name(artifacts.external_data_file(output.name)))
            if args.report:
                write_report(result.report, args.report)
            if args.report_html:
                write_report_html(result.report, args.report_html, title=f"{Path(args.model).name}: compression report")
            placed = _place_exports(result.model_path.parent, output, result.report)
            extras = _keep_extras(scratch, output)
            result.model_path.replace(output)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except _BadInput as exc:
        print(exc.line(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except InvalidInput as exc:
        first = exc.errors[0] if exc.errors else {"loc": [], "msg": exc.detail}
        loc = list(first.get("loc", []))
        head = loc[0] if loc else None
        if head in ("calibration", "evaluation", "target", "model", "student_model"):
            file, loc = files[head] or head, loc[1:]
        else:
            file = args.recipe
        print(_BadInput(str(file), loc, str(first.get("msg") or exc.detail)).line(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except FeatherweightError as exc:
        print(f"featherweight: compression failed: {exc.detail}", file=sys.stderr)
        return EXIT_FAILED
    summary = {key: result.report.get(key) for key in ("size_ratio", "transport_size_ratio", "latency_ratio", "fidelity",
                                                       "target_match")}
    if result.report.get("target_notice"):
        # on stderr, where people look, beside the JSON summary scripts read on stdout
        print(f"featherweight: notice: {result.report['target_notice']}", file=sys.stderr)
    slowest = (result.report.get("cost") or {}).get("slowest_phase")
    if slowest:
        summary["slowest_phase"] = slowest
        print(f"featherweight: slowest phase: step {slowest['step'] + 1} ({slowest['op']}) {slowest['phase']}, "
              f"{slowest['seconds']:.1f} s", file=sys.stderr)
    if result.report.get("exports"):
        summary["exports"] = {fmt: {"state": row.get("state"), "files": placed.get(fmt, []),
                                    **({"reason": row["reason"]} if row.get("reason") else {})}
                              for fmt, row in result.report["exports"].items()}
    print(json.dumps({"output": str(output), **summary, **({"also_written": extras} if extras else {})}))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featherweight compress", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
