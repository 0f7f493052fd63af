"""Real-model bench: ours against ONNX Runtime's quantizers and NNCF on real pretrained models, one run.

    .venv/bin/python -m bench.real_bench [--models ocr_det,minilm] [--methods ours-static,ort-static-minmax]
                                         [--quick] [--runs 20] [--json]

Models and their data and task metrics: ``bench.real_models`` (PP-OCRv4 detector and recognizer,
PP-OCR orientation classifier, all-MiniLM-L6-v2, silero-vad). Methods: ``bench.real_peers``.
Needs the ``bench`` extra (pip install -e '.[bench]').

For every model, each method compresses the same float file with the same calibration set, in its
own subprocess so that its wall time and peak RSS (``resource.getrusage``, the process and its
children) are its own. Then in this process, on the same evaluation set:

    task          the model's task metric against FP32's outputs (1.0 = behaves as FP32)
    truth         the task metric against ground truth where there is one (rendered text, labels)
    rel_l2        ||out - fp32|| / ||fp32|| over the task's raw outputs
    size          float file bytes / compressed file bytes
    latency       p50 of one evaluation batch, one thread, all variants interleaved run by run, / FP32's
    compress s    wall time of the compression: model load, calibration, quantization (GPTQ), write.
                  The same span for every method: ours is the pipeline's ``cost.compress_seconds``
                  (its own checks of the result included, its report not: ORT and NNCF write no
                  report, and ours measures latency and fidelity for it); ORT's includes the
                  ``quant_pre_process`` it recommends. (Until issue #20 ours also counted a trimmed
                  report, latency runs included, against ORT's bare quantize_static.)
    cpu s         CPU seconds (user + system, every thread) of that span: on a shared machine
                  the wall time is inflated by the other jobs, the CPU time much less
    command s     ours only: the whole ``featherweight compress`` run, the trimmed report included
                  (wall, then CPU, in the row's notes)
    peak MiB      peak RSS of the compressing process (includes the ~0.3-0.5 GB of interpreter,
                  onnxruntime and the data that every method pays)

A failed method prints its error in its row; nothing is left out silently. The machine is shared,
so timings are noisy: compare ratios within one run. Results: a markdown table on stdout and JSON
in ``bench/out/real_bench.json`` (and a timestamped copy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.real_models import NAMES, load
from bench.real_peers import MATMUL_ONLY, METHODS, compress, has_matmul_weights
from bench.sessions import open_variants

OUT_DIR = Path(__file__).resolve().parent / "out"
WORK_DIR = OUT_DIR / "real_bench"


def _peak_rss_bytes() -> int:
    """This process's peak RSS since it started (VmHWM), or that of a child it ran, if larger.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries it over fork and exec, so a compression
    spawned by a bench that already holds gigabytes of sessions would report the bench's peak."""
    with open("/proc/self/status") as status:
        own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024


def compress_one(model_name: str, method: str, quick: bool, work_dir: Path = WORK_DIR) -> dict:
    """Child process: compress one (model, method) into ``work_dir/<model>/<method>.onnx``, report
    seconds and peak RSS."""
    import onnxruntime  # noqa: F401  (imported before the baseline: every method pays for it)

    real = load(model_name, quick)
    baseline = _peak_rss_bytes()
    out_path = work_dir / model_name / f"{method}.onnx"
    started, started_cpu = time.perf_counter(), _cpu_seconds()
    notes = compress(method, real, out_path)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - started_cpu
    row = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": _peak_rss_bytes(),
           "baseline_rss_bytes": baseline, **notes}
    if "compress_seconds" in notes:     # ours: the span ORT's figure covers; the whole command in notes
        row.update(seconds=notes["compress_seconds"], cpu_seconds=notes["compress_cpu_seconds"],
                   command_seconds=seconds, command_cpu_seconds=cpu)
        row["notes"] = [*row.get("notes", []), f"command {seconds:.1f} s, {cpu:.1f} s CPU"]
    return row


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def spawn(model_name: str, method: str, quick: bool, timeout: float, work_dir: Path = WORK_DIR) -> dict:
    """Compress one (model, method) in a subprocess of its own (its time and peak RSS its own);
    the row's figures, or ``{"error": ...}`` with the reason."""
    command = [sys.executable, "-m", "bench.real_bench", "--compress-one", model_name, method,
               "--work-dir", str(work_dir)]
    if quick:
        command.append("--quick")
    return run_child(command, work_dir / model_name / f"{method}.log", timeout)


