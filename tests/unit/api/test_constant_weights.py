"""A model whose weights all sit in Constant nodes (as paddle2onnx exports them) is a model with
weights: the upload counts them and a quantize job is accepted over REST, as the pipeline lifts them."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8}}]}


def _upload(api_client, model: onnx.ModelProto) -> dict:
    response = api_client.post("/v1/models", files={"file": ("m.onnx", model.SerializeToString())})
    assert response.status_code == 201, response.text
    return response.json()


def test_weights_in_constant_nodes_are_counted_and_a_quantize_job_is_accepted(api_client, onnx_models):
    model = onnx_models.constants(onnx_models.mlp())
    assert len(model.graph.initializer) == 0
    uploaded = _upload(api_client, model)
    # The three MatMul weights (128x256, 256x128, 128x10); the biases feed Add, which no step rewrites.
    assert uploaded["params"] == 128 * 256 + 256 * 128 + 128 * 10
    response = api_client.post("/v1/jobs", json={"model_id": uploaded["id"], "recipe": RECIPE})
    assert response.status_code == 202, response.text


def test_a_model_without_weights_is_still_refused(api_client):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    uploaded = _upload(api_client, model)
    assert uploaded["params"] == 0
    response = api_client.post("/v1/jobs", json={"model_id": uploaded["id"], "recipe": RECIPE})
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    assert [e["loc"] for e in response.json()["errors"]] == [["body", "recipe", "steps", 0]]
