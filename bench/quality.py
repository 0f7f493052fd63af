"""Quality bench: our quantizers against ONNX Runtime's own, side by side in one run.

    .venv/bin/python -m bench.quality [--json] [--models digits_cnn,transformer_encoder]
                                      [--calibration minmax|percentile|entropy] [--runs 50]

On each bench model (``bench.models``: the digits CNN and the digits-as-sequences transformer),
with the same calibration and evaluation splits:

    ort-static      onnxruntime.quantization.quantize_static: QDQ, per_channel=True, uint8
                    activations, int8 weights, the same calibration method (after ORT's own
                    recommended quant_pre_process)
    ort-dynamic     onnxruntime.quantization.quantize_dynamic, per_channel=True, int8 weights
    ort-int4-rtn    MatMulNBitsQuantizer, 4 bits, symmetric, block 32, RTN (MatMul weights only)
    ours-*          the same through ``worker.pipeline.runner.run`` with a recipe: static int8,
                    dynamic int8, and weight-only int4 RTN / GPTQ, int2 GPTQ, sign (1 bit) on the
                    same MatMul weights ORT's MatMulNBits takes
    ours-dynamic-s8 dynamic int8 with the weights stored int8 whatever the CPU (ORT's u8s8 kernel;
                    ``ours-dynamic`` picks uint8 + 128 where that kernel saturates: quantize.int8_storage)
    ours-dynamic-plain, ours-dynamic-s8-plain
                    the same without the dynamic step's exact layout rewrites (attention_layout,
                    shared_quantization): before / after in one run
    fp32-fused      the float model with only the dynamic step's exact layout rewrite
                    (quantize.attention_layout), no quantization: what the rewrite alone buys

Each compression runs in its own subprocess so its peak RSS (``resource.getrusage``) is its own.
Then, in this one process: accuracy and fidelity (rel_l2, cosine, top-1 agreement against FP32) on
the evaluation split, file bytes and size ratio, and latency p50 / p95 on one batch of 32
evaluation samples with all variants interleaved run by run (one intra-op thread: on a shared
machine multi-thread timings are mostly other people's load).

A variant that fails prints its error in the table; nothing is left out silently.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from bench.sessions import open_variants

OUT_DIR = Path(__file__).resolve().parent / "out" / "quality"
BLOCK_SIZE = 32
LATENCY_BATCH = 32
MODELS = ("digits_cnn", "transformer_encoder")

# variant -> (applies to models with MatMul weights only, description)
VARIANTS = {
    "ort-static": "ORT quantize_static QDQ per-channel",
    "ours-static": "ours static int8 QDQ",
    "ort-dynamic": "ORT quantize_dynamic per-channel",
    "ours-dynamic": "ours dynamic int8",
    "ours-dynamic-s8": "ours dynamic int8, int8 weight storage forced",
    "ours-dynamic-plain": "ours dynamic int8 without the layout rewrites",
    "ours-dynamic-s8-plain": "ours dynamic int8, int8 storage, without the layout rewrites",
    "fp32-fused": "float, attention layout rewrite only",
    "ort-int4-rtn": f"ORT MatMulNBits int4 RTN b{BLOCK_SIZE}",
    "ours-int4-rtn": f"ours int4 RTN b{BLOCK_SIZE}",
    "ours-int4-gptq": f"ours int4 GPTQ b{BLOCK_SIZE}",
    "ours-int2-gptq": f"ours int2 GPTQ b{BLOCK_SIZE}",
    "ours-sign": "ours sign (1 bit, 2-bit storage)",
}
MATMUL_ONLY = {"ort-int4-rtn", "ours-int4-rtn", "ours-int4-gptq", "ours-int2-gptq", "ours-sign"}


def _load(name: str):
    from bench import models

    return getattr(models, name)()


def _matmul_weight_nodes(model: onnx.ModelProto) -> list[str]:
    from worker.pipeline import graph

    return [layer.node for layer in graph.weight_layers(model, ops=("MatMul",))]


def _recipe(variant: str, calibration: str, model: onnx.ModelProto) -> dict:
    if variant == "ours-static":
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": calibration}, "min_params": 0}
    elif variant.startswith("ours-dynamic"):
        step = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}, "min_params": 0}
    else:
        # Weight-only rows quantize exactly the weights ORT's MatMulNBits takes: MatMul weights.
        bits = {"ours-int4-rtn": 4, "ours-int4-gptq": 4, "ours-int2-gptq": 2, "ours-sign": 1}[variant]
        weights = {"bits": bits} if bits == 1 else {"bits": bits, "granularity": "block", "block_size": BLOCK_SIZE}
        step = {"op": "quantize", "weights": weights, "method": "gptq" if variant.endswith("gptq") else "rtn",
                "min_params": 0, "embeddings": False, "include": _matmul_weight_nodes(model)}
    return {"steps": [step]}


class _Reader:
    """ORT's CalibrationDataReader over our calibration dict, in batches of 32."""

    def __init__(self, calibration: dict[str, np.ndarray]):
        feeds = {k: v for k, v in calibration.items() if k != "_labels"}
        size = len(next(iter(feeds.values())))
        self.batches = iter([{k: v[i:i + 32] for k, v in feeds.items()} for i in range(0, size, 32)])

    def get_next(self):
        return next(self.batches, None)