def run_child(command: list[str], log: Path, timeout: float) -> dict:
    """Run a bench child (``--compress-one`` and the like) in ``log``'s folder with this checkout
    first on the path; its last ``{"seconds": ...}`` line, or ``{"error": ...}`` with the reason.
    Its stdout and stderr go to ``log``."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    try:
        # In the model's work folder: ORT's pre-processing and GPTQ leave temporary files in the cwd.
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=log.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    lines = [line[line.index('{"seconds"'):] for line in done.stdout.splitlines() if '{"seconds"' in line]
    if done.returncode != 0 or not lines:
        errors = [line for line in done.stderr.strip().splitlines() if line.strip()]
        tail = next((line for line in reversed(errors) if "Error" in line or "error" in line), None)
        return {"error": (tail or (errors or ["no output"])[-1]).strip()[:300]}
    return json.loads(lines[-1])


def _latency_feed(real, session) -> dict[str, np.ndarray]:
    from bench.real_models import batches

    ranks = {i.name: len(i.shape) for i in session.get_inputs()}
    if real.name.startswith("vad"):     # one 512-sample step of all streams, the state as streaming has it
        streams = real.meta["audio"].shape[0]
        return {"input": np.ascontiguousarray(real.meta["audio"][:, :576]),
                "state": np.zeros((2, streams, 128), np.float32), "sr": np.array(16000, np.int64)}
    return next(iter(batches(real.evaluation, ranks, 8)))


def refuse_unknown(parser: argparse.ArgumentParser, *choices: tuple[list[str], object, str]) -> None:
    """``parser.error`` (exit 2) on the first (chosen, known, what) whose chosen names are not all known."""
    for chosen, known, what in choices:
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {what} {unknown}; choose from {list(known)}")


def fresh_work_dir(real, out_dir: Path) -> Path:
    """``out_dir`` emptied, with the float model in it as fp32.onnx (every method's source)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copy(real.path, out_dir / "fp32.onnx")
    return out_dir


def evaluate(model_name: str, methods: list[str], quick: bool, runs: int, timeout: float) -> dict:
    real = load(model_name, quick)
    out_dir = fresh_work_dir(real, WORK_DIR / model_name)
    matmul = has_matmul_weights(real.path)
    rows: dict[str, dict] = {"fp32": {"seconds": 0.0, "notes": []}}
    for method in methods:
        if method in MATMUL_ONLY and not matmul:
            continue
        started = time.perf_counter()
        rows[method] = spawn(model_name, method, quick, timeout)
        print(f"  {model_name} {method}: {time.perf_counter() - started:.1f} s"
              f"{' FAILED ' + rows[method]['error'] if 'error' in rows[method] else ''}", file=sys.stderr, flush=True)

    return {"model": model_name, "package": real.package, "description": real.description,
            "metric": real.metric_name, "truth_metric": real.truth_name,
            "calibration_samples": len(next(iter(real.calibration.values()))),
            "meta": {k: v for k, v in real.meta.items() if isinstance(v, str)}, **measure(real, rows, out_dir, runs)}


def measure(real, rows: dict[str, dict], out_dir: Path, runs: int) -> dict:
    """Every row's ``out_dir/<name>.onnx`` (``fp32`` among them) on the evaluation set, in this
    process: task metric, truth, rel_l2, size ratio; then latency, all variants interleaved run by
    run. Fills ``rows`` in place; returns the run's shared facts (float bytes, latency feed, runs)."""
    sessions = open_variants(rows, out_dir, error_chars=200)

    reference = real.infer(sessions["fp32"])
    for name, session in list(sessions.items()):
        row = rows[name]
        try:
            output = real.infer(session)
        except Exception as error:   # loads but fails to run: also a finding
            row["error"] = f"ORT cannot run: {str(error).splitlines()[0][:200]}"
            del sessions[name]
            continue
        row["task"] = real.task_metric(reference, output)
        if real.truth_metric is not None:
            row["truth"] = real.truth_metric(output)
        diff = output.astype(np.float64) - reference.astype(np.float64)
        row["rel_l2"] = float(np.linalg.norm(diff) / np.linalg.norm(reference.astype(np.float64)))
        row["size_ratio"] = rows["fp32"]["bytes"] / row["bytes"]

    feed = _latency_feed(real, sessions["fp32"])
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():       # warm-up: first runs allocate and pack weights
        for _ in range(2):
            session.run(None, feed)
    for _ in range(runs):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feed)
            timings[name].append(time.perf_counter() - started)
    for name, values in timings.items():
        rows[name]["latency_ms_p50"] = float(np.percentile(values, 50) * 1e3)
        rows[name]["latency_ratio"] = rows[name]["latency_ms_p50"] / float(np.percentile(timings["fp32"], 50) * 1e3)
    return {"float_bytes": rows["fp32"]["bytes"], "latency_feed": {k: list(v.shape) for k, v in feed.items()},
            "runs": runs, "rows": rows}


