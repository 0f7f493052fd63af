"""Sensitivity, ``max_output_error`` and ``goal`` on the real pretrained models of bench.real_models:
each result scored by the bench's own task metric (not the search's), beside static int8 as shipped.

    python -m bench.goal_real ocr_det minilm [--quick] [--budget 300] [--out bench/out/goal_real.json]

Per model: FP32; static int8 (per-channel weights, minmax activations) with sensitivity measured;
the same with ``max_output_error``; and a ``goal`` with the metric that suits the model
(max_drop 0.01, minimize size). Prints one JSON line per result and writes them all to --out.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from bench.real_models import load
from core.recipe import parse_recipe
from worker.pipeline.runner import run

GOALS = {
    "ocr_det": {"metric": "iou", "threshold": 0.3},
    "ocr_rec": {"metric": "top1_agreement"},
    "ocr_cls": {"metric": "top1_agreement"},
    "minilm": {"metric": "spearman"},
    "vad": {"metric": "decision_agreement", "threshold": 0.5, "output": "output"},
}
STATIC = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"}}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--bound", type=float, default=0.05)
    parser.add_argument("--out", default="bench/out/goal_real.json")
    parser.add_argument("--only", choices=("sensitivity", "bound", "goal"), action="append",
                        help="run only these (repeatable; default all three)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        model = load(name, quick=args.quick)
        reference = model.infer(_session(model.path))
        recipes = {
            "sensitivity": ("static int8 + sensitivity", {"sensitivity": {"samples": 16}, "steps": [STATIC]}),
            "bound": (f"static int8, max_output_error {args.bound:g}",
                      {"steps": [{**STATIC, "max_output_error": args.bound}]}),
            "goal": ("goal", {"goal": {**GOALS[name], "max_drop": 0.01, "minimize": "size",
                                       "time_budget_s": args.budget}}),
        }
        recipes = dict(value for key, value in recipes.items() if not args.only or key in args.only)
        for label, recipe in recipes.items():
            with tempfile.TemporaryDirectory() as scratch:
                started = time.perf_counter()
                result = run(model.path, parse_recipe(recipe), calibration=model.calibration,
                             evaluation=model.evaluation, workdir=Path(scratch),
                             options={"latency_runs": 10, "layer_errors": False})
                seconds = time.perf_counter() - started
                output = model.infer(_session(result.model_path))
                report = result.report
                row = {"model": name, "recipe": label, "task_metric": model.metric_name,
                       "task": model.task_metric(reference, output), "size_ratio": report["size_ratio"],
                       "latency_ratio": report["latency_ratio"], "seconds": seconds,
                       "eval_samples": len(reference)}
                if report.get("sensitivity"):
                    sens = report["sensitivity"][0]
                    row["sensitivity"] = {"seconds": sens["seconds"], "samples": sens["samples"],
                                          "entries": len(sens["entries"]),
                                          "top": [(e["name"], e["kind"], round(e["error"], 4)) for e in sens["entries"][:5]]}
                mixed = next((s.get("mixed_precision") for s in report["steps"] if s.get("mixed_precision")), None)
                if mixed:
                    row["bound"] = {k: mixed[k] for k in ("met", "initial_rel_l2", "final_rel_l2", "builds", "seconds")}
                    row["bound"]["moves"] = [(m["name"], m["to"]) for m in mixed["moves"]][:12]
                if report.get("goal"):
                    goal = report["goal"]
                    chosen = next(c for c in report["candidates"] if c["chosen"])
                    row["goal"] = {"met": goal["met"], "search_score": chosen["score"], "chosen": chosen["label"],
                                   "candidates": len(report["candidates"]),
                                   "verified": sum(c["verified"] for c in report["candidates"]),
                                   "pareto": sum(bool(c["pareto"]) for c in report["candidates"]),
                                   "seconds": goal["seconds"], "stopped": goal["stopped"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