def _compress_ort(variant: str, model_path: Path, out_path: Path, calibration_method: str, calibration) -> None:
    from onnxruntime import quantization as q

    if variant == "ort-static":
        source = model_path
        prepared = out_path.with_name(out_path.stem + "-pre.onnx")
        try:
            q.shape_inference.quant_pre_process(str(model_path), str(prepared))
            source = prepared
        except Exception as error:   # ORT's pre-processing is optional; say so and go on without it
            print(f"quant_pre_process failed ({type(error).__name__}: {error}); quantizing the raw model", file=sys.stderr)
        method = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                  "entropy": q.CalibrationMethod.Entropy}[calibration_method]
        q.quantize_static(str(source), str(out_path), _Reader(calibration), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=method)
    elif variant == "ort-dynamic":
        q.quantize_dynamic(str(model_path), str(out_path), per_channel=True, weight_type=q.QuantType.QInt8)
    elif variant == "ort-int4-rtn":
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, bits=4)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(model_path)), bits=4, block_size=BLOCK_SIZE, is_symmetric=True,
                                         algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out_path))
    else:
        raise ValueError(variant)


def _fuse_only(model_path: Path, out_path: Path) -> None:
    """The float model with the dynamic step's layout rewrite alone (no recipe: no quantization)."""
    from worker.pipeline.quantize.attention_layout import fuse_attention_heads

    model = onnx.load(str(model_path))
    fuse_attention_heads(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))


def _compress_ours(variant: str, model_path: Path, out_path: Path, calibration_method: str, calibration) -> None:
    from core.recipe import parse_recipe
    from worker.pipeline import artifacts
    from worker.pipeline.runner import run

    model = onnx.load(str(model_path))
    recipe = parse_recipe(_recipe(variant, calibration_method, model))
    workdir = out_path.with_name(out_path.stem + "-work")
    options = {"latency_runs": 3, "latency_budget_s": 2, "layer_errors": False, "fidelity_samples": 32}
    if variant.startswith("ours-dynamic-s8"):
        options["integer_weights"] = "int8"
    if variant.endswith("-plain"):
        options["dynamic_layout_rewrites"] = False
    run(model_path, recipe, calibration=calibration, workdir=workdir, options=options)
    shutil.move(str(workdir / artifacts.MODEL_FILE), str(out_path))
    data = workdir / artifacts.MODEL_DATA_FILE
    if data.exists():
        shutil.move(str(data), artifacts.external_data_file(str(out_path)))