def findings(result: dict) -> list[str]:
    """Issue #14's bars against this run's figures (only those this run can decide)."""
    rows = {k: v for k, v in result["rows"].items() if "task" in v}
    found = []
    peers = [m for m in rows if m.startswith(("ort-static", "ort-dynamic", "nncf"))]
    for ours in ("ours-static", "ours-static-pct", "ours-static-minmax", "ours-static-mse"):
        if ours in rows and peers:
            best = max(peers, key=lambda m: rows[m]["task"])
            verdict = "PASS" if rows[ours]["task"] >= rows[best]["task"] else "FAIL"
            found.append(f"{ours} task {rows[ours]['task']:.4f} >= best peer {best} {rows[best]['task']:.4f}: {verdict}")
    fp32 = rows.get("fp32", {}).get("task", 1.0)
    for name in ("ours-static", "ours-static-pct", "ours-static-minmax", "ours-static-mse", "ours-dynamic"):
        if name in rows:
            verdict = "PASS" if rows[name]["task"] >= 0.95 * fp32 else "FAIL"
            found.append(f"{name} task {rows[name]['task']:.4f} >= 0.95 of FP32: {verdict}")
    if "ours-static" in rows:
        row = rows["ours-static"]
        found.append(f"ours-static size {row['size_ratio']:.2f}x >= 3.5x: {'PASS' if row['size_ratio'] >= 3.5 else 'FAIL'}")
        found.append(f"ours-static latency {row['latency_ratio']:.2f}x FP32 <= 1.0: "
                     f"{'PASS' if row['latency_ratio'] <= 1.0 else 'FAIL'}")
    if "ours-int4-gptq" in rows and "ort-int4-rtn" in rows:
        ours, theirs = rows["ours-int4-gptq"]["rel_l2"], rows["ort-int4-rtn"]["rel_l2"]
        found.append(f"ours-int4-gptq rel_l2 {ours:.4f} <= 0.8 x ORT RTN {theirs:.4f}: {'PASS' if ours <= 0.8 * theirs else 'FAIL'}")
    limit = 2 * result["float_bytes"] + 2 ** 30
    for name, row in result["rows"].items():
        if name.startswith("ours") and "peak_rss_bytes" in row:
            found.append(f"{name} peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB <= 2x float + 1 GiB "
                         f"({limit / 2**20:.0f} MiB): {'PASS' if row['peak_rss_bytes'] <= limit else 'FAIL'}")
    for ours, peer in (("ours-static", "ort-static-minmax"), ("ours-int4-gptq", "ort-int4-gptq")):
        a, b = result["rows"].get(ours, {}), result["rows"].get(peer, {})
        if "seconds" in a and "seconds" in b and "error" not in a and "error" not in b:
            found.append(f"{ours} {a['seconds']:.1f} s <= half of {peer} {b['seconds']:.1f} s: "
                         f"{'PASS' if a['seconds'] <= 0.5 * b['seconds'] else 'FAIL'}")
            if "cpu_seconds" in a and "cpu_seconds" in b:
                found.append(f"{ours} {a['cpu_seconds']:.1f} s CPU <= half of {peer} {b['cpu_seconds']:.1f} s CPU: "
                             f"{'PASS' if a['cpu_seconds'] <= 0.5 * b['cpu_seconds'] else 'FAIL'}")
    return found


