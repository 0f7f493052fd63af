"""GPU bench: fp16 / int8 / int4 latency ratios against FP32 on the GPU, beside the CPU's, in one run.

    python -m bench.gpu [--models digits_cnn,transformer_encoder] [--model M.onnx [--calibration C.npz]]
                        [--runs 50] [--json OUT.json] [--dry-run]

``bench/gpu.sh`` prepares a machine with an NVIDIA GPU (the gpu extra) and runs this. What it does:

1. the gpu worker's own startup check (``featherweight worker --queue gpu`` refuses to start unless a
   small model runs on ONNX Runtime's CUDA provider): the same check, so a bench that starts at all
   is a bench a gpu worker could serve;
2. on each bench model (``bench.models``, or ``--model``), each recipe below through
   ``worker.pipeline.runner.run`` twice: target ``gpu`` (evaluated and timed on the CUDA provider)
   and this machine's CPU target; each report's ``latency_ratio`` is FP32 p50 / compressed p50 in
   the same process on the same provider, so the two columns are each their own hardware's ratio;
3. a table (and ``--json``): ratio on the GPU, ratio on the CPU, fidelity, and the provider the GPU
   column really ran on. A gpu row whose report has ``target_match`` false is an error, not a figure.

Recipes: ``fp16`` (the fp16 step: float16 kernels chosen by the CUDA provider), ``int8`` (static
QDQ with minmax calibration; TensorRT's symmetric form where that provider is present) and ``int4``
(weight-only, 4 bits, block 32 on MatMul weights: MatMulNBits where that runs faster on the target).

``--dry-run`` runs every step on this machine's CPU with ``allow_target_mismatch`` (the gpu
column is then the CPU's, flagged, and never a figure): it checks the bench itself where no GPU is.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

RECIPES: dict[str, dict[str, Any]] = {
    "fp16": {"steps": [{"op": "fp16"}]},
    "int8": {"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"},
                        "min_params": 0}]},
    "int4": {"steps": [{"op": "quantize", "weights": {"bits": 4, "granularity": "block", "block_size": 32},
                        "min_params": 0, "embeddings": False}]},
}
MODELS = ("digits_cnn", "transformer_encoder")


def _matmul_weights(model: onnx.ModelProto) -> list[str]:
    from worker.pipeline import graph

    return [layer.node for layer in graph.weight_layers(model, ops=("MatMul",))]


def recipe_for(name: str, model: onnx.ModelProto) -> dict[str, Any] | None:
    """The recipe ``name`` on ``model``; int4 on MatMul weights only (None where it has none)."""
    recipe = json.loads(json.dumps(RECIPES[name]))
    if name == "int4":
        nodes = _matmul_weights(model)
        if not nodes:
            return None
        recipe["steps"][0]["include"] = nodes
    return recipe


def load_models(names: list[str], model_file: str | None, calibration_file: str | None) -> dict[str, tuple]:
    """name -> (ModelProto, calibration arrays or None, evaluation arrays or None)."""
    if model_file:
        model = onnx.load(model_file)
        calibration = None
        if calibration_file:
            with np.load(calibration_file, allow_pickle=False) as archive:
                calibration = {key: archive[key] for key in archive.files}
        return {Path(model_file).stem: (model, calibration, None)}
    from bench import models

    return {name: getattr(models, name)() for name in names}


def gpu_check() -> str | None:
    """None where a gpu worker would start here, else why not (featherweight.cli's own check)."""
    from featherweight.cli import queue_problem

    return queue_problem("gpu")


def run_one(model_path: Path, recipe: dict, target: str, calibration, evaluation, *, runs: int, workdir: Path,
            allow_mismatch: bool) -> dict[str, Any]:
    from core.recipe import parse_recipe
    from worker.pipeline import runner

    started = time.perf_counter()
    try:
        result = runner.run(model_path, parse_recipe(json.dumps(recipe)), calibration=calibration, evaluation=evaluation,
                            target=target, workdir=workdir,
                            options={"latency_runs": runs, "layer_errors": False, "allow_target_mismatch": allow_mismatch})
    except Exception as exc:  # noqa: BLE001 - a failed row is printed, never dropped
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    report = result.report
    return {"latency_ratio": report.get("latency_ratio"), "rel_l2": report["fidelity"]["rel_l2"],
            "provider": report["provider"], "target_match": report["target_match"],
            "p50_ms": report["compressed"]["latency_ms"]["p50"], "fp32_p50_ms": report["original"]["latency_ms"]["p50"],
            "seconds": time.perf_counter() - started}


def bench(models: dict[str, tuple], recipes: list[str], *, runs: int, dry_run: bool) -> list[dict[str, Any]]:
    from core.targets import native_target

    cpu_target = native_target().value
    rows = []
    with tempfile.TemporaryDirectory(prefix="fw-gpu-bench-") as scratch:
        for model_name, (model, calibration, evaluation) in models.items():
            model_path = Path(scratch) / f"{model_name}.onnx"
            onnx.save_model(model, str(model_path))
            for recipe_name in recipes:
                recipe = recipe_for(recipe_name, model)
                if recipe is None:
                    rows.append({"model": model_name, "recipe": recipe_name, "gpu": {"error": "no MatMul weights"},
                                 "cpu": {"error": "no MatMul weights"}})
                    continue
                row: dict[str, Any] = {"model": model_name, "recipe": recipe_name}
                for column, target in (("gpu", "gpu"), ("cpu", cpu_target)):
                    workdir = Path(scratch) / f"{model_name}-{recipe_name}-{column}"
                    row[column] = run_one(model_path, recipe, target, calibration, evaluation, runs=runs,
                                          workdir=workdir, allow_mismatch=dry_run and column == "gpu")
                if not dry_run and row["gpu"].get("target_match") is False:
                    row["gpu"] = {"error": f"not measured on the GPU (provider {row['gpu']['provider']})"}
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def _cell(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    ratio = result["latency_ratio"]
    return f"{ratio:.2f}x" if ratio is not None else "n/a"


def format_row(row: dict[str, Any]) -> str:
    gpu, cpu = row["gpu"], row["cpu"]
    fidelity = gpu.get("rel_l2", cpu.get("rel_l2"))
    fid = f"{fidelity:.4f}" if isinstance(fidelity, float) else "n/a"
    where = gpu.get("provider", "-")
    return f"{row['model']:<22} {row['recipe']:<6} {_cell(gpu):>10} {_cell(cpu):>10}  {fid:>8}  {where}"


HEADER = f"{'model':<22} {'recipe':<6} {'GPU ratio':>10} {'CPU ratio':>10}  {'rel_l2':>8}  gpu column's provider"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="bench models (bench.models), comma separated")
    parser.add_argument("--model", metavar="M.onnx", help="bench this model file instead")
    parser.add_argument("--calibration", metavar="C.npz", help="calibration data for --model (int8 needs it)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"of {', '.join(RECIPES)}")
    parser.add_argument("--runs", type=int, default=50, help="latency runs per model (default 50)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the rows here")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: the gpu column runs on this CPU, flagged as a target mismatch")
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        print(f"bench.gpu: error: unknown recipe {unknown[0]!r} (one of {', '.join(RECIPES)})", file=sys.stderr)
        return 2

    problem = gpu_check()
    if problem and not args.dry_run:
        print(f"bench.gpu: error: a gpu worker would not start here: {problem}", file=sys.stderr)
        return 2
    from worker.pipeline import host

    cpu = host.cpu_info()
    print(f"gpu worker check: {'ok' if problem is None else problem}")
    print(f"host: {cpu.arch} {cpu.model}, {cpu.cores} cores, onnxruntime {host.onnxruntime_version()}"
          f"{' (dry run: gpu column measured on this CPU, not a figure)' if args.dry_run else ''}")
    print(HEADER, flush=True)
    models = load_models([m for m in args.models.split(",") if m], args.model, args.calibration)
    rows = bench(models, recipes, runs=args.runs, dry_run=args.dry_run)
    if args.json:
        Path(args.json).write_text(json.dumps({"dry_run": args.dry_run, "rows": rows}, indent=2) + "\n")
    failed = [row for row in rows if "error" in row["gpu"] or "error" in row["cpu"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
