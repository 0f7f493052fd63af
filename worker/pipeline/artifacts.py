"""The files a run writes in its workdir, named once: the runner writes them, the worker task
uploads them, ``featherweight compress`` moves them. Imports nothing, so the Celery process can read
the names without loading the pipeline."""
from __future__ import annotations

MODEL_FILE = "model.onnx"
# a model past protobuf's 2 GB limit keeps its tensors in one file beside it (graph.save_model)
EXTERNAL_DATA_SUFFIX = ".data"
MODEL_DATA_FILE = MODEL_FILE + EXTERNAL_DATA_SUFFIX
REPORT_FILE = "report.json"
REPORT_HTML_FILE = "report.html"
# the deploy formats a recipe's ``export`` adds (worker.pipeline.export): the model file first
EXPORT_FILES: dict[str, tuple[str, ...]] = {
    "ort": ("model.ort", "model.required_operators_and_types.config"),
    "pytorch": ("model.pt", "model.state_dict.pt"),
    "tflite": ("model.tflite",),
}


def external_data_file(model_file: str) -> str:
    """The name of the file that holds ``model_file``'s tensors when they are stored beside it."""
    return model_file + EXTERNAL_DATA_SUFFIX
# per-layer sensitivity (recipes with ``sensitivity`` or a quantize ``max_output_error``)
SENSITIVITY_FILE = "sensitivity.json"
# a goal's best verified candidates after the chosen one, best first (worker.pipeline.search.engine)
CANDIDATE_COUNT = 3


def candidate_name(rank: int) -> str:
    """The artifact name of a goal's ``rank``-th next best candidate (1-based)."""
    return f"candidate-{rank}"


def candidate_file(rank: int) -> str:
    """The workdir file that holds the ``rank``-th next best candidate."""
    return candidate_name(rank) + ".onnx"
