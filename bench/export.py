"""Deploy-format bench: models compressed with a recipe and exported to every format, each format's
figures beside the ONNX model's.

    .venv/bin/python -m bench.export [--json] [--models digits_cnn,transformer_encoder,ocr_cls,minilm,vad]
                                     [--formats ort,tflite,pytorch] [--recipe static|dynamic|weights] [--quick]

Models: the bench's trained models (``bench.models``: the digits CNN and the digits-as-sequences
transformer encoder) and the real pretrained models (``bench.real_models``: PP-OCR detector,
recognizer and orientation classifier, all-MiniLM-L6-v2, silero-vad), each with its own
calibration and evaluation data (``--quick``: the real models' few-sample sets, about a minute of
conversion each; a full set of a real model is built on first use).

Prints, per model: the ONNX model's size ratio, fidelity against the original and accuracy, then
for each exported format its state (or reason), file bytes and size ratio, agreement with the
compressed ONNX model, fidelity against the original, and latency p50 on one sample, all from the
report's ``exports`` (docs/report.md), each format run in its own runtime. A format whose extra is
not installed is skipped with the reason; a conversion that fails prints the converter's reason.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnx

RECIPES = {
    "static": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"bits": 8}}],
    "dynamic": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}}],
    "weights": [{"op": "quantize", "weights": {"bits": 8}}],
}


TRAINED = ("digits_cnn", "transformer_encoder")


def _model_and_data(model_name: str, scratch: Path, quick: bool) -> tuple[Path, dict, dict]:
    """(float ONNX file, calibration, evaluation) of a trained bench model or a real one."""
    if model_name in TRAINED:
        from bench import models

        model, calibration, evaluation = getattr(models, model_name)()
        path = scratch / f"{model_name}.onnx"
        onnx.save_model(model, str(path))
        return path, calibration, evaluation
    from bench import real_models

    real = real_models.load(model_name, quick)
    return real.path, dict(real.calibration), dict(real.evaluation)


def run(model_name: str, formats: list[str], recipe_name: str, quick: bool = False) -> dict:
    from core.exports import missing_extra
    from core.recipe import parse_recipe
    from worker.pipeline import runner

    skipped = {fmt: reason for fmt in formats if (reason := missing_extra(fmt))}
    export = ["onnx", *[fmt for fmt in formats if fmt not in skipped]]
    with tempfile.TemporaryDirectory() as scratch:
        path, calibration, evaluation = _model_and_data(model_name, Path(scratch), quick)
        result = runner.run(path, parse_recipe({"steps": RECIPES[recipe_name], "export": export}),
                            calibration=calibration, evaluation=evaluation, workdir=Path(scratch) / "work",
                            options={"latency_runs": 30, "latency_budget_s": 5.0, "layer_errors": False})
    report = result.report
    rows = {"onnx": {"state": "ok", "bytes": report["compressed"]["bytes"], "size_ratio": report["size_ratio"],
                     "fidelity": report["fidelity"], "latency_ms": report["compressed"]["latency_ms"],
                     "accuracy": report["accuracy"]}}
    rows.update(report.get("exports", {}))
    rows.update({fmt: {"state": "skipped", "reason": reason} for fmt, reason in skipped.items()})
    return rows


def _top1(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _line(fmt: str, row: dict) -> str:
    if row.get("state") != "ok":
        return f"  {fmt:8s} {row.get('state')}: {row.get('reason')}"
    agreement = row.get("agreement") or {}
    fidelity = row.get("fidelity") or {}
    top1 = fidelity.get("top1_agreement")
    return (f"  {fmt:8s} {row['bytes']:>9,} B  x{row['size_ratio']:.2f}  "
            f"vs ONNX cos {agreement.get('cosine', 1.0):.5f} top1 {_top1(agreement.get('top1_agreement', 1.0))}"
            f"{'' if str(row.get('top1_bound', 'applied')).startswith('applied') else ' (bound not applied)'}  "
            f"vs original cos {fidelity.get('cosine', 0):.5f} top1 {top1 if top1 is None else round(top1, 3)}  "
            f"accuracy {row.get('accuracy') if not isinstance(row.get('accuracy'), dict) else row['accuracy'].get('compressed')}  "
            f"p50 {row['latency_ms']['p50']:.3f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TRAINED),
                        help="comma-separated: digits_cnn, transformer_encoder and bench.real_models' names")
    parser.add_argument("--quick", action="store_true", help="the real models' few-sample data sets")
    parser.add_argument("--formats", default="ort,tflite,pytorch")
    parser.add_argument("--recipe", default="static", choices=sorted(RECIPES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {name: run(name, args.formats.split(","), args.recipe, args.quick) for name in args.models.split(",")}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, rows in results.items():
        accuracy = rows["onnx"].get("accuracy") or {}
        print(f"{name} ({args.recipe} int8; accuracy original {accuracy.get('original')}, "
              f"compressed {accuracy.get('compressed')})")
        for fmt, row in rows.items():
            print(_line(fmt, row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