def table(result: dict) -> str:
    return markdown(result, f"{result['description']} (pip: {result['package']})",
                    f"; {result['calibration_samples']} calibration samples; latency feed "
                    f"{result['latency_feed']}, 1 thread, {result['runs']} interleaved runs", findings(result))


def markdown(result: dict, title: str, details: str, found: list[str], with_bytes: bool = False) -> str:
    """One model's section: its title, the task metric and ``details``, the methods' table, ``found``."""
    truth = result["truth_metric"]
    lines = [f"### {result['model']}: {title}", "",
             f"task metric: {result['metric']} vs FP32" + (f"; truth: {truth}" if truth else "") + details, "",
             *table_body(result["rows"], found, with_bytes)]
    return "\n".join(lines)


def table_body(rows: dict[str, dict], found: list[str], with_bytes: bool = False) -> list[str]:
    """The methods' markdown table (``table_row``'s columns) and the findings under it."""
    columns = ["method", "task", "truth", "rel_l2", "size x"] + (["bytes"] if with_bytes else []) + [
        "latency x", "compress s", "cpu s", "peak MiB", "notes"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [table_row(name, row, with_bytes) for name, row in rows.items()]
    return lines + [""] + [f"- {line}" for line in found]


def table_row(name: str, row: dict, with_bytes: bool = False) -> str:
    """One method's markdown row (``table``'s columns; ``with_bytes``: the file's bytes after size x)."""
    if "error" in row:
        return (f"| {name} | FAILED: {row['error'].replace('|', '/')} | | | | {'| ' if with_bytes else ''}| "
                f"{row.get('seconds', float('nan')):.1f} | | | |")
    truth_cell = f"{row['truth']:.4f}" if "truth" in row else "-"
    rss = f"{row['peak_rss_bytes'] / 2**20:.0f}" if "peak_rss_bytes" in row else "-"
    size = f"{row['size_ratio']:.2f} | " + (f"{row['bytes']:,} | " if with_bytes else "")
    return (f"| {name} | {row['task']:.4f} | {truth_cell} | {row['rel_l2']:.4f} | {size}"
            f"{row['latency_ratio']:.2f} | {row['seconds']:.1f} | {row.get('cpu_seconds', float('nan')):.1f} | {rss} | "
            f"{'; '.join(row.get('notes', [])).replace('|', '/')} |")


def write_document(results: list[dict], quick: bool, started: float, out: Path) -> str:
    """The run's JSON document (machine, results) to ``out`` and a timestamped copy beside it."""
    import onnxruntime

    document = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "quick": quick,
                "seconds": time.time() - started, "machine": {"cpu": platform.processor() or platform.machine(),
                                                              "cpus": os.cpu_count(),
                                                              "onnxruntime": onnxruntime.__version__},
                "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2)
    out.write_text(text)
    out.with_name(f"{out.stem}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(started))}.json").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.real_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(NAMES), help=f"comma-separated, from {','.join(NAMES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="a few samples per model, 5 latency runs")
    parser.add_argument("--runs", type=int, default=None, help="latency runs (default 20, quick 5)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per compression")
    parser.add_argument("--json", action="store_true", help="print the JSON document instead of tables")
    parser.add_argument("--compress-one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compress_one:
        # On a line of its own: tools' progress bars end without a newline.
        print("\n" + json.dumps(compress_one(*args.compress_one, args.quick, args.work_dir)))
        return 0
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    refuse_unknown(parser, (models, NAMES, "models"), (methods, METHODS, "methods"))
    runs = args.runs if args.runs is not None else (5 if args.quick else 20)
    started = time.time()
    results = []
    for model_name in models:
        result = evaluate(model_name, methods, args.quick, runs, args.timeout)
        result["findings"] = findings(result)
        results.append(result)
        if not args.json:
            print(table(result) + "\n", flush=True)
    text = write_document(results, args.quick, started, OUT_DIR / "real_bench.json")
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
