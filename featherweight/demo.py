"""``make demo``: a first job end to end, against a running server (``make run`` in another terminal).

Owns the demo and nothing else: it trains a small digit classifier here (scikit-learn's bundled 8x8
handwritten digits, a 64-128-10 MLP trained with numpy in about a second), writes it as ONNX with
its held-out images as the evaluation data set (.npz with ``_labels``, so the report gives
accuracy), uploads both, submits a job with a prune + int8 recipe, shows its progress, prints the
report's headline figures and downloads the compressed model and report.html next to the inputs.

    python -m featherweight.demo --server http://127.0.0.1:8000 --out demo-output

Exit status 0 when the job succeeded; 1 when it failed; 2 when no server answers or input is bad.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN = 128
CLASSES = 10
TRAIN_STEPS = 100
RECIPE: dict[str, Any] = {"steps": [{"op": "prune", "sparsity": 0.5}, {"op": "quantize", "weights": {"bits": 8}}]}
RECIPE_TEXT = "prune 50% of the weights, then int8 weights"


class DemoError(Exception):
    """A one-line reason the demo stops; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class DemoFiles:
    model: Path
    evaluation: Path
    train_samples: int
    test_samples: int
    test_accuracy: float


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits (pixels 0..16) as float32 [N, 64] in 0..1 and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DemoError("the demo trains on scikit-learn's bundled digits: pip install scikit-learn "
                        "(make install does)") from None
    digits = sklearn_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def train_mlp(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """x -> W1 + b1 -> ReLU -> W2 + b2 -> logits, fitted by full-batch Adam on the softmax cross-entropy."""
    rng = np.random.default_rng(seed)
    params = {"W1": (rng.standard_normal((x.shape[1], HIDDEN)) * np.sqrt(2.0 / x.shape[1])).astype(np.float32),
              "b1": np.zeros(HIDDEN, np.float32),
              "W2": (rng.standard_normal((HIDDEN, CLASSES)) * np.sqrt(1.0 / HIDDEN)).astype(np.float32),
              "b2": np.zeros(CLASSES, np.float32)}
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    onehot = np.eye(CLASSES, dtype=np.float32)[y]
    rate, beta1, beta2 = 0.01, 0.9, 0.999
    for step in range(1, TRAIN_STEPS + 1):
        pre = x @ params["W1"] + params["b1"]
        hidden = np.maximum(pre, 0.0)
        logits = hidden @ params["W2"] + params["b2"]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        d_logits = (probs - onehot) / x.shape[0]
        d_hidden = (d_logits @ params["W2"].T) * (pre > 0)
        grads = {"W2": hidden.T @ d_logits, "b2": d_logits.sum(axis=0),
                 "W1": x.T @ d_hidden, "b1": d_hidden.sum(axis=0)}
        for name, grad in grads.items():
            m, v = moments[name]
            m[...] = beta1 * m + (1 - beta1) * grad
            v[...] = beta2 * v + (1 - beta2) * grad * grad
            update = rate * (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + 1e-8)
            params[name] = (params[name] - update).astype(np.float32)
    return params


def predict(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    hidden = np.maximum(x @ params["W1"] + params["b1"], 0.0)
    return np.argmax(hidden @ params["W2"] + params["b2"], axis=1)


def to_onnx(params: dict[str, np.ndarray]):
    """The MLP as an ONNX model: pixels[batch, 64] -> logits[batch, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["pixels", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="fc2"),
             helper.make_node("Add", ["h3", "b2"], ["logits"], name="fc2_bias")]
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(value, name) for name, value in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="featherweight-demo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out: Path, seed: int = 0) -> DemoFiles:
    """Train the classifier and write digits.onnx and evaluation.npz under ``out``."""
    import onnx

    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(len(x) * 0.8)
    train, test = order[:split], order[split:]
    params = train_mlp(x[train], y[train], seed)
    accuracy = float(np.mean(predict(params, x[test]) == y[test]))
    out.mkdir(parents=True, exist_ok=True)
    files = DemoFiles(out / "digits.onnx", out / "evaluation.npz", len(train), len(test), accuracy)
    onnx.save_model(to_onnx(params), str(files.model))
    np.savez(files.evaluation, pixels=x[test], _labels=y[test])
    return files


def run(client: Any, out: Path, server: str, stream=sys.stdout, progress_stream=sys.stderr) -> int:
    """Build the inputs, run one job on ``client``'s server, print what came of it."""
    from featherweight.client import FeatherweightAPIError, ServerUnavailable
    from featherweight.remote_cmds import Progress, _headline

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    try:
        client.health()
    except ServerUnavailable:
        raise DemoError(f"no Featherweight server answers at {server}: start one with `make run` in another "
                        "terminal, then run `make demo` again") from None
    files = build(out)
    say(f"trained a 64-{HIDDEN}-{CLASSES} MLP on 8x8 handwritten digits ({files.train_samples:,} training "
        f"images): test accuracy {files.test_accuracy:.1%}")
    say(f"  model {files.model}, evaluation data {files.evaluation} ({files.test_samples} labelled images)")
    progress = Progress(progress_stream)
    try:
        model = client.upload_model(files.model, progress.transfer(f"upload {files.model.name}"))
        evaluation = client.upload_dataset(files.evaluation, progress.transfer(f"upload {files.evaluation.name}"))
        job = client.submit(model.id, RECIPE, eval_dataset_id=evaluation.id)
        say(f"submitted job {job.id} to {server}: {RECIPE_TEXT}")
        job = client.wait(job.id, on_progress=progress.job)
        progress.close()
        if not job.succeeded:
            error = job.error or {}
            raise DemoError(f"job {job.id} {job.state}: {error.get('detail') or error.get('title') or 'no reason given'}",
                            1)
        html = client.download(job.id, "report.html", out / "report.html").path
        light = client.download(job.id, "model", out / "digits.light.onnx").path
    except FeatherweightAPIError as exc:
        progress.close()
        raise DemoError(f"{exc}") from None
    say(f"report: {_headline(job.report)}")
    say(f"  report.html: {html}  (also {server.rstrip('/')}/v1/jobs/{job.id}/artifacts/report.html)")
    say(f"  compressed model: {light}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m featherweight.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the running service (make run)")
    parser.add_argument("--api-key", help="API key, where the server requires one")
    parser.add_argument("--out", default="demo-output", help="folder for the model, data and results")
    args = parser.parse_args(argv)
    from featherweight.client import Client

    try:
        with Client(args.server, api_key=args.api_key) as client:
            return run(client, Path(args.out), args.server)
    except DemoError as exc:
        print(f"featherweight demo: {exc}", file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
