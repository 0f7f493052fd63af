"""A goal that does not fit the model or the data is refused at submit (422) with the field's path."""
from __future__ import annotations

import io

import numpy as np
import pytest


@pytest.fixture
def model_id(api_client, onnx_models) -> str:
    response = api_client.post("/v1/models", files={"file": ("mlp.onnx", onnx_models.mlp().SerializeToString())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def dataset_id(api_client) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((8, 128), np.float32))
    response = api_client.post("/v1/datasets", files={"file": ("cal.npz", buffer.getvalue())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("goal", "with_data", "loc"),
    [
        ({"metric": "cosine", "output": "embeddings"}, True, ["body", "recipe", "goal", "output"]),
        ({"metric": "iou"}, True, ["body", "recipe", "goal", "threshold"]),
        ({"metric": "cosine", "threshold": 0.5}, True, ["body", "recipe", "goal", "threshold"]),
        ({"metric": "recall"}, True, ["body", "recipe", "goal", "metric"]),
        ({"metric": "accuracy"}, True, ["body", "recipe", "goal", "metric"]),       # no _labels
        ({"metric": "cosine"}, False, ["body", "recipe", "goal", "metric"]),        # no data at all
        ({"metric": "cosine", "max_drop": -1}, True, ["body", "recipe", "goal", "max_drop"]),
        ({"metric": "cosine", "carry": {"state": "x"}}, True, ["body", "recipe", "goal", "carry"]),   # no such output
        ({"metric": "cosine", "carry": {"logits": "state"}}, True, ["body", "recipe", "goal", "carry"]),  # no input
        ({"metric": "ctc_agreement"}, True, ["body", "recipe", "goal", "metric"]),  # logits has no time axis
        ({"metric": "cosine", "blank": 0}, True, ["body", "recipe", "goal", "blank"]),
        ({"metric": "cosine", "trim": [1]}, True, ["body", "recipe", "goal", "trim"]),
    ],
)
def test_goal_that_does_not_fit_is_422_with_its_path(api_client, migrated, model_id, dataset_id, goal, with_data, loc):
    body = {"model_id": model_id, "recipe": {"goal": goal}}
    if with_data:
        body["calibration_dataset_id"] = dataset_id
    response = api_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == loc


def test_goal_that_fits_is_accepted(api_client, migrated, model_id, dataset_id):
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "calibration_dataset_id": dataset_id,
                                                 "recipe": {"goal": {"metric": "top1_agreement", "output": "logits"}}})
    assert response.status_code == 202, response.text
