"""Named request examples that Swagger UI offers in its drop-down for POST /v1/jobs: the recipes
users start from. Each is validated by a test, so an example that the API would refuse cannot ship."""
from __future__ import annotations

from typing import Any

_MODEL = "<id from POST /v1/models>"
_CALIBRATION = "<id from POST /v1/datasets>"

JOB_EXAMPLES: dict[str, dict[str, Any]] = {
    "int8-weights": {
        "summary": "int8 weight-only, per output channel (no data needed)",
        "value": {"model_id": _MODEL, "target": "cpu-x86",
                  "recipe": {"steps": [{"op": "quantize",
                                        "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}},
    },
    "int8-static": {
        "summary": "int8 static: weights and activations, percentile calibration",
        "value": {"model_id": _MODEL, "target": "cpu-x86", "calibration_dataset_id": _CALIBRATION,
                  "recipe": {"steps": [{"op": "quantize", "weights": {"bits": 8},
                                        "activations": {"bits": 8, "calibration": "percentile"}}]}},
    },
    "int4-gptq": {
        "summary": "int4 weight-only with GPTQ, blocks of 32",
        "value": {"model_id": _MODEL, "target": "cpu-x86", "calibration_dataset_id": _CALIBRATION,
                  "recipe": {"steps": [{"op": "quantize", "method": "gptq",
                                        "weights": {"bits": 4, "granularity": "block", "block_size": 32}}]}},
    },
    "prune-then-int8": {
        "summary": "prune 50% by magnitude, then int8 weight-only",
        "value": {"model_id": _MODEL, "target": "cpu-x86",
                  "recipe": {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5},
                                       {"op": "quantize", "weights": {"bits": 8}}]}},
    },
    "int4-bounded": {
        "summary": "int4 weight-only, with layers moved to int8 / float until the output rel_l2 <= 0.02",
        "value": {"model_id": _MODEL, "target": "cpu-x86", "calibration_dataset_id": _CALIBRATION,
                  "recipe": {"sensitivity": {"samples": 32},
                             "steps": [{"op": "quantize", "max_output_error": 0.02,
                                        "weights": {"bits": 4, "granularity": "block", "block_size": 32}}]}},
    },
    "goal": {
        "summary": "goal: the smallest model within 0.01 top-1 agreement of the original (searched per layer)",
        "value": {"model_id": _MODEL, "target": "cpu-x86", "calibration_dataset_id": _CALIBRATION,
                  "recipe": {"goal": {"metric": "top1_agreement", "max_drop": 0.01, "minimize": "size",
                                      "time_budget_s": 1200}}},
    },
    "full-pipeline": {
        "summary": "cleanup, SparseGPT 2:4, low-rank, int4 GPTQ, layer-wise distillation",
        "value": {"model_id": _MODEL, "target": "cpu-x86", "calibration_dataset_id": _CALIBRATION,
                  "recipe": {"steps": [
                      {"op": "cleanup"},
                      {"op": "prune", "method": "sparsegpt", "sparsity": 0.5, "structure": "2:4"},
                      {"op": "lowrank", "energy": 0.95},
                      {"op": "quantize", "method": "gptq", "format": "qdq",
                       "weights": {"bits": 4, "granularity": "block", "block_size": 32}},
                      {"op": "distill", "method": "layerwise"},
                  ]}},
    },
}
