"""The ONNX Runtime session every benchmark times with: CPU provider, one intra-op and one inter-op
thread, so that variants compared in one run share the same conditions."""
from __future__ import annotations

from pathlib import Path


def single_thread_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
