"""Structure bench: pruning, low-rank and clustering against the issue's bars, side by side in one run.

    .venv/bin/python -m bench.structure [--json] [--models digits_cnn,transformer_encoder] [--runs 200]

On each bench model (``bench.models``: the trained digits CNN and digits-as-sequences transformer,
with their fixed calibration / evaluation splits) every variant goes through
``worker.pipeline.runner.run`` with a recipe, exactly as a user's job would:

    magnitude50        prune magnitude, 50 % of every layer (scope layer: SparseGPT paper's setting)
    sparsegpt50        prune sparsegpt, 50 % of every layer
    magnitude50-global prune magnitude, 50 % overall, scope global (per-layer budgets)
    sparsegpt50-global prune sparsegpt, 50 % overall, scope global (the same per-layer budgets)
    channel30          cleanup, then prune structure channel 30 % (CNN: the Conv layers only;
                       transformer: every MatMul / Gemm: the MLP hidden features and the attention
                       heads are what can go; one head of four per block)
    channel30-distill  the same, then distill layerwise (each changed layer refit on calibration data)
    channel30-keepheads the transformer's channel30 with the attention layers excluded
                       (``exclude: ["*attention*"]``): the MLP alone, the baseline for the heads
    lowrank50          lowrank rank_ratio 0.5 on the MatMul / Gemm weights
    prune50-int8       cleanup (BatchNorm, LayerNorm affines folded), prune magnitude 50 % (scope
                       global), then quantize weights int8 per channel (pruned int8 weights stored
                       sparse, bitmask + values, where that shrinks the zstd bytes)
    prune50-int8-tensor the same with one int8 scale per tensor (ONNX Runtime's quantizers' default):
                       no per-channel scales to store, and one value range for every layer
    prune50-int8-dense the per-channel recipe with every weight kept dense (runner option
                       ``sparse_storage: false``): what the sparse storage changes, in the same run
    cluster4           cluster 4 bits (16 shared values per tensor)

From each job's report: file size ratio, transport_size_ratio (zstd), MACs, parameters, fidelity
(rel_l2 of the outputs against the original on the evaluation split) and accuracy. Latency is
measured here, all variants of a model interleaved run by run on one batch of 32 evaluation
samples with one intra-op thread (on a shared machine, multi-thread timings are mostly other
people's load), p50 over ``--runs``; ``latency_ratio`` is the original's p50 over the variant's.
The bars of issue 5 are checked at the end and printed PASS / FAIL with the figures.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bench.sessions import single_thread_session

OUT_DIR = Path(__file__).resolve().parent / "out" / "structure"
LATENCY_BATCH = 32
MODELS = ("digits_cnn", "transformer_encoder")
REPORT_OPTIONS = {"latency_runs": 5, "latency_budget_s": 2, "layer_errors": False, "fidelity_samples": 512}


def _recipe(variant: str, model_name: str) -> dict:
    linear = ["*MatMul*", "*Gemm*"]
    if variant.startswith(("magnitude50", "sparsegpt50")):
        steps = [{"op": "prune", "method": variant.split("50")[0], "sparsity": 0.5, "min_params": 0,
                  "scope": "global" if variant.endswith("-global") else "layer"}]
    elif variant == "channel30":
        include = ["*Conv*"] if model_name == "digits_cnn" else linear
        steps = [{"op": "cleanup"},
                 {"op": "prune", "structure": "channel", "sparsity": 0.3, "include": include, "min_params": 0}]
    elif variant == "channel30-keepheads":
        steps = _recipe("channel30", model_name)["steps"]
        steps[1] = {**steps[1], "exclude": ["*attention*"]}
    elif variant == "channel30-distill":
        steps = _recipe("channel30", model_name)["steps"] + [{"op": "distill", "method": "layerwise"}]
    elif variant == "lowrank50":
        steps = [{"op": "lowrank", "rank_ratio": 0.5, "conv": "none", "min_params": 0}]
    elif variant in ("prune50-int8", "prune50-int8-tensor", "prune50-int8-dense"):
        granularity = "tensor" if variant.endswith("-tensor") else "channel"
        steps = [{"op": "cleanup"},
                 {"op": "prune", "method": "magnitude", "sparsity": 0.5, "min_params": 0},
                 {"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": granularity},
                  "min_params": 0}]
    elif variant == "cluster4":
        steps = [{"op": "cluster", "bits": 4, "min_params": 0}]
    else:
        raise ValueError(variant)
    return {"steps": steps}


VARIANTS = ("magnitude50", "sparsegpt50", "magnitude50-global", "sparsegpt50-global", "channel30", "channel30-distill",
            "channel30-keepheads", "lowrank50", "prune50-int8", "prune50-int8-tensor", "prune50-int8-dense", "cluster4")


def _options(variant: str) -> dict:
    options = dict(REPORT_OPTIONS)
    if variant.endswith("-dense"):
        options["sparse_storage"] = False     # quantize keeps every integer weight dense
    return options


def _linear_params(model: onnx.ModelProto) -> int:
    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            total += sum(inits.get(name, 0) for name in node.input[1:2])
    return total


def _latencies(paths: dict[str, Path], feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    sessions = {name: single_thread_session(path) for name, path in paths.items()}
    for sess in sessions.values():
        for _ in range(5):
            sess.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            started = time.perf_counter()
            sess.run(None, feeds)
            times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: float(np.percentile(values, 50)) for name, values in times.items()}


def evaluate(model_name: str, variants: list[str], runs: int, workdir: Path) -> dict:
    import bench.models as models
    from core.recipe import parse_recipe
    from worker.pipeline.runner import run

    model, calibration, evaluation = getattr(models, model_name)()
    original_path = workdir / f"{model_name}.onnx"
    onnx.save_model(model, str(original_path))
    rows: dict[str, dict] = {}
    paths = {"original": original_path}
    for variant in variants:
        if variant == "channel30-keepheads" and model_name == "digits_cnn":
            continue                      # the CNN has no attention: the row would repeat channel30
        started = time.perf_counter()
        try:
            result = run(original_path, parse_recipe(_recipe(variant, model_name)), calibration=calibration,
                         evaluation=evaluation, workdir=workdir / variant, options=_options(variant))
        except Exception as exc:  # a failing variant is a row with its error, never a silent gap
            rows[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        report = result.report
        compressed = onnx.load(str(result.model_path))
        steps = report["steps"]
        rows[variant] = {
            "seconds": time.perf_counter() - started,
            "size_ratio": report["size_ratio"], "transport_size_ratio": report["transport_size_ratio"],
            "macs_ratio": report["compressed"]["macs"] / report["original"]["macs"] if report["original"]["macs"] else None,
            "params_ratio": report["compressed"]["params"] / report["original"]["params"],
            "nonzero_ratio": report["compressed"]["nonzero_params"] / report["original"]["params"],
            # only where the weights stay float initializers (quantize / cluster store them otherwise)
            "linear_params_ratio": _linear_params(compressed) / max(_linear_params(model), 1)
            if variant.startswith(("lowrank", "channel")) else None,
            "rel_l2": report["fidelity"]["rel_l2"], "top1_agreement": report["fidelity"]["top1_agreement"],
            "accuracy": report["accuracy"]["compressed"] if report.get("accuracy") else None,
            "accuracy_original": report["accuracy"]["original"] if report.get("accuracy") else None,
            "skipped": [s for step in steps for s in step.get("skipped", [])],
            "ranks": {row["name"]: row["rank"] for row in report["layers"] if row.get("rank")},
        }
        paths[variant] = result.model_path
    feeds = {name: array[:LATENCY_BATCH] for name, array in evaluation.items() if not name.startswith("_")}
    latency = _latencies(paths, feeds, runs)
    for variant, row in rows.items():
        if variant in latency:
            row["latency_ms"] = latency[variant]
            row["latency_ratio"] = latency["original"] / latency[variant]
    return {"original_latency_ms": latency["original"], "variants": rows}


def bars(results: dict) -> list[tuple[str, bool, str]]:
    """The issue's bars, each (statement, passed, the figures it was judged on)."""
    out = []
    tr = results.get("transformer_encoder", {}).get("variants", {})
    cnn = results.get("digits_cnn", {}).get("variants", {})
    if "rel_l2" in tr.get("sparsegpt50", {}) and "rel_l2" in tr.get("magnitude50", {}):
        ratio = tr["sparsegpt50"]["rel_l2"] / tr["magnitude50"]["rel_l2"]
        out.append(("transformer 50% per layer: SparseGPT rel_l2 <= 0.6x magnitude", ratio <= 0.6,
                    f"sparsegpt {tr['sparsegpt50']['rel_l2']:.4f} / magnitude {tr['magnitude50']['rel_l2']:.4f} = {ratio:.3f}"))
    if "rel_l2" in tr.get("sparsegpt50-global", {}) and "rel_l2" in tr.get("magnitude50-global", {}):
        ratio = tr["sparsegpt50-global"]["rel_l2"] / tr["magnitude50-global"]["rel_l2"]
        out.append(("transformer 50% scope global: SparseGPT rel_l2 <= 0.6x magnitude", ratio <= 0.6,
                    f"sparsegpt {tr['sparsegpt50-global']['rel_l2']:.4f} / magnitude "
                    f"{tr['magnitude50-global']['rel_l2']:.4f} = {ratio:.3f}"))
    row = cnn.get("channel30", {})
    if "macs_ratio" in row:
        drop = (row["accuracy_original"] - row["accuracy"]) if row.get("accuracy") is not None else None
        out.append(("CNN channel 30%: MACs down >= 30% and latency ratio >= 1.25",
                    row["macs_ratio"] <= 0.7 and row["latency_ratio"] >= 1.25,
                    f"MACs x{row['macs_ratio']:.3f}, latency ratio {row['latency_ratio']:.2f}, "
                    f"accuracy {row['accuracy_original']:.4f} -> {row['accuracy']:.4f} (drop {drop:.4f})"))
    for name, variants in (("CNN", cnn), ("transformer", tr)):
        row = variants.get("lowrank50", {})
        if "linear_params_ratio" in row:
            out.append((f"{name} lowrank 0.5: Gemm/MatMul params halved, latency not worse",
                        row["linear_params_ratio"] <= 0.5 + 1e-9 and row["latency_ratio"] >= 0.95,
                        f"linear params x{row['linear_params_ratio']:.3f}, latency ratio {row['latency_ratio']:.2f}, "
                        f"rel_l2 {row['rel_l2']:.4f}, accuracy {row['accuracy']}"))
        row = variants.get("prune50-int8-tensor", {})
        if "transport_size_ratio" in row:
            beside = []
            for label, other in (("per channel", "prune50-int8"), ("per channel stored dense", "prune50-int8-dense")):
                if "transport_size_ratio" in variants.get(other, {}):
                    beside.append(f"{label}: x{variants[other]['transport_size_ratio']:.3f} "
                                  f"(rel_l2 {variants[other]['rel_l2']:.4f})")
            out.append((f"{name} prune 50% + int8 (per-tensor scales): transport_size_ratio >= 6",
                        row["transport_size_ratio"] >= 6,
                        f"transport x{row['transport_size_ratio']:.3f} (file x{row['size_ratio']:.2f}, "
                        f"rel_l2 {row['rel_l2']:.4f}, accuracy {row['accuracy']}); " + "; ".join(beside)))
    return out