def compress_one(model_name: str, variant: str, calibration_method: str, out_dir: Path) -> dict:
    """Child process: compress one variant, report seconds and peak RSS."""
    import onnxruntime  # noqa: F401  (imported before the baseline so both rows pay for it)

    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _, calibration, _ = _load(model_name)
    model_path = out_dir / "fp32.onnx"
    out_path = out_dir / f"{variant}.onnx"
    started = time.perf_counter()
    if variant.startswith("ort-"):
        _compress_ort(variant, model_path, out_path, calibration_method, calibration)
    elif variant == "fp32-fused":
        _fuse_only(model_path, out_path)
    else:
        _compress_ours(variant, model_path, out_path, calibration_method, calibration)
    return {"seconds": time.perf_counter() - started,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "baseline_rss_bytes": baseline_rss}


def _spawn(model_name: str, variant: str, calibration_method: str, out_dir: Path) -> dict:
    command = [sys.executable, "-m", "bench.quality", "--compress-one", model_name, variant,
               "--calibration", calibration_method]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


def evaluate(model_name: str, variants: list[str], calibration_method: str, runs: int) -> dict:
    model, calibration, evaluation = _load(model_name)
    out_dir = OUT_DIR / model_name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    onnx.save(model, str(out_dir / "fp32.onnx"))
    has_matmul = bool(_matmul_weight_nodes(model))
    rows: dict[str, dict] = {"fp32": {"seconds": 0.0}}
    for variant in variants:
        if variant in MATMUL_ONLY and not has_matmul:
            continue
        rows[variant] = _spawn(model_name, variant, calibration_method, out_dir)

    feeds = {k: v for k, v in evaluation.items() if k != "_labels"}
    labels = evaluation["_labels"]
    sessions = open_variants(rows, out_dir, error_chars=160)
    reference = sessions["fp32"].run(None, feeds)[0].astype(np.float64)
    for name, session in sessions.items():
        output = session.run(None, feeds)[0].astype(np.float64)
        row = rows[name]
        row["accuracy"] = float((output.argmax(1) == labels).mean())
        row["rel_l2"] = float(np.linalg.norm(output - reference) / np.linalg.norm(reference))
        cos = (output * reference).sum(1) / (np.linalg.norm(output, axis=1) * np.linalg.norm(reference, axis=1) + 1e-30)
        row["cosine"] = float(cos.mean())
        row["top1_agreement"] = float((output.argmax(1) == reference.argmax(1)).mean())
        row["size_ratio"] = rows["fp32"]["bytes"] / row["bytes"]

    batch = {k: v[:LATENCY_BATCH] for k, v in feeds.items()}
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():       # warm-up: first runs allocate and pack weights
        for _ in range(3):
            session.run(None, batch)
    for _ in range(runs):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, batch)
            timings[name].append(time.perf_counter() - started)
    for name, values in timings.items():
        rows[name]["latency_ms_p50"] = float(np.percentile(values, 50) * 1e3)
        rows[name]["latency_ms_p95"] = float(np.percentile(values, 95) * 1e3)
    for name in sessions:
        rows[name]["latency_ratio_vs_fp32"] = rows[name]["latency_ms_p50"] / rows["fp32"]["latency_ms_p50"]
    return {"model": model_name, "calibration": calibration_method, "float_bytes": rows["fp32"]["bytes"],
            "latency_batch": LATENCY_BATCH, "threads": 1, "runs": runs, "rows": rows}


