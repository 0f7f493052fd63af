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


def file_bytes(path: Path) -> int:
    """The model file's bytes, with its external-data file where there is one."""
    extra = Path(str(path) + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def open_variants(rows: dict[str, dict], out_dir: Path, error_chars: int = 200) -> dict:
    """A session on ``out_dir/<name>.onnx`` for each row without an ``error``; a file ONNX Runtime
    cannot load is a finding, written into its row as the error. Each loaded row gets its ``bytes``."""
    sessions = {}
    for name, row in rows.items():
        if "error" in row:
            continue
        path = out_dir / f"{name}.onnx"
        try:
            sessions[name] = single_thread_session(path)
        except Exception as error:   # any load failure is reported in the row, not raised
            row["error"] = f"ORT cannot load: {str(error).splitlines()[0][:error_chars]}"
            continue
        row["bytes"] = file_bytes(path)
    return sessions