def _table(results: dict) -> str:
    cols = ("size_ratio", "transport_size_ratio", "macs_ratio", "linear_params_ratio", "nonzero_ratio", "rel_l2",
            "top1_agreement", "accuracy", "latency_ms", "latency_ratio")
    lines = []
    for model_name, result in results.items():
        lines.append(f"\n{model_name}  (original p50 {result['original_latency_ms']:.3f} ms, batch {LATENCY_BATCH}, 1 thread)")
        lines.append(f"{'variant':19s}" + "".join(f"{c[:12]:>13s}" for c in cols))
        for variant, row in result["variants"].items():
            if "error" in row:
                lines.append(f"{variant:19s}  ERROR {row['error']}")
                continue
            cells = []
            for c in cols:
                value = row.get(c)
                cells.append(f"{value:13.4f}" if isinstance(value, (int, float)) else f"{str(value):>13s}")
            lines.append(f"{variant:19s}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            results[model_name] = evaluate(model_name, args.variants.split(","), args.runs, Path(tmp))
    checked = bars(results)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"results": results, "bars": [{"bar": b, "passed": p, "figures": f} for b, p, f in checked]}
    (OUT_DIR / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(_table(results))
        print()
        for bar, passed, figures in checked:
            print(f"{'PASS' if passed else 'FAIL'}  {bar}: {figures}")
        for model_name, result in results.items():
            for variant, row in result["variants"].items():
                for skipped in row.get("skipped", [])[:6]:
                    print(f"  skipped in {model_name}/{variant}: {skipped['name']}: {skipped['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