def bars(result: dict) -> list[str]:
    """The issue's bars, checked against this run's figures."""
    rows = result["rows"]
    found = []

    def have(*names):
        return all(name in rows and "error" not in rows[name] and "accuracy" in rows[name] for name in names)

    if have("ours-static", "ort-static"):
        ours, theirs = rows["ours-static"], rows["ort-static"]
        found.append(f"static int8 accuracy {ours['accuracy']:.4f} >= ORT {theirs['accuracy']:.4f}: "
                     f"{'PASS' if ours['accuracy'] >= theirs['accuracy'] else 'FAIL'}")
        found.append(f"static int8 rel_l2 {ours['rel_l2']:.4f} <= ORT {theirs['rel_l2']:.4f}: "
                     f"{'PASS' if ours['rel_l2'] <= theirs['rel_l2'] else 'FAIL'}")
        found.append(f"static int8 size ratio {ours['size_ratio']:.2f}x >= 3.5x: "
                     f"{'PASS' if ours['size_ratio'] >= 3.5 else 'FAIL'}")
        found.append(f"static int8 latency {ours['latency_ratio_vs_fp32']:.2f}x FP32 <= 1.0: "
                     f"{'PASS' if ours['latency_ratio_vs_fp32'] <= 1.0 else 'FAIL'}")
    if have("ours-dynamic") and result["model"] == "transformer_encoder":
        ratio = rows["ours-dynamic"]["latency_ratio_vs_fp32"]
        found.append(f"dynamic int8 latency {ratio:.2f}x FP32 <= 0.6: {'PASS' if ratio <= 0.6 else 'FAIL'}")
    if have("ours-dynamic-s8") and result["model"] == "transformer_encoder":     # the same bar, u8s8 storage
        ratio = rows["ours-dynamic-s8"]["latency_ratio_vs_fp32"]
        found.append(f"dynamic int8 (int8 storage) latency {ratio:.2f}x FP32 <= 0.6: {'PASS' if ratio <= 0.6 else 'FAIL'}")
    if have("ours-int4-gptq", "ort-int4-rtn"):
        ours, theirs = rows["ours-int4-gptq"]["rel_l2"], rows["ort-int4-rtn"]["rel_l2"]
        found.append(f"int4 GPTQ rel_l2 {ours:.4f} <= 0.8 x ORT RTN {theirs:.4f} = {0.8 * theirs:.4f}: "
                     f"{'PASS' if ours <= 0.8 * theirs else 'FAIL'}")
    limit = 2 * result["float_bytes"] + 2 ** 30
    for name, row in rows.items():
        if "peak_rss_bytes" in row and name.startswith("ours"):
            found.append(f"{name} peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB <= 2 x float + 1 GiB "
                         f"({limit / 2**20:.0f} MiB): {'PASS' if row['peak_rss_bytes'] <= limit else 'FAIL'}")
    return found


def table(result: dict) -> str:
    header = (f"{result['model']} (calibration {result['calibration']}, latency: batch {result['latency_batch']}, "
              f"1 thread, {result['runs']} interleaved runs)")
    lines = [header, f"{'variant':21} {'accuracy':>8} {'rel_l2':>8} {'cosine':>8} {'top1':>6} {'bytes':>9} "
                     f"{'ratio':>6} {'p50 ms':>7} {'vs fp32':>7} {'compress s':>10} {'peak RSS MiB':>12}"]
    for name, row in result["rows"].items():
        if "error" in row:
            lines.append(f"{name:21} FAILED: {row['error']}")
            continue
        rss = f"{row['peak_rss_bytes'] / 2**20:12.0f}" if "peak_rss_bytes" in row else f"{'-':>12}"
        lines.append(f"{name:21} {row['accuracy']:8.4f} {row['rel_l2']:8.4f} {row['cosine']:8.5f} "
                     f"{row['top1_agreement']:6.3f} {row['bytes']:9d} {row['size_ratio']:6.2f} "
                     f"{row['latency_ms_p50']:7.2f} {row['latency_ratio_vs_fp32']:7.2f} {row['seconds']:10.2f} {rss}")
    lines += ["  bar: " + line for line in bars(result)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calibration", default="minmax", choices=("minmax", "percentile", "entropy"))
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--compress-one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compress_one:
        model_name, variant = args.compress_one
        print(json.dumps(compress_one(model_name, variant, args.calibration, OUT_DIR / model_name)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = []
    for model_name in [m for m in args.models.split(",") if m]:
        result = evaluate(model_name, variants, args.calibration, args.runs)
        result["bars"] = bars(result)
        results.append(result)
        if not args.json:
            print(table(result), flush=True)
            print()
    if args.json:
        print(json.dumps({"results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
