"""What every format's converter gets: the compressed model's file, where to write, the recipe,
the target and the data."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.recipe import QuantizeStep, Recipe
from worker.pipeline.data import Dataset


@dataclass
class ExportContext:
    model_path: Path             # the compressed model.onnx
    workdir: Path                # the format's files are written here, under the names in its FILES
    recipe: Recipe
    target: str
    calibration: Dataset | None  # a full-integer converter's representative data
    measure_data: Dataset        # what fidelity is measured on (evaluation, else calibration, else generated)
    options: dict[str, Any] = field(default_factory=dict)

    def quantization(self) -> str:
        """How the recipe quantized: ``static`` (weights and activations calibrated), ``dynamic``
        (activations at run time), ``weights`` (weight-only), ``fp16``, or ``float``; the last
        quantizing step decides."""
        kind = "float"
        for step in self.recipe.steps:
            if isinstance(step, QuantizeStep):
                if step.activations is None:
                    kind = "weights"
                elif step.activations.calibration == "dynamic":
                    kind = "dynamic"
                else:
                    kind = "static"
            elif step.op == "fp16":
                kind = "fp16" if kind == "float" else kind
        return kind
